"""Captum-compatible TracIn classes on top of tracin_func: migrating is an import change.

.. code-block:: python

    from captum.influence import TracInCP, TracInCPFast, TracInCPFastRandProj          # before
    from tracin_func.compat.captum import TracInCP, TracInCPFast, TracInCPFastRandProj  # after

The constructors take captum 0.9.0's arguments (same names, order and defaults, except the default loader) and the
classes have its methods: ``influence`` (scores, or ``KMostInfluentialResults(indices, influence_scores)`` when
``k`` is given), ``self_influence``, ``compute_intermediate_quantities``, ``get_name`` and the ``checkpoints``
property. Captum itself is not imported. Scores are exact TracIn (DESIGN.md), equal to Captum's wherever Captum is
right; the differences, all deliberate:

1. The model is never modified. Each checkpoint is loaded once, at construction, by calling
   ``checkpoints_load_func(copy, checkpoint)`` on a ``copy.deepcopy`` of ``model`` and reading the copy's
   ``state_dict()``, kept in memory (C copies of the state dict). Captum loads every checkpoint into ``model``
   itself, again for every training batch, and leaves the last one loaded. Files changed after construction are
   not re-read, and ``checkpoints`` is read-only.
2. The default loader is :func:`load_checkpoint`: ``torch.load(weights_only=True, map_location=<model's device>)``,
   honouring a ``learning_rate`` (or ``lr``) entry, ``model_state_dict`` / ``state_dict`` nesting and
   ``module.`` prefixes; lr 1 when the file stores none. Captum's default runs a bare ``torch.load`` and cannot
   carry a learning rate (a ``learning_rate`` key breaks its strict ``load_state_dict``).
3. A list of checkpoint paths keeps the user's order (Captum re-sorts it). A directory is sorted naturally
   (``ckpt-2`` before ``ckpt-10``) as in Captum, skipping hidden files and subdirectories. No checkpoint at all
   raises ``ValueError`` (Captum raises ``IndexError`` for an empty list).
4. ``sample_wise_grads_per_batch`` is accepted; both values give the same exact numbers, for every layer type and
   any ``reduction`` of ``loss_fn`` (``"none"``, ``"sum"`` or ``"mean"``, whatever the flag). Captum's ``True``
   path silently drops Embedding, LayerNorm, Conv1d and attention parameters and fails on ``nn.Linear``
   subclasses, and Captum requires ``reduction="none"`` exactly when the flag is ``False``.
5. ``test_loss_fn``'s own reduction is honoured; Captum's ``TracInCP`` applies ``loss_fn``'s to it.
6. ``TracInCP.compute_intermediate_quantities`` scales each checkpoint's gradients by ``sqrt(lr)``, so that
   ``IQ(test) @ IQ(train).T == influence(test)``; Captum scales by ``lr`` (its products are ``sum lr^2 <g, g'>``).
7. ``TracInCPFast`` and ``TracInCPFastRandProj`` compute exact TracIn restricted to the weight and bias of
   ``final_fc_layer``, whatever follows the layer. Captum drops the bias gradient and differentiates the loss
   w.r.t. the model output, which is right only for a bias-free final layer whose output is the model output.
   They also accept ``loss_fn=None``, any reduction, a ``DataLoader`` as ``inputs`` and ``aggregate=``.
8. ``TracInCPFastRandProj`` builds its training embeddings with ``loss_fn`` (Captum uses ``test_loss_fn``).
   Projections are seeded hashed ``±1/sqrt(k)`` matrices (Kronecker-factored for the weight, see
   :func:`tracin_func.embeddings`), generated without the global RNG, so projected scores differ from Captum's
   for the same seed. Each checkpoint contributes ``projection_dim`` columns, and only when ``projection_dim`` is
   below the layer's parameter count; otherwise the exact gradient, ``d_out * d_in`` (``+ d_out`` with a bias).
   Captum uses ``min(isqrt(projection_dim), d_out) * min(isqrt(projection_dim), d_in)`` columns, when
   ``d_out * d_in > projection_dim``.
9. ``TracInCPFastRandProj`` finds proponents / opponents by an exact search (:func:`tracin_func.top_k_embeddings`)
   unless a ``nearest_neighbors`` object is given, which is then used through Captum's ``NearestNeighbors`` API
   (``setup`` / ``get_nearest_neighbors``). Captum defaults to Annoy: approximate, float32, needs ``annoy``.
10. ``TracInCPFastRandProj.self_influence`` works (exact on the layer, unprojected, as ``TracInCPFast``); Captum
    raises ``NotImplementedError``. Its ``compute_intermediate_quantities`` uses ``loss_fn`` (the rows stored for
    the training data); Captum's uses ``test_loss_fn``.
11. No global side effects: no ``torch.manual_seed``, no ``requires_grad`` changes, no hooks left behind, no
    ``zero_grad``, no draw from the global RNG when iterating a ``Dataset``. Captum seeds the global generator
    (``TracInCPFastRandProj``) and sets ``requires_grad=True`` permanently (``layers``, ``final_fc_layer``).
12. Invalid arguments raise ``ValueError`` / ``TypeError`` naming the argument (``inputs=None``, a bad
    ``batch_size``, unknown ``layers``; checked at construction where possible) instead of ``AssertionError`` or
    errors deep in a call. ``k`` must be a positive int or ``None``; ``k`` above the number of training examples
    returns them all, as in Captum.
13. A model holding BatchNorm or Dropout in training mode is refused (call ``model.eval()``): their outputs would
    depend on the batch or on random numbers. Captum scores in whatever mode the model is.
14. ``outer_loop_by_checkpoints`` and ``vectorize`` are accepted and ignored (same numbers; checkpoints are in
    memory, so loop order costs nothing). ``show_progress`` shows tracin_func's tqdm bars, with other texts.
15. Every element of a batch must be a tensor with a leading batch dimension (the last one being the target, as
    in Captum). Batches are moved to the model's device (Captum needs them there already); scores are computed
    in the dtype of the loaded checkpoints, i.e. the model's, and returned on the model's device.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import tracin_func as tc

from .._checkpoints import split_state_and_lr
from .._data import batch_size_of
from .._validate import positive_int, seed_value

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
        >>> import torch
        >>> from tracin_func.compat.captum import KMostInfluentialResults
        >>> KMostInfluentialResults(torch.tensor([[2, 0]]), torch.tensor([[0.9, 0.1]])).indices
        tensor([[2, 0]])
    """

    indices: torch.Tensor
    influence_scores: torch.Tensor


