"""The manifest-directory source: plain Kubernetes manifests on disk as the source of truth.

``kube-proxy --manifests DIR`` reads every ``*.yaml``, ``*.yml`` and ``*.json`` file under ``DIR``
(recursively, in sorted path order; hidden files and directories and editor temp files are skipped),
decodes the Services, EndpointSlices and Nodes they hold, and re-reads the directory periodically,
emitting one :class:`~kubeproxy.sources.events.Change` per object added, modified or deleted. It is the
embedded default: it needs no cluster, and it is what ``make demo`` runs.

Files are read the way ``kubectl get -o yaml`` writes them and ``kubectl apply -f`` reads them:
several YAML documents per file (``---``), ``kind: List`` and typed lists (``ServiceList``, ...) whose
items may omit ``kind``/``apiVersion``, namespaced objects without a namespace land in ``default``.
Hidden entries are skipped, which also makes a mounted ConfigMap work: its visible files are
symlinks into a hidden ``..data`` directory that the kubelet swaps atomically.

Invariants:

* Errors never escape :meth:`ManifestDirectory.scan` and never stop other files or objects. Each is
  one warning line naming the file (and the object, when it has one) and the reason.
* A file that cannot be read or parsed keeps contributing the objects of its last good parse: a
  half-written file, or a typo while editing, must not tear down traffic. Likewise an object that
  fails to decode keeps its last good version. A directory that disappears or cannot be listed keeps
  the objects of the files below it. Only a file that is really gone (or an object really removed
  from a file that parses) deletes objects.
* A file is re-parsed only when its ``(mtime_ns, size, inode)`` changes, so an idle directory costs a
  walk and a ``stat`` per file, and an unchanged broken file is not re-reported on every scan.
* The same object defined twice: the first definition in sorted path order wins (a warning names
  both places).
* Everything written to the log that came from a file (names, paths, reasons) is escaped, so a name
  holding a newline or quotes cannot forge log lines.

This module stands in for the API server, so it also enforces the API server's name rules (a
Service name is a DNS-1035 label, other names DNS-1123 subdomains, namespaces DNS-1123 labels):
downstream code may rely on a key never holding a quote, space or newline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubeproxy.model.objects import DecodeError, KubeObject, from_builtins, kind_supported
from kubeproxy.sources.events import Change, ChangeType, ObjectKey

try:
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]

__all__ = ["ManifestDirectory", "ManifestError", "diff"]

_LOG = logging.getLogger(__name__)

# kubectl's own list (k8s.io/cli-runtime FileExtensions); matched case-sensitively, as kubectl does.
_SUFFIXES = (".yaml", ".yml", ".json")
# Editor/temp files that may carry a manifest suffix mid-save (vim, emacs, generic backups).
_TEMP_SUFFIXES = ("~", ".swp", ".swo", ".swx", ".tmp", ".bak")

_NAMESPACED = {"Service": True, "EndpointSlice": True, "Node": False}
# The API group each kind must come from: a `kind: Service` of `serving.knative.dev/v1` is not ours.
_GROUPS = {"Service": "", "EndpointSlice": "discovery.k8s.io", "Node": ""}

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")

# A log value made only of these characters is written bare; anything else is JSON-quoted.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./:@+,%-]+\Z")
_JSON_WS = re.compile(r"\s*")


class ManifestError(Exception):
    """The manifest directory is unusable at startup (missing, not a directory, unreadable)."""


class _Loader(_BaseLoader):
    """Safe loader that leaves unquoted timestamps as strings.

    kubectl (sigs.k8s.io/yaml) turns YAML into JSON, where a timestamp is a string; PyYAML would
    build a ``datetime`` that no ``str`` field of our structs accepts.
    """


# A copy without the timestamp resolver: PyYAML's own mutator (add_implicit_resolver) can only add.
_Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}


# --------------------------------------------------------------------------------------------------
# Structured, injection-safe log lines


def _fmt_value(value: object) -> str:
    text = str(value)
    if _PLAIN_VALUE.match(text):
        return text
    # json.dumps escapes quotes, backslashes, control characters and (ensure_ascii) every non-ASCII
    # code point, including U+2028 and lone surrogates from undecodable file names.
    return json.dumps(text)


class _Event:
    """``message key=value ...``, formatted only if the record is emitted (debug lines are hot)."""

    __slots__ = ("fields", "message")

    def __init__(self, message: str, **fields: object) -> None:
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        parts = [self.message]
        parts.extend(f"{k}={_fmt_value(v)}" for k, v in self.fields.items() if v is not None)
        return " ".join(parts)


def _object_label(namespace: str, name: object) -> str:
    return f"{namespace}/{name}" if namespace else str(name)


# --------------------------------------------------------------------------------------------------
# Per-file parse results


_Stamp = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)


@dataclass(slots=True)
class _FileEntry:
    stamp: _Stamp | None
    # The objects this file contributes: its last good parse, with per-object fallbacks applied.
    objects: dict[ObjectKey, KubeObject] = field(default_factory=dict)
    # The last stat/read/parse error reported for this file, so it is not repeated every scan.
    error: str | None = None


class _ParseFailed(Exception):
    """A whole file could not be read or parsed; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _yaml_reason(exc: yaml.YAMLError) -> str:
    # str(MarkedYAMLError) spans several lines and quotes a snippet; build one line instead.
    if isinstance(exc, yaml.MarkedYAMLError) and (exc.problem or exc.context):
        parts: list[str] = []
        for text, mark in ((exc.problem, exc.problem_mark), (exc.context, exc.context_mark)):
            if not text:
                continue
            if mark is not None:
                text = f"{text} at line {mark.line + 1}, column {mark.column + 1}"
            parts.append(text)
        return "; ".join(parts)
    return " ".join(str(exc).split())


