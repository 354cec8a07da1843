"""Everything one scoring call needs, validated at the edge and prepared once: the model's function shape, the
checkpoints on the target device, the losses and the options."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ._adam import with_adam_states
from ._aliasing import warn_aliased_params
from ._allocator import keep_freed_batches
from ._checkpoints import Checkpoint
from ._context import check_precision
from ._distributed import Ranks, check_device, resolve
from ._last_layer import linear_candidates
from ._loss import ExampleLoss, ExampleLossFn, example_loss
from ._loss_dtype import in_dtype
from ._model import (
    CheckpointState,
    ModelSpec,
    ParamSelector,
    checked_state,
    computation_dtype,
    converted,
    exclusive_use,
    model_spec,
    warn_taken_from_model,
)
from ._validate import boolean, positive_int


class Setup(NamedTuple):
    """A validated scoring call. The driver iterates the data; planning happens on its first batch."""

    spec: ModelSpec
    checkpoints: list[CheckpointState]
    train_loss: ExampleLossFn
    test_loss: ExampleLossFn  # the same object as ``train_loss`` when no ``test_loss_fn`` was given
    method: str  # "exact" | "last_layer"
    factored: bool | None
    chunk_size: int | None
    compile: bool
    projection: tuple[int, int] | None  # (k, seed) for projected embeddings
    device: torch.device
    dtype: torch.dtype  # of the computation: checkpoints and floating inputs are converted to it
    batch_size: int
    needs_target: tuple[bool, bool]  # (train, test): a criterion needs (x..., y) batches
    progress: bool
    ranks: Ranks | None = None  # torch.distributed: this process's share of the training data
    test_budget: int | None = None  # bytes of test representations held at once (more: scored in chunks)
    auto_batch: bool = False  # ``batch_size`` is a guess before the plan (dense gradients): the plan sizes batches


def in_use(setup: Setup, *, passes_start: bool = True) -> AbstractContextManager[None]:
    """``exclusive_use`` of the call's model, and of its losses' criteria."""
    return exclusive_use(setup.spec, setup.train_loss, setup.test_loss, passes_start=passes_start)


def _default_device(model: Any, first: Checkpoint) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    tensors = [t for t in first.params.values() if isinstance(t, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


def target_device(device: Any, default: Callable[[], torch.device], whose: str) -> torch.device:
    """The device tensors made for ``device`` (or ``default()``, ``whose`` by default) land on: ``'cuda'`` resolves to
    ``cuda:0`` (the current one) and ``'cpu:0'`` to ``cpu``, as a tensor's ``.device`` reads, so devices compare."""
    try:
        target = torch.device(device) if device is not None else default()
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device`={device!r} is not a device ({err}); pass e.g. 'cpu' or 'cuda:0'.") from err
    if target.type == "meta":
        source = "`device`" if device is not None else f"`device` ({whose}, by default)"
        raise ValueError(
            f"{source} is 'meta', which holds no values; pass `device='cpu'` or an accelerator, with real weights."
        )
    try:
        return torch.empty(0, device=target).device
    except Exception as err:  # torch raises RuntimeError or AssertionError for a device it was not built for
        raise ValueError(
            f"`device`={str(target)!r} is not available on this machine ({str(err).splitlines()[0]}); pass "
            f"`device='cpu'` or an available accelerator."
        ) from err


def _check_loss(loss_fn: Any, name: str) -> None:
    if isinstance(loss_fn, type):
        raise TypeError(
            f"`{name}` is the class {loss_fn.__module__.replace('torch.nn.modules.loss', 'nn')}.{loss_fn.__name__}; "
            f"pass an instance, e.g. `nn.{loss_fn.__name__}()`."
        )


# On CPU, a batch whose per-example tensors outgrow the caches runs slower: scoring reads what a batch holds (factors,
# per-sample gradients) back after its backward pass, from memory once it no longer fits the last-level cache. Large
# representations get 64 MB per batch, counted as held (a layer formed when scored by its factors: ``_plan``'s
# ``_example_bytes``), but at least 128 examples (fixed costs per batch: MobileNet's influence took 1.97 s in batches
# of 50, 1.90 s of 100). Counted by formed gradients and given 32 MB (before the night of 2026-12-04), the tiny
# transformer (204 KB held per example) ran in batches of 125 and BERT (245 KB) in two of 100: influence 1.50 / 1.43
# / 1.39 s in batches of 125 / 200 / 250 and 0.46 / 0.42 s in batches of 100 / 200, self-influence 1.06 / 1.05 / 1.03
# s and 0.36 / 0.33 s (DeBERTa and a ConvNeXt 1-6% faster in one batch of 200, the GPT-2 classifier 2-5% slower;
# GPT-2's logits keep it at 100, below). Small ones get 512 per batch (the digits CNN, 27 KB: influence 0.47 / 0.44 /
# 0.43 s in batches of 250 / 500 / 750, self-influence 0.31 / 0.29 / 0.29 s), or 4 MB when that holds more (the
# digits MLP, 2.4 KB, runs fastest in one batch of 1500). Timed alternately in one process, freed batches kept
# (``_allocator``).
_CPU_BATCH_EXAMPLES = (128, 512)
_CPU_SMALL_BATCH_BYTES = 1 << 22
_CPU_BATCH_BYTES = 1 << 26
# The forward's own tensors count too: its largest gets 16 MB per batch, however few examples that leaves (16 at
# least), half of the last-level cache and of glibc's largest mmap threshold (``_allocator``), above which a tensor is
# faulted in afresh at every allocation. Mamba's PyTorch scan makes ``[B, 128, 32, 16]`` tensors (256 KB per example)
# and slices them token by token: its plain forward / backward over 200 examples took 3.4-3.9 / 3.6-4.3 / 4.9 / 4.5-5.4
# / 14.9 s in batches of 25 / 50 / 64 / 100 / 200, and our influence 4.9-6.6 / 5.1-6.4 / 5.7-8.1 s in batches of 25 /
# 50 / 100. GPT-2's and Swin's, 125-128 KB (logits, windows), keep 128 examples (GPT-2's influence 0.93-0.98 s in
# batches of 100, 1.06-1.07 s of 50).
_CPU_TENSOR_BYTES = 1 << 24


def auto_batch_size(
    example_bytes: int, device: torch.device, budget_bytes: int = 1 << 28, tensor_bytes: int = 0
) -> int:
    """Examples per batch whose gradient representations fit ``budget`` (16 to 4096, fewer where 16 would not fit:
    one example of 1 GB held 16 GB); on CPU 64 MB of representations, 128 to 512 examples, or more when 4 MB holds
    more (small examples), and fewer where the largest tensor of the forward (``tensor_bytes`` per example) would
    outgrow 16 MB."""
    example_bytes = max(1, example_bytes)
    fits = max(1, budget_bytes // example_bytes)
    most = fits
    if device.type == "cpu":
        fewest, most_examples = _CPU_BATCH_EXAMPLES
        cached = _CPU_BATCH_BYTES // example_bytes
        small = _CPU_SMALL_BATCH_BYTES // example_bytes  # above 256 for small examples only
        most = min(most, max(fewest, min(cached, max(most_examples, small))), _CPU_TENSOR_BYTES // max(1, tensor_bytes))
    return min(fits, max(16, min(4096, most)))


def even_batches(most: int) -> Callable[[int], int]:
    """Remaining examples -> the next batch's size: at most ``most``, the same for every batch up to one example
    (no small last batch)."""
    return lambda left: -(-left // -(-left // most))


def make_setup(
    model: Any,
    checkpoints: Iterable[Checkpoint],
    *,
    loss_fn: Any,
    test_loss_fn: Any = None,
    params: ParamSelector = None,
    layers: Sequence[str] | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    progress: bool = False,
    compile: bool = False,
    factored: bool | None = None,
    method: str = "exact",
    projection: tuple[int, int] | None = None,
    distributed: Any = False,
    test_memory_bytes: int = 1 << 30,
    checkpoints_as: str | None = None,
) -> Setup:
    """Validate the options shared by every scorer and prepare each checkpoint once. ``checkpoints_as``: how
    messages name a single checkpoint made from another argument (a tracer's ``params``)."""
    if isinstance(checkpoints, (Checkpoint, str)) or not isinstance(checkpoints, Iterable):
        raise TypeError(
            f"`checkpoints` must be a list of `tc.Checkpoint`, got {type(checkpoints).__name__}; load files with "
            f"`tc.load_checkpoints(...)`."
        )
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("`checkpoints` is empty; pass at least one `tc.Checkpoint(params=..., lr=...)`.")
    if loss_fn is None:
        raise TypeError("`loss_fn` is required: a criterion such as `nn.CrossEntropyLoss()`, or `tc.ExampleLoss(fn)`.")
    _check_loss(loss_fn, "loss_fn")
    _check_loss(test_loss_fn, "test_loss_fn")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"`dtype` must be a floating torch.dtype such as torch.float64, got {dtype!r}.")
    if method not in ("exact", "last_layer"):
        raise ValueError(f"`method` must be 'exact' or 'last_layer', got {method!r}.")
    if method == "last_layer" and not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"`method='last_layer'` picks an nn.Module's final nn.Linear, and `model` is a {type(model).__name__}: "
            f"score a function's last layer with `params=` its names and the default `method='exact'`."
        )
    if method == "last_layer" and (params is not None or layers is not None):
        raise ValueError(
            "`method='last_layer'` picks the model's final nn.Linear itself: drop `params` / `layers`, or keep them "
            "and use the default `method='exact'`."
        )
    for name, value in (("strict", strict), ("progress", progress), ("compile", compile)):
        boolean(value, name)
    if factored is not None and not isinstance(factored, bool):
        raise TypeError(f"`factored` must be None (choose per layer), True or False, got {factored!r}.")
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, "chunk_size")
    test_memory_bytes = positive_int(test_memory_bytes, "test_memory_bytes")
    ranks = resolve(distributed)
    first = checkpoints[0]
    if not isinstance(first, Checkpoint):
        raise TypeError(
            f"`checkpoints[0]` is a {type(first).__name__}; wrap it as `tc.Checkpoint(params=state_dict, lr=...)` or "
            f"load files with `tc.load_checkpoints`."
        )
    private = not any(isinstance(fn, ExampleLoss) for fn in (loss_fn, test_loss_fn))
    spec = model_spec(model, first.params, params, layers, private=private)
    if method == "last_layer":
        spec = spec._replace(diff_names=linear_candidates(model, spec.diff_names, spec.aliases))
    target = target_device(device, lambda: _default_device(model, first), "the model's")
    check_device(ranks, target)
    if target.type == "cpu":
        keep_freed_batches()
    shapes = {n: tuple(t.shape) for n, t in (spec.defaults or first.params).items() if isinstance(t, torch.Tensor)}
    checked = [
        checked_state(spec, c, checkpoints_as or f"checkpoints[{i}]", shapes=shapes, strict=strict)
        for i, c in enumerate(checkpoints)
    ]
    states = [state for state, _ in checked]
    warn_taken_from_model([taken for _, taken in checked], checkpoints_as or "checkpoints")
    dtype = dtype or computation_dtype(states, [c.params for c in checkpoints])
    check_precision(dtype, target, "tensors are converted for the call, never changed")
    bar = tqdm(zip(states, checkpoints), total=len(states), desc="preparing checkpoints", unit="ckpt",
               disable=not progress, leave=False)
    prepared = [converted(state, c.lr, target, dtype, spec.unsaved, spec.following) for state, c in bar]
    for i, (c, p) in enumerate(zip(checkpoints, prepared)):  # (an inf blamed every example's gradients; a 0 scored 0)
        if not 0 < float(p.lr) < math.inf:
            raise ValueError(
                f"`{checkpoints_as or f'checkpoints[{i}]'}`: learning rate {float(c.lr):g} is {float(p.lr):g} in "
                f"{str(dtype).replace('torch.', '')}, outside its range. Pass `dtype=torch.float64`, or rescale the "
                f"learning rates (scores scale with them)."
            )
    prepared = with_adam_states(model, checkpoints, prepared, shapes, target, dtype, spec.diff_names)
    warn_aliased_params(checkpoints, spec.diff_names, function=spec.module is None)
    auto_batch = batch_size is None  # the plan sizes the batches; before it (index builds), dense gradients, which
    # overstate what most plans hold: at least 16 examples there (the bound below 16 made a 69 MB model's build run
    # in batches of 3, 1.8x slower, its plan holding far less)
    dense_bytes = sum(prepared[0].state[n].nbytes for n in spec.diff_names)
    batch_size = batch_size or max(16, auto_batch_size(dense_bytes, target))
    train_loss = example_loss(spec.forward, in_dtype(loss_fn, dtype), "loss_fn")
    same = test_loss_fn is None or test_loss_fn is loss_fn
    test_loss = train_loss if same else example_loss(spec.forward, in_dtype(test_loss_fn, dtype), "test_loss_fn")
    needs_target = (not isinstance(loss_fn, ExampleLoss), not isinstance(test_loss_fn or loss_fn, ExampleLoss))
    return Setup(
        spec, prepared, train_loss, test_loss, method, factored, chunk_size, compile, projection, target, dtype,
        batch_size, needs_target, progress, ranks, test_memory_bytes, auto_batch,
    )
