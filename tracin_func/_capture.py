"""Capturing factors: layer inputs ``A`` and output gradients ``G`` of factor sites, obtained functionally.

Each site's output is differentiated (``G``) and its input rows are kept (``A``), by forward hooks: the batched path
differentiates the outputs' gradient edges (the layers' differentiated tensors enter as aliases requiring grad, so
the first layer's output has one too; a zero "probe" is added only to a view of part of another tensor, an output
needing no gradient, or a row broadcast over the batch); the vmapped path adds a zero probe to every output. The hooks
are registered on the call's private copy of the model (``_model.private_copy``) and removed in ``finally`` blocks.
Two ways to run them:

- batched: one ordinary forward / backward over the whole batch, the criterion mapped over examples or a
  ``tc.BatchLoss`` giving every example's loss (planning checked on the first examples that batching does not
  change them);
- vmapped: ``vmap(grad)`` over examples, differentiating the probes and, in the same pass, the parameters of
  other layers (custom layers) densely.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import optree
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from ._batch_free import NORM_ARGS, Meetings, norm_parts, per_example_outputs
from ._encoders import on_traced_path
from ._grads import (
    CHECKPOINTED,
    REENTRANT,
    Mapper,
    Tensors,
    batch_of_one,
    checkpointing,
    example_at,
    lasting_edge,
    memory_of,
    reentrant_checkpointing,
    refuse_checkpointing,
    refuse_recomputed,
    saving_hooks,
    scalar_loss,
)
from ._layers import Site, broadcast_row, call_site, layer_output, recorded_input, token_wise
from ._loss import BatchedLoss, CriterionLoss, ExampleLossFn, batch_losses, floating_leaves
from ._recurrent import unrolled
from ._validate import cause_of

if TYPE_CHECKING:
    from ._plan import Plan

Hook = Callable[[nn.Module, tuple[Any, ...], Any], Any]
LayerFactors = tuple[list[torch.Tensor], list[torch.Tensor]]  # one layer's inputs and output gradients, per call
Factors = dict[str, LayerFactors]  # path -> its factors
# (state, batch, (outputs, losses, loss gradients at the outputs)): batched_factors
Witness = Callable[[Mapping[str, torch.Tensor], Any, Any], None]
BatchableLoss = Union[CriterionLoss, BatchedLoss]  # losses whose model runs on whole batches


@contextmanager
def hooked(
    module: nn.Module, hooks: Mapping[str, Hook], modules: Mapping[str, nn.Module] | None = None
) -> Iterator[None]:
    """Forward hooks on the submodules at the given paths, for the duration of the block. A path that is not a
    module's names a product of a recurrent layer, which then runs as unrolled cells (``_recurrent.unrolled``); a
    layer subclass with its own forward is hooked at its calls of a functional (``_layers.call_site``). ``modules``:
    ``dict(module.named_modules())``, where the caller has walked the tree already."""
    modules = dict(module.named_modules()) if modules is None else modules
    products = {path: hook for path, hook in hooks.items() if path not in modules}
    handles = []
    # unrolled first: whether a layer runs unrolled reads its submodules' hooks (attention's out_proj), not these
    with unrolled(modules, products) if products else nullcontext():
        try:
            for path, hook in hooks.items():
                layer = modules.get(path)
                if layer is not None and call_site(layer) is not None:
                    handles += _at_calls(layer, hook)
                elif layer is not None:
                    handles.append(layer.register_forward_hook(_by_keyword_too(hook), with_kwargs=True))
            with on_traced_path(modules.values()):
                yield
        finally:
            for handle in handles:
                handle.remove()


def _without_gradient(args: tuple[Any, ...]) -> bool:
    """Whether a layer's call gives no gradient, so that no factors are taken of it: run under ``torch.no_grad()``
    (a frozen feature extractor, a teacher's pass; not a reentrant checkpointed region, run again with gradients in
    the backward), or on a nested tensor, which an ``nn.TransformerEncoder`` run so makes of a padded batch (torch:
    "NestedTensor layer_norm requires weight and bias", a raw error before), and which a lone example without padding
    does not make (the calls a batch and its examples alone make then differed)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].is_nested:
        return True
    return not torch.is_grad_enabled() and not reentrant_checkpointing()


def _by_keyword_too(hook: Hook) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]:
    """``hook`` as a forward hook given keyword arguments too: the input of a layer called as ``layer(input=x)``."""

    def with_kwargs(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return hook(layer, args or tuple(kwargs.values()), output)

    return with_kwargs


def _at_calls(layer: nn.Module, hook: Hook) -> list[RemovableHandle]:
    """Run ``hook(layer, (input,), out)`` at each call of ``layer``'s functional (``call_site``) on its own parameters
    and configuration, its result replacing ``out`` (as a forward hook's does); a mode active only during the
    forward."""
    calls = _Calls(layer, hook)

    entered: list[None] = []  # (a pre-hook before ``enter`` may raise: ``leave`` then runs alone)

    def enter(*_: Any) -> None:  # returns None: a pre-hook's result would replace the layer's inputs
        calls.__enter__()
        entered.append(None)

    def leave(*_: Any) -> None:
        if entered:
            entered.pop()
            calls.__exit__(None, None, None)

    return [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave, always_call=True)]


_ARGS = {
    F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    F.linear: ("input", "weight", "bias"),
    **NORM_ARGS,
}


