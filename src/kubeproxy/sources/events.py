"""What every source emits: one ``Change`` per object added, modified or deleted.

Sources (the manifest directory, the API reflector) speak only this vocabulary; the daemon wires
changes into the state layer. ``old`` is the last version the source delivered (None for an add; the
API reflector always sends None, as it keeps resourceVersions, not objects), ``new`` the current one
(None for a delete). Consumers must not need ``old``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from kubeproxy.model.objects import KubeObject


class ChangeType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


class ObjectKey(NamedTuple):
    kind: str  # "Service" | "EndpointSlice" | "Node"
    namespace: str  # "" for cluster-scoped kinds (Node)
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class Change:
    type: ChangeType
    key: ObjectKey
    old: KubeObject | None
    new: KubeObject | None
