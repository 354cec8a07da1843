"""The context every call runs in: outside the caller's ``torch.autocast`` (the library computes in the call's dtype),
and never inside a ``torch.func`` transform (it takes gradients itself)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ._data import closing_workers
from ._warn import warn

_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")
_F = TypeVar("_F", bound=Callable[..., Any])


def in_own_context(fn: _F) -> _F:
    """``fn`` run with an ambient ``torch.autocast`` (a training step's, around a tracer's update) switched off, so
    that scores are computed in the call's dtype: under it the library's own products ran in bfloat16 (2e-3 off)
    and float16 ones overflowed. Autocast set inside the model's forward is the model's own and stays. Refused
    inside a ``torch.func`` transform (``vmap`` / ``grad`` over a call), where a test example was blamed for torch's
    "Cannot access storage of TensorWrapper"; and under ``torch.inference_mode()`` (a tracer's update raised torch's
    "Inference tensors do not track version counter"). A scorer runs eagerly inside the user's ``torch.compile``
    (traced, its planning's checks failed on dynamo's tensors: a warning blaming the model and 20-50 s for a 0.1 s
    call; a review helper's); a tracer's update is compiled as the README says."""

    outer, _, inner = fn.__qualname__.partition(".<locals>.")  # (a tracer's update: `tc.tracer(...).update`)
    name = f"tc.{outer}(...).{inner}" if inner else f"tc.{fn.__name__}"

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        _refuse_outer_context(name)
        ambient = [device for device in _AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]
        held: list[Any] = []
        taken = _taken()
        try:
            _set_aside_saved_tensors_hooks(held)
            with contextlib.ExitStack() as stack, closing_workers():
                for device in ambient:
                    stack.enter_context(torch.autocast(device, enabled=False))
                return fn(*args, **kwargs)
        finally:
            _put_back(taken)
            _put_back_saved_tensors_hooks(held)

    return run if inner else torch.compiler.disable(run)  # type: ignore[return-value]


def _available(device: torch.device) -> bool:
    """Whether ``device`` is the CPU or an accelerator whose backend is built and has a device (``torch.cuda``)."""
    if device.type == "cpu":
        return True
    backend = getattr(torch, device.type, None)
    return bool(getattr(backend, "is_available", lambda: False)())


# (eager under torch.compile, as a compiled tracer's update runs them: dynamo warned that it cannot trace the
# hooks' stack, telling the user to file a PyTorch issue)
@torch.compiler.disable
def _refuse_outer_context(name: str) -> None:
    """Refuse a call under ``torch.inference_mode()`` or inside a ``torch.func`` transform (``in_own_context``)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"`{name}`: scores need gradients, which torch cannot compute under "
            f"`torch.inference_mode()`; call it outside that block (`torch.no_grad()` is fine: the library "
            f"enables what it needs)."
        )
    try:
        default = torch.get_default_device()  # (which raises where a CUDA default has no CUDA to ask its index)
        unusable = "holds no values" if default.type == "meta" else None if _available(default) else "is unavailable"
    except (RuntimeError, AssertionError) as err:
        default, unusable = "unavailable", f"cannot be used ({type(err).__name__}: {err})"
    if unusable:
        raise RuntimeError(
            f"`{name}`: torch's default device ({default}; `torch.set_default_device`, or a `with torch.device(...)` "
            f"block), on which tensors made without a device are made, {unusable}. Call it with a default device "
            f"that computes (`torch.set_default_device('cpu')`, or outside the block)."
        )
    if torch._C._len_torch_dispatch_stack() and _fake_mode() is not None:  # (torch's assertion on a plain tensor)
        raise RuntimeError(
            f"`{name}`: called under a `FakeTensorMode`, where tensors hold no values (shapes only), as on the meta "
            f"device. Call it outside that mode."
        )
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"`{name}` was called inside a torch.func transform (`vmap`, `grad`, `jacrev`, ... over the "
            f"call): it takes per-example gradients itself and cannot be transformed. Call it outside the "
            f"transform (`torch.vmap` over test examples: pass them as one batch)."
        )


