"""Network-namespace lab: a node, routed pods and an outside client on one machine (DESIGN.md section 4).

Modules:
- ``netns``: run commands and Python code inside a namespace; :class:`LabError`; lab availability.
- ``cluster``: :class:`Lab` (one node) builds and always tears down the namespaces, veths and pod
  servers; ``LabBase`` holds what every lab shares (tag claim, teardown, processes).
- ``multinode``: :class:`MultiNodeLab`, several node namespaces joined by a bridge namespace, one
  proxy per node.
- ``podserver``: the stdlib-only server each pod runs; answers ``"<name> <peer_ip>"``.
- ``probe``: TCP/UDP probes from inside a namespace, classified as OK/REFUSED/TIMEOUT/...
- ``sctp``: SCTP probes as raw INIT chunks (this kernel has no SCTP sockets).
- ``apiserver``: the API-server test double (list/watch over HTTP(S)).

This package imports nothing at import time, so ``python -m kubeproxy.lab.podserver`` starts fast
in every pod. The lab never touches the host's network namespace (the lab safety rule).
"""
