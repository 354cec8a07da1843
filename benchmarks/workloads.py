"""The three reference workloads (the digits MLP and CNN and a tiny transformer): trained models and checkpoint files
on disk, as every benchmark here uses them.

Each builder trains a small model with fixed seeds, saves a checkpoint file every few epochs in the Captum tutorial
format ``{"model_state_dict": ..., "learning_rate": lr}`` (``torch.save``) into a temporary directory, and returns a
:class:`Workload`. The model is returned in eval mode holding the final weights; scorers only use its shape.

- ``digits_mlp``: Linear(64,128)-ReLU-Linear(128,128)-ReLU-Linear(128,10), sklearn digits (pixels / 16), first
  1500 examples train, next 100 test; SGD lr 0.1, batch 64, 10 epochs, a checkpoint every 2 epochs (5 files).
- ``digits_cnn``: Conv2d(1,16,3,pad 1)-ReLU-Conv2d(16,32,3,pad 1)-ReLU-Linear(2048,10) on 8x8 images; same data
  and training recipe.
- ``tiny_transformer``: Embedding(1000,64), 2 TransformerEncoderLayer(64, 4 heads, ff 128, dropout 0, batch_first),
  LayerNorm, mean over tokens, Linear(64,4) (131k parameters); synthetic tokens uniform over the vocabulary, label =
  sum of the first 4 tokens mod 4; 1000 train x 50 test, sequence length 32; SGD lr 0.05, batch 32, a checkpoint
  after each of 3 epochs.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Workload:
    """A trained model, its checkpoint files and its data."""

    name: str
    model: nn.Module
    checkpoint_paths: list[str]
    lr: float
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    loss_fn: nn.Module

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]

    @property
    def n_test(self) -> int:
        return self.x_test.shape[0]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test, self.y_test

    def subsample(self, n_test: int | None = None, n_train: int | None = None) -> Workload:
        """The first ``n_test`` test and ``n_train`` training examples (same model and checkpoints)."""
        return replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
        )

    def describe(self) -> str:
        return (
            f"{self.name}: {self.n_params:,} params, {len(self.checkpoint_paths)} checkpoints (lr {self.lr}), "
            f"{self.n_test} test x {self.n_train} train"
        )


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d_model: int = 64, n_heads: int = 4, d_ff: int = 128, n_classes: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.encoder(self.embedding(tokens))).mean(dim=1))


_TEMP_DIRS: list[str] = []


def _cleanup() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup)


def _checkpoint_dir(root: str | None, name: str) -> str:
    if root is not None:
        path = os.path.join(root, name)
        os.makedirs(path, exist_ok=True)
        return path
    path = tempfile.mkdtemp(prefix=f"tracin_bench_{name}_")
    _TEMP_DIRS.append(path)
    return path


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    batch_size: int,
    epochs: int,
    every: int,
    directory: str,
    seed: int,
) -> list[str]:
    """Plain SGD on cross-entropy with a seeded shuffle; save a checkpoint every ``every`` epochs."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    paths = []
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            criterion(model(x[idx]), y[idx]).backward()
            optimizer.step()
        if epoch % every == 0:
            path = os.path.join(directory, f"ckpt-{epoch}.pt")
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            torch.save({"model_state_dict": state, "learning_rate": lr}, path)
            paths.append(path)
    model.eval()
    return paths


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return x[:1500], y[:1500], x[1500:1600], y[1500:1600]


def _digits_workload(name: str, model_fn: Callable[[], nn.Module], image: bool, root: str | None, seed: int):
    x_train, y_train, x_test, y_test = _digits()
    if image:
        x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    torch.manual_seed(seed)
    model = model_fn()
    lr = 0.1
    paths = _train(
        model,
        x_train,
        y_train,
        lr=lr,
        batch_size=64,
        epochs=10,
        every=2,
        directory=_checkpoint_dir(root, name),
        seed=seed,
    )
    return Workload(name, model, paths, lr, x_train, y_train, x_test, y_test, nn.CrossEntropyLoss())


def digits_mlp(root: str | None = None, seed: int = 0) -> Workload:
    """MLP 64-128-128-10 on sklearn digits, 5 checkpoints."""
    return _digits_workload("digits_mlp", DigitsMLP, image=False, root=root, seed=seed)


def digits_cnn(root: str | None = None, seed: int = 0) -> Workload:
    """CNN (conv 1-16-32 pad 1, fc 2048->10) on 8x8 digits, 5 checkpoints."""
    return _digits_workload("digits_cnn", DigitsCNN, image=True, root=root, seed=seed)


def tiny_transformer(root: str | None = None, seed: int = 0) -> Workload:
    """2-layer transformer encoder classifier on synthetic tokens, 3 checkpoints, 50 test x 1000 train."""
    generator = torch.Generator().manual_seed(seed)
    vocab, seq_len, n_train, n_test = 1000, 32, 1000, 50
    tokens = torch.randint(0, vocab, (n_train + n_test, seq_len), generator=generator)
    labels = tokens[:, :4].sum(dim=1) % 4
    torch.manual_seed(seed)
    model = TinyTransformer(vocab=vocab)
    lr = 0.05
    paths = _train(
        model,
        tokens[:n_train],
        labels[:n_train],
        lr=lr,
        batch_size=32,
        epochs=3,
        every=1,
        directory=_checkpoint_dir(root, "tiny_transformer"),
        seed=seed,
    )
    return Workload(
        "tiny_transformer",
        model,
        paths,
        lr,
        tokens[:n_train],
        labels[:n_train],
        tokens[n_train:],
        labels[n_train:],
        nn.CrossEntropyLoss(),
    )


BUILDERS: dict[str, Callable[..., Workload]] = {
    "mlp": digits_mlp,
    "cnn": digits_cnn,
    "transformer": tiny_transformer,
}


if __name__ == "__main__":
    for build in BUILDERS.values():
        print(build().describe())