def _fake_mode() -> Any:
    """The ``FakeTensorMode`` among the running dispatch modes, or None."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return next((m for m in _get_current_dispatch_mode_stack() if isinstance(m, FakeTensorMode)), None)


@torch.compiler.disable
def _taken() -> tuple[int, int, bool]:
    """This thread's torch function and dispatch mode stacks' depths and grad mode, as a call starts."""
    return torch._C._len_torch_function_stack(), torch._C._len_torch_dispatch_stack(), torch.is_grad_enabled()


@torch.compiler.disable
def _put_back(taken: tuple[int, int, bool]) -> None:
    """The stacks and grad mode as ``_taken`` took them: an interruption (KeyboardInterrupt) inside a layer's forward
    skips the forward hooks that leave the modes the call entered in its pre-hooks (``always_call`` runs on an
    Exception only), and each outer mode's exit then pops the one above it: the user's own forward passes ran under
    the call's modes after it (a layer refused as "fed rows of several examples merged"; a review helper's trial)."""
    functions, dispatches, grad = taken
    while torch._C._len_torch_function_stack() > functions:
        torch._C._pop_torch_function_stack()
    while torch._C._len_torch_dispatch_stack() > dispatches:
        torch._C._pop_torch_dispatch_stack()
    torch.set_grad_enabled(grad)


_HOOK_OPS = ("top", "pop", "push")  # (torch's private stack of saved-tensors hooks, where this torch has it)


@torch.compiler.disable
def _set_aside_saved_tensors_hooks(held: list[Any]) -> None:
    """The caller's ``torch.autograd.graph.saved_tensors_hooks`` (this thread's), taken off for the call into
    ``held``, outermost last: the library's own backward passes ran through them (a memory-saving pack to bfloat16:
    scores 1.4e-3 off in float64, silently; ``save_on_cpu``'s sent ``factored=False`` to the per-example loop)."""
    top, pop, push = (getattr(torch._C._autograd, f"_{op}_saved_tensors_default_hooks", None) for op in _HOOK_OPS)
    while top is not None and pop is not None and push is not None and (hooks := top(False)) is not None:
        held.append(hooks)
        pop()


@torch.compiler.disable
def _put_back_saved_tensors_hooks(held: list[Any]) -> None:
    """``_set_aside_saved_tensors_hooks``'s hooks put back as they were."""
    for hooks in reversed(held):  # (none where this torch has no such stack)
        torch._C._autograd._push_saved_tensors_default_hooks(*hooks)


def lowered_float32(device: torch.device | None) -> list[tuple[str, str]]:
    """The settings under which float32 products on ``device`` round below float32 (TF32 or bfloat16, about 1e-3),
    each as the code that sets it and the code that turns it off: on a GPU, TF32 (PyTorch's default for cuDNN
    convolutions); on a CPU, oneDNN's bfloat16 (``torch.set_float32_matmul_precision("medium")`` on a CPU with
    bfloat16 units: an MLP's scores 4e-3 off, float32's 1e-7; ``"high"``, TF32, left as "highest" scores on CPUs
    without TF32 units, 9e-8 off: not warned)."""
    if device is None or device.type not in ("cpu", "cuda"):
        return []
    if device.type == "cuda":
        flags = {"torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                 "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}  # fmt: skip
        return [(f"{flag} = True", f"{flag} = False") for flag, on in flags.items() if on]
    if not hasattr(torch.backends.mkldnn, "matmul"):  # (torch before 2.9: one process-wide setting)
        precision = torch.get_float32_matmul_precision()
        set_to = 'torch.set_float32_matmul_precision("{}")'.format
        return [] if precision == "highest" else [(set_to(precision), set_to("highest"))]
    lowered = []
    for op in ("matmul", "conv", "rnn"):
        value = onednn_fp32_precision(op)
        if value == "bf16":  # (oneDNN's TF32, `"high"`, runs on CPUs with TF32 units only: here, as "highest")
            flag = f"torch.backends.mkldnn.{op}.fp32_precision"
            lowered.append((f'{flag} = "{value}"', f'{flag} = "ieee"'))
    return lowered


