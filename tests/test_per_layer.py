"""Per-layer scores (``per_layer=True``) against the float64 loop reference restricted to each layer's parameters.

The reference slices the columns of :func:`tests.reference.reference_grads` (every differentiated parameter,
flattened in the model's order) by layer, a layer being the parameter name without its last component (the key
itself for a pure function's undotted keys): ``S_layer = sum_c lr_c G_test_c[:, cols] @ G_train_c[:, cols].T``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings

import pytest
import torch
from torch import nn

import tracin_func as tc
from tests.conftest import assert_close
from tests.models import TASKS, Task, cnn_task, mlp_task, random_checkpoints, transformer_task
from tests.reference import reference_grads
from tracin_func._representations import Factored, TokenRows

MODULE_TASKS = [n for n in TASKS if n != "function"]


@contextlib.contextmanager
def _quiet(name: str):
    """The GRU (and, depending on the torch version, the LSTM) fall back to a per-example loop with a warning."""
    with warnings.catch_warnings():
        if name in ("gru", "lstm"):
            warnings.filterwarnings("ignore", message="torch.func.vmap failed", category=RuntimeWarning)
        yield


def expected_layer(name: str, module: bool) -> str:
    owner, dot, _ = name.rpartition(".")
    return owner if dot or module else name


def layer_columns(task: Task, params=None) -> dict[str, list[int]]:
    """Column indices of each layer in ``reference_grads``'s layout, layers in the order of their first parameter."""
    if isinstance(task.model, nn.Module):
        shapes = {n: p.shape for n, p in task.model.named_parameters() if p.requires_grad}
    else:
        shapes = {n: t.shape for n, t in task.checkpoints[0].params.items() if t.is_floating_point()}
    names = list(shapes) if params is None else list(params)
    columns: dict[str, list[int]] = {}
    start = 0
    for n in names:
        size = math.prod(shapes[n])
        columns.setdefault(expected_layer(n, isinstance(task.model, nn.Module)), []).extend(range(start, start + size))
        start += size
    return columns


class LayerReference:
    """Per-layer float64 influence ``{layer: [n_test, n_train]}`` and self-influence ``{layer: [n_train]}``, plus
    the per-example gradient norms over all layers per checkpoint (for renormalised shares)."""

    def __init__(self, task: Task, params=None) -> None:
        cols = layer_columns(task, params)
        self.influence = {layer: 0 for layer in cols}
        self.self_influence = {layer: 0 for layer in cols}
        self.cosine = {layer: 0 for layer in cols}
        self.train = {layer: 0 for layer in cols}
        for ckpt in task.checkpoints:
            lr = float(ckpt.lr)
            g_train = reference_grads(task.model, ckpt, task.train, task.loss_fn, params)
            g_test = reference_grads(task.model, ckpt, task.test, task.loss_fn, params)
            norms = g_test.norm(dim=1)[:, None] * g_train.norm(dim=1)[None, :]
            for layer, c in cols.items():
                dots = g_test[:, c] @ g_train[:, c].T
                self.influence[layer] = self.influence[layer] + lr * dots
                self.self_influence[layer] = self.self_influence[layer] + lr * g_train[:, c].square().sum(1)
                self.cosine[layer] = self.cosine[layer] + lr * dots / norms
                self.train[layer] = self.train[layer] + lr * dots / g_train.norm(dim=1)[None, :]


@functools.cache
def task_and_reference(name: str) -> tuple[Task, LayerReference]:
    task = TASKS[name]()
    return task, LayerReference(task)


def _check_layers(parts: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], total: torch.Tensor) -> None:
    assert isinstance(parts, dict)
    assert list(parts) == list(expected)  # the same layers, in the order of their first parameter
    for layer, value in parts.items():
        assert value.shape == total.shape and value.dtype == total.dtype
        assert_close(value, expected[layer], msg=f"layer {layer!r}")
    assert_close(sum(parts.values()), total, 1e-12)  # the shares sum to the total (per_layer=False)


@pytest.mark.parametrize("factored", [None, True, False])
@pytest.mark.parametrize("name", list(TASKS))
def test_influence_per_layer_matches_the_reference(name, factored):
    if name == "function" and factored is not None:
        pytest.skip("a pure function has no layers to factor")
    task, ref = task_and_reference(name)
    kw = {"loss_fn": task.loss_fn, "factored": factored, "batch_size": 3}  # several test and training batches
    with _quiet(name):
        parts = tc.influence(task.model, task.checkpoints, task.train, task.test, per_layer=True, **kw)
        total = tc.influence(task.model, task.checkpoints, task.train, task.test, **kw)
    _check_layers(parts, ref.influence, total)
    assert len(parts) > 1


