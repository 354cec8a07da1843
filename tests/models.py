"""Tiny reusable test models and the ground truth every numeric path is checked against.

Each factory returns a :class:`Task`: a model (in eval mode, with its own random parameters that the checkpoints
do NOT share), two or three ``tc.Checkpoint`` with different random parameters and learning rates, a train batch,
a test batch and a loss. :func:`reference_scores` computes TracIn with a plain float64 for-loop, one
``torch.autograd.grad`` call per example per checkpoint, on a deep copy of the model loaded with each checkpoint:
no ``vmap``, no ``functional_call`` and no code of the library.

Example:
    >>> task = mlp_task()
    >>> ref = reference_scores(task.model, task.checkpoints, task.train, task.test, loss_fn=task.loss_fn)
    >>> ref.influence.shape, ref.self_influence.shape
    (torch.Size([4, 10]), torch.Size([10]))
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

import tracin_func as tc

DTYPE = torch.float64
LRS = (0.3, 0.05, 1.7)
N_TRAIN, N_TEST = 10, 4

Names = Union[Sequence[str], Callable[[str], bool], None]


@dataclass(frozen=True)
class Task:
    """A model, its checkpoints, one train and one test batch, and the loss to score them with."""

    name: str
    model: Any  # nn.Module in eval mode, or a pure function f(params, *inputs)
    checkpoints: list[tc.Checkpoint]
    train: Any  # one batch: (x1, ..., xk, y) or a dict
    test: Any
    loss_fn: Any


# ----------------------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Linear-tanh-Linear-tanh: biases everywhere and an activation after the last layer."""

    def __init__(self, d_in: int = 4, hidden: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc2(torch.tanh(self.fc1(x))))


class CNN(nn.Module):
    """Conv2d-ReLU-Linear on 1x6x6 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class TinyTransformer(nn.Module):
    """Embedding, LayerNorm, one encoder layer, mean over tokens, Linear; integer tokens in."""

    def __init__(self, vocab: int = 11, d_model: int = 8, n_classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.encoder = nn.TransformerEncoderLayer(d_model, 2, 16, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(self.norm(self.emb(tokens))).mean(1))


class Recurrent(nn.Module):
    """An nn.LSTM / nn.GRU over a sequence, Linear on the last output."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class TwoInputs(nn.Module):
    """Takes ``(x1, x2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x1) + self.b(x2)))


class WithBatchNorm(nn.Module):
    """Linear-BatchNorm1d-ReLU-Linear; scored in eval mode, so the running statistics are checkpoint buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class MultiOutput(nn.Module):
    """Linear with a ``[2, 3]`` output per example, for MSE losses with several elements per example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x)).view(-1, 2, 3)


def mlp_function(params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A pure-function model ``f(params, x)``: no nn.Module."""
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


# ----------------------------------------------------------------------------------------------------- factories


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_checkpoints(
    state: Mapping[str, torch.Tensor], n: int = 3, *, seed: int = 0, lrs: Sequence[float] = LRS
) -> list[tc.Checkpoint]:
    """``n`` checkpoints with the entries of ``state`` redrawn at random (variances stay positive)."""
    gen = _generator(1000 + seed)
    checkpoints = []
    for c in range(n):
        params = {}
        for name, t in state.items():
            if not t.is_floating_point():
                params[name] = t.detach().clone()
            elif name.endswith("running_var"):
                params[name] = torch.rand(t.shape, generator=gen, dtype=DTYPE).to(t.dtype) + 0.5
            else:
                params[name] = (0.6 * torch.randn(t.shape, generator=gen, dtype=DTYPE)).to(t.dtype)
        checkpoints.append(tc.Checkpoint(params=params, lr=lrs[c % len(lrs)]))
    return checkpoints


