"""``method="last_layer"``: which parameters are the model's last layer, found by running the loss of one example."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._capture import Hook, hooked
from ._data import slice_batch
from ._grads import Tensors
from ._loss import ExampleLossFn
from ._state import leaving_no_trace


def linear_candidates(module: nn.Module, trainable: Sequence[str], aliases: Mapping[str, str]) -> tuple[str, ...]:
    """The trainable parameters (``trainable``, tied ones under their first name) that some ``nn.Linear`` holds: the
    ones ``method='last_layer'`` may score, whose checkpoints' entries are checked as differentiated (a trainable
    complex parameter elsewhere was refused as one); all of ``trainable`` where no Linear holds one (refused at
    planning, naming what it found)."""
    owned = {f"{path}.{name}".lstrip(".") for path, m in module.named_modules() if isinstance(m, nn.Linear)
             for name, _ in m.named_parameters()}  # fmt: skip
    owned |= {aliases[n] for n in owned if n in aliases}
    return tuple(n for n in trainable if n in owned) or tuple(trainable)


def last_layer_params(
    module: nn.Module,
    loss: ExampleLossFn,
    state: Tensors,
    batch: Any,
    aliases: Mapping[str, str],
    trainable: Collection[str],
) -> list[str]:
    """The trainable parameters (``trainable``) of the last ``nn.Linear`` used in the loss of the first example of
    ``batch`` whose output the loss reaches (a probe's output, discarded or detached, gets no gradient: its layer's
    are zero). A Linear is used where it is called, and one never called where a torch function reads its tensors
    (``nn.MultiheadAttention`` reads its ``out_proj``'s without calling it: an attention-pooled head was passed over
    for the layer before it, 61-104% off).

    A tied weight (``aliases``: e.g. GPT-2's ``lm_head.weight``, the token embedding's) is refused: its gradient
    includes the other uses of the shared tensor, so "the last layer's" gradient is not defined by that layer; and
    so is a last layer with no trainable parameter (its frozen parameters were scored, as ``method="exact"`` never
    does: 30% off).
    """
    linears = {path: m for path, m in module.named_modules() if isinstance(m, nn.Linear)}
    used: list[tuple[str, torch.Tensor]] = []  # (a Linear's path, an output of its use), in the order of use
    read: set[int] = set()  # positions in ``used`` of reads outside a call (``_Reads``)

    def hook_for(path: str) -> Hook:
        def hook(layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            used.append((path, output))

        return hook

    owned = {f"{path}.{name}".lstrip("."): path for path, m in linears.items() for name, _ in m.named_parameters()}
    owned |= {aliases.get(name, name): path for name, path in owned.items()}  # (a tied tensor: under its first name)
    state = {k: t.detach().requires_grad_() if k in owned and t.is_floating_point() else t for k, t in state.items()}
    owners = {id(state[k]): path for k, path in owned.items() if k in state}
    with (
        torch.enable_grad(),
        leaving_no_trace(module),
        hooked(module, {path: hook_for(path) for path in linears}),
        _Reads(owners, used, read),
    ):
        total = loss(state, slice_batch(batch, 0, 1))
    # a Linear called is used where it is called: its tensors read otherwise (a penalty on them in the loss, the
    # forward adding one to its output) are no use of the layer (one after the head was taken for it: 63% off)
    called = {path for i, (path, _) in enumerate(used) if i not in read}
    used = [(path, out) for i, (path, out) in enumerate(used) if i not in read or path not in called]
    live = [(path, out) for path, out in used if isinstance(out, torch.Tensor) and out.requires_grad]
    reached = torch.autograd.grad(total, [out for _, out in live], allow_unused=True) if total.requires_grad else ()
    order = [path for (path, _), g in zip(live, reached) if g is not None]
    if not order:
        found = "used by the model" if not used else "whose output the loss reaches"
        raise ValueError(f"`method='last_layer'` found no nn.Linear {found}; select `layers=` instead.")
    last = order[-1]
    prefix = f"{last}." if last else ""
    names = [prefix + name for name, _ in linears[last].named_parameters()]  # a parametrized weight's tensors
    layer = linears[last]  # (registered under two names: one layer, its tensors tied to nothing else)
    scored = [n for n in names if aliases.get(n, n) in trainable]  # (a tied tensor: trainable under its first name)
    if not scored:
        raise ValueError(
            f"`method='last_layer'`: the last nn.Linear {last!r} has no trainable parameter ({names} are frozen: "
            f"`requires_grad=False`), so training never moved it. Select the layers you trained with `layers=[...]` "
            f"and the default `method='exact'`."
        )
    # (a second name held by no module is a state-dict hook's for the tensor, no tie)
    aliases = {a: f for a, f in aliases.items()
               if _owner(module, a) is not None and not all(_owner(module, n) is layer for n in (a, f))}  # fmt: skip
    tied = [n for n in scored if n in aliases or n in aliases.values()]  # (its tensor's second name, or first)
    if tied:
        first = aliases.get(tied[0], tied[0])
        owner = next(n for n in [first, *aliases] if n != tied[0] and aliases.get(n, n) == first)
        raise ValueError(
            f"`method='last_layer'`: the last nn.Linear {last!r} shares its weight {tied[0]!r} with {owner!r} "
            f"(weight tying), whose gradient sums every use of the shared tensor. Score that tensor exactly with "
            f"`params=[{first!r}]` (or add the layer's other parameters) and the default `method='exact'`."
        )
    return scored


def _owner(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name.rpartition(".")[0])
    except AttributeError:  # (a name a state-dict hook saves the tensor under)
        return None


class _Reads(TorchFunctionMode):
    """Records each torch function reading a Linear's tensor (``owners``: by id, the Linear's path) with its first
    output that carries a gradient, into ``used``, and their positions there into ``read``."""

    def __init__(self, owners: Mapping[int, str], used: list[tuple[str, torch.Tensor]], read: set[int]) -> None:
        super().__init__()
        self.owners, self.used, self.read = owners, used, read

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        read = [self.owners[id(t)] for t in optree.tree_leaves((args, kwargs)) if id(t) in self.owners]
        outs = [t for t in optree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if read and outs:
            for path in dict.fromkeys(read):
                self.read.add(len(self.used))
                self.used.append((path, outs[0]))
        return out
