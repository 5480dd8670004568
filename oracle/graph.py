"""The network as the oracle walks it: every layer of the spec, blocks opened up, in the order it runs.

A chain of layers is a chain of nodes, one per layer, node i named ``layers.{i}`` and reading node i − 1's
output. A residual block (``manual_bp.layers.Residual``) opens into its body's nodes (``layers.{i}.body.{j}``,
the first reading the block's input), its projection (``layers.{i}.projection``, reading the block's input),
and one *sum* node named ``layers.{i}``: z = (body's output) + (the block's input, or the projection's
output), followed by the block's activation. Every node has one δ (keyed by its name, as manual_bp's
``delta_names``) and owns the parameters named ``{name}.*`` of its own layer.

Every pass of the oracle (the twin, the rounding allowance, the measured noise, the conventions and the
localization) walks this list: a node reads ``src`` (−1: the input x) and, for a sum, adds ``skip``.
"""

from __future__ import annotations

from dataclasses import dataclass

RECURRENT = ("rnn", "lstm", "gru")  # the layer types that carry a state through time


@dataclass(frozen=True)
class Node:
    name: str             # "layers.3", "layers.1.body.0", "layers.1.projection": its δ's key and parameter prefix
    layer: object         # the layer; for a block's sum, the residual block itself
    src: int              # the node whose output this node reads (−1: the input x)
    skip: int | None      # a sum only: the node whose output it adds (−1: x)
    in_shape: tuple       # one example's input shape (for a sum: the body's output shape)
    param_names: tuple    # its parameters' full names (none for a sum: the block's live in its body)
    out_shape: tuple = ()  # one example's output shape (z's and δ's)

    @property
    def is_sum(self) -> bool:
        return self.skip is not None

    @property
    def activation(self):
        return self.layer.activation

    @property
    def label(self) -> str:
        """How messages name it: ``layer 3``, ``block 1 (sum)``, ``inside block 1, layer 2``, ``block 1's projection``."""
        return label(self.name, self.is_sum)


def label(name: str, is_sum: bool = False) -> str:
    parts = name.split(".")[1:]           # [i, "body", j, "body", k] / [i, "projection"]
    blocks, tail = [], parts[0]
    rest = parts[1:]
    while rest and rest[0] == "body":
        blocks.append(tail)
        tail, rest = rest[1], rest[2:]
    if rest and rest[0] == "projection":
        inside = ", ".join(f"block {b}" for b in blocks)
        return f"{'inside ' + inside + ', ' if blocks else ''}block {tail}'s projection"
    if is_sum:
        inside = ", ".join(f"block {b}" for b in blocks)
        return f"{'inside ' + inside + ', ' if blocks else ''}block {tail} (its sum)"
    if not blocks:
        return f"layer {tail}"
    return f"inside {', '.join(f'block {b}' for b in blocks)}, layer {tail}"


def nodes(spec) -> tuple[Node, ...]:
    """The spec's nodes in the order they run (computed once per spec)."""
    cached = getattr(spec, "_cache_oracle_nodes", None)
    if cached is not None:
        return cached
    out: list[Node] = []
    shapes = spec.param_shapes()

    def own(name):  # every parameter under the layer's name (attention's "out_proj.weight" too): a layer that is
        return tuple(k for k in shapes if k.startswith(name + "."))  # not a block holds no other layer's

    def walk(name, layer, src, in_shape) -> int:
        if layer.type != "residual":
            out.append(Node(name, layer, src, None, tuple(in_shape), own(name), tuple(layer.out_shape(in_shape))))
            return len(out) - 1
        inner = layer.body_shapes(in_shape)
        cur = src
        for j, sub in enumerate(layer.body):
            cur = walk(f"{name}.body.{j}", sub, cur, inner[j])
        skip = src
        if layer.projection is not None:
            out.append(Node(f"{name}.projection", layer.projection, src, None, tuple(in_shape), own(f"{name}.projection"),
                            tuple(inner[-1])))
            skip = len(out) - 1
        out.append(Node(name, layer, cur, skip, tuple(inner[-1]), (), tuple(inner[-1])))
        return len(out) - 1

    src = -1
    for i, layer in enumerate(spec.layers):
        src = walk(f"layers.{i}", layer, src, spec.in_shape(i))
    result = tuple(out)
    object.__setattr__(spec, "_cache_oracle_nodes", result)
    return result


def consumers(spec) -> dict[int, list[int]]:
    """For each node (and −1, the input x), the nodes that read its output (as src or as skip)."""
    out: dict[int, list[int]] = {}
    for k, node in enumerate(nodes(spec)):
        out.setdefault(node.src, []).append(k)
        if node.skip is not None:
            out.setdefault(node.skip, []).append(k)
    return out


def node_weights(weights: dict, node: Node) -> dict:
    """A node's parameters (and buffers) by short name, from ``{"layers.1.body.0.weight": ...}``: everything under
    its name (``out_proj.weight`` of an attention layer included); a block's sum owns none (they are its body's)."""
    if node.is_sum:
        return {}
    prefix = node.name + "."
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
