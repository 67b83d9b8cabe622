"""kube-proxy in Python: turns Services and EndpointSlices into kernel forwarding rules."""

__version__ = "0.1.0"