def _own_call(layer: nn.Module, func: Any, named: Mapping[str, Any]) -> bool:
    """Whether a call of ``layer``'s functional uses its own parameters and configuration: any other call is an
    unhooked use of the parameters, which discovery refuses."""
    if func is F.embedding:
        padding = named.get("padding_idx")
        padding = padding + layer.weight.shape[0] if padding is not None and padding < 0 else padding
        plain = named.get("max_norm") is None and not named.get("scale_grad_by_freq") and not named.get("sparse")
        return named["weight"] is layer.weight and padding == layer.padding_idx and plain
    if func is F.linear:  # (a bias added apart is another use: found by discovery)
        return named["weight"] is layer.weight and named.get("bias") is getattr(layer, "bias", None)
    shape = named["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    same = named.get("weight") is layer.weight and named.get("bias") is layer.bias
    return same and shape == tuple(layer.normalized_shape) and named.get("eps", 1e-5) == layer.eps


class _Calls(TorchFunctionMode):
    def __init__(self, layer: nn.Module, hook: Hook) -> None:
        super().__init__()
        self.layer, self.hook, self.func = layer, hook, call_site(layer)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not self.func:
            return out
        named = dict(zip(_ARGS[func], args), **kwargs)
        if not _own_call(self.layer, func, named):
            return out
        replaced = self.hook(self.layer, (named["input"],), out)
        return out if replaced is None else replaced


class _NormsOfCopies(TorchFunctionMode):
    """``F.layer_norm`` / ``F.rms_norm`` given expanded copies (``[B, 1, ..., d]``) as their weight or bias, as a
    hand-written norm calling the functional form gives them (nanoGPT's ``LayerNorm``, an RMSNorm on ``F.rms_norm``):
    torch wants both of the normalized shape (its refusal sent the whole model to ``vmap(grad)``), so the norm runs
    without them, on the parameter's own shape (``shapes``: by the copy's id), and they apply elementwise after it,
    as the kernel applies them."""

    def __init__(self, shapes: Mapping[int, torch.Size]) -> None:
        super().__init__()
        self.shapes = shapes

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in NORM_ARGS:
            return func(*args, **kwargs)
        plain, weight, bias = norm_parts(func, args, kwargs)
        copy = next((t for t in (weight, bias) if t is not None and id(t) in self.shapes), None)
        if copy is None:
            return func(*args, **kwargs)
        out = func(**{**plain, "normalized_shape": self.shapes[id(copy)]})
        out = out if weight is None else out * weight
        return out if bias is None else out + bias


class _RepeatsOfCopies(TorchFunctionMode):
    """A row copied over the batch (``[B, ...]`` for a parameter ``[1, ...]``, ``_expanded``; ``rows``: by the copy's
    id) repeated by the batch's size along its first dimension, as a layer brings a learned seed to its batch
    (SigLIP's attention-pooling probe and the Set Transformer's seeds, ``self.probe.repeat(B, 1, 1)``;
    ``torch.tile``): already a row per example, it stays as it is (copied, as a repeat gives a new tensor). Repeated
    again it took ``B^2`` rows, and the call took ``vmap(grad)``."""

    def __init__(self, rows: frozenset[int]) -> None:
        super().__init__()
        self.rows = rows

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in _REPEATS or kwargs or not args or id(args[0]) not in self.rows:
            return func(*args, **kwargs)
        copy, sizes = args[0], args[1:]
        sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
        if tuple(sizes) != (copy.shape[0], *[1] * (copy.dim() - 1)):
            return func(*args, **kwargs)
        return copy.clone()


_REPEATS = (torch.Tensor.repeat, torch.Tensor.tile, torch.tile)


class Discovery(NamedTuple):
    calls: dict[str, list[tuple[int, ...] | None]]  # each site's output shapes, one per call (None: not a tensor)
    leaked: dict[str, torch.Tensor]  # the gradient that still reaches each differentiated parameter
    unreached: set[str]  # the parameters autograd does not reach at all
    foreign: set[str]  # the sites whose layer ran another weight or bias than its parameter (``_runs_foreign_tensors``)


def discover(
    module: nn.Module,
    loss: ExampleLossFn,
    sites: Sequence[Site],
    diff: Tensors,
    frozen: Tensors,
    batch: Any,
    *,
    whole: bool = False,
) -> Discovery:
    """Run the first example of ``batch`` (plain autograd) with each site's own parameter use detached; ``whole``:
    every example of it at once, its losses summed (a loss that runs whole batches), where only the gradients reached
    are asked (the shapes are a batch's).

    A site's parameters must get no gradient, since another use (a direct ``F.linear(x, layer.weight)``, a
    regulariser in the loss) would be missed by its factors. An "expanded" site's use is not detached: its parameters
    get the example's whole gradient, which their expanded copies must reproduce (``_batching.batching_refused``).
    Raises ``BeyondFactors`` where the gradients have parts no layer's factors hold (``_BeyondFactors``).
    """
    calls: dict[str, list[tuple[int, ...] | None]] = {s.path: [] for s in sites}
    beyond = _BeyondFactors()
    foreign: set[str] = set()

    def hook_for(site: Site) -> Hook:
        def hook(layer: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor | None:
            if any(isinstance(a, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(a) for a in args):
                beyond.why = beyond.why or _TRANSFORMED.format(path=site.path)
            if _without_gradient(args):
                return None
            refuse_autocast(site, output)
            if site.kind == "expanded":  # its gradient is taken whole (copies): here, the example's true one
                calls[site.path].append(tuple(output.shape) if isinstance(output, torch.Tensor) else None)
                return None
            calls[site.path].append(tuple(output.shape))
            if _runs_foreign_tensors(layer, site, state):  # (its use kept: the gradient it passes on leaks)
                foreign.add(site.path)
                return None
            detached = layer_output(layer, site, args[0], output.shape, detach=True)
            if output.requires_grad and not detached.requires_grad:  # (still needing gradients, as it is scored: a
                zero = torch.zeros((), dtype=detached.dtype, device=detached.device, requires_grad=True)
                detached = detached + zero  # DEQ's `if z.requires_grad:` branch was planned without: a review's)
            return detached

        return hook

    # plain autograd on one example (no vmap needed): also through autograd.Functions that torch.func refuses
    # (BLOOM's GeLU), which the batched path runs too
    leaves = {n: t.detach().requires_grad_() for n, t in diff.items()}
    state = {**frozen, **leaves}
    try:
        with torch.enable_grad(), hooked(module, {s.path: hook_for(s) for s in sites}), beyond, _Differentiated(beyond):
            if not whole:
                total = scalar_loss(loss, state, batch_of_one(example_at(batch, 0)))
            elif isinstance(loss, BatchedLoss):
                total = loss.per_example(state, batch).sum()
            else:  # a criterion on the whole batch, at its reduction's scale (only which gradients are reached counts)
                total = loss(state, batch)
    except RuntimeError as err:  # a derivative of the layers' detached outputs (a MAML step's): no gradient to take
        if beyond.why and not isinstance(err, Unbatchable):
            raise BeyondFactors(beyond.why, "`factored=False`", factorless=True) from err
        raise
    if beyond.why:
        raise BeyondFactors(beyond.why, "`factored=False`", factorless=True)
    grads = [None] * len(leaves)
    if total.requires_grad:  # (not when every parameter's only use was detached)
        try:
            grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        except RuntimeError as err:
            refuse_recomputed(err)
            raise
    leaked = {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads)}
    return Discovery(calls, leaked, {n for n, g in zip(leaves, grads) if g is None}, foreign)


def _runs_foreign_tensors(layer: Any, site: Site, state: Tensors) -> bool:
    """Whether a site's layer runs a weight or bias other than its tensor of the call's state (one given by
    ``torch.func.functional_call`` on the layer, a masked or generated weight), or one computed from parameters in
    the forward where it is no parameter (AWD-LSTM's weight dropped from ``weight_raw``): its factors would give that
    tensor's gradient, not the parameters'. A parametrized weight is computed from its own."""
    if site.reparam:
        return False
    for attr, name in (("weight", site.weight), ("bias", site.bias)):
        tensor = getattr(layer, attr, None)
        name = name or (f"{site.path}.{attr}" if site.owner is None else None)
        if isinstance(tensor, torch.Tensor) and (tensor is not state[name] if name in state else tensor.requires_grad):
            return True
    return False


# (a criterion mapped over a batched pass's outputs: its values only, the gradients still from one backward; the
# warning said the model's per-example gradients ran in a loop, where the call stayed batched)
_CRITERION_LOOPED = (
    "the criterion (`loss_fn`, over the batched forward's outputs), so each example's loss is computed (its "
    "gradients still from one batched backward)"
)


def batched_factors(
    module: nn.Module,
    loss: BatchableLoss,
    plan: Plan,
    state: Tensors,
    batch: Any,
    mapper: Mapper,
    *,
    refuse_recomputing: bool = False,
    compiled: bool = False,
    witness: Witness | None = None,
) -> Factors:
    """Each site's inputs and output gradients from one forward / backward over the whole batch (refused if it
    reaches a parameter planned as unused, ``Plan.unused``).

    A site called on one row that the model broadcasts over the batch (BERT's and GPT-2's ``[1, T]`` position ids)
    gets a probe with one row per example (per row of its folded batch, ``Plan.fold``, summed per example), so that
    its output gradient is each example's own; planning checks on the first examples that the model treats that row
    like any batched one (``_batching.batching_refused``).
    ``refuse_recomputing`` (planning's check): refuse a forward that recomputes layers in the backward pass, or that
    indexes the rows of its batch by a sort's or a top-k's order (``_PlanningWatch``).
    ``compiled``: under ``torch.compile``, whose autograd nodes are the compiled graph's: the checks that read them
    (inputs changed in place, hooks on outputs, merged rows' provenance) are planning's, on the eager first examples.
    ``witness``: called after the backward with the state, the batch and what the forward gave its examples,
    ``(outputs, losses, at_outputs)``, detached: a criterion's inputs (the model's floating outputs), and where it runs
    on the whole batch (``batch_losses``) its losses and their sum's gradient at each output (else None and none); or
    none, a ``tc.BatchLoss``'s losses and none (``_batching.spot_check``).
    """
    given = state  # (before parameter copies and probes join it)
    n = optree.tree_leaves(batch, none_is_leaf=True)[0].shape[0]
    # rows of the batch dimension, where the model folds an example's items into it (one example: a row broadcast
    # over its items gets their gradients summed by autograd, whatever their number)
    rows = n * plan.fold if n > 1 else 1
    folded: set[int] = set()  # leading sizes of the sequences token-wise layers give ([rows, T, d])
    inputs: dict[str, list[torch.Tensor]] = {s.path: [] for s in plan.sites}
    # per call: (a tensor shaped like the output gradient, what autograd differentiates: a probe or the output's edge)
    outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor | GradientEdge]]] = {s.path: [] for s in plan.sites}
    copied: set[torch.Tensor] = set()  # probes and parameter copies with a row per row of the batch dimension
    kept: list[tuple[str, torch.Tensor, int]] = []  # each recorded input and its version when recorded
    merged: set[Any] = set()  # autograd nodes of outputs of layers fed merged rows, checked example-major

    followed = [s for s in plan.sites if s.kind == "followed"]  # parameters read directly: their uses followed too
    # (a batch of one: a layer run once for the whole batch is its example's own, as planning's lone runs take it;
    # followed only where parameters read directly need it)
    meetings = Meetings(batch, n) if plan.follows and (n > 1 or followed) else None
    # per followed output (a call run once for the whole batch, a parameter read directly): its index among the
    # followed tensors and the probe whose gradient is its whole gradient
    roots: dict[str, list[tuple[int, torch.Tensor]]] = {s.path: [] for s in followed}
    called: dict[str, list[bool]] = {s.path: [] for s in plan.sites}  # per call: whether run once for the batch

    def hook_for(site: Site) -> Hook:
        seq_first = site.path in plan.seq_first  # [T, B, ...]: its factors taken as [B, T, ...]

        def hook(layer: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor | None:
            if reentrant_checkpointing():  # (its output would get no gradient: the layer's scores 0)
                raise ValueError(REENTRANT)
            if not torch.compiler.is_compiling() and checkpointing():  # (planning's watch refuses it; a region
                raise ValueError(CHECKPOINTED)  # run on large batches only, planning's below, was 10-14% off, silently)
            if _without_gradient(args):
                return None
            refuse_autocast(site, output)
            x = recorded_input(layer, site, args[0], output).detach()
            inputs[site.path].append(x.transpose(0, 1) if seq_first else x)
            if not compiled and not x.is_inference():  # (a pass under inference_mode: no gradient, as under no_grad)
                kept.append((site.path, x, x._version))
            # run once for the whole batch (its input has no batch dimension, or is computed from followed tensors
            # alone: DeBERTa's relative embeddings): its output followed to where it meets the batch
            once = meetings is not None and (site.path in plan.batch_free or meetings.free(args[0]) and not seq_first)
            called[site.path].append(once)
            if once:
                inputs[site.path][-1] = x.expand(n, *x.shape)  # (each example's input: the same)
                probe = torch.zeros_like(output, requires_grad=True)
                followed = output + probe
                root = meetings.follow(followed, f"the output of {site.path!r}")
                roots.setdefault(site.path, []).append((root, probe))
                return followed
            if output.dim() >= 3 and token_wise(layer, site):
                folded.add(output.shape[int(seq_first)])
            elif (  # [n T, d], not a tensor of the state (rows of no example)
                not compiled and _merged_rows(args[0], n, plan.fold) and token_wise(layer, site)
                and not _of_state(args[0], given)
            ):
                if not _example_major(args[0], n, merged, optree.tree_leaves(batch, none_is_leaf=True)):
                    raise Unbatchable(
                        f"layer {site.path!r} is fed rows of several examples merged into one dimension other than "
                        f"by a reshape of a tensor whose first dimension is the batch's (packed valid tokens, "
                        f"`h[mask]`, say), so the batched pass cannot tell each example's rows apart",
                        "`factored=False`",
                        factorless=True,
                    )
                merged.add(output.grad_fn)
            # (a lookup of one id `[1]`, a task's embedding for every example, is one row too: its FiLM was refused
            # as fed merged rows)
            one_row = x.dim() > 1 or site.kind == "embedding" and x.dim() == 1
            broadcast = not seq_first and output.dim() > 1 and one_row and output.shape[0] == x.shape[0] == 1
            if rows > 1 and broadcast:
                inputs[site.path][-1] = x.expand(n, *x.shape[1:])  # one row for the whole batch: each example's
                probe = output.new_zeros((rows, *output.shape[1:])).requires_grad_()  # copy of it and of its gradient
                copied.add(probe)
            elif output.requires_grad and (edge := lasting_edge(output)) is not None:  # its gradient where
                outputs[site.path].append((output, edge))  # autograd passes it (before any later in-place change)
                return None
            else:  # a view of part of another tensor, or an output needing no gradient (its weight's alias, which
                # does, not computed with: ``_requiring_grad``): a zero probe adds the entry point
                probe = torch.zeros_like(output, requires_grad=True)
            outputs[site.path].append((probe, probe))
            return output + probe

        # an unrolled product may give it, for its output, another tensor with the same gradient and a lasting
        # place in the graph, after the fact (``_recurrent._gates_stand_in``): the edge branch above, None returned
        hook.takes_stand_in = True  # type: ignore[attr-defined]
        return hook

    def criterion_of_example(example: tuple[Any, Any]) -> torch.Tensor:
        return loss.of_example(*batch_of_one(example))

    expanded = [s for s in plan.sites if s.kind == "expanded"]
    shapes = {name: state[name].shape for site in expanded for name in site.names}
    copies = {name: _expanded(state[name], rows, site.rank) for site in expanded for name in site.names}
    unused = {name: state[name].detach().requires_grad_() for name in plan.unused}  # must stay unreached
    copied.update(copies.values())
    layers = [s for s in plan.sites if s.kind not in ("expanded", "followed")]  # (the others: no layer to hook)
    modules = dict(module.named_modules())  # (walked once: for the hooks and the token-wise layers below)
    state = {**state, **_requiring_grad(state, layers), **copies, **unused}
    with torch.enable_grad():
        for site in followed:  # (per call: the parameter's whole gradient at its probe)
            probe = torch.zeros_like(state[site.path], requires_grad=True)
            state[site.path] = state[site.path].detach() + probe
            root = meetings.follow(state[site.path], f"parameter {site.path!r}", weight=True)
            roots[site.path].append((root, probe))
        hooks = {s.path: hook_for(s) for s in layers}
        held = {memory_of(t) for t in state.values()}
        watch = _PlanningWatch({n, rows}, held) if refuse_recomputing else nullcontext()
        norms = _NormsOfCopies({id(copies[n]): shapes[n] for n in copies}) if _calls(module, expanded, _NORMS) else None
        rows_of = frozenset(id(copies[n]) for n in copies if len(shapes[n]) >= 2 and shapes[n][0] == 1)  # (rows)
        repeats = _RepeatsOfCopies(rows_of) if rows_of and _calls(module, expanded, {"repeat", "tile"}) else None
        try:
            with hooked(module, hooks, modules), refusing_uncalled(module, plan), watch, meetings or nullcontext(), \
                    norms or nullcontext(), repeats or nullcontext():
                if isinstance(loss, BatchedLoss):
                    output = loss.per_example(state, batch)
                    total = output.sum()
                else:
                    *model_inputs, target = batch
                    output = loss.forward(state, *model_inputs)
        except RuntimeError as err:  # broadcast rows given `rows` rows meet a batch folding another number of items
            if rows == n or not folded - {1, rows} or isinstance(err, Unbatchable):
                raise
            raise FoldMismatch(
                f"`model`: the call was planned on examples whose model folds {plan.fold} items (choices, chunks) into "
                f"its batch, and this batch of {n} folds {sorted(folded - {1, rows})[0] / n:g} per example, which the "
                f"planned rows broadcast over the batch do not fit ({cause_of(err)}). Pass "
                f"`factored=False`, or data with as many items per example throughout."
            ) from err
        losses = output if isinstance(loss, BatchedLoss) else None
        if isinstance(loss, CriterionLoss):
            losses = batch_losses(loss.criterion, output, target)
            if losses is not None:
                total = losses.sum()
            elif n == 1:  # one example's batch: its loss as it is defined (a `.squeeze()` may leave no batch dimension)
                total = loss.of_example(output, target)
            else:
                total = mapper.over_batch(criterion_of_example, 0, looped=_CRITERION_LOOPED)((output, target)).sum()
        shown, watched = [], []  # a whole-batch criterion's outputs, to the witness with its sum's gradient there
        if witness is not None:
            shown = floating_leaves(output) if isinstance(loss, CriterionLoss) else []
            watched = [t for t in shown if t.requires_grad] if losses is not None and not per_example(losses, n) else []
        flat = [o for s in plan.sites for o in outputs[s.path]] + [(c, c) for c in copies.values()]
        if not compiled:
            _refuse_unfollowed(kept, [(path, out, edge) for path in outputs for out, edge in outputs[path]])
        met = [probe for _, probe in meetings.met] if meetings is not None else []
        whole = [probe for calls in roots.values() for _, probe in calls]  # each root's whole gradient
        differentiated = [edge for _, edge in flat] + met + whole + list(unused.values()) + watched
        try:  # (a loss no selected parameter reaches: every gradient zero, as plain autograd's allow_unused gives)
            grads = torch.autograd.grad(
                total,
                differentiated,
                allow_unused=True,
                retain_graph=bool(met),  # the roots' graph, for their per-example gradients
            ) if total.requires_grad else (None,) * len(differentiated)
        except RuntimeError as err:  # (a lone example's run, not watched by `_PlanningWatch`)
            refuse_recomputed(err)
            raise
        start = len(flat) + len(met) + len(whole)  # (the unused parameters' gradients, then the watched outputs')
        if witness is not None:  # (its graph freed: the witness may run the batch again)
            at = gradients_at(shown, watched, grads[start + len(unused) :]) if watched else []
            witness(given, batch, ([t.detach() for t in shown], None if losses is None else losses.detach(), at))
        if meetings is not None:
            at_roots = per_example_outputs(meetings, roots, grads[len(flat) : start], n)
    _refuse_reached(unused, grads[start : start + len(unused)])
    grads = iter(
        torch.zeros_like(like) if g is None else _per_example(g, n) if like in copied else g.view(like.shape)
        for g, (like, _) in zip(grads, flat)  # (a view's gradient taken at its base: the base's shape)
    )
    once = {path: iter(at_roots.get(path, ())) for path in called} if meetings is not None else {}

    def output_grad(path: str, run_once: bool) -> torch.Tensor:  # the next call's, [B, ...]
        if run_once:
            return next(once[path])
        return next(grads).transpose(0, 1) if path in plan.seq_first else next(grads)

    factors = {s.path: (inputs[s.path], [output_grad(s.path, o) for o in called[s.path]]) for s in plan.sites}
    for site in plan.sites:  # a token-wise layer fed [n T, d] (OPT flattens tokens before its MLP): rows per example
        if token_wise(modules.get(site.path), site):
            xs, gs = factors[site.path]
            factors[site.path] = ([_split_rows(x, n) for x in xs], [_split_rows(g, n) for g in gs])
    for site in expanded:  # no inputs: the per-example gradients themselves, [B, *shape]
        factors[site.path] = ([], [next(grads).reshape(n, *shapes[name]) for name in site.names])
    for site in followed:  # no inputs: the per-example gradients themselves, [B, *shape]
        factors[site.path] = ([], at_roots[site.path])
    return factors


def _requiring_grad(state: Tensors, layers: Sequence[Site]) -> Tensors:
    """Aliases requiring grad of the hooked ``layers``' differentiated tensors (the checkpoint's are left as they are),
    so that every layer's output, the first's too, has a place in the graph where autograd passes its gradient
    instead of a zero probe added to it (the digits MLP's first layer: a fill and an add of [1600, 128] per
    checkpoint). No weight's gradient is computed: autograd runs only what the outputs' gradients need."""
    return {
        name: state[name].detach().requires_grad_()
        for site in layers
        for name in site.names
        if state[name].is_floating_point() and not state[name].requires_grad
    }


def per_example(losses: torch.Tensor, n: int) -> bool:
    """Whether a criterion's losses of a batch of ``n`` hold one part per example (compared as they are), not a sum
    or fewer losses than examples (compared by their gradient at the outputs: ``_batching._pairs``)."""
    return losses.dim() > 0 and losses.shape[0] == n


def gradients_at(
    outputs: Sequence[torch.Tensor], live: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> list[torch.Tensor]:
    """Each of ``outputs``' gradients, given ``grads`` of those among them that are ``live`` (that require grad, in
    order); zeros where a loss does not reach one."""
    at = {id(t): g for t, g in zip(live, grads)}
    return [torch.zeros_like(t) if at.get(id(t)) is None else at[id(t)].detach() for t in outputs]


class Unbatchable(ValueError, RuntimeError):
    """What a batched pass cannot take factors of as it runs (a ``RuntimeError`` too: planning's batching check then
    refuses the batched path, and ``vmap(grad)`` over examples scores the call; a later batch raises it, with the
    fix). ``factorless``: no layer's factors either (rows whose examples vary per example: every gradient dense)."""

    def __init__(self, reason: str, fix: str, factorless: bool = False) -> None:
        super().__init__(f"`model`: {reason}. Pass {fix}.")
        self.reason, self.factorless = reason, factorless


class BeyondFactors(Unbatchable):
    """A forward or loss whose weights' gradients have parts no layer's factors hold (``_BeyondFactors``): every
    gradient dense."""


class _BeyondFactors(TorchFunctionMode):
    """Notes, in a forward or loss, what makes a weight's gradient more than its layers' input and output gradients:

    - a derivative: a backward pass keeping its graph (``create_graph=True``; ``torch.func.grad`` runs one) or
      forward-mode AD (dual tensors: ``torch.func.jvp``), its result differentiated again: the weight is used in that
      pass too (a layer's ``grad_input = grad_output @ W``, its tangent ``W @ t``; 1-99% off, or all 0, silently);
    - saved-tensor hooks of the model's own (activation compression): autograd differentiates with the tensors they
      give back, not the layers' inputs (3e-4 off for a bfloat16 copy, silently). ``torch.autograd.graph.save_on_cpu``
      gives them back as they were (the caller's are set aside; torch's checkpointing is refused where it runs);
    - (noted by ``discover``'s hooks) a layer run under ``torch.vmap`` inside the forward: its factors would be
      functorch's per-item tensors (the batched pass raised functorch's error).
    """

    _DIFFERENTIATING = {
        f: inspect.signature(f) for f in (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)
    }

    def __init__(self) -> None:
        super().__init__()
        self.why = ""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        signature = self._DIFFERENTIATING.get(func)
        if func is torch._make_dual or signature is not None and signature.bind(*args, **kwargs).arguments.get(
            "create_graph"
        ):
            self.why = _DIFFERENTIATES  # (the cause, where torch.func's transform also wraps a layer's inputs)
        saving = saving_hooks()
        if saving is not None and getattr(saving[0], "__module__", "") not in _SAVED_AS_THEY_WERE:
            self.why = self.why or _SAVES_OTHERWISE
        try:
            return func(*args, **kwargs)
        except RuntimeError:  # (a derivative of the layers' outputs discovery detaches: a first-order MAML step's)
            if signature is not None:
                self.why = self.why or _DIFFERENTIATES
            raise


class _Differentiated(TorchDispatchMode):
    """Notes (in ``beyond``) a backward pass keeping its graph that ``_BeyondFactors`` cannot see called: a
    TorchScript function's ``torch.autograd.grad`` (a gradient penalty's helper; 61-97% off, silently), seen as an op
    an autograd node runs with gradients on."""

    def __init__(self, beyond: _BeyondFactors) -> None:
        super().__init__()
        self.beyond = beyond

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if torch.is_grad_enabled() and torch._C._current_autograd_node() is not None:
            self.beyond.why = self.beyond.why or _DIFFERENTIATES
        return func(*args, **(kwargs or {}))


_SAVED_AS_THEY_WERE = ("torch.autograd.graph", "torch.utils.checkpoint")  # (save_on_cpu; checkpointing: refused)
_DIFFERENTIATES = (
    "the forward pass or the loss differentiates (`torch.autograd.grad` with `create_graph=True`, `torch.func.grad` or "
    "`jvp`, dual tensors: forces as -dE/dx, a gradient penalty), so a parameter's gradient has a part through that "
    "derivative's computation, which no layer's factors hold"
)
_TRANSFORMED = (
    "layer {path!r} runs under a torch.func transform inside the forward pass (`torch.vmap` around it), whose "
    "inputs are its own per-item tensors, not rows of the batch the factors are taken of"
)
_SAVES_OTHERWISE = (
    "the forward pass sets saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`: activation compression, "
    "say), so autograd differentiates with the tensors they give back, not the layers' inputs the factors hold"
)


def _refuse_unfollowed(
    kept: Sequence[tuple[str, torch.Tensor, int]], outputs: Sequence[tuple[str, torch.Tensor, Any]]
) -> None:
    """Refuse a forward that changed a recorded layer input in place after the layer ran (``F.linear`` on an input it
    cannot merge into rows multiplies a copy, so autograd allows it), or put a gradient hook on a layer output whose
    gradient is taken at its node (before the hook runs): either way the factors would not be the layer's."""
    for path, x, version in kept:
        if x._version != version:
            raise Unbatchable(
                f"the input of layer {path!r} is changed in place after the layer ran, so its recorded rows are not "
                f"the ones it multiplied",
                "`factored=False`, or change a copy",
            )
    for path, output, edge in outputs:
        if output._backward_hooks and isinstance(edge, GradientEdge) and edge.node is output.grad_fn:
            raise Unbatchable(
                f"a gradient hook on layer {path!r}'s output (`register_hook`) changes the gradient its parameters "
                f"get, which their factors would miss",
                "`factored=False`, or put the hook elsewhere",
            )


class FoldMismatch(ValueError, RuntimeError):
    """A batch folding another number of items per example into the batch than the call was planned on (a
    ``RuntimeError`` too: planning's batching check refuses the batched path on it, as on any failed batched run)."""


SORTED_BATCH = "it indexes the rows of its batch by"  # (``_PlanningWatch``'s refusal: a sort's or a top-k's order)
_GRADIENT_HOOK = (  # (a clip of the batch's gradient by its norm: 29-43% off, silently; a review helper's trial)
    "a gradient hook on a tensor the forward computes (`register_hook`) may change its examples' gradients together "
    "(a clip by the batch's norm), which no comparison of outputs shows"
)


def refuse_autocast(site: Site, output: Any) -> None:
    """Refuse a site's factors where the layer runs under ``torch.autocast`` (the caller's is off for the call: the
    model's own, entered in its forward) and its output is in autocast's dtype: its products round in a lower
    precision than factors would (a convolution's or a token Linear's factors in two dtypes raised torch's raw
    errors; an LSTM's unrolled steps were refused as mixing examples; where they ran, 1e-3 off). Every gradient is
    then taken per example."""
    if not isinstance(output, torch.Tensor):
        return
    device = output.device.type
    if torch.is_autocast_enabled(device) and output.dtype == torch.get_autocast_dtype(device):  # (not float64's)
        raise autocast_refusal(f"layer {site.path!r}")


def autocast_refusal(layer: str) -> BeyondFactors:
    """The refusal of factors for ``layer`` (its words) running under the model's own ``torch.autocast``."""
    return BeyondFactors(
        f"{layer} runs under `torch.autocast` entered in the forward, which rounds its products in a lower precision "
        f"than the layers' factors would: every gradient is taken per example, as autograd takes it",
        "`factored=False`",
        factorless=True,
    )


_PARAMETER_HOOK = (  # (a clamp of a parameter's gradient: 26-78% off, silently; a review helper's trial)
    "the forward puts a gradient hook on a parameter it reads (`register_hook` on one of its weights), which changes "
    "its whole gradient, where the layers' factors would give it unchanged: every gradient is taken per example, the "
    "hook's too"
)


class _PlanningWatch(TorchFunctionMode):
    """Planning's watch over the first examples run together. It refuses:

    - a forward run under activation checkpointing (``refuse_checkpointing``): without reentrancy, the backward pass
      recomputes the region outside the call's parameters and hooks, so the factors would be wrong (13x the true
      scores, for one recomputed Linear); with it, the region runs without gradients;
    - a gradient hook put on a tensor the forward computes (``register_hook``): the batch's gradient passes through
      it as one, which may clip it by its norm (per example under ``vmap``); one put on a parameter (a leaf) changes
      its whole gradient, which no layer's factors hold: every gradient is then taken per example;
    - a forward that reorders its examples by a sort (RNN code sorting a batch by length, ``x[order]``, then
      unsorting): a layer's rows would be other examples' (13-36% off). On first examples of equal length the order
      is the identity and the batching check sees nothing, so the watch follows the indices a ``sort`` /
      ``argsort`` / ``topk`` gives, and what is computed from them (copies, views, inverses), to any use as an index
      into a dimension as long as the batch (``x[order]``, ``x[:, order]``, ``index_select``, ``gather``,
      ``take_along_dim``, ``index_copy``, ``scatter``, ...), except torch's packing code's own (``_PACKING_CODE``).
      An order made outside torch (Python's ``sorted``, numpy) is not seen. Other reorderings of the batch
      (``flip``, ``roll``) change the first examples' factors, which the batching check refuses. A ``topk``'s
      indices so used are a search across the batch's rows (nearest neighbours over a flattened batch), told as one.
    """

    def __init__(self, sizes: set[int], held: set[int]) -> None:
        super().__init__()
        self.sizes = sizes  # batch-dimension sizes: examples, and rows of a folded batch
        self.held = held  # where the state's tensors lie (``refuse_checkpointing``)
        self.orders: dict[int, torch.Tensor] = {}  # integer tensors computed from a sort, by id (kept alive here)
        self.searched: set[int] = set()  # those computed from a top-k (a search, not a reordering: its own words)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        refuse_checkpointing(args, kwargs, self.held)
        if func is torch.Tensor.register_hook:  # (a leaf needing a gradient in this pass: a differentiated parameter)
            if getattr(args[0], "grad_fn", None) is not None:
                raise Unbatchable(_GRADIENT_HOOK, "`factored=False`")
            if args[0].requires_grad:
                raise Unbatchable(_PARAMETER_HOOK, "`factored=False`", factorless=True)
        kwargs = kwargs or {}
        ordered = bool(self.orders) and any(id(t) in self.orders for t in _tensors((args, kwargs)))
        trusted = (ordered or func in _SORTS) and sys._getframe(1).f_code.co_filename.endswith(_PACKING_CODE)
        searched = ordered and any(id(t) in self.searched for t in _tensors((args, kwargs)))
        if ordered and not trusted and _reorders(func, args, kwargs, self.orders, self.sizes):
            raise Unbatchable(
                f"{SORTED_BATCH} a top-k over them (a nearest-neighbour search across the whole batch rather than "
                f"within each example, say), so its examples' rows may mix" if searched else
                f"{SORTED_BATCH} a sort (RNN code sorting a batch by length, say), so a layer's rows in the batched "
                f"pass would be other examples'",
                "`factored=False`, or search within each example" if searched else
                "`factored=False`, or sort the batch before the model (in the data loader)",
            )
        out = func(*args, **kwargs)
        if ordered or func in _SORTS:
            for t in _tensors(out if func not in _SORTS or isinstance(out, torch.Tensor) else out[1]):
                # (sort's values are not an order, nor are the lengths packing puts in the batch's order)
                if not t.is_floating_point() and (not trusted or _is_permutation(t)):
                    self.orders[id(t)] = t
                    if searched or func in (torch.topk, torch.Tensor.topk):
                        self.searched.add(id(t))
        return out


def _is_permutation(t: torch.Tensor) -> bool:
    return t.dim() == 1 and torch.equal(t.sort().values, torch.arange(t.numel(), device=t.device, dtype=t.dtype))


# Packing sorts a batch by length (``pack_padded_sequence(enforce_sorted=False)``), and this code uses that order
# only to keep each example's rows its own (unpacking, a recurrent layer's states, the unrolled layers); a model's
# own use of a packed sequence's order (rows of ``packed.data`` by ``unsorted_indices``) is watched like any.
_PACKING_CODE = (
    os.path.join("torch", "nn", "utils", "rnn.py"),
    os.path.join("torch", "nn", "modules", "rnn.py"),
    os.path.join("tracin_func", "_recurrent.py"),
)
_SORTS = {torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort, torch.topk, torch.Tensor.topk}
# ops that index dimension ``dim`` of their first argument with an index tensor, by their arguments' order (the
# rest: Tensor.__getitem__ / __setitem__ / index_put, whose index tuple's positions are the dimensions)
_DIM_INDEXED = {
    f: order
    for order, names in {
        ("input", "dim", "index"): ("index_select", "gather", "index_copy", "index_add", "index_fill", "scatter",
                                    "scatter_add", "scatter_reduce", "index_reduce"),  # fmt: skip
        ("input", "indices", "dim"): ("take_along_dim",),
    }.items()
    for name in names
    for f in (getattr(torch, name, None), getattr(torch.Tensor, name, None), getattr(torch.Tensor, name + "_", None))
    if f is not None
}
_TUPLE_INDEXED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.index_put, torch.Tensor.index_put,
                  torch.Tensor.index_put_}  # fmt: skip


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in optree.tree_leaves(tree, none_is_leaf=True) if isinstance(t, torch.Tensor)]


