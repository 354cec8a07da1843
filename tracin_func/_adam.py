"""Adam-aware TracIn: a checkpoint's saved ``torch.optim.Adam`` / ``AdamW`` state turns each training example's
gradient into the update Adam would take for that example alone (test examples keep plain gradients, as in LESS,
Xia et al. 2024).

For a parameter with saved moments ``m``, ``v``, ``t = step`` (torch's count of steps already taken) and its
param group's ``betas = (b1, b2)``, ``eps``, the example's gradient ``g`` gives

    m' = b1 m + (1 - b1) g        v' = b2 v + (1 - b2) g^2        (v' = max(max_exp_avg_sq, v') with amsgrad)
    u  = (m' / (1 - b1^(t+1))) / (sqrt(v' / (1 - b2^(t+1))) + eps)

the direction of the next step (``theta <- theta - lr u``), bias-corrected for step ``t + 1`` exactly as torch
does. Adam's coupled weight decay (``torch.optim.Adam(weight_decay=wd)``) is part of the gradient Adam sees, so
``g`` is ``g + wd theta`` there. AdamW's decoupled decay (``theta <- theta - lr wd theta``) is the same for every
example: it would shift every score of a test example by the same ``lr <g_test, wd theta>`` per checkpoint, so it
is left out (the score is the example's own effect). A parameter without saved state (never stepped) starts from
``m = v = 0``, ``t = 0``, as torch's first step does.

Optimizer state dicts key parameters by integer ids. They are matched to names by the ``param_names`` torch
stores when an optimizer is built from ``model.named_parameters()``; otherwise, for one param group, in the order
of ``model.named_parameters()`` (all of them, or those that require grad: the order of ``model.parameters()``, from
which optimizers are usually built) or of a pure function's floating checkpoint entries. Counts and every shape
must match. Several param groups without ``param_names`` cannot be matched safely (their order is the user's) and
are refused. A checkpoint weighs every parameter by its one ``lr``, so scored parameters in param groups of different
learning rates are refused: each group is scored in a call of its own (its ``lr``, ``params=`` its parameters).

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.Adam([w], lr=0.1)
    >>> w.grad = torch.tensor([1.0, -2.0]); opt.step()
    >>> states = adam_states(opt.state_dict(), ["w"], {"w": (2,)}, "checkpoints[0]")
    >>> states["w"].step.item(), states["w"].beta1
    (1.0, 0.9)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ._aliasing import warn_aliased_moments
from ._checkpoints import groups_listed, leading_prefixes, wrapper_prefix
from ._representations import Dense, Representation, _rows
from ._warn import warn


class AdamParam(NamedTuple):
    """One parameter's saved Adam state and hyper-parameters (tensors on the computation device and dtype)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None  # amsgrad
    step: torch.Tensor  # 0-d: steps already taken
    beta1: float
    beta2: float
    eps: float
    weight_decay: float  # coupled (Adam's L2): added to the gradient; 0 for AdamW (decoupled, left out)
    group: int  # its param group's index
    lr: float | None  # its param group's learning rate (``check_one_lr``), where saved
    named: bool  # matched to its name by the saved names, not by position (``warn_matched_by_position``)


