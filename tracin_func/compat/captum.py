"""Captum-compatible ``TracInCP``, ``TracInCPFast`` and ``TracInCPFastRandProj`` on top of tracin_func.

Migrating from captum 0.9.0 is an import change: ``from tracin_func.compat.captum import TracInCP`` instead of
``from captum.influence import TracInCP``. The constructors take Captum's arguments (same names, order and
defaults, except the default checkpoint loader) and the classes have Captum's methods; Captum is not imported.
Scores are exact TracIn, ``sum_c lr_c <grad test_loss(test; theta_c), grad loss(train; theta_c)>`` over the
checkpoints ``c``, equal to Captum's wherever Captum is right. Every deliberate difference from Captum, and why,
is listed in ``docs/captum_adapter.md``.

Example:
    >>> import os, tempfile, torch
    >>> from torch.utils.data import TensorDataset
    >>> from tracin_func.compat.captum import TracInCP, TracInCPFast, TracInCPFastRandProj
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    >>> train, test, loss = TensorDataset(x, y), (x[:2], y[:2]), torch.nn.CrossEntropyLoss(reduction="none")
    >>> def load(model, state):  # Captum's contract: load the checkpoint into `model`, return its learning rate
    ...     model.load_state_dict(state)
    ...     return 0.1
    >>> tracin = TracInCP(model, train, [model.state_dict()], load, loss_fn=loss, batch_size=4)
    >>> tracin.influence(test).shape
    torch.Size([2, 10])
    >>> top = tracin.influence(test, k=3, proponents=False)  # opponents: lowest scores first
    >>> top.indices.shape, bool((top.influence_scores[:, 1:] >= top.influence_scores[:, :-1]).all())
    (torch.Size([2, 3]), True)
    >>> tracin.self_influence().shape
    torch.Size([10])
    >>> iq = tracin.compute_intermediate_quantities
    >>> torch.allclose(iq(test) @ iq((x, y)).T, tracin.influence(test), atol=1e-5)
    True

    A directory of files and the default loader, :func:`load_checkpoint`:

    >>> tmp = tempfile.TemporaryDirectory()
    >>> torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.1}, os.path.join(tmp.name, "c-1.pt"))
    >>> from_files = TracInCP(model, train, tmp.name, loss_fn=loss, batch_size=4)
    >>> torch.equal(from_files.influence(test), tracin.influence(test))
    True
    >>> tmp.cleanup()

    The final-layer classes take the layer (a module of ``model`` or its dotted name):

    >>> TracInCPFast(model, model[2], train, [model.state_dict()], load, loss_fn=loss).influence(test).shape
    torch.Size([2, 10])
    >>> proj = TracInCPFastRandProj(model, "2", train, [model.state_dict()], load, loss_fn=loss, projection_dim=4)
    >>> proj.src_intermediate_quantities.shape, proj.influence(test).indices.shape  # Captum's default k=5
    (torch.Size([10, 4]), torch.Size([2, 5]))
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import tracin_func as tc

from .._checkpoints import (
    _in_folders,
    _read_file,
    check_lr,
    checkpoint_files,
    first_copy,
    refuse_copies,
    split_state_and_lr,
)
from .._data import batch_size_of, check_stable_order, same_values, sequential_loader
from .._setup import _default_device
from .._validate import positive_int, seed_value
from .._warn import warn

__all__ = [
    "KMostInfluentialResults",
    "TracInCP",
    "TracInCPFast",
    "TracInCPFastRandProj",
    "load_checkpoint",
]

LoadFunc = Callable[[nn.Module, Any], Any]  # Captum's contract: load `checkpoint` INTO the module, return its lr
Inputs = Union[tuple, list, DataLoader]


class KMostInfluentialResults(NamedTuple):
    """Proponents or opponents, with Captum's field names.

    Attributes:
        indices: ``[n_test, k]`` long tensor (``[1, k]`` with ``aggregate=True``), positions in the training data.
        influence_scores: ``[n_test, k]`` float tensor, sorted: descending for proponents, ascending for opponents.

    Example:
        >>> KMostInfluentialResults(torch.tensor([[2, 0]]), torch.tensor([[0.9, 0.1]])).indices
        tensor([[2, 0]])
    """

    indices: torch.Tensor
    influence_scores: torch.Tensor


# ------------------------------------------------------------------------------------------------ checkpoints


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> float:
    """The default ``checkpoints_load_func``: load a checkpoint file into ``model`` and return its learning rate.

    Follows Captum's loader contract (``f(model, checkpoint) -> lr``, loading in place); the classes of this module
    only ever call it on a copy of the user's model. The file is read onto the model's device as
    :func:`tracin_func.load_checkpoints` reads it (``torch.load(weights_only=True)``, or ``.safetensors``): a state
    dict, a state dict with a ``learning_rate`` (or ``lr``) entry, or a dict holding ``model_state_dict`` /
    ``state_dict`` next to ``learning_rate`` (Captum's tutorial format). A ``module.`` prefix (DataParallel / DDP)
    is matched to the model's own keys.

    Returns:
        The stored learning rate, or 1.0 when the file stores none (as Captum's default loader). An optimizer saved
        beside the model is not read, as Captum scores plain gradients: ``tc.load_checkpoints`` takes its learning
        rate, and for Adam its moments (Adam-aware scores), so the two differ on such files.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`checkpoints`: the default `checkpoints_load_func` reads checkpoint files, got a {type(path).__name__}; "
            f"pass files (a directory or paths), or checkpoints in memory with a `checkpoints_load_func` loading one "
            f"into the model it is given and returning its learning rate (`model.load_state_dict(state); return lr`)."
        )
    path = os.fspath(path)
    device = _default_device(model, tc.Checkpoint(params={}))  # the model's device; CPU if it holds no tensor
    state, lr = split_state_and_lr(_read_file(path, map_location=device, weights_only=True), repr(path))
    expected = list(model.state_dict())
    if expected and all(k.startswith("module.") for k in expected):
        state = {f"module.{k}": v for k, v in state.items()}
    model.load_state_dict(state)
    return 1.0 if lr is None else lr


def _checkpoint_sources(checkpoints: Any) -> list[Any]:
    """Captum's ``checkpoints`` argument as a list: a directory (natural order), a list (kept) or an iterable."""
    if isinstance(checkpoints, (str, os.PathLike)):
        if not os.path.isdir(checkpoints):
            raise ValueError(
                f"`checkpoints` {os.fspath(checkpoints)!r} is not a directory; pass a directory of checkpoint files, "
                f"a list of paths, or an iterable of objects `checkpoints_load_func` understands."
            )
        sources: list[Any] = checkpoint_files(os.fspath(checkpoints))
    elif isinstance(checkpoints, Iterable) and not isinstance(checkpoints, (Mapping, torch.Tensor)):
        sources = list(checkpoints)
    else:
        raise TypeError(
            f"`checkpoints` must be a directory, a list of paths or an iterable of checkpoints, got "
            f"{type(checkpoints).__name__}."
        )
    if not sources:
        folders = _in_folders(os.fspath(checkpoints)) if isinstance(checkpoints, (str, os.PathLike)) else ""
        raise ValueError(
            f"Invalid checkpoints provided for TracIn class: {checkpoints!r} holds no checkpoints{folders}. Pass a "
            f"non-empty directory, list of paths or iterable."
        )
    return sources


def _learning_rate(lr: Any, index: int, source: Any) -> float | torch.Tensor:
    """``checkpoints_load_func``'s return value, checked: a positive finite number or one-element tensor."""
    where = f"checkpoints[{index}] ({source!r}) returned by `checkpoints_load_func`"
    check_lr(lr, f"{where} (which must load the checkpoint into the model it is given and return the learning rate)")
    return lr.detach().reshape(()) if isinstance(lr, torch.Tensor) else float(lr)


def _load_all(model: nn.Module, sources: Sequence[Any], load_func: LoadFunc) -> list[tc.Checkpoint]:
    """Each checkpoint loaded once into a private copy of ``model`` and snapshotted as a ``tc.Checkpoint``."""
    if not callable(load_func):
        raise TypeError(f"`checkpoints_load_func` must be a function f(model, checkpoint) -> lr, got {load_func!r}.")
    try:
        shadow = copy.deepcopy(model)
    except Exception as err:
        raise TypeError(
            f"`model` could not be copied ({type(err).__name__}: {err}); the adapter loads checkpoints into a copy "
            f"so that the model is never modified. Use `tc.load_checkpoints` and the functional API instead."
        ) from err
    checkpoints = []
    own = _held(model)
    for i, source in enumerate(sources):
        lr = _learning_rate(load_func(shadow, source), i, source)
        if not _still_held(model, own):  # (every checkpoint was the copy's first state: 103% off, silently)
            raise ValueError(
                f"`checkpoints_load_func` loaded checkpoint {source!r} into `model` (a closure's, say), not into the "
                f"model it was given: the adapter gives it a copy of `model`, which it then reads, so that your model "
                f"is never changed (it now holds that checkpoint). Load into the function's first argument, as "
                f"Captum calls it: `load_func(model, checkpoint)`."
            )
        state = {k: v.detach().clone() for k, v in _unwrapped(shadow).state_dict().items()}
        checkpoints.append(tc.Checkpoint(params=state, lr=lr))
    if all(isinstance(source, (str, os.PathLike)) for source in sources):  # (as `tc.load_checkpoints` refuses them)
        refuse_copies([os.fspath(source) for source in sources], checkpoints, "checkpoints")
    elif (copied := first_copy(checkpoints)) is not None:  # (loaded into a copy: the scorers' check of tensors held
        i, j = copied  # twice sees copies; Captum scores such a state twice too)
        warn(
            f"`checkpoints[{i}]` and `checkpoints[{j}]` load the same values, a state scored twice: a model unchanged "
            f"between them, or the model's live `state_dict()` kept twice (references, which training changes in "
            f"place: both score the weights as they are now, not as they were when saved; keep copies when saving, "
            f"`{{k: v.detach().clone() for k, v in model.state_dict().items()}}`).",
            UserWarning,
        )
    return checkpoints


def _held(model: nn.Module) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """The tensors ``model`` holds, each with its version and a copy of its values: a load in place, or of new tensors,
    changes the first two, one through ``.data`` (``p.data.copy_(v)``, ``p.data = v``: its own version counter) the
    values alone."""
    return [(t, t._version, t.detach().clone()) for t in model.state_dict(keep_vars=True).values()]


def _still_held(model: nn.Module, held: list[tuple[torch.Tensor, int, torch.Tensor]]) -> bool:
    """Whether ``model`` holds the tensors ``held`` (``_held``), none written since."""
    now = list(model.state_dict(keep_vars=True).values())
    return len(now) == len(held) and all(
        t is a and t._version == v and same_values(t, c) for t, (a, v, c) in zip(now, held)
    )


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module a ``DataParallel`` / ``DistributedDataParallel`` wrapper runs (which Captum scores as it is; the
    functional API runs the module itself), else ``model``."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


# ------------------------------------------------------------------------------------------------------- data


def _train_loader(train_dataset: Any, batch_size: Any) -> DataLoader:
    """Captum's rule: a ``DataLoader`` is used as is; a ``Dataset`` is batched by ``batch_size``, unshuffled."""
    if isinstance(train_dataset, DataLoader):
        check_stable_order(train_dataset, "train_dataset")  # (here, not at the first query, under the core's name)
        return train_dataset
    if isinstance(train_dataset, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in train_dataset):
        raise TypeError(
            "`train_dataset` must be a Dataset or a DataLoader, got a tuple of tensors; wrap it as "
            "`TensorDataset(*batch)`."
        )
    if not isinstance(train_dataset, Dataset):
        raise TypeError(f"`train_dataset` must be a Dataset or a DataLoader, got {type(train_dataset).__name__}.")
    return sequential_loader(train_dataset, positive_int(batch_size, "batch_size"))


def _inputs(inputs: Any, method: str) -> Any:
    """Captum's ``inputs``: one batch ``(x1, ..., xk, y)`` (a tuple or list), or a ``DataLoader`` of batches."""
    if inputs is None:
        raise ValueError(
            f"`inputs` argument is required by `{method}`. To score the training data against itself, use "
            f"`self_influence` (inputs=None scores `train_dataset`)."
        )
    if isinstance(inputs, DataLoader):
        return inputs
    if isinstance(inputs, (tuple, list)):
        return [tuple(inputs)]  # one batch, never split, as in Captum
    raise TypeError(
        f"`inputs` must be a batch `(x1, ..., xk, y)` or a DataLoader of such batches, got {type(inputs).__name__}."
    )


def _num_examples(loader: DataLoader) -> int:
    """Examples in a DataLoader: from its sampler when the batching is the default one, else by counting."""
    if loader.batch_size is not None and not isinstance(loader.dataset, IterableDataset):
        try:
            n = len(loader.sampler)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            return n - n % loader.batch_size if loader.drop_last else n
    return sum(batch_size_of(batch, "`train_dataset` batch") for batch in loader)


def _clipped_k(k: Any, loader: DataLoader) -> int:
    """``k``, clipped to the number of training examples (Captum returns them all when ``k`` is larger)."""
    k = positive_int(k, "k")
    try:
        if k <= len(loader):  # every batch holds at least one example
            return k
    except TypeError:
        pass
    n = _num_examples(loader)
    if n < 1:
        raise ValueError("`train_dataset` holds no examples.")
    return min(k, n)


def _sum_of_outputs(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """Captum's convention for ``loss_fn=None``: an example's loss is the sum of the model's outputs."""
    del targets
    return outputs


def _params_under(model: nn.Module, names: Sequence[str], argument: str) -> list[str]:
    """Every parameter of the modules ``names`` of the module scored, frozen ones too (Captum's ``layers`` makes
    them require gradients: the core's ``layers=`` keeps the trainable ones, which dropped them, 75-83% off), each
    once, in order."""
    scored = _unwrapped(model)
    empty = [name for name in names if next(scored.get_submodule(name).parameters(), None) is None]
    if empty:
        kinds = ", ".join(f"{name!r} is a {type(scored.get_submodule(name)).__name__}" for name in empty)
        raise ValueError(f"`{argument}`: {kinds}, with no parameters; name modules with parameters to differentiate.")
    found = [f"{name}.{n}" if name else n for name in names for n, _ in scored.get_submodule(name).named_parameters()]
    return list(dict.fromkeys(found))


def _module_name(model: nn.Module, layer: Any, argument: str) -> str:
    """Dotted name of ``layer`` (a module of ``model`` or its name) in the module scored (``_unwrapped``)."""
    scored = _unwrapped(model)
    if scored is not model and isinstance(layer, str) and layer.startswith("module."):
        layer = layer[len("module.") :]
    modules = dict(scored.named_modules())
    if isinstance(layer, str):
        if layer not in modules:
            raise ValueError(
                f'Invalid {argument} str: "{layer}" provided! `{argument}` must name a submodule of `model`, one '
                f"of {[n for n in modules if n][:20]}."
            )
        return layer
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name
        raise ValueError(f"`{argument}` {type(layer).__name__} is not a submodule of `model`.")
    raise TypeError(f"`{argument}` must be a module of `model` or its dotted name, got {type(layer).__name__}.")


# ---------------------------------------------------------------------------------------------------- classes


class _TracInBase:
    """Shared construction (the training loader, the losses, the checkpoints loaded once) and scoring methods."""

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        checkpoints: Any,
        checkpoints_load_func: LoadFunc,
        loss_fn: Any,
        batch_size: int | None,
        test_loss_fn: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        self.model = model
        self._net = _unwrapped(model)  # (what is scored: a DataParallel / DDP wrapper's module)
        self.train_dataloader = _train_loader(train_dataset, batch_size)
        self.batch_size = batch_size
        self.loss_fn = loss_fn
        self.test_loss_fn = loss_fn if test_loss_fn is None else test_loss_fn
        self.checkpoints_load_func = checkpoints_load_func
        self._sources = _checkpoint_sources(checkpoints)
        self._checkpoints: list[tc.Checkpoint] = []

    def _load(self) -> None:
        """Called by subclasses once their own arguments are checked: loading may be slow."""
        self._checkpoints = _load_all(self.model, self._sources, self.checkpoints_load_func)

    @property
    def checkpoints(self) -> list[Any]:
        """The checkpoints, in the order they are used: sorted paths of a directory, or the user's list as given."""
        return list(self._sources)

    @classmethod
    def get_name(cls) -> str:
        """The class name (Captum uses it in progress texts).

        Example:
            >>> TracInCP.get_name()
            'TracInCP'
        """
        return cls.__name__

    def _train_loss(self) -> Any:
        return _sum_of_outputs if self.loss_fn is None else self.loss_fn

    def _test_loss(self) -> Any:
        return _sum_of_outputs if self.test_loss_fn is None else self.test_loss_fn

    def _selection(self) -> dict[str, Any]:
        """The differentiated parameters, as options of the functional API."""
        raise NotImplementedError

    def _embed(self, data: Any, loss_fn: Any) -> torch.Tensor:
        return tc.embeddings(self._net, self._checkpoints, data, loss_fn=loss_fn, **self._selection())

    def influence(
        self,
        inputs: Inputs,
        k: int | None = None,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> torch.Tensor | KMostInfluentialResults:
        """Influence scores of the training examples on ``inputs``, or the ``k`` most influential of them.

        Args:
            inputs: one batch ``(x1, ..., xk, y)`` or a ``DataLoader`` of batches.
            k: ``None`` for all scores; else how many proponents / opponents to return per test example.
            proponents: the highest scores (True) or the lowest (False).
            show_progress: tqdm progress bars.
            aggregate: sum over the test examples first (one row).

        Returns:
            ``[n_test, n_train]`` scores (``[1, n_train]`` aggregated), or ``KMostInfluentialResults`` of
            ``[n_test, k]`` (``[1, k]``) tensors sorted by score.
        """
        train_loss, test_loss = self._train_loss(), self._test_loss()
        args = (self._net, self._checkpoints, self.train_dataloader, _inputs(inputs, "influence"))
        options = {
            "loss_fn": train_loss,
            "test_loss_fn": None if test_loss is train_loss else test_loss,
            "aggregate": bool(aggregate),
            "progress": bool(show_progress),
            **self._selection(),
        }
        if k is None:
            return tc.influence(*args, **options)
        k = _clipped_k(k, self.train_dataloader)
        top = tc.top_k(*args, k=k, proponents=bool(proponents), **options)
        return KMostInfluentialResults(top.indices, top.scores)

    def self_influence(
        self, inputs: Inputs | None = None, show_progress: bool = False, outer_loop_by_checkpoints: bool = False
    ) -> torch.Tensor:
        """Self-influence ``sum_c lr_c |grad loss(z; theta_c)|^2`` (with ``loss_fn``) of each example of ``inputs``.

        Args:
            inputs: one batch or a ``DataLoader``; ``None`` scores ``train_dataset``.
            show_progress: tqdm progress bars.
            outer_loop_by_checkpoints: accepted for compatibility; the numbers do not depend on it.

        Returns:
            ``[n]`` float tensor.
        """
        del outer_loop_by_checkpoints  # checkpoints are in memory: the loop order changes nothing
        data = self.train_dataloader if inputs is None else _inputs(inputs, "self_influence")
        options = {"loss_fn": self._train_loss(), "progress": bool(show_progress), **self._selection()}
        return tc.self_influence(self._net, self._checkpoints, data, **options)


class TracInCP(_TracInBase):
    """TracIn over all parameters, or those of ``layers``: Captum's ``TracInCP`` computed by tracin_func.

    ``score[i, j] = sum_c lr_c <grad test_loss(test_i; theta_c), grad loss(train_j; theta_c)>``, exact, with
    Captum's per-example losses: the sum over an example's loss elements for ``reduction="none"`` / ``"sum"``, their
    mean for ``"mean"``, the sum of the model's outputs for ``loss_fn=None``.

    Args:
        model: the model; only its shape is used, it is never modified.
        train_dataset: a ``Dataset`` (batched by ``batch_size``, unshuffled) or a ``DataLoader`` yielding batches
            ``(x1, ..., xk, y)``; training indices are positions in its iteration order.
        checkpoints: a directory (every file, natural order), a list of paths (kept in order) or an iterable of
            objects ``checkpoints_load_func`` understands.
        checkpoints_load_func: ``f(model, checkpoint) -> lr`` loading the checkpoint into the module it is given (a
            copy of ``model``); default :func:`load_checkpoint`.
        layers: dotted names of the modules whose parameters are differentiated; default all parameters.
        loss_fn: criterion ``loss_fn(outputs, targets)`` with any reduction, or None.
        batch_size: batch size when ``train_dataset`` is a Dataset.
        test_loss_fn: criterion for the test examples; default ``loss_fn``.
        sample_wise_grads_per_batch: accepted for compatibility; both values give the same numbers.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        checkpoints: str | os.PathLike[str] | Iterable[Any],
        checkpoints_load_func: LoadFunc = load_checkpoint,
        layers: list[str] | None = None,
        loss_fn: Any = None,
        batch_size: int | None = 1,
        test_loss_fn: Any = None,
        sample_wise_grads_per_batch: bool = False,
    ) -> None:
        super().__init__(model, train_dataset, checkpoints, checkpoints_load_func, loss_fn, batch_size, test_loss_fn)
        if layers is not None:
            if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
                raise TypeError(f"`layers` must be a non-empty list of module names or None, got {layers!r}.")
            layers = [_module_name(model, name, "layers") for name in layers]
        self.layers = layers
        self._params = None if layers is None else _params_under(model, layers, "layers")
        self.sample_wise_grads_per_batch = sample_wise_grads_per_batch
        self._load()

    def _selection(self) -> dict[str, Any]:
        return {} if self._params is None else {"params": self._params}

    def compute_intermediate_quantities(self, inputs: Inputs, aggregate: bool = False) -> torch.Tensor:
        """Embeddings ``cat_c sqrt(lr_c) * grad loss(z; theta_c)`` (with ``loss_fn``): ``IQ(test) @ IQ(train).T``
        equals ``influence(test)`` when ``test_loss_fn`` is ``loss_fn``.

        Args:
            inputs: one batch or a ``DataLoader``.
            aggregate: return the sum of the rows, computed batch by batch.

        Returns:
            ``[n, C * P]`` float tensor (``[1, C * P]`` aggregated) for C checkpoints and P differentiated
            parameters, laid out per checkpoint in parameter order.
        """
        data = _inputs(inputs, "compute_intermediate_quantities")
        if not aggregate:
            return self._embed(data, self._train_loss())
        total = None
        for batch in data:  # one batch at a time: memory O(P * C), not O(n * P * C)
            rows = self._embed([batch], self._train_loss()).sum(0, keepdim=True)
            total = rows if total is None else total + rows
        if total is None:
            raise ValueError("`inputs` holds no examples.")
        return total


class TracInCPFast(_TracInBase):
    """Exact TracIn restricted to the weight and bias of ``final_fc_layer``: Captum's ``TracInCPFast``, corrected.

    Exact whatever follows the layer (factored inner products from the layer's inputs and output gradients, no
    per-example gradient formed); Captum's drops the bias and differentiates the loss w.r.t. the model output.
    Arguments as :class:`TracInCP`, with ``final_fc_layer`` (a module of ``model`` or its dotted name) instead of
    ``layers``; ``vectorize`` is accepted and ignored.
    """

    def __init__(
        self,
        model: nn.Module,
        final_fc_layer: nn.Module | str,
        train_dataset: Dataset | DataLoader,
        checkpoints: str | os.PathLike[str] | Iterable[Any],
        checkpoints_load_func: LoadFunc = load_checkpoint,
        loss_fn: Any = None,
        batch_size: int | None = 1,
        test_loss_fn: Any = None,
        vectorize: bool = False,
    ) -> None:
        super().__init__(model, train_dataset, checkpoints, checkpoints_load_func, loss_fn, batch_size, test_loss_fn)
        name = _module_name(model, final_fc_layer, "final_fc_layer")
        self.final_fc_layer: nn.Module = _unwrapped(model).get_submodule(name)
        self._params = _params_under(model, [name], "final_fc_layer")
        self.vectorize = vectorize
        self._load()

    def _selection(self) -> dict[str, Any]:
        return {"params": self._params, "factored": True}


class TracInCPFastRandProj(TracInCPFast):
    """Final-layer TracIn through stored training embeddings, for fast repeated queries: Captum's
    ``TracInCPFastRandProj``, exact unless projected.

    At construction every training example is embedded as ``cat_c sqrt(lr_c) * grad loss(z; theta_c)`` over the
    weight and bias of ``final_fc_layer`` (with ``loss_fn``), projected to ``projection_dim`` columns per checkpoint
    by seeded random matrices when ``projection_dim`` is below the layer's parameter count. A query embeds the test
    batch the same way (with ``test_loss_fn``) and takes dot products; unprojected, the scores equal
    :class:`TracInCPFast`'s. Proponents / opponents come from an exact search, or from ``nearest_neighbors`` (an
    object with Captum's ``setup(data)`` / ``get_nearest_neighbors(query, k)``) when given. Arguments as
    :class:`TracInCPFast`, plus ``nearest_neighbors``, ``projection_dim`` and ``seed``.

    Attributes:
        src_intermediate_quantities: ``[n_train, C * D]`` training embeddings (Captum's name).
    """

    def __init__(
        self,
        model: nn.Module,
        final_fc_layer: nn.Module | str,
        train_dataset: Dataset | DataLoader,
        checkpoints: str | os.PathLike[str] | Iterable[Any],
        checkpoints_load_func: LoadFunc = load_checkpoint,
        loss_fn: Any = None,
        batch_size: int | None = 1,
        test_loss_fn: Any = None,
        vectorize: bool = False,
        nearest_neighbors: Any = None,
        projection_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        if projection_dim is not None:
            projection_dim = positive_int(projection_dim, "projection_dim")
        seed_value(seed)
        if nearest_neighbors is not None and not all(
            callable(getattr(nearest_neighbors, m, None)) for m in ("setup", "get_nearest_neighbors")
        ):
            raise TypeError(
                "`nearest_neighbors` must have Captum's NearestNeighbors methods `setup(data)` and "
                "`get_nearest_neighbors(query, k)`, or be None for an exact search."
            )
        args = (model, final_fc_layer, train_dataset, checkpoints, checkpoints_load_func, loss_fn, batch_size)
        super().__init__(*args, test_loss_fn, vectorize)
        self.nearest_neighbors = nearest_neighbors
        self.projection_dim = projection_dim
        self.seed = seed
        n_params = sum(p.numel() for p in self.final_fc_layer.parameters())
        self._projection = projection_dim if projection_dim is not None and projection_dim < n_params else None
        self.src_intermediate_quantities = self._embed(self.train_dataloader, self._train_loss())
        if nearest_neighbors is not None:
            nearest_neighbors.setup(self.src_intermediate_quantities)

    def _embed(self, data: Any, loss_fn: Any) -> torch.Tensor:
        projection = {} if self._projection is None else {"projection_dim": self._projection, "seed": self.seed}
        selection = {**self._selection(), **projection}  # (exact where no projection is smaller than the layer)
        return tc.embeddings(self._net, self._checkpoints, data, loss_fn=loss_fn, **selection)

    def influence(  # type: ignore[override]
        self, inputs: Inputs, k: int | None = 5, proponents: bool = True
    ) -> torch.Tensor | KMostInfluentialResults:
        """Scores from the stored embeddings (``k=None``), or the ``k`` strongest proponents / opponents (Captum's
        default ``k=5``).

        Returns:
            ``[n_test, n_train]`` scores, or ``KMostInfluentialResults`` of ``[n_test, k]`` tensors sorted by score.
        """
        test = self._embed(_inputs(inputs, "influence"), self._test_loss())
        train = self.src_intermediate_quantities
        if k is None:
            return test @ train.T
        k = min(positive_int(k, "k"), train.shape[0])
        if self.nearest_neighbors is None:
            top = tc.top_k_embeddings(test, train, k=k, proponents=bool(proponents))
            return KMostInfluentialResults(top.indices, top.scores)
        sign = 1 if proponents else -1
        indices, scores = self.nearest_neighbors.get_nearest_neighbors(test * sign, k)
        return KMostInfluentialResults(
            torch.as_tensor(indices, device=test.device).long(), torch.as_tensor(scores, device=test.device) * sign
        )

    def compute_intermediate_quantities(self, inputs: Inputs) -> torch.Tensor:
        """Embeddings of ``inputs`` with ``loss_fn``, as stored for the training data (``[n, C * D]``)."""
        return self._embed(_inputs(inputs, "compute_intermediate_quantities"), self._train_loss())
