"""Build an influence index of the digits training set, resume it after a kill, query it and rank by self-influence.

    python examples/index_digits.py --out out/index                           # one process
    torchrun --nproc_per_node 2 examples/index_digits.py --out out/index      # two processes (gloo on CPU)
    python examples/index_digits.py --out out/index --kill-after 3            # killed (SIGKILL) after 3 shards ...
    python examples/index_digits.py --out out/index                           # ... the same command resumes

Trains a small MLP on sklearn's digits with SGD (a checkpoint every 2 epochs), then ``tc.build_index`` writes every
training example's projected embedding and exact self-influence into ``--out/index`` in shards; under ``torchrun``
each rank builds its own shards. The query embeds a few test digits with the index's projection, streams the
shards for candidates, and re-ranks them with exact TracIn scores. Runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

import tracin_func as tc


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], lr: float) -> list[tc.Checkpoint]:
    """Plain SGD, a checkpoint (in memory) every 2 epochs."""
    x, y = data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    checkpoints = []
    for epoch in range(10):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        if epoch % 2 == 1:
            checkpoints.append(tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=lr))
    return checkpoints


def kill_after(directory: str, shards: int) -> None:
    """SIGKILL this process once ``shards`` shard files exist (to show that the same command then resumes)."""

    def watch() -> None:
        while True:
            if os.path.isdir(directory) and sum(n.endswith(".safetensors") for n in os.listdir(directory)) >= shards:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/index_digits")
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--kill-after", type=int, default=None, help="SIGKILL once this many shards exist")
    args = parser.parse_args()
    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    train_data, test_data = digits()
    checkpoints = train(model, train_data, lr=0.1)  # deterministic: every rank trains the same model
    model.eval()
    loss = nn.CrossEntropyLoss()
    path = os.path.join(args.out, "index")
    if args.kill_after:
        kill_after(path, args.kill_after)

    start = time.perf_counter()
    index = tc.build_index(
        path, model, checkpoints, train_data, loss_fn=loss, projection_dim=args.projection_dim,
        shard_size=args.shard_size, distributed=distributed, progress=rank == 0,
    )
    built = time.perf_counter() - start

    test = (test_data[0][:3], test_data[1][:3])
    top = tc.top_k(model, checkpoints, index, test, k=5, loss_fn=loss, rerank=train_data, distributed=distributed)
    self_influence = index.self_influence()
    if rank == 0:
        print(f"{index} ready in {built:.1f} s")
        for i in range(3):
            labels = train_data[1][top.indices[i]].tolist()
            print(f"test digit {i} (label {int(test[1][i])}): proponents {top.indices[i].tolist()} labels {labels}")
        print("most self-influential training digits:", self_influence.topk(10).indices.tolist())
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