def _group_of(groups: Sequence[Mapping[str, Any]], index: int, where: str) -> Mapping[str, Any]:
    group = groups[index]
    if "amsgrad" not in group or "betas" not in group or "eps" not in group or "momentum_decay" in group:
        raise ValueError(
            f"`optimizer_state` of {where}: param_groups[{index}] (keys {sorted(group)}) is not torch.optim.Adam / "
            f"AdamW's (they store 'betas', 'eps' and 'amsgrad'); only Adam and AdamW states are supported. Drop "
            f"`optimizer_state` to score with plain gradients (`[tc.Checkpoint(c.params, c.lr) for c in checkpoints]`)."
        )
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas) or not float(group["eps"]) >= 0.0:
        raise ValueError(
            f"`optimizer_state` of {where}: param_groups[{index}] has betas={tuple(betas)} and eps={group['eps']}; "
            f"Adam needs both betas in [0, 1) and eps >= 0 (torch.optim.Adam refuses others). Save the state of the "
            f"optimizer that trained the model, unedited."
        )
    if group.get("maximize", False):
        raise ValueError(
            f"`optimizer_state` of {where}: param_groups[{index}] has maximize=True (gradient ascent); TracIn scores "
            f"loss descent. Drop `optimizer_state`, or save the state of a minimising optimizer."
        )
    changed = _not_adams_step(group)
    if changed:
        raise ValueError(
            f"`optimizer_state` of {where}: param_groups[{index}] has {changed}, so its steps are not torch Adam's, "
            f"which Adam-aware scores follow. Drop `optimizer_state` to score with plain gradients "
            f"(`[tc.Checkpoint(c.params, c.lr) for c in checkpoints]`)."
        )
    if group.get("weight_decay", 0) and "decoupled_weight_decay" not in group:
        raise ValueError(
            f"`optimizer_state` of {where}: param_groups[{index}] has weight_decay={group['weight_decay']} but no "
            f"'decoupled_weight_decay' entry (torch < 2.6), so Adam (L2 decay, part of the gradient) cannot be told "
            f"from AdamW (decoupled decay, left out). Set `group['decoupled_weight_decay']` to True (AdamW) or False "
            f"(Adam) in the saved state."
        )
    return group


def _not_adams_step(group: Mapping[str, Any]) -> str:
    """A param group's setting of another library's Adam that changes its step from torch's (an 81% off score, read
    as torch's: a review helper's DeepSpeed state), in words, else ``""``."""
    if not group.get("bias_correction", True):
        return "bias_correction=False (DeepSpeed's or apex's Adam without bias correction)"
    if group.get("caution", False):
        return "caution=True (timm's cautious Adam, masking its step where it disagrees with the gradient)"
    return ""


def _ends_of(names: Sequence[str], order: Sequence[str]) -> dict[str, str] | None:
    """Each of ``names`` and the first of the model's names (``order``) it is the end of (``fc.weight`` of
    ``backbone.fc.weight``: a submodule's own name), where every one of them is such an end; else None, from the
    first that is none (most models' first name: the scan of all of them against all of the model's stops there)."""
    ends = {}
    for n in names:
        end = next((o for o in order if o.endswith("." + n)), None)
        if end is None:
            return None
        ends[n] = end
    return ends


def _unknown_names_fix(unknown: Sequence[str], order: Sequence[str]) -> str:
    """The end of the message refusing the optimizer's ``unknown`` parameter names: why they may not be the model's
    (``order``) and the fix (names one prefix away from the model's are matched: ``_as_named``)."""
    relative = _ends_of(unknown, order)
    if relative:
        short, full = next(iter(relative.items()))
        return (
            f": they look relative to a submodule ({short!r}, not {full!r}), as param groups built from a "
            f"submodule's `named_parameters()` name them. Build the groups from the model's `named_parameters()`, "
            f"e.g. `[(n, p) for n, p in model.named_parameters() if n.startswith({full[: -len(short)]!r})]`, or set "
            f"each group's 'param_names' to the model's names in a copy of the saved state."
        )
    return f"; save the optimizer of this model (its parameters: {list(order)[:10]})."


