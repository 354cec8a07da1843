"""The automatic batch size against the best fixed one found by hand, per workload and question, in one process.

For each workload (``workloads.py``'s digits MLP / CNN and tiny transformer; ``--real``: the models of
``real_models.py``) and question (influence matrix, self-influence) it times our default call (automatic batch size)
and the same call with each ``--sizes`` batch size, in interleaved rounds (every setting once per round, best of the
rounds kept), so that drift on a shared machine hits every setting alike. It prints each setting's best time, the
training batch sizes the automatic choice used, and ``auto / best``: the automatic size's time over the fastest fixed
size's (the target is at most 1.1).

Usage::

    python benchmarks/bench_batch_size.py --threads 1                      # digits MLP / CNN, tiny transformer
    python benchmarks/bench_batch_size.py --workloads --real bert gpt2 --threads 1
    python benchmarks/bench_batch_size.py --workloads mlp --sizes 64 256 1024 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import bench_core
import real_models
import torch
from common import Rounds, begin_bench, print_table
from workloads import BUILDERS

from tracin_func import _driver
from tracin_func._data import batch_size_of

QUESTIONS = ("influence", "self")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench_batch_size")
    parser.add_argument(
        "--workloads",
        nargs="*",
        default=list(BUILDERS),
        choices=list(BUILDERS),
        metavar="NAME",
        help=f"reference workloads, any of {list(BUILDERS)} (default: all; none with a bare flag)",
    )
    parser.add_argument(
        "--real",
        nargs="*",
        default=None,
        choices=list(real_models.BUILDERS),
        metavar="NAME",
        help=f"real models, any of {list(real_models.BUILDERS)} (a bare --real: all)",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[32, 64, 128, 256, 512, 1024, 2048],
        metavar="B",
        help="fixed batch sizes tried (default 32 64 128 256 512 1024 2048)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, each timing every setting once")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.real == []:
        args.real = list(real_models.BUILDERS)
    return args


def calls(args: argparse.Namespace) -> Iterator[tuple[str, Callable[[int | None], dict[str, Callable[[], Any]]]]]:
    """(workload name, batch size -> {question: call}) for every workload asked for."""
    cpu = torch.device("cpu")
    for name in args.workloads:
        w = BUILDERS[name]()
        yield w.name, lambda bs, w=w: bench_core.ours(w, bs, 5, cpu)
    for name in args.real or ():
        w = bench_core.real_forms(name, *bench_core.REAL_SIZES)[0]
        yield f"{name} ({w.form})", lambda bs, w=w: bench_core.real_ours(w, bs, cpu)


def training_batch_sizes(call: Callable[[], Any]) -> list[int]:
    """The sizes of the training batches ``call`` scores (the test side's excluded), by watching the driver."""
    sizes, batches = [], _driver.batches

    def watched(setup: Any, data: Any, where: str, *a: Any, **k: Any) -> Iterator[tuple[int, Any]]:
        for offset, batch in batches(setup, data, where, *a, **k):
            if where != "test":
                sizes.append(batch_size_of(batch, where))
            yield offset, batch

    _driver.batches = watched
    try:
        call()
    finally:
        _driver.batches = batches
    return sizes


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    begin_bench(args.threads, f"bench_batch_size: fixed sizes {args.sizes}, best of {args.rounds} interleaved rounds")
    settings: list[int | None] = [None, *args.sizes]
    results = []
    for name, make in calls(args):
        by_size = {bs: make(bs) for bs in settings}
        rows = []
        for question in QUESTIONS:
            timer = Rounds(args.rounds)  # a first, untimed call each (planning caches, allocator), then rounds
            measured = {bs: timer.add(by_size[bs][question]) for bs in settings}
            timer.time()
            times = {bs: m.seconds for bs, m in measured.items()}
            best = min(args.sizes, key=times.__getitem__)
            auto = training_batch_sizes(by_size[None][question])
            results.append(
                {
                    "workload": name,
                    "question": question,
                    "auto": times[None],
                    "best_size": best,
                    "best": times[best],
                    "auto_sizes": auto,
                }
            )
            rows.append(
                [
                    question,
                    f"{times[None]:.3f}",
                    ",".join(map(str, sorted(set(auto), reverse=True))),
                    *(f"{times[bs]:.3f}" for bs in args.sizes),
                    str(best),
                    f"{times[None] / times[best]:.2f}",
                ]
            )
        print_table([name, "auto s", "auto used", *(f"{bs} s" for bs in args.sizes), "best", "auto / best"], rows)
        print()
        sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
