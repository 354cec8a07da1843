"""JAX-style training with torch.func, scored by TracIn straight from memory and traced inside the loop.

The parameters are a plain dict updated functionally (``params = {k: p - lr * g[k]}`` with ``torch.func.grad``):
no optimizer, no ``.backward()``, the module's own parameters are never touched. Every few steps the loop keeps
``tc.Checkpoint(params=params, lr=lr)``; the list is scored directly, without writing a file. Given test examples,
the loop also threads a TracIn tracer through every step (``tc.tracer``, planned once before the loop; its pure
``update`` returns a new state each step): TracIn's own definition, the sum over the steps actually taken, not an
approximation from a few checkpoints. ``train_torch_optim`` is the same
training written as a plain ``torch.optim`` loop, traced the same way.

Some training labels are flipped on purpose; self-influence should rank them first.

    python examples/functional_training.py
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call, grad

import tracin_func as tc


def make_model(n_features: int = 64, hidden: int = 32, n_classes: int = 10) -> nn.Module:
    """An MLP used only as a function shape for ``functional_call``."""
    return nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_classes)).eval()


def load_data(
    n_train: int = 1000, n_test: int = 100, *, n_flipped: int = 50, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """sklearn digits (pixels / 16), shuffled; ``n_flipped`` training labels replaced by another class.

    Returns ``(x_train, y_train), (x_test, y_test), flipped`` where ``flipped`` holds the indices of the flipped
    training examples.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits.target), generator=gen)[: n_train + n_test]
    x = torch.as_tensor(digits.data, dtype=dtype)[order] / 16
    y = torch.as_tensor(digits.target, dtype=torch.long)[order]
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train].clone(), x[n_train:], y[n_train:]
    flipped = torch.randperm(n_train, generator=gen)[:n_flipped]
    y_train[flipped] = (y_train[flipped] + torch.randint(1, 10, (n_flipped,), generator=gen)) % 10
    return (x_train, y_train), (x_test, y_test), flipped


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 0.5,
    decay: float = 0.97,
    checkpoint_every: int = 50,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], list[tc.Checkpoint], tc.TracerState | None]:
    """Minibatch SGD on a parameter dict with ``torch.func.grad``; returns the final parameters, the checkpoints and
    the tracer's state (``None`` without ``test``).

    The learning rate decays every epoch; each checkpoint carries the rate used in the steps after it, as TracIn
    expects. The initial parameters are a copy of the module's, which stay as they are. With ``test`` examples, each
    step also adds ``rate * <g(test_i), g(z_j)>`` at the step's parameters for the examples ``z_j`` of its batch to
    ``state.scores`` ``[n_test, n_train]`` (and ``rate * |g(z_j)|^2`` to ``state.self_influence``).
    """
    params = {k: v.detach().to(dtype).clone() for k, v in model.named_parameters()}

    def loss(params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, dict(params), (x,)), y)

    step_grad = grad(loss)
    x, y = data
    x = x.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    tracer, state = None, None
    if test is not None:  # planned once, on the test batch and the initial parameters: each update only computes
        tracer = tc.tracer(model, test, n_train=len(y), loss_fn=loss_fn, params=params, dtype=dtype)
        state = tracer.init()
    checkpoints, step = [], 0
    for epoch in range(epochs):
        rate = lr * decay**epoch
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            if step % checkpoint_every == 0:
                checkpoints.append(tc.Checkpoint(params=params, lr=rate))  # the dict is never mutated: no copy
            idx = order[start : start + batch_size]
            if tracer is not None:  # the parameters the step starts from, its rate, its batch and dataset indices
                state = tracer.update(state, params, rate, (x[idx], y[idx]), idx)
            g = step_grad(params, x[idx], y[idx])
            params = {k: p - rate * g[k] for k, p in params.items()}
            step += 1
    return params, checkpoints, state


def train_torch_optim(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 0.5,
    decay: float = 0.97,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, tc.TracerState]:
    """The same training as :func:`train` as an ordinary ``torch.optim`` loop on a copy of ``model``, traced.

    The tracer reads ``dict(model.named_parameters())`` before ``optimizer.step()`` (it detaches them and changes
    nothing) and the rate of the step from the optimizer. Same seed, same batches, same numbers as :func:`train`.
    """
    model = copy.deepcopy(model).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data
    x = x.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    tracer = tc.tracer(model, test, n_train=len(y), loss_fn=loss_fn, dtype=dtype)  # plans on the test batch, once
    state = tracer.init()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            rate = optimizer.param_groups[0]["lr"]
            state = tracer.update(state, dict(model.named_parameters()), rate, (x[idx], y[idx]), idx)
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
        scheduler.step()
    return model, state


def accuracy(model: nn.Module, params: Mapping[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = data
    with torch.no_grad():
        logits = functional_call(model, dict(params), (x.to(next(iter(params.values())).dtype),))
    return float((logits.argmax(1) == y).double().mean())


def main() -> None:
    torch.manual_seed(0)
    model = make_model()
    train_data, test_data, flipped = load_data()
    params, ckpts, traced = train(model, train_data, test=test_data)
    loss_fn = nn.CrossEntropyLoss()
    print(f"{len(ckpts)} in-memory checkpoints, test accuracy {accuracy(model, params, test_data):.3f}")

    self_scores = tc.self_influence(model, ckpts, train_data, loss_fn=loss_fn, batch_size=256)
    for name, scores in (("checkpoints", self_scores), ("every step (tracer)", traced.self_influence)):
        top = scores.topk(2 * len(flipped)).indices
        found = len(set(top.tolist()) & set(flipped.tolist()))
        print(f"flipped labels among the {len(top)} most self-influential examples, {name}: {found} / {len(flipped)}")
    checkpoint_scores = tc.influence(model, ckpts, train_data, test_data, loss_fn=loss_fn, batch_size=256)
    agree = torch.corrcoef(torch.stack([checkpoint_scores.flatten(), traced.scores.flatten()]))[0, 1]
    print(f"correlation of checkpoint TracIn ({len(ckpts)} checkpoints) with the traced scores: {float(agree):.3f}")

    proponents = tc.top_k(model, ckpts, train_data, test_data, k=3, loss_fn=loss_fn, batch_size=256)
    opponents = tc.top_k(model, ckpts, train_data, test_data, k=3, loss_fn=loss_fn, proponents=False)
    y_train = train_data[1]
    for i in range(3):
        print(
            f"test {i} (label {int(test_data[1][i])}): proponents {proponents.indices[i].tolist()} "
            f"(labels {y_train[proponents.indices[i]].tolist()}), opponents {opponents.indices[i].tolist()} "
            f"(labels {y_train[opponents.indices[i]].tolist()})"
        )


if __name__ == "__main__":
    main()