# ------------------------------------------------------------------------------------------------ checkpoints


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> float:
    """The default ``checkpoints_load_func``: load a checkpoint file into ``model`` and return its learning rate.

    Follows Captum's loader contract (``f(model, checkpoint) -> lr``, loading in place); the classes of this module
    only ever call it on a copy of the user's model. The file is read with ``torch.load(weights_only=True)`` onto
    the model's device and may be a state dict, a state dict with a ``learning_rate`` (or ``lr``) entry, or a dict
    holding ``model_state_dict`` / ``state_dict`` next to ``learning_rate`` (Captum's tutorial format). A
    ``module.`` prefix (DataParallel / DDP) is matched to the model's own keys.

    Returns:
        The stored learning rate, or 1.0 when the file stores none (as Captum's default loader).

    Example:
        >>> import os, tempfile, torch
        >>> from tracin_func.compat.captum import load_checkpoint
        >>> model, tmp = torch.nn.Linear(2, 1), tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "ckpt-1.pt")
        >>> torch.save({"model_state_dict": torch.nn.Linear(2, 1).state_dict(), "learning_rate": 0.1}, path)
        >>> load_checkpoint(model, path)
        0.1
        >>> tmp.cleanup()
    """
    obj = torch.load(path, map_location=_model_device(model), weights_only=True)
    if not isinstance(obj, Mapping):
        raise TypeError(f"Checkpoint file {os.fspath(path)!r} holds a {type(obj).__name__}, expected a state dict.")
    state, lr = split_state_and_lr(obj, repr(os.fspath(path)))
    expected = list(model.state_dict())
    if expected and all(k.startswith("module.") for k in expected):
        state = {f"module.{k}": v for k, v in state.items()}
    model.load_state_dict(state)
    return 1.0 if lr is None else lr


