"""Site roles read from an fx graph (and block positions from execution order).

Graph roles of a norm node:
  - ``after-3x3`` / ``after-depthwise`` (groups == in_channels > 1) / ``after-1x1`` /
    ``after-spatial`` (any k > 1): the conv producing the norm's input, reached backwards through
    trivial nodes only (identity, dropout, pad, layout changes such as permute/flatten).
  - ``before-spatial``: the output reaches a k > 1 conv through unary nodes only (activations,
    dropout, drop path, layer scale, identity).
  - ``before-residual-add``: the output reaches a two-input add through unary nodes, the other
    operand does not depend on the norm, and the norm's operand is the heavier branch (more ops
    since the two branches forked). A norm on the lighter branch (ResNet ``downsample.1``) is a
    *shortcut* norm and gets no position in its block.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Mapping

import torch
from torch import fx, nn

__all__ = ["ROLES", "graph_roles", "position_roles"]

ROLES: tuple[str, ...] = (
    "after-3x3",
    "after-depthwise",
    "after-1x1",
    "after-spatial",
    "before-spatial",
    "before-residual-add",
    "first-in-block",
    "middle-in-block",
    "last-in-block",
)

_LAYOUT = {"contiguous", "permute", "transpose", "flatten", "reshape", "view", "to", "float"}
_TRIVIAL_FNS = _LAYOUT | {"pad", "dropout", "dropout1d", "dropout2d", "dropout3d", "clone"}
_UNARY_FNS = _TRIVIAL_FNS | {
    *("relu", "relu_", "relu6", "gelu", "silu", "swish", "mish", "tanh", "sigmoid", "elu"),
    *("hardsigmoid", "hard_sigmoid", "hardswish", "hard_swish", "leaky_relu", "drop_path"),
    *("mul", "mul_", "div", "div_", "truediv"),
}
_ADDS = {operator.add, operator.iadd, torch.add}
_TRIVIAL_MODULE_FILES = ("torch.nn.modules.dropout", "torch.nn.modules.padding")
_UNARY_MODULE_FILES = ("torch.nn.modules.activation", "timm.layers.activations", "timm.layers.drop")


def _fn_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


class _Graph:
    """Ancestor bitsets over one graph, for branch and data-dependence questions."""

    def __init__(self, graph: fx.Graph, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.anc: dict[fx.Node, int] = {}
        self.placeholders = self.ops = 0
        for i, node in enumerate(graph.nodes):
            bits = 1 << i
            for inp in node.all_input_nodes:
                bits |= self.anc[inp]
            self.anc[node] = bits
            if node.op == "placeholder":
                self.placeholders |= 1 << i
            elif node.op in ("call_module", "call_function", "call_method"):
                self.ops |= 1 << i

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        """Inputs that depend on the model input (not parameter-only expressions)."""
        return [n for n in node.all_input_nodes if self.anc[n] & self.placeholders]

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def _passes(self, node: fx.Node, fns: set[str], module_files: tuple[str, ...]) -> bool:
        if node.op == "call_module":
            m = self.module(node)
            if m is None or isinstance(m, nn.MultiheadAttention):
                return False
            kind = type(m).__module__
            return (
                isinstance(m, nn.Identity)
                or kind.startswith(module_files)
                or ("LayerScale" in type(m).__name__ and module_files is _UNARY_MODULE_FILES)
            )
        if node.op in ("call_function", "call_method"):
            return _fn_name(node) in fns and len(self.data_inputs(node)) == 1
        return False

    def is_trivial(self, node: fx.Node) -> bool:
        return self._passes(node, _TRIVIAL_FNS, _TRIVIAL_MODULE_FILES)

    def is_unary(self, node: fx.Node) -> bool:
        files = _TRIVIAL_MODULE_FILES + _UNARY_MODULE_FILES
        return self.is_trivial(node) or self._passes(node, _UNARY_FNS, files)

    def producer(self, node: fx.Node) -> fx.Node | None:
        """The node producing ``node``'s data input, skipping trivial nodes."""
        inputs = self.data_inputs(node)
        return self.resolve(inputs[0] if inputs else None)

    def resolve(self, node: fx.Node | None) -> fx.Node | None:
        """``node``, or the first node before it that is not trivial."""
        while node is not None and self.is_trivial(node):
            inputs = self.data_inputs(node)
            node = inputs[0] if inputs else None
        return node

    def convs(self, node: fx.Node | None) -> list[nn.Module]:
        """The convolutions whose output ``node`` is: its module, or for a ``torch.cat`` of
        convolutions' outputs (timm's MixedConv2d: one kernel size per channel group) all of
        them; none otherwise."""
        if node is None:
            return []
        m = self.module(node)
        if _is_conv(m):
            return [m]
        if node.op != "call_function" or node.target is not torch.cat:
            return []
        parts = [self.module(self.resolve(n)) for n in self.data_inputs(node)]
        return parts if parts and all(_is_conv(m) for m in parts) else []

    def feeds_spatial_conv(self, node: fx.Node) -> bool:
        """Whether ``node`` is a k > 1 convolution, or splits its input into some (MixedConv2d's
        ``torch.split``, each part through a convolution)."""
        m = self.module(node)
        if _is_conv(m):
            return any(k > 1 for k in _kernel(m))
        if _fn_name(node) not in ("split", "chunk", "tensor_split"):
            return False
        items = [u for u in node.users if _fn_name(u) == "getitem"]
        return any(self.feeds_spatial_conv(user) for item in items for user in item.users)

    def frontier(self, node: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
        """(consumer, operand) pairs reached from ``node`` through unary nodes only."""
        out, todo, seen = [], [node], {node}
        while todo:
            current = todo.pop()
            for user in current.users:
                if self.is_unary(user):
                    if user not in seen:
                        seen.add(user)
                        todo.append(user)
                else:
                    out.append((user, current))
        return out

    def branch_weight(self, a: fx.Node, b: fx.Node) -> int:
        """Ops that ``a`` depends on and ``b`` does not (the work since the branches forked)."""
        return (self.anc[a] & ~self.anc[b] & self.ops).bit_count()


def _is_conv(m: nn.Module | None) -> bool:
    """torch's convolutions, and modules that are one by their attributes (timm's CondConv2d,
    a mixture of expert kernels applied as one grouped ``F.conv2d``)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return True
    return m is not None and all(hasattr(m, a) for a in ("kernel_size", "groups", "in_channels"))


def _kernel(conv: nn.Module) -> tuple[int, ...]:
    size = conv.kernel_size
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size),)


def _conv_roles(convs: list[nn.Module]) -> set[str]:
    """The roles after these convolutions' outputs (several: MixedConv2d's channel groups)."""
    kernels = [k for conv in convs for k in _kernel(conv)]
    roles = {"after-spatial"} if any(k > 1 for k in kernels) else {"after-1x1"}
    if all(k == 3 for k in kernels):
        roles.add("after-3x3")
    if all(conv.groups == conv.in_channels > 1 for conv in convs):
        roles.add("after-depthwise")
    return roles


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in ("add", "add_")


def _site_roles(g: _Graph, norm: fx.Node) -> tuple[set[str], bool]:
    roles: set[str] = set()
    convs = g.convs(g.producer(norm))
    if convs:
        roles |= _conv_roles(convs)
    shortcut = False
    for user, operand in g.frontier(norm):
        if g.feeds_spatial_conv(user):
            roles.add("before-spatial")
        data = g.data_inputs(user)
        if not _is_add(user) or len(data) != 2:
            continue
        other = data[1] if data[0] is operand else data[0]
        if g.anc[other] & g.anc[norm] == g.anc[norm]:  # the other operand uses the norm too
            continue
        if g.branch_weight(operand, other) > g.branch_weight(other, operand):
            roles.add("before-residual-add")
        else:
            shortcut = True
    return roles, shortcut


def graph_roles(
    graph: fx.Graph, modules: Mapping[str, nn.Module], norm_nodes: Mapping[str, fx.Node]
) -> tuple[dict[str, set[str]], set[str]]:
    """Graph roles of every traced site.

    Args:
        graph: Graph from :func:`an_search.rewrite.tracer.trace_model`.
        modules: ``dict(model.named_modules())``.
        norm_nodes: Site name -> its (first) ``call_module`` node.

    Returns:
        (site name -> roles, names of shortcut-branch sites).
    """
    g = _Graph(graph, modules)
    roles: dict[str, set[str]] = {}
    shortcuts: set[str] = set()
    for name, node in norm_nodes.items():
        roles[name], is_shortcut = _site_roles(g, node)
        if is_shortcut:
            shortcuts.add(name)
    return roles, shortcuts


def position_roles(
    blocks: Mapping[str, str | None], order: Mapping[str, int], skip: Collection[str] = ()
) -> dict[str, set[str]]:
    """first/middle/last-in-block by execution order; sites in ``skip`` get no position.

    A block with one ranked site gives it both ``first-in-block`` and ``last-in-block``.
    """
    members: dict[str, list[str]] = {}
    for name, block in blocks.items():
        if block is not None and name not in skip:
            members.setdefault(block, []).append(name)
    out: dict[str, set[str]] = {}
    for names in members.values():
        names.sort(key=lambda n: order[n])
        for i, name in enumerate(names):
            pos = set()
            if i == 0:
                pos.add("first-in-block")
            if i == len(names) - 1:
                pos.add("last-in-block")
            out[name] = pos or {"middle-in-block"}
    return out
