"""Checkpoints: a parameter dict and the learning rate that weights it, and loading them from files."""

from __future__ import annotations

import json
import math
import numbers
import os
import pickle
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import optree
import torch
from safetensors.torch import load_file

from ._warn import warn

NAMESPACE = "tracin_func"

PathLike = Union[str, "os.PathLike[str]"]
LR_KEYS = ("learning_rate", "lr")
STATE_KEYS = ("model_state_dict", "state_dict", "model")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict")
DATA_PARALLEL_PREFIX = "module."
WRAPPER_PREFIXES = (DATA_PARALLEL_PREFIX, "_orig_mod.")  # DataParallel / DDP's, torch.compile's


@dataclass(frozen=True)
class Checkpoint:
    """Model state at one point of training and the learning rate that weights its scores.

    A pytree (optree namespace ``"tracin_func"``) whose leaves are the tensors of ``params`` and ``lr``.

    Attributes:
        params: ``{name: tensor}``, the model's state dict (parameters and buffers) at this checkpoint.
        lr: learning rate used after this checkpoint, a positive finite number or 0-d tensor.
        optimizer_state: ``None`` (plain TracIn), or the ``state_dict()`` of the ``torch.optim.Adam`` / ``AdamW``
            that trained the model, saved with the parameters: training examples are then scored by the update
            Adam would take for each of them alone, test examples by their gradients (Adam-aware TracIn, see the
            README's "Adam-aware TracIn"). Its parameter ids are matched to names when scoring.

    Kept in memory during training, a checkpoint needs copies: ``model.state_dict()`` and ``opt.state_dict()`` hold
    references to the live tensors, which later steps change in place (every checkpoint would be the final model).
    Scorers warn when two checkpoints hold the very same tensor for a differentiated parameter or its Adam moments;
    one checkpoint object given twice is not warned about (it counts twice, as asked). A tensor ``lr`` is copied (an
    optimizer's, ``torch.optim.SGD(lr=torch.tensor(...))``, is changed in place by its scheduler).

    Example:
        >>> import copy, torch, tracin_func as tc
        >>> ckpt = tc.Checkpoint(params={"weight": torch.zeros(2, 3)}, lr=0.1)
        >>> ckpt.lr
        0.1
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> params = {k: v.detach().clone() for k, v in model.state_dict().items()}  # copies: training goes on
        >>> ckpt = tc.Checkpoint(params, lr=1e-3, optimizer_state=copy.deepcopy(opt.state_dict()))
    """

    params: Mapping[str, torch.Tensor]
    lr: float | torch.Tensor = 1.0
    optimizer_state: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lr, torch.Tensor):  # copied: a scheduler changes an optimizer's tensor lr in place (every
            object.__setattr__(self, "lr", self.lr.clone())  # checkpoint then scored at the last rate, 99.7% off)


def _flatten(ckpt: Checkpoint):
    keys = tuple(ckpt.params)
    children = (*(ckpt.params[k] for k in keys), ckpt.lr, ckpt.optimizer_state)
    return children, keys, (*keys, "lr", "optimizer_state")


def _unflatten(keys: tuple[str, ...], leaves: Iterable[Any]) -> Checkpoint:
    *values, lr, optimizer_state = leaves
    return Checkpoint(params=dict(zip(keys, values)), lr=lr, optimizer_state=optimizer_state)


optree.register_pytree_node(Checkpoint, _flatten, _unflatten, namespace=NAMESPACE)


