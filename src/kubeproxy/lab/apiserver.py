"""A test double of the Kubernetes API server that speaks the real list/watch protocol on loopback.

:class:`FakeApiServer` serves Services, EndpointSlices and Nodes over HTTP or HTTPS from an aiohttp
server running on its own thread and event loop, so synchronous test code (and a daemon subprocess
pointed at :attr:`FakeApiServer.url`) can drive it. Every mutator (``apply``, ``delete``,
``expire_watches``, ``go_down``, ...) is thread-safe: it runs on the server loop and returns only after
it took effect, so "apply, then read the watch" is deterministic.

Faithful to the real kube-apiserver (as seen on the wire by a client):
- JSON shapes of lists (``ServiceList``/``EndpointSliceList``/``NodeList`` with ``metadata.resourceVersion``,
  ``metadata.continue``, ``metadata.remainingItemCount``), watch events (one JSON object per line of a
  chunked ``application/json`` response) and ``Status`` errors (401, 403 with the RBAC message, 404, 410).
- One global, monotonically increasing resourceVersion (etcd's revision) shared by all kinds; a DELETED
  event carries the object's last state with the deletion's resourceVersion.
- Pagination serves every page from the snapshot taken by the first one; after a compaction an old
  continue token gets HTTP 410 ``Expired`` with the real message.
- Watch semantics of the watch cache: resourceVersion ""/"0" replays synthetic ADDED events for the
  current state; a newer-than-compaction resourceVersion replays the retained history exactly; an older
  one gets an ``ERROR`` event carrying a 410 ``Expired`` Status and the stream ends. Label/field selector
  transitions turn a MODIFIED into DELETED (the previous object, stamped with the new resourceVersion)
  or ADDED, as ``cacheWatcher.convertToWatchEvent`` does. BOOKMARKs only with ``allowWatchBookmarks``,
  also one right before the server-side ``timeoutSeconds`` ends the stream.
- Replay and subscription happen atomically on the server loop, so no event is lost or duplicated
  between them.
- Authentication: bearer tokens (user ``system:serviceaccount:kube-system:kube-proxy``) or a TLS client
  certificate verified by the server's SSL context (user = subject CN), x509 first as in the real
  authenticator chain. ``/healthz``, ``/livez``, ``/readyz`` and ``/version`` are readable anonymously,
  like the default ``system:public-info-viewer`` binding; everything else needs credentials.

Faults to inject: ``forbid``/``allow`` (403 per verb and resource), ``set_tokens`` (401), ``compact``
(410 for older RVs and continue tokens), ``expire_watches`` (ERROR 410 mid-stream), ``reset_connections``
(abort without the final chunk), ``stall_watches`` (silence on an open connection), ``go_down``/``come_up``
(connection refused, then the same port and store), ``put_raw`` (malformed objects). ``stop`` aborts
every connection rather than waiting for watches to end. ``open_watches``/``wait_for_watches`` count
only watches that still stream (not stalled, expired or timed-out ones; see ``stalled_watches``).

Simplified on purpose (documented so nobody relies on it):
- With ``tokens=None`` any bearer token is accepted (and its user recorded as the kube-proxy service
  account); a request without credentials is then served as ``system:anonymous`` (user None).
- Only GET; only the three resources kube-proxy watches (plus single-object GET). No discovery
  documents, no protobuf, no gzip, no table output, no ``sendInitialEvents``/``resourceVersionMatch``
  (ignored), no ``/api/v1/watch/...`` legacy paths.
- A list always serves the latest state (its ``resourceVersion`` parameter is ignored). A watch from a
  resourceVersion newer than the current one is accepted and simply waits (the real server would wait
  up to 3 s and then fail with "Too large resource version").
- ``apply`` always bumps the resourceVersion, even when nothing changed (the real server would make an
  unchanged update a no-op). It ignores a caller-supplied ``metadata.uid`` and does not maintain
  ``generation``, ``creationTimestamp``, ``managedFields`` or any status.
- Field selectors accept any dotted path (the real server allows only a few per resource); a missing
  field compares as "". Label selectors support ``key``, ``!key``, ``=``, ``==``, ``!=``, ``in``, ``notin``.
- Objects stored with :meth:`FakeApiServer.put_raw` that do not parse as a JSON object are served
  byte for byte (even if that breaks the surrounding JSON) and match every selector.
- History is kept until :meth:`FakeApiServer.compact` (or, with ``max_history``, trimmed to roughly
  the last ``max_history`` events, advancing the compaction point like the watch cache's window).
- The default watch timeout is a fixed 1800 s (the real server picks one in [1800, 3600) s).

Performance: every stored object version is serialized once with msgspec; lists and watch events are
built by concatenating those cached bytes, so a 20k-EndpointSlice list costs one ``bytes.join``.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import concurrent.futures
import enum
import math
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

__all__ = ["TOKEN_USER", "FakeApiServer", "RequestRecord"]

TOKEN_USER: Final = "system:serviceaccount:kube-system:kube-proxy"
ANONYMOUS_USER: Final = "system:anonymous"
DEFAULT_WATCH_TIMEOUT: Final = 1800.0
VERSION_INFO: Final = {"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake"}

_T = TypeVar("_T")
_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder().decode
_CALL_TIMEOUT = 30.0
_WRITE_BATCH = 256 * 1024  # bytes of watch lines joined into one chunk
_MAX_SNAPSHOTS = 128  # continue-token snapshots kept; older tokens get 410 like the real server
_NONRESOURCE_OK = frozenset({"/healthz", "/livez", "/readyz"})
_EXPIRED_CONTINUE = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter."
)
_EXPIRED_WATCH = "The resourceVersion for the provided watch is too old."


# --------------------------------------------------------------------------------------------------
# Resource types and routing


@dataclass(frozen=True, slots=True)
class _ResourceType:
    resource: str  # plural, as in URLs and RBAC
    kind: str
    list_kind: str
    api_version: str
    group: str  # "" is the core group
    namespaced: bool


_SERVICES = _ResourceType("services", "Service", "ServiceList", "v1", "", namespaced=True)
_ENDPOINTSLICES = _ResourceType(
    "endpointslices", "EndpointSlice", "EndpointSliceList", "discovery.k8s.io/v1", "discovery.k8s.io", namespaced=True
)
_NODES = _ResourceType("nodes", "Node", "NodeList", "v1", "", namespaced=False)
_BY_RESOURCE: Final = {t.resource: t for t in (_SERVICES, _ENDPOINTSLICES, _NODES)}
_BY_KIND: Final = {t.kind: t for t in (_SERVICES, _ENDPOINTSLICES, _NODES)}
_API_ROOTS: Final = (("/api/v1/", ""), ("/apis/discovery.k8s.io/v1/", "discovery.k8s.io"))


@dataclass(frozen=True, slots=True)
class _Route:
    rtype: _ResourceType
    namespace: str | None  # None: the cluster-scoped path
    name: str | None  # set for a single-object GET


def _route(path: str) -> _Route | None:
    matched = [(root, group) for root, group in _API_ROOTS if path.startswith(root)]
    if not matched:
        return None
    root, group = matched[0]
    parts = path[len(root) :].split("/")
    namespace: str | None = None
    if len(parts) >= 3 and parts[0] == "namespaces":
        namespace, parts = parts[1], parts[2:]
        if not namespace:
            return None
    if len(parts) not in (1, 2) or not all(parts):
        return None
    rtype = _BY_RESOURCE.get(parts[0])
    if rtype is None or rtype.group != group:
        return None
    if namespace is not None and not rtype.namespaced:
        return None
    name = parts[1] if len(parts) == 2 else None
    if name is not None and rtype.namespaced and namespace is None:
        return None
    return _Route(rtype, namespace, name)


def _resource_type(resource: str) -> _ResourceType:
    try:
        return _BY_RESOURCE[resource]
    except KeyError:
        raise ValueError(f"unknown resource {resource!r}; expected one of {sorted(_BY_RESOURCE)}") from None


def _kind_type(kind: str) -> _ResourceType:
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(_BY_KIND)}") from None


# --------------------------------------------------------------------------------------------------
# Stored objects and events


@dataclass(frozen=True, slots=True)
class _Stored:
    """One version of one object. ``raw`` is its JSON, serialized once; ``labels`` is None when the
    bytes did not parse as a JSON object (a put_raw object): such objects match every selector."""

    rtype: _ResourceType
    namespace: str  # "" for cluster-scoped kinds
    name: str
    rv: int
    raw: bytes
    labels: Mapping[str, str] | None
    uid: str | None
    # Field-selector values looked up so far (decoding the JSON once per path, not once per request).
    _fields: dict[tuple[str, ...], str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def field_value(self, path: tuple[str, ...]) -> str:
        if path == ("metadata", "name"):
            return self.name
        if path == ("metadata", "namespace"):
            return self.namespace
        value = self._fields.get(path)
        if value is None:
            value = self._fields[path] = _field_value(_DECODE(self.raw), path)
        return value


def _labels_of(metadata: Any) -> dict[str, str]:
    labels = metadata.get("labels") if isinstance(metadata, dict) else None
    if not isinstance(labels, dict):
        return {}
    return {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}


def _with_rv(raw: bytes, rv: int) -> bytes:
    """The same object stamped with another resourceVersion (for DELETED events)."""
    try:
        doc = _DECODE(raw)
    except msgspec.DecodeError:
        return raw
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata", {}), dict):
        return raw
    doc.setdefault("metadata", {})["resourceVersion"] = str(rv)
    return _ENCODE(doc)


class _EventType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


def _event_line(event_type: str, raw: bytes) -> bytes:
    return b'{"type":"' + event_type.encode() + b'","object":' + raw + b"}\n"


def _status(code: int, reason: str, message: str, details: dict[str, str] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        status["details"] = details
    status["code"] = code
    return status


def _error_line(message: str) -> bytes:
    return _ENCODE({"type": "ERROR", "object": _status(410, "Expired", message)}) + b"\n"


def _bookmark_line(rtype: _ResourceType, rv: int) -> bytes:
    obj = {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": {"resourceVersion": str(rv)}}
    return _ENCODE({"type": "BOOKMARK", "object": obj}) + b"\n"


@dataclass(slots=True, eq=False)
class _Event:
    rv: int
    type: _EventType
    obj: _Stored  # the new state; for DELETED the last state stamped with ``rv``
    old: _Stored | None  # the previous state of a MODIFIED object
    _lines: dict[_EventType, bytes] = field(default_factory=dict)

    def line_for(self, flt: _Filter) -> bytes | None:
        """The line a watcher with this filter gets, or None (selector transitions as the watch cache)."""
        if self.type is not _EventType.MODIFIED:
            return self._line(self.type) if flt.matches(self.obj) else None
        now = flt.matches(self.obj)
        before = self.old is not None and flt.matches(self.old)
        if now and before:
            return self._line(_EventType.MODIFIED)
        if now:
            return self._line(_EventType.ADDED)
        if before:
            return self._line(_EventType.DELETED)
        return None

    def forget_lines(self) -> None:
        self._lines.clear()

    def _line(self, event_type: _EventType) -> bytes:
        line = self._lines.get(event_type)
        if line is None:
            if event_type is _EventType.DELETED and self.type is _EventType.MODIFIED and self.old is not None:
                # The watch cache sends the object as it was (it matched then), with the event's RV.
                raw = _with_rv(self.old.raw, self.rv)
            else:
                raw = self.obj.raw
            line = self._lines[event_type] = _event_line(event_type, raw)
        return line


# --------------------------------------------------------------------------------------------------
# Selectors


class _SelectorError(ValueError):
    pass


class _Op(enum.Enum):
    EXISTS = enum.auto()
    NOT_EXISTS = enum.auto()
    IN = enum.auto()
    NOT_IN = enum.auto()


_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?")
_SET_REQUIREMENT = re.compile(r"(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)")


@dataclass(frozen=True, slots=True)
class _LabelRequirement:
    key: str
    op: _Op
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        match self.op:
            case _Op.EXISTS:
                return self.key in labels
            case _Op.NOT_EXISTS:
                return self.key not in labels
            case _Op.IN:
                return labels.get(self.key) in self.values
            case _Op.NOT_IN:
                # A missing label satisfies != and notin (labels.Selector semantics).
                return labels.get(self.key) not in self.values


@dataclass(frozen=True, slots=True)
class _FieldRequirement:
    path: tuple[str, ...]
    value: str
    equal: bool


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b`` is two requirements)."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _check_key(key: str) -> str:
    if not _LABEL_KEY.fullmatch(key):
        raise _SelectorError(f"invalid label key {key!r}")
    return key


def _check_value(value: str) -> str:
    if not _LABEL_VALUE.fullmatch(value):
        raise _SelectorError(f"invalid label value {value!r}")
    return value


def _parse_label_requirement(text: str) -> _LabelRequirement:
    if m := _SET_REQUIREMENT.fullmatch(text):
        values = frozenset(_check_value(v.strip()) for v in m["values"].split(","))
        return _LabelRequirement(_check_key(m["key"]), _Op.IN if m["op"] == "in" else _Op.NOT_IN, values)
    if text.startswith("!"):
        return _LabelRequirement(_check_key(text[1:].strip()), _Op.NOT_EXISTS)
    for token, op in (("!=", _Op.NOT_IN), ("==", _Op.IN), ("=", _Op.IN)):
        if token in text:
            key, _, value = text.partition(token)
            return _LabelRequirement(_check_key(key.strip()), op, frozenset({_check_value(value.strip())}))
    return _LabelRequirement(_check_key(text), _Op.EXISTS)


def _parse_field_requirement(text: str) -> _FieldRequirement:
    for token, equal in (("!=", False), ("==", True), ("=", True)):
        if token in text:
            path, _, value = text.partition(token)
            path = path.strip()
            if not path or "" in path.split("."):
                raise _SelectorError(f"invalid field selector {text!r}")
            return _FieldRequirement(tuple(path.split(".")), value.strip(), equal)
    raise _SelectorError(f"invalid field selector: {text!r}: no operator")


def _field_value(doc: Any, path: tuple[str, ...]) -> str:
    for part in path:
        if not isinstance(doc, dict):
            return ""
        doc = doc.get(part)
    if doc is None or isinstance(doc, dict | list):
        return ""
    if isinstance(doc, bool):
        return "true" if doc else "false"
    return str(doc)


@dataclass(frozen=True, slots=True)
class _Filter:
    namespace: str | None = None
    labels: tuple[_LabelRequirement, ...] = ()
    fields: tuple[_FieldRequirement, ...] = ()

    @classmethod
    def parse(cls, namespace: str | None, label_selector: str, field_selector: str) -> _Filter:
        labels = tuple(_parse_label_requirement(r) for r in _split_top_level(label_selector))
        fields = tuple(_parse_field_requirement(r) for r in _split_top_level(field_selector))
        return cls(namespace, labels, fields)

    @property
    def has_selectors(self) -> bool:
        return bool(self.labels or self.fields)

    def matches(self, obj: _Stored) -> bool:
        if self.namespace is not None and obj.namespace != self.namespace:
            return False
        if obj.labels is None:
            return True
        if not all(r.matches(obj.labels) for r in self.labels):
            return False
        return all((obj.field_value(req.path) == req.value) == req.equal for req in self.fields)


# --------------------------------------------------------------------------------------------------
# Watches, snapshots, request records


class _WatchState(enum.Enum):
    ACTIVE = enum.auto()
    STALLED = enum.auto()  # sends nothing ever again, keeps the connection open
    ENDING = enum.auto()  # flushes what is queued (an ERROR), then ends cleanly
    ABORTED = enum.auto()  # transport aborted; the handler just leaves


@dataclass(slots=True, eq=False)
class _Watch:
    rtype: _ResourceType
    flt: _Filter
    bookmarks: bool
    transport: asyncio.Transport | None
    wakeup: asyncio.Event
    pending: collections.deque[bytes] = field(default_factory=collections.deque)
    state: _WatchState = _WatchState.ACTIVE
    replay_left: int = 0
    replayed: bool = False

    def push(self, line: bytes) -> None:
        self.pending.append(line)
        self.wakeup.set()

    def take_batch(self) -> tuple[bytes, int]:
        lines: list[bytes] = []
        size = 0
        while self.pending and size < _WRITE_BATCH:
            line = self.pending.popleft()
            lines.append(line)
            size += len(line)
        return b"".join(lines), len(lines)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    id: int
    rtype: _ResourceType
    rv: int
    objects: list[_Stored]


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered (``status`` is the HTTP status; a watch that got an ERROR event
    is still a 200). ``verb`` is "list", "watch" or "get"; ``resource`` is "" for non-resource paths."""

    method: str
    path: str
    query: dict[str, str]
    verb: str
    resource: str
    user: str | None
    status: int