def onednn_fp32_precision(op: str) -> str:
    """oneDNN's float32 precision for ``op`` ("matmul", "conv", "rnn") on torch 2.9 and later: "ieee", "tf32" or
    "bf16", each setting's "none" deferring to the next wider one's (``torch.get_float32_matmul_precision()`` raises
    once any of them is set, ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` included; the legacy setter sets
    ``mkldnn.matmul``: "high" tf32, "medium" bf16)."""
    mkldnn = torch.backends.mkldnn
    chain = (getattr(mkldnn, op).fp32_precision, mkldnn.fp32_precision, torch.backends.fp32_precision)
    return next((v for v in chain if v != "none"), "ieee")


def full_float32_products(*ops: str) -> bool:
    """Whether oneDNN's float32 ``ops`` run at full float32 precision (before torch 2.9: the one process-wide
    setting)."""
    if not hasattr(torch.backends.mkldnn, "matmul"):
        return torch.get_float32_matmul_precision() == "highest"
    return all(onednn_fp32_precision(op) == "ieee" for op in ops)


def _listed(lowered: list[tuple[str, str]]) -> tuple[str, str]:
    """The code setting each lowered product and the code turning it off, each side joined for a message."""
    on, off = zip(*lowered)
    return " and ".join(f"`{c}`" for c in on), " and ".join(f"`{c}`" for c in off)


def lowered_note(device: torch.device | None, dtype: torch.dtype) -> str:
    """Why a float32 comparison of a batch with its examples alone may fail by rounding alone (``lowered_float32``),
    which differs between the two far beyond float32's: on an H200, ResNet-18 and the MobileNet-style net left the
    batched path under TF32 and stayed batched without it (their influence 1.25-1.31 s against 0.80-0.83 s, 0.91-1.31
    s against 0.46-0.49 s); ``""`` where it does not apply."""
    lowered = lowered_float32(device) if dtype == torch.float32 else []
    if not lowered:
        return ""
    on, off = _listed(lowered)
    return (
        f". Float32 products round below float32 here ({on}): about 1e-3, unlike in a batch and in an example alone, "
        f"which this check cannot tell from examples interacting; set {off} for full float32 products and the "
        f"batched path"
    )


def check_precision(dtype: torch.dtype, device: torch.device, converted: str) -> None:
    """Refuse a ``dtype`` narrower than float32 (inner products of gradients in half precision keep about three
    significant digits: scores 1e-3 off and more; float8's ops fail on the data); warn where a setting of the user's
    lowers float32 products (``lowered_float32``: cuDNN's TF32, PyTorch's default on a GPU, is documented, not warned).
    ``converted``: what the call converts to ``dtype``."""
    if dtype not in (torch.float32, torch.float64):  # (float8's ops are not implemented: the data was blamed)
        narrow = "half precision" if dtype in (torch.float16, torch.bfloat16) else f"{dtype.itemsize * 8}-bit floats"
        raise ValueError(
            f"`dtype`={dtype}: inner products of gradients in {narrow} lose most of their digits; pass "
            f"`dtype=torch.float32` ({converted})."
        )
    lowered = [pair for pair in lowered_float32(device) if "cudnn" not in pair[0]] if dtype == torch.float32 else []
    if lowered:
        on, off = _listed(lowered)
        warn(
            f"float32 products round below float32 in this process ({on}): scores come out about 1e-3 off, and the "
            f"batching check may refuse the batched path (the rounding differs between a batch and an example "
            f"alone). Set {off} around the call, or pass `dtype=torch.float64`.",
            UserWarning,
        )