def check_lr(lr: Any, where: str) -> None:
    """Raise unless ``lr`` is a positive finite number (a Python number or a 0-d tensor)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"`lr` of {where} must be a number or a 0-d tensor, got a tensor of shape {tuple(lr.shape)}."
            )
        if lr.device.type == "meta":
            raise ValueError(f"`lr` of {where} is a tensor on the 'meta' device, which holds no value; pass a number.")
        value = float(lr.detach().reshape(()).cpu())
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):  # (numpy's float32 too)
        value = float(lr)
    else:
        raise TypeError(f"`lr` of {where} must be a positive number, got {lr!r} of type {type(lr).__name__}.")
    if not (math.isfinite(value) and value > 0):
        zero = (
            " A checkpoint at a learning rate of 0 (a warm-up's first step, a schedule's end) adds nothing to any "
            "score: leave it out."
            if value == 0
            else ""
        )
        raise ValueError(
            f"`lr` of {where} must be positive and finite, got {value}. Pass the learning rate used after it.{zero}"
        )


def _natural_key(path: str) -> tuple[list[Any], str]:
    """``ckpt-2`` before ``ckpt-10``; names of equal numbers (``ckpt-1``, ``ckpt-01``) by their text, not by the order
    the file system lists them."""
    name = os.path.basename(path)  # (odd parts: the runs of digits; ``isdigit`` also takes '²', which int refuses)
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))], name


def _list_directory(directory: str) -> list[str]:
    model = _model_file(directory)
    if model is not None and os.path.isfile(os.path.join(directory, "config.json")):  # (read file by file: config.json)
        raise ValueError(
            f"`source` {directory!r} is one model's folder (`save_pretrained`'s, a Trainer's checkpoint: "
            f"{os.path.basename(model)!r}); pass checkpoints as a list, `tc.load_checkpoints([{directory!r}, ...], "
            f"lr=...)` (a folder: its model's weights), or a directory of checkpoint files."
        )
    files = checkpoint_files(directory)
    if not files:
        raise ValueError(f"`source` directory {directory!r} contains no checkpoint files{_in_folders(directory)}.")
    held = _model_folders(directory)
    if held:  # (read file by file, a Trainer's `checkpoint-N` folders beside a final file were left out, silently)
        names = [os.path.basename(f) for f in held]
        raise ValueError(
            f"`source` directory {directory!r} holds checkpoint files ({[os.path.basename(f) for f in files][:3]}) "
            f"and model folders ({names[:3]}{' ...' if len(names) > 3 else ''}), whose files a directory's reading "
            f"leaves out. Pass the checkpoints to score as a list, in training order (a folder: its model's "
            f"weights), `tc.load_checkpoints([...], lr=...)`."
        )
    return files


_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")  # a Hugging Face Trainer's ``checkpoint-N`` folders'
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # theirs, saved in shards
# torch's ``AveragedModel`` (EMA, SWA): its count of the models averaged, beside their average's entries under
# ``module.``
AVERAGED_COUNT = "n_averaged"


def _model_file(folder: str) -> str | None:
    """The file of a model folder's weights (``model.safetensors``), or the index of their shards, else None."""
    return next((p for name in _MODEL_FILES + _INDEXES if os.path.isfile(p := os.path.join(folder, name))), None)