def _parse_bool(value: str | None) -> bool:
    # strconv.ParseBool's true spellings, which the real server accepts for watch/allowWatchBookmarks.
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    parts = header.split(" ")
    if len(parts) < 2 or parts[0].lower() != "bearer" or not parts[1]:
        return None
    return parts[1]


def _client_cert_user(request: web.BaseRequest) -> str | None:
    transport = request.transport
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _json_response(status: int, body: bytes) -> web.Response:
    return web.Response(
        status=status, body=body, content_type="application/json", headers={"Cache-Control": "no-cache, private"}
    )


def _continue_token(snapshot: _Snapshot, offset: int) -> str:
    nxt = snapshot.objects[offset]
    payload = {
        "v": "meta.k8s.io/v1",
        "rv": snapshot.rv,
        "start": f"{nxt.namespace}/{nxt.name}\x00",
        "snapshot": snapshot.id,
        "offset": offset,
    }
    return base64.urlsafe_b64encode(_ENCODE(payload)).decode().rstrip("=")


def _parse_continue(token: str) -> tuple[int, int]:
    try:
        payload = _DECODE(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, msgspec.DecodeError) as exc:
        raise ValueError(f"continue key is not valid: {exc}") from exc
    if not isinstance(payload, dict):
        raise ValueError("continue key is not valid: not an object")
    snapshot, offset = payload.get("snapshot"), payload.get("offset")
    if not isinstance(snapshot, int) or not isinstance(offset, int) or offset < 0:
        raise ValueError("continue key is not valid: missing snapshot or offset")
    return snapshot, offset


