"""Connection settings: kubeconfig fields, in-cluster config, --master, token rotation, exec plugins."""

from __future__ import annotations

import base64
import json
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from kubeproxy.sources.errors import ConnectionConfigError
from kubeproxy.sources.kubeconfig import Credentials, in_cluster, load_kubeconfig, resolve


def write_kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any] | None = None) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "ctx",
        "contexts": [
            {"name": "other", "context": {"cluster": "nope"}},
            {"name": "ctx", "context": {"cluster": "c", "user": "u"}},
        ],
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user or {}}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_token_and_ca_file_relative_to_the_kubeconfig(tmp_path: Path, ca: trustme.CA) -> None:
    (tmp_path / "pki").mkdir()
    ca.cert_pem.write_to_path(str(tmp_path / "pki" / "ca.crt"))
    cfg = write_kubeconfig(
        tmp_path / "kc.yaml",
        {"server": "https://10.0.0.1:6443/", "certificate-authority": "pki/ca.crt", "tls-server-name": "kubernetes"},
        {"token": "abc"},
    )
    s = load_kubeconfig(cfg)
    assert s.server == "https://10.0.0.1:6443"
    assert s.ca_file == str(tmp_path / "pki" / "ca.crt")
    assert s.tls_server_name == "kubernetes"
    assert s.credentials.authorization() == "Bearer abc"
    ctx = s.ssl_context()
    assert ctx is not None and ctx.verify_mode is ssl.CERT_REQUIRED


def test_data_fields_and_client_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    client = ca.issue_cert("kube-proxy")
    cfg = write_kubeconfig(
        tmp_path / "kc.yaml",
        {
            "server": "https://127.0.0.1:6443",
            "certificate-authority-data": base64.b64encode(ca.cert_pem.bytes()).decode(),
        },
        {
            "client-certificate-data": base64.b64encode(client.cert_chain_pems[0].bytes()).decode(),
            "client-key-data": base64.b64encode(client.private_key_pem.bytes()).decode(),
        },
    )
    s = load_kubeconfig(cfg)
    assert s.ca_pem == ca.cert_pem.bytes()
    assert s.credentials.authorization() is None
    assert s.credentials.describe == "client certificate"
    assert s.ssl_context() is not None  # the key pair loaded (from memory files, never from disk)


def test_master_overrides_server_and_bare_master_has_no_credentials(tmp_path: Path) -> None:
    cfg = write_kubeconfig(tmp_path / "kc.yaml", {"server": "https://a:1"}, {"token": "t"})
    assert load_kubeconfig(cfg, master="http://127.0.0.1:8080").server == "http://127.0.0.1:8080"
    s = resolve("", "http://127.0.0.1:8080")
    assert s.server == "http://127.0.0.1:8080" and s.credentials.authorization() is None
    assert s.ssl_context() is None


@pytest.mark.parametrize(
    ("cluster", "user", "message"),
    [
        (
            {"server": "https://a:1", "insecure-skip-tls-verify": True, "certificate-authority-data": "eA=="},
            {},
            "insecure",
        ),
        ({}, {}, "no server"),
        ({"server": "ftp://a"}, {}, "not an http(s) URL"),
        ({"server": "https://a:1"}, {"auth-provider": {"name": "oidc"}}, "exec credential plugin"),
        ({"server": "https://a:1"}, {"client-certificate": "c.pem"}, "together"),
        ({"server": "https://a:1", "proxy-url": "socks5://p:1080"}, {}, "proxy-url"),
        ({"server": "https://a:1"}, {"tokenFile": "missing-token"}, "missing-token"),
        ({"server": "https://a:1", "certificate-authority": "nope.crt"}, {}, "certificate authority"),
    ],
)
def test_bad_kubeconfig_is_one_clear_error(
    tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any], message: str
) -> None:
    cfg = write_kubeconfig(tmp_path / "kc.yaml", cluster, user)
    with pytest.raises(ConnectionConfigError, match=r"kc\.yaml") as err:
        load_kubeconfig(cfg)
    assert message in str(err.value)


def test_missing_file_and_missing_context(tmp_path: Path) -> None:
    with pytest.raises(ConnectionConfigError, match="cannot read"):
        load_kubeconfig(tmp_path / "none.yaml")
    (tmp_path / "kc.yaml").write_text("apiVersion: v1\nkind: Config\ncurrent-context: gone\ncontexts: []\n")
    with pytest.raises(ConnectionConfigError, match="context 'gone' not found"):
        load_kubeconfig(tmp_path / "kc.yaml")