def _merged_shards(index: str, *, map_location: Any, weights_only: bool) -> dict[str, Any]:
    """The tensors of a model saved in shards (``save_pretrained``'s ``max_shard_size``), merged into one state: its
    index's ``weight_map`` names each tensor's shard file (each shard read alone was a checkpoint of its own, half
    of the model's entries, and the rest taken from the model with `strict=False`)."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index!r} is not the index of a model's shards (its `weight_map`): {err}.") from err
    folder, merged = os.path.dirname(index), {}
    for shard in shards:
        merged.update(_read_file(os.path.join(folder, shard), map_location=map_location, weights_only=weights_only))
    missing = [name for name in weight_map if name not in merged]
    if missing:
        raise ValueError(f"{index!r} lists tensors its shards do not hold: {missing[:5]}; save the model again.")
    return merged


def _folders(directory: str) -> list[str]:
    """``directory``'s non-hidden folders, in natural order."""
    folders = [e.path for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")]
    return sorted(folders, key=_natural_key)


def _model_folders(directory: str) -> list[str]:
    """``directory``'s folders holding a model's weights (a Trainer's ``checkpoint-N``), in natural order."""
    return [f for f in _folders(directory) if _model_file(f) is not None]


def _in_folders(directory: str) -> str:
    """How to load the checkpoints of ``directory``'s folders, where it has some (a Trainer's ``checkpoint-N``)."""
    folders = _folders(directory)
    if not folders:
        return ""
    if any(_model_file(f) is None for f in folders):
        names = [os.path.basename(f) for f in folders]
        return f", only folders ({names[:5]}{' ...' if len(names) > 5 else ''}): pass the files in them, in order"
    return (f": its folders hold models; pass them in training order, `tc.load_checkpoints({folders[:2]}"
            f"{' + [...]' if len(folders) > 2 else ''}, lr=...)` (a folder: its model's weights)")  # fmt: skip


def _read_file(path: str, *, map_location: Any, weights_only: bool) -> Mapping[str, Any]:
    """A checkpoint file's contents; a folder's model (a Trainer's ``checkpoint-N``, a ``save_pretrained`` folder:
    ``_model_file``), its shards merged where it is saved in several (``_merged_shards``)."""
    if os.path.isdir(path):
        found = _model_file(path)
        if found is None:
            raise FileNotFoundError(
                f"Checkpoint {path!r} is a folder without a model's weights ({', '.join(_MODEL_FILES + _INDEXES)}); "
                f"pass its checkpoint file."
            )
        path = found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file {path!r} does not exist (or is not a file); check the path.")
    if str(path).endswith(_INDEXES):
        return _merged_shards(path, map_location=map_location, weights_only=weights_only)
    if str(path).endswith(".safetensors"):
        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        try:
            return load_file(path, device=str(device))
        except Exception as err:  # safetensors raises its own error type for a corrupt header
            raise _unreadable(path, err, map_location) from err
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # weights_only refused code in a valid file: keep torch's message
            raise pickle.UnpicklingError(f"Checkpoint file {path!r}: {err}") from err
        raise _unreadable(path, err, map_location) from err
    except Exception as err:  # a corrupt pickle fails with any error type
        raise _unreadable(path, err, map_location) from err
    if isinstance(obj, torch.jit.ScriptModule):
        raise TypeError(_SCRIPTED.format(path=path))
    if not isinstance(obj, Mapping):
        raise TypeError(f"Checkpoint file {path!r} holds a {type(obj).__name__}, expected a state dict (a mapping).")
    return obj


_SCRIPTED = (  # (torch's advice, `weights_only=False`, then met a refusal of the module: a review helper's)
    "Checkpoint file {path!r} is a TorchScript archive (`torch.jit.save`), not a state dict: from a trusted source, "
    "give its tensors as `tc.Checkpoint(params=torch.jit.load(path).state_dict(), lr=...)`."
)


_NOT_CHECKPOINTS = (".json", ".txt", ".md", ".yaml", ".yml", ".csv", ".log")  # (a model folder's other files)


def _unreadable(path: str, err: BaseException, map_location: Any) -> ValueError:
    if str(path).lower().endswith(_NOT_CHECKPOINTS):  # (torch's message suggested `weights_only=False`)
        return ValueError(
            f"{path!r} is not a checkpoint (a configuration, a log?); pass the checkpoint files as a list of paths (a "
            f"directory's every non-hidden file is read as a checkpoint: a Hugging Face `save_pretrained` folder "
            f"holds `config.json` too)."
        )
    cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "TorchScript archives" in cause:
        return ValueError(_SCRIPTED.format(path=path))
    if isinstance(err, RuntimeError) and ("CUDA" in cause or "device" in cause):  # (a valid file, no such device)
        return ValueError(
            f"Checkpoint file {path!r} could not be loaded onto `map_location`={map_location!r} ({cause}); pass a "
            f"device this machine has, e.g. `map_location='cpu'`."
        )
    return ValueError(
        f"Checkpoint file {path!r} could not be read ({type(err).__name__}: {cause}): it is empty, truncated or not "
        f"a checkpoint. Re-save it with `torch.save(state_dict, path)`, or remove it from the directory / list of "
        f"paths (a directory's every non-hidden file is read as a checkpoint)."
    )


def split_state_and_lr(obj: Mapping[str, Any], where: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a loaded checkpoint into its state dict and its stored learning rate (``None`` if absent).

    Accepts a flat state dict, a flat state dict with a ``learning_rate`` (or ``lr``) entry, or a dict holding
    ``model_state_dict`` / ``state_dict`` next to ``learning_rate`` (Captum's tutorial format). A ``module.``
    prefix (DataParallel / DDP) is stripped from every key.
    """
    nested = next((k for k in STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
    # A non-scalar tensor under an lr key is a parameter of that name (``self.lr = nn.Parameter(...)``).
    lr_keys = [k for k in LR_KEYS if k in obj and not (isinstance(obj[k], torch.Tensor) and obj[k].numel() != 1)]
    lr = obj[lr_keys[0]] if lr_keys else None
    state = obj[nested] if nested is not None else {k: v for k, v in obj.items() if k not in lr_keys}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        optimizer = (  # (an `optimizer.pt` beside a Trainer's weights)
            " It is an optimizer's `state_dict()`: pass the model's weights as the checkpoint and this as its "
            "`optimizer_state` (`tc.Checkpoint(params, lr, optimizer_state=torch.load(path))`)."
            if {"state", "param_groups"} <= set(bad) else ""
        )  # fmt: skip
        raise TypeError(
            f"Checkpoint {where} has non-tensor entries {bad[:5]}; expected a state dict, optionally with a "
            f"`learning_rate` entry or nested under `model_state_dict`.{optimizer}"
        )
    if AVERAGED_COUNT in state and all(n.startswith(DATA_PARALLEL_PREFIX) for n in state if n != AVERAGED_COUNT):
        state = {n: t for n, t in state.items() if n != AVERAGED_COUNT}
    stripped = unprefixed(list(state))
    return dict(zip(stripped, state.values())) if stripped is not None else dict(state), lr


def unprefixed(names: Sequence[str]) -> list[str] | None:
    """``names`` without the prefixes wrappers add where every one carries them (DataParallel / DDP's ``module.``,
    ``torch.compile``'s ``_orig_mod.``, nested in either order), and without ``_orig_mod.`` inside a name (a compiled
    submodule's, ``self.model = torch.compile(net)``: a module of that name is torch's, which scoring refuses), else
    None."""
    cut = sum(map(len, leading_wrappers(names)))
    stripped = [n[cut:].replace(COMPILED_INSIDE, ".") for n in names]
    return stripped if stripped != list(names) else None


def leading_wrappers(names: Sequence[str]) -> list[str]:
    """The wrappers' prefixes every one of ``names`` starts with, outermost first."""
    leading, names = [], list(names)
    while names and (prefix := next((p for p in WRAPPER_PREFIXES if all(n.startswith(p) for n in names)), None)):
        leading.append(prefix)
        names = [n[len(prefix) :] for n in names]
    return leading


COMPILED_INSIDE = "._orig_mod."


def wrapper_prefix(names: Collection[str], expected: Collection[str]) -> str | None:
    """The wrapper's prefix (``WRAPPER_PREFIXES``) that every one of the model's names ``expected`` carries and
    that makes each of ``names`` one of them (a model whose only child is named ``module``, whose files
    ``tc.load_checkpoints`` strips of it), or None."""
    for prefix in WRAPPER_PREFIXES:
        if all(n.startswith(prefix) for n in expected) and all(prefix + n in expected for n in names):
            return prefix
    return None


def leading_prefixes(name: str) -> list[str]:
    """The first one to three dotted components of a parameter's module path: ``"a.", "a.b.", "a.b.c."``, the
    prefixes a name may carry or lack between a model and its checkpoint (a LightningModule's ``model.``)."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:k]) + "." for k in range(1, min(len(parts), 3) + 1)]


def _named_as_state(optimizer: Mapping[str, Any] | None, state: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``optimizer`` with the wrappers' prefixes stripped from its groups' ``param_names`` where the state dict names
    the parameters without them (an optimizer built from a DataParallel / DDP wrapper's or a compiled module's
    ``named_parameters()``; the state dict's prefixes are stripped too): scoring matches the names to the model's.
    A copy; else ``optimizer``."""
    groups = optimizer.get("param_groups") if optimizer is not None else None
    named = isinstance(groups, Sequence) and all(isinstance(g, Mapping) and "param_names" in g for g in groups)
    if not (named and groups):
        return optimizer
    names = [n for g in groups for n in g["param_names"]]
    stripped = unprefixed(names) if all(isinstance(n, str) for n in names) else None
    if stripped is None or not set(stripped) <= set(state) or set(names) <= set(state):
        return optimizer
    rest = iter(stripped)
    return {**optimizer, "param_groups": [{**g, "param_names": [next(rest) for _ in g["param_names"]]} for g in groups]}


def load_checkpoints(
    source: PathLike | Sequence[PathLike] | Iterable[PathLike],
    *,
    lr: float | Sequence[float] | None = None,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> list[Checkpoint]:
    """Load checkpoints from files into memory.

    Args:
        source: a directory (every non-hidden file in it, in natural order: ``ckpt-2`` before ``ckpt-10``; one
            holding model folders beside its files is refused), a list of paths (kept in the given order), or an
            iterator of paths. The iterator is consumed once and its
            checkpoints are materialised in memory: scoring visits every checkpoint once per training block.
        lr: learning rate for all checkpoints, or one per checkpoint. Overrides the one stored in a file. When
            ``None``, each file must store one (``learning_rate`` or ``lr``, or its optimizer's). A checkpoint's is
            the rate of the steps taken after it: a file's optimizer holds the rate it had when saved, the next
            steps' where the loop saves after ``scheduler.step()``.
        map_location: passed to ``torch.load``; the default loads onto the CPU.
        weights_only: passed to ``torch.load``. Keep ``True`` unless you trust the files: unpickling can run
            arbitrary code.

    Supported files: a ``torch.save``d state dict; a dict with ``model_state_dict`` / ``state_dict`` / ``model``
    and ``learning_rate`` (Captum tutorial format); a flat state dict with a ``learning_rate`` entry;
    ``.safetensors`` (no learning rate inside, pass ``lr=``); a model's folder in a list (a Hugging Face Trainer's
    ``checkpoint-N``, a ``save_pretrained`` folder: its ``model.safetensors`` or ``pytorch_model.bin``, or the
    shards its ``*.index.json`` lists, merged; its ``optimizer.pt`` is not read: pass it as ``optimizer_state=`` of
    a :class:`Checkpoint` for Adam-aware scores); torch's ``AveragedModel`` (EMA, SWA) state. Two files holding the
    same tensors (a ``latest`` link, Lightning's ``last.ckpt``) are refused: that state would count twice. A
    ``module.`` prefix (DataParallel / DDP) and an ``_orig_mod.`` one (``torch.compile``; inside a name too: a
    compiled submodule's) are stripped, from the optimizer's ``param_names`` too. Other entries (``epoch``,
    ``loss``, ...) next to a nested state dict are ignored.

    An ``optimizer`` / ``optimizer_state_dict`` entry holding a torch optimizer's ``state_dict()`` (the usual
    ``{"model": model.state_dict(), "optimizer": optimizer.state_dict()}`` layout; PyTorch Lightning's one
    ``optimizer_states`` entry too) becomes the checkpoint's
    ``optimizer_state`` when it is Adam's or AdamW's (Adam-aware TracIn; its parameter ids are matched to the model's
    names when scoring, where the model says which entries are parameters); another optimizer's (SGD's, as Captum's
    tutorial saves it) is left out: plain gradients. A file without a learning rate then takes the optimizer's,
    when all its param groups share one (param groups of different lrs are refused, with the fix: a call per group).

    Returns:
        ``list[Checkpoint]`` in the order described above.

    Example:
        >>> import os, tempfile, torch, tracin_func as tc
        >>> d = tempfile.mkdtemp()
        >>> for epoch in (2, 10):
        ...     state = {"weight": torch.full((1, 2), float(epoch))}
        ...     torch.save({"model_state_dict": state, "learning_rate": 0.1}, os.path.join(d, f"ckpt-{epoch}.pt"))
        >>> [c.params["weight"][0, 0].item() for c in tc.load_checkpoints(d)]
        [2.0, 10.0]
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.01)
        >>> torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, os.path.join(d, "adam.pt"))
        >>> (ckpt,) = tc.load_checkpoints([os.path.join(d, "adam.pt")])
        >>> ckpt.lr, sorted(ckpt.optimizer_state)
        (0.01, ['param_groups', 'state'])
    """
    if isinstance(map_location, str):  # (torch.load blames a device string it cannot parse on the file)
        try:
            torch.device(map_location)
        except RuntimeError as err:
            message = f"`map_location`={map_location!r} is not a device ({err}); pass one such as 'cpu'."
            raise ValueError(message) from None
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise FileNotFoundError(f"`source` {os.fspath(source)!r} does not exist; pass a directory or a list of "
                                    f"paths.")  # fmt: skip
        if not os.path.isdir(source):
            raise ValueError(
                f"`source` {os.fspath(source)!r} is a file, not a directory; pass a directory or a list of paths (one "
                f"file: `[path]`)."
            )
        paths: list[str] = _list_directory(os.fspath(source))
    else:
        paths = [os.fspath(p) for p in source]
    if not paths:
        raise ValueError("`source` holds no checkpoints; pass a non-empty directory or list of paths.")
    if lr is None or isinstance(lr, numbers.Real) or isinstance(lr, torch.Tensor) and lr.dim() == 0:
        lrs: list[Any] = [lr] * len(paths)
    elif isinstance(lr, (str, bytes, Mapping)) or not isinstance(lr, Iterable):
        raise TypeError(
            f"`lr` must be a number (for every checkpoint) or a sequence of one per checkpoint, got "
            f"{type(lr).__name__}."
        )
    else:
        lrs = list(lr)
        if len(lrs) != len(paths):
            raise ValueError(
                f"`lr` has {len(lrs)} entries but there are {len(paths)} checkpoints; give one per checkpoint."
            )
    checkpoints = []
    for path, given_lr in zip(paths, lrs):
        obj = dict(_read_file(path, map_location=map_location, weights_only=weights_only))
        key = next((k for k in OPTIMIZER_KEYS if isinstance(obj.get(k), Mapping)), None)
        optimizer = obj.pop(key) if key is not None else _lightning_optimizer(obj, path)
        state, stored_lr = split_state_and_lr(obj, repr(path))
        optimizer = _named_as_state(optimizer, state)
        if given_lr is None:  # (`lr=` given: the file's own, a list per group, is not read)
            stored_lr = _one_rate(stored_lr, path) if stored_lr is not None else _optimizer_lr(optimizer)
        _refuse_ascent(optimizer, path)
        # another optimizer's state (SGD's momentum, in Captum's tutorial files) is not kept: plain gradients, as
        # TracIn for SGD scores them (kept, every scorer refused it as not Adam's)
        raw_optimizer, optimizer = optimizer, optimizer if _adam_like(optimizer) else None
        ckpt_lr = given_lr if given_lr is not None else stored_lr
        groups = _group_lrs(raw_optimizer) if given_lr is None else ""
        if groups:  # (a file's own `learning_rate` beside them is one group's: it weighed every parameter, 88% off)
            stored = "" if ckpt_lr is None else f"{float(ckpt_lr):g}"
            entry = f"; the learning rate it stores, {stored}, is one group's at most" if stored else ""
            raise ValueError(
                f"Checkpoint {path!r} stores no one learning rate: its optimizer's param groups have different ones "
                f"({groups}{entry}), and a checkpoint weighs every parameter by one `lr`. Score each group in a call "
                f"of its own: load the files with that group's `lr=` (a list, each file's group lr in turn) and pass "
                f"`params=` its parameters, then sum the scores."
            )
        if ckpt_lr is None:
            raise ValueError(
                f"Checkpoint {path!r} stores no learning rate; pass `lr=` (one value or one per checkpoint) or save "
                f"it as a `learning_rate` entry."
            )
        check_lr(ckpt_lr, repr(path))
        checkpoints.append(Checkpoint(params=state, lr=ckpt_lr, optimizer_state=optimizer))
    refuse_copies(paths, checkpoints)
    return checkpoints


def _lightning_optimizer(obj: dict[str, Any], path: str) -> Mapping[str, Any] | None:
    """The one optimizer state of a PyTorch Lightning checkpoint (``optimizer_states``: a list, one per optimizer;
    left out, its Adam state scored plain TracIn and its lr was not found), taken out of ``obj``; else None. Several,
    Adam's among them, are warned of: left out, plain TracIn."""
    states = obj.get("optimizer_states")
    if isinstance(states, list) and len(states) > 1 and any(map(_adam_like, states)):
        warn(
            f"Checkpoint {path!r} holds {len(states)} optimizers' states (`optimizer_states`), Adam's among them: "
            f"Adam-aware scores read one optimizer's, so they are left out and the checkpoint scores plain TracIn. "
            f"Merge them into one state (its param groups side by side, ids renumbered) and pass it as "
            f"`tc.Checkpoint(params, lr, optimizer_state=...)` for Adam-aware scores.",
            UserWarning,
        )
    if not (isinstance(states, list) and len(states) == 1 and isinstance(states[0], Mapping)):
        return None
    del obj["optimizer_states"]
    return states[0]


def _one_rate(lr: Any, path: str) -> Any:
    """A file's stored learning rate, one value: a list of one (a scheduler's ``get_last_lr()``, refused as not a
    number) or of equal ones taken as it; one of several param groups' refused, as their optimizer's are."""
    if not isinstance(lr, (list, tuple)) or not lr or not all(isinstance(r, numbers.Real) for r in lr):
        return lr
    if len(set(map(float, lr))) > 1:
        raise ValueError(
            f"Checkpoint {path!r} stores one learning rate per param group ({list(lr)}), and a checkpoint weighs every "
            f"parameter by one `lr`. Score each group in a call of its own: load the files with that group's `lr=` "
            f"(a list, each file's group lr in turn) and pass `params=` its parameters, then sum the scores."
        )
    return lr[0]


def _refuse_ascent(optimizer: Mapping[str, Any] | None, path: str) -> None:
    """Refuse an optimizer's state stepping by gradient ascent (``maximize=True``): TracIn scores loss descent (an
    SGD's, whose state is left out, was scored as descent, its signs flipped, silently)."""
    groups = optimizer.get("param_groups") if optimizer is not None else None
    if isinstance(groups, Sequence) and any(isinstance(g, Mapping) and g.get("maximize", False) for g in groups):
        raise ValueError(
            f"Checkpoint {path!r}: its optimizer has maximize=True (gradient ascent), and TracIn scores loss descent. "
            f"Score a model trained to minimise its loss (its loss negated, where it was maximised)."
        )


def refuse_copies(paths: Sequence[str], checkpoints: Sequence[Checkpoint], argument: str = "source") -> None:
    """Refuse two files holding the same tensors (a link to another, Lightning's ``last.ckpt``): each would count
    in the sum, that state twice (a ``latest`` link in a directory: 12.5% off, silently)."""
    copied = first_copy(checkpoints)
    if copied is not None:
        i, j = copied
        raise ValueError(
            f"`{argument}`: {paths[j]!r} holds the same tensors as {paths[i]!r} (a copy of it or a link to it, "
            f"like a `latest` link or Lightning's `last.ckpt`): scored twice, that state would count double. Pass "
            f"the list of files to score, without the copy."
        )


def first_copy(checkpoints: Sequence[Checkpoint]) -> tuple[int, int] | None:
    """``(i, j)``: the first two checkpoints holding equal tensors under every name, else None. Compared by a few
    entries of each tensor first, then whole."""
    named = [sorted(c.params.items()) for c in checkpoints]
    if any(t.is_meta for items in named for _, t in items):  # (`map_location="meta"`: no values)
        return None
    tensors = [[t for _, t in items] for items in named]
    seen: dict[str, list[int]] = {}  # by names, shapes, dtypes and first entries: the earlier checkpoints
    for j, items in enumerate(named):
        key = str([(n, tuple(t.shape), t.dtype, _entries(t)[:8].tolist()) for n, t in items])
        i = next((i for i in seen.get(key, []) if all(map(same_values, tensors[i], tensors[j]))), None)
        seen.setdefault(key, []).append(j)
        if i is not None:
            return i, j
    return None


def _adam_like(optimizer: Mapping[str, Any] | None) -> bool:
    """Whether a saved optimizer state has Adam's moments in its param groups (``betas``, ``eps``): the only one
    Adam-aware TracIn reads (``_adam`` refuses the rest, naming them)."""
    groups = optimizer.get("param_groups") if optimizer is not None else None
    return isinstance(groups, Sequence) and any(isinstance(g, Mapping) and "betas" in g and "eps" in g for g in groups)


def _optimizer_lr(optimizer: Mapping[str, Any] | None) -> Any:
    """The learning rate all param groups of a saved optimizer share, else None."""
    groups = optimizer.get("param_groups") if optimizer is not None else None
    if not isinstance(groups, Sequence) or not groups:
        return None
    lrs = {float(g["lr"]) for g in groups if isinstance(g, Mapping) and "lr" in g}
    return lrs.pop() if len(lrs) == 1 and all(isinstance(g, Mapping) and "lr" in g for g in groups) else None


def _group_lrs(optimizer: Mapping[str, Any] | None) -> str:
    """Each param group's lr and parameters (names where saved, else ids) when a saved optimizer's groups have
    different lrs, else ``""``."""
    groups = optimizer.get("param_groups") if optimizer is not None else None
    if not isinstance(groups, Sequence) or not all(isinstance(g, Mapping) and "lr" in g for g in groups):
        return ""
    if len({float(g["lr"]) for g in groups}) < 2:
        return ""
    held = (list(g.get("param_names", g.get("params", ()))) for g in groups)  # (names, or ids where none are saved)
    return groups_listed((i, float(g["lr"]), names) for (i, g), names in zip(enumerate(groups), held))


def groups_listed(groups: Iterable[tuple[int, float, Sequence[Any]]]) -> str:
    """``param_groups[i] lr=... holds [...]`` for each ``(i, lr, parameters)``: its first five parameters (names, or
    ids where none are saved)."""
    return "; ".join(
        f"param_groups[{i}] lr={lr:g} holds {list(held)[:5]}{' and more' if len(held) > 5 else ''}"
        for i, lr, held in groups
    )


def checkpoint_files(directory: str) -> list[str]:
    """The non-hidden regular files of ``directory`` in natural order (``ckpt-2`` before ``ckpt-10``); may be empty."""
    files = [os.path.join(directory, f) for f in os.listdir(directory) if not f.startswith(".")]
    return sorted((f for f in files if os.path.isfile(f)), key=_natural_key)


def same_values(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``torch.equal``, which sparse tensors (a graph's adjacency) lack: theirs compared as coalesced COO tensors."""
    if x.layout == y.layout == torch.strided:
        return torch.equal(x, y)
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    x, y = as_coo(x), as_coo(y)
    return torch.equal(x.indices(), y.indices()) and torch.equal(x.values(), y.values())


def as_coo(t: torch.Tensor) -> torch.Tensor:
    """A tensor of any layout as a coalesced sparse COO tensor: one form, whatever its layout or entries' order."""
    return t.to_sparse().coalesce()


def _entries(t: torch.Tensor) -> torch.Tensor:
    """A tensor's entries in order, flat: a sparse one's stored values (coalesced)."""
    return (t if t.layout == torch.strided else as_coo(t).values()).reshape(-1)
