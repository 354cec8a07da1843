"""The on-disk index on the digits CNN: build time, query time and recall@k of projected and re-ranked top-k lists
against exact ``tc.top_k``, in one process.

    python benchmarks/bench_index.py                  # projection_dim 256 and 1024, k = 10, 100 test digits
    python benchmarks/bench_index.py --threads 1 --dims 64 256 1024 --candidates 50 100

recall@k: the fraction of the exact top-k training examples (per test digit) found in the returned k.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import peak_memory_mb  # noqa: E402
from workloads import digits_cnn  # noqa: E402

import tracin_func as tc  # noqa: E402


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)]
    return sum(hits) / exact.numel()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--candidates", type=int, nargs="+", default=[100])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--shard-rows", type=int, default=500, help="rows per shard of the exact (unprojected) index whose build's "
        "peak memory is measured (500: 253 MB of gradients a shard; 0 skips it)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w = digits_cnn()
    ckpts = tc.load_checkpoints(w.checkpoint_paths)
    kw = dict(loss_fn=w.loss_fn)
    print(w.describe(), f"| k = {args.k}, threads = {torch.get_num_threads()}")
    exact, t_exact = timed(tc.top_k, w.model, ckpts, w.train, w.test, k=args.k, **kw)
    _, t_self = timed(tc.self_influence, w.model, ckpts, w.train, **kw)
    print(f"exact tc.top_k: {t_exact:.2f} s; tc.self_influence: {t_self:.2f} s")
    if args.shard_rows:
        with tempfile.TemporaryDirectory() as path:
            build = lambda: timed(tc.build_index, path, w.model, ckpts, w.train, shard_size=args.shard_rows, **kw)  # noqa: E731
            peak, (index, t_build) = peak_memory_mb(build)
            shard = args.shard_rows * index.embeddings(slice(0, 1)).shape[1] * 4 / 2**20
            print(
                f"exact index (no projection), {args.shard_rows} rows a shard ({shard:.0f} MB): build {t_build:.2f} s, "
                f"peak memory {peak:.0f} MB = {peak / shard:.2f}x a shard"
            )
    print("| projection_dim | build (s) | build / exact top_k | query (s) | recall@k | re-rank candidates | "
          "query + re-rank (s) | recall@k re-ranked |")
    print("|---|---|---|---|---|---|---|---|")
    for dim in args.dims:
        with tempfile.TemporaryDirectory() as path:
            index, t_build = timed(tc.build_index, path, w.model, ckpts, w.train, projection_dim=dim, **kw)
            assert torch.allclose(index.self_influence(), tc.self_influence(w.model, ckpts, w.train, **kw))
            top, t_query = timed(tc.top_k, w.model, ckpts, index, w.test, k=args.k, **kw)
            for m in args.candidates:
                reranked, t_rerank = timed(
                    tc.top_k, w.model, ckpts, index, w.test, k=args.k, rerank=w.train, candidates=m, **kw
                )
                print(
                    f"| {dim} | {t_build:.2f} | {t_build / t_exact:.2f} | {t_query:.3f} | "
                    f"{recall(top.indices, exact.indices):.3f} | {m} | {t_rerank:.2f} | "
                    f"{recall(reranked.indices, exact.indices):.3f} |"
                )


if __name__ == "__main__":
    main()
