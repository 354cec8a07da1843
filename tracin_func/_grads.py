"""Per-sample gradients: ``vmap(grad(loss))`` over a batch, with a per-example loop by plain autograd where vmap
fails."""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import traceback
import types
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import CheckpointError, CheckpointFunction

from ._data import examples_in
from ._loss import ExampleLossFn
from ._state import FLAT_ABOVE, MODULE_SLOTS, NESTING, as_found
from ._validate import cause_of, in_model_code
from ._warn import warn

Tensors = Mapping[str, torch.Tensor]
GradFn = Callable[[Tensors, Tensors, Any], dict[str, torch.Tensor]]  # (diff, frozen, batch) -> {name: [B, ...]}


def batch_of_one(example: Any) -> Any:
    """Give every tensor of one example back its batch dimension, as the torch.func per-sample-gradient tutorial."""
    return optree.tree_map(lambda t: t.unsqueeze(0), example, none_is_leaf=True)


def scalar_loss(loss: ExampleLossFn, state: Tensors, batch: Any) -> torch.Tensor:
    out = loss(state, batch)
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"The per-example loss must return a scalar, got {shape}.")
    return out.reshape(())


def example_at(batch: Any, i: int) -> Any:
    """Example ``i`` of ``batch``, without its batch dimension."""
    return optree.tree_map(lambda t: t[i], batch, none_is_leaf=True)


