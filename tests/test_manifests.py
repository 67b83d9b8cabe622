"""The manifest-directory source: parsing, error containment, hot reload, and the run loop."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from kubeproxy.model.objects import EndpointSlice, KubeObject, Node, Service
from kubeproxy.sources.events import Change, ChangeType, ObjectKey
from kubeproxy.sources.manifests import ManifestDirectory, ManifestError, diff

LOGGER = "kubeproxy.sources.manifests"


def svc_yaml(name: str, *, port: int | str = 80, namespace: str | None = None, ip: str = "10.96.0.10") -> str:
    ns = f"\n  namespace: {namespace}" if namespace else ""
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}{ns}
spec:
  clusterIP: {ip}
  ports:
  - port: {port}
    protocol: TCP
"""


def write(path: Path, text: str) -> Path:
    """Write and bump mtime, so a rewrite within one timestamp tick is still seen as a change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    st = path.stat()
    if st.st_mtime_ns <= before:
        os.utime(path, ns=(st.st_atime_ns, before + 1_000))
    return path


def svc_key(name: str, namespace: str = "default") -> ObjectKey:
    return ObjectKey("Service", namespace, name)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------------------------------
# Parsing


def test_multi_document_file(tmp_path: Path) -> None:
    write(tmp_path / "all.yaml", "---\n" + svc_yaml("a") + "---\n" + svc_yaml("b", namespace="prod") + "---\n")
    objs = ManifestDirectory(tmp_path).scan()
    assert set(objs) == {svc_key("a"), svc_key("b", "prod")}
    a = objs[svc_key("a")]
    assert isinstance(a, Service)
    assert a.spec.clusterIP == "10.96.0.10"
    assert a.spec.ports is not None
    assert a.spec.ports[0].port == 80


def test_kind_list_with_items(tmp_path: Path) -> None:
    write(
        tmp_path / "list.yaml",
        """apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec: {clusterIP: 10.96.0.20, ports: [{port: 443}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: web-abc
    namespace: shop
    labels: {kubernetes.io/service-name: web}
  addressType: IPv4
  endpoints:
  - addresses: [10.244.1.5]
    conditions: {ready: true}
  ports: [{port: 8443, protocol: TCP}]
- apiVersion: v1
  kind: Pod
  metadata: {name: ignored}
""",
    )
    objs = ManifestDirectory(tmp_path).scan()
    assert set(objs) == {svc_key("web", "shop"), ObjectKey("EndpointSlice", "shop", "web-abc")}
    eps = objs[ObjectKey("EndpointSlice", "shop", "web-abc")]
    assert isinstance(eps, EndpointSlice)
    assert eps.endpoints is not None
    assert eps.endpoints[0].addresses == ["10.244.1.5"]


def test_typed_list_items_without_kind(tmp_path: Path) -> None:
    write(
        tmp_path / "svcs.yaml",
        """apiVersion: v1
kind: ServiceList
items:
- metadata: {name: one}
  spec: {clusterIP: 10.96.0.1}
- metadata: {name: two, namespace: kube-system}
  spec: {clusterIP: 10.96.0.2}
""",
    )
    objs = ManifestDirectory(tmp_path).scan()
    assert set(objs) == {svc_key("one"), svc_key("two", "kube-system")}
    one = objs[svc_key("one")]
    assert isinstance(one, Service)
    assert one.kind == "Service"


def test_default_namespace_and_cluster_scoped_node(tmp_path: Path) -> None:
    write(tmp_path / "svc.yaml", svc_yaml("web"))
    write(
        tmp_path / "node.yaml",
        """apiVersion: v1
kind: Node
metadata: {name: node-1, namespace: should-be-ignored}
status:
  addresses: [{type: InternalIP, address: 192.168.50.1}]
""",
    )
    objs = ManifestDirectory(tmp_path).scan()
    web = objs[svc_key("web")]
    assert web.metadata.namespace == "default"
    node = objs[ObjectKey("Node", "", "node-1")]
    assert isinstance(node, Node)
    assert node.metadata.namespace == ""
    assert node.status.addresses is not None
    assert node.status.addresses[0].address == "192.168.50.1"


def test_unsupported_kinds_ignored_without_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(
        tmp_path / "mixed.yaml",
        """apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative}
---
"""
        + svc_yaml("web"),
    )
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        objs = ManifestDirectory(tmp_path).scan()
    assert set(objs) == {svc_key("web")}
    assert warnings(caplog) == []
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("kind=Deployment" in m for m in debug)


def test_json_file_and_skipped_files(tmp_path: Path) -> None:
    write(
        tmp_path / "svc.json",
        '{"apiVersion": "v1", "kind": "Service",\n\t"metadata": {"name": "j"}, "spec": {"clusterIP": "10.96.0.3"}}',
    )
    write(tmp_path / ".hidden.yaml", svc_yaml("hidden"))
    write(tmp_path / ".git" / "x.yaml", svc_yaml("in-hidden-dir"))
    write(tmp_path / "svc.yaml~", svc_yaml("backup"))
    write(tmp_path / "notes.txt", svc_yaml("text"))
    write(tmp_path / "sub" / "deeper" / "n.yml", svc_yaml("nested"))
    objs = ManifestDirectory(tmp_path).scan()
    assert set(objs) == {svc_key("j"), svc_key("nested")}


def test_unquoted_timestamps_stay_strings(tmp_path: Path) -> None:
    write(
        tmp_path / "svc.yaml",
        """apiVersion: v1
kind: Service
metadata:
  name: web
  creationTimestamp: 2024-05-01T10:00:00Z
  deletionTimestamp: 2024-05-01T11:00:00Z
""",
    )
    web = ManifestDirectory(tmp_path).scan()[svc_key("web")]
    assert web.metadata.deletionTimestamp == "2024-05-01T11:00:00Z"


# --------------------------------------------------------------------------------------------------
# Errors: contained, named, logged once


def test_broken_yaml_keeps_previous_objects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = write(tmp_path / "svc.yaml", svc_yaml("web") + "---\n" + svc_yaml("api"))
    write(tmp_path / "other.yaml", svc_yaml("other"))
    src = ManifestDirectory(tmp_path)
    first = src.scan()
    assert len(first) == 3

    write(f, svc_yaml("web") + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [api\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        second = src.scan()
    assert second == first  # the half-written file still contributes both Services
    [msg] = warnings(caplog)
    assert "file=svc.yaml" in msg
    assert "line " in msg
    assert "column " in msg

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert src.scan() == first
    assert warnings(caplog) == []  # not repeated while the file is unchanged

    write(f, svc_yaml("web"))
    assert set(src.scan()) == {svc_key("web"), svc_key("other")}


def test_broken_yaml_on_first_scan_contributes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "bad.yaml", "kind: Service\nmetadata: {name: x\n")
    write(tmp_path / "good.yaml", svc_yaml("good"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        objs = ManifestDirectory(tmp_path).scan()
    assert set(objs) == {svc_key("good")}
    [msg] = warnings(caplog)
    assert "file=bad.yaml" in msg


def test_invalid_object_skipped_others_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(
        tmp_path / "svc.yaml",
        svc_yaml("good1") + "---\n" + svc_yaml("bad", port='"eighty"') + "---\n" + svc_yaml("good2"),
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        objs = ManifestDirectory(tmp_path).scan()
    assert set(objs) == {svc_key("good1"), svc_key("good2")}
    [msg] = warnings(caplog)
    assert "file=svc.yaml" in msg
    assert "kind=Service" in msg
    assert "object=default/bad" in msg
    assert "spec.ports[0].port" in msg


def test_invalid_object_keeps_previous_good_version(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = write(tmp_path / "svc.yaml", svc_yaml("web") + "---\n" + svc_yaml("api"))
    src = ManifestDirectory(tmp_path)
    before = src.scan()
    write(f, svc_yaml("web", port='"eighty"') + "---\n" + svc_yaml("api", ip="10.96.0.99"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        after = src.scan()
    assert after[svc_key("web")] == before[svc_key("web")]
    api = after[svc_key("api")]
    assert isinstance(api, Service)
    assert api.spec.clusterIP == "10.96.0.99"
    [msg] = warnings(caplog)
    assert "object=default/web" in msg
    assert "keeping the last good version" in msg


def test_hostile_name_is_escaped_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(
        tmp_path / "svc.yaml",
        'apiVersion: v1\nkind: Service\nmetadata:\n  name: "web\\nlevel=ERROR msg=\\"forged\\""\n---\n'
        + svc_yaml("fine"),
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        objs = ManifestDirectory(tmp_path).scan()
    assert set(objs) == {svc_key("fine")}
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    msg = record.getMessage()
    assert "\n" not in msg
    assert "\\n" in msg  # escaped, still readable
    assert 'object="default/web\\nlevel=ERROR msg=\\"forged\\""' in msg


def test_objects_without_name_or_mapping(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(
        tmp_path / "odd.yaml",
        "- just\n- a list\n---\nkind: Service\nmetadata: {}\n---\napiVersion: v1\nmetadata: {name: x}\n---\n"
        + svc_yaml("ok"),
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        objs = ManifestDirectory(tmp_path).scan()
    assert set(objs) == {svc_key("ok")}
    msgs = warnings(caplog)
    assert len(msgs) == 3
    assert all("file=odd.yaml" in m for m in msgs)


def test_duplicate_key_first_file_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "a.yaml", svc_yaml("web", ip="10.96.0.1"))
    write(tmp_path / "b.yaml", svc_yaml("web", ip="10.96.0.2"))
    src = ManifestDirectory(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        objs = src.scan()
    web = objs[svc_key("web")]
    assert isinstance(web, Service)
    assert web.spec.clusterIP == "10.96.0.1"
    [msg] = warnings(caplog)
    assert "a.yaml" in msg
    assert "b.yaml" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        src.scan()
    assert warnings(caplog) == []


def test_vanished_directory_keeps_objects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "manifests"
    f = write(root / "svc.yaml", svc_yaml("web"))
    src = ManifestDirectory(root)
    before = src.scan()
    f.unlink()
    root.rmdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert src.scan() == before
    [msg] = warnings(caplog)
    assert "manifests" in msg


# --------------------------------------------------------------------------------------------------
# Reload and diff


def test_reload_diff_modified_deleted_and_noop(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", svc_yaml("web"))
    b = write(tmp_path / "b.yaml", svc_yaml("api"))
    src = ManifestDirectory(tmp_path)
    s0 = src.scan()
    assert [(c.type, c.key) for c in diff({}, s0)] == [
        (ChangeType.ADDED, svc_key("api")),
        (ChangeType.ADDED, svc_key("web")),
    ]

    write(a, svc_yaml("web"))  # identical content, new mtime: re-parsed, equal by value
    s1 = src.scan()
    assert diff(s0, s1) == []

    write(a, svc_yaml("web", port=8080))
    s2 = src.scan()
    [change] = diff(s1, s2)
    assert change.type is ChangeType.MODIFIED
    assert change.key == svc_key("web")
    assert change.old == s1[svc_key("web")]
    assert change.new == s2[svc_key("web")]

    b.unlink()
    s3 = src.scan()
    assert diff(s2, s3) == [Change(ChangeType.DELETED, svc_key("api"), s2[svc_key("api")], None)]


def test_unchanged_files_are_not_reparsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "a.yaml", svc_yaml("web"))
    src = ManifestDirectory(tmp_path)
    src.scan()
    reads: list[Path] = []
    real = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    src.scan()
    assert reads == []


# --------------------------------------------------------------------------------------------------
# The run loop


def test_run_delivers_added_synced_then_modified(tmp_path: Path) -> None:
    f = write(tmp_path / "svc.yaml", svc_yaml("web"))
    write(tmp_path / "node.yaml", "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n")
    events: list[Change | str] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        synced = asyncio.Event()
        modified = asyncio.Event()

        def on_change(change: Change) -> None:
            events.append(change)
            if change.type is ChangeType.MODIFIED:
                modified.set()

        def on_synced() -> None:
            events.append("synced")
            synced.set()

        task = asyncio.create_task(ManifestDirectory(tmp_path).run(on_change, on_synced, interval=0.01, stop=stop))
        await asyncio.wait_for(synced.wait(), 5)
        await asyncio.to_thread(write, f, svc_yaml("web", port=8080))
        await asyncio.wait_for(modified.wait(), 5)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert [(e.type, e.key) if isinstance(e, Change) else e for e in events] == [
        (ChangeType.ADDED, ObjectKey("Node", "", "node-1")),
        (ChangeType.ADDED, svc_key("web")),
        "synced",
        (ChangeType.MODIFIED, svc_key("web")),
    ]
    last = events[-1]
    assert isinstance(last, Change)
    new: KubeObject | None = last.new
    assert isinstance(new, Service)
    assert new.spec.ports is not None
    assert new.spec.ports[0].port == 8080


def test_run_missing_directory_is_a_startup_error(tmp_path: Path) -> None:
    src = ManifestDirectory(tmp_path / "nope")
    with pytest.raises(ManifestError, match="does not exist"):
        asyncio.run(src.run(lambda c: None, lambda: None, interval=0.01, stop=asyncio.Event()))
