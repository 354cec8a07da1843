"""The model as a function shape: which parameters are differentiated, and checkpoints split accordingly."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch import nn
from torch.func import functional_call

from ._checkpoints import Checkpoint, check_lr

Forward = Callable[..., Any]  # forward(state, *inputs) -> outputs
ParamSelector = Union[Sequence[str], Callable[[str], bool], None]

# Modules whose training-mode forward couples examples or draws random numbers: scores would be meaningless.
_TRAIN_MODE_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class Prepared(NamedTuple):
    """One checkpoint ready for the pure core: its state on the target device, split into the differentiated
    tensors and the frozen rest (parameters and buffers)."""

    diff: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor]
    lr: torch.Tensor  # 0-d, so compiled code does not specialise on its value

    def split(self, names: Sequence[str]) -> Prepared:
        """The same checkpoint differentiated w.r.t. ``names`` instead."""
        state = {**self.frozen, **self.diff}
        return Prepared({n: state[n] for n in names}, {n: t for n, t in state.items() if n not in names}, self.lr)


class ModelSpec(NamedTuple):
    """What the core needs from the user's model: a forward function and the names it takes."""

    forward: Forward
    diff_names: tuple[str, ...]
    expected: frozenset[str] | None  # state-dict names a checkpoint must hold; None for a pure function
    aliases: frozenset[str]  # tied names (second name of a shared tensor): accepted, not passed on
    defaults: Mapping[str, torch.Tensor]  # the model's own state, used for names a checkpoint omits (strict=False)


def check_no_backward_hooks(model: Any) -> None:
    """Raise if a module has backward hooks: torch.func transforms cannot run through them."""
    if not isinstance(model, nn.Module):
        return
    for name, module in model.named_modules():
        if module._backward_hooks or module._backward_pre_hooks:
            raise ValueError(
                f"`model` has a backward hook on {type(module).__name__} {name or '(root)'!r}; torch.func transforms "
                f"cannot run through it. Remove it (`handle.remove()`) before scoring."
            )


def check_eval_mode(model: Any) -> None:
    """Raise if a module whose training-mode output couples or randomises examples is in training mode."""
    if not isinstance(model, nn.Module):
        return
    for name, module in model.named_modules():
        if module.training and isinstance(module, _TRAIN_MODE_SENSITIVE):
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0:
                continue
            raise ValueError(
                f"`model` has {type(module).__name__} {name or '(root)'!r} in training mode, which makes per-example "
                f"gradients depend on the batch or on random numbers. Call `model.eval()` before scoring."
            )


def _layer_names(model: nn.Module, layers: Sequence[str], param_names: Sequence[str]) -> list[str]:
    modules = dict(model.named_modules())
    selected = []
    for layer in layers:
        if layer not in modules:
            raise ValueError(
                f"`layers` names unknown module {layer!r}; modules with parameters: "
                f"{sorted(n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False)))[:20]}."
            )
        prefix = f"{layer}." if layer else ""
        under = [n for n in param_names if n.startswith(prefix)]
        if not under:
            raise ValueError(f"`layers` entry {layer!r} has no differentiable parameters under it.")
        selected += [n for n in under if n not in selected]
    return selected


def select_params(
    available: Sequence[str], default: Sequence[str], params: ParamSelector, layers: Sequence[str] | None, model: Any
) -> tuple[str, ...]:
    """Names of the differentiated parameters, from ``params`` (names or a predicate) or ``layers`` (modules)."""
    if params is not None and layers is not None:
        raise ValueError("Pass either `params` or `layers`, not both.")
    if layers is not None:
        if isinstance(layers, str) or not isinstance(model, nn.Module):
            raise TypeError("`layers` must be a list of module names of an `nn.Module` model, e.g. `layers=['fc']`.")
        names = _layer_names(model, layers, available)
    elif params is None:
        names = list(default)
    elif callable(params):
        names = [n for n in available if params(n)]
    elif isinstance(params, str):
        raise TypeError(
            f"`params` must be a list of names or a predicate, got the string {params!r}; use `[{params!r}]`."
        )
    else:
        unknown = [n for n in params if n not in available]
        if unknown:
            raise ValueError(f"`params` names unknown parameters {unknown}; available: {list(available)[:20]}.")
        names = list(dict.fromkeys(params))
    if not names:
        raise ValueError(f"No parameters selected to differentiate (`params`={params!r}, `layers`={layers!r}).")
    return tuple(names)


