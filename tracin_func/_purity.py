"""A dry run of the loss on one example that refuses forward passes a score cannot be trusted with.

The forward pass must be a function of the checkpoint and the example: a module that updates state (running
statistics of a train-mode norm layer, spectral norm's power-iteration vectors, a custom counter) would write into
the checkpoint's or the model's tensors, and one that draws random numbers the forward then reads (train-mode dropout
in custom code) gives random scores. Every aten op of the dry run is inspected *before* it runs, so a refused write
never happens. The same run follows which values come from the checkpoint and which tensors the model keeps between
passes, to refuse a cache of parameter values (``_Watch.refuse_kept``), refuses a loss computing with the model's own
tensors where the checkpoint's differ (``_ModelTensorsRead``), and turns deep torch errors about outputs and dtypes
into messages that name the fix. Two more runs outside the watch must give the same values: randomness the watch
cannot see (Python's ``random``, NumPy's, a torch draw read through ``tolist``) gives others where it changes them (a
random branch taken alike in both runs is not seen).
"""

from __future__ import annotations

import functools
import random
import sys
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import optree
import torch
from torch import nn
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ._data import examples_in, select_rows, slice_batch
from ._grads import INFERENCE_FORWARD, Tensors, batch_of_one, example_at
from ._loss import CriterionLoss, ExampleLossFn, floating_leaves, naming_a_dropped_batch
from ._loss_dtype import CAST_FROM, refuse_held_dtype
from ._state import CONTAINERS, FLAT_ABOVE, NESTING, leaving_no_trace, left_by_run, own_attributes
from ._validate import floating_dtypes_met, refusal


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor a torch.func transform's tensor wraps (torch.func inside the forward), which holds the
    storage."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _storage(t: torch.Tensor) -> int | None:
    t = _unwrapped(t)
    if t.layout != torch.strided:  # a sparse tensor (a GCN's adjacency) has no storage of its own: its values' if COO
        return _storage(t._values()) if t.layout == torch.sparse_coo else None
    if t.device.type == "meta" or not t.numel():
        return None
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # (a tensor of no storage of its own: forward-mode AD's dual tensors)
        return None


