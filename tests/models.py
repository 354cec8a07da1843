"""Tiny reusable test models and tasks.

Each factory returns a :class:`Task`: a model (in eval mode, with its own random parameters that the checkpoints
do NOT share), two or three ``tc.Checkpoint`` with different random parameters and learning rates, a train batch,
a test batch and a loss. The float64 ground truth they are scored against is :mod:`tests.reference`.

Example:
    >>> task = mlp_task()
    >>> len(task.checkpoints), task.train[0].shape, task.test[0].shape
    (3, torch.Size([10, 4]), torch.Size([4, 4]))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import tracin_func as tc

DTYPE = torch.float64
LRS = (0.3, 0.05, 1.7)
N_TRAIN, N_TEST = 10, 4


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


class ComplexGain(nn.Module):
    """A complex gain on a signal's Fourier modes, held complex (``real=False``) or as a real ``[..., 2]`` tensor
    viewed as complex."""

    def __init__(self, real: bool):
        super().__init__()
        gain = torch.randn(5, 2, dtype=DTYPE)
        self.real = real
        self.gain = nn.Parameter(gain if real else torch.view_as_complex(gain))
        self.head = nn.Linear(8, 3).to(DTYPE)

    def forward(self, x):
        gain = torch.view_as_complex(self.gain) if self.real else self.gain
        return self.head(torch.fft.irfft(torch.fft.rfft(x) * gain, n=8))