@pytest.mark.parametrize("factored", [None, True, False])
@pytest.mark.parametrize("name", list(TASKS))
def test_self_influence_per_layer_matches_the_reference(name, factored):
    if name == "function" and factored is not None:
        pytest.skip("a pure function has no layers to factor")
    task, ref = task_and_reference(name)
    kw = {"loss_fn": task.loss_fn, "factored": factored, "batch_size": 4}
    with _quiet(name):
        parts = tc.self_influence(task.model, task.checkpoints, task.train, per_layer=True, **kw)
        total = tc.self_influence(task.model, task.checkpoints, task.train, **kw)
    _check_layers(parts, ref.self_influence, total)


def test_layer_names_are_the_owning_modules():
    task, _ = task_and_reference("transformer")
    parts = tc.self_influence(task.model, task.checkpoints, task.train, loss_fn=task.loss_fn, per_layer=True)
    assert list(parts) == [
        "emb",
        "norm",
        "encoder.self_attn",  # in_proj_weight / in_proj_bias are the attention module's own parameters
        "encoder.self_attn.out_proj",
        "encoder.linear1",
        "encoder.linear2",
        "encoder.norm1",
        "encoder.norm2",
        "fc",
    ]


def test_a_pure_functions_undotted_keys_are_layers_of_their_own():
    task, _ = task_and_reference("function")
    parts = tc.self_influence(task.model, task.checkpoints, task.train, loss_fn=task.loss_fn, per_layer=True)
    assert list(parts) == ["w1", "b1", "w2", "b2"]


def test_dotted_keys_of_a_pure_function_group_by_prefix():
    base = TASKS["function"]()
    rename = {"w1": "fc1.w", "b1": "fc1.b", "w2": "fc2.w", "b2": "fc2.b"}

    def model(params, x):
        return base.model({k: params[v] for k, v in rename.items()}, x)

    ckpts = [tc.Checkpoint({rename[k]: v for k, v in c.params.items()}, c.lr) for c in base.checkpoints]
    task = Task("dotted", model, ckpts, base.train, base.test, base.loss_fn)
    ref = LayerReference(task)
    parts = tc.influence(model, ckpts, task.train, task.test, loss_fn=task.loss_fn, per_layer=True)
    _check_layers(parts, ref.influence, tc.influence(model, ckpts, task.train, task.test, loss_fn=task.loss_fn))
    assert list(parts) == ["fc1", "fc2"]


def test_parameters_of_the_root_module_are_keyed_by_the_empty_name():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.scale * self.fc(x)

    base = mlp_task()
    model = Scaled().double().eval()
    gen = torch.Generator().manual_seed(3)
    state = model.state_dict()
    ckpts = [
        tc.Checkpoint({k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in state.items()}, lr)
        for lr in (0.5, 2.0)
    ]
    task = Task("scaled", model, ckpts, base.train, base.test, base.loss_fn)
    ref = LayerReference(task)
    for factored in (None, True, False):
        kw = {"loss_fn": task.loss_fn, "factored": factored}
        parts = tc.influence(model, ckpts, task.train, task.test, per_layer=True, **kw)
        _check_layers(parts, ref.influence, tc.influence(model, ckpts, task.train, task.test, **kw))
        assert list(parts) == ["", "fc"]  # named_parameters() order: the root's own parameters come first


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_factored_layers_stay_factored(monkeypatch, name):
    """Each layer's share of a factored layer comes from its factors (no per-sample gradient formed)."""
    calls = []
    for cls in (Factored, TokenRows):
        original = cls.dot

        def counted(self, other, _original=original, _cls=cls):
            calls.append(_cls.__name__)
            return _original(self, other)

        monkeypatch.setattr(cls, "dot", counted)
    task, ref = task_and_reference(name)
    parts = tc.influence(task.model, task.checkpoints, task.train, task.test, loss_fn=task.loss_fn, factored=True,
                         per_layer=True)
    for layer, value in parts.items():
        assert_close(value, ref.influence[layer])
    assert "Factored" in calls or "TokenRows" in calls
    if name == "transformer":
        assert "TokenRows" in calls  # the Embedding's test side: token rows matched by id