def _load_documents(path: Path, raw: bytes) -> list[Any]:
    """Every document of one file, or :class:`_ParseFailed`; never a partial list.

    The whole file is parsed before any object is used: a file truncated mid-write would otherwise
    yield its first documents and silently drop the rest.
    """
    if path.suffix == ".json":
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _ParseFailed(f"not UTF-8: {exc}") from exc
        # A stream of concatenated JSON values is accepted too (`kubectl get -o json` per object).
        decoder = json.JSONDecoder()
        docs: list[Any] = []
        pos = 0
        while True:
            match = _JSON_WS.match(text, pos)
            pos = match.end() if match else pos
            if pos >= len(text):
                return docs
            try:
                doc, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise _ParseFailed(f"{exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
            docs.append(doc)
    try:
        return list(yaml.load_all(raw, Loader=_Loader))
    except yaml.YAMLError as exc:
        raise _ParseFailed(_yaml_reason(exc)) from exc
    except RecursionError as exc:
        raise _ParseFailed("nesting too deep") from exc


@dataclass(frozen=True, slots=True)
class _Candidate:
    """One would-be object: a top-level document or one item of a list."""

    data: Any
    at: str  # where in the file, for log lines: "document 2" or "document 1 items[3]"
    default_kind: str | None = None
    default_api_version: str | None = None


def _candidates(docs: list[Any], *, file: str, logger: logging.Logger) -> Iterator[_Candidate]:
    for index, doc in enumerate(docs, start=1):
        at = f"document {index}"
        if doc is None or doc == {}:
            continue  # empty documents (a trailing `---`, comments only) are normal
        if isinstance(doc, dict):
            kind = doc.get("kind")
            if isinstance(kind, str) and kind.endswith("List") and "items" in doc:
                items = doc["items"]
                if items is None:
                    continue
                if not isinstance(items, list):
                    logger.warning(
                        "%s", _Event("skipping list", file=file, kind=kind, at=at, reason="items is not a list")
                    )
                    continue
                # Typed lists (ServiceList) name their items' kind and group; `kind: List` does not.
                item_kind = kind[: -len("List")] or None
                api_version = doc.get("apiVersion") if item_kind else None
                for item_index, item in enumerate(items):
                    yield _Candidate(
                        item,
                        f"{at} items[{item_index}]",
                        default_kind=item_kind,
                        default_api_version=api_version if isinstance(api_version, str) else None,
                    )
                continue
        yield _Candidate(doc, at)


def _name_error(kind: str, name: str) -> str | None:
    # The API server's rules (k8s.io/apimachinery validation): Service names are DNS-1035 labels
    # (they become DNS names), EndpointSlice and Node names DNS-1123 subdomains.
    if kind == "Service":
        if len(name) > 63 or not _DNS1035_LABEL.match(name):
            return "metadata.name must be a DNS-1035 label (lowercase letters, digits, '-'; at most 63)"
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        return "metadata.name must be a DNS-1123 subdomain (lowercase letters, digits, '-', '.'; at most 253)"
    return None


def _decode_file(
    docs: list[Any],
    *,
    file: str,
    previous: Mapping[ObjectKey, KubeObject],
    logger: logging.Logger,
) -> dict[ObjectKey, KubeObject]:
    """The objects of one parsed file; bad objects are logged and fall back to ``previous``."""
    objects: dict[ObjectKey, KubeObject] = {}

    def skip(cand: _Candidate, reason: str, *, kind: object = None, obj: str | None = None) -> None:
        logger.warning("%s", _Event("skipping object", file=file, kind=kind, object=obj, at=cand.at, reason=reason))

    for cand in _candidates(docs, file=file, logger=logger):
        raw = cand.data
        if not isinstance(raw, dict):
            skip(cand, f"document is a {type(raw).__name__}, not a mapping")
            continue
        kind = raw.get("kind", cand.default_kind)
        if not isinstance(kind, str) or not kind:
            skip(cand, "kind is missing or not a string", kind=kind)
            continue
        if not kind_supported(kind):
            logger.debug("%s", _Event("ignoring unsupported kind", file=file, kind=kind, at=cand.at))
            continue
        api_version = raw.get("apiVersion", cand.default_api_version)
        if isinstance(api_version, str) and api_version:
            group = api_version.rpartition("/")[0]
            if group != _GROUPS[kind]:
                logger.debug(
                    "%s",
                    _Event(
                        "ignoring kind of another API group", file=file, kind=kind, at=cand.at, apiVersion=api_version
                    ),
                )
                continue
        meta = raw.get("metadata")
        if not isinstance(meta, dict):
            skip(cand, "metadata is missing or not a mapping", kind=kind)
            continue
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            skip(cand, "metadata.name is missing or not a string", kind=kind, obj=None if name is None else repr(name))
            continue
        if _NAMESPACED[kind]:
            namespace = meta.get("namespace") or "default"  # as `kubectl apply` does
            if not isinstance(namespace, str):
                skip(cand, "metadata.namespace is not a string", kind=kind, obj=_object_label("?", name))
                continue
            if len(namespace) > 63 or not _DNS1123_LABEL.match(namespace):
                skip(cand, "metadata.namespace must be a DNS-1123 label", kind=kind, obj=_object_label(namespace, name))
                continue
        else:
            namespace = ""  # cluster-scoped: the API server ignores a namespace here
        label = _object_label(namespace, name)
        name_error = _name_error(kind, name)
        if name_error is not None:
            skip(cand, name_error, kind=kind, obj=label)
            continue
        key = ObjectKey(kind, namespace, name)
        if key in objects:
            skip(cand, "defined again in the same file; the first definition wins", kind=kind, obj=label)
            continue
        # Shallow copies: list items may lack kind, the namespace is defaulted; the parsed document
        # itself is left alone.
        data = dict(raw)
        data["kind"] = kind
        data["metadata"] = {**meta, "namespace": namespace}
        try:
            objects[key] = from_builtins(kind, data)
        except DecodeError as exc:
            kept = previous.get(key)
            reason = str(exc) + ("; keeping the last good version" if kept is not None else "")
            skip(cand, reason, kind=kind, obj=label)
            if kept is not None:
                objects[key] = kept
    return objects


# --------------------------------------------------------------------------------------------------
# The directory


class ManifestDirectory:
    """A directory of manifests, scanned on demand (:meth:`scan`) or watched (:meth:`run`).

    Not thread-safe: one scan at a time (``run`` guarantees that for itself).
    """

    def __init__(self, root: Path, *, logger: logging.Logger | None = None) -> None:
        self._root = Path(root)
        self._log = logger if logger is not None else _LOG
        self._files: dict[Path, _FileEntry] = {}
        self._dir_errors: dict[Path, str] = {}
        self._duplicates: set[tuple[ObjectKey, Path, Path]] = set()

    @property
    def root(self) -> Path:
        return self._root

    # -- public ------------------------------------------------------------------------------------

    def scan(self) -> dict[ObjectKey, KubeObject]:
        """Read the directory (re-parsing changed files only) and return every object it defines.

        Never raises: every problem is logged once and the affected objects keep their last good
        version. Returns a fresh dict each call.
        """
        files, dir_errors = self._walk()
        self._report_dir_errors(dir_errors)
        entries: dict[Path, _FileEntry] = {}
        for path in files:
            entry = self._scan_file(path)
            if entry is not None:
                entries[path] = entry
        # Files no longer listed are gone, unless the listing of a directory above them failed: then
        # we cannot tell, and keeping them is the safe side.
        for path, entry in self._files.items():
            if path not in entries and any(path.is_relative_to(d) for d in dir_errors):
                entries[path] = entry
        self._files = dict(sorted(entries.items(), key=lambda item: self._sort_key(item[0])))
        return self._merge()

    async def run(
        self,
        on_change: Callable[[Change], None],
        on_synced: Callable[[], None],
        *,
        interval: float = 0.5,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Deliver every object as ADDED, call ``on_synced()`` once, then deliver diffs until ``stop``.

        Raises :class:`ManifestError` if the directory is unusable at start (a misconfiguration);
        later trouble with it is logged and the last known objects are kept.
        """
        await asyncio.to_thread(self._check_root)
        # File I/O and YAML parsing run in a worker thread: a big directory must not stall the loop.
        current = await asyncio.to_thread(self.scan)
        for key in sorted(current):
            on_change(Change(ChangeType.ADDED, key, None, current[key]))
        on_synced()
        while not await _wait(stop, interval):
            try:
                latest = await asyncio.to_thread(self.scan)
            except Exception:  # scan is built not to raise; a bug here must still not kill the proxy
                self._log.exception(
                    "%s", _Event("manifest scan failed, keeping the last known objects", dir=self._root)
                )
                continue
            for change in diff(current, latest):
                on_change(change)
            current = latest

    # -- internals ---------------------------------------------------------------------------------

    def _check_root(self) -> None:
        try:
            with os.scandir(self._root):
                pass
        except FileNotFoundError as exc:
            raise ManifestError(f"manifest directory {str(self._root)!r} does not exist") from exc
        except NotADirectoryError as exc:
            raise ManifestError(f"manifest path {str(self._root)!r} is not a directory") from exc
        except OSError as exc:
            raise ManifestError(f"cannot read manifest directory {str(self._root)!r}: {exc.strerror or exc}") from exc

    def _sort_key(self, path: Path) -> tuple[str, ...]:
        # Component-wise order ("a/b.yaml" before "a-b.yaml"), the order a reader of `tree` expects.
        return path.relative_to(self._root).parts

    def _display(self, path: Path) -> str:
        if path == self._root:
            return str(path)
        return path.relative_to(self._root).as_posix()

    @staticmethod
    def _ignored(name: str) -> bool:
        # Hidden entries include vim's .x.swp, emacs's .#x and a ConfigMap mount's ..data.
        return name.startswith((".", "#")) or name.endswith(_TEMP_SUFFIXES)

    def _walk(self) -> tuple[list[Path], dict[Path, str]]:
        files: list[Path] = []
        errors: dict[Path, str] = {}
        seen: set[tuple[int, int]] = set()  # (dev, inode): symlinked directories may loop
        stack = [self._root]
        while stack:
            directory = stack.pop()
            try:
                st = directory.stat()
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                with os.scandir(directory) as it:
                    listing = list(it)
            except OSError as exc:
                errors[directory] = exc.strerror or str(exc)
                continue
            for entry in listing:
                if self._ignored(entry.name):
                    continue
                try:
                    if entry.is_dir():
                        stack.append(Path(entry.path))
                    elif entry.name.endswith(_SUFFIXES) and entry.is_file():
                        files.append(Path(entry.path))
                except OSError:
                    continue  # vanished while listing: treated as absent
        files.sort(key=self._sort_key)
        return files, errors

    def _report_dir_errors(self, errors: dict[Path, str]) -> None:
        for directory, reason in errors.items():
            if self._dir_errors.get(directory) != reason:
                self._log.warning(
                    "%s",
                    _Event(
                        "cannot list manifest directory, keeping the objects of its files",
                        dir=self._display(directory),
                        reason=reason,
                    ),
                )
        for directory in self._dir_errors.keys() - errors.keys():
            self._log.info("%s", _Event("manifest directory readable again", dir=self._display(directory)))
        self._dir_errors = errors

    def _scan_file(self, path: Path) -> _FileEntry | None:
        """The new entry for one listed file, or None if the file is gone."""
        previous = self._files.get(path)
        file = self._display(path)
        try:
            # stat before read: if the file changes while we read it, the next scan sees a newer
            # stamp and reads it again, never the other way round.
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._failed(path, previous, f"cannot stat: {exc.strerror or exc}", stamp=None)
        if not stat.S_ISREG(st.st_mode):
            return None  # a FIFO or device named *.yaml would block or never end: not a manifest
        stamp: _Stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if previous is not None and previous.stamp == stamp:
            return previous
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._failed(path, previous, f"cannot read: {exc.strerror or exc}", stamp=stamp)
        try:
            docs = _load_documents(path, raw)
        except _ParseFailed as exc:
            return self._failed(path, previous, exc.reason, stamp=stamp)
        try:
            objects = _decode_file(docs, file=file, previous=previous.objects if previous else {}, logger=self._log)
        except Exception as exc:  # a bug in decoding one file must not hide all other files
            return self._failed(path, previous, f"{type(exc).__name__}: {exc}", stamp=stamp)
        if previous is not None and previous.error is not None:
            self._log.info("%s", _Event("manifest file parses again", file=file))
        return _FileEntry(stamp, objects)

    def _failed(self, path: Path, previous: _FileEntry | None, reason: str, *, stamp: _Stamp | None) -> _FileEntry:
        kept = previous.objects if previous is not None else {}
        # Recording the new stamp means the same broken content is not re-read (or re-reported)
        # until it changes; a stat failure has no stamp, so it is deduplicated by its reason.
        if previous is None or previous.error != reason or previous.stamp != stamp:
            self._log.warning(
                "%s",
                _Event(
                    "cannot load manifest file, keeping its last good objects",
                    file=self._display(path),
                    kept=len(kept),
                    reason=reason,
                ),
            )
        return _FileEntry(stamp, kept, error=reason)

    def _merge(self) -> dict[ObjectKey, KubeObject]:
        merged: dict[ObjectKey, KubeObject] = {}
        owner: dict[ObjectKey, Path] = {}
        duplicates: set[tuple[ObjectKey, Path, Path]] = set()
        for path, entry in self._files.items():  # sorted: the first file wins
            for key, obj in entry.objects.items():
                first = owner.get(key)
                if first is None:
                    merged[key] = obj
                    owner[key] = path
                    continue
                dup = (key, first, path)
                duplicates.add(dup)
                if dup not in self._duplicates:
                    self._log.warning(
                        "%s",
                        _Event(
                            "object defined in two files, the first wins",
                            kind=key.kind,
                            object=_object_label(key.namespace, key.name),
                            file=self._display(path),
                            winner=self._display(first),
                        ),
                    )
        self._duplicates = duplicates
        return merged


async def _wait(stop: asyncio.Event | None, timeout: float) -> bool:
    """Sleep ``timeout`` seconds; True as soon as ``stop`` is set."""
    if stop is None:
        await asyncio.sleep(timeout)
        return False
    if stop.is_set():
        return True
    try:
        await asyncio.wait_for(stop.wait(), timeout)
    except TimeoutError:
        return False
    return True


def diff(old: Mapping[ObjectKey, KubeObject], new: Mapping[ObjectKey, KubeObject]) -> list[Change]:
    """The changes that turn ``old`` into ``new``, sorted by key; equal objects produce nothing."""
    changes: list[Change] = []
    for key in sorted(old.keys() | new.keys()):
        before = old.get(key)
        after = new.get(key)
        if before is None:
            changes.append(Change(ChangeType.ADDED, key, None, after))
        elif after is None:
            changes.append(Change(ChangeType.DELETED, key, before, None))
        elif before != after:  # msgspec structs compare by value
            changes.append(Change(ChangeType.MODIFIED, key, before, after))
    return changes
