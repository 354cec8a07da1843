"""Per-layer scores: inner products and squared norms of gradient representations, split by the layer that owns
each parameter. The parts of a representation already hold disjoint sets of parameters, so each layer's share is
computed from the same parts as the total (a factored layer stays factored) and the shares sum to it exactly.

A parameter's layer is the module that owns it: its name without the last component (``"encoder.0.fc1.weight"``
-> ``"encoder.0.fc1"``). A parameter held directly by the root ``nn.Module`` (``"logit_scale"``, or ``"weight"``
of a bare ``nn.Linear``) belongs to the root, named ``""`` as in ``named_modules()``. A pure function ``f(params,
*inputs)`` has no modules: its dotted keys group the same way (``"fc1.w"`` -> ``"fc1"``) and a key without a dot
is a layer of its own (``"w1"`` -> ``"w1"``).

Example:
    >>> layer_of("encoder.0.fc1.weight", module=True), layer_of("logit_scale", module=True)
    ('encoder.0.fc1', '')
    >>> layer_of("w1", module=False), layer_of("fc1.w", module=False)
    ('w1', 'fc1')
    >>> layer_order(["fc1.weight", "fc2.weight", "fc1.bias"], module=True)
    ('fc1', 'fc2')
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ._representations import Deferred, Dense, Part, Representation, Zero, lowered


def layer_of(name: str, *, module: bool) -> str:
    """The layer of parameter ``name``: its owning module's name (``""`` for the root of an ``nn.Module``); a pure
    function's key without a dot is its own layer."""
    owner, dot, _ = name.rpartition(".")
    return owner if dot or module else name


def layer_order(names: Sequence[str], *, module: bool) -> tuple[str, ...]:
    """The layers of ``names``, in the order of their first parameter."""
    return tuple(dict.fromkeys(layer_of(n, module=module) for n in names))


def _pieces(a: Representation, b: Representation, module: bool) -> Iterator[tuple[str, Part, Part]]:
    """``(layer, part of a, matching part of b)``: a part of one layer whole (factored, or deferred: matched by the
    test side's formed copy), a dense part split by layer, unused parameters (zero) once per layer."""
    for p, q in zip(a.parts, b.parts):
        if isinstance(p, Zero):  # unused parameters: zero, for each of their layers
            yield from ((layer, p, q) for layer in layer_order(list(p.shapes), module=module))
            continue
        if not isinstance(p, Dense) or isinstance(q, Deferred):
            layers = layer_order(list(q.site.names), module=module)
            if len(layers) == 1:
                yield layers[0], p, q  # one layer's weight and bias
                continue
            # a parametrized weight's tensors (``fc.parametrizations.weight``) and its layer's bias: split by name
            p, q = Dense(p.materialize()), Dense(q.materialize())
        groups: dict[str, list[str]] = {}
        for name in p.grads:
            groups.setdefault(layer_of(name, module=module), []).append(name)
        assert isinstance(q, Dense)
        for layer, names in groups.items():
            yield layer, Dense({n: p.grads[n] for n in names}), Dense({n: q.grads[n] for n in names})


def _summed(rep: Representation, terms: Iterator[tuple[str, torch.Tensor]], module: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor | None] = dict.fromkeys(layer_order(rep.names, module=module))
    for layer, value in terms:
        previous = out[layer]
        out[layer] = value if previous is None else previous + value
    return {layer: value for layer, value in out.items() if value is not None}


def dots_by_layer(a: Representation, b: Representation, *, module: bool) -> dict[str, torch.Tensor]:
    """``{layer: [Ba, Bb]}`` inner products restricted to each layer's parameters; they sum to ``a.dot(b)``."""
    dots = _summed(a, ((layer, p.dot(q)) for layer, p, q in _pieces(a, b, module)), module)
    return lowered(dots, a.lift + b.lift, lambda: dots_by_layer(a.unlifted(), b.unlifted(), module=module))


def sq_norms_by_layer(rep: Representation, *, module: bool) -> dict[str, torch.Tensor]:
    """``{layer: [B]}`` squared gradient norms restricted to each layer; they sum to ``rep.sq_norm()``."""
    norms = _summed(rep, ((layer, p.sq_norm()) for layer, p, _ in _pieces(rep, rep, module)), module)
    return lowered(norms, 2 * rep.lift, lambda: sq_norms_by_layer(rep.unlifted(), module=module))


def sum_by_layer(per_name: dict[str, torch.Tensor], *, module: bool) -> dict[str, torch.Tensor]:
    """``{layer: sum of the values of its parameters}`` from ``{name: value}``, layers in first-parameter order."""
    out: dict[str, torch.Tensor] = {}
    for name, value in per_name.items():
        layer = layer_of(name, module=module)
        out[layer] = value if layer not in out else out[layer] + value
    return out