def _natural_key(path: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _checkpoint_sources(checkpoints: Any) -> list[Any]:
    """Captum's ``checkpoints`` argument as a list: a directory (natural order), a list (kept) or an iterable."""
    if isinstance(checkpoints, (str, os.PathLike)):
        directory = os.fspath(checkpoints)
        if not os.path.isdir(directory):
            raise ValueError(
                f"`checkpoints` {directory!r} is not a directory; pass a directory of checkpoint files, a list of "
                f"paths, or an iterable of objects `checkpoints_load_func` understands."
            )
        names = [n for n in os.listdir(directory) if not n.startswith(".")]
        sources: list[Any] = sorted(
            (os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))),
            key=_natural_key,
        )
    elif isinstance(checkpoints, Iterable) and not isinstance(checkpoints, (Mapping, torch.Tensor)):
        sources = list(checkpoints)
    else:
        raise TypeError(
            f"`checkpoints` must be a directory, a list of paths or an iterable of checkpoints, got "
            f"{type(checkpoints).__name__}."
        )
    if not sources:
        raise ValueError(
            f"Invalid checkpoints provided for TracIn class: {checkpoints!r} holds no checkpoints. Pass a non-empty "
            f"directory, list of paths or iterable."
        )
    return sources


def _checked_lr(lr: Any, index: int, source: Any) -> float | torch.Tensor:
    where = f"`checkpoints_load_func` for checkpoints[{index}] ({source!r})"
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where} returned a tensor of shape {tuple(lr.shape)}; return the learning rate.")
        lr = lr.detach().reshape(())
        value = float(lr)
    else:
        try:
            value = lr = float(lr)
        except (TypeError, ValueError):
            raise TypeError(
                f"{where} returned {lr!r}; it must load the checkpoint into the model it is given and return the "
                f"learning rate (a positive number)."
            ) from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{where} returned the learning rate {value}; it must be positive and finite.")
    return lr


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
    for i, source in enumerate(sources):
        lr = _checked_lr(load_func(shadow, source), i, source)
        state = {k: v.detach().clone() for k, v in shadow.state_dict().items()}
        checkpoints.append(tc.Checkpoint(params=state, lr=lr))
    return checkpoints


# ------------------------------------------------------------------------------------------------------- data


def _train_loader(train_dataset: Any, batch_size: Any) -> DataLoader:
    """Captum's rule: a ``DataLoader`` is used as is; a ``Dataset`` is batched by ``batch_size``, unshuffled."""
    if isinstance(train_dataset, DataLoader):
        return train_dataset
    if isinstance(train_dataset, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in train_dataset):
        raise TypeError(
            "`train_dataset` must be a Dataset or a DataLoader, got a tuple of tensors; wrap it as "
            "`TensorDataset(*batch)`."
        )
    if not isinstance(train_dataset, Dataset):
        raise TypeError(f"`train_dataset` must be a Dataset or a DataLoader, got {type(train_dataset).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TypeError(
            f"since `train_dataset` is a Dataset, `batch_size` must be a positive int, got {batch_size!r}; or pass "
            f"a DataLoader."
        )
    # Its own generator: iterating a DataLoader otherwise draws a seed from the global RNG.
    return DataLoader(train_dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())


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


