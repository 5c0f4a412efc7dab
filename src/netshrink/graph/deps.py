"""Channel dependencies: which channels of which layers must be removed together.

Every channel a layer produces (a conv filter, a linear neuron, an embedding column, an attention
head) gets an integer *label*. Labels flow through the traced graph with the tensors: a residual
add declares the labels of its two inputs equal, a concatenation lists its inputs' labels one
after the other, a flatten repeats each label once per spatial position. Equal labels are merged
with a union-find; each merged set is one *unit* that pruning keeps or removes as a whole.

A :class:`Slot` is a place where a layer's tensors are indexed by channel: a conv's output rows
(``out``), a consumer's input columns (``in``), a BatchNorm's per-channel parameters
(``through``), an attention module's head count (``heads``). A slot holds the label of every one
of its positions, so removing a unit removes, in every slot, the positions carrying that unit.

Label 0 is *frozen*: units merged with it are never removed (the model's outputs, inputs of ops
the graph does not understand, layers excluded by the caller).

The design learns from Torch-Pruning's DepGraph (Fang et al., CVPR 2023, sec. 3), which groups
coupled parameters by tracing; labels with a union-find replace its index-mapping functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FROZEN = 0

ROLES = ("out", "in", "through", "norm", "dw", "grouped", "heads", "param")
"""Slot roles: producer rows, consumer columns, BatchNorm parameters, LayerNorm parameters
(pruning them changes the normalisation statistics), depthwise conv groups, the output rows of a
grouped conv (whole groups only), attention heads, a bare parameter sliced along ``dim``."""


@dataclass
class Slot:
    """Positions of one layer tensor indexed by channel, with the label of each position."""

    module: str
    role: str
    ids: torch.Tensor
    attr: str = ""
    """For ``param`` slots, the parameter's attribute name; its sliced ``dim`` is ``dim``."""
    dim: int = 0


@dataclass
class Group:
    """Units coupled through shared slots: ranking and ``round_to`` apply within a group."""

    units: list[int]
    slots: list[Slot]
    heads: bool = False
    """True when the units are attention heads (``round_to`` does not apply to heads)."""


@dataclass
class DepGraph:
    """Labels, their union-find, and the slots that index layer tensors by label."""

    parent: list[int] = field(default_factory=lambda: [FROZEN])
    slots: dict[tuple[str, str, str], Slot] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def fresh(self, n: int) -> torch.Tensor:
        """Allocate ``n`` new labels (one per produced channel)."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, label: int) -> int:
        """Root of ``label``'s set (with path halving)."""
        parent = self.parent
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Declare the labels ``a[i]`` and ``b[i]`` equal for every position ``i``."""
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                # The smaller root wins, so FROZEN (0) absorbs every set it touches.
                lo, hi = min(rx, ry), max(rx, ry)
                self.parent[hi] = lo

    def freeze(self, ids: torch.Tensor) -> None:
        """Make every unit among ``ids`` unremovable."""
        self.union(ids, torch.zeros_like(ids))

    def roots(self, ids: torch.Tensor) -> torch.Tensor:
        """Root label of every position of ``ids``."""
        return torch.tensor([self.find(i) for i in ids.tolist()], dtype=torch.long)

    def add_slot(self, slot: Slot) -> None:
        """Record ``slot``; a second slot on the same tensor (a shared layer) must agree with it."""
        key = (slot.module, slot.role, slot.attr)
        seen = self.slots.get(key)
        if seen is None:
            self.slots[key] = slot
        elif seen.ids.numel() == slot.ids.numel():
            self.union(seen.ids, slot.ids)
        else:
            self.freeze(seen.ids)
            self.freeze(slot.ids)

    def groups(self) -> list[Group]:
        """Removable units, grouped by the slots they share (each unit in exactly one group).

        Consumer (``in``) slots do not link units: a layer reading a concatenation must not
        make its producers compete, or one of them could lose every channel.
        """
        per_slot = [
            (s, sorted(set(self.roots(s.ids).tolist()) - {FROZEN})) for s in self.slots.values()
        ]
        link: dict[int, int] = {}

        def top(u: int) -> int:
            while link.setdefault(u, u) != u:
                u = link[u]
            return u

        for slot, units in per_slot:
            if slot.role == "in":
                continue
            for u in units[1:]:
                ru, r0 = top(u), top(units[0])
                if ru != r0:
                    link[max(ru, r0)] = min(ru, r0)
            if units:
                top(units[0])
        by_top: dict[int, Group] = {}
        for slot, units in per_slot:
            for t in dict.fromkeys(top(u) for u in units):
                group = by_top.setdefault(t, Group([], []))
                group.slots.append(slot)
                group.heads |= slot.role == "heads"
        for u in link:
            by_top[top(u)].units.append(u)
        for g in by_top.values():
            g.units.sort()
        return list(by_top.values())
