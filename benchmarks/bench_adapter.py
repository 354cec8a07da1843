"""The Captum drop-in adapter (``tracin_func.compat.captum``) against captum 0.9.0 on the digits MLP, in one process.

Both get the same constructor arguments, including the same ``checkpoints_load_func`` (Captum's default loader
cannot read the learning rate stored in the workload's checkpoint files), so each row is what a user gets after
changing only the import. Every measured call does the whole job: construction (where the adapter loads the
checkpoints) plus the query, except for ``TracInCPFastRandProj`` where construction (building the training
embeddings and, for Captum, its Annoy index) and the top-5 query are timed separately.

Columns: ``x adapter`` = time / the adapter's time for the same question; ``rel diff`` = max|scores - adapter's| /
max|adapter's|. Captum's ``TracInCPFast`` / ``TracInCPFastRandProj`` drop the final layer's bias gradient, so they
are also compared with exact TracIn on the weight alone (``tc.influence(params=["fc3.weight"])``), what they compute
on this model (the final Linear produces the output).

Usage::

    python benchmarks/bench_adapter.py                  # best of 3 timed runs
    python benchmarks/bench_adapter.py --repeat 1 --projection-dim 64
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from common import Measurement, begin_bench, captum_loader, fmt, max_rel_diff, measure, print_table
from torch import nn
from torch.utils.data import TensorDataset
from workloads import Workload, digits_mlp

import tracin_func as tc
from tracin_func.compat import captum as adapter


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench_adapter")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (both libraries)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per call, best kept")
    parser.add_argument("--k", type=int, default=5, help="k of the proponents questions")
    parser.add_argument("--projection-dim", type=int, default=None, help="TracInCPFastRandProj projection_dim")
    parser.add_argument("--quick", action="store_true", help="one timed run (same as --repeat 1)")
    parser.add_argument("--device", default="cpu", help="device of the model and data (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args, ignored = parser.parse_known_args(argv)  # run_all passes every module the flags of all
    if ignored:
        print(f"bench_adapter: ignoring flags it does not take (meant for other modules): {ignored}")
    if args.quick:
        args.repeat = 1
    return args


class Table:
    """Rows of the printed table and the machine-readable results."""

    def __init__(self, workload: str) -> None:
        self.workload = workload
        self.rows: list[list[str]] = []
        self.results: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def add(self, question: str, impl: str, m: Measurement, ref: Measurement, diff: float | None, note: str = ""):
        ratio = m.seconds / ref.seconds if ref.seconds > 0 else None
        cells = [fmt(m.seconds, ".3f"), str(m.runs), fmt(m.peak_mb, ".1f"), fmt(ratio, ".2f"), fmt(diff, ".1e")]
        self.rows.append([question, impl, *cells, note])
        self.results.append(
            {
                "bench": "adapter",
                "workload": self.workload,
                "question": question,
                "impl": impl,
                "seconds": m.seconds,
                "runs": m.runs,
                "peak_mb": m.peak_mb,
                "ratio_vs_adapter": ratio,
                "max_rel_diff_vs_adapter": diff,
                "note": note,
            }
        )

    def print(self, title: str) -> None:
        headers = ["question", "implementation", "time s", "runs", "peak MB", "x adapter", "rel diff", "note"]
        print_table(headers, self.rows, title=title, align="llrrrrrl")
        for note in self.notes:
            print(f"  note: {note}")
        print()


def _agree(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"indices agree {(a.cpu() == b.cpu()).float().mean().item():.0%}"


def bench(w: Workload, args: argparse.Namespace) -> Table:
    bs, k, repeat, device = args.batch_size, args.k, args.repeat, torch.device(args.device)
    from captum.influence import TracInCP, TracInCPFast, TracInCPFastRandProj

    table = Table(w.name)
    train, test = TensorDataset(*w.train), w.test
    model, theirs_model = w.model, copy.deepcopy(w.model)  # Captum loads checkpoints into its model: its own copy
    paths = list(w.checkpoint_paths)
    batch_wise = dict(loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=bs, sample_wise_grads_per_batch=True)
    fast_kw = dict(loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=bs)

    def run(fn: Callable[[], Any]) -> Measurement:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return measure(fn, repeat, device)

    # TracInCP: influence, proponents, self-influence (construction included)
    def ours_cp() -> adapter.TracInCP:
        return adapter.TracInCP(model, train, paths, captum_loader, **batch_wise)

    def theirs_cp() -> TracInCP:
        return TracInCP(theirs_model, train, paths, captum_loader, **batch_wise)

    def functional() -> torch.Tensor:
        ckpts = tc.load_checkpoints(paths, map_location=device)
        return tc.influence(model, ckpts, train, test, loss_fn=nn.CrossEntropyLoss(), batch_size=bs)

    q = "TracInCP influence"
    o, t, f = run(lambda: ours_cp().influence(test)), run(lambda: theirs_cp().influence(test)), run(functional)
    table.add(q, "adapter", o, o, None, f"[{o.result.shape[0]} x {o.result.shape[1]}]")
    table.add(q, "Captum batch-wise", t, o, max_rel_diff(t.result, o.result))
    table.add(q, "tc.influence (functional)", f, o, max_rel_diff(f.result, o.result), "same, without the Captum API")

    q = f"TracInCP top-{k}"
    o, t = run(lambda: ours_cp().influence(test, k=k)), run(lambda: theirs_cp().influence(test, k=k))
    diff = max_rel_diff(t.result.influence_scores, o.result.influence_scores)
    table.add(q, "adapter", o, o, None)
    table.add(q, "Captum batch-wise", t, o, diff, _agree(t.result.indices, o.result.indices))

    q = "TracInCP self-influence"
    o = run(lambda: ours_cp().self_influence())
    table.add(q, "adapter", o, o, None)
    for outer in (True, False):
        t = run(lambda outer=outer: theirs_cp().self_influence(outer_loop_by_checkpoints=outer))
        table.add(q, "Captum batch-wise", t, o, max_rel_diff(t.result, o.result), f"outer_loop_by_checkpoints={outer}")

    # TracInCPFast on fc3: exact on weight and bias (adapter) vs weight only (Captum)
    ckpts = tc.load_checkpoints(paths, map_location=device)
    exact = tc.influence(model, ckpts, train, test, loss_fn=nn.CrossEntropyLoss(), layers=["fc3"])
    weight_only = tc.influence(model, ckpts, train, test, loss_fn=nn.CrossEntropyLoss(), params=["fc3.weight"])
    q = "TracInCPFast influence"
    o = run(lambda: adapter.TracInCPFast(model, model.fc3, train, paths, captum_loader, **fast_kw).influence(test))
    t = run(
        lambda: TracInCPFast(theirs_model, theirs_model.fc3, train, paths, captum_loader, **fast_kw).influence(test)
    )
    table.add(q, "adapter", o, o, max_rel_diff(o.result, exact), "fc3 weight + bias; diff vs tc layers=['fc3']")
    note = f"drops fc3.bias; vs exact weight-only: {max_rel_diff(t.result, weight_only):.1e}"
    table.add(q, "Captum", t, o, max_rel_diff(t.result, o.result), note)

    # TracInCPFastRandProj: build (training embeddings; Captum also builds its Annoy index), then top-k queries
    proj = dict(fast_kw, projection_dim=args.projection_dim)
    q = "TracInCPFastRandProj build"
    o = run(lambda: adapter.TracInCPFastRandProj(model, model.fc3, train, paths, captum_loader, **proj))
    t = run(lambda: TracInCPFastRandProj(theirs_model, theirs_model.fc3, train, paths, captum_loader, **proj))
    ours_rp, theirs_rp = o.result, t.result
    rows = f"projection_dim={args.projection_dim}; embeddings {tuple(ours_rp.src_intermediate_quantities.shape)}"
    table.add(q, "adapter", o, o, None, rows)
    table.add(q, "Captum", t, o, None, f"embeddings {tuple(theirs_rp.src_intermediate_quantities.shape)} + Annoy")

    q = f"TracInCPFastRandProj top-{k}"
    o, t = run(lambda: ours_rp.influence(test, k=k)), run(lambda: theirs_rp.influence(test, k=k))
    table.add(q, "adapter", o, o, None, "exact search")
    note = f"Annoy, {_agree(t.result.indices, o.result.indices)}"
    if args.projection_dim is None:
        best = weight_only.topk(k, dim=1)
        note += f"; vs exact weight-only: {max_rel_diff(t.result.influence_scores, best.values):.1e}, "
        note += _agree(t.result.indices, best.indices)
    table.add(q, "Captum", t, o, max_rel_diff(t.result.influence_scores, o.result.influence_scores), note)

    table.notes += [
        "Both get the same loader (captum_loader), CrossEntropyLoss(reduction='sum') and "
        "sample_wise_grads_per_batch=True "
        "(Captum's batch-wise path; the adapter gives the same numbers either way).",
        "The adapter's Fast / RandProj scores include fc3.bias (exact TracIn on the layer); Captum's drop it, hence "
        "their rel diff to the adapter; their diff to exact weight-only TracIn is float32 rounding (Annoy: float32 "
        "and approximate).",
    ]
    return table


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    begin_bench(
        args.threads,
        f"bench_adapter: batch_size={args.batch_size}, k={args.k}, best of {args.repeat} timed run(s) after one "
        f"memory run, device={args.device}",
        "columns: 'x adapter' = time / the adapter's time; 'rel diff' = max|scores - adapter's| / max|adapter's|",
    )
    w = digits_mlp()
    device = torch.device(args.device)
    w = replace(w, model=w.model.to(device), x_train=w.x_train.to(device), y_train=w.y_train.to(device))
    w = replace(w, x_test=w.x_test.to(device), y_test=w.y_test.to(device))
    table = bench(w, args)
    table.print(w.describe())
    sys.stdout.flush()
    return table.results


if __name__ == "__main__":
    main()
