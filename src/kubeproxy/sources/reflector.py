"""List + watch of one resource, kept correct under churn and outages (client-go's Reflector, ours).

The loop, per resource:

1. **List** in pages (``limit`` + ``continue``), decode each item into our slim structs, and diff the
   result against the cache: new objects are ADDED, changed ones (other ``resourceVersion``) MODIFIED,
   and objects the cache holds that the list lacks are DELETED. On the first list that is just "add
   everything"; on a relist after a 410 it is how deletes that happened in the gap are not missed.
2. **Watch** from the list's ``resourceVersion`` with ``allowWatchBookmarks`` and a randomized server-side
   ``timeoutSeconds``; every event and BOOKMARK advances the resourceVersion we resume from.
3. A stream that ends (server timeout), breaks (reset) or stalls (no byte for ``idle_timeout``) is resumed
   from the last resourceVersion after a capped exponential backoff with jitter. A 410 Gone — HTTP status
   or ERROR event — means that resourceVersion is compacted away: relist at once (step 1).

Invariants: ``on_listed`` is called after every complete list (the first call gates programming); a
malformed object (one that does not decode into our structs) is logged with its namespace/name and
skipped: its last good version, if any, stays, as in the manifest source; it never stops the others;
denied access (401/403) before the first list completed raises ``AccessDenied`` (fatal at startup),
later it is logged and retried, keeping whatever was programmed.

The cache holds each object's ``resourceVersion`` only, not the object: consumers get every object in
its Change and keep what they need (the proxy state keeps its own slim form), so holding decoded
objects here too would double the memory of 100k endpoints for nothing. Changes therefore carry
``old=None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import msgspec

from kubeproxy.model import objects
from kubeproxy.model.objects import KubeObject
from kubeproxy.sources.apiclient import ApiClient, status_error
from kubeproxy.sources.errors import AccessDenied, ApiError
from kubeproxy.sources.events import Change, ChangeType, ObjectKey

log = logging.getLogger("kubeproxy.sources.reflector")


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    kind: str  # our model kind: "Service" | "EndpointSlice" | "Node"
    resource: str  # the API resource name, for RBAC messages: "services"
    path: str  # collection path: "/api/v1/services"
    label_selector: str = ""
    field_selector: str = ""


@dataclass(frozen=True, slots=True)
class Tuning:
    """Timing knobs; the defaults are client-go's (tests shrink them)."""

    page_size: int = 500
    watch_timeout_min: float = 300.0  # timeoutSeconds is drawn from [min, 2*min), like client-go's minWatchTimeout
    idle_timeout: float = 150.0  # the API server sends a bookmark about every minute to watches that ask
    backoff_initial: float = 0.8
    backoff_max: float = 30.0
    backoff_reset_after: float = 120.0  # a watch that lived this long resets the backoff


class _ListMeta(msgspec.Struct, gc=False):
    resourceVersion: str = ""
    # "continue" is a Python keyword.
    continue_: str = msgspec.field(default="", name="continue")


class _RawList(msgspec.Struct, gc=False):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[msgspec.Raw] | None = None


class _Event(msgspec.Struct, gc=False):
    type: str = ""
    object: msgspec.Raw = msgspec.Raw(b"null")


class _Meta(msgspec.Struct, gc=False):
    name: str = ""
    namespace: str = ""
    resourceVersion: str = ""


class _MetaOnly(msgspec.Struct, gc=False):
    metadata: _Meta = msgspec.field(default_factory=_Meta)


_LIST_DECODER = msgspec.json.Decoder(_RawList)
_EVENT_DECODER = msgspec.json.Decoder(_Event)
_META_DECODER = msgspec.json.Decoder(_MetaOnly)