def _as_named(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """The optimizer's parameter ``names`` as the model's (``order``) where they differ from them by one prefix alone:
    a wrapper's prefix every one of the model's names carries and the saved ones lack (a model whose only child is
    named ``module``: ``tc.load_checkpoints`` strips it from files), or a prefix of the saved ones the model's lack (a
    LightningModule's ``model.``, stripped from the state dict as its refusal advises), unless the saved names are
    also the ends of the model's names (a submodule's own, ``0.fc.weight`` of ``backbone.0.fc.weight``, which the
    prefix's strip would take for the model's ``fc.weight``: refused, naming them). Names map one to one: exact.
    Else ``names``."""
    known = set(order)
    if all(n in known for n in names):
        return list(names)
    wrapper = wrapper_prefix(names, known)
    if wrapper is not None:
        return [wrapper + n for n in names]
    if _ends_of(names, order):  # (relative to a submodule: `_unknown_names_fix`)
        return list(names)
    for prefix in leading_prefixes(names[0]) if names else []:
        stripped = [n[len(prefix) :] for n in names if n.startswith(prefix)]
        if len(stripped) == len(names) and all(n in known for n in stripped):
            return stripped
    return list(names)


def _warn_if_relative(names: Sequence[str], order: Sequence[str], where: str) -> None:
    """Warn where the optimizer's names, all the model's, are each also the end of another of its names: an optimizer
    of a submodule (``model.backbone``'s ``named_parameters()``: 'fc.weight' of 'backbone.fc.weight') reads as one
    of the model's own layers, which takes its moments (found by review: silently, where the scored layer is that one;
    its own refused as held by no optimizer)."""
    longer = _ends_of(names, order) if set(names) <= set(order) else None
    if longer:
        short, full = next(iter(longer.items()))
        warn(
            f"`optimizer_state` of {where} names parameters the model has ({short!r}, ...), each also the end of "
            f"another of its names ({full!r}): read as the model's own. If its optimizer was built from a "
            f"submodule's `named_parameters()`, its moments are that submodule's: set each group's 'param_names' to "
            f"the model's names in a copy of the saved state.",
            UserWarning,
        )


def _ids_to_names(
    groups: Sequence[Mapping[str, Any]],
    order: Sequence[str],
    trainable: Sequence[str],
    where: str,
    scored: Sequence[str],
) -> dict[Any, tuple[str, int]]:
    """``{parameter id: (name, group index)}``. Without saved names, one group's ids in order are all of ``order``,
    its ``trainable`` ones, or the ``scored`` ones (in ``order``: an optimizer built from the parameters that required
    grad then, others frozen; a pure function's trained tensors beside a floating constant)."""
    ids = [(i, g) for g, group in enumerate(groups) for i in group["params"]]
    # names as the ids: matched by position, in another order they were other parameters' moments (78% off, silently)
    if _names_saved(groups):
        by_name = all(isinstance(i, str) for i, _ in ids)
        saved = [i for i, _ in ids] if by_name else [n for group in groups for n in group["param_names"]]
        names = _as_named(saved, order)
        _warn_if_relative(names, order, where)
        unknown = [n for n in names if n not in order]
        if unknown:
            raise ValueError(
                f"`optimizer_state` of {where} names parameters {list(dict.fromkeys(unknown))[:5]} that the model "
                f"does not have{_unknown_names_fix(unknown, order)}"
            )
        if len(names) != len(ids):
            raise ValueError(
                f"`optimizer_state` of {where} has {len(names)} 'param_names' for {len(ids)} parameter ids; save the "
                f"optimizer's `state_dict()` unedited."
            )
        return {i: (n, g) for (i, g), n in zip(ids, names)}
    if len(groups) > 1:
        raise ValueError(
            f"`optimizer_state` of {where} has {len(groups)} param groups without 'param_names', so its parameter "
            f"ids cannot be matched to names safely (the groups' order is the training script's: a Hugging Face "
            f"Trainer's, decayed weights, then biases and norms). Name them in a copy of the state, each group's "
            f"'param_names' the model's names of its 'params' in order (`state['param_groups'][g]['param_names'] = "
            f"[...]`, as the training script built the groups), or, training again, build the optimizer from "
            f"`model.named_parameters()` (torch >= 2.6 then saves the names)."
        )
    for candidate in (order, trainable, scored):
        if len(ids) == len(candidate):
            if candidate is scored:  # (a warm-up's head-only optimizer matched to a backbone scored: 46% off)
                _warn_matched_to_scored(len(ids), len(order), len(trainable))
            return {i: (n, g) for (i, g), n in zip(ids, candidate)}
    raise ValueError(
        f"`optimizer_state` of {where} holds {len(ids)} parameters but the model has {len(order)} "
        f"({len(trainable)} requiring grad, {len(scored)} scored); without saved names, ids are matched in the order "
        f"of `model.named_parameters()` (a function's floating checkpoint entries) to all of them, those requiring "
        f"grad, or those scored (`params=`). Name them in a copy of the state: `state['param_groups'][0]"
        f"['param_names'] = [...]`, the names in the optimizer's order (as torch >= 2.6 saves them for an optimizer "
        f"built from `model.named_parameters()`)."
    )


def warn_unstepped(states: Sequence[Mapping[str, AdamParam] | None], scored: Collection[str]) -> None:
    """Warn where a checkpoint's Adam state holds no step of a scored parameter while others took steps: frozen
    until then (a staged fine-tune's backbone), it is scored by Adam's first step for it, which a parameter still
    frozen after the checkpoint never took (115% off, unwarned until 2026-12-08). ``scored``: those the call's plan
    differentiates and finds used (an unused head's updates are zero: no warning)."""
    behind = {}  # checkpoint index -> its unstepped scored parameters
    for i, named in enumerate(states):
        if named and any(float(s.step) > 0 for s in named.values()):
            behind[i] = [n for n in scored if n in named and float(named[n].step) == 0]
    behind = {i: names for i, names in behind.items() if names}
    if behind:
        (i, names), *_ = behind.items()
        others = f" (checkpoints[{i}]'s; of checkpoints{sorted(behind)[:10]} in all)" if len(behind) > 1 else ""
        warn(
            f"`optimizer_state` of checkpoints[{i}] holds no step of the scored {_listed(names)}{others} while other "
            f"parameters took steps there: frozen until then, or reached by no gradient, they are scored by the "
            f"first step Adam would take for them. A parameter still frozen after a "
            f"checkpoint never took that step: score such parameters (`params=`) in a call of their own over the "
            f"checkpoints after which they trained, the others in another, and add the scores.",
            UserWarning,
        )


def _listed(names: Sequence[str]) -> str:
    return f"{list(names)[:5]}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"


def _warn_matched_to_scored(held: int, parameters: int, trainable: int) -> None:
    warn(
        f"`optimizer_state` holds {held} parameters without names, as many as the scored ones (`params=`) but not "
        f"the model's {parameters} ({trainable} requiring grad): its moments are matched to the scored parameters "
        f"by position, as an optimizer built from just those holds them. One built from others (a warm-up's head, "
        f"the model unfrozen since) gives them other parameters' moments, unseen where the shapes agree. Name them in "
        f"a copy of the state to have them matched by name: `state['param_groups'][0]['param_names'] = [...]`, the "
        f"names in the optimizer's order (as torch >= 2.6 saves them for an optimizer built from "
        f"`model.named_parameters()`).",
        UserWarning,
    )


def warn_matched_by_position(adam: Sequence[Mapping[str, AdamParam] | None], scored: Collection[str]) -> None:
    """Warn where an optimizer state without names was matched by position (``_ids_to_names``) and a scored parameter
    (one a call's plan differentiates) shares its shape with another so matched: the shapes then cannot show an
    optimizer built in another order than the model's, whose moments would go to the wrong parameters (13% off,
    silently, for two same-shaped layers listed the other way; 11% for a scored one beside an unscored one, unwarned
    until 2026-12-07). ``adam``: each checkpoint's states, or None."""
    for i, states in enumerate(adam):
        unnamed = {n: tuple(s.exp_avg.shape) for n, s in (states or {}).items() if not s.named}
        alike = next((pair for n in scored if n in unnamed and (pair := _one_shape_as(n, unnamed))), None)
        if alike is not None:
            warn(
                f"`checkpoints[{i}]`'s `optimizer_state` holds no parameter names (an optimizer built from "
                f"`model.parameters()`), so its moments are matched to `model.named_parameters()` by position, which "
                f"only their shapes check; {alike[0]!r} and {alike[1]!r} have one shape, so an optimizer listing them "
                f"in another order would give each the other's moments, unseen. Build the optimizer from "
                f"`model.named_parameters()` (torch >= 2.6 saves the names) to have them matched by name.",
                UserWarning,
            )
            return


def _one_shape_as(name: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str] | None:
    """``(name, another)`` of ``name``'s shape among ``shapes``, in their order, else None."""
    other = next((n for n, shape in shapes.items() if n != name and shape == shapes[name]), None)
    return None if other is None else tuple(sorted((name, other), key=list(shapes).index))


def _names_saved(groups: Sequence[Mapping[str, Any]]) -> bool:
    """Whether an optimizer state's param groups name their parameters: ``param_names``, or names as the ids
    (``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``: FSDP2, Accelerate)."""
    ids = [i for group in groups for i in group["params"]]
    return bool(ids) and all(isinstance(i, str) for i in ids) or all("param_names" in group for group in groups)


def check_one_lr(adam: Sequence[Mapping[str, AdamParam] | None], scored: Collection[str]) -> None:
    """Refuse scored parameters (those a call's plan differentiates: the last layer's with ``method="last_layer"``)
    in param groups of different learning rates; ``adam``: each checkpoint's states, or None. Adam moves each
    parameter by its own group's ``lr`` times its update, but a checkpoint weighs every parameter by its one ``lr``
    (weighted by one of them, the scores were 99% off)."""
    for i, states in enumerate(adam):
        held: dict[tuple[int, float], list[str]] = {}
        for name in scored:
            if states is not None and name in states and states[name].lr is not None:
                held.setdefault((states[name].group, states[name].lr), []).append(name)
        if len({lr for _, lr in held}) < 2:
            continue
        listed = groups_listed((g, lr, names) for (g, lr), names in sorted(held.items()))
        (group, lr), names = min(held.items())
        raise ValueError(
            f"`optimizer_state` of checkpoints[{i}] has param groups of different learning rates ({listed}): Adam "
            f"moves each parameter by its group's lr, but a checkpoint weighs every parameter by its one `lr`. Score "
            f"each group in a call of its own, with checkpoints of that group's lr at each checkpoint and `params=` "
            f"its parameters (e.g. `tc.load_checkpoints(paths, lr=lrs)`, `lrs` the group's `param_groups[{group}]"
            f"['lr']` of each file in turn, {lr:g} in this one, and {_group_names(names, group)}), and sum "
            f"the scores."
        )


def _group_names(names: list[str], group: int) -> str:
    """A group's parameter names for ``params=``, whole (the first five, copied, scored part of the group: 28% off,
    silently; a review helper's), or where they are many, where they are listed."""
    many = f"`params=` its {len(names)} parameters (`param_groups[{group}]`'s)"
    return f"`params={names}`" if len(names) <= 20 else many


def adam_states(
    optimizer_state: Any,
    order: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    where: str,
    trainable: Sequence[str] | None = None,
    scored: Collection[str] | None = None,
) -> dict[str, AdamParam]:
    """Name-keyed Adam state of a torch ``optimizer.state_dict()``, validated (see the module docstring); ``scored``:
    the parameters the call differentiates (default: all), whose updates must be defined.

    ``order``: the model's parameter names in ``named_parameters()`` order; ``trainable``: those requiring grad
    (default: all); ``shapes``: each parameter's shape. Tensors stay where they are (see :func:`on_device`)."""
    if not (
        isinstance(optimizer_state, Mapping)
        and isinstance(optimizer_state.get("state"), Mapping)
        and isinstance(optimizer_state.get("param_groups"), Sequence)
        and all(isinstance(g, Mapping) and "params" in g for g in optimizer_state["param_groups"])
    ):
        got = sorted(optimizer_state) if isinstance(optimizer_state, Mapping) else type(optimizer_state).__name__
        raise TypeError(
            f"`optimizer_state` of {where} must be a torch optimizer's `state_dict()` (a dict with 'state' and "
            f"'param_groups'), got {got}."
        )
    groups = optimizer_state["param_groups"]
    trainable = order if trainable is None else trainable
    by_id = _ids_to_names(groups, order, trainable, where, [n for n in order if scored is None or n in scored])
    _check_state_keys(optimizer_state["state"], by_id, where)
    named = _names_saved(groups)
    states: dict[str, AdamParam] = {}
    for pid, (name, g) in by_id.items():
        group = _group_of(groups, g, where)
        entry = optimizer_state["state"].get(pid, {})
        if entry and not {"exp_avg", "exp_avg_sq", "step"} <= set(entry):
            raise ValueError(
                f"`optimizer_state` of {where}: the state of parameter {pid} ({name!r}) has keys {sorted(entry)}, "
                f"not Adam's 'exp_avg', 'exp_avg_sq' and 'step'; only Adam and AdamW states are supported."
            )
        shape = tuple(shapes[name])
        coded = [k for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in entry and not _moment(entry[k])]
        if coded:  # (8-bit codes read as moments: 98% off, silently; a review helper's)
            held = entry[coded[0]]
            what = held.dtype if isinstance(held, torch.Tensor) else type(held).__name__
            raise ValueError(
                f"`optimizer_state` of {where}: the saved {coded[0]} of parameter {pid} ({name!r}) is a {what}, not "
                f"Adam's floating moments (a quantized optimizer's state: bitsandbytes', torchao's 8-bit Adam); only "
                f"torch.optim.Adam and AdamW states are supported. Drop `optimizer_state` to score with plain "
                f"gradients."
            )
        entry = {k: _as_real(v, shape) for k, v in entry.items()}
        if entry:
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in entry and tuple(entry[key].shape) != shape:
                    raise ValueError(
                        f"`optimizer_state` of {where}: {key} of parameter {pid} has shape {tuple(entry[key].shape)}, "
                        f"but it was matched to {name!r} of shape {shape}. The ids do not follow "
                        f"`model.named_parameters()`: build the optimizer from `model.named_parameters()` (torch "
                        f">= 2.6 then saves the names)."
                    )
        zeros = torch.zeros(shape)
        amsgrad = bool(group["amsgrad"])
        v = entry.get("max_exp_avg_sq" if amsgrad else "exp_avg_sq", zeros)
        if float(group["eps"]) == 0.0 and (scored is None or name in scored) and bool((v == 0).any()):
            raise ValueError(
                f"`optimizer_state` of {where}: param_groups[{g}] has eps=0 and the second moment of {name!r} is "
                f"zero at {int((v == 0).sum())} of its entries (never reached by a gradient), where an example whose "
                f"gradient is zero there would get the update 0 / 0 (NaN). Score with an eps > 0 in the saved group "
                f"(`param_groups[{g}]['eps']`), or without `optimizer_state`."
            )
        b1, b2 = (float(b) for b in group["betas"])
        decay = 0.0 if group.get("decoupled_weight_decay", False) else float(group.get("weight_decay", 0))
        states[name] = AdamParam(
            entry.get("exp_avg", zeros),
            entry.get("exp_avg_sq", zeros),
            entry.get("max_exp_avg_sq", zeros) if amsgrad else None,
            torch.as_tensor(entry.get("step", 0.0)).detach().reshape(()),
            b1,
            b2,
            float(group["eps"]),
            decay,
            g,
            float(group["lr"]) if "lr" in group else None,
            named,
        )
        if scored is None or name in scored:
            _check_moments(states[name], pid, name, where)
    return states


def _moment(value: Any) -> bool:
    """Whether a saved moment is a floating (or complex) tensor, as torch's Adam keeps them."""
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def _as_real(moment: Any, shape: tuple[int, ...]) -> Any:
    """A complex parameter's moment for its real view ``[..., 2]`` (held real, as the refusal of complex parameters
    asks): torch's Adam steps a complex parameter as ``torch.view_as_real`` of it, its gradient and its moments, so
    this view is what it stepped (the moments were refused as of another shape, blamed on the parameters' ids)."""
    if isinstance(moment, torch.Tensor) and moment.is_complex() and tuple(moment.shape) + (2,) == shape:
        return torch.view_as_real(moment)
    return moment


def _check_state_keys(state: Mapping[Any, Any], by_id: Mapping[Any, Any], where: str) -> None:
    """Refuse state entries under ids that no param group lists: their parameters' moments would be taken as never
    stepped (zeros), and those entries dropped (165% off, silently, for a state whose ids became strings)."""
    stray = [k for k in state if k not in by_id]
    if stray:
        as_text = all(isinstance(k, str) for k in stray)
        strings = " (ids turned into strings, as a JSON round trip does)" if as_text else ""
        raise ValueError(
            f"`optimizer_state` of {where} holds state under ids {stray[:5]} that no param group lists (the groups "
            f"list {[*by_id][:5]}){strings}: their moments cannot be matched to a parameter. Save the optimizer's "
            f"`state_dict()` unedited (`torch.save`), or key `state` by the groups' ids."
        )


def _check_moments(state: AdamParam, pid: Any, name: str, where: str) -> None:
    """Refuse saved moments no Adam run leaves (non-finite, a negative second moment or step): every update they
    give is NaN or meaningless, which was blamed on the examples' gradients."""
    moments = {"exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq, "max_exp_avg_sq": state.max_exp_avg_sq}
    bad = [
        key
        for key, t in moments.items()
        if t is not None and not bool(torch.isfinite(t).all() and (key == "exp_avg" or (t >= 0).all()))
    ]
    if not bool(torch.isfinite(state.step) and state.step >= 0):
        bad.append(f"step ({float(state.step):g})")
    if bad:
        raise ValueError(
            f"`optimizer_state` of {where}: the saved {', '.join(bad)} of parameter {pid} ({name!r}) is not what an "
            f"Adam run leaves (non-finite values, or a negative second moment or step), so its updates are undefined. "
            f"Save the state of the optimizer that trained the model, unedited, or score without `optimizer_state`."
        )


def on_device(states: Mapping[str, AdamParam], device: torch.device, dtype: torch.dtype) -> dict[str, AdamParam]:
    """The states with every tensor on ``device`` in ``dtype``, the step in float64: the bias corrections
    ``1 - b ** (t + 1)`` are computed there, as torch's Adam does in Python floats (in float32, ``b2 ** t`` rounded
    and divided by ``1 - b2 ** t`` put the scores 7e-6 to 8e-5 off, 100 to 1000 times float32's rounding)."""

    def move(t: torch.Tensor | None, to: torch.dtype = dtype) -> torch.Tensor | None:  # (a complex parameter's,
        # never scored, kept complex: cast, torch warned of the imaginary part it dropped)
        return None if t is None else t.detach().to(device=device, dtype=None if t.is_complex() else to)

    return {
        n: s._replace(exp_avg=move(s.exp_avg), exp_avg_sq=move(s.exp_avg_sq), max_exp_avg_sq=move(s.max_exp_avg_sq),
                      step=move(s.step, torch.float64))
        for n, s in states.items()
    }


def adam_update(grad: torch.Tensor, state: AdamParam, param: torch.Tensor) -> torch.Tensor:
    """``[B, *shape]``: each example's Adam step direction ``u`` from its gradient ``grad`` ``[B, *shape]`` at the
    parameter value ``param`` (used by Adam's coupled weight decay only)."""
    if state.weight_decay:
        grad = grad + state.weight_decay * param
    t = state.step + 1  # (float64: ``on_device``)
    correction1, correction2 = ((1 - beta**t).to(grad.dtype) for beta in (state.beta1, state.beta2))
    # [B, *shape] temporaries updated in place: the transform is memory-bound (a few passes over B x P floats)
    v = grad.square().mul_(1 - state.beta2).add_(state.beta2 * state.exp_avg_sq)
    if state.max_exp_avg_sq is not None:
        v = torch.maximum(v, state.max_exp_avg_sq, out=v)
    denominator = v.div_(correction2).sqrt_().add_(state.eps)
    m = grad.mul(1 - state.beta1).add_(state.beta1 * state.exp_avg)
    return m.div_(correction1).div_(denominator)


def dense(rep: Representation) -> Representation:
    """The same gradients as one dense part (factored parts materialised), parameters in ``rep.names`` order."""
    grads = {n: g for part in rep.parts for n, g in part.materialize().items()}
    return Representation((Dense({n: grads[n] for n in rep.names}),), rep.names)


def adam_representation(
    rep: Representation, states: Mapping[str, AdamParam], diff: Mapping[str, torch.Tensor]
) -> tuple[Representation, Representation]:
    """``(gradients, updates)`` of a training batch, both dense: every part is materialised (the update is
    elementwise nonlinear in the gradient, so it has no factored form) and transformed parameter by parameter."""
    grads = dense(rep).parts[0].materialize()
    missing = [n for n in rep.names if n not in states]
    if missing:
        raise ValueError(
            f"An `optimizer_state` holds no entry for the differentiated parameters {missing[:10]}: its optimizer did "
            f"not hold them (frozen then, or added later with `add_param_group`), so Adam's update for them is "
            f"unknown. Leave them out (`params=` the parameters every checkpoint's optimizer held), or score without "
            f"the checkpoints whose optimizer lacks them."
        )
    updates = {n: adam_update(grads[n], states[n], diff[n]) for n in rep.names}
    return Representation((Dense(grads),), rep.names), Representation((Dense(updates),), rep.names)


def row_dots(a: Representation, b: Representation) -> dict[str, torch.Tensor]:
    """``{name: [B]}`` per-example inner products of two dense representations of the same examples."""
    ga, gb = a.parts[0].materialize(), b.parts[0].materialize()
    return {n: (_rows(ga[n]) * _rows(gb[n])).sum(1) for n in a.names}


def with_adam_states(
    model: Any,
    checkpoints: Sequence[Any],
    prepared: Sequence[Any],
    shapes: Mapping[str, tuple[int, ...]],
    device: torch.device,
    dtype: torch.dtype,
    scored: Collection[str] | None = None,
) -> list[Any]:
    """``prepared`` (``CheckpointState`` list) with each checkpoint's Adam state attached, on ``device`` in
    ``dtype``; unchanged when no checkpoint carries an optimizer state. Either every checkpoint carries one or none."""
    carrying = [c.optimizer_state is not None for c in checkpoints]
    if not any(carrying):
        return list(prepared)
    if not all(carrying):
        without, with_ = carrying.index(False), carrying.index(True)
        raise ValueError(
            f"`checkpoints[{with_}]` carries an `optimizer_state` but `checkpoints[{without}]` does not: Adam-aware "
            f"and plain TracIn terms would be mixed in one score. Give every checkpoint its optimizer state (an empty "
            f"optimizer's `state_dict()` before the first step), or none; where the run changed optimizers (Adam, "
            f"then SGD: `tc.load_checkpoints` keeps Adam's states, leaves out others'), score each part in a call of "
            f"its own and add the scores."
        )
    if isinstance(model, torch.nn.Module):
        named = list(model.named_parameters())
        order = [n for n, _ in named]
        trainable = [n for n, p in named if p.requires_grad]
    else:
        order = trainable = [n for n, t in checkpoints[0].params.items() if t.is_floating_point()]
    states = [
        adam_states(c.optimizer_state, order, shapes, f"checkpoints[{i}]", trainable, scored)
        for i, c in enumerate(checkpoints)
    ]
    warn_aliased_moments(checkpoints, states, order if scored is None else scored)
    return [ready._replace(adam=on_device(s, device, dtype)) for ready, s in zip(prepared, states)]