def model_spec(
    model: Any, first_params: Mapping[str, torch.Tensor], params: ParamSelector, layers: Sequence[str] | None
) -> ModelSpec:
    """Build the function shape of ``model``: an ``nn.Module`` or a pure function ``f(params, *inputs)``."""
    if isinstance(model, nn.Module):
        check_eval_mode(model)
        check_no_backward_hooks(model)
        named = dict(model.named_parameters())  # de-duplicated: a tied tensor appears under its first name
        state = model.state_dict(keep_vars=True)
        param_ids = {id(p) for p in named.values()}
        aliases = frozenset(n for n, t in state.items() if n not in named and id(t) in param_ids)
        trainable = [n for n, p in named.items() if p.requires_grad]
        diff = select_params(list(named), trainable, params, layers, model)

        def forward(state: Mapping[str, torch.Tensor], *inputs: Any) -> Any:
            return functional_call(model, dict(state), inputs)

        defaults = {n: t.detach() for n, t in state.items() if n not in aliases}
        return ModelSpec(forward, diff, frozenset(state), aliases, defaults)
    if not callable(model):
        raise TypeError(f"`model` must be an nn.Module or a function f(params, *inputs), got {type(model).__name__}.")
    floating = [n for n, t in first_params.items() if t.is_floating_point()]
    diff = select_params(list(first_params), floating, params, layers, model)
    return ModelSpec(model, diff, None, frozenset(), {})


def _names(names: list[str], limit: int = 10) -> str:
    return str(names[:limit])[:-1] + (", ...]" if len(names) > limit else "]")


def prepare(
    spec: ModelSpec, ckpt: Checkpoint, index: int, *, device: torch.device, dtype: torch.dtype | None, strict: bool
) -> Prepared:
    """Validate one checkpoint against the model and move it to ``device`` / ``dtype``."""
    if not isinstance(ckpt, Checkpoint):
        raise TypeError(
            f"`checkpoints[{index}]` is a {type(ckpt).__name__}; wrap it as `tc.Checkpoint(params=state_dict, lr=...)` "
            f"or load files with `tc.load_checkpoints`."
        )
    check_lr(ckpt.lr, f"checkpoints[{index}]")
    state = dict(ckpt.params)
    if spec.expected is not None:
        unexpected = sorted(set(state) - spec.expected)
        missing = sorted(spec.expected - set(state) - spec.aliases)
        if unexpected or (missing and strict):
            fix = "" if unexpected else ", or pass `strict=False` to take missing entries from the model"
            raise ValueError(
                f"`checkpoints[{index}]` does not match the model: missing {_names(missing)}, unexpected "
                f"{_names(unexpected)}. Save the model's `state_dict()`{fix}."
            )
        state = {**{n: spec.defaults[n] for n in spec.defaults if n not in state}, **state}
        state = {n: t for n, t in state.items() if n not in spec.aliases}
    missing_diff = [n for n in spec.diff_names if n not in state]
    if missing_diff:
        raise ValueError(f"`checkpoints[{index}]` lacks the differentiated parameters {missing_diff[:10]}.")

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)

    moved = {n: move(t) for n, t in state.items()}
    diff = {n: moved[n] for n in spec.diff_names}
    frozen = {n: t for n, t in moved.items() if n not in diff}
    lr_dtype = dtype or next(iter(diff.values())).dtype
    lr = torch.as_tensor(ckpt.lr, dtype=lr_dtype, device=device).detach().reshape(())
    return Prepared(diff, frozen, lr)