class Mapper:
    """Maps per-example functions over batches for one scoring call.

    Uses ``vmap``. If vmap fails (no batching rule, e.g. ``nn.GRU`` on torch 2.13; a branch on a tensor's value; an
    ``nn.LSTM`` on a ``PackedSequence`` or an ``autograd.Function`` without ``setup_context``, which torch.func cannot
    run at all), it warns once naming the cause and every function of the call loops over examples from then on:
    gradients by plain autograd, others by the function itself. Results are identical. The only state is that
    switch (set by planning too, for a forward computing in half precision: ``_plan.LOWERED_LOOP``), and a Mapper
    lives for one call.
    """

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size
        self.loop = False  # vmap failed: one example at a time from then on
        self.plain = False  # ... by plain autograd (the failing function's plain form was given)

    def over_batch(
        self,
        one: Callable[..., Any],
        n_static: int,
        plain: Callable[..., Any] | None = None,
        looped: str = "this model, so per-example gradients are computed",
        runs_model: bool = False,
    ) -> Callable[..., Any]:
        """``f(*static, batch)`` stacking ``one(*static, example)`` over the examples of ``batch``; ``plain``: the same
        function by plain autograd, which a failed vmap loops over examples (else ``one``); ``looped``: what a failed
        vmap leaves to a loop, in the warning's words. ``runs_model``: each run (an example's in the loop, a chunk's
        under vmap) starts from the model as the call found it (``_state.as_found``): the loop carried what one
        example's forward kept to the next (Llama's dynamic RoPE table: 5-8% off, silently; a review sweep's)."""
        if runs_model:
            one, plain = _as_found_first(one), None if plain is None else _as_found_first(plain)
        # randomness "same": a random number drawn and never read (``_purity`` refuses a read) does not stop vmap
        fast = vmap(one, in_dims=(None,) * n_static + (0,), randomness="same", chunk_size=self.chunk_size)

        # looped by plain autograd where it is given: one backward per example, 2-4x faster than torch.func.grad's
        # (found by review), and it runs models torch.func cannot run (an autograd.Function without setup_context)
        each = one if plain is None else plain

        checked = []  # whether a first batch of two or more was checked for a batching rule mixing it

        def mapped(*args: Any) -> Any:
            if self.loop:
                return _looped(each, args)
            try:
                with _MathAttention():
                    result = fast(*args)
                if not checked and examples_in(args[-1]) > 1:  # (a batch of one shows no mixing)
                    checked.append(True)
                    differs = _mixed_by_vmap(result, fast, args)
                    if differs:
                        raise VmapDiffers(differs)
                return result
            except Exception as vmap_error:  # (a ValueError: a criterion given a wrong batching rule's shape)
                if not isinstance(vmap_error, (RuntimeError, NotImplementedError, ValueError)) and not in_dynamo(
                    vmap_error
                ):
                    raise  # (dynamo compiling the user's loss under vmap fails on its own assertion: looped too)
                result = _looped(each, args)  # a genuine error in the loss raises here, from the loop
                self.loop, self.plain = True, plain is not None
                how = " by plain autograd" if plain is not None else ""
                sparse = (  # (an EmbeddingBag given offsets, an F.embedding with sparse=True: a review helper's)
                    ". A lookup with `sparse=True` gives sparse gradients, which vmap cannot take: with `sparse=False` "
                    "the same scores run under vmap"
                    if "with arguments from the 'Sparse" in str(vmap_error) else ""
                )  # fmt: skip
                failed = "mixed the examples of a batch" if isinstance(vmap_error, VmapDiffers) else "failed"
                warn(
                    f"torch.func.vmap {failed} on {looped} one example at a time, in a loop{how}, instead (same "
                    f"results, slower)"
                    f"{in_model_code(vmap_error)}{sparse}. The cause, in full: {cause_of(vmap_error)}",
                    RuntimeWarning,
                )
                return result

        return mapped

    def grads_over_batch(
        self, f: Callable[..., Any], n_static: int, argnums: int | tuple[int, ...] = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        """``over_batch`` of ``torch.func.grad(f, argnums, has_aux)``, by plain autograd where torch.func fails."""
        transformed = grad(f, argnums, has_aux)

        def detached(*args: Any) -> Any:
            with torch.no_grad():  # (grad differentiates inside all the same) a tensor of the user's that the loss
                return transformed(*args)  # reads, needing gradients, kept the scores in a graph of it, returned

        return self.over_batch(detached, n_static, plain=plain_grad(f, argnums, has_aux), runs_model=True)


class VmapDiffers(RuntimeError):
    """``torch.func.vmap`` gave an example other results in its batch than in two copies of it (``_mixed_by_vmap``)."""


@torch.compiler.disable  # (eager: a check, once a call)
def _mixed_by_vmap(result: Any, fast: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """How vmap's ``result`` for a few examples of ``args``' batch of two or more (its last, its largest result, its
    smallest) differs from what vmap gives them as a batch of their own, each first in turn (beyond 1e-4 of each
    tensor's largest entry and 1000 eps of all's), else ``""``: a batching rule of torch's can mix the examples where
    an unbatched operand meets a batched one (``torch.linalg.solve(M, b)`` gave each example the batch's rows: 255x
    off), or give every example but the first the first's part (``torch.cdist`` of two tensors of the parameters
    alone, a sparse GP's inducing points: 73% off; unseen where the examples compared had the first's part, zero
    gradients of a hinge loss or a gate, a duplicate), silently (review helpers'). Not checked against an example run
    alone by plain autograd: torch's CPU BatchNorm backward is wrong for a batch of one (``_TokensConvNorm``), vmap's
    right."""
    *static, batch = args
    results = _floating_rows(result)
    if not results:
        return ""
    n = len(results[0])
    sizes = sum(torch.linalg.vector_norm(t.reshape(n, -1), dim=1).double().nan_to_num(0, 0, 0) for t in results)
    picked = list(dict.fromkeys([n - 1, int(sizes.argmax()), int(sizes.argmin())]))
    picked = picked if len(picked) > 1 else [0, n - 1]
    # rounding: of each tensor's size, and of all's, a thousand eps (gradients that cancel to rounding, CvT's 1e-25
    # in float64, an instance norm's bias's 4e-8 in float32, differ by all of their size)
    overall = max(_largest(t) * 1e3 * torch.finfo(t.dtype).eps for t in results)
    for k in range(len(picked)):
        order = picked[k:] + picked[:k]
        rows = optree.tree_map(functools.partial(_rows, order), batch, none_is_leaf=True)
        with _MathAttention():
            again = fast(*static, rows)
        for got, own in zip(results, _floating_rows(again)):
            if got.shape[1:] != own.shape[1:]:
                return f"{_MIXED}: a result of shape {list(got.shape[1:])} in the batch, {list(own.shape[1:])} in a few"
            for i, row in zip(order, own):
                if not torch.allclose(got[i], row, rtol=0, atol=1e-4 * _largest(got[i]) + overall, equal_nan=True):
                    off = float((got[i] - row).abs().nan_to_num(0, 0, 0).max())
                    return f"{_MIXED}: results {off:.3g} apart in the batch and in a batch of a few examples of it"
    return ""


_MIXED = "a batching rule of torch's mixes the examples of a batch"


def _floating_rows(tree: Any) -> list[torch.Tensor]:
    """A vmapped result's floating tensors, each ``[B, ...]``, detached."""
    return [t.detach() for t in optree.tree_leaves(tree, none_is_leaf=True)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim()]  # fmt: skip


def _rows(at: list[int], t: Any) -> Any:
    return t[at] if isinstance(t, torch.Tensor) else t


def _largest(t: torch.Tensor) -> float:
    """A tensor's largest magnitude, NaNs and infinities left out (no copy of it: a batch's gradients are large)."""
    if not t.numel():
        return 0.0
    largest = float(torch.linalg.vector_norm(t, ord=math.inf))
    return largest if math.isfinite(largest) else float(t.abs().nan_to_num(0, 0, 0).max())


def _as_found_first(f: Callable[..., Any]) -> Callable[..., Any]:
    def from_found(*args: Any) -> Any:
        as_found()
        return f(*args)

    return from_found


def _looped(one: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    *static, batch = args
    n = optree.tree_leaves(batch, none_is_leaf=True)[0].shape[0]
    outs = [one(*static, example_at(batch, i)) for i in range(n)]
    dense = lambda x: x.to_dense() if isinstance(x, torch.Tensor) and x.is_sparse else x  # noqa: E731  (sparse=True)
    return optree.tree_map(lambda *xs: torch.stack([dense(x) for x in xs]), *outs, none_is_leaf=True)


def plain_grad(f: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False) -> Callable[..., Any]:
    """``torch.func.grad(f, argnums, has_aux)`` by plain autograd: the arguments ``argnums`` (trees of tensors) become
    fresh leaves, so the caller's tensors are never touched; an input the output does not use gets zeros, as
    torch.func gives."""
    nums = (argnums,) if isinstance(argnums, int) else argnums

    def grads(*args: Any) -> Any:
        args = tuple(
            optree.tree_map(lambda t: t.detach().requires_grad_(), a) if i in nums else a for i, a in enumerate(args)
        )
        held = {memory_of(t) for t in optree.tree_leaves(args[:-1]) if isinstance(t, torch.Tensor)}  # (the state)
        with torch.enable_grad(), _RefuseCheckpointing(held):
            out = f(*args)
        value, aux = out if has_aux else (out, None)
        leaves, spec = optree.tree_flatten(tuple(args[i] for i in nums))
        if leaves and value.requires_grad:
            grads = torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True)
        else:  # a loss that uses none of them
            grads = [torch.zeros_like(t) for t in leaves]
        found = optree.tree_unflatten(spec, grads)
        found = found[0] if isinstance(argnums, int) else found
        return (found, optree.tree_map(torch.Tensor.detach, aux)) if has_aux else found

    return grads


class _MathAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` by its math kernel, the one with vmap batching rules (the fused CPU kernels
    fall back to a slow loop under vmap), in this thread only: torch's ``sdpa_kernel`` sets process-wide flags, which
    concurrent calls left restricted to the math kernel for good (their saving and restoring interleaved) and which
    switched other threads' kernels mid-run (another call's two plain runs then differed, refused as random)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func is F.multi_head_attention_forward:  # (its SDPA call runs inside, unseen by the mode: the fused kernel)
            bound = _MHA_SIGNATURE.bind(*args, **(kwargs or {}))
            if _no_row_hidden(bound.arguments):  # the path giving weights too computes them by the math
                bound.arguments["need_weights"] = True
                return func(*bound.args, **bound.kwargs)[0], None
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        named = {**dict(zip(_SDPA_ARGS, args)), **(kwargs or {})}
        query, key, value = (named.pop(k) for k in _SDPA_ARGS[:3])
        mask = named.get("attn_mask")
        if mask is not None and mask.dtype == torch.bool:  # the kernel adds its mask: True keeps a key, False hides it
            named["attn_mask"] = torch.zeros_like(mask, dtype=query.dtype).masked_fill(~mask, -math.inf)
        return torch.ops.aten._scaled_dot_product_attention_math(query, key, value, **named)[0]


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _no_row_hidden(arguments: Mapping[str, Any]) -> bool:
    """Whether an attention asked for no weights masks no query's every key: no padding mask, and no mask but a
    causal one. The path giving weights softmaxes a row of -inf to NaN, where SDPA's kernels give 0."""
    given = arguments.get
    return not given("need_weights", True) and given("key_padding_mask") is None and (
        given("attn_mask") is None or given("is_causal", False)
    )


INFERENCE_FORWARD = (
    "`model`: its output is computed under `torch.inference_mode()` (a decorated `forward`, say), through which torch "
    "takes no gradient. Leave the mode off the path from the parameters scored to the output (a constant computed "
    "under it, or under `torch.no_grad()`, is fine)."
)


CHECKPOINTED = (
    "`model`: its forward runs under activation checkpointing (`torch.utils.checkpoint`), whose backward pass "
    "recomputes layers with the module's own tensors, not the checkpoint's, and without the per-example factors' "
    "probes. Switch checkpointing off for scoring (Hugging Face: `model.gradient_checkpointing_disable()`; your own "
    "code: call the checkpointed function directly); the scores are the same, only memory grows."
)


REENTRANT = (
    "`model`: its forward runs a region that reads a tensor needing gradients (a parameter being scored, or an input "
    "of the region) under reentrant activation checkpointing (`torch.utils.checkpoint.checkpoint(..., "
    "use_reentrant=True)`, or a custom `autograd.Function` calling layers in its forward, or reading the model's "
    "tensors there other than as its inputs), which runs the region "
    "without gradients (its parameters get none unless an input of the region requires one, and then its backward "
    "runs it again with the model's own tensors, not the checkpoint's): their scores would be 0, wrong or fail. "
    "Switch checkpointing off for scoring (Hugging Face: "
    "`model.gradient_checkpointing_disable()`; your own code: call the checkpointed function directly); the scores "
    "are the same, only memory grows. (A straight-through estimator's Function calling a layer that holds tensors, a "
    "fake quantizer's scale, cannot be told from it: write it as `x + (f(x) - x).detach()`.)"
)


def checkpointing() -> bool:
    """Whether the op being run is inside a non-reentrant ``torch.utils.checkpoint`` region (its saved-tensor hooks
    are the innermost; ``torch.autograd.graph.save_on_cpu``'s are harmless and pass)."""
    hooks = saving_hooks()
    return hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"


@torch.compiler.disable  # (dynamo tracing a compiled loss or helper through the library's modes breaks its graph
def saving_hooks() -> Any:  # here, where it warned it cannot trace the lookup and to file an issue; traced through, a
    """The innermost saved-tensor hooks, or None."""  # compiled BatchLoss over an nn.Sequential failed)
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def reentrant_checkpointing() -> bool:
    """Whether the code being run is inside a reentrant checkpointed region: gradients off, under
    ``torch.utils.checkpoint``'s ``CheckpointFunction.forward``, or in a layer called by a custom
    ``autograd.Function``'s forward (checkpointing written by hand, as fairscale's or DeepSpeed's: its backward runs the
    region again after scoring has put the model's own tensors back, 36-65% off and its layers' scores 0, silently,
    before; a forward without ``ctx``, torch 2's style with ``setup_context``, is found by ``Function.apply`` below
    it: 23% off, silently, before). A ``no_grad`` block of the model's own is not one, nor a Function computing an op
    or calling layers holding no tensor (a straight-through estimator's ``nn.Tanh``: run again, it computes the same;
    refused since the ``setup_context`` style was found); the stack is walked only with gradients off."""
    if torch.is_grad_enabled():
        return False
    frame, in_layer = sys._getframe(1), False
    while frame is not None:
        if frame.f_code is _REENTRANT_FORWARD:
            return True
        if any(frame.f_code is call for call in _MODULE_CALLS):  # (by identity: dynamo's frames may hold no code)
            in_layer = in_layer or _holds_tensors(frame.f_locals.get("self"))
        elif in_layer and (
            frame.f_code is _FUNCTION_APPLY
            or frame.f_code.co_name == "forward" and isinstance(frame.f_locals.get("ctx"), FunctionCtx)
        ):
            return True
        frame = frame.f_back
    return False


def _holds_tensors(module: Any, parameters: bool = False) -> bool:
    """Whether ``module`` (a layer being called) or one of its sublayers holds a tensor (``parameters``: a parameter):
    a parameter, a buffer, or in an attribute, containers and layers there too (a layer reaching another's weight
    through a list, recomputed by the Function's backward with the model's own: 37% off per example, silently). Each
    layer looked at once (one holding its parent in a list)."""
    if not isinstance(module, torch.nn.Module):
        return True  # (unknown: taken as holding some)
    seen: set[int] = set()

    def holds(value: Any, depth: int) -> bool:
        if isinstance(value, torch.Tensor):
            return not parameters or isinstance(value, torch.nn.Parameter)
        if isinstance(value, torch.nn.Module):
            if id(value) in seen:
                return False
            seen.add(id(value))
            own = [v for k, v in vars(value).items() if k not in MODULE_SLOTS] + list(value._modules.values())
            held = value._parameters or not parameters and value._buffers
            return bool(held) or any(holds(v, NESTING) for v in own)
        if depth and isinstance(value, (list, tuple, dict)) and len(value) <= FLAT_ABOVE:
            return any(holds(v, depth - 1) for v in (value.values() if isinstance(value, dict) else value))
        return False

    return holds(module, NESTING)


_REENTRANT_FORWARD = CheckpointFunction.forward.__code__
_FUNCTION_APPLY = torch.autograd.Function.apply.__func__.__code__
_MODULE_CALLS = (torch.nn.Module._call_impl.__code__, torch.nn.Module._wrapped_call_impl.__code__)


def refuse_checkpointing(args: Any, kwargs: Any, held: Collection[int] = ()) -> None:
    """Raises where an op of a forward runs in a checkpointed region it cannot be scored through: a non-reentrant
    one (``checkpointing``), or a reentrant one reading a tensor that requires gradients (a parameter being scored,
    or a region input that does), or an op of a custom ``autograd.Function``'s forward that is checkpointing written
    by hand around weights read directly (``_read_in_a_function``; ``held``: where the call's state lies,
    ``memory_of``)."""
    if checkpointing():
        raise ValueError(CHECKPOINTED)
    if torch.is_grad_enabled():
        return
    tensors = [t for t in optree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if reentrant_checkpointing():
        if any(t.requires_grad for t in tensors):
            raise ValueError(REENTRANT)
    elif tensors and _read_in_a_function(tensors, held):
        raise ValueError(REENTRANT)


def _read_in_a_function(tensors: Sequence[torch.Tensor], held: Collection[int]) -> bool:
    """Whether an op of a custom ``autograd.Function``'s forward reading ``tensors`` is checkpointing written by
    hand around weights read directly (``F.linear(h, self.w)``, not a layer's call), whose backward runs the region
    again with the module's own tensors, not the checkpoint's, so that the weights get no gradient of their own
    (scored 0, the layers before them 3-45% off, silently; review helpers'): the op reads a tensor needing gradients
    that is none of the Function's inputs, or the Function is given a region to run (a function, a method, a lambda:
    ``_region``) and the op reads a tensor of the call's state (``held``; given as an input too), with gradients
    needed. A Function's op on its inputs (a custom kernel, a straight-through estimator given its quantizer, module
    or method, reading the quantizer's buffer or none) is its own."""
    candidates = [t for t in tensors if t.requires_grad or memory_of(t) in held]
    if not candidates:  # (an op on what the forward computed under no_grad: no stack walked)
        return False
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not _FUNCTION_APPLY:
        frame = frame.f_back
    if frame is None:
        return False
    given = optree.tree_leaves((frame.f_locals.get("args"), frame.f_locals.get("kwargs")), none_is_leaf=True)
    inputs = [t for t in given if isinstance(t, torch.Tensor)]
    within = {memory_of(t) for t in inputs}  # (a view of an input, `w.T`, is the input's)
    if any(t.requires_grad and memory_of(t) not in within for t in candidates):
        return True
    state = any(memory_of(t) in held for t in candidates)
    return state and any(map(_region, given)) and any(t.requires_grad for t in (*candidates, *inputs))


def _region(given: Any) -> bool:
    """Whether an argument of a Function is a region to run (a hand-written checkpoint's ``run_function``): anything
    callable (a lambda, a callable object, a partial of one), but torch's own ops and functions (``torch.round``,
    ``F.hardtanh``), a class, a module (a straight-through estimator's quantizer, reading its buffer) and a module's
    method reaching no parameter (a sweep found a callable object, a staticmethod and a method reaching weights
    through a list missed as regions, 30% off, silently)."""
    if isinstance(given, functools.partial):
        return _region(given.func)
    if isinstance(given, (torch.Tensor, type, torch.nn.Module, *_TORCH_OPS)):
        return False
    if isinstance(getattr(given, "__self__", None), torch.nn.Module):
        return _holds_tensors(given.__self__, parameters=True)
    if isinstance(given, types.FunctionType) and (given.__module__ or "").split(".")[0] == "torch":
        return False
    return callable(given)


# torch's ops given to a Function: C functions and methods (``torch.round``, ``Tensor.round``)
_TORCH_OPS = (
    types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodDescriptorType, types.WrapperDescriptorType,
)  # fmt: skip


def memory_of(t: torch.Tensor) -> int:
    """Where ``t``'s elements lie (its storage's address; its identity where it has none): its views' too."""
    try:
        return t.untyped_storage().data_ptr() or id(t)
    except (RuntimeError, NotImplementedError):  # (a tensor subclass or a functorch wrapper without storage)
        return id(t)


_CHECKPOINT_CODE = os.path.join("torch", "utils", "checkpoint.py")
_FUNCTION_CODE = os.path.join("torch", "autograd", "function.py")


def refuse_recomputed(err: RuntimeError) -> None:
    """Raises the refusal of checkpointing where ``torch.utils.checkpoint``'s code raised ``err`` in a backward pass
    (a region recomputed with the module's own tensors, in another dtype or without the factors' probes; a reentrant
    region refusing ``autograd.grad``)."""
    stack = traceback.extract_tb(err.__traceback__)
    frames = [f for f in stack if f.filename.endswith(_CHECKPOINT_CODE)]
    if frames or isinstance(err, CheckpointError):
        raise ValueError(REENTRANT if any(f.name == "backward" for f in frames) else CHECKPOINTED) from err
    applied = next((i for i, f in enumerate(stack) if f.filename.endswith(_FUNCTION_CODE) and f.name == "apply"), None)
    recomputing = applied is not None and any(f.name == "backward" for f in stack[applied + 1 :])
    if recomputing and "require grad" in str(err):  # (a custom Function's backward differentiating a region run
        raise ValueError(REENTRANT) from err  # again, whose tensors the call gave no gradient: checkpointing by hand)


class _RefuseCheckpointing(TorchFunctionMode):
    """Refuses activation checkpointing in a plain-autograd forward (``refuse_checkpointing``). A non-reentrant
    region's backward recomputes it after ``functional_call`` has put the module's own tensors back, so the
    checkpoint's would get wrong gradients, silently (35-84% off); torch.func refuses such regions itself, which is how
    a model gets here. A reentrant one runs without gradients, so its parameters would silently get none."""

    def __init__(self, held: Collection[int]) -> None:
        super().__init__()
        self.held = held  # the call's state (``refuse_checkpointing``)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        refuse_checkpointing(args, kwargs, self.held)
        return func(*args, **(kwargs or {}))


def in_dynamo(err: BaseException) -> bool:
    """Whether ``err`` was raised inside torch's compiler (dynamo tracing a function the user compiled)."""
    return any(_DYNAMO_CODE in f.filename for f in traceback.extract_tb(err.__traceback__))


_DYNAMO_CODE = os.path.join("torch", "_dynamo", "")


def dense_grads(loss: ExampleLossFn, mapper: Mapper) -> GradFn:
    """``(diff, frozen, batch) -> {name: [B, *shape]}``, the per-sample gradients w.r.t. ``diff``."""

    def loss_of_example(diff: Tensors, frozen: Tensors, example: Any) -> torch.Tensor:
        return scalar_loss(loss, {**frozen, **diff}, batch_of_one(example))

    return mapper.grads_over_batch(loss_of_example, 2)


@torch.compiler.disable  # (eager: dynamo traced a view's base as a tensor that is None when the graph runs)
def lasting_edge(output: torch.Tensor) -> GradientEdge | None:
    """Where autograd passes ``output``'s gradient, also after the model changes ``output`` in place; None if no such
    place. A view's own node leaves the graph when the view is changed in place (autograd rebases it onto its base),
    and its gradient there would be silently zero: ``F.linear`` on ``[B, T, d]`` returns a view of its ``[B T, d]``
    product, which Longformer then scales with ``/=``. That base's node stays: the edge of a base that the view
    covers whole, in the same layout; None for a view of part of a tensor (a probe then)."""
    if not output._is_view():
        return get_gradient_edge(output)
    base = output._base
    whole = base.numel() == output.numel() and output.storage_offset() == base.storage_offset()
    if base.grad_fn is None or not (whole and output.is_contiguous() and base.is_contiguous()):
        return None
    return get_gradient_edge(base)