def _module_task(
    name: str,
    model: nn.Module,
    inputs: Callable[[torch.Generator, int], tuple],
    n_classes: int,
    seed: int,
    n_checkpoints: int = 3,
) -> Task:
    torch.manual_seed(seed)  # only the model's own (unused) initial parameters depend on the global seed
    model = model.to(DTYPE).eval()
    gen = _generator(seed)
    train = (*inputs(gen, N_TRAIN), torch.randint(0, n_classes, (N_TRAIN,), generator=gen))
    test = (*inputs(gen, N_TEST), torch.randint(0, n_classes, (N_TEST,), generator=gen))
    ckpts = random_checkpoints(model.state_dict(), n_checkpoints, seed=seed)
    return Task(name, model, ckpts, train, test, nn.CrossEntropyLoss())


def _gaussian(*shape: int) -> Callable[[torch.Generator, int], tuple]:
    return lambda gen, n: (torch.randn(n, *shape, generator=gen, dtype=DTYPE),)


def mlp_task(seed: int = 0) -> Task:
    return _module_task("mlp", MLP(), _gaussian(4), 3, seed)


def cnn_task(seed: int = 1) -> Task:
    return _module_task("cnn", CNN(), _gaussian(1, 6, 6), 3, seed, n_checkpoints=2)


def transformer_task(seed: int = 2) -> Task:
    tokens = lambda gen, n: (torch.randint(0, 11, (n, 5), generator=gen),)  # noqa: E731
    return _module_task("transformer", TinyTransformer(), tokens, 3, seed, n_checkpoints=2)


def lstm_task(seed: int = 3) -> Task:
    return _module_task("lstm", Recurrent(nn.LSTM), _gaussian(4, 3), 2, seed, n_checkpoints=2)


def gru_task(seed: int = 4) -> Task:
    return _module_task("gru", Recurrent(nn.GRU), _gaussian(4, 3), 2, seed, n_checkpoints=2)


def two_inputs_task(seed: int = 5) -> Task:
    two = lambda gen, n: (  # noqa: E731
        torch.randn(n, 3, generator=gen, dtype=DTYPE),
        torch.randn(n, 2, generator=gen, dtype=DTYPE),
    )
    return _module_task("two_inputs", TwoInputs(), two, 2, seed)


def batchnorm_task(seed: int = 6) -> Task:
    return _module_task("batchnorm", WithBatchNorm(), _gaussian(4), 3, seed)


def function_task(seed: int = 7) -> Task:
    gen = _generator(seed)
    shapes = {"w1": (4, 6), "b1": (6,), "w2": (6, 3), "b2": (3,)}
    state = {k: torch.zeros(s, dtype=DTYPE) for k, s in shapes.items()}
    train = (torch.randn(N_TRAIN, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (N_TRAIN,), generator=gen))
    test = (torch.randn(N_TEST, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (N_TEST,), generator=gen))
    return Task("function", mlp_function, random_checkpoints(state, seed=seed), train, test, nn.CrossEntropyLoss())