def _indexed_dims(entries: Sequence[Any], rank: int) -> list[tuple[int, torch.Tensor]]:
    """``(dimension, entry)`` of each tensor entry of an index tuple into a tensor of ``rank`` dimensions (``None``
    takes none, ``...`` the ones no entry names, a boolean mask as many as it has)."""
    width = [0 if e is None or e is Ellipsis else e.dim() if isinstance(e, torch.Tensor) and e.dtype == torch.bool
             else 1 for e in entries]  # fmt: skip
    out, dim = [], 0
    for k, (e, w) in enumerate(zip(entries, width)):
        if e is Ellipsis:
            dim = rank - sum(width[k + 1 :])
        elif isinstance(e, torch.Tensor) and dim < rank:
            out.append((dim, e))
        dim += w
    return out


def _reorders(
    func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], orders: Mapping[int, torch.Tensor], sizes: set[int]
) -> bool:
    """Whether ``func`` indexes a dimension as long as the batch (one of ``sizes``) with one of ``orders``."""
    if func in _TUPLE_INDEXED:
        tensor, index = args[0], args[1] if len(args) > 1 else kwargs.get("indices")
        if not isinstance(tensor, torch.Tensor):
            return False
        entries = index if isinstance(index, (tuple, list)) else (index,)
        return any(id(e) in orders and tensor.shape[dim] in sizes for dim, e in _indexed_dims(entries, tensor.dim()))
    order = _DIM_INDEXED.get(func)
    if order is None:
        return False
    named = dict(zip(order, args), **kwargs)
    tensor, dim, index = named.get("input"), named.get("dim"), named.get("index", named.get("indices"))
    if not (isinstance(tensor, torch.Tensor) and isinstance(index, torch.Tensor) and id(index) in orders):
        return False
    return (tensor.shape[dim] if isinstance(dim, int) and tensor.dim() else tensor.numel()) in sizes


