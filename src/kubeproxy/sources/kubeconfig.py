"""Connection settings for the API server: ``--kubeconfig``, ``--master`` and in-cluster config.

Resolution follows upstream kube-proxy (``cmd/kube-proxy/app/server.go`` createClient):

* neither a kubeconfig nor a master URL: in-cluster config (``KUBERNETES_SERVICE_HOST``/``_PORT``,
  the service-account token and ``ca.crt``);
* otherwise the kubeconfig's current context (only the explicit path, no ``KUBECONFIG`` merging), with
  ``--master`` overriding the cluster's ``server``; a master URL alone means no credentials.

Every kubeconfig field real clusters write is honoured: ``server``, ``certificate-authority(-data)``,
``insecure-skip-tls-verify``, ``tls-server-name``, ``proxy-url``; ``token``, ``tokenFile``,
``client-certificate(-data)``/``client-key(-data)``, ``username``/``password`` and ``exec`` credential
plugins (``client.authentication.k8s.io`` v1 and v1beta1, token or client-certificate output, cached
until ``expirationTimestamp``). Relative paths are relative to the kubeconfig's directory.

Why this is ours and not the official client's loader (DESIGN.md section 3 allows it given a measured
reason): ``kubernetes`` 37's loader reads ``tokenFile`` once and never again, while kubeadm's kube-proxy
kubeconfig points ``tokenFile`` at a bound service-account token that the kubelet rotates (expiry 1 h):
the proxy would get 401s after an hour. It also logs and swallows exec plugin failures, writes client keys
to temp files that live until exit, and brings 27 packages / 163 MB we would not otherwise load.

Token rotation: a token file (in-cluster or ``tokenFile``, which wins over ``token`` as in client-go) is
re-read at most once a minute, and at once after a 401, like client-go's cached file token source.
Client keys given as data are loaded from an anonymous memory file (memfd), never written to disk.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kubeproxy.sources.errors import ConnectionConfigError

log = logging.getLogger("kubeproxy.sources.kubeconfig")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_PERIOD = 60.0  # seconds, like client-go's cachingFileTokenSource
EXEC_TIMEOUT = 60.0
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")


@dataclass(frozen=True, slots=True)
class TLSIdentity:
    """A client certificate and its key, PEM, either as paths or as bytes."""

    cert_file: str | None = None
    key_file: str | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None


class Credentials:
    """What goes into each request: an ``Authorization`` header and/or a TLS client identity.

    Thread-safe; ``authorization()`` may block (file read, exec plugin), so async callers run it in a
    thread. ``generation`` changes whenever the TLS identity changes (an exec plugin that returns
    certificates), which tells the HTTP client to build a new TLS context.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        token_file: Path | None = None,
        basic: tuple[str, str] | None = None,
        identity: TLSIdentity | None = None,
        exec_plugin: ExecPlugin | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self._token = token
        self._token_file = token_file
        self._basic = basic
        self._identity = identity
        self._exec = exec_plugin
        self._clock = clock
        self._lock = threading.Lock()
        self._file_token: str | None = None
        self._file_read_at = float("-inf")
        self.generation = 0
        self.describe = self._describe()

    def _describe(self) -> str:
        if self._token_file:
            return f"tokenFile {self._token_file}"
        if self._token:
            return "token"
        if self._exec:
            return f"exec {self._exec.command}"
        if self._basic:
            return "basic auth"
        if self._identity:
            return "client certificate"
        return "none"

    def authorization(self) -> str | None:
        with self._lock:
            if self._token_file is not None:  # client-go: the file wins over a static token
                return f"Bearer {self._read_token_file()}"
            if self._token:
                return f"Bearer {self._token}"
            if self._exec is not None:
                cred = self._exec.credential()
                if cred.identity != self._identity and cred.identity is not None:
                    self._identity = cred.identity
                    self.generation += 1
                return f"Bearer {cred.token}" if cred.token else None
            if self._basic:
                raw = f"{self._basic[0]}:{self._basic[1]}".encode()
                return "Basic " + base64.b64encode(raw).decode()
            return None

    def identity(self) -> TLSIdentity | None:
        """The client certificate to present (an exec plugin's appears after ``authorization()`` ran it)."""
        with self._lock:
            return self._identity

    def invalidate(self) -> None:
        """After a 401: re-read the token file / re-run the exec plugin on the next request.

        Lock-free on purpose (plain assignments): it must never wait behind a running exec plugin."""
        self._file_read_at = float("-inf")
        if self._exec is not None:
            self._exec.expire()

    def _read_token_file(self) -> str:
        assert self._token_file is not None
        now = self._clock()
        if self._file_token is not None and now - self._file_read_at < TOKEN_REREAD_PERIOD:
            return self._file_token
        try:
            token = self._token_file.read_text().strip()
        except OSError as exc:
            if self._file_token is None:
                raise ConnectionConfigError(f"token file {self._token_file}: {exc.strerror or exc}") from exc
            log.warning(
                "cannot re-read token file, keeping the previous token path=%s error=%r", self._token_file, str(exc)
            )
            self._file_read_at = now
            return self._file_token
        if not token:
            raise ConnectionConfigError(f"token file {self._token_file} is empty")
        if self._file_token is not None and token != self._file_token:
            log.info("service account token rotated path=%s", self._token_file)
        self._file_token, self._file_read_at = token, now
        return token


