"""A lint finding: the rule, the node, how bad, and why it costs speed or accuracy."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One lint finding: the rule, the node, how bad, and why it costs speed or accuracy.

    Example:
        >>> Finding("unsupported-op", "/x/Foo", "error", "no importer").severity
        'error'
    """

    check: str
    node: str
    severity: Severity
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.check} {self.node}: {self.message}"


def node_name(n: Any) -> str:
    """An ONNX node's name, or its op type and first output when it has none."""
    return n.name or f"<{n.op_type} -> {n.output[0] if n.output else '?'}>"