def _bound(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every argument by name, defaults included (SDPA's CPU kernel is called without its ``dropout_p=0``)."""
    schema = func._schema.arguments
    defaults = {a.name: a.default_value for a in schema if a.has_default_value()}
    return {**defaults, **{a.name: v for a, v in zip(schema, args)}, **kwargs}


# ops that write their running statistics in training although their schemas do not say so: a forward calling
# `F.batch_norm(..., training=True)` on a model's statistics wrote into the checkpoint's tensors, unseen
_BATCH_NORMS = {
    torch.ops.aten.native_batch_norm.default,
    torch.ops.aten.cudnn_batch_norm.default,
    torch.ops.aten.miopen_batch_norm.default,
}
_STATISTICS = ("running_mean", "running_var")


@functools.cache
def _inspected(func: Any) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
    """Whether an op may draw random numbers, the names of the arguments it writes, and of those its out arguments
    (per op, once: most ops are neither, and pass the watch without their arguments being bound)."""
    written = [a for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    names = tuple(a.name for a in written) + (_STATISTICS if func in _BATCH_NORMS else ())
    outs = tuple(a.name for a in written if a.kwarg_only)  # (out arguments: ``out``; a sort's ``values``, ``indices``)
    return torch.Tag.nondeterministic_seeded in func.tags, names, outs


def _writes(func: Any, values: Mapping[str, Any]) -> bool:
    """Whether an op declaring arguments written writes them, called with ``values``: QAT's fused fake-quantize with
    its observer off leaves its statistics as they are (refused as writing them, every such model was), as does a
    batch norm out of training."""
    if func is torch.ops.aten._fused_moving_avg_obs_fq_helper.default:
        return bool(values["observer_on"])
    if func in _BATCH_NORMS:
        return bool(values["training"])
    return True


@functools.cache
def _is_view(func: Any) -> bool:
    """Whether an op's outputs are views of its inputs, none written (``detach``, ``transpose``, a slice)."""
    schema = func._schema
    written = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    return bool(schema.returns) and not written and all(r.alias_info is not None for r in schema.returns)


@functools.cache
def _makes_tensors(func: Any) -> bool:
    """Whether an op's outputs are new tensors, not views of its inputs or the inputs it wrote."""
    return all(r.alias_info is None for r in func._schema.returns)


def _draws_random(values: Mapping[str, Any]) -> bool:
    """Whether a seeded random op called with ``values`` draws random numbers: not when a zero probability or
    ``train=False`` (``training=False``) makes it deterministic (the attention kernels carry the tag whatever their
    ``dropout_p``; an RReLU in eval mode was refused as drawing)."""
    if any(isinstance(values.get(key), (int, float)) and values[key] == 0 for key in ("dropout_p", "p")):
        return False
    return values.get("train", values.get("training")) is not False  # (RReLU's flag: `training`)


def _on_meta(inputs: Sequence[torch.Tensor], values: Mapping[str, Any]) -> bool:
    """Whether an op runs on the ``meta`` device only: its numbers, drawn or not, are never made (a placeholder
    module built in the forward under ``torch.device("meta")``, for ``functional_call`` over stacked members' weights,
    was refused as drawing random numbers)."""
    device = values.get("device")  # (where given, the output's: `randn_like(meta_template, device=x.device)` draws)
    if device is not None:
        return torch.device(device).type == "meta"
    return bool(inputs) and all(t.device.type == "meta" for t in inputs)


_PASS_DRAWN = (
    "draw such values once, pass them in each example of the data (a column of the batch tuple, a key of a dict batch)"
)


def _listed(value: Any) -> list[Any]:
    """An op's argument as a list of its values (``cat``'s tensors, or one)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _drawn_privately(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], values: Mapping[str, Any]) -> Any:
    """A random op of the dry run, drawn from a generator of its own where the op takes one: its numbers are never
    used (a read of them is refused), and a call refused for reading them left torch's global generator (or the
    user's) advanced by the draw (a diffusion loss's noise, a VAE's `torch.randn_like`; a review helper's find)."""
    private = _with_generator(func)
    if private is None:  # (dropout's ops take none: drawn as the forward draws)
        return func(*args, **kwargs)
    tensors = op_tensors(args, kwargs)
    device = values.get("device") or (tensors[0].device if tensors else torch.get_default_device())
    return private(*args, **{**kwargs, "generator": torch.Generator(device=device)})


@functools.cache
def _with_generator(func: Any) -> Any:
    """``func`` if it takes a ``generator``, else its overload taking one besides its own arguments (``randn_like``'s
    ``generator``, ``randint``'s ``low_generator``), or None."""
    names = [a.name for a in func._schema.arguments]
    if "generator" in names:
        return func
    for overload in func.overloadpacket.overloads():
        other = getattr(func.overloadpacket, overload)
        theirs = [a.name for a in other._schema.arguments]
        if "generator" in theirs and [n for n in theirs if n != "generator"] == names:
            return other
    return None


# ops reading a tensor's shape, dtype and device alone, none of its values
_SHAPE_ONLY = frozenset(
    getattr(torch.ops.aten, name)
    for name in ("zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full")
)
_LIFTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default, torch.ops.aten.lift.default)
LOWER = (torch.float16, torch.bfloat16)
_EXACT = frozenset(  # ops whose values are their input's, whatever its dtype
    getattr(torch.ops.aten, name).default for name in ("_to_copy", "clone", "detach", "alias", "copy_", "lift_fresh")
)
_COPIES = frozenset(getattr(torch.ops.aten, name).default for name in ("_to_copy", "clone", "copy_"))
# in-place ops that write their first argument whole without reading it
_OVERWRITES = frozenset(
    (torch.ops.aten.copy_.default, torch.ops.aten.fill_.Scalar, torch.ops.aten.fill_.Tensor,
     torch.ops.aten.zero_.default)
)  # fmt: skip


def _whole_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its storage's every element (so that writing it whole leaves none of the old ones)."""
    t = _unwrapped(t)
    return t.layout == torch.strided and t.storage_offset() == 0 and is_non_overlapping_and_dense_or_false(t) and (
        t.numel() * t.element_size() == t.untyped_storage().nbytes()
    )


_IN_LOSS = "the loss function"  # who drew: no module of the model was running (a module model's loss's own code)
_KEEP_FIXED = "keep what it reads fixed while scoring (a queue of negatives: update it between calls, not in the loss)"


class _Watch(TorchDispatchMode):
    """Raises on a read of random numbers (an op reading a tensor a random op made; one drawing into a tensor that
    exists, at once) or a write into a protected storage, naming the innermost running module. Also follows
    the values computed from the checkpoint's tensors, and the tensors read that the run was neither given (the
    checkpoint, the inputs) nor made: tensors the model keeps (constants, or caches)."""

    def __init__(
        self,
        protected: Mapping[int, str],
        modules: list[tuple[str, nn.Module]],
        given: set[int],
        checkpoint: set[int],
        root: bool = False,
        training: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__()
        self.protected, self.modules, self.given = protected, modules, given
        self.root = root  # the model is a module: an op run while none of its modules runs is the loss's own code
        self.training = training  # the modules (identities) in training mode as the run began (not as its forward
        # switched them: ``.eval()`` would not help)
        self.derived = set(checkpoint)  # tensors (identities) computed from the checkpoint's tensors
        self.from_example = given - checkpoint  # tensors (identities) computed from the example's
        self.largest = 0  # bytes of the largest tensor made from the example (views and in-place ops make none)
        self.held = 0  # bytes of the largest made from the checkpoint alone (a graph's messages a node's loss reads)
        self.lowered = False  # an op ran on float16 / bfloat16 tensors (the model's own autocast, or its casts)
        self.coarsest: set[torch.dtype] = set()  # the floating dtypes ops computed in (``ForwardBytes.precision``)
        self.made: dict[int, weakref.ref] = {}  # tensors this run made (alive: an identity may be reused)
        self.read: set[int] = set()  # tensors an op read
        self.kept: dict[str, tuple[nn.Module, set[int]]] = {}  # innermost module -> kept tensors it read
        self.ran: set[int] = set()  # the modules (identities) an op ran in, innermost
        self.kept_storages: set[int] = set()  # storages of the tensors read that the run was neither given nor made
        self.derived_made: list[weakref.ref] = []  # alive after the run: kept somewhere
        # the storages random numbers were drawn into, while alive: (a weak reference to it, who drew, the op): a read
        # of any tensor on one, a view made before an in-place draw too, is a read of them
        self.drawn: dict[int, tuple[StorageWeakRef, str, Any]] = {}
        # the storages of tensors this run allocated (not views of others'), while alive: a tensor wrapping one (an
        # `nn.Parameter` of a layer the forward builds) is fresh too
        self.allocated: dict[int, StorageWeakRef] = {}
        self.refused: ValueError | None = None  # what it raised last

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        try:
            return self._watched(func, args, kwargs or {})
        except ValueError as err:  # (kept: TorchScript's interpreter re-raises it as a RuntimeError with no message)
            self.refused = err
            raise

    def _watched(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        seeded, writes, outs = _inspected(func)
        inputs = op_tensors(args, kwargs)
        # (autocast's casts are made before this mode sees an op, its state then off: its lowered inputs are seen;
        # a cast or a view computes nothing: a mask cast to float16 and back sent a call to the loop, 33x slower)
        computes = func not in _EXACT and not _is_view(func)
        self.lowered = self.lowered or computes and any(t.dtype in LOWER for t in inputs)
        if computes:  # (float32 inside a float64 model: GPT-Neo's attention, upcast only so far)
            self.coarsest.update(t.dtype for t in inputs if t.is_floating_point())
        fresh = func in _LIFTS  # a constant the forward creates (``torch.tensor``, ``from_numpy``): not kept
        kept = {id(t) for t in inputs if id(t) not in self.given and not self._own(t)} if not fresh else set()
        self.kept_storages.update(s for t in inputs if id(t) in kept and (s := _storage(t)) is not None)  # (views too)
        draws = False
        if seeded or writes:
            values = _bound(func, args, kwargs)
            draws = seeded and _draws_random(values) and not _on_meta(inputs, values)
            if draws and (writes or not _makes_tensors(func)) and not self._into_fresh(writes, values):
                self._refuse(f"draws random numbers ({func}), so its scores would be random", self._drawer(), True)
            for name in writes if _writes(func, values) else ():
                written = values.get(name)
                for t in _listed(written):
                    target = self.protected.get(_storage(t)) if isinstance(t, torch.Tensor) else None
                    if target is not None and func is torch.ops.aten.embedding_renorm_.default:
                        raise ValueError(
                            f"`model`: {self._running()} has `max_norm`, whose lookups renormalise rows of {target} "
                            f"in place ({func}), in eval mode too, so scores would depend on order. Score a copy with "
                            f"`max_norm=None` holding the rows as the lookups leave them (norms above max_norm scaled "
                            f"down to it): in its checkpoints, or in the copy's own weight where they hold none."
                        )
                    if target is not None:
                        self._refuse(
                            f"writes into {target} ({func}), which would change it and make scores depend on order",
                            self._drawer(),
                        )
                    if isinstance(t, torch.Tensor) and _storage(t) in self.kept_storages:
                        self._refuse(
                            f"writes into a tensor it keeps, neither the checkpoint's nor the example's ({func}: a "
                            f"closure's or an attribute's, a train-mode BatchNorm's running statistics), which would "
                            f"change it and make scores depend on order",
                            self._drawer(),
                        )
        # a random number drawn and left unread (transformers 5.17's wav2vec2: its layer drop, taken in training only)
        # cannot change a score; a read could (`torch.zeros_like(noise)` reads no number of it, nor a view of it: reads
        # through the view are reads of the storage). The first argument of an op writing it whole is not read (a
        # layer built in the forward given its weights, `l.weight.data.copy_(w)`, `nn.init.zeros_`, `load_state_dict`:
        # a review helper's), nor are out arguments (`nn.init.eye_`'s `torch.eye(out=w)`, `torch.max(x, 0, out=(v,
        # i))`); a source is, whatever tensor it is (`r.copy_(r)`)
        overwritten = [args[0]] if self.drawn and func in _OVERWRITES else []
        carried = None  # a copy's source of random numbers: the copy holds them too
        if self.drawn and func.overloadpacket not in _SHAPE_ONLY and not _is_view(func):
            sources = list(inputs[1:] if overwritten and inputs and inputs[0] is overwritten[0] else inputs)
            for written in (t for name in outs for t in _listed(values.get(name))):  # (`values`: bound, as written)
                at = max((i for i, t in enumerate(sources) if t is written), default=None)  # (an input may be it)
                if at is not None:
                    overwritten.append(sources.pop(at))
            for t in sources:
                drawn = self.drawn.get(_storage(t))
                if drawn is not None and not drawn[0].expired():
                    if func in _COPIES:  # (read where the copy is: a layer built in the forward, moved with `.to()`,
                        carried = drawn  # then given its weights: a review helper's)
                        continue
                    self._refuse(f"draws random numbers ({drawn[2]}) that are read ({func})", drawn[1], True)
        read = {id(t) for t in inputs}  # (tensors by identity: views are made by ops too)
        self.read |= read
        if self.modules:
            self.ran.add(id(self.modules[-1][1]))
        if kept and self.modules:
            path, module = self.modules[-1]
            self.kept.setdefault(path, (module, set()))[1].update(kept)
        out = _drawn_privately(func, args, kwargs, values) if draws else func(*args, **kwargs)
        for t in overwritten:  # (once it ran, as it left them: one raising, or resizing its out, left the numbers
            if _whole_storage(t):  # there; a sweep's find)
                self.drawn.pop(_storage(t), None)  # type: ignore[arg-type]
        from_checkpoint, from_example = not read.isdisjoint(self.derived), not read.isdisjoint(self.from_example)
        outputs = op_tensors(out)
        given = {_storage(t) for t in inputs}
        for t in outputs:
            self.made[id(t)] = weakref.ref(t)
            if (key := _storage(t)) is not None and key not in given:
                self.allocated[key] = StorageWeakRef(_unwrapped(t).untyped_storage())
            if from_checkpoint:
                self.derived.add(id(t))
                self.derived_made.append(weakref.ref(t))
            else:
                self.derived.discard(id(t))  # (the identity of a tensor freed meanwhile)
            if from_example:
                self.from_example.add(id(t))
            else:
                self.from_example.discard(id(t))
        if (from_example or from_checkpoint) and _makes_tensors(func):
            made = max((t.numel() * t.element_size() for t in outputs), default=0)  # (sparse: no nbytes)
            if from_example:
                self.largest = max(self.largest, made)
            else:
                self.held = max(self.held, made)
        if draws or carried is not None:
            drawer, op = (self._drawer(), func) if carried is None else carried[1:]
            for t in outputs:
                if (key := _storage(t)) is not None:
                    self.drawn[key] = (StorageWeakRef(_unwrapped(t).untyped_storage()), drawer, op)
        return out

    def _made(self, t: torch.Tensor) -> bool:
        ref = self.made.get(id(t))
        return ref is not None and ref() is t

    def _into_fresh(self, writes: tuple[str, ...], values: Mapping[str, Any]) -> bool:
        """Whether an op drawing random numbers in place draws them into tensors this run made (a layer drop's
        ``torch.empty(()).uniform_()``; a view of one, or one wrapping its storage: ``_allocated``; its storage's
        every tensor read is refused): drawn as out of place, refused where read (into a tensor that exists, the
        model's or the example's, it is refused at once: refused as read until 2026-12-07)."""
        written = [t for name in writes for t in _listed(values.get(name))]
        return bool(written) and all(isinstance(t, torch.Tensor) and self._own(t) for t in written)

    def _own(self, t: torch.Tensor) -> bool:
        """Whether this run made ``t``, or the storage it wraps (``_allocated``)."""
        return self._made(t) or self._allocated(t)

    def _allocated(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage is one this run allocated and still alive (a throwaway layer's weight, its
        `nn.Parameter` another tensor than the `empty` it wraps: BigBird's short-input switch builds one, whose
        random initialisation is never read; refused as drawing random numbers, a review helper's)."""
        ref = self.allocated.get(_storage(t))  # type: ignore[arg-type]
        return ref is not None and not ref.expired()

    def refuse_kept(self, state: Tensors, root: nn.Module | None, before: Collection[int] = ()) -> None:
        """Raise when the forward computed with a tensor the model keeps (a layer's attribute or buffer, or else
        somewhere the reading layer alone knows) in place of a parameter it never read: a cache of values computed
        from that parameter (LeViT's attention biases in eval mode), filled by an earlier pass (a call before this one,
        ``model.eval()``, the first dry run), which every checkpoint would be scored with. Such a parameter is one of
        the layer holding the kept tensor or of the reading layer; one of the reading layer's sublayers whose other
        parameters are read (a child's weight cached, its bias read directly: 23-36% off, silently, before; 43% where
        the root read it, a sublayer's parameter then only as ``_cached`` tells); or one the run before
        this one read (``before``: tensors' ids), which filled the cache. A kept constant (a mask) leaves those
        parameters read (a training-only head never called is no cache)."""
        if not self.kept or root is None:
            return
        first_name = {}  # a parameter's name in the checkpoint (a tied one: its first)
        for name, p in root.named_parameters(remove_duplicate=False):
            first_name.setdefault(id(p), name)
        never = {n for n, t in state.items() if id(t) not in self.read}  # (the checkpoint's names)
        unread = lambda p: first_name.get(id(p)) in never  # noqa: E731
        forgotten = [n for n in first_name.values() if n in never and id(state[n]) in before]
        layers = list(root.named_modules())
        for path, (reader, kept) in self.kept.items():
            holders = [(p, m, k) for p, m in layers for k, v in _attributes(m).items() if _holds(v, kept)]
            key = holders[0][2] if holders else None
            owners = [(p, m, k, m) for p, m, k in holders] + [(path, reader, key, reader)]
            found = [(o, first_name[id(p)]) for o in owners for p in o[3].parameters(recurse=False) if unread(p)]
            parts = [m for m in reader.modules() if m is not reader and not all(map(unread, m.parameters(False)))]
            if reader is root:  # (other layers of a whole model may leave a parameter unread on an example)
                held = [t for _, m, k in holders for t in _tensors_within(_attributes(m)[k]) if id(t) in kept]
                found += [((path, reader, key, m), first_name[id(p)]) for m in parts for p in m.parameters(False)
                          if unread(p) and _cached(p, state[first_name[id(p)]], held, id(m) not in self.ran)]
            else:
                found += [((path, reader, key, m), first_name[id(p)]) for m in parts for p in m.parameters(False)
                          if unread(p)]  # fmt: skip
            for (layer_path, layer, key, _), name in [*found, *((owners[-1], n) for n in forgotten)]:
                kept_where = f"keeps {key!r} between forward passes, and the forward computes with it"
                what = kept_where if key else "computes with a tensor kept between forward passes"
                raise ValueError(
                    f"`model`: module {layer_path or '(root)'!r} ({type(layer).__name__}) {what} instead of the "
                    f"parameter {name!r}, which it never reads (a cache, like LeViT's attention biases in eval "
                    f"mode): every checkpoint would be scored with the values it was filled from, and no gradient "
                    f"would reach {name!r}. Make the forward compute them from the parameter on every call (empty "
                    f"or switch off the cache), then score; a constant of {name!r}'s shape that is no cache (a prior, "
                    f"a mask) is read as one: register it as a buffer (`self.register_buffer({key or 'name'!r}, "
                    f"tensor)`), which checkpoints hold (`strict=False` takes it from the model for those saved "
                    f"before)."
                )

    def kept_derived(self) -> bool:
        """Whether tensors this run computed from the checkpoint are still alive (held by a layer, say)."""
        return any(ref() is not None for ref in self.derived_made)

    def _running(self) -> str:
        """The innermost module running, in words."""
        path, module = self.modules[-1] if self.modules else ("", None)
        return f"module {path or '(root)'!r} ({type(module).__name__})" if module is not None else "the model"

    def _drawer(self) -> str:
        """Who draws random numbers now: the running module, or the loss's own code (none of a module's runs)."""
        return _IN_LOSS if self.root and not self.modules else self._running()

    def _refuse(self, what: str, who: str | None = None, drawn: bool = False) -> None:
        if who is _IN_LOSS:  # outside the model's forward: the loss function's own code
            example = " (a noise or timestep drawn with `torch.randn` / `torch.randint` in a diffusion loss, say)"
            said = (example, f"{_PASS_DRAWN}, and read them there") if drawn else ("", _KEEP_FIXED)
            raise ValueError(
                f"`loss_fn`: outside the model's forward, the loss function {what}{said[0]}. TracIn needs each "
                f"example's loss to be a function of the checkpoint and the example: {said[1]}."
            )
        who = who or self._running()
        remove = "remove the state update / randomness from that module"
        training = any(id(m) in self.training for _, m in self.modules) or not self.modules  # (a function: unknown)
        evaluate = "`model.eval()`" if self.modules else "`.eval()` on the modules the function calls"
        switched = any(m.training for _, m in self.modules)  # (by the forward: ``self.bn.train()``)
        fix = (f"call {evaluate} before scoring (training mode updates running statistics and turns on dropout), "
               f"or {remove}" if training else f"{remove} (the model's forward puts it in training mode: drop that "
               f"`.train()` call)" if switched else f"{remove} (it runs in eval mode already)")  # fmt: skip
        if drawn:  # (noise the model needs, a VAE's reparameterisation: given with the example, as the loss's)
            fix += f"; for noise it needs (a VAE's `torch.randn_like`), {_PASS_DRAWN}, and read them in its forward"
        observing = next((p for p, m in reversed(self.modules) if _observing(m)), None)
        if self.modules and type(self.modules[-1][1]).__name__ == "_LearnableFakeQuantize":
            fix = (
                "torch's `_LearnableFakeQuantize` writes its learned `scale` in place at every forward (its observer's "
                "where `static_enabled` is 1, else a clamp to `eps`), whatever its other flags: score a subclass whose "
                "forward writes nothing in place (a clamped copy, `self.scale.clamp(min=self.eps.item())`, given to "
                "the fake-quantize op; no `zero_point.data.zero_()`)"
            )
        elif observing is not None:  # (quantization-aware training's fake-quantize: a flag the checkpoint may hold)
            flag = f"{observing}.observer_enabled".lstrip(".")
            fix = (
                f"a fake-quantize module observes while its `observer_enabled` buffer is 1, and the call runs with the "
                f"checkpoint's '{flag}' where it holds one (1 where saved while training), else with the model's: set "
                f"them to 0, `model.apply(torch.ao.quantization.disable_observer)` and checkpoints such as "
                f"`{{k: torch.zeros_like(v) if k.endswith('observer_enabled') else v for k, v in state.items()}}`"
            )
        raise ValueError(
            f"`model`: {who} {what} in its forward pass. TracIn needs a forward pass that is a function of the "
            f"checkpoint and the example: {fix}."
        )


def _observing(module: nn.Module) -> bool:
    """Whether ``module`` is a fake-quantize whose observer runs (its ``observer_enabled`` flag, as the call runs it,
    1): a module writing otherwise with the flag 0 is not told to turn off what is off."""
    flag = getattr(module, "observer_enabled", None)
    return isinstance(flag, torch.Tensor) and bool((flag != 0).any())


@contextmanager
def _running_modules(module: nn.Module | None) -> Iterator[list[tuple[str, nn.Module]]]:
    """A stack of the modules whose forward is running (hooks on the call's private copy, removed on exit)."""
    stack: list[tuple[str, nn.Module]] = []

    def enter(path: str) -> Callable[..., None]:
        return lambda m, args: stack.append((path, m))

    def leave(m: nn.Module, args: Any, output: Any) -> None:
        if stack and stack[-1][1] is m:  # (not entered where a forward pre-hook of its own raised)
            stack.pop()  # returns None: the output is left as it is

    handles = []
    try:  # (registered inside: an interruption while registering left the hooks on the user's modules)
        for path, m in module.named_modules() if module is not None else ():  # (first: its own pre-hooks run inside)
            handles.append(m.register_forward_pre_hook(enter(path), prepend=True))
            handles.append(m.register_forward_hook(leave, always_call=True))
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def op_tensors(*trees: Any) -> list[torch.Tensor]:
    """The tensors among an op's arguments or outputs (in lists and tuples: ``cat``'s inputs, ``split``'s outputs)."""
    out = []
    for tree in trees:
        for x in tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else (tree,):
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif isinstance(x, (list, tuple)):
                out.extend(t for t in x if isinstance(t, torch.Tensor))
    return out


def _tensors_within(value: Any, depth: int = NESTING) -> list[torch.Tensor]:
    """``value`` if a tensor, else the tensors in the containers nested in it (small ones: a vocabulary list is not
    walked)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0 or not isinstance(value, CONTAINERS) or len(value) > FLAT_ABOVE:
        return []
    items = value.values() if isinstance(value, dict) else value
    out = [v for v in items if isinstance(v, torch.Tensor)]
    return out + [t for v in items if isinstance(v, CONTAINERS) for t in _tensors_within(v, depth - 1)]


def _cached(param: torch.Tensor, value: torch.Tensor, kept: Sequence[torch.Tensor], idle: bool) -> bool:
    """Whether a kept tensor the root read is, by the look of it, a cache of a sublayer's parameter it never reads:
    shaped as it (or its transpose) where the sublayer ran no op itself (a child's weight cached, its bias read
    directly: 43% off, silently, before), and else also a multiple of its values, the user's or the checkpoint's
    (``value``; a block's second weight cached: 16%). A root's constant of a parameter's shape (dataset statistics
    beside a fill value read only where a feature is missing) is neither."""
    for t in kept:
        if t.numel() != param.numel() or tuple(t.shape) not in (tuple(param.shape), tuple(param.shape)[::-1]):
            continue
        if idle or any(_multiple(t, v) for v in (param, value)):
            return True
    return False


def _multiple(t: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``t`` is a nonzero multiple of ``v``, as they are or ``v`` transposed (same number of entries); never
    of a ``v`` of one value throughout (a gate initialised to ones: any constant fill, a root's scale of 2s, is a
    multiple of it)."""
    if v.numel() < 2 or bool((v == v.flatten()[0]).all()):
        return False
    k = t.detach().double().flatten()
    for w in (v, v.t()) if v.dim() == 2 else (v,):
        w = w.detach().double().flatten()
        norm = float(w @ w)
        scale = float(k @ w) / norm if norm else 0.0
        if scale and torch.allclose(k, scale * w, rtol=1e-5, atol=1e-12 * float(k.abs().max())):
            return True
    return False


def _attributes(m: nn.Module) -> dict[str, Any]:
    return {**m._buffers, **own_attributes(m)}


def _holds(value: Any, tensors: set[int]) -> bool:
    """Whether ``value`` (a tensor, or containers of them) holds one of ``tensors`` (identities)."""
    return any(id(t) in tensors for t in _tensors_within(value))


def _protected(module: nn.Module | None, state: Tensors, example: Any) -> dict[int, str]:
    """Storages no forward pass may write: the checkpoint's tensors, the model's tensors and the inputs."""
    named: list[tuple[str, Any]] = []  # (a name for messages, a tensor): later ones win a shared storage
    for path, m in module.named_modules() if module is not None else ():
        prefix = f"{path}." if path else ""
        tensors = {**m._parameters, **m._buffers, **{k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}}
        named += [(f"the model's tensor {prefix}{k!r}", t) for k, t in tensors.items()]
        for key, value in own_attributes(m).items():  # tensors held in containers ("calls" counters, statistics)
            if isinstance(value, CONTAINERS):
                named += [(f"a tensor in the model's {prefix}{key!r}", t) for t in _tensors_within(value)]
    named += [(f"the checkpoint's tensor {n!r}", t) for n, t in state.items()]
    named += [(f"input tensor {i}", t) for i, t in enumerate(optree.tree_leaves(example, none_is_leaf=True))]
    return {ptr: name for name, t in named if isinstance(t, torch.Tensor) and (ptr := _storage(t))}


def check_forward(
    module: nn.Module | None,
    loss: ExampleLossFn,
    states: Sequence[Tensors],
    batch: Any,
    where: str,
    differentiated: Collection[str] = (),
) -> ForwardBytes:
    """Run ``loss`` on the first example of ``batch`` under the watch, at the first of the call's checkpoint
    ``states``; raise with the fix on anything untrustworthy.
    When the run leaves tensors computed from the checkpoint alive (kept by a layer: a cache, or an attention map
    stored for plots), it runs again, which reads a cache back. Two more runs outside the watch must give the same
    values: randomness the watch cannot see (Python's ``random``, NumPy's) gives others. The runs leave the layers'
    attributes as they were. Returns the bytes of the largest tensors the forward made (``ForwardBytes``). A loss
    computing with the model's own tensor instead of the checkpoint's is refused where that is wrong
    (``_ModelTensorsRead``): a ``differentiated`` parameter, or one some checkpoint holds another value of."""
    example, state = batch_of_one(example_at(batch, 0)), states[0]
    exact = all(t.device.type == "cpu" for t in state.values())
    generators = _hidden_generators()
    try:  # (a criterion's attributes: the call's, ``_model.exclusive_use``)
        with leaving_no_trace(module) as taken:
            watch = _watched_run(module, loss, states, example, where, differentiated)
            left = left_by_run(taken)
            if watch.kept_derived():
                watch = _watched_run(module, loss, states, example, where, differentiated, watch.read)
            with torch.no_grad():  # (two plain runs: under the watch, fused kernels such as the native transformer
                runs = [_copied(_run(loss, state, example)) for _ in range(2)]  # encoder's step aside)
        _refuse_changed(*runs, exact=exact, criterion=loss.name if isinstance(loss, CriterionLoss) else None)
    except BaseException:  # (refused: the draws these runs made are put back, as torch's are never made: `_Watch`)
        _put_back_generators(generators)
        raise
    if left and examples_in(batch) > 1:
        _refuse_carried(module, loss, state, batch, left, exact)
    _refuse_batch_writes(module, loss, state, batch)
    return ForwardBytes(watch.largest, watch.held, watch.lowered, coarsest(watch.coarsest))


def _refuse_batch_writes(module: nn.Module | None, loss: ExampleLossFn, state: Tensors, batch: Any) -> None:
    """Refuse a forward writing into the checkpoint's or the model's tensors for a batch only: MoCo's queue, its
    enqueue skipped for one example, was written by every batched pass, into the caller's checkpoints (a retry of
    the call on them 13-16% off, silently; a review helper's). Run on the first two examples together, a write
    refused before it is made; a run failing otherwise (a model of one example at a time) is left to the batching
    check. A batch of one is run as two copies of its example (the batching check's runs of several wrote too)."""
    pair = slice_batch(batch, 0, 2) if examples_in(batch) > 1 else select_rows(batch, torch.tensor([0, 0]))
    criterion = loss.criterion if isinstance(loss, CriterionLoss) and isinstance(loss.criterion, nn.Module) else None
    held = {ptr: name.replace("the model's", "its") for ptr, name in _protected(criterion, {}, ()).items()}
    with leaving_no_trace(module), torch.no_grad(), _running_modules(module) as stack:
        writes = _BatchWrites({**held, **_protected(module, state, pair)}, stack)
        try:
            with writes:
                _run(loss, state, pair)
        except Exception:  # noqa: BLE001, S110  (not a write: the batching check runs batches and names what fails)
            pass
    if writes.refused:  # (raised in a TorchScript function, which re-raises it as its own error; or caught)
        raise ValueError(writes.refused)


class _BatchWrites(TorchDispatchMode):
    """Raises before an op writes into a ``protected`` storage (``_protected``), naming the innermost module running
    (``modules``: ``_running_modules``' stack), and keeps its words (``refused``)."""

    def __init__(self, protected: Mapping[int, str], modules: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.protected, self.modules, self.refused = protected, modules, ""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        writes = _inspected(func)[1]
        values = _bound(func, args, kwargs) if writes else {}
        for t in (t for name in writes if _writes(func, values) for t in _listed(values.get(name))):
            target = self.protected.get(_storage(t)) if isinstance(t, torch.Tensor) else None
            if target is not None:
                path, m = self.modules[-1] if self.modules else ("", None)
                criterion = target.startswith("its ")  # (`_refuse_batch_writes`' names of the criterion's tensors)
                running = f"module {path or '(root)'!r} ({type(m).__name__})" if m is not None else "the model"
                who = "`loss_fn`" if criterion else f"`model`: {running}"
                fix = (  # (a criterion is in training mode unless put out of it: `self.training` guards nothing)
                    "Make the write into a copy" if criterion else
                    "Make the write in training only (`if self.training:`), or into a copy"
                )  # fmt: skip
                self.refused = (
                    f"{who} writes into {target} ({func}) in a batch of two examples, not for one alone (a queue "
                    f"enqueued for batches, say), which would change it and make scores depend on order. {fix}."
                )
                raise ValueError(self.refused)
        return func(*args, **kwargs)


class ForwardBytes(NamedTuple):
    """The largest tensors one example's forward makes: from the example (a batch's tensors scale by it), and from the
    checkpoint alone (made once for a batched pass; under vmap(grad) each example's backward holds its gradient: a
    graph's messages, 2 MB, sized at 12 bytes, took a 1 GB batch); and whether it computes in float16 or bfloat16
    somewhere (``torch.autocast`` it enters itself, its own casts), a precision whose batched kernels round otherwise
    than one example's (``_plan.plan_call``); and the coarsest floating dtype its ops compute in, whose rounding the
    batching check allows (``_batching.mixing``)."""

    example: int
    held: int
    lowered: bool = False
    precision: torch.dtype | None = None


def coarsest(dtypes: Iterable[torch.dtype | None]) -> torch.dtype | None:
    """The floating dtype of the largest eps among ``dtypes`` (None: none given)."""
    return max((d for d in dtypes if d is not None), key=lambda d: torch.finfo(d).eps, default=None)


def _refuse_carried(
    module: nn.Module | None, loss: ExampleLossFn, state: Tensors, batch: Any, left: list[tuple[nn.Module, str]],
    exact: bool,
) -> None:
    """Refuse a forward whose values depend on what an earlier run left in the layers (``left``): a lazy calibration
    (``if self.scale is None: self.scale = x.abs().amax()``) scored every example at the first one's (23-225% off,
    silently; a review helper's trial). The first example must get alike values run first and after the second; a
    counter (``self.calls += 1``) passes."""
    first, second = (batch_of_one(example_at(batch, i)) for i in (0, 1))
    with torch.no_grad():
        with leaving_no_trace(module):
            alone = _copied(_run(loss, state, first))
        with leaving_no_trace(module):
            _run(loss, state, second)
            after = _copied(_run(loss, state, first))
    differs = _difference(alone, after, exact)
    if differs:
        paths = {id(m): path or "(root)" for path, m in module.named_modules()} if module is not None else {}
        kept = ", ".join(f"{paths.get(id(m), type(m).__name__)!r}.{name}" for m, name in left[:3])
        raise ValueError(
            f"`model`: its forward keeps values between runs that change what it computes: it sets {kept}, and an "
            f"example run after another got other values than run first ({differs}) (a calibration made lazily by the "
            f"first input seen, a cache keyed by nothing), so an example's scores would depend on the examples run "
            f"before it. Set such values before scoring (a buffer the checkpoints hold), or compute them from each "
            f"example alone."
        )


def check_reads(
    module: nn.Module | None,
    loss: ExampleLossFn,
    states: Sequence[Tensors],
    batch: Any,
    differentiated: Collection[str],
) -> None:
    """``_ModelTensorsRead``'s refusal alone, for ``differentiated`` parameters chosen after ``check_forward`` ran
    (``method="last_layer"``'s head): one more run of the loss on the first example, its forward already checked."""
    if module is None:
        return
    example = batch_of_one(example_at(batch, 0))
    with leaving_no_trace(module), torch.no_grad():
        _run(loss, states[0], example, _ModelTensorsRead.of(module, differentiated, states, loss))


def _in_training(module: nn.Module | None) -> frozenset[int]:
    return frozenset(id(m) for m in module.modules() if m.training) if module is not None else frozenset()


def _watched_run(
    module: nn.Module | None,
    loss: ExampleLossFn,
    states: Sequence[Tensors],
    example: Any,
    where: str,
    differentiated: Collection[str],
    before: Collection[int] = (),
) -> _Watch:
    """One dry run at ``states[0]`` under the watch (raising on what it refuses), which it returns; ``before``: the
    tensors a run before it read (``_Watch.refuse_kept``)."""
    state = states[0]
    protected = _protected(module, state, example)
    checkpoint = {id(t) for t in state.values()}
    given = checkpoint | {id(t) for t in optree.tree_leaves(example) if isinstance(t, torch.Tensor)}
    with (
        torch.no_grad(),
        _running_modules(module) as stack,
        _Watch(protected, stack, given, checkpoint, module is not None, _in_training(module)) as watch,
    ):
        try:
            _run(loss, state, example, _ModelTensorsRead.of(module, differentiated, states, loss))
        except (RuntimeError, ValueError) as err:  # (torch's recurrent layers refuse an input's dtype by ValueError)
            if watch.refused is not None and _TORCHSCRIPT in str(err):  # (its refusal in a scripted function: the
                raise watch.refused from None  # user saw TorchScript's traceback, ending in an empty message)
            if isinstance(err, RuntimeError) and not isinstance(loss, CriterionLoss):  # (a criterion's: where it
                _refuse_held_dtype(loss, err, state)  # fails itself, not in the forward)
            if not refusal(err):
                _explain_dtype(err, example, state, where)
            raise
    watch.refuse_kept(state, module, before)
    return watch


# TorchScript's words as it re-raises an error of an op it ran (the watch's refusal among them, its message lost);
# another error, after a refusal the model caught itself, is its own
_TORCHSCRIPT = "The following operation failed in the TorchScript interpreter"


def _run(
    loss: ExampleLossFn, state: Tensors, example: Any, read: Callable[..., Any] = lambda *given: nullcontext()
) -> list[torch.Tensor]:
    """The floating values of the loss of ``example``: a criterion's model outputs and its loss. ``read(given,
    forward=False)``: a context watching what the loss (or a criterion's ``forward``) computes with, besides the
    tensors ``given`` to it (the state, the example or a criterion's outputs and targets: ``_ModelTensorsRead``)."""
    if not isinstance(loss, CriterionLoss):
        with read((state, example)):
            return _refused_if_inference(floating_leaves(loss(state, example)))
    *inputs, target = example
    with read((state, inputs), True):
        output = loss.forward(state, *inputs)
    _check_output(output, loss.name)
    _refused_if_inference(floating_leaves(output))
    try:
        with read((state, output, target)), naming_a_dropped_batch(output, target):
            value = loss.criterion(output, target)
    except RuntimeError as err:
        _refuse_held_dtype(loss, err, state)
        raise
    return floating_leaves((output, value))


def _refused_if_inference(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """``values``, refused where one is an inference tensor: the forward runs under ``torch.inference_mode()`` (a
    decorated ``forward``), through which no gradient is taken (torch's error on a version counter, or scores 0)."""
    if any(v.is_inference() for v in values):
        raise ValueError(INFERENCE_FORWARD)
    return values


def _refuse_held_dtype(loss: ExampleLossFn, err: RuntimeError, state: Tensors) -> None:
    """``refuse_held_dtype`` at the state's floating dtype: a loss's own tensor named before the inputs are blamed."""
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    if dtype is not None:
        refuse_held_dtype(loss, err, dtype)


class _ModelTensorsRead(TorchFunctionMode):
    """Raises where a loss computes with one of the model's own tensors (a parameter or a buffer, or a view of one)
    rather than the checkpoint's, read through a closure, a bound method of the model or a global (a penalty on
    ``model.fc.weight``, a learned temperature ``model.t`` beside ``tc.ExampleLoss``'s ``params``): where it is
    differentiated, that term got no gradient and the checkpoint's value was never used (28-56% off, silently); where
    it is not (``params=``, ``method="last_layer"``), every checkpoint was scored with the user's value (53% off where
    they held others). One whose value every checkpoint holds too is read as it is (class weights kept with the model).
    A criterion runs after the forward, when the module holds its own tensors again; a loss calling the model holds
    the checkpoint's tensors in it meanwhile, which are not the model's (those sharing its storage: not told apart)."""

    def __init__(
        self,
        module: nn.Module,
        differentiated: Collection[str],
        states: Sequence[Tensors],
        loss: Any,
        given: Any,
        forward: bool = False,
    ) -> None:
        super().__init__()
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        self.own = dict(named)
        self.ids: dict[int, str] = {}  # (a tied tensor by its first name, the one checked states and `params` hold)
        self.storages: dict[int | None, str] = {}
        for n, t in named:
            self.ids.setdefault(id(t), n)
            self.storages.setdefault(_storage(t), n)
        self.storages.pop(None, None)
        held = [t for t in optree.tree_leaves(given) if isinstance(t, torch.Tensor)]
        self.given, self.given_storages = {id(t) for t in held}, {_storage(t) for t in held}
        self.differentiated, self.states = set(differentiated), states
        self.name, self.criterion, self.forward = loss.name, isinstance(loss, CriterionLoss), forward
        self.equal: set[str] = set()  # frozen tensors read that every checkpoint holds as the model does

    @classmethod
    def of(
        cls, module: nn.Module | None, differentiated: Collection[str], states: Sequence[Tensors], loss: ExampleLossFn
    ) -> Callable[[Any], Any]:
        """``_run``'s ``read``: the watch over ``module``'s tensors (none without a module)."""
        if module is None:
            return lambda *given: nullcontext()
        return lambda given, forward=False: cls(module, differentiated, states, loss, given, forward)

    def __torch_function__(self, func: Callable, types_: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if _metadata(out) and func not in _VALUE_READS:  # (`y.to(next(model.parameters()).device)`: no value)
            return out
        like = _LIKE.get(func, slice(0, 0))  # arguments read for their dtype, device or shape alone
        for t in optree.tree_leaves((args[: like.start], args[like.stop :], kwargs or {})):
            t = getattr(t, CAST_FROM, t)  # (a criterion's tensor in the call's dtype: the model's, converted)
            if isinstance(t, torch.Tensor) and id(t) not in self.given:
                storage = _storage(t)
                read = self.ids.get(id(t)) or (None if storage in self.given_storages else self.storages.get(storage))
                if read is not None and read not in self.equal:
                    self._refuse(read)
        return out

    def _refuse(self, read: str) -> None:
        if read in self.differentiated:
            what, why = "parameter", "so a term of the loss on it would get no gradient"
        else:
            own, states = self.own[read], self.states
            other = next((c for c, state in enumerate(states) if read in state and not _alike(state[read], own)), -1)
            if other < 0:
                self.equal.add(read)
                return
            what, why = "tensor", f"whose value checkpoint {other} does not hold: each checkpoint scored with it"
        if self.forward:  # (a criterion's model, run by functional_call: a reference it does not swap)
            raise ValueError(
                f"`model` computes with its own {what} {read!r} in its forward pass, read through a reference that "
                f"scoring's `functional_call` does not replace with the checkpoint's (a dict or list attribute "
                f"holding it, a global, a lambda or partial kept as an attribute holding the module), not through "
                f"its module, {why}. Read it as the module's attribute (`self.fc.weight`) in the forward or in a "
                f"method it calls, or register the reference as a parameter or buffer."
            )
        if self.criterion:
            raise ValueError(
                f"`{self.name}` computes with the model's {what} {read!r} itself (read through a closure, a bound "
                f"method or a global): the model's tensor, not the checkpoint's being scored, {why}. Write the loss "
                f"as `tc.ExampleLoss(lambda params, batch: ...)` (or `tc.BatchLoss`) reading `params[{read!r}]`, or "
                f"keep `{self.name}` to the outputs and targets."
            )
        raise ValueError(
            f"`{self.name}` computes with the model's {what} {read!r} itself (the model called as it is, its tensor "
            f"read through a closure or a global, or a reference of the model's own, a dict attribute holding it, "
            f"that `functional_call` does not replace), not `params[{read!r}]`, the checkpoint's being scored, {why}. "
            f"Run the model as `torch.func.functional_call(model, params, inputs)` and read `params[{read!r}]`."
        )


def _alike(held: torch.Tensor, own: torch.Tensor) -> bool:
    """Whether a checkpoint's tensor holds the model's values (in the checkpoint's dtype and on its device; NaN
    where the model has NaN)."""
    own = own.detach().to(held.device, held.dtype)
    if held.shape != own.shape:
        return False
    return torch.equal(held, own) or held.is_floating_point() and torch.allclose(held, own, 0, 0, equal_nan=True)


_METADATA = (bool, int, str, torch.device, torch.dtype, torch.Size, torch.layout, torch.memory_format, type(None))
_VALUE_READS = {torch.Tensor.item, torch.Tensor.tolist}  # (an integer buffer's value is no shape)
# ops reading some arguments' metadata alone (``y.type_as(p)``, ``y.to(p)``, ``torch.zeros_like(p)``, ``p.new_zeros``):
# the positions of those arguments
_LIKE = {
    **dict.fromkeys((torch.Tensor.type_as, torch.Tensor.to), slice(1, 2)),
    **dict.fromkeys((torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like), slice(0, 1)),
    **dict.fromkeys((torch.rand_like, torch.randn_like, torch.randint_like), slice(0, 1)),
    **dict.fromkeys((torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty), slice(0, 1)),
    torch.Tensor.new_full: slice(0, 1),
}


def _metadata(value: Any) -> bool:
    """Whether an op's result tells a tensor's metadata (its device, dtype, shape, strides), not its values."""
    return isinstance(value, _METADATA) or isinstance(value, tuple) and all(isinstance(v, int) for v in value)


def _largest_finite(t: torch.Tensor) -> float:
    finite = t[t.isfinite()]
    return finite.abs().max().item() if finite.numel() else 0.0


def _copied(values: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to("cpu", torch.float64, copy=True) for t in values]


def _difference(first: list[torch.Tensor], again: list[torch.Tensor], exact: bool) -> str:
    """How two runs' values differ, or ``""``: bit for bit when ``exact`` (torch's CPU kernels repeat themselves
    exactly), else (a GPU's atomic sums add in any order) within 1e-5 of the largest value. NaN and infinities must
    be alike in both."""
    if len(first) != len(again):
        return f"{len(first)} and {len(again)} tensors"
    for a, b in zip(first, again):
        if a.shape != b.shape:
            return f"tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}"
        tolerance = 0.0 if exact else 1e-5 * max(_largest_finite(a), _largest_finite(b))
        if not torch.allclose(a, b, rtol=0, atol=tolerance, equal_nan=True):
            return f"values up to {(a - b).abs().nan_to_num(float('inf')).max().item():.3g} apart"
    return ""


def _hidden_generators() -> list[tuple[Callable[[Any], Any], Any]]:
    """Python's, (where imported) NumPy's and torch's CPU global generators, each with its state now: the randomness
    the watch cannot see draws from them (torch's: read through `.tolist()`, drawn by the plain runs)."""
    taken: list[tuple[Callable[[Any], Any], Any]] = [
        (random.setstate, random.getstate()),
        (torch.set_rng_state, torch.get_rng_state()),
    ]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        taken.append((numpy.random.set_state, numpy.random.get_state()))
    return taken


def _put_back_generators(taken: list[tuple[Callable[[Any], Any], Any]]) -> None:
    for set_state, state in taken:
        set_state(state)


def _refuse_changed(
    first: list[torch.Tensor], again: list[torch.Tensor], exact: bool, criterion: str | None = None
) -> None:
    """Raise when two runs of the forward on the same example and checkpoint gave different values
    (``_difference``); a ``criterion``'s, where the model's outputs (its values but the last, the loss) agree."""
    differs = _difference(first, again, exact)
    if differs and criterion is not None and not _difference(first[:-1], again[:-1], exact):
        raise ValueError(
            f"`{criterion}`: two runs on the same model outputs and targets gave different losses ({differs}): the "
            f"criterion depends on a state that changes between calls (an attribute it sets) or draws random numbers "
            f"outside torch's generators, so its scores would depend on order. TracIn needs each example's loss to be "
            f"a function of the checkpoint and the example: {_KEEP_FIXED}."
        )
    if differs:
        raise ValueError(
            f"`model`: two forward passes on the same example and checkpoint gave different values ({differs}): the "
            f"forward draws random numbers outside torch's generators (Python's `random`, NumPy's) or depends on a "
            f"state that changes between calls, so its scores would be random. TracIn needs a forward pass that is a "
            f"function of the checkpoint and the example: turn the randomness off outside training (guard it by "
            f"`self.training`, then call `model.eval()`), or remove it."
        )


def _check_output(output: Any, name: str) -> None:
    if isinstance(output, torch.Tensor):
        return
    kind = "dict" if isinstance(output, Mapping) else type(output).__name__
    keys = f" with keys {list(output)[:6]}" if isinstance(output, Mapping) else ""
    raise TypeError(
        f"`{name}`: the model returns a {kind}{keys}, but `{name}` is a criterion `{name}(outputs, targets)` "
        f"that needs the output tensor. Pass `{name}=tc.BatchLoss(lambda params, batch: ...)` returning each "
        f"example's loss from the output (`out['logits']`, several heads' losses summed; the model run once per "
        f"batch, `functional_call(model, params, ...)`), or a `tc.ExampleLoss` of one example, or make the model "
        f"return a tensor."
    )


def _explain_dtype(err: Exception, example: Any, state: Tensors, where: str) -> None:
    """Integer inputs to a floating layer fail deep inside torch: name the input and the conversion instead."""
    message = str(err)
    ids = "'indices'" in message  # an Embedding's ids of an integer dtype it does not take (uint8)
    if not ids and not any(k in message for k in ("dtype", "scalar type", "Input type (")) or "target" in message:
        return  # (a loss's targets: torch's own message names them; a convolution's says "Input type")
    leaves = optree.tree_leaves(example, none_is_leaf=True)
    inputs = leaves[:-1] if len(leaves) > 1 else leaves
    tensors = [(i, t.dtype) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
    integer = [(i, dtype) for i, dtype in tensors if not dtype.is_floating_point]
    floating = {t.dtype for t in state.values() if t.is_floating_point()}
    cause = message.splitlines()[0].split(". ")[0]  # (torch's fixes after it: an RNN's "or convert model")
    untaken = [(i, dtype) for i, dtype in tensors if dtype not in (torch.int64, torch.int32)]
    untaken.sort(key=lambda pair: pair[1].is_floating_point)  # (an integer one first: a floating one may be an image)
    if ids and untaken:
        i, dtype = untaken[0]
        raise TypeError(
            f"`{where}` input {i} is {dtype}, which an nn.Embedding does not take as token ids ({cause}). Convert it "
            f"with `x.long()`."
        ) from err
    if integer and floating and not floating_dtypes_met(message):  # (two floating dtypes: a cast the model makes)
        i, dtype = integer[0]
        raise TypeError(
            f"`{where}` input {i} is {dtype} but the model computes in {sorted(map(str, floating))[0]}, and the "
            f"forward pass failed: {cause}. Convert it with `x.float()` (token ids for an nn.Embedding stay integers)."
        ) from err