@dataclass(frozen=True, slots=True)
class ExecCredential:
    token: str | None
    identity: TLSIdentity | None
    expires: float | None  # time.time() seconds


class ExecPlugin:
    """A ``users[].user.exec`` credential plugin (client-go's exec authenticator, non-interactive)."""

    def __init__(self, spec: Mapping[str, Any], *, base_dir: Path, cluster: Mapping[str, Any], where: str) -> None:
        command = spec.get("command")
        if not isinstance(command, str) or not command:
            raise ConnectionConfigError(f"{where}: exec.command is required")
        api_version = spec.get("apiVersion", "")
        if api_version not in EXEC_API_VERSIONS:
            raise ConnectionConfigError(
                f"{where}: exec.apiVersion {api_version!r} is not supported (use one of {', '.join(EXEC_API_VERSIONS)})"
            )
        # A command with a path separator is relative to the kubeconfig's directory; a bare name is looked up on PATH.
        self.command = str(base_dir / command) if os.sep in command and not Path(command).is_absolute() else command
        self.args = [str(a) for a in spec.get("args") or []]
        self.env = {str(e["name"]): str(e.get("value", "")) for e in spec.get("env") or [] if isinstance(e, dict)}
        self.api_version = api_version
        self.install_hint = str(spec.get("installHint") or "")
        self.cluster = dict(cluster) if spec.get("provideClusterInfo") else None
        self.where = where
        self._cached: ExecCredential | None = None

    def expire(self) -> None:
        self._cached = None

    def credential(self) -> ExecCredential:
        cached = self._cached
        if cached is not None and (cached.expires is None or cached.expires - time.time() > 10):
            return cached
        self._cached = self._run()
        return self._cached

    def _run(self) -> ExecCredential:
        info: dict[str, Any] = {
            "apiVersion": self.api_version,
            "kind": "ExecCredential",
            "spec": {"interactive": False},
        }
        if self.cluster is not None:
            info["spec"]["cluster"] = self.cluster
        env = {**os.environ, **self.env, "KUBERNETES_EXEC_INFO": json.dumps(info)}
        if shutil.which(self.command, path=env.get("PATH")) is None and not Path(self.command).is_file():
            hint = f"; {self.install_hint}" if self.install_hint else ""
            raise ConnectionConfigError(f"{self.where}: exec plugin {self.command!r} not found{hint}")
        try:
            proc = subprocess.run(
                [self.command, *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=EXEC_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConnectionConfigError(f"{self.where}: exec plugin {self.command!r} failed: {exc}") from exc
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()[:500]
            raise ConnectionConfigError(
                f"{self.where}: exec plugin {self.command!r} exited with {proc.returncode}: {err!r}"
            )
        try:
            out = json.loads(proc.stdout)
        except ValueError as exc:
            raise ConnectionConfigError(f"{self.where}: exec plugin output is not JSON: {exc}") from exc
        if not isinstance(out, dict) or out.get("kind") != "ExecCredential":
            raise ConnectionConfigError(f"{self.where}: exec plugin output is not an ExecCredential")
        if out.get("apiVersion") != self.api_version:
            got = out.get("apiVersion")
            raise ConnectionConfigError(
                f"{self.where}: exec plugin returned apiVersion {got!r}, not {self.api_version!r}"
            )
        status = out.get("status") or {}
        token = status.get("token") or None
        cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
        if bool(cert) != bool(key):
            raise ConnectionConfigError(
                f"{self.where}: exec plugin returned only one of clientCertificateData/clientKeyData"
            )
        identity = TLSIdentity(cert_pem=str(cert).encode(), key_pem=str(key).encode()) if cert else None
        if token is None and identity is None:
            raise ConnectionConfigError(f"{self.where}: exec plugin returned neither a token nor a client certificate")
        expires = None
        if status.get("expirationTimestamp"):
            expires = _parse_rfc3339(str(status["expirationTimestamp"]), self.where)
        return ExecCredential(token=token, identity=identity, expires=expires)


def _parse_rfc3339(value: str, where: str) -> float:
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise ConnectionConfigError(f"{where}: invalid expirationTimestamp {value!r}") from exc


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Everything the HTTP client needs to reach and authenticate to the API server."""

    server: str  # scheme://host[:port][/prefix], no trailing slash
    credentials: Credentials = field(default_factory=Credentials)
    ca_file: str | None = None
    ca_pem: bytes | None = None
    insecure: bool = False
    tls_server_name: str | None = None
    proxy: str | None = None
    origin: str = ""  # for logs: where these settings came from

    @property
    def https(self) -> bool:
        return self.server.startswith("https://")

    def ssl_context(self) -> ssl.SSLContext | None:
        """A fresh TLS context (None for plain http); raises ConnectionConfigError naming what is wrong."""
        if not self.https:
            return None
        try:
            if self.ca_file or self.ca_pem:
                ctx = ssl.create_default_context(
                    cafile=self.ca_file, cadata=self.ca_pem.decode() if self.ca_pem else None
                )
            else:
                ctx = ssl.create_default_context()  # system roots, like client-go without a CA
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConnectionConfigError(f"{self.origin}: certificate authority unusable: {exc}") from exc
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        identity = self.credentials.identity()
        if identity is not None:
            _load_identity(ctx, identity, self.origin)
        return ctx


def _load_identity(ctx: ssl.SSLContext, identity: TLSIdentity, origin: str) -> None:
    """Load a client certificate and key; PEM data never touches a filesystem (memfd, not /tmp)."""
    fds: list[int] = []

    def path_of(data: bytes | None, file: str | None, name: str) -> str:
        if data is None:
            return str(file)
        fd = os.memfd_create(f"kube-proxy-{name}", os.MFD_CLOEXEC)
        fds.append(fd)
        os.write(fd, data)
        return f"/proc/self/fd/{fd}"

    try:
        ctx.load_cert_chain(
            path_of(identity.cert_pem, identity.cert_file, "cert"), path_of(identity.key_pem, identity.key_file, "key")
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionConfigError(f"{origin}: client certificate/key unusable: {exc}") from exc
    finally:
        for fd in fds:
            os.close(fd)


# -- kubeconfig ------------------------------------------------------------------------------------
def _named(entries: Any, name: str, what: str, where: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(what)
            return body if isinstance(body, dict) else {}
    raise ConnectionConfigError(f"{where}: {what} {name!r} not found")


def _b64(value: Any, where: str, key: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ConnectionConfigError(f"{where}: {key} is not valid base64") from exc


def _path(base: Path, value: Any) -> str:
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else base / p)


def load_kubeconfig(path: Path, *, master: str = "", context: str = "") -> ClientSettings:
    """Settings from a kubeconfig file's current (or given) context; ``master`` overrides the server."""
    where = f"kubeconfig {path}"
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConnectionConfigError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConnectionConfigError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConnectionConfigError(f"{where}: not a kubeconfig (expected a mapping)")
    base = path.resolve().parent
    ctx_name = context or doc.get("current-context") or ""
    if not ctx_name:
        raise ConnectionConfigError(f"{where}: no current-context set")
    ctx = _named(doc.get("contexts"), ctx_name, "context", where)
    where = f"{where} context {ctx_name!r}"
    cluster = _named(doc.get("clusters"), str(ctx.get("cluster", "")), "cluster", where)
    user: dict[str, Any] = {}
    if ctx.get("user"):
        try:
            user = _named(doc.get("users"), str(ctx["user"]), "user", where)
        except ConnectionConfigError:
            log.warning("kubeconfig user not found, continuing without credentials context=%s", ctx_name)
    server = (master or str(cluster.get("server") or "")).rstrip("/")
    if not server:
        raise ConnectionConfigError(f"{where}: cluster has no server (and no --master given)")
    _check_server(server, where)

    ca_file = ca_pem = None
    if cluster.get("certificate-authority-data"):
        ca_pem = _b64(cluster["certificate-authority-data"], where, "certificate-authority-data")
    elif cluster.get("certificate-authority"):
        ca_file = _path(base, cluster["certificate-authority"])
    insecure = bool(cluster.get("insecure-skip-tls-verify"))
    if insecure and (ca_file or ca_pem):
        raise ConnectionConfigError(
            f"{where}: specifying a root certificates file with the insecure flag is not allowed"
        )
    proxy = str(cluster["proxy-url"]) if cluster.get("proxy-url") else None
    if proxy and urlsplit(proxy).scheme not in ("http", "https"):
        raise ConnectionConfigError(f"{where}: proxy-url {proxy!r}: only http and https proxies are supported")

    if user.get("auth-provider"):
        name = (user["auth-provider"] or {}).get("name", "?")
        raise ConnectionConfigError(
            f"{where}: auth-provider {name!r} is not supported (removed from client-go); use an exec credential plugin"
        )
    identity = None
    cert = user.get("client-certificate-data") or user.get("client-certificate")
    key = user.get("client-key-data") or user.get("client-key")
    if bool(cert) != bool(key):
        raise ConnectionConfigError(f"{where}: client certificate and key must be given together")
    if cert:
        identity = TLSIdentity(
            cert_pem=_b64(user["client-certificate-data"], where, "client-certificate-data")
            if user.get("client-certificate-data")
            else None,
            key_pem=_b64(user["client-key-data"], where, "client-key-data") if user.get("client-key-data") else None,
            cert_file=None if user.get("client-certificate-data") else _path(base, user["client-certificate"]),
            key_file=None if user.get("client-key-data") else _path(base, user["client-key"]),
        )
    exec_plugin = None
    if user.get("exec"):
        exec_info = {
            "server": server,
            "tls-server-name": cluster.get("tls-server-name"),
            "insecure-skip-tls-verify": insecure,
            "certificate-authority-data": base64.b64encode(ca_pem).decode() if ca_pem else None,
            "proxy-url": proxy,
        }
        exec_plugin = ExecPlugin(user["exec"], base_dir=base, cluster=exec_info, where=where)
    basic = None
    if user.get("username") and user.get("password"):
        basic = (str(user["username"]), str(user["password"]))
    credentials = Credentials(
        token=str(user["token"]) if user.get("token") else None,
        token_file=Path(_path(base, user["tokenFile"])) if user.get("tokenFile") else None,
        basic=basic,
        identity=identity,
        exec_plugin=exec_plugin,
    )
    settings = ClientSettings(
        server=server,
        credentials=credentials,
        ca_file=ca_file,
        ca_pem=ca_pem,
        insecure=insecure,
        tls_server_name=str(cluster["tls-server-name"]) if cluster.get("tls-server-name") else None,
        proxy=proxy,
        origin=where,
    )
    _validate(settings)
    return settings


def _check_server(server: str, where: str) -> None:
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConnectionConfigError(f"{where}: server {server!r} is not an http(s) URL")


def _validate(settings: ClientSettings) -> None:
    """Fail at startup, naming the file, rather than at the first request."""
    settings.ssl_context()
    if settings.credentials.describe.startswith("tokenFile"):
        try:
            settings.credentials.authorization()
        except ConnectionConfigError as exc:
            raise ConnectionConfigError(f"{settings.origin}: {exc}") from exc


def in_cluster(env: Mapping[str, str] | None = None, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> ClientSettings:
    """rest.InClusterConfig: the kubernetes Service's env vars, the mounted token (rotating) and CA."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ConnectionConfigError(
            "unable to load in-cluster configuration, KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be "
            "defined (or give --kubeconfig / --master)"
        )
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    token_file = sa_dir / "token"
    ca = sa_dir / "ca.crt"
    if not ca.exists():
        log.warning("in-cluster CA bundle missing, using system roots path=%s", ca)
    settings = ClientSettings(
        server=f"https://{hostport}",
        credentials=Credentials(token_file=token_file),
        ca_file=str(ca) if ca.exists() else None,
        origin="in-cluster config",
    )
    _validate(settings)
    return settings


def resolve(kubeconfig: str = "", master: str = "", *, env: Mapping[str, str] | None = None) -> ClientSettings:
    """Upstream kube-proxy's choice between in-cluster config, a kubeconfig and a bare master URL."""
    if not kubeconfig and not master:
        log.info("neither kubeconfig file nor master URL was specified, falling back to in-cluster config")
        return in_cluster(env)
    if kubeconfig:
        return load_kubeconfig(Path(kubeconfig), master=master)
    _check_server(master, "--master")
    return ClientSettings(server=master.rstrip("/"), origin="--master")
