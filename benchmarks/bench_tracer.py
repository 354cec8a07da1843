"""Cost per step of TracIn inside the training loop (`tc.tracer`, `tc.tracer_update`) relative to the training step.

Digits MLP and CNN of the reference workloads (final weights), one SGD step on a batch of 64 training examples,
100 test examples traced. Rows, each the best of ``--repeat`` runs, all measured in this process:

- training step: ``zero_grad``, forward / backward of the batch's mean loss, ``optimizer.step()`` (torch.optim SGD);
- tc.tracer(...): the factory, which validates and plans the call once (on the test batch), before the loop;
- tracer.update: one step under that plan (checks of the step's arguments against the plan, test and batch
  gradients, scatter into the scores);
- tracer.update factored=False: every parameter through ``vmap(grad)``;
- tracer_update: the simple form, which plans the call again at every step (``tc.tracer`` + ``update``);
- with ``--compile``: the training step, ``tracer.update`` and ``tc.tracer_update`` under ``torch.compile`` (the
  tracer's gradient part runs eagerly there by design; see ``tracin_func/_tracer.py``).

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

    def make(**kw: Any) -> tc.Tracer:
        return tc.tracer(model, workload.test, n_train=workload.n_train, loss_fn=loss_fn, **kw)

    def simple(fn: Any = tc.tracer_update) -> tc.TracerState:
        return fn(state, model, params, lr, batch, idx, loss_fn=loss_fn)

    rows = [("training step (torch.optim SGD)", best_time(train_step, repeat)[0])]
    plan_seconds, tracer = best_time(make, repeat)
    rows.append(("tc.tracer(...): planning, once per loop", plan_seconds))
    best, out = best_time(lambda: tracer.update(state, params, lr, batch, idx), repeat)
    rows.append(("tracer.update", best))
    dense_tracer = make(factored=False)
    dense, out_dense = best_time(lambda: dense_tracer.update(state, params, lr, batch, idx), repeat)
    rows.append(("tracer.update factored=False", dense))
    each, out_simple = best_time(simple, repeat)
    rows.append(("tracer_update (plans at every step)", each))
    diff = float((out.scores - out_dense.scores).abs().max() / out_dense.scores.abs().max())
    rows.append((f"  (max rel diff factored vs dense {diff:.1e})", float("nan")))
    same = torch.equal(out.scores, out_simple.scores) and torch.equal(out.self_influence, out_simple.self_influence)
    rows.append((f"  (tracer.update == tracer_update bit for bit: {same})", float("nan")))
    if compile:
        compiled_net = torch.compile(trained)
        train_step(compiled_net)  # compile once, untimed
        rows.append(("training step, compiled model", best_time(lambda: train_step(compiled_net), repeat)[0]))
        compiled = torch.compile(tracer.update)
        compiled(state, params, lr, batch, idx)
        rows.append(("tracer.update under torch.compile",
                     best_time(lambda: compiled(state, params, lr, batch, idx), repeat)[0]))
        compiled_simple = torch.compile(tc.tracer_update)
        simple(compiled_simple)
        rows.append(("tracer_update under torch.compile", best_time(lambda: simple(compiled_simple), repeat)[0]))
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