class Reflector:
    def __init__(
        self,
        client: ApiClient,
        spec: ResourceSpec,
        emit: Callable[[Change], None],
        *,
        on_listed: Callable[[Reflector], None] | None = None,
        tuning: Tuning | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.spec = spec
        self.emit = emit
        self.on_listed = on_listed
        self.tuning = tuning or Tuning()
        self.rng = rng or random.Random()
        self.cache: dict[ObjectKey, str] = {}  # key -> resourceVersion of its last good version
        self.resource_version = ""
        self.synced = False  # the first complete list has been delivered
        self.lists = 0
        self.watches = 0
        self.events = 0
        self.malformed = 0
        self._decode = msgspec.json.Decoder(_kind_type(spec.kind))
        self._last_error = ""

    # -- the loop ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        need_list = True
        failures = 0
        last_list = float("-inf")
        while not stop.is_set():
            started = time.monotonic()
            events_before = self.events
            try:
                if need_list:
                    last_list = started
                    await self._list()
                    need_list = False
                watch_started = time.monotonic()
                await self._watch()
                # The server ended the stream. Normal after timeoutSeconds; a watch that ends at once
                # with nothing in it (a broken proxy, an overloaded server) must not become a hot loop.
                if time.monotonic() - watch_started < 1.0 and self.events == events_before:
                    failures += 1
                    log.warning("very short watch, backing off kind=%s failures=%d", self.spec.kind, failures)
                else:
                    failures = 0
                    self._recovered()
                    continue
            except ApiError as exc:
                if exc.expired:  # HTTP 410 or a watch ERROR event with code 410
                    log.info("resourceVersion expired, relisting kind=%s error=%r", self.spec.kind, str(exc))
                    need_list = True
                    if time.monotonic() - last_list >= 1.0:
                        failures = 0
                        continue
                    failures += 1  # relisting again right after a list: back off, never spin
                elif exc.denied and not self.synced:
                    raise AccessDenied(
                        exc.message, status=exc.status, reason=exc.reason, verb=exc.verb, resource=exc.resource
                    ) from exc
                else:
                    if time.monotonic() - started >= self.tuning.backoff_reset_after:
                        failures = 0
                    failures += 1
                    self._report(exc, failures)
                    # Connection-level trouble (refused, reset, stalled) and 429 resume the watch from the
                    # same resourceVersion; any other answer from the server (an ERROR event, a 5xx, "too
                    # large resource version", 403 ...) means that position is not trustworthy: relist.
                    if exc.status not in (0, 429):
                        need_list = True
            delay = self._backoff(failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _backoff(self, failures: int) -> float:
        t = self.tuning
        base: float = min(t.backoff_max, t.backoff_initial * 2.0 ** (failures - 1))
        return base * (1 + self.rng.random())  # jitter factor 1.0, as client-go's reflector

    def _report(self, exc: ApiError, failures: int) -> None:
        text = str(exc)
        if exc.denied:
            log.error(
                "access denied, retrying kind=%s verb=%s resource=%s error=%r",
                self.spec.kind,
                exc.verb,
                exc.resource,
                text,
            )
        elif text != self._last_error or failures in (1, 5) or failures % 20 == 0:
            log.warning(
                "API request failed, keeping the current rules and retrying kind=%s failures=%d error=%r",
                self.spec.kind,
                failures,
                text,
            )
        self._last_error = text

    def _recovered(self) -> None:
        if self._last_error:
            log.info("API connection recovered kind=%s", self.spec.kind)
            self._last_error = ""

    def _params(self) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.spec.label_selector:
            params["labelSelector"] = self.spec.label_selector
        if self.spec.field_selector:
            params["fieldSelector"] = self.spec.field_selector
        return params

    # -- list ----------------------------------------------------------------------------------
    async def _list(self) -> None:
        started = time.monotonic()
        fresh: dict[ObjectKey, KubeObject] = {}
        params = self._params()
        params["limit"] = str(self.tuning.page_size)
        rv = ""
        pages = 0
        malformed: set[ObjectKey] = set()
        while True:
            try:
                body = await self.client.list_page(self.spec.path, params, resource=self.spec.resource)
            except ApiError as exc:
                if not (exc.expired and "continue" in params):
                    raise
                # Paging took longer than the compaction interval: one unpaginated list instead
                # (client-go's pager FullListIfExpired), so a huge cluster still completes its list.
                log.info("continue token expired, listing without pagination kind=%s", self.spec.kind)
                params.pop("continue")
                params.pop("limit", None)
                fresh.clear()
                malformed.clear()
                continue
            pages += 1
            page = self.decode_page(body)
            fresh.update(self.decode_items(page, malformed))
            rv = page.metadata.resourceVersion or rv
            if not page.metadata.continue_:
                break
            params["continue"] = page.metadata.continue_
        self.replace(fresh, keep=malformed)
        self.resource_version = rv
        self.lists += 1
        first = not self.synced
        self.synced = True
        self._recovered()
        log.log(
            logging.INFO if first else logging.DEBUG,
            "listed kind=%s objects=%d pages=%d resourceVersion=%r elapsed=%.3fs",
            self.spec.kind,
            len(fresh),
            pages,
            rv,
            time.monotonic() - started,
        )
        if self.on_listed is not None:
            self.on_listed(self)

    def decode_page(self, body: bytes) -> _RawList:
        try:
            return _LIST_DECODER.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ApiError(
                f"undecodable list: {exc}", reason="BadList", verb="list", resource=self.spec.resource
            ) from exc

    def decode_items(self, page: _RawList, malformed: set[ObjectKey] | None = None) -> dict[ObjectKey, KubeObject]:
        """Each item on its own, so one malformed object costs only itself (its key goes to ``malformed``)."""
        out: dict[ObjectKey, KubeObject] = {}
        for raw in page.items or ():
            decoded = self._decode_object(raw)
            if decoded is not None:
                out[decoded[0]] = decoded[1]
            elif malformed is not None and (meta := self._meta(raw)) is not None:
                malformed.add(ObjectKey(self.spec.kind, meta.namespace, meta.name))
        return out

    def replace(self, fresh: dict[ObjectKey, KubeObject], keep: Collection[ObjectKey] = ()) -> None:
        """Make ``fresh`` the cache, emitting the difference (this is how a relist recovers missed deletes).

        Keys in ``keep`` (objects that exist but did not decode) keep their last good version."""
        old = self.cache
        versions = {key: obj.metadata.resourceVersion or "" for key, obj in fresh.items()}
        for key in keep:
            if key in old and key not in versions:
                versions[key] = old[key]
        for key in old:
            if key not in versions:
                self.emit(Change(ChangeType.DELETED, key, None, None))
        for key, obj in fresh.items():
            prev = old.get(key)
            if prev is None:
                self.emit(Change(ChangeType.ADDED, key, None, obj))
            elif prev != versions[key]:
                self.emit(Change(ChangeType.MODIFIED, key, None, obj))
        self.cache = versions

    # -- watch ---------------------------------------------------------------------------------
    async def _watch(self) -> None:
        params = self._params()
        timeout = int(self.tuning.watch_timeout_min * (1 + self.rng.random()))
        params.update(
            watch="true",
            resourceVersion=self.resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(max(1, timeout)),
        )
        # The stream may end by itself long before the server's timeout; no data at all for idle_timeout
        # (with bookmarks flowing about every minute) means the connection is dead.
        idle = self.tuning.idle_timeout
        self.watches += 1
        lines = self.client.watch_lines(self.spec.path, params, resource=self.spec.resource, idle_timeout=idle)
        async with contextlib.aclosing(lines):
            async for line in lines:
                self.handle_event(line)

    def handle_event(self, line: bytes) -> None:
        try:
            event = _EVENT_DECODER.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ApiError(
                f"undecodable watch event: {exc}", reason="BadEvent", verb="watch", resource=self.spec.resource
            ) from exc
        etype = event.type
        if etype == "BOOKMARK":
            meta = self._meta(event.object)
            if meta is not None and meta.resourceVersion:
                self.resource_version = meta.resourceVersion
            return
        if etype == "ERROR":
            err = status_error(bytes(event.object), status=500, verb="watch", resource=self.spec.resource)
            raise err  # a 410 makes run() relist
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("unknown watch event type, ignored kind=%s type=%r", self.spec.kind, etype)
            return
        self.events += 1
        if etype == "DELETED":
            meta = self._meta(event.object)
            if meta is None:
                return
            key = ObjectKey(self.spec.kind, meta.namespace, meta.name)
            known = self.cache.pop(key, None)
            if meta.resourceVersion:
                self.resource_version = meta.resourceVersion
            if known is not None:
                self.emit(Change(ChangeType.DELETED, key, None, None))
            return
        decoded = self._decode_object(event.object)
        if decoded is None:  # malformed: logged and skipped; the last good version (if any) stays
            meta = self._meta(event.object)
            if meta is not None and meta.resourceVersion:
                self.resource_version = meta.resourceVersion
            return
        key, obj = decoded
        self.resource_version = obj.metadata.resourceVersion or self.resource_version
        prev = self.cache.get(key)
        self.cache[key] = obj.metadata.resourceVersion or ""
        self.emit(Change(ChangeType.ADDED if prev is None else ChangeType.MODIFIED, key, None, obj))

    # -- decoding ------------------------------------------------------------------------------
    def _meta(self, raw: msgspec.Raw | bytes) -> _Meta | None:
        try:
            return _META_DECODER.decode(raw).metadata
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    def _decode_object(self, raw: msgspec.Raw) -> tuple[ObjectKey, KubeObject] | None:
        try:
            obj: KubeObject = self._decode.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.malformed += 1
            meta = self._meta(raw)
            where = f"{meta.namespace}/{meta.name}" if meta and meta.namespace else (meta.name if meta else "?")
            where = where.encode("unicode_escape").decode()  # a name from the wire must not forge log lines
            log.warning(
                "skipping malformed object, keeping its last good version kind=%s object=%s reason=%r",
                self.spec.kind,
                where,
                str(exc),
            )
            return None
        return ObjectKey(self.spec.kind, obj.metadata.namespace, obj.metadata.name), obj


def _kind_type(kind: str) -> type[KubeObject]:
    types: dict[str, type[KubeObject]] = {
        "Service": objects.Service,
        "EndpointSlice": objects.EndpointSlice,
        "Node": objects.Node,
    }
    return types[kind]
