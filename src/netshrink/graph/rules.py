"""How labels flow through each kind of graph node (see :mod:`netshrink.graph.deps`).

A tensor's channel labels are a :class:`Chan`: the (negative) dimension that holds channels and
one label per position along it. Negative dimensions survive ops that add or drop leading
(batch, token) dimensions. Layers are handled by type (:meth:`Builder.module`), functions and
methods by name (:meth:`Builder.function`). Anything not understood freezes the labels it
receives, so a wrong model is impossible: at worst fewer channels are prunable, and the graph's
warnings say where.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from netshrink.graph.deps import DepGraph, Slot
from netshrink.graph.trace import is_attention, shape_of


@dataclass
class Chan:
    """Channel labels of a tensor: ``ids[i]`` labels position ``i`` along dimension ``dim``."""

    dim: int
    ids: torch.Tensor


@dataclass
class Param:
    """A parameter read by ``get_attr``; it joins the labels of the tensor it is combined with."""

    owner: str
    attr: str
    shape: tuple[int, ...]


ELEMENTWISE = {
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardswish", "leaky_relu", "elu",
    "relu6", "dropout", "contiguous", "clone", "float", "neg", "abs", "exp", "sqrt",
    "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "detach", "to",
}  # fmt: skip
BINARY = {"add", "sub", "mul", "truediv", "div", "iadd", "imul", "add_", "mul_"}
RESHAPE = {"flatten", "view", "reshape"}
REDUCE = {"mean", "sum", "amax", "amin"}
METADATA = {"size", "dim", "getattr", "numel"}
PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.LeakyReLU,
    nn.ELU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)  # fmt: skip


def _name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _arg(node: fx.Node, i: int, key: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


class Builder:
    """Walks a traced graph once, in order, filling a :class:`DepGraph`."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = DepGraph()
        self.info: dict[fx.Node, Any] = {}

    # -- helpers -----------------------------------------------------------------------------
    def get(self, value: Any) -> Any:
        if isinstance(value, fx.Node):
            return self.info.get(value)
        if isinstance(value, list | tuple):
            return [self.get(v) for v in value]
        return None

    def freeze_all(self, value: Any) -> None:
        """Freeze every label reachable from ``value``: a node, an info, or nested lists and
        dicts (a forward may return a dict of outputs)."""
        if isinstance(value, fx.Node):
            value = self.info.get(value)
        if isinstance(value, Chan):
            self.graph.freeze(value.ids)
        elif isinstance(value, list | tuple | dict):
            for item in value.values() if isinstance(value, dict) else value:
                self.freeze_all(item)

    def warn(self, node: fx.Node, what: str) -> None:
        labelled = any(isinstance(self.get(a), Chan) for a in node.all_input_nodes)
        if labelled:
            self.graph.warnings.append(f"{what}: channels feeding it are not pruned")

    def chan_at(self, value: Any, pos: int, ndim: int | None) -> Chan | None:
        """The labels of ``value`` when they sit at positive dimension ``pos``, else freeze."""
        info = self.get(value)
        if not isinstance(info, Chan):
            return None
        if ndim is not None and info.dim + ndim == pos:
            return info
        self.graph.freeze(info.ids)
        return None

    # -- walking -----------------------------------------------------------------------------
    def run(self) -> DepGraph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.info[node] = None
            elif node.op == "get_attr":
                owner, _, attr = node.target.rpartition(".")
                value = getattr(self.gm.get_submodule(owner), attr)
                keep = isinstance(value, nn.Parameter)
                self.info[node] = Param(owner, attr, tuple(value.shape)) if keep else None
            elif node.op == "call_module":
                self.info[node] = self.module(node, self.gm.get_submodule(node.target))
            elif node.op in ("call_function", "call_method"):
                self.info[node] = self.function(node)
            elif node.op == "output":
                self.freeze_all(list(node.args))
        return self.graph

    def module(self, node: fx.Node, m: nn.Module) -> Any:
        name = str(node.target)
        x = node.args[0] if node.args else None
        ndim = len(shape_of(x) or ()) or None
        out_ndim = len(shape_of(node) or ())
        g = self.graph
        if isinstance(m, PASS_MODULES):
            return self.get(x)
        if isinstance(m, nn.Flatten):
            return self.reshape(x, node)
        if isinstance(m, nn.Linear):
            chan = self.chan_at(x, (ndim or 0) - 1, ndim)
            if chan is not None:
                g.add_slot(Slot(name, "in", chan.ids))
            ids = g.fresh(m.out_features)
            g.add_slot(Slot(name, "out", ids))
            return Chan(-1, ids)
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            return self.conv(name, m, x, ndim, out_ndim)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            chan = self.chan_at(x, 1, ndim)
            if chan is not None:
                g.add_slot(Slot(name, "through", chan.ids))
            return chan
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            chan = self.chan_at(x, (ndim or 0) - 1, ndim)
            if chan is not None:
                g.add_slot(Slot(name, "norm", chan.ids))
            return chan
        if isinstance(m, nn.Embedding):
            ids = g.fresh(m.embedding_dim)
            g.add_slot(Slot(name, "out", ids))
            return Chan(-1, ids)
        if is_attention(m):
            return self.attention(name, m, node, x, ndim)
        if any(True for _ in m.parameters()):
            g.warnings.append(f"{name} ({type(m).__name__}) is not understood; left untouched")
        self.freeze_all(list(node.args))
        return None

    def conv(self, name: str, m: nn.Module, x: Any, ndim: int | None, out_ndim: int) -> Chan:
        assert isinstance(m, nn.Conv1d | nn.Conv2d)
        g = self.graph
        chan = self.chan_at(x, 1, ndim)
        dim = -(out_ndim - 1)
        if m.groups == 1:
            if chan is not None:
                g.add_slot(Slot(name, "in", chan.ids))
            ids = g.fresh(m.out_channels)
            g.add_slot(Slot(name, "out", ids))
            return Chan(dim, ids)
        if m.groups == m.in_channels:
            # Depthwise (with channel multiplier k = out / in): output channel j reads input
            # channel j // k only, so it carries that input's label.
            ids = chan.ids if chan is not None else torch.zeros(m.in_channels, dtype=torch.long)
            g.add_slot(Slot(name, "dw", ids))
            return Chan(dim, ids.repeat_interleave(m.out_channels // m.in_channels))
        # Grouped conv: group j reads input block j and writes output block j, and every group
        # must keep the same width, so a whole group is one unit: its input channels (pruned
        # upstream) and its output channels are merged into one label.
        ins = chan.ids if chan is not None else torch.zeros(m.in_channels, dtype=torch.long)
        ids = g.fresh(m.out_channels)
        for block_in, block_out in zip(ins.chunk(m.groups), ids.chunk(m.groups), strict=True):
            merged = torch.cat([block_in, block_out])
            g.union(merged, merged[:1].expand_as(merged))
        g.add_slot(Slot(name, "grouped", ids))
        return Chan(dim, ids)

    def attention(self, name: str, m: nn.Module, node: fx.Node, x: Any, ndim: int | None) -> Chan:
        g = self.graph
        chan = self.chan_at(x, (ndim or 0) - 1, ndim)
        for extra in node.all_input_nodes[1:]:
            self.freeze_all(extra)
        if chan is not None:
            for part in ("q", "k", "v"):
                g.add_slot(Slot(f"{name}.{part}", "in", chan.ids))
        heads = g.fresh(m.num_heads)  # type: ignore[arg-type]
        g.add_slot(Slot(name, "heads", heads))
        rows = heads.repeat_interleave(m.head_dim)  # type: ignore[arg-type]
        for part in ("q", "k", "v"):
            g.add_slot(Slot(f"{name}.{part}", "out", rows))
        g.add_slot(Slot(f"{name}.out", "in", rows))
        ids = g.fresh(m.out.out_features)  # type: ignore[union-attr]
        g.add_slot(Slot(f"{name}.out", "out", ids))
        return Chan(-1, ids)

    def function(self, node: fx.Node) -> Any:
        name = _name(node)
        x = node.args[0] if node.args else None
        if node.target is operator.getitem:
            return self.getitem(node)
        if name in METADATA or "tensor_meta" not in node.meta:
            return None  # shape queries and non-tensor results carry no channels
        if name in ELEMENTWISE:
            return self.get(x)
        if name in BINARY:
            return self.binary(node)
        if name in ("cat", "concat"):
            return self.cat(node)
        if name in ("split", "chunk"):
            return self.split(node, name)
        if name in RESHAPE:
            return self.reshape(x, node)
        if name in REDUCE:
            return self.reduce(node)
        if name in ("transpose", "permute"):
            return self.permute(node, name)
        if name in ("softmax", "log_softmax"):
            info, ndim = self.get(x), len(shape_of(x) or ())
            dim = _arg(node, 1, "dim", None)
            # Softmax over another dimension leaves channels independent.
            if isinstance(info, Chan) and dim is not None and dim % ndim != info.dim % ndim:
                return info
        self.warn(node, f"operation '{name}' ({node.name}) is not understood")
        self.freeze_all(list(node.args) + list(node.kwargs.values()))
        return None

    def getitem(self, node: fx.Node) -> Any:
        src, index = node.args
        info = self.get(src)
        if isinstance(info, list) and isinstance(index, int):
            return info[index]
        if not isinstance(info, Chan):
            return None
        # Tensor indexing that stops before the channel dimension keeps it (e.g. x[:, 0]).
        ndim = len(shape_of(src) or ())
        index = index if isinstance(index, tuple) else (index,)
        plain = all(isinstance(i, int | slice) for i in index)
        if plain and len(index) <= info.dim + ndim:
            return info
        self.graph.freeze(info.ids)
        return None

    def binary(self, node: fx.Node) -> Any:
        infos = [self.get(a) for a in node.args[:2]]
        chans = [i for i in infos if isinstance(i, Chan)]
        if len(chans) == 2:
            a, b = chans
            if a.dim == b.dim and a.ids.numel() == b.ids.numel():
                self.graph.union(a.ids, b.ids)  # a residual add: channel i of both is one unit
                return a
            self.freeze_all(chans)
            return None
        if not chans:
            return None
        chan = chans[0]
        other, other_node = next(
            ((i, a) for i, a in zip(infos, node.args[:2], strict=False) if i is not chan),
            (None, None),
        )
        other_shape = shape_of(other_node)
        if other_shape is None or len(other_shape) < -chan.dim or other_shape[chan.dim] == 1:
            return chan  # a scalar or a tensor broadcast along channels
        if isinstance(other, Param) and other.shape[chan.dim] == chan.ids.numel():
            dim = len(other.shape) + chan.dim
            self.graph.add_slot(Slot(other.owner, "param", chan.ids, attr=other.attr, dim=dim))
            return chan
        self.graph.freeze(chan.ids)
        return chan

    def cat(self, node: fx.Node) -> Any:
        parts = list(node.args[0])
        dim = _arg(node, 1, "dim", 0)
        out_shape = shape_of(node) or ()
        infos = [self.get(p) for p in parts]
        chans = [i for i in infos if isinstance(i, Chan)]
        if not chans:
            return None
        cdim = chans[0].dim
        if dim % len(out_shape) == cdim % len(out_shape):
            ids = []
            for part, info in zip(parts, infos, strict=True):
                if isinstance(info, Chan) and info.dim == cdim:
                    ids.append(info.ids)
                else:
                    self.freeze_all(info)
                    ids.append(torch.zeros((shape_of(part) or ())[cdim], dtype=torch.long))
            return Chan(cdim, torch.cat(ids))
        # Concatenation along another dimension (e.g. a class token before the patches):
        # every part's channel i is the same channel of the result.
        if len(chans) == len(parts) and all(c.dim == cdim for c in chans):
            for c in chans[1:]:
                self.graph.union(chans[0].ids, c.ids)
            return chans[0]
        self.freeze_all(chans)
        return None

    def split(self, node: fx.Node, name: str) -> Any:
        info = self.get(node.args[0])
        metas = node.meta.get("tensor_meta")
        if not isinstance(info, Chan) or not isinstance(metas, list | tuple):
            return None
        dim = _arg(node, 2, "dim", 0)  # split(x, sizes, dim) and chunk(x, n, dim)
        ndim = len(metas[0].shape)
        if dim % ndim != info.dim % ndim:
            return [info for _ in metas]
        sizes = [m.shape[info.dim] for m in metas]
        return [Chan(info.dim, ids) for ids in torch.split(info.ids, sizes)]

    def reshape(self, x: Any, node: fx.Node) -> Any:
        info, src, dst = self.get(x), shape_of(x), shape_of(node)
        if not isinstance(info, Chan) or src is None or dst is None:
            return None
        tail = -info.dim
        if len(dst) >= tail and dst[-tail:] == src[-tail:]:
            return info  # only leading dimensions change
        pos = len(src) + info.dim
        if dst[:pos] == src[:pos] and len(dst) == pos + 1:
            # Flatten of channel-major data: channel c owns positions c*S .. (c+1)*S - 1.
            return Chan(-1, info.ids.repeat_interleave(math.prod(src[pos + 1 :])))
        self.graph.freeze(info.ids)
        return None

    def reduce(self, node: fx.Node) -> Any:
        x = node.args[0]
        info, src = self.get(x), shape_of(x)
        dims = _arg(node, 1, "dim", None)
        if not isinstance(info, Chan) or src is None or dims is None:
            self.freeze_all(info)
            return None
        dims = {d % len(src) for d in (dims if isinstance(dims, list | tuple) else (dims,))}
        pos = len(src) + info.dim
        if pos in dims:
            self.graph.freeze(info.ids)
            return None
        keep = _arg(node, 2, "keepdim", False)
        new_pos = pos if keep else pos - sum(d < pos for d in dims)
        return Chan(new_pos - len(shape_of(node) or ()), info.ids)

    def permute(self, node: fx.Node, name: str) -> Any:
        x = node.args[0]
        info, src = self.get(x), shape_of(x)
        if not isinstance(info, Chan) or src is None:
            return None
        ndim = len(src)
        order = list(range(ndim))
        if name == "transpose":
            a, b = (d % ndim for d in node.args[1:3])
            order[a], order[b] = order[b], order[a]
        else:
            dims = node.args[1:]
            order = [d % ndim for d in (dims[0] if isinstance(dims[0], list | tuple) else dims)]
        return Chan(order.index(ndim + info.dim) - ndim, info.ids)


def build_graph(gm: fx.GraphModule) -> DepGraph:
    """Fill a :class:`DepGraph` from a graph traced by :func:`netshrink.graph.trace`."""
    return Builder(gm).run()