def _refuse_reached(unused: Iterable[str], grads: Sequence[torch.Tensor | None]) -> None:
    """Refuse a batch that reaches a parameter planned as unused: its gradients were taken as zero, and a batch whose
    structure differs from the planned one may also mix its examples (a branch on the whole batch). ``Unbatchable``:
    planning's batching check, its examples reaching it, scores the call by vmap(grad) (an adaptive softmax's tail
    clusters, one reached per example, were refused with `tc.explain` too; a review helper's)."""
    for name, g in zip(unused, grads):
        if g is not None:
            raise Unbatchable(
                f"parameter {name!r} was not used by the forward pass or the loss on the first example the call was "
                f"planned on (for influence, top-k and a tracer: the first test example), so its gradients were taken "
                f"as zero; this batch uses it: the model's computation depends on the example",
                "`factored=False`, or leave the parameter out with `params=` if it should not count",
                factorless=True,  # (layers run per example's values: no factors planned once fit)
            )


@contextmanager
def refusing_uncalled(module: nn.Module, plan: Plan) -> Iterator[None]:
    """Refuse a call of a module the plan found uncalled although it holds a tied tensor of its sites
    (``Plan.uncalled``): that use would add to the tensor's gradient outside every site's factors. (A plain
    forward pre-hook: it sees every call through the module, whatever its forward does; a direct ``.forward()``
    call bypasses all hooks and is not seen.)"""

    def refuse_at(path: str) -> Callable[[nn.Module, Any], None]:
        def refuse(layer: nn.Module, args: Any) -> None:
            raise ValueError(
                f"`model`: module {path!r} ({type(layer).__name__}) shares its weight with other layers and was not "
                f"called on the first example the call was planned on, so that weight is scored through the other "
                f"layers' factors; this batch calls it. The model's modules depend on the example: pass "
                f"`factored=False`."
            )

        return refuse

    modules = dict(module.named_modules()) if plan.uncalled else {}  # (run per batch: no walk when none)
    handles = []
    try:
        for path in plan.uncalled:
            handles.append(modules[path].register_forward_pre_hook(refuse_at(path)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _per_example(g: torch.Tensor, n: int) -> torch.Tensor:
    """The gradient of a probe or copy with a row per row of the batch dimension, ``[n fold, ...]``, summed over each
    example's rows (all copies of the same row)."""
    return g if g.shape[0] == n else g.reshape(n, -1, *g.shape[1:]).sum(1)


def _of_state(x: torch.Tensor, state: Tensors) -> bool:
    """Whether ``x`` is a (dense) tensor of the ``state`` or starts where one does, taken as it is (no autograd node):
    rows of no example, like a layer's own positions, which a batch-free call takes (``_batching.batching_refused``).
    Sparse tensors have no data pointer."""
    if x.grad_fn is not None or x.layout != torch.strided:
        return False
    return any(t.layout == torch.strided and t.numel() and t.data_ptr() == x.data_ptr() for t in state.values())


def _merged_rows(x: Any, n: int, fold: int) -> bool:
    """Whether a layer's input ``x`` is floating rows ``[K, d]`` of several examples, ``K`` other than ``n`` (and than
    ``n fold``, the rows of a folded batch: multiple choice, checked by planning and per batch)."""
    return isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] not in (n, n * fold) and x.is_floating_point()


# Autograd nodes whose output rows are their first input's rows (row-wise ops between the reshape that merged a batch
# into rows and a layer fed them: OPT's LayerNorm before fc1 and activation between fc1 and fc2); and reshapes.
_ROW_WISE = {
    "NativeLayerNormBackward0", "ReluBackward0", "GeluBackward0", "TanhBackward0", "SigmoidBackward0",
    "SiluBackward0", "MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0", "CloneBackward0",
    "ToCopyBackward0",
}  # fmt: skip
_RESHAPES = {"ViewBackward0", "UnsafeViewBackward0"}


def _example_major(
    x: torch.Tensor, n: int, merged: set[Any], batch_leaves: Sequence[Any], steps: int = 16
) -> bool:
    """Whether the rows of ``x`` ``[K, d]`` provably come from a reshape of a tensor ``[n, ...]`` (example-major, so
    that each example's rows are its own ``K / n``), following ``x``'s autograd graph back through row-wise ops to
    that reshape, or to the output of a layer whose merged input was checked (``merged``); where ``x`` has no graph,
    the memory of one of the batch's tensors (``batch_leaves``) read in order, or any rows of a single example.
    Packed valid tokens (``h[mask]``: an index) are not. (A view's ``_base``, tried before, is the tensor the batch
    was sliced from: planning's single examples never passed, and a model reshaping its input left the batched
    path.)"""
    if x.grad_fn is None:
        return n == 1 or any(isinstance(t, torch.Tensor) and _same_rows(x, t, n) for t in batch_leaves)
    node = x.grad_fn
    for _ in range(steps):
        if node is None:
            return False
        if node in merged:
            return True
        name = type(node).__name__
        if name in _RESHAPES:
            sizes = node._saved_self_sym_sizes
            if sizes and int(sizes[0]) == x.shape[0] != n:  # (rows kept: each row reshaped within itself, followed
                node = node.next_functions[0][0]  # on; a gate's own `h.reshape(-1, d)` of rows merged before it)
                continue
            return len(sizes) >= 2 and int(sizes[0]) == n
        if name not in _ROW_WISE:
            return False
        node = node.next_functions[0][0]
    return False


def _same_rows(x: torch.Tensor, t: torch.Tensor, n: int) -> bool:
    """Whether ``x`` is ``t`` ``[n, ...]`` reshaped in memory order: both contiguous, one start, as many entries."""
    same = x.data_ptr() == t.data_ptr() and x.numel() == t.numel() and x.dtype == t.dtype
    return same and t.dim() > 1 and t.shape[0] == n and x.is_contiguous() and t.is_contiguous()


def _split_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[n k, ...]`` as ``[n, k, ...]`` (example-major, as planning checks on the first examples), else ``t``. Token
    ids ``[n k]`` only for one example, whose ids are all its own (an Embedding on ``torch.arange(T)``: nanoGPT's
    positions); merged from several examples, no check follows where they came from."""
    rows = t.shape[0]
    return t.reshape(n, rows // n, *t.shape[1:]) if rows != n and rows % n == 0 and (t.dim() > 1 or n == 1) else t


def _calls(module: nn.Module, expanded: Sequence[Site], names: Collection[str]) -> bool:
    """Whether an expanded site's own ``forward`` names one of ``names``: ``F.layer_norm`` / ``F.rms_norm``
    (``_NormsOfCopies``), ``repeat`` / ``tile`` (``_RepeatsOfCopies``); their modes run only then."""
    return any(_forward_names(type(module.get_submodule(s.path))) & set(names) for s in expanded)


_NORMS = ("layer_norm", "rms_norm")


@functools.cache
def _forward_names(layer: type) -> frozenset[str]:
    code = getattr(layer.forward, "__code__", None)  # (read once per class: asked at every batched pass)
    return frozenset(code.co_names) if code is not None else frozenset()


def _expanded(p: torch.Tensor, n: int, rank: int) -> torch.Tensor:
    """A leaf copy of ``p`` per example: a row ``[1, ...]`` as ``[n, ...]``, a vector shaped to broadcast against an
    output of ``rank`` dims (``[n, 1, ..., 1, d]``; ``[n, 1, ..., C, 1, 1]`` for a vector ``[C, 1, 1]``)."""
    shape = (n, *p.shape[1:]) if broadcast_row(p) else (n, *[1] * (rank - 1 - p.dim()), *p.shape)
    return p.detach().expand(shape).clone().requires_grad_()


def vmapped_factors(
    module: nn.Module, loss: ExampleLossFn, plan: Plan, mapper: Mapper
) -> Callable[[Tensors, Tensors, Any], tuple[dict[str, torch.Tensor], Factors]]:
    """``(diff, frozen, batch) -> (dense grads, factors)`` in one ``vmap(grad)`` pass over examples."""
    factored_names = {n for s in plan.sites for n in s.names}
    modules = dict(module.named_modules())
    probe_shapes: dict[Any, dict[str, list[tuple[int, ...]]]] = {}  # per example signature, found once per call

    def loss_of_example(dense: Tensors, probes: Mapping[str, Sequence[torch.Tensor]], frozen: Tensors, example: Any):
        inputs: dict[str, list[torch.Tensor]] = {s.path: [] for s in plan.sites}

        def hook_for(site: Site) -> Hook:
            def hook(layer: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor | None:
                if _without_gradient(args):  # (as the batched pass: a teacher's pass, nested tensors)
                    return None
                k = len(inputs[site.path])
                if k >= len(probes[site.path]):
                    _planned_differently(site.path, "is called more often on an example than on the batch's first")
                if output.shape != probes[site.path][k].shape:
                    shapes = f"{list(output.shape)} and the batch's first {list(probes[site.path][k].shape)}"
                    _planned_differently(site.path, f"gives an example an output of shape {shapes}")
                x = recorded_input(layer, site, args[0])  # the input itself copied: the model may change it in
                inputs[site.path].append(x.clone() if x is args[0] else x)  # place later (`_refuse_unfollowed`)
                return output + probes[site.path][k]

            return hook

        with hooked(module, {s.path: hook_for(s) for s in plan.sites}), refusing_uncalled(module, plan):
            out = scalar_loss(loss, {**frozen, **dense}, batch_of_one(example))
        for path, xs in inputs.items():
            if len(xs) < len(probes[path]):
                _planned_differently(path, "is called fewer times on an example than on the batch's first")
        return out, inputs

    mapped = mapper.grads_over_batch(loss_of_example, 3, argnums=(0, 1), has_aux=True)

    def factors(diff: Tensors, frozen: Tensors, batch: Any) -> tuple[dict[str, torch.Tensor], Factors]:
        signature = tuple((tuple(t.shape[1:]), t.dtype) for t in optree.tree_leaves(batch, none_is_leaf=True))
        if signature not in probe_shapes:
            probe_shapes[signature] = discover(module, loss, plan.sites, diff, frozen, batch)[0]
        dtype, device = next(iter(diff.values())).dtype, next(iter(diff.values())).device
        probes = {
            path: [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
            for path, shapes in probe_shapes[signature].items()
        }
        dense = {n: diff[n] for n in plan.dense}
        held = {**frozen, **{n: diff[n] for n in factored_names}}
        (dense_grads, probe_grads), inputs = mapped(dense, probes, held, batch)
        out = {}
        for site in plan.sites:
            xs, gs = inputs[site.path], probe_grads[site.path]
            rows = token_wise(modules.get(site.path), site)
            out[site.path] = ([_merged(x, rows) for x in xs], [_merged(g, rows) for g in gs])
        return dense_grads, out

    return factors


def _planned_differently(path: str, what: str) -> None:
    raise ValueError(
        f"`model`: layer {path!r} {what} (the call planned its factors on that one): the model's layers depend on "
        f"each example's values (how often they run, or on how many rows), which factors planned once cannot follow. "
        f"Pass `factored=False` (every gradient by `vmap(grad)`, or one example at a time)."
    )


def _merged(x: torch.Tensor, rows: bool) -> torch.Tensor:
    """``[examples, *one example's layer tensor]`` with the example's batch of one merged into the next dim. The
    batch of one is dim 0 of a convolution's (and any batch-first layer's) tensor, so this drops it; a sequence-first
    layer sees ``[T, 1, d]``, whose rows this keeps (indexing dim 0 would keep the first position's only). A token-wise
    layer (``rows``) fed ``[C, d]`` or ids ``[C]`` for one example (a model folding an example's C items into its
    batch: multiple choice) keeps those C rows, as it keeps the C T rows of ``[C, T, d]``."""
    if rows and x.dim() in (2, 3) and x.shape[1] != 1:
        return x
    return x.flatten(1, 2) if x.dim() > 2 else x[:, 0]
