"""Error taxonomy of the API boundary (DESIGN.md section 5): every aiohttp, TLS, subprocess or decode
failure met while talking to the API server is translated once, in ``sources``, into one of these.
"""

from __future__ import annotations


class ConnectionConfigError(Exception):
    """The connection settings (kubeconfig, in-cluster files, ``--master``) are unusable.

    The message names the file and the field that is wrong. Fatal at startup (exit code 2)."""


class ApiError(Exception):
    """A request to the API server failed.

    ``status`` is the HTTP status (or the ``code`` of a watch ERROR event); 0 means no HTTP answer at
    all (connection refused or reset, TLS failure, timeout). ``verb`` and ``resource`` say what we were
    doing, so an operator can read the missing permission straight off the message.
    """

    def __init__(self, message: str, *, status: int = 0, reason: str = "", verb: str = "", resource: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason
        self.verb = verb
        self.resource = resource

    @property
    def expired(self) -> bool:
        """410 Gone: the resourceVersion or continue token is too old; only a fresh list helps."""
        return self.status == 410

    @property
    def denied(self) -> bool:
        return self.status in (401, 403)

    def __str__(self) -> str:
        what = f"{self.verb} {self.resource}: " if self.verb else ""
        code = f" (HTTP {self.status} {self.reason})" if self.status else ""
        return f"{what}{self.message}{code}"


class AccessDenied(ApiError):
    """401/403 before the initial lists completed: nothing can work, so the daemon stops with this."""

    def explain(self) -> str:
        if self.status == 401:
            return (
                f"the API server rejected our credentials (401 Unauthorized) on {self.verb} {self.resource}: "
                "check the token, client certificate or exec plugin in the kubeconfig / service account"
            )
        return (
            f"permission denied (403 Forbidden): kube-proxy needs verb={self.verb} on resource={self.resource} "
            f"(the system:node-proxier ClusterRole grants list and watch on services, endpointslices and nodes); "
            f"server said: {self.message!r}"
        )