def test_token_file_is_reread_after_a_minute_and_after_a_401(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    now = [1000.0]
    creds = Credentials(token_file=token, clock=lambda: now[0])
    assert creds.authorization() == "Bearer one"
    token.write_text("two")
    now[0] += 30
    assert creds.authorization() == "Bearer one"  # cached
    now[0] += 31
    assert creds.authorization() == "Bearer two"  # a minute passed: re-read
    token.write_text("three")
    creds.invalidate()  # what the client does on a 401
    assert creds.authorization() == "Bearer three"
    token.unlink()
    creds.invalidate()
    assert creds.authorization() == "Bearer three"  # unreadable later: keep the last good token


def test_in_cluster(tmp_path: Path, ca: trustme.CA) -> None:
    (tmp_path / "token").write_text("sa-token")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    s = in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}, tmp_path)
    assert s.server == "https://[fd00::1]:443"
    assert s.credentials.authorization() == "Bearer sa-token"
    assert s.ca_file == str(tmp_path / "ca.crt")
    with pytest.raises(ConnectionConfigError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster({}, tmp_path)


def test_no_kubeconfig_and_no_master_means_in_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConnectionConfigError, match="in-cluster"):
        resolve("", "")


PLUGIN = """\
import json, os, sys, pathlib
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
calls = pathlib.Path(sys.argv[1])
calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
token = "-".join(["exec", os.environ["EXTRA"], str(info["spec"]["interactive"]), str(len(calls.read_text()))])
out = {"apiVersion": info["apiVersion"], "kind": "ExecCredential",
       "status": {"token": token, "expirationTimestamp": sys.argv[2]}}
if sys.argv[3] == "fail":
    sys.stderr.write("plugin broke"); sys.exit(3)
print(json.dumps(out))
"""


def _exec_kubeconfig(tmp_path: Path, expiry: str, mode: str = "ok") -> Path:
    (tmp_path / "plugin.py").write_text(PLUGIN)
    return write_kubeconfig(
        tmp_path / "kc.yaml",
        {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True},
        {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": sys.executable,
                "args": [str(tmp_path / "plugin.py"), str(tmp_path / "calls"), expiry, mode],
                "env": [{"name": "EXTRA", "value": "e"}],
                "interactiveMode": "Never",
            }
        },
    )


def test_exec_plugin_token_is_cached_until_expiry(tmp_path: Path) -> None:
    s = load_kubeconfig(_exec_kubeconfig(tmp_path, "2999-01-01T00:00:00Z"))
    assert s.credentials.authorization() == "Bearer exec-e-False-1"
    assert s.credentials.authorization() == "Bearer exec-e-False-1"  # cached: not expired
    s.credentials.invalidate()
    assert s.credentials.authorization() == "Bearer exec-e-False-2"  # a 401 re-runs it
    (tmp_path / "old").mkdir()
    expired = load_kubeconfig(_exec_kubeconfig(tmp_path / "old", "2000-01-01T00:00:00Z"))
    first = expired.credentials.authorization()
    assert first != expired.credentials.authorization()  # already expired: run every time


def test_exec_plugin_failure_names_the_plugin(tmp_path: Path) -> None:
    s = load_kubeconfig(_exec_kubeconfig(tmp_path, "2999-01-01T00:00:00Z", mode="fail"))
    with pytest.raises(ConnectionConfigError, match="exited with 3: 'plugin broke'"):
        s.credentials.authorization()


def test_exec_plugin_client_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    client = ca.issue_cert("kube-proxy")
    out = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {
            "clientCertificateData": client.cert_chain_pems[0].bytes().decode(),
            "clientKeyData": client.private_key_pem.bytes().decode(),
        },
    }
    (tmp_path / "out.json").write_text(json.dumps(out))
    cfg = write_kubeconfig(
        tmp_path / "kc.yaml",
        {
            "server": "https://127.0.0.1:6443",
            "certificate-authority-data": base64.b64encode(ca.cert_pem.bytes()).decode(),
        },
        {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1",
                "command": "cat",
                "args": [str(tmp_path / "out.json")],
            }
        },
    )
    s = load_kubeconfig(cfg)
    assert s.credentials.identity() is None  # not run yet
    assert s.credentials.authorization() is None
    identity = s.credentials.identity()
    assert identity is not None and identity.cert_pem == client.cert_chain_pems[0].bytes()
    assert s.ssl_context() is not None


def test_exec_plugin_wrong_api_version_is_rejected(tmp_path: Path) -> None:
    cfg = write_kubeconfig(
        tmp_path / "kc.yaml",
        {"server": "https://a:1"},
        {"exec": {"apiVersion": "client.authentication.k8s.io/v1alpha1", "command": "x"}},
    )
    with pytest.raises(ConnectionConfigError, match="not supported"):
        load_kubeconfig(cfg)


def test_token_file_wins_over_a_static_token_as_in_client_go(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file")
    cfg = write_kubeconfig(tmp_path / "kc.yaml", {"server": "https://a:1"}, {"token": "stale", "tokenFile": "token"})
    assert load_kubeconfig(cfg).credentials.authorization() == "Bearer from-file"