@pytest.mark.parametrize("normalize", ["cosine", "train"])
@pytest.mark.parametrize("factored", [None, True, False])
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_renormalised_shares_sum_to_the_renormalised_score(name, factored, normalize):
    """A layer's share is its inner product over the norms of the whole gradients."""
    task, ref = task_and_reference(name)
    kw = {"loss_fn": task.loss_fn, "factored": factored, "normalize": normalize, "batch_size": 3}
    parts = tc.influence(task.model, task.checkpoints, task.train, task.test, per_layer=True, **kw)
    total = tc.influence(task.model, task.checkpoints, task.train, task.test, **kw)
    _check_layers(parts, ref.cosine if normalize == "cosine" else ref.train, total)


@pytest.mark.parametrize("normalize", [None, "cosine"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_aggregate_per_layer_is_the_sum_over_test_examples(name, normalize):
    task, ref = task_and_reference(name)
    expected = ref.cosine if normalize else ref.influence
    for factored in (None, False):
        kw = {"loss_fn": task.loss_fn, "factored": factored, "normalize": normalize, "batch_size": 3}
        parts = tc.influence(task.model, task.checkpoints, task.train, task.test, aggregate=True, per_layer=True,
                             **kw)
        total = tc.influence(task.model, task.checkpoints, task.train, task.test, aggregate=True, **kw)
        _check_layers(parts, {k: v.sum(0, keepdim=True) for k, v in expected.items()}, total)


def test_selected_parameters_and_the_last_layer():
    task = cnn_task()
    ref = LayerReference(task, params=["conv.bias", "fc.weight"])
    parts = tc.influence(task.model, task.checkpoints, task.train, task.test, loss_fn=task.loss_fn, per_layer=True,
                         params=["conv.bias", "fc.weight"])
    _check_layers(parts, ref.influence, sum(ref.influence.values()))
    last = tc.influence(task.model, task.checkpoints, task.train, task.test, loss_fn=task.loss_fn, per_layer=True,
                        method="last_layer")
    assert list(last) == ["fc"]
    assert_close(last["fc"], task_and_reference("cnn")[1].influence["fc"])


def test_self_influence_is_the_diagonal_per_layer():
    task = transformer_task()
    parts = tc.influence(task.model, task.checkpoints, task.train, task.train, loss_fn=task.loss_fn, per_layer=True)
    diag = tc.self_influence(task.model, task.checkpoints, task.train, loss_fn=task.loss_fn, per_layer=True)
    assert list(parts) == list(diag)
    for layer in parts:
        assert_close(diag[layer], parts[layer].diagonal(), 1e-12)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_per_layer_must_be_a_bool(value):
    task = mlp_task()
    with pytest.raises(TypeError, match=r"`per_layer` must be True or False, got"):
        tc.influence(task.model, task.checkpoints, task.train, task.test, loss_fn=task.loss_fn, per_layer=value)
    with pytest.raises(TypeError, match=r"`per_layer` must be True or False, got"):
        tc.self_influence(task.model, task.checkpoints, task.train, loss_fn=task.loss_fn, per_layer=value)


def test_top_k_and_embeddings_take_no_per_layer():
    task = mlp_task()
    with pytest.raises(TypeError, match="per_layer"):
        tc.top_k(task.model, task.checkpoints, task.train, task.test, k=2, loss_fn=task.loss_fn, per_layer=True)
    with pytest.raises(TypeError, match="per_layer"):
        tc.embeddings(task.model, task.checkpoints, task.train, loss_fn=task.loss_fn, per_layer=True)


@pytest.mark.parametrize("factored", [None, False])
def test_a_parametrized_weights_tensors_and_its_layers_bias_are_layers_of_their_own(factored):
    """``fc.parametrizations.weight.original*`` belong to ``fc.parametrizations.weight``, ``fc.bias`` to ``fc``: a
    site holding both is split by name (found by review: the bias's share went to the parametrization's, 18-220%
    off, silently, with the sum of the shares still right)."""
    task = mlp_task()
    model = copy.deepcopy(task.model)
    torch.nn.utils.parametrizations.weight_norm(model.fc1)
    ckpts = random_checkpoints(model.state_dict(), 2)
    task = Task("weight_norm", model, ckpts, task.train, task.test, task.loss_fn)
    ref = LayerReference(task)
    assert list(ref.influence) == ["fc1", "fc1.parametrizations.weight", "fc2"]
    kw = {"loss_fn": task.loss_fn, "factored": factored, "batch_size": 3}
    parts = tc.influence(model, ckpts, task.train, task.test, per_layer=True, **kw)
    _check_layers(parts, ref.influence, tc.influence(model, ckpts, task.train, task.test, **kw))
    parts = tc.self_influence(model, ckpts, task.train, per_layer=True, **kw)
    _check_layers(parts, ref.self_influence, tc.self_influence(model, ckpts, task.train, **kw))