def dict_batch_task(seed: int = 8) -> Task:
    """Hugging Face style batches ``{"x": ..., "labels": ...}`` scored with ``tc.ExampleLoss``."""
    torch.manual_seed(seed)
    model = MLP().to(DTYPE).eval()

    def loss(params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = torch.func.functional_call(model, dict(params), (batch["x"],))
        return nn.functional.cross_entropy(logits, batch["labels"]) + 0.1 * logits.square().sum()

    gen = _generator(seed)
    train = {
        "x": torch.randn(N_TRAIN, 4, generator=gen, dtype=DTYPE),
        "labels": torch.randint(0, 3, (N_TRAIN,), generator=gen),
    }
    test = {
        "x": torch.randn(N_TEST, 4, generator=gen, dtype=DTYPE),
        "labels": torch.randint(0, 3, (N_TEST,), generator=gen),
    }
    return Task(
        "dict_batch", model, random_checkpoints(model.state_dict(), seed=seed), train, test, tc.ExampleLoss(loss)
    )


def multi_output_task(seed: int = 9, reduction: str = "sum") -> Task:
    """MSE on a ``[2, 3]`` output per example (6 elements), with the given ``reduction``."""
    torch.manual_seed(seed)
    model = MultiOutput().to(DTYPE).eval()
    gen = _generator(seed)
    train = (
        torch.randn(N_TRAIN, 4, generator=gen, dtype=DTYPE),
        torch.randn(N_TRAIN, 2, 3, generator=gen, dtype=DTYPE),
    )
    test = (torch.randn(N_TEST, 4, generator=gen, dtype=DTYPE), torch.randn(N_TEST, 2, 3, generator=gen, dtype=DTYPE))
    ckpts = random_checkpoints(model.state_dict(), seed=seed)
    return Task(f"mse_{reduction}", model, ckpts, train, test, nn.MSELoss(reduction=reduction))


TASKS: dict[str, Callable[[], Task]] = {
    "mlp": mlp_task,
    "cnn": cnn_task,
    "transformer": transformer_task,
    "lstm": lstm_task,
    "gru": gru_task,
    "two_inputs": two_inputs_task,
    "batchnorm": batchnorm_task,
    "function": function_task,
    "dict_batch": dict_batch_task,
}


def cast_task(task: Task, dtype: torch.dtype) -> Task:
    """The same task with the model, checkpoints and floating inputs in ``dtype`` (values rounded once)."""

    def cast(t: Any) -> Any:
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def cast_batch(batch: Any) -> Any:
        return {k: cast(v) for k, v in batch.items()} if isinstance(batch, Mapping) else tuple(map(cast, batch))

    model = copy.deepcopy(task.model).to(dtype) if isinstance(task.model, nn.Module) else task.model
    ckpts = [tc.Checkpoint(params={k: cast(v) for k, v in c.params.items()}, lr=c.lr) for c in task.checkpoints]
    return Task(task.name, model, ckpts, cast_batch(task.train), cast_batch(task.test), task.loss_fn)


# ----------------------------------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class Reference:
    """Ground-truth TracIn quantities, all float64."""

    influence: torch.Tensor  # [n_test, n_train]
    self_influence: torch.Tensor  # [n_train]
    train_embeddings: torch.Tensor  # [n_train, C * P]
    test_embeddings: torch.Tensor  # [n_test, C * P]


def _num_examples(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return first.shape[0]


def _example(batch: Any, i: int) -> Any:
    """Example ``i`` as a batch of one, floating tensors in float64."""

    def take(t: torch.Tensor) -> torch.Tensor:
        t = t[i : i + 1]
        return t.to(DTYPE) if t.is_floating_point() else t

    return {k: take(v) for k, v in batch.items()} if isinstance(batch, Mapping) else tuple(map(take, batch))


def _criterion_loss(loss_fn: Any, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Captum's per-example loss: ``"none"`` / ``"sum"`` sum the example's elements, ``"mean"`` averages them."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None:  # a plain function: whatever it reduces to
        return loss_fn(outputs, target).sum()
    elementwise = copy.copy(loss_fn)
    elementwise.reduction = "none"
    values = elementwise(outputs, target)
    return values.mean() if reduction == "mean" else values.sum()


def _selected(available: Sequence[str], default: Sequence[str], params: Names) -> list[str]:
    if params is None:
        return list(default)
    if callable(params):
        return [n for n in available if params(n)]
    return list(params)


def _state_of(model: Any, ckpt: tc.Checkpoint, params: Names) -> tuple[dict[str, torch.Tensor], list[str], Callable]:
    """Checkpoint tensors in float64 (the selected ones require grad), their selected names, and ``forward``."""
    if isinstance(model, nn.Module):
        module = copy.deepcopy(model).to(DTYPE)
        module.load_state_dict(
            {k: v.detach().to(DTYPE) if v.is_floating_point() else v for k, v in ckpt.params.items()}
        )
        module.requires_grad_(False)
        named = dict(module.named_parameters())
        default = [n for n, p in model.named_parameters() if p.requires_grad]
        names = _selected(list(named), default, params)
        for n in names:
            named[n].requires_grad_(True)
        return module.state_dict(keep_vars=True), names, lambda state, *inputs: module(*inputs)
    floating = [k for k, v in ckpt.params.items() if v.is_floating_point()]
    names = _selected(list(ckpt.params), floating, params)
    state = {
        k: v.detach().to(DTYPE).requires_grad_(k in names) if v.is_floating_point() else v
        for k, v in ckpt.params.items()
    }
    return state, names, lambda state, *inputs: model(state, *inputs)


def reference_grads(model: Any, ckpt: tc.Checkpoint, data: Any, loss_fn: Any, params: Names = None) -> torch.Tensor:
    """``[n, P]`` float64 per-example gradients at ``ckpt``, one ``torch.autograd.grad`` call per example.

    Columns: the selected parameters flattened and concatenated in selection order (by default the model's
    ``named_parameters()`` order, or the checkpoint's key order for a pure function).
    """
    state, names, forward = _state_of(model, ckpt, params)
    leaves = [state[n] for n in names]
    rows = []
    for i in range(_num_examples(data)):
        example = _example(data, i)
        if isinstance(loss_fn, tc.ExampleLoss):
            loss = loss_fn.fn(state, example)
        else:
            *inputs, target = example
            loss = _criterion_loss(loss_fn, forward(state, *inputs), target)
        grads = torch.autograd.grad(loss, leaves)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def reference_scores(
    model: Any,
    checkpoints: Sequence[tc.Checkpoint],
    train: Any,
    test: Any = None,
    *,
    loss_fn: Any,
    test_loss_fn: Any = None,
    params: Names = None,
) -> Reference:
    """TracIn by the definition: ``S = sum_c lr_c G_test_c @ G_train_c.T``, ``self = sum_c lr_c |g|^2``,
    ``embeddings = cat_c sqrt(lr_c) g``. ``test`` defaults to ``train``; ``test_loss_fn`` to ``loss_fn``."""
    test = train if test is None else test
    test_loss_fn = loss_fn if test_loss_fn is None else test_loss_fn
    influence, self_influence, train_emb, test_emb = 0, 0, [], []
    for ckpt in checkpoints:
        lr = float(ckpt.lr)
        g_train = reference_grads(model, ckpt, train, loss_fn, params)
        g_test = reference_grads(model, ckpt, test, test_loss_fn, params)
        influence = influence + lr * g_test @ g_train.T
        self_influence = self_influence + lr * g_train.square().sum(1)
        train_emb.append(math.sqrt(lr) * g_train)
        test_emb.append(math.sqrt(lr) * g_test)
    return Reference(influence, self_influence, torch.cat(train_emb, 1), torch.cat(test_emb, 1))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10) -> None:
    """``max |actual - expected| <= rtol * max |expected|``, same shape (dtype may differ)."""
    assert isinstance(actual, torch.Tensor), type(actual)
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    scale = expected.abs().max().item()
    err = (actual.to(DTYPE) - expected.to(DTYPE)).abs().max().item()
    assert scale > 0, "degenerate reference (all zeros): the comparison would prove nothing"
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def assert_topk(top: tc.TopK, scores: torch.Tensor, k: int, *, largest: bool, rtol: float = 1e-10) -> None:
    """``top`` equals ``torch.topk(scores, k)``: scores equal; each index points at its score; indices equal
    wherever the reference has no near-tie."""
    ref_scores, ref_idx = torch.topk(scores, k, dim=1, largest=largest, sorted=True)
    assert top.indices.shape == top.scores.shape == (scores.shape[0], k)
    assert top.indices.dtype == torch.long
    assert_close(top.scores, ref_scores, rtol)
    assert_close(torch.gather(scores, 1, top.indices), ref_scores, rtol)
    for row in range(scores.shape[0]):
        assert len(set(top.indices[row].tolist())) == k, "duplicate indices"
    tol = 1e-8 * scores.abs().max()
    ordered = torch.sort(scores, dim=1, descending=largest).values
    for row in range(scores.shape[0]):
        for j in range(k):
            gaps = (ordered[row] - ordered[row, j]).abs()
            if int((gaps <= tol).sum()) == 1:  # no other score within tol: the index is determined
                assert int(top.indices[row, j]) == int(ref_idx[row, j]), (row, j)


class EmbedNormNet(nn.Module):
    """Embedding -> LayerNorm -> mean over tokens -> Linear. Token ids arrive as floats (Captum's batch-wise path
    clones the inputs and sets requires_grad on them, which integer tensors refuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.emb(tokens.long())).mean(1))
