"""The API-server source: three reflectors (Services, EndpointSlices, our Node) behind the same
``run(on_change, on_synced, stop=...)`` interface as the manifest directory.

Selectors are upstream kube-proxy's (cmd/kube-proxy/app/server.go): Services and EndpointSlices both
carry ``!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`` (another proxy's
objects and headless Services are never even sent to us); Services also ``spec.clusterIP!=None``; Nodes
``metadata.name=<our node>``.

``on_synced`` fires once, after the first complete lists of all three resources (the Node list completes
even when our Node does not exist), so the first sync already knows the node's addresses and zone.
Every later relist (after a 410) is followed by ``gc.freeze()``: what a list decodes is long-lived.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from kubeproxy.model.objects import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL
from kubeproxy.sources.apiclient import ApiClient
from kubeproxy.sources.events import Change
from kubeproxy.sources.kubeconfig import ClientSettings
from kubeproxy.sources.reflector import Reflector, ResourceSpec, Tuning

log = logging.getLogger("kubeproxy.sources.api")

PROXY_LABEL_SELECTOR = f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"


def resource_specs(node_name: str) -> list[ResourceSpec]:
    return [
        ResourceSpec("Service", "services", "/api/v1/services", PROXY_LABEL_SELECTOR, "spec.clusterIP!=None"),
        ResourceSpec(
            "EndpointSlice", "endpointslices", "/apis/discovery.k8s.io/v1/endpointslices", PROXY_LABEL_SELECTOR
        ),
        ResourceSpec("Node", "nodes", "/api/v1/nodes", field_selector=f"metadata.name={node_name}"),
    ]


class ApiSource:
    def __init__(self, settings: ClientSettings, node_name: str, *, tuning: Tuning | None = None) -> None:
        self.settings = settings
        self.node_name = node_name
        self.tuning = tuning or Tuning()
        self.reflectors: list[Reflector] = []

    async def run(
        self, on_change: Callable[[Change], None], on_synced: Callable[[], None], *, stop: asyncio.Event
    ) -> None:
        """Deliver every object, call ``on_synced()`` once all initial lists are in, then follow changes until
        ``stop``. Raises ``AccessDenied`` if a permission is missing before the initial lists completed."""
        log.info(
            "watching the API server server=%s via=%s auth=%s node=%s",
            self.settings.server,
            self.settings.origin,
            self.settings.credentials.describe,
            self.node_name,
        )
        announced = False

        def listed(reflector: Reflector) -> None:
            nonlocal announced
            if not announced:
                if all(r.synced for r in self.reflectors):
                    announced = True
                    on_synced()
                return
            gc.collect()
            gc.freeze()

        async with ApiClient(self.settings) as client:
            self.reflectors = [
                Reflector(client, spec, on_change, on_listed=listed, tuning=self.tuning)
                for spec in resource_specs(self.node_name)
            ]
            tasks = [asyncio.create_task(r.run(stop), name=f"reflector-{r.spec.resource}") for r in self.reflectors]
            stopped = asyncio.create_task(stop.wait(), name="api-source-stop")
            try:
                # Return as soon as we are told to stop (a watch may be parked in a read for minutes),
                # or raise the first reflector failure (only AccessDenied ever escapes a reflector).
                pending: set[asyncio.Task[object]] = {*tasks, stopped}
                while not stopped.done():
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        if task is not stopped and task.exception() is not None:
                            raise task.exception()  # type: ignore[misc]
            finally:
                for task in (*tasks, stopped):
                    task.cancel()
                await asyncio.gather(*tasks, stopped, return_exceptions=True)