# --------------------------------------------------------------------------------------------------
# The server


class FakeApiServer:
    """A Kubernetes API server test double; see the module docstring for what is faithful.

    Additions to the brief's interface:
    - ``max_history``: retain roughly the last N events only, advancing the compaction point as older ones
      are dropped; None keeps everything until ``compact``.
    - ``socket_factory(port)``: returns the bound TCP socket to serve on (port 0 at the first start, the
      fixed port at later starts and ``come_up``), e.g. one created inside a lab network namespace; the
      server owns and closes it. ``host`` then only names the address in :attr:`url`.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        tokens: Iterable[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_history: int | None = None,
        socket_factory: Callable[[int], socket.socket] | None = None,
    ) -> None:
        self._ssl = ssl_context
        self._tokens: frozenset[str] | None = None if tokens is None else frozenset(tokens)
        self._host = host
        self._port = port
        self._max_history = max_history
        self._socket_factory = socket_factory

        # The store; owned by the server loop while it runs (mutated only there), by the caller otherwise.
        self._rv = 1
        self._compact_rv = 0
        self._objects: dict[str, dict[tuple[str, str], _Stored]] = {r: {} for r in _BY_RESOURCE}
        self._sorted_keys: dict[str, list[tuple[str, str]] | None] = dict.fromkeys(_BY_RESOURCE)
        self._history: list[_Event] = []
        self._snapshots: collections.OrderedDict[int, _Snapshot] = collections.OrderedDict()
        self._next_snapshot = 1
        self._forbidden: set[tuple[str, str]] = set()

        # Shared with caller threads: mutated on the loop under _lock, read anywhere under _lock.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._watches: set[_Watch] = set()
        self._requests: list[RequestRecord] = []

        # Lifecycle.
        self._lifecycle = threading.RLock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._down = False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start serving on a thread of its own; returns once the port listens. No-op when running."""
        with self._lifecycle:
            if self._thread is not None:
                return
            loop = asyncio.new_event_loop()
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            thread = threading.Thread(target=self._thread_main, args=(loop, ready), name="fake-apiserver", daemon=True)
            thread.start()
            try:
                ready.result(timeout=_CALL_TIMEOUT)
            except BaseException:
                thread.join(timeout=_CALL_TIMEOUT)
                raise
            self._loop, self._thread = loop, thread

    def stop(self) -> None:
        """Abort every connection, stop listening and join the thread. Idempotent; the store survives,
        and ``start`` serves it again on the same port."""
        with self._lifecycle:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            try:
                asyncio.run_coroutine_threadsafe(self._serve_stop(), loop).result(timeout=_CALL_TIMEOUT)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=_CALL_TIMEOUT)
                self._loop = self._thread = None
                self._runner = self._site = None
                with self._lock:
                    self._watches.clear()
                    self._changed.notify_all()

    def __enter__(self) -> FakeApiServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("the port is chosen at the first start()")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request answered so far, in order."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # ---------------------------------------------------------------- store mutators

    def apply(self, obj: Mapping[str, Any]) -> str:
        """Create or update ``obj`` (kind Service, EndpointSlice or Node); returns the new resourceVersion.

        Stores a deep copy with metadata.resourceVersion (the new global RV), metadata.uid (kept across
        updates, new on create) and, for namespaced kinds, metadata.namespace defaulted to "default".
        """
        return self._call(self._prepare_apply(obj))

    def _prepare_apply(self, obj: Mapping[str, Any]) -> Callable[[], str]:
        """Validate ``obj`` on the caller's thread; the returned commit runs on the server loop.

        Only the top level and metadata are copied here; the commit serializes the object, and those
        bytes are the stored deep copy. Callers block until the commit ran, so ``obj`` cannot change
        in between (and no decode of a copy is needed: that is what makes bulk loading fast).
        """
        rtype = _kind_type(str(obj.get("kind")))
        source_metadata = obj.get("metadata")
        if not isinstance(source_metadata, Mapping) or not isinstance(source_metadata.get("name"), str):
            raise ValueError("obj needs metadata.name")
        doc = dict(obj)
        metadata = doc["metadata"] = dict(source_metadata)
        if not metadata["name"]:
            raise ValueError("obj needs metadata.name")
        if rtype.namespaced:
            metadata["namespace"] = metadata.get("namespace") or "default"
        else:
            metadata.pop("namespace", None)
        doc.setdefault("apiVersion", rtype.api_version)
        key = (str(metadata.get("namespace", "")), str(metadata["name"]))
        labels = _labels_of(metadata)

        def commit() -> str:
            previous = self._objects[rtype.resource].get(key)
            uid = previous.uid if previous is not None and previous.uid else str(uuid.uuid4())
            rv = self._bump()
            metadata["uid"] = uid
            metadata["resourceVersion"] = str(rv)
            try:
                raw = _ENCODE(doc)
            except (TypeError, msgspec.EncodeError):
                self._rv -= 1  # nothing was stored: give the RV back
                raise
            return self._put(_Stored(rtype, key[0], key[1], rv, raw, labels, uid))

        return commit

    def apply_many(self, objs: Iterable[Mapping[str, Any]]) -> str:
        """``apply`` each object in order, in one step of the server loop (fast bulk loading for
        benchmarks: one thread hop instead of one per object). Returns the last new RV."""
        commits = [self._prepare_apply(obj) for obj in objs]

        def commit_all() -> str:
            for commit in commits:
                commit()
            return str(self._rv)

        return self._call(commit_all)

    def put_raw(self, kind: str, namespace: str, name: str, raw: bytes) -> str:
        """Store ``raw`` as the object ``namespace/name`` (to simulate malformed objects); returns the new RV.

        If ``raw`` parses as a JSON object (whose metadata, if present, is an object) its metadata gets the
        resourceVersion (and name/namespace if missing) and it is re-serialized; otherwise it is served
        byte for byte, without a resourceVersion, and matches every selector. No uid is added.
        """
        rtype = _kind_type(kind)
        namespace = namespace if rtype.namespaced else ""

        def commit() -> str:
            rv = self._bump()
            try:
                doc: Any = _DECODE(raw)
            except msgspec.DecodeError:
                doc = None
            metadata = doc.setdefault("metadata", {}) if isinstance(doc, dict) else None
            if isinstance(metadata, dict):
                metadata.setdefault("name", name)
                if rtype.namespaced:
                    metadata.setdefault("namespace", namespace)
                metadata["resourceVersion"] = str(rv)
                uid = metadata.get("uid")
                stored = _Stored(
                    rtype,
                    namespace,
                    name,
                    rv,
                    _ENCODE(doc),
                    _labels_of(metadata),
                    uid if isinstance(uid, str) else None,
                )
            else:
                stored = _Stored(rtype, namespace, name, rv, bytes(raw), None, None)
            return self._put(stored)

        return self._call(commit)

    def delete(self, kind: str, namespace: str, name: str) -> str:
        """Delete an object (KeyError if absent); returns the new RV. For Nodes ``namespace`` is ignored."""
        rtype = _kind_type(kind)
        key = (namespace if rtype.namespaced else "", name)

        def commit() -> str:
            objects = self._objects[rtype.resource]
            if key not in objects:
                raise KeyError(f"{kind} {key[0]}/{key[1]} not found")
            previous = objects.pop(key)
            self._sorted_keys[rtype.resource] = None
            rv = self._bump()
            gone = _Stored(rtype, key[0], key[1], rv, _with_rv(previous.raw, rv), previous.labels, previous.uid)
            self._publish(_Event(rv, _EventType.DELETED, gone, None))
            return str(rv)

        return self._call(commit)

    def get_object(self, kind: str, namespace: str, name: str) -> Any:
        """The stored object decoded from its JSON (None if absent; the raw bytes if they do not parse)."""
        rtype = _kind_type(kind)
        key = (namespace if rtype.namespaced else "", name)

        def read() -> Any:
            stored = self._objects[rtype.resource].get(key)
            if stored is None:
                return None
            try:
                return _DECODE(stored.raw)
            except msgspec.DecodeError:
                return stored.raw

        return self._call(read)

    # ---------------------------------------------------------------- access control

    def set_tokens(self, tokens: Iterable[str] | None) -> None:
        frozen = None if tokens is None else frozenset(tokens)

        def commit() -> None:
            self._tokens = frozen

        self._call(commit)

    def forbid(self, verb: str, resource: str) -> None:
        rule = self._rule(verb, resource)
        self._call(lambda: self._forbidden.add(rule))

    def allow(self, verb: str, resource: str) -> None:
        rule = self._rule(verb, resource)
        self._call(lambda: self._forbidden.discard(rule))

    @staticmethod
    def _rule(verb: str, resource: str) -> tuple[str, str]:
        if verb not in ("list", "watch", "get"):
            raise ValueError(f"unknown verb {verb!r}")
        return (verb, _resource_type(resource).resource)

    # ---------------------------------------------------------------- faults

    def compact(self) -> None:
        """Forget all history up to the current RV: older watches get 410, older continue tokens get 410."""
        self._call(self._compact)

    def expire_watches(self) -> None:
        """Every open watch gets an ERROR 410 Expired event and ends; history is compacted past the
        current RV, so re-watching from any RV seen so far gets 410 as well."""

        def commit() -> None:
            line = _error_line(_EXPIRED_WATCH)
            with self._lock:
                for watch in self._watches:
                    if watch.state is _WatchState.ACTIVE:
                        watch.push(line)
                        watch.state = _WatchState.ENDING
                self._changed.notify_all()
            # An unobservable write (as other resources' writes in a real etcd) moves the compaction
            # point past every RV a client may hold, so even the latest one is too old now.
            self._bump()
            self._compact()

        self._call(commit)

    def reset_connections(self) -> None:
        """Abort every open watch connection (no final chunk), stalled ones included."""

        def commit() -> None:
            with self._lock:
                watches = list(self._watches)
                self._watches.clear()
                for watch in watches:
                    watch.state = _WatchState.ABORTED
                    watch.wakeup.set()
                self._changed.notify_all()
            for watch in watches:
                if watch.transport is not None:
                    watch.transport.abort()

        self._call_on_loop(commit)

    def stall_watches(self) -> None:
        """Every currently open watch goes silent forever (no events, bookmarks or close); later ones work."""

        def commit() -> None:
            with self._lock:
                for watch in self._watches:
                    if watch.state is _WatchState.ACTIVE:
                        watch.state = _WatchState.STALLED
                        watch.wakeup.set()
                self._changed.notify_all()

        self._call(commit)

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current RV to every open watch that allowed bookmarks."""

        def commit() -> None:
            for watch in self._active_watches():
                if watch.bookmarks:
                    watch.push(_bookmark_line(watch.rtype, self._rv))

        self._call(commit)

    def go_down(self) -> None:
        """Stop listening and abort every connection (clients get "connection refused")."""
        self._call_async(self._go_down)

    def come_up(self) -> None:
        """Listen again on the same port; the store and its RVs are unchanged."""
        self._call_async(self._listen)

    # ---------------------------------------------------------------- watch observation

    def open_watches(self, resource: str | None = None) -> int:
        """Watches currently streaming (stalled, ending and aborted ones do not count)."""
        rtype = None if resource is None else _resource_type(resource)
        with self._lock:
            return self._count_watches(rtype, replayed=False)

    def stalled_watches(self, resource: str | None = None) -> int:
        """Stalled watches whose connection the client has not closed yet."""
        rtype = None if resource is None else _resource_type(resource)
        with self._lock:
            return sum(
                1 for w in self._watches if w.state is _WatchState.STALLED and (rtype is None or w.rtype is rtype)
            )

    def wait_for_watches(self, n: int, resource: str | None = None, timeout: float = 10.0) -> None:
        """Block until at least ``n`` watches (of ``resource``) are open and have written their replay."""
        rtype = None if resource is None else _resource_type(resource)
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._count_watches(rtype, replayed=True) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    have = self._count_watches(rtype, replayed=True)
                    raise TimeoutError(f"{have} open {resource or 'any'} watches after {timeout} s, wanted {n}")
                self._changed.wait(remaining)

    def _count_watches(self, rtype: _ResourceType | None, *, replayed: bool) -> int:
        return sum(
            1
            for w in self._watches
            if w.state is _WatchState.ACTIVE and (rtype is None or w.rtype is rtype) and (w.replayed or not replayed)
        )

    # ---------------------------------------------------------------- cross-thread calls

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the server loop and wait for it; inline when the server is not running."""
        if self._thread is not None and threading.current_thread() is self._thread:
            return fn()
        with self._lifecycle:
            loop = self._loop
            if loop is None:
                return fn()
        return self._run_threadsafe(loop, fn)

    def _call_on_loop(self, fn: Callable[[], None]) -> None:
        if self._loop is None:
            return  # nothing is connected when nothing runs
        self._call(fn)

    @staticmethod
    def _run_threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[[], _T]) -> _T:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=_CALL_TIMEOUT)

    def _call_async(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fake API server is not running")
        asyncio.run_coroutine_threadsafe(fn(), loop).result(timeout=_CALL_TIMEOUT)

    # ---------------------------------------------------------------- store internals (server loop)

    def _bump(self) -> int:
        self._rv += 1
        return self._rv

    def _put(self, stored: _Stored) -> str:
        objects = self._objects[stored.rtype.resource]
        previous = objects.get(stored.key)
        objects[stored.key] = stored
        if previous is None:
            self._sorted_keys[stored.rtype.resource] = None
        event_type = _EventType.ADDED if previous is None else _EventType.MODIFIED
        self._publish(_Event(stored.rv, event_type, stored, previous))
        return str(stored.rv)

    def _publish(self, event: _Event) -> None:
        self._history.append(event)
        if self._max_history is not None and len(self._history) >= 2 * self._max_history + 1:
            # Trim in batches (amortized O(1)); the compaction point follows the oldest dropped event.
            cut = len(self._history) - self._max_history
            self._compact_rv = self._history[cut - 1].rv
            del self._history[:cut]
        for watch in self._active_watches():
            if watch.rtype is event.obj.rtype and (line := event.line_for(watch.flt)) is not None:
                watch.push(line)
        event.forget_lines()  # history keeps the objects, not a second copy of their bytes

    def _active_watches(self) -> list[_Watch]:
        with self._lock:
            return [w for w in self._watches if w.state is _WatchState.ACTIVE]

    def _compact(self) -> None:
        self._compact_rv = self._rv
        self._history.clear()
        self._snapshots.clear()

    def _sorted_objects(self, rtype: _ResourceType) -> list[_Stored]:
        objects = self._objects[rtype.resource]
        keys = self._sorted_keys[rtype.resource]
        if keys is None:
            keys = self._sorted_keys[rtype.resource] = sorted(objects)
        return [objects[k] for k in keys]

    # ---------------------------------------------------------------- serving (server loop)

    def _thread_main(self, loop: asyncio.AbstractEventLoop, ready: concurrent.futures.Future[None]) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve_start())
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve_start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a watch whose client went away is cancelled at once (no leaked watchers).
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        await self._listen()

    async def _serve_stop(self) -> None:
        await self._go_down()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _listen(self) -> None:
        if self._site is not None or self._runner is None:
            return
        sock = self._socket_factory(self._port) if self._socket_factory is not None else self._bind()
        try:
            site = web.SockSite(self._runner, sock, ssl_context=self._ssl)
            await site.start()
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._site = site
        self._down = False

    def _bind(self) -> socket.socket:
        info = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR: come_up() rebinds the same port while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
        except BaseException:
            sock.close()
            raise
        return sock

    async def _go_down(self) -> None:
        self._down = True
        if self._site is not None:
            site, self._site = self._site, None
            await site.stop()
        with self._lock:
            for watch in self._watches:
                watch.state = _WatchState.ABORTED
                watch.wakeup.set()
            self._watches.clear()
            self._changed.notify_all()
        server = self._runner.server if self._runner is not None else None
        for handler in server.connections if server is not None else ():
            if handler.transport is not None:
                handler.transport.abort()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._down:
            # A connection that completed its TLS handshake after go_down(): it never reached us.
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)
        query: dict[str, str] = {}
        for key, value in request.query.items():
            query.setdefault(key, value)  # Go's url.Values.Get returns the first value
        route = _route(request.path)
        if route is None:
            verb, resource = "get", ""
        elif route.name is not None:
            verb, resource = "get", route.rtype.resource
        else:
            verb, resource = ("watch" if _parse_bool(query.get("watch")) else "list"), route.rtype.resource

        def record(status: int) -> None:
            entry = RequestRecord(request.method, request.path, query, verb, resource, user, status)
            with self._lock:
                self._requests.append(entry)

        def reply(status: int, body: bytes, content_type: str = "application/json") -> web.Response:
            record(status)
            if content_type == "application/json":
                return _json_response(status, body)
            return web.Response(status=status, body=body, content_type=content_type)

        def fail(code: int, reason: str, message: str, details: dict[str, str] | None = None) -> web.Response:
            return reply(code, _ENCODE(_status(code, reason, message, details)))

        # Authentication: x509 first, then bearer tokens, as the real union authenticator.
        user = _client_cert_user(request)
        rejected = False
        if user is None and (token := _bearer_token(request.headers.get("Authorization"))) is not None:
            if self._tokens is None or token in self._tokens:
                user = TOKEN_USER
            else:
                rejected = True
        public = request.path in _NONRESOURCE_OK or request.path == "/version"
        if rejected or (user is None and self._tokens is not None and not public):
            return fail(401, "Unauthorized", "Unauthorized")

        if request.method != "GET":
            return fail(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if route is None:
            if request.path in _NONRESOURCE_OK:
                return reply(200, b"ok", "text/plain")
            if request.path == "/version":
                return reply(200, _ENCODE(VERSION_INFO))
            return fail(404, "NotFound", "the server could not find the requested resource", {})

        rtype = route.rtype
        if (verb, rtype.resource) in self._forbidden:
            target = f'{rtype.resource} "{route.name}"' if route.name else rtype.resource
            scope = f'in the namespace "{route.namespace}"' if route.namespace is not None else "at the cluster scope"
            message = (
                f'{target} is forbidden: User "{user or ANONYMOUS_USER}" cannot {verb} resource "{rtype.resource}" '
                f'in API group "{rtype.group}" {scope}'
            )
            details = {"name": route.name, "kind": rtype.resource} if route.name else {"kind": rtype.resource}
            return fail(403, "Forbidden", message, details)

        if route.name is not None:
            stored = self._objects[rtype.resource].get((route.namespace or "", route.name))
            if stored is None:
                details = {"name": route.name, "kind": rtype.resource}
                return fail(404, "NotFound", f'{rtype.resource} "{route.name}" not found', details)
            return reply(200, stored.raw)

        try:
            flt = _Filter.parse(route.namespace, query.get("labelSelector", ""), query.get("fieldSelector", ""))
        except _SelectorError as exc:
            return fail(400, "BadRequest", str(exc))

        if verb == "list":
            return self._serve_list(rtype, flt, query, reply, fail)

        try:
            timeout = float(query.get("timeoutSeconds") or 0)
            if not math.isfinite(timeout):
                raise ValueError(f"timeoutSeconds={timeout}")
            if timeout <= 0:
                timeout = DEFAULT_WATCH_TIMEOUT  # as the real server: 0 means "the server's default"
            since = query.get("resourceVersion", "")
            since_rv = int(since) if since not in ("", "0") else None
            if since_rv is not None and since_rv < 0:
                raise ValueError(since)
        except ValueError as exc:
            return fail(400, "BadRequest", f"invalid watch parameter: {exc}")
        record(200)
        bookmarks = _parse_bool(query.get("allowWatchBookmarks"))
        return await self._serve_watch(
            request=request, rtype=rtype, flt=flt, since_rv=since_rv, timeout=timeout, bookmarks=bookmarks
        )

    def _serve_list(
        self,
        rtype: _ResourceType,
        flt: _Filter,
        query: dict[str, str],
        reply: Callable[[int, bytes], web.Response],
        fail: Callable[[int, str, str], web.Response],
    ) -> web.Response:
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            return fail(400, "BadRequest", f"invalid limit {query.get('limit')!r}")
        token = query.get("continue")
        snapshot: _Snapshot | None = None
        if token:
            try:
                snapshot_id, start = _parse_continue(token)
            except ValueError as exc:
                return fail(400, "BadRequest", str(exc))
            snapshot = self._snapshots.get(snapshot_id)
            if snapshot is None:
                return fail(410, "Expired", _EXPIRED_CONTINUE)
            if snapshot.rtype is not rtype:
                return fail(400, "BadRequest", "continue key is not valid: it belongs to another resource")
            self._snapshots.move_to_end(snapshot_id)
            objects, rv = snapshot.objects, snapshot.rv
        else:
            objects, rv, start = self._sorted_objects(rtype), self._rv, 0

        items: list[bytes] = []
        index = start
        while index < len(objects) and (limit <= 0 or len(items) < limit):
            if flt.matches(objects[index]):
                items.append(objects[index].raw)
            index += 1
        metadata: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit > 0:
            # Point the token at the next matching object, so the last page never carries one.
            while index < len(objects) and not flt.matches(objects[index]):
                index += 1
            if index < len(objects):
                if snapshot is None:
                    snapshot = _Snapshot(self._next_snapshot, rtype, rv, objects)
                    self._next_snapshot += 1
                    self._snapshots[snapshot.id] = snapshot
                    while len(self._snapshots) > _MAX_SNAPSHOTS:
                        self._snapshots.popitem(last=False)
                metadata["continue"] = _continue_token(snapshot, index)
                if not flt.has_selectors:
                    metadata["remainingItemCount"] = sum(1 for o in objects[index:] if flt.matches(o))
        head = (
            b'{"kind":"'
            + rtype.list_kind.encode()
            + b'","apiVersion":"'
            + rtype.api_version.encode()
            + b'","metadata":'
            + _ENCODE(metadata)
            + b',"items":['
        )
        return reply(200, b"".join((head, b",".join(items), b"]}")))

    async def _serve_watch(
        self,
        *,
        request: web.Request,
        rtype: _ResourceType,
        flt: _Filter,
        since_rv: int | None,
        timeout: float,
        bookmarks: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"}
        )
        response.enable_chunked_encoding()
        if since_rv is not None and since_rv < self._compact_rv:
            await response.prepare(request)
            await response.write(_error_line(f"too old resource version: {since_rv} ({self._compact_rv})"))
            return response

        # Replay and subscribe in one step of the loop: no await between them, so nothing is lost.
        if since_rv is None:
            replay = [_event_line(_EventType.ADDED, o.raw) for o in self._sorted_objects(rtype) if flt.matches(o)]
        else:
            start = bisect.bisect_right(self._history, since_rv, key=lambda e: e.rv)
            replay = []
            for event in self._history[start:]:
                if event.obj.rtype is rtype and (line := event.line_for(flt)) is not None:
                    replay.append(line)
        watch = _Watch(rtype, flt, bookmarks, request.transport, asyncio.Event(), collections.deque(replay))
        watch.replay_left = len(replay)
        with self._lock:
            self._watches.add(watch)
            self._changed.notify_all()
        try:
            await response.prepare(request)
            await self._pump(watch, response, timeout)
        finally:
            with self._lock:
                self._watches.discard(watch)
                self._changed.notify_all()
        return response

    async def _pump(self, watch: _Watch, response: web.StreamResponse, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if watch.replay_left == 0:
            self._mark_replayed(watch)
        while True:
            watch.wakeup.clear()
            if watch.state is _WatchState.ABORTED:
                return
            if watch.state is _WatchState.STALLED:
                await loop.create_future()  # forever: until the client leaves or the server stops
            if loop.time() >= deadline and watch.state is _WatchState.ACTIVE:
                # End at timeoutSeconds: flush what is queued, then a bookmark at an RV that covers it.
                if watch.bookmarks:
                    watch.pending.append(_bookmark_line(watch.rtype, self._rv))
                watch.state = _WatchState.ENDING
            if watch.pending:
                batch, count = watch.take_batch()
                await response.write(batch)
                if watch.replay_left:
                    watch.replay_left = max(0, watch.replay_left - count)
                    if watch.replay_left == 0:
                        self._mark_replayed(watch)
                continue
            if watch.state is _WatchState.ENDING:
                return
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await watch.wakeup.wait()
            except TimeoutError:
                pass

    def _mark_replayed(self, watch: _Watch) -> None:
        with self._lock:
            watch.replayed = True
            self._changed.notify_all()
