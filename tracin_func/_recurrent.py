"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells) as factor sites: run as unrolled cells on
the call's private copy; and the one mechanism that runs layers unrolled (also ``nn.MultiheadAttention``:
``_attention``; ``nn.EmbeddingBag``: ``_bags``).

vmap has no batching rule for the fused RNN op, so these layers would go through the per-example loop. Unrolled,
each layer and direction is two Linear-like products: the input-to-hidden product ``x_t W_ih^T + b_ih`` (applied to
the whole sequence at once) and the hidden-to-hidden product ``h_{t-1} W_hh^T + b_hh`` (one per time step). The
per-example gradient of each weight is then a sum over time steps of outer products, ``weight_ih = sum_t G_t x_t^T``,
``weight_hh = sum_t G_t h_{t-1}^T``, biases ``sum_t G_t``: a Linear site with ``T`` rows per example, whose ``G`` is
the gradient at the product's own output (for a GRU's ``n`` gate: before the multiplication by ``r``). An LSTM's and a
plain RNN's step adds the two products, whose gradients are then the same: the batched pass takes the hidden-to-hidden
product's at the input products, in one call for every step (``_gates_stand_in``); for a few examples (planning's
lone examples, a small batch) the steps then run in torch's fused kernel, fed the input products through an
identity input weight (``_fused_steps``).

A cell (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``), called once per step by the model's own loop, is one step
of the same: its two products are Linear-like sites called once per step, one row per example each.

A ``PackedSequence`` is unrolled padded, in the batch's own order: a step past an example's end leaves its state as
it was (``torch.where``), so that the gradients of its products there are exactly zero and the last state is the one
at the example's end. Every example runs as many steps as the batch's longest, and the batching check accepts the
rows of zero gradient this adds (``_batching._same_live_rows``).

