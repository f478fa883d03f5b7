"""Channel groups as disjoint sets: merged when channels must move together, blocked with the first reason."""

from __future__ import annotations


class UnionFind:
    """Union-find over channel groups: size, the reason a group is blocked (or None), its producers.

    Example:
        >>> uf = UnionFind(); a, b = uf.new(8, "conv1"), uf.new(8, "conv2"); uf.find(uf.union(a, b)) == uf.find(b)
        True
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.blocked: list[str | None] = []
        self.producers: list[list[str]] = []

    def new(self, size: int, producer: str | None = None, blocked: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.blocked.append(blocked)
        self.producers.append([producer] if producer else [])
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] != self.size[b]:  # cannot happen in a model that runs; keep it safe anyway
            self.block(a, f"channel counts {self.size[a]} and {self.size[b]} meet")
            self.block(b, f"channel counts {self.size[a]} and {self.size[b]} meet")
            return a
        self.parent[b] = a
        self.blocked[a] = self.blocked[a] or self.blocked[b]
        self.producers[a] += self.producers[b]
        return a

    def block(self, i: int, reason: str) -> None:
        i = self.find(i)
        if self.blocked[i] is None:
            self.blocked[i] = reason