def _positive_k(k: Any, loader: DataLoader) -> int:
    """``k``, clipped to the number of training examples (Captum returns them all when ``k`` is larger)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int (or None for all scores), got {k!r}.")
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


def _module_name(model: nn.Module, layer: Any, argument: str) -> str:
    """Dotted name of ``layer`` (a module of ``model`` or its name)."""
    modules = dict(model.named_modules())
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
    """Shared construction: the training loader, the losses, and the checkpoints loaded once."""

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
        self.train_dataloader = _train_loader(train_dataset, batch_size)
        self.batch_size = batch_size
        self.loss_fn = loss_fn
        self.test_loss_fn = loss_fn if test_loss_fn is None else test_loss_fn
        self.checkpoints_load_func = checkpoints_load_func
        self._sources = _checkpoint_sources(checkpoints)
        self._checkpoints: list[tc.Checkpoint] = []

    def _load(self) -> None:
        self._checkpoints = _load_all(self.model, self._sources, self.checkpoints_load_func)

    @property
    def checkpoints(self) -> list[Any]:
        """The checkpoints, in the order they are used: sorted paths of a directory, or the user's list as given.

        Example:
            >>> import torch
            >>> from torch.utils.data import TensorDataset
            >>> from tracin_func.compat.captum import TracInCP
            >>> model, data = torch.nn.Linear(2, 1), TensorDataset(torch.randn(3, 2), torch.randn(3, 1))
            >>> def load(model, name):  # any object the loader understands can stand for a checkpoint
            ...     return {"early": 0.5, "late": 0.1}[name]
            >>> TracInCP(model, data, ["late", "early"], load).checkpoints
            ['late', 'early']
        """
        return list(self._sources)

    @classmethod
    def get_name(cls) -> str:
        """The class name (Captum uses it in progress texts).

        Example:
            >>> from tracin_func.compat.captum import TracInCP
            >>> TracInCP.get_name()
            'TracInCP'
        """
        return cls.__name__

    def _train_loss(self) -> Any:
        return _sum_of_outputs if self.loss_fn is None else self.loss_fn

    def _test_loss(self) -> Any:
        return _sum_of_outputs if self.test_loss_fn is None else self.test_loss_fn

    def _losses(self) -> dict[str, Any]:
        train, test = self._train_loss(), self._test_loss()
        return {"loss_fn": train, "test_loss_fn": None if test is train else test}

    def _selection(self) -> dict[str, Any]:
        raise NotImplementedError

    def _scores(self, inputs: Any, k: int | None, proponents: bool, progress: bool, aggregate: bool, method: str):
        test = _inputs(inputs, method)
        args = (self.model, self._checkpoints, self.train_dataloader, test)
        options = {**self._losses(), **self._selection(), "aggregate": bool(aggregate), "progress": bool(progress)}
        if k is None:
            return tc.influence(*args, **options)
        k = _positive_k(k, self.train_dataloader)
        top = tc.top_k(*args, k=k, proponents=bool(proponents), **options)
        return KMostInfluentialResults(top.indices, top.scores)

    def _self(self, inputs: Any, progress: bool) -> torch.Tensor:
        data = self.train_dataloader if inputs is None else _inputs(inputs, "self_influence")
        options = {"loss_fn": self._train_loss(), "progress": bool(progress), **self._selection()}
        return tc.self_influence(self.model, self._checkpoints, data, **options)


class TracInCP(_TracInBase):
    """TracIn over all parameters, or those of ``layers``: Captum's ``TracInCP`` computed by tracin_func.

    ``score[i, j] = sum_c lr_c <grad test_loss(test_i; theta_c), grad loss(train_j; theta_c)>``, exact, with
    Captum's per-example losses: the sum over an example's loss elements for ``reduction="none"`` / ``"sum"``, their
    mean for ``"mean"``, the sum of the model's outputs for ``loss_fn=None``. See the module docstring for the
    differences from Captum.

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

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from tracin_func.compat.captum import TracInCP
        >>> model, x, y = torch.nn.Linear(4, 3), torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> def load(model, state):  # Captum's contract: load into `model`, return the learning rate
        ...     model.load_state_dict(state)
        ...     return 0.1
        >>> tracin = TracInCP(model, TensorDataset(x, y), [model.state_dict()], load,
        ...                   loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=4)
        >>> tracin.influence((x[:2], y[:2])).shape
        torch.Size([2, 10])
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
        self.sample_wise_grads_per_batch = sample_wise_grads_per_batch
        self._load()

    def _selection(self) -> dict[str, Any]:
        return {"layers": self.layers}

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

        Example:
            >>> import torch
            >>> from torch.utils.data import TensorDataset
            >>> from tracin_func.compat.captum import TracInCP
            >>> model, x, y = torch.nn.Linear(4, 3), torch.randn(10, 4), torch.randn(10, 3)
            >>> def load(model, state):
            ...     model.load_state_dict(state)
            ...     return 0.1
            >>> tracin = TracInCP(model, TensorDataset(x, y), [model.state_dict()], load,
            ...                   loss_fn=torch.nn.MSELoss(reduction="none"), batch_size=4)
            >>> top = tracin.influence((x[:2], y[:2]), k=3, proponents=False)
            >>> top.indices.shape, bool((top.influence_scores[:, 1:] >= top.influence_scores[:, :-1]).all())
            (torch.Size([2, 3]), True)
        """
        return self._scores(inputs, k, proponents, show_progress, aggregate, "influence")

    def self_influence(
        self, inputs: Inputs | None = None, show_progress: bool = False, outer_loop_by_checkpoints: bool = False
    ) -> torch.Tensor:
        """Self-influence ``sum_c lr_c |grad loss(z; theta_c)|^2`` of the examples of ``inputs`` (with ``loss_fn``).

        Args:
            inputs: one batch or a ``DataLoader``; ``None`` scores ``train_dataset``.
            show_progress: tqdm progress bars.
            outer_loop_by_checkpoints: accepted for compatibility; the numbers do not depend on it.

        Returns:
            ``[n]`` float tensor.

        Example:
            >>> import torch
            >>> from torch.utils.data import TensorDataset
            >>> from tracin_func.compat.captum import TracInCP
            >>> model, x, y = torch.nn.Linear(4, 3), torch.randn(10, 4), torch.randn(10, 3)
            >>> def load(model, state):
            ...     model.load_state_dict(state)
            ...     return 0.1
            >>> tracin = TracInCP(model, TensorDataset(x, y), [model.state_dict()], load,
            ...                   loss_fn=torch.nn.MSELoss(reduction="sum"), batch_size=4)
            >>> tracin.self_influence().shape
            torch.Size([10])
        """
        del outer_loop_by_checkpoints  # checkpoints are in memory: the loop order changes nothing
        return self._self(inputs, show_progress)

    def compute_intermediate_quantities(self, inputs: Inputs, aggregate: bool = False) -> torch.Tensor:
        """Embeddings ``cat_c sqrt(lr_c) * grad loss(z; theta_c)`` (with ``loss_fn``): ``IQ(test) @ IQ(train).T``
        equals ``influence(test)`` when ``test_loss_fn`` is ``loss_fn``.

        Args:
            inputs: one batch or a ``DataLoader``.
            aggregate: return the sum of the rows, computed batch by batch.

        Returns:
            ``[n, C * P]`` float tensor (``[1, C * P]`` aggregated) for C checkpoints and P differentiated
            parameters, laid out per checkpoint in parameter order.

        Example:
            >>> import torch
            >>> from torch.utils.data import TensorDataset
            >>> from tracin_func.compat.captum import TracInCP
            >>> model, x, y = torch.nn.Linear(4, 3), torch.randn(10, 4), torch.randn(10, 3)
            >>> def load(model, state):
            ...     model.load_state_dict(state)
            ...     return 0.1
            >>> tracin = TracInCP(model, TensorDataset(x, y), [model.state_dict()], load,
            ...                   loss_fn=torch.nn.MSELoss(reduction="none"), batch_size=4)
            >>> test = (x[:2], y[:2])
            >>> iq = tracin.compute_intermediate_quantities(test) @ tracin.compute_intermediate_quantities((x, y)).T
            >>> torch.allclose(iq, tracin.influence(test), atol=1e-5)
            True
        """
        data = _inputs(inputs, "compute_intermediate_quantities")
        loss = self._train_loss()
        if not aggregate:
            return tc.embeddings(self.model, self._checkpoints, data, loss_fn=loss, **self._selection())
        total = None
        for batch in data:  # one batch at a time: memory O(P * C), not O(n * P * C)
            rows = tc.embeddings(self.model, self._checkpoints, [batch], loss_fn=loss, **self._selection())
            total = rows.sum(0, keepdim=True) if total is None else total + rows.sum(0, keepdim=True)
        if total is None:
            raise ValueError("`inputs` holds no examples.")
        return total


class TracInCPFast(_TracInBase):
    """Exact TracIn restricted to the weight and bias of ``final_fc_layer``: Captum's ``TracInCPFast``, corrected.

    Captum's version drops the bias and differentiates the loss w.r.t. the model output, so it equals TracIn on the
    layer only for a bias-free final layer whose output is the model output; this one is exact whatever follows
    the layer (factored inner products from the layer's inputs and output gradients, no per-example gradient
    formed). Arguments as :class:`TracInCP`, with ``final_fc_layer`` (a module of ``model`` or its dotted name)
    instead of ``layers``; ``vectorize`` is accepted and ignored.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from tracin_func.compat.captum import TracInCPFast
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> def load(model, state):
        ...     model.load_state_dict(state)
        ...     return 0.1
        >>> fast = TracInCPFast(model, model[2], TensorDataset(x, y), [model.state_dict()], load,
        ...                     loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=4)
        >>> fast.influence((x[:2], y[:2])).shape
        torch.Size([2, 10])
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
        self.final_fc_layer: nn.Module = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        self._params = [prefix + n for n, _ in self.final_fc_layer.named_parameters()]
        if not self._params:
            raise ValueError(f"`final_fc_layer` {name!r} has no parameters.")
        self.vectorize = vectorize
        self._load()

    def _selection(self) -> dict[str, Any]:
        return {"params": self._params, "factored": True}

    def influence(
        self,
        inputs: Inputs,
        k: int | None = None,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> torch.Tensor | KMostInfluentialResults:
        """Influence scores on ``inputs``, or the ``k`` most influential training examples (as ``TracInCP``).

        Example:
            >>> import torch
            >>> from torch.utils.data import TensorDataset
            >>> from tracin_func.compat.captum import TracInCPFast
            >>> model, x, y = torch.nn.Linear(4, 3), torch.randn(10, 4), torch.randint(0, 3, (10,))
            >>> def load(model, state):
            ...     model.load_state_dict(state)
            ...     return 0.1
            >>> fast = TracInCPFast(model, model, TensorDataset(x, y), [model.state_dict()], load,
            ...                     loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=4)
            >>> fast.influence((x[:2], y[:2]), k=3).indices.shape
            torch.Size([2, 3])
        """
        return self._scores(inputs, k, proponents, show_progress, aggregate, "influence")

    def self_influence(
        self, inputs: Inputs | None = None, show_progress: bool = False, outer_loop_by_checkpoints: bool = False
    ) -> torch.Tensor:
        """Self-influence on the layer's parameters of the examples of ``inputs`` (``None``: the training data).

        Example:
            >>> import torch
            >>> from torch.utils.data import TensorDataset
            >>> from tracin_func.compat.captum import TracInCPFast
            >>> model, x, y = torch.nn.Linear(4, 3), torch.randn(10, 4), torch.randint(0, 3, (10,))
            >>> def load(model, state):
            ...     model.load_state_dict(state)
            ...     return 0.1
            >>> fast = TracInCPFast(model, model, TensorDataset(x, y), [model.state_dict()], load,
            ...                     loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=4)
            >>> fast.self_influence().shape
            torch.Size([10])
        """
        del outer_loop_by_checkpoints  # checkpoints are in memory: the loop order changes nothing
        return self._self(inputs, show_progress)


class TracInCPFastRandProj(TracInCPFast):
    """Last-layer TracIn through stored training embeddings, for fast repeated queries: Captum's
    ``TracInCPFastRandProj``, exact unless projected.

    At construction, every training example is embedded as ``cat_c sqrt(lr_c) * grad loss(z; theta_c)`` over the
    weight and bias of ``final_fc_layer`` (with ``loss_fn``), projected to ``projection_dim`` columns per
    checkpoint by seeded random matrices when ``projection_dim`` is below the layer's parameter count. A query
    embeds the test batch the same way (with ``test_loss_fn``) and takes dot products. Without projection the
    scores equal :class:`TracInCPFast`'s. Proponents / opponents come from an exact search, or from
    ``nearest_neighbors`` (an object with Captum's ``setup(data)`` / ``get_nearest_neighbors(query, k)``) when
    given. Arguments as :class:`TracInCPFast`, plus ``nearest_neighbors``, ``projection_dim`` and ``seed``.

    Attributes:
        src_intermediate_quantities: ``[n_train, C * D]`` training embeddings (Captum's name).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from tracin_func.compat.captum import TracInCPFastRandProj
        >>> model, x, y = torch.nn.Linear(4, 3), torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> def load(model, state):
        ...     model.load_state_dict(state)
        ...     return 0.1
        >>> proj = TracInCPFastRandProj(model, model, TensorDataset(x, y), [model.state_dict()], load,
        ...                             loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=4)
        >>> proj.influence((x[:2], y[:2])).indices.shape  # Captum's default: k=5 proponents
        torch.Size([2, 5])
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
            positive_int(projection_dim, "projection_dim")
        seed_value(seed)
        if nearest_neighbors is not None and not all(
            callable(getattr(nearest_neighbors, m, None)) for m in ("setup", "get_nearest_neighbors")
        ):
            raise TypeError(
                "`nearest_neighbors` must have Captum's NearestNeighbors methods `setup(data)` and "
                "`get_nearest_neighbors(query, k)`, or be None for an exact search."
            )
        super().__init__(
            model,
            final_fc_layer,
            train_dataset,
            checkpoints,
            checkpoints_load_func,
            loss_fn,
            batch_size,
            test_loss_fn,
            vectorize,
        )
        self.nearest_neighbors = nearest_neighbors
        self.projection_dim = projection_dim
        self.seed = seed
        n_params = sum(p.numel() for p in self.final_fc_layer.parameters())
        self._projection = projection_dim if projection_dim is not None and projection_dim < n_params else None
        self.src_intermediate_quantities = self._embed(self.train_dataloader, self._train_loss())
        if nearest_neighbors is not None:
            nearest_neighbors.setup(self.src_intermediate_quantities)

    def _embed(self, data: Any, loss_fn: Any) -> torch.Tensor:
        return tc.embeddings(
            self.model,
            self._checkpoints,
            data,
            loss_fn=loss_fn,
            projection_dim=self._projection,
            seed=self.seed,
            **self._selection(),
        )

    def influence(  # type: ignore[override]
        self, inputs: Inputs, k: int | None = 5, proponents: bool = True
    ) -> torch.Tensor | KMostInfluentialResults:
        """Scores from the stored embeddings (``k=None``), or the ``k`` strongest proponents / opponents (Captum's
        default ``k=5``).

        Returns:
            ``[n_test, n_train]`` scores, or ``KMostInfluentialResults`` of ``[n_test, k]`` tensors sorted by score.

        Example:
            >>> import torch
            >>> from torch.utils.data import TensorDataset
            >>> from tracin_func.compat.captum import TracInCPFastRandProj
            >>> model, x, y = torch.nn.Linear(4, 3), torch.randn(10, 4), torch.randint(0, 3, (10,))
            >>> def load(model, state):
            ...     model.load_state_dict(state)
            ...     return 0.1
            >>> proj = TracInCPFastRandProj(model, model, TensorDataset(x, y), [model.state_dict()], load,
            ...                             loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), projection_dim=4)
            >>> proj.src_intermediate_quantities.shape, proj.influence((x[:2], y[:2]), k=None).shape
            (torch.Size([10, 4]), torch.Size([2, 10]))
        """
        test = self._embed(_inputs(inputs, "influence"), self._test_loss())
        train = self.src_intermediate_quantities
        if k is None:
            return test @ train.T
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int (or None for all scores), got {k!r}.")
        k = min(k, train.shape[0])
        if self.nearest_neighbors is None:
            top = tc.top_k_embeddings(test, train, k=k, proponents=bool(proponents))
            return KMostInfluentialResults(top.indices, top.scores)
        sign = 1 if proponents else -1
        indices, scores = self.nearest_neighbors.get_nearest_neighbors(test * sign, k)
        return KMostInfluentialResults(
            torch.as_tensor(indices, device=test.device).long(), torch.as_tensor(scores, device=test.device) * sign
        )

    def compute_intermediate_quantities(self, inputs: Inputs) -> torch.Tensor:
        """Embeddings of ``inputs`` with ``loss_fn``, as stored for the training data (``[n, C * D]``).

        Example:
            >>> import torch
            >>> from torch.utils.data import TensorDataset
            >>> from tracin_func.compat.captum import TracInCPFastRandProj
            >>> model, x, y = torch.nn.Linear(4, 3), torch.randn(10, 4), torch.randint(0, 3, (10,))
            >>> def load(model, state):
            ...     model.load_state_dict(state)
            ...     return 0.1
            >>> proj = TracInCPFastRandProj(model, model, TensorDataset(x, y), [model.state_dict()], load,
            ...                             loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=4)
            >>> torch.allclose(proj.compute_intermediate_quantities((x, y)), proj.src_intermediate_quantities)
            True
        """
        return self._embed(_inputs(inputs, "compute_intermediate_quantities"), self._train_loss())
