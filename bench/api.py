"""API-source benchmark (part of ``make bench``; also ``python -m bench.api``), in a fresh process so RSS
deltas mean something.

1. decode: a 20k-EndpointSlice / 100k-endpoint list, as the API server sends it (with the managedFields
   and annotations real objects carry, which we skip), through the reflector's list decoding into our
   structs: seconds and extra RSS (goal: well under 1 s and under 150 MB on this machine);
2. watch events: 20k MODIFIED EndpointSlice events through the reflector's event handling: us/event;
3. end to end over loopback: the same list served by the API-server test double in pages of 500, listed
   by the real reflector (HTTP + decode + cache + emitted changes), then 20k watch events streamed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from kubeproxy.sources.apiclient import ApiClient
from kubeproxy.sources.events import Change
from kubeproxy.sources.kubeconfig import ClientSettings
from kubeproxy.sources.reflector import Reflector, ResourceSpec, Tuning

SLICES = 20_000
EPS_PER_SLICE = 5
SPEC = ResourceSpec("EndpointSlice", "endpointslices", "/apis/discovery.k8s.io/v1/endpointslices")


def rss_mb() -> float:
    with Path("/proc/self/statm").open() as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_slice(i: int, rv: int, variant: int = 0) -> dict[str, Any]:
    svc = f"svc-{i // 2}"
    base = (10 << 24) | (128 << 16) | (i * EPS_PER_SLICE + variant)
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": f"{svc}-{i:05x}",
            "generateName": f"{svc}-",
            "namespace": f"ns-{i % 50}",
            "uid": f"00000000-0000-4000-8000-{i:012d}",
            "resourceVersion": str(rv),
            "generation": 3,
            "creationTimestamp": "2026-11-01T10:00:00Z",
            "labels": {
                "kubernetes.io/service-name": svc,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app": svc,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-01T10:00:00Z"},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": svc,
                    "uid": "x",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "discovery.k8s.io/v1",
                    "time": "2026-11-01T10:00:00Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:addressType": {},
                        "f:endpoints": {},
                        "f:metadata": {"f:labels": {".": {}}},
                        "f:ports": {},
                    },
                }
            ],
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [
                    f"{(base + j) >> 24}.{((base + j) >> 16) & 255}.{((base + j) >> 8) & 255}.{(base + j) & 255}"
                ],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node-{(i + j) % 100}",
                "zone": f"zone-{j % 3}",
                "targetRef": {"kind": "Pod", "namespace": f"ns-{i % 50}", "name": f"{svc}-pod-{j}", "uid": "y"},
            }
            for j in range(EPS_PER_SLICE)
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def _reflector(emit: Any) -> Reflector:
    client = ApiClient(ClientSettings(server="http://127.0.0.1:1"))
    return Reflector(client, SPEC, emit)


def bench_decode() -> dict[str, Any]:
    items = [make_slice(i, 1000 + i) for i in range(SLICES)]
    body = msgspec.json.encode(
        {
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": "99999"},
            "items": items,
        }
    )
    events = [
        msgspec.json.encode({"type": "MODIFIED", "object": make_slice(i, 200_000 + i, variant=1)})
        for i in range(SLICES)
    ]
    del items
    gc.collect()
    changes: list[Change] = []
    refl = _reflector(changes.append)
    before = rss_mb()
    t0 = time.perf_counter()
    page = refl.decode_page(body)
    fresh = refl.decode_items(page)
    refl.replace(fresh)
    decode_s = time.perf_counter() - t0
    gc.collect()
    extra = rss_mb() - before
    assert len(refl.cache) == SLICES, len(refl.cache)
    gc.freeze()
    changes.clear()
    t0 = time.perf_counter()
    for line in events:
        refl.handle_event(line)
    per_event = (time.perf_counter() - t0) / len(events)
    assert len(changes) == SLICES
    return {
        "list_bytes_mb": round(len(body) / 2**20, 1),
        "slices": SLICES,
        "endpoints": SLICES * EPS_PER_SLICE,
        "decode_list_s": round(decode_s, 3),
        "decode_list_extra_rss_mb": round(extra, 1),
        "watch_event_us": round(per_event * 1e6, 1),
    }


def bench_end_to_end() -> dict[str, Any]:
    from kubeproxy.lab.apiserver import FakeApiServer

    with FakeApiServer() as server:
        server.apply_many(make_slice(i, 0) for i in range(SLICES))
        changes = 0

        def count(_: Change) -> None:
            nonlocal changes
            changes += 1

        async def scenario() -> dict[str, Any]:
            nonlocal changes
            stop = asyncio.Event()
            listed = asyncio.Event()
            async with ApiClient(ClientSettings(server=server.url)) as client:
                refl = Reflector(client, SPEC, count, on_listed=lambda _r: listed.set(), tuning=Tuning())
                t0 = time.perf_counter()
                task = asyncio.create_task(refl.run(stop))
                await listed.wait()
                list_s = time.perf_counter() - t0
                await asyncio.to_thread(server.wait_for_watches, 1, "endpointslices")
                changes = 0
                t0 = time.perf_counter()
                await asyncio.to_thread(server.apply_many, [make_slice(i, 0, variant=2) for i in range(SLICES)])
                applied_s = time.perf_counter() - t0
                while changes < SLICES:
                    await asyncio.sleep(0.01)
                watch_s = time.perf_counter() - t0
                stop.set()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return {
                "e2e_list_s": round(list_s, 3),
                "e2e_watch_events": SLICES,
                "e2e_watch_s": round(watch_s, 3),
                "e2e_server_apply_s": round(applied_s, 3),
            }

        return asyncio.run(scenario())


def main() -> int:
    row = bench_decode()
    gc.unfreeze()
    row.update(bench_end_to_end())
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
