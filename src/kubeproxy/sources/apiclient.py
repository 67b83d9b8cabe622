"""The thin HTTP client under the reflector: GET a list page, stream a watch, nothing else.

Responses are handed up as raw bytes (a list page) or raw lines (a watch); decoding into our structs is
the reflector's job. Every aiohttp/TLS/socket failure is translated here, once, into ``ApiError``
(DESIGN.md section 5). A 401 makes the credentials re-read their token file or re-run their exec plugin,
and the request is retried once, so a rotated service-account token costs one extra round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping

import aiohttp
import msgspec

from kubeproxy import __version__
from kubeproxy.sources.errors import ApiError, ConnectionConfigError
from kubeproxy.sources.kubeconfig import ClientSettings

log = logging.getLogger("kubeproxy.sources.apiclient")

USER_AGENT = f"kube-proxy/v{__version__} (linux/{platform.machine()}) kubeproxy-python"


class _Status(msgspec.Struct, gc=False):
    message: str = ""
    reason: str = ""
    code: int = 0


def status_error(body: bytes, *, status: int, verb: str, resource: str) -> ApiError:
    """An ``ApiError`` from a ``metav1.Status`` body (HTTP error response or watch ERROR event)."""
    try:
        st = msgspec.json.decode(body, type=_Status)
        message, reason, code = st.message, st.reason, st.code or status
    except (msgspec.DecodeError, msgspec.ValidationError):
        message, reason, code = body[:200].decode(errors="replace"), "", status
    return ApiError(message or "no message", status=code, reason=reason, verb=verb, resource=resource)


class ApiClient:
    """One aiohttp session to one API server. Not thread-safe; lives on the daemon's event loop."""

    def __init__(
        self,
        settings: ClientSettings,
        *,
        connect_timeout: float = 10.0,
        list_timeout: float = 300.0,
    ) -> None:
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.list_timeout = list_timeout
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None
        self._generation = -1
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _prepare(self, verb: str, resource: str) -> tuple[aiohttp.ClientSession, dict[str, str]]:
        creds = self.settings.credentials
        try:
            auth = await asyncio.to_thread(creds.authorization)
            async with self._lock:  # three reflectors start at once: build one session, not three
                if self._session is None or creds.generation != self._generation:
                    self._generation = creds.generation
                    self._ssl = await asyncio.to_thread(self.settings.ssl_context)
                    if self._session is not None:
                        await self._session.close()
                    self._session = aiohttp.ClientSession(
                        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                        auto_decompress=True,
                    )
        except ConnectionConfigError as exc:
            raise ApiError(
                f"credentials unavailable: {exc}", reason="CredentialError", verb=verb, resource=resource
            ) from exc
        headers = {"Authorization": auth} if auth else {}
        return self._session, headers

    def _kwargs(self) -> dict[str, object]:
        kw: dict[str, object] = {}
        if self.settings.https:
            kw["ssl"] = self._ssl
            if self.settings.tls_server_name:
                kw["server_hostname"] = self.settings.tls_server_name
        if self.settings.proxy:
            kw["proxy"] = self.settings.proxy
        return kw

    @contextlib.asynccontextmanager
    async def _get(
        self, path: str, params: Mapping[str, str], *, verb: str, resource: str, timeout: aiohttp.ClientTimeout
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        url = self.settings.server + path
        for attempt in (1, 2):
            session, headers = await self._prepare(verb, resource)
            try:
                async with session.get(url, params=params, headers=headers, timeout=timeout, **self._kwargs()) as resp:  # type: ignore[arg-type]
                    if resp.status == 401 and attempt == 1:
                        # Maybe rotated: re-read the token file / re-run the exec plugin (it may block).
                        await asyncio.to_thread(self.settings.credentials.invalidate)
                        continue
                    if resp.status != 200:
                        body = await resp.read()
                        raise status_error(body, status=resp.status, verb=verb, resource=resource)
                    yield resp
                    return
            except ApiError:
                raise
            except (aiohttp.ClientError, OSError, ssl.SSLError, TimeoutError) as exc:
                reason = "Timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                raise ApiError(str(exc) or reason, reason=reason, verb=verb, resource=resource) from exc

    async def list_page(self, path: str, params: Mapping[str, str], *, resource: str) -> bytes:
        timeout = aiohttp.ClientTimeout(total=self.list_timeout, sock_connect=self.connect_timeout)
        async with self._get(path, params, verb="list", resource=resource, timeout=timeout) as resp:
            try:
                return await resp.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise ApiError(
                    f"reading list: {exc}", reason=type(exc).__name__, verb="list", resource=resource
                ) from exc

    async def watch_lines(
        self, path: str, params: Mapping[str, str], *, resource: str, idle_timeout: float
    ) -> AsyncGenerator[bytes, None]:
        """Yield each non-empty line of a watch stream until the server ends it.

        A stream that delivers no byte for ``idle_timeout`` seconds is stalled: ApiError(reason="Stalled").
        Lines may be of any length (one EndpointSlice with 1000 endpoints is ~300 KB).
        """
        # sock_read also bounds the wait for the response headers: a server that accepts the watch
        # and never answers is a stall too.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=idle_timeout)
        async with self._get(path, params, verb="watch", resource=resource, timeout=timeout) as resp:
            buf = bytearray()
            while True:
                try:
                    chunk = await resp.content.readany()  # sock_read=idle_timeout bounds this read
                except TimeoutError as exc:
                    raise ApiError(
                        f"no data for {idle_timeout:g}s, stream stalled",
                        reason="Stalled",
                        verb="watch",
                        resource=resource,
                    ) from exc
                except (aiohttp.ClientError, OSError) as exc:
                    raise ApiError(
                        f"stream broken: {exc!r}", reason=type(exc).__name__, verb="watch", resource=resource
                    ) from exc
                if not chunk:
                    break
                if b"\n" not in chunk:
                    buf += chunk
                    continue
                buf += chunk
                lines = buf.split(b"\n")
                buf = lines.pop()
                for line in lines:
                    if line.strip():
                        yield bytes(line)
            if buf.strip():
                raise ApiError("stream ended inside an event", reason="Truncated", verb="watch", resource=resource)
