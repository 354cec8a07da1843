"""Cost per step of TracIn inside the training loop (`tc.tracer_update`) relative to the training step itself.

Digits MLP and CNN of the reference workloads (final weights), one SGD step on a batch of 64 training examples,
100 test examples traced. Rows, each the best of ``--repeat`` runs, all measured in this process:

- training step: ``zero_grad``, forward / backward of the batch's mean loss, ``optimizer.step()`` (torch.optim SGD);
- tracer_update: one full call (validation, planning the call, test and batch gradients, scatter into the scores);
- of which planning: ``make_setup`` + ``plan_call`` alone (checks of the forward pass on a few examples, routes),
  redone at every step because the state holds only tensors;
- tracer_update factored=False: every parameter through ``vmap(grad)``;
- with ``--compile``: the training step and ``tc.tracer_update`` under ``torch.compile`` (the tracer's gradient part
  runs eagerly there by design; see ``tracin_func/_tracer.py``).

    OMP_NUM_THREADS=1 python benchmarks/bench_tracer.py --threads 1 [--compile]
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import torch
from common import begin_bench, best_time, fmt, print_table
from torch import nn
from workloads import digits_cnn, digits_mlp

import tracin_func as tc
from tracin_func._checkpoints import Checkpoint
from tracin_func._plan import plan_call
from tracin_func._setup import make_setup

BATCH = 64


def _rows(workload: Any, repeat: int, compile: bool) -> list[tuple[str, float]]:
    model, loss_fn = workload.model, nn.CrossEntropyLoss()
    x, y = workload.x_train, workload.y_train
    idx = torch.arange(BATCH) * 7 % workload.n_train
    batch = (x[idx], y[idx])
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    lr = torch.tensor(0.1)
    state = tc.tracer_init(workload.test, n_train=workload.n_train)

    trained = copy.deepcopy(model)  # the training step runs on its own copy
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)

    def train_step(net: nn.Module = trained) -> None:
        optimizer.zero_grad()
        loss_fn(net(batch[0]), batch[1]).backward()
        optimizer.step()

    def update(fn: Any = tc.tracer_update, **kw: Any) -> tc.TracerState:
        return fn(state, model, params, lr, batch, idx, loss_fn=loss_fn, **kw)

    def planning() -> Any:
        setup = make_setup(model, [Checkpoint(params, 1.0)], loss_fn=loss_fn, params=list(params), strict=False)
        return plan_call(setup, batch, "batch")

    rows = [("training step (torch.optim SGD)", best_time(train_step, repeat)[0])]
    best, out = best_time(update, repeat)
    rows.append(("tracer_update", best))
    rows.append(("  of which planning", best_time(planning, repeat)[0]))
    dense, out_dense = best_time(lambda: update(factored=False), repeat)
    rows.append(("tracer_update factored=False", dense))
    diff = float((out.scores - out_dense.scores).abs().max() / out_dense.scores.abs().max())
    rows.append((f"  (max rel diff factored vs dense {diff:.1e})", float("nan")))
    if compile:
        compiled_net = torch.compile(trained)
        train_step(compiled_net)  # compile once, untimed
        rows.append(("training step, compiled model", best_time(lambda: train_step(compiled_net), repeat)[0]))
        compiled_update = torch.compile(tc.tracer_update)
        update(compiled_update)
        rows.append(("tracer_update under torch.compile", best_time(lambda: update(compiled_update), repeat)[0]))
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--compile", action="store_true", help="also time both under torch.compile (slow to build)")
    args = parser.parse_args(argv)
    begin_bench(args.threads, f"bench_tracer: best of {args.repeat} runs, batch {BATCH}, 100 test examples")
    results = []
    for name in args.workloads:
        workload = (digits_mlp if name == "mlp" else digits_cnn)().subsample(n_test=100)
        rows = _rows(workload, args.repeat, args.compile)
        step = rows[0][1]
        table = [(label, fmt(s * 1e3, ".2f"), fmt(s / step, ".1f")) for label, s in rows if s == s]
        table += [(label, "", "") for label, s in rows if s != s]
        print_table(["", "ms / step", "x training step"], table, title=workload.describe())
        results += [{"workload": name, "row": label, "seconds": s} for label, s in rows if s == s]
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