Only the exact classes (their own forward, no hooks or parametrizations, ``proj_size`` 0, no active dropout) are
unrolled, and only on batched inputs (``[B, T, d]``, ``[T, B, d]`` or packed; a cell's ``[B, d]``): on an unbatched
input the fused op runs and the layer keeps the dense route (planning sees no product called). Each product of a
layer is a :class:`~tracin_func._layers.Site` whose ``owner`` is the layer's path and whose ``path`` is
``"<owner>.ih_l0"``, ``"<owner>.hh_l1_reverse"``, ... (a cell's ``"<owner>.ih"``, ``"<owner>.hh"``;
``"<owner>.in_proj"`` for attention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch._C._functorch import peek_interpreter_stack
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ._attention import attention_forward, attention_sites
from ._attention import why_not_unrolled as why_not_attention
from ._bags import bag_forward, bag_sites
from ._bags import why_not_unrolled as why_not_bag
from ._context import full_float32_products
from ._layers import Hook, Site, UnrolledForward, Weights, global_hooks_present, not_exactly, product
from ._state import put_back_forwards

# (layer, lengths) of each unrolled call on a PackedSequence inside a `packed_calls` block of this context
_PACKED: ContextVar[list[tuple[nn.Module, torch.Tensor]] | None] = ContextVar("_PACKED", default=None)

_LAYERS = (nn.LSTM, nn.GRU, nn.RNN)
_CELLS = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)
_CLASSES = _LAYERS + _CELLS


def unrollable(module: nn.Module) -> bool:
    """Whether ``module`` is a plain recurrent layer or cell that the unrolled cells reproduce exactly."""
    return type(module) in _CLASSES and not why_not_unrolled(module)


def why_not_unrolled(module: nn.Module) -> str:
    """Why a recurrent layer is not run as unrolled cells, or ``""``."""
    name = type(module).__name__
    base = next((cls for cls in _CLASSES if isinstance(module, cls)), None)
    if base is None:
        return f"{name} has no unrolled form (only nn.LSTM, nn.GRU, nn.RNN and their cells)"
    if not_exactly(module, base):
        return not_exactly(module, base)
    own = module._flat_weights_names if isinstance(module, nn.RNNBase) else ["weight_ih", "weight_hh"]
    if any(module._parameters.get(n) is None for n in own):
        return f"{name}'s weights are not all its own parameters (a wrapper sets them, like AWD-LSTM's WeightDrop)"
    if getattr(module, "proj_size", 0):
        return f"{name} with proj_size > 0 has no unrolled form"
    if module.training and getattr(module, "dropout", 0) > 0 and module.num_layers > 1:
        return f"{name} has dropout between layers in training mode"
    return ""


def recurrent_sites(model: nn.Module, diff_names: Any) -> dict[str, Site]:
    """The products of unrollable layers (recurrent ones and cells; attention in-projections: ``_attention``;
    EmbeddingBag lookups: ``_bags``) holding differentiated parameters, keyed by site path.

    A layer sharing a parameter tensor with another module (or with itself) is left to the dense path."""
    if global_hooks_present():
        return {}
    diff = set(diff_names)
    users: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    sites: dict[str, Site] = {**attention_sites(model, diff, users), **bag_sites(model, diff, users)}
    for path, module in model.named_modules():
        if not unrollable(module):
            continue
        own = [p for p in module._parameters.values() if p is not None]  # (a cell without bias holds None)
        if any(users[id(p)] > 1 for p in own) or len({id(p) for p in own}) < len(own):
            continue
        prefix = f"{path}." if path else ""
        for key in _product_keys(module):
            weight, bias = f"{prefix}weight_{key}", f"{prefix}bias_{key}"
            weight = weight if weight in diff else None
            bias = bias if module.bias and bias in diff else None
            if weight or bias:
                shape = tuple(getattr(module, f"weight_{key}").shape)
                sites[prefix + key] = Site(prefix + key, "linear", weight, bias, shape, owner=path)
    return sites


def _product_keys(module: nn.Module) -> list[str]:
    """The names of a layer's products: ``ih_l0``, ``hh_l0``, ``ih_l0_reverse``, ... (a cell's ``ih``, ``hh``)."""
    if isinstance(module, _CELLS):
        return ["ih", "hh"]
    directions = ("", "_reverse")[: 1 + module.bidirectional]
    layers = range(module.num_layers)
    return [f"{kind}_l{layer}{suffix}" for layer in layers for suffix in directions for kind in ("ih", "hh")]


@contextmanager
def unrolled(modules: Mapping[str, nn.Module], hooks: Mapping[str, Hook]) -> Iterator[None]:
    """Run the layers owning the products named in ``hooks`` (site paths) unrolled (recurrent layers as cells,
    attention with its in-projection a product, a bag as its lookup), each product's output passed through its hook
    (forward-hook convention: ``hook(weights, (input,), output)``).

    The unrolled forward is set on the module object for the block only (the call's private copy); a forward set
    before (``recurrent_unrolled``'s, without hooks) is set again after it."""
    by_owner: dict[str, dict[str, Hook]] = {}
    for path, hook in hooks.items():
        owner, _, key = path.rpartition(".")
        by_owner.setdefault(owner, {})[key] = hook
    with _forwards({owner: modules[owner] for owner in by_owner}, by_owner):
        yield


@contextmanager
def recurrent_unrolled(model: nn.Module) -> Iterator[None]:
    """Run every unrollable recurrent layer and cell of ``model`` (the call's private copy) as unrolled cells within
    the block, without hooks: the same function as the fused op, which has no vmap rule and, in cuDNN (on a GPU), no
    backward in eval mode, so that the dense paths (vmap, the per-example loop) run these layers on every device.
    Where the fused op serves (``_fused_serves``: no gradient taken, or the CPU outside torch.func's transforms) a
    layer keeps it."""
    layers = {path: m for path, m in model.named_modules() if unrollable(m)}
    with _forwards(layers, {path: _HOOKLESS for path in layers}):
        yield


@contextmanager
def _forwards(modules: Mapping[str, nn.Module], hooks: Mapping[str, Mapping[str, Hook]]) -> Iterator[None]:
    """Each module at a path of ``hooks`` runs its unrolled form with those products' hooks within the block."""
    installed: list[tuple[nn.Module, Any]] = []
    try:
        for owner, products in hooks.items():
            module = modules[owner]
            why_not, forward = _unrolled_form(module)
            if why_not(module):
                raise RuntimeError(f"Layer {owner!r} cannot be run unrolled.")
            installed.append((module, vars(module).get("forward")))
            object.__setattr__(module, "forward", UnrolledForward(_own_under_autocast(forward), module, products))
        yield
    finally:
        put_back_forwards(installed)


def _own_under_autocast(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` (an unrolled form), but the layer's own where it runs under ``torch.autocast`` the model enters
    (not on float64 tensors, which autocast leaves alone): the unrolled ops round otherwise than its kernels under it
    (an EmbeddingBag's weighted sum ran in bfloat16 where torch's stays float32: 2e-3 off, silently, in batches of
    one; a GRU's steps mixed bfloat16 and float32 in a raw error). Its factors are then refused: every gradient is
    taken per example."""

    def run(module: nn.Module, hooks: Mapping[str, Hook], *args: Any, **kwargs: Any) -> Any:
        tensor = next(module.parameters(), None)
        if tensor is None or tensor.dtype == torch.float64 or not torch.is_autocast_enabled(tensor.device.type):
            return forward(module, hooks, *args, **kwargs)
        if hooks is not _HOOKLESS:
            from ._capture import autocast_refusal  # (not at the top: ``_capture`` imports this module)

            raise autocast_refusal(f"layer {type(module).__name__}")
        return type(module).forward(module, *args, **kwargs)

    return run


@contextmanager
def packed_calls() -> Iterator[list[tuple[nn.Module, torch.Tensor]]]:
    """The layers run unrolled on a ``PackedSequence`` inside the block, with each call's lengths (in the batch's
    order): planning unrolls them on the batched path only (alone, an example takes as many steps as its length),
    and checks that the first examples' lengths differ."""
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    token = _PACKED.set(calls)
    try:
        yield calls
    finally:
        _PACKED.reset(token)


_HOOKLESS: Mapping[str, Hook] = MappingProxyType({})  # the products of ``recurrent_unrolled``'s layers
UNROLLED_KINDS = (nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention, nn.EmbeddingBag)  # layers with a form here


def why_not_run_unrolled(module: nn.Module) -> str:
    """Why a layer of one of the ``UNROLLED_KINDS`` is not run unrolled, or ``""``."""
    return _unrolled_form(module)[0](module)


def _unrolled_form(module: nn.Module) -> tuple[Callable[[nn.Module], str], Callable[..., Any]]:
    """``(why_not_unrolled, unrolled forward)`` of a layer that has an unrolled form."""
    if isinstance(module, nn.MultiheadAttention):
        return why_not_attention, attention_forward
    if isinstance(module, nn.EmbeddingBag):
        return why_not_bag, bag_forward
    return why_not_unrolled, _cell_forward if isinstance(module, _CELLS) else _forward


def _forward(module: nn.RNNBase, hooks: Mapping[str, Hook], input: Any, hx: Any = None) -> Any:
    """``module``'s forward as unrolled cells, on a padded input or a ``PackedSequence``; the fused op's own forward
    on an unbatched input."""
    lstm = isinstance(module, nn.LSTM)
    states = hx if lstm and hx is not None else (hx,)
    packed = isinstance(input, PackedSequence)
    plain = packed or isinstance(input, torch.Tensor) and input.dim() == 3 and input.numel() > 0
    # without hooks (``recurrent_unrolled``) the fused op runs wherever it serves (``_fused_serves``), and on a
    # PackedSequence under torch.func's transforms (vmap, grad), where `pad_packed_sequence` cannot read the batch
    # sizes the model's own packing made (the fused op fails alike, and the plain loop runs it)
    transformed_packing = packed and peek_interpreter_stack() is not None
    fused = hooks is _HOOKLESS and (transformed_packing or _fused_serves(input.data if packed else input))
    if not plain or any(s is not None and s.dim() != 3 for s in states) or fused:
        return type(module).forward(module, input, hx)
    if packed:  # padded in the batch's own order (as the states given and returned are), steps past an end held
        x, lengths = pad_packed_sequence(input, batch_first=True)
        alive = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(x.device)  # [B, T] (lengths on the CPU)
        noted = _PACKED.get()
        if noted is not None:
            noted.append((module, lengths))
    else:
        x, alive = input if module.batch_first else input.transpose(0, 1), None  # [B, T, d]
    output, h_n, c_n = _layers(module, hooks, x, hx, alive)
    if packed:
        order = input.sorted_indices
        rows = (output if order is None else output[order]).transpose(0, 1)  # [T, B, D H] by decreasing length
        kept = (alive if order is None else alive[order]).t()
        output = PackedSequence(rows[kept], input.batch_sizes, order, input.unsorted_indices)  # the packed order
    elif not module.batch_first:
        output = output.transpose(0, 1)
    return (output, (h_n, c_n)) if lstm else (output, h_n)


def _layers(
    module: nn.RNNBase, hooks: Mapping[str, Hook], x: torch.Tensor, hx: Any, alive: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(output [B, T, directions * H], h_n, c_n)`` of the layers unrolled over ``x [B, T, d]``. Where ``alive
    [B, T]`` is False (past an example's end) a step leaves the state as it was: its products' output gradients are
    exactly zero there, and each direction's last state is the one at the example's own end (its start, reversed)."""
    lstm = isinstance(module, nn.LSTM)
    n, size = x.shape[0], module.hidden_size
    directions = 2 if module.bidirectional else 1
    if hx is None:
        zeros = x.new_zeros(module.num_layers * directions, n, size)
        h0, c0 = zeros, zeros
    else:
        h0, c0 = hx if lstm else (hx, None)  # [layers * directions, B, H], batch_first or not
    live = None if alive is None else alive[:, :, None].unbind(1)  # [B, 1] per step
    last_h, last_c = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            key = f"_l{layer}{'_reverse' if direction else ''}"
            w_ih, w_hh = getattr(module, f"weight_ih{key}"), getattr(module, f"weight_hh{key}")
            b_ih = getattr(module, f"bias_ih{key}") if module.bias else None
            b_hh = getattr(module, f"bias_hh{key}") if module.bias else None
            xi = product(hooks, f"ih{key}", x, w_ih, b_ih)  # [B, T, gates * H]: the whole sequence at once
            joint = _gates_stand_in(module, hooks.get(f"hh{key}"), xi)
            h = h0[layer * directions + direction]
            c = c0[layer * directions + direction] if lstm else None
            reverse = bool(direction)
            if joint and alive is None and _fused_steps_serve(xi):
                out, prior, h, c = _fused_steps(module, xi, w_hh, b_hh, h, c, reverse)
            else:
                out, prior, h, c = _unrolled_steps(module, hooks, key, xi, w_hh, b_hh, h, c, live, reverse, joint)
            if joint:  # one call for every step: the hidden inputs, and the gates' sum (``xi``) for its output
                if hooks[f"hh{key}"](Weights(w_hh, b_hh), (prior,), xi) is not None:
                    raise RuntimeError(f"the hidden-to-hidden product of {key!r} was not followed at its gates")
            outputs.append(out)
            last_h.append(h)
            last_c.append(c)
        x = outputs[0] if directions == 1 else torch.cat([o.transpose(0, 1) for o in outputs], 2).transpose(0, 1)
        if module.training and module.dropout > 0 and layer < module.num_layers - 1:  # refused by `unrollable`
            raise RuntimeError("dropout between recurrent layers in training mode is not unrolled")
    return x, torch.stack(last_h), torch.stack(last_c) if lstm else None


def _unrolled_steps(
    module: nn.RNNBase,
    hooks: Mapping[str, Hook],
    key: str,
    xi: torch.Tensor,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    h: torch.Tensor,
    c: torch.Tensor | None,
    live: Any,
    reverse: bool,
    joint: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(output [B, T, H], the hidden inputs [B, T, H] where ``joint``, h_n, c_n)`` of layer and direction ``key``
    stepped one time step at a time from its input products ``xi``, each hidden-to-hidden product passed through
    ``hooks["hh" + key]`` but where ``joint`` (its hook called once for all steps, by ``_layers``; ``live``: per step,
    the examples still running, or None)."""
    step_hooks = {} if joint else hooks
    steps = xi.shape[1]
    inputs, out, prior = xi.unbind(1), [None] * steps, [None] * steps
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        prior[t] = h  # the step's hidden input, by time
        hh = product(step_hooks, f"hh{key}", h, w_hh, b_hh)  # [B, gates * H]: G taken here (joint: at xi)
        stepped, c_stepped = _step(module, inputs[t], hh, h, c)
        if live is None:
            h, c = stepped, c_stepped
        else:
            h = torch.where(live[t], stepped, h)
            c = torch.where(live[t], c_stepped, c) if c is not None else None
        out[t] = h
    # (the output laid out by time, as torch's layers give it: `out[:, -1].view(...)` runs on it)
    return torch.stack(out).transpose(0, 1), torch.stack(prior, 1) if joint else None, h, c


def _gates_stand_in(module: nn.RNNBase, hook: Hook | None, xi: torch.Tensor) -> bool:
    """Whether the hidden-to-hidden product's hook is called once for every step, its output gradient taken at the
    input-to-hidden products ``xi``: an LSTM's and a plain RNN's step adds the two products, so the gradients at their
    outputs are the same (a GRU multiplies its ``n`` gate's hidden product by ``r``). Where the hook takes a stand-in
    output (the batched pass's: ``_capture.batched_factors``), which must have a lasting place in the graph. One call
    instead of one per step: the LSTM classifier's influence (200 x 20, 3 checkpoints) 155-167 -> 143-151 ms."""
    from ._grads import lasting_edge  # (not at the top: ``_grads`` imports this module through ``_loss``)

    if isinstance(module, nn.GRU) or not getattr(hook, "takes_stand_in", False) or not xi.requires_grad:
        return False
    return lasting_edge(xi) is not None


# the most examples whose steps the fused op runs (below): above it, its [gates H]^2 product per step costs more than
# the unrolled steps' dispatches save (a 64 -> 64 LSTM over 32 steps, float32, one thread, forward and backward: 1
# example 0.77 against 3.11 ms, 6 1.36 / 3.45, 20 3.14 / 4.33, 50 6.80 / 5.60)
_FUSED_STEPS_MAX_BATCH = 16


def _fused_steps_serve(xi: torch.Tensor) -> bool:
    """Whether ``_fused_steps`` runs a few examples' steps (planning's lone examples, a small batch) exactly and
    faster than unrolled: torch's fused float32 CPU kernel (oneDNN's where enabled), outside torch.func's transforms
    and ``torch.compile``, its matrix products at full precision (a lower one, globally or oneDNN's recurrent layers'
    own, would round the input products), every input product finite (an infinite one times the identity's zeros is
    NaN)."""
    return (
        not torch.compiler.is_compiling()  # (the checks below would break its graph; it compiles the steps itself)
        and xi.shape[0] <= _FUSED_STEPS_MAX_BATCH
        and xi.dtype == torch.float32
        and xi.device.type == "cpu"
        and full_float32_products("matmul", "rnn")
        and peek_interpreter_stack() is None
        and bool(torch.isfinite(xi).all())
    )


def _fused_steps(
    module: nn.RNNBase,
    xi: torch.Tensor,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    h: torch.Tensor,
    c: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``_unrolled_steps``' ``(output, hidden inputs, h_n, c_n)`` of one layer and direction of an LSTM or
    plain RNN whose input products ``xi [B, T, gates H]`` are given: the fused op's steps on ``xi`` through an identity
    input-to-hidden weight, so that the gradient it passes to ``xi`` is the gates' (the identity's products are exact:
    each gate's one nonzero term times 1). The steps' ops run in one kernel instead of a dozen dispatches each."""
    gates = xi.shape[-1]
    eye, zeros = torch.eye(gates, dtype=xi.dtype, device=xi.device), xi.new_zeros(gates)
    weights = [eye, w_hh] + ([zeros, b_hh] if b_hh is not None else [])
    steps = xi.flip(1) if reverse else xi
    if isinstance(module, nn.LSTM):
        out, h_n, c_n = torch._VF.lstm(steps, (h[None], c[None]), weights, b_hh is not None, 1, 0.0, False, False, True)
    else:
        run = torch._VF.rnn_tanh if module.nonlinearity == "tanh" else torch._VF.rnn_relu
        (out, h_n), c_n = run(steps, h[None], weights, b_hh is not None, 1, 0.0, False, False, True), None
    prior = torch.cat([h[:, None], out[:, :-1]], 1)  # the step's hidden input, in the order stepped
    if reverse:
        out, prior = out.flip(1), prior.flip(1)
    return out, prior, h_n[0], None if c_n is None else c_n[0]


def _cell_forward(module: nn.RNNCellBase, hooks: Mapping[str, Hook], input: Any, hx: Any = None) -> Any:
    """A cell's forward as its two products and one step; the fused op's own forward on an unbatched input (and, as
    ``_forward``'s, without hooks where it serves: ``_fused_serves``)."""
    lstm = isinstance(module, nn.LSTMCell)
    states = hx if lstm and hx is not None else (hx,)
    batched = isinstance(input, torch.Tensor) and input.dim() == 2 and all(s is None or s.dim() == 2 for s in states)
    if not batched or hooks is _HOOKLESS and _fused_serves(input):
        return type(module).forward(module, input, hx)
    if hx is None:
        zeros = input.new_zeros(input.shape[0], module.hidden_size)
        h, c = zeros, zeros
    else:
        h, c = hx if lstm else (hx, None)
    xi = product(hooks, "ih", input, module.weight_ih, module.bias_ih)
    hh = product(hooks, "hh", h, module.weight_hh, module.bias_hh)
    h, c = _step(module, xi, hh, h, c)
    return (h, c) if lstm else h


def _fused_serves(data: Any) -> bool:
    """Whether a recurrent layer's fused op serves a pass without hooks: where no gradient is taken, and, on the CPU,
    outside torch.func's transforms (the per-example loop: the packed LSTM's ``factored=False`` 0.85 s against 2.40 s
    unrolled). Under vmap it has no batching rule (its per-example fallback: the LSTM's ``factored=False`` 1.16 s
    against 0.46 s unrolled; a frozen layer the model runs under ``torch.no_grad()`` too, sent to the per-example
    loop), and on a GPU cuDNN's has no backward in eval mode."""
    if peek_interpreter_stack() is not None:
        return False
    return not torch.is_grad_enabled() or isinstance(data, torch.Tensor) and data.device.type == "cpu"


def _step(
    module: nn.Module, xi: torch.Tensor, hh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One time step's ``(h, c)`` from its input-to-hidden and hidden-to-hidden products ``[B, gates * H]`` (gate
    order LSTM: i, f, g, o; GRU: r, z, n; a plain RNN's one gate through its nonlinearity). Each gate is its own
    chunk: in the backward pass one `cat` joins their gradients (no zero-filled copies of the gates summed)."""
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        i, f, g, o = (xi + hh).chunk(4, 1)
        c = torch.addcmul(f.sigmoid() * c, i.sigmoid(), g.tanh())
        return o.sigmoid() * c.tanh(), c
    if isinstance(module, (nn.GRU, nn.GRUCell)):  # the n gate's hidden product (bias included) is multiplied by r
        (xr, xz, xn), (hr, hz, hn) = xi.chunk(3, 1), hh.chunk(3, 1)
        candidate = torch.addcmul(xn, (xr + hr).sigmoid(), hn).tanh()
        return torch.lerp(candidate, h, (xz + hz).sigmoid()), None  # (1 - z) * n + z * h
    pre = xi + hh
    return (pre.tanh() if module.nonlinearity == "tanh" else pre.relu()), None
