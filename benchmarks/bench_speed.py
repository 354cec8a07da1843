"""Speed of tracin_func's fast paths: last-layer mode and projected top-k, vs Captum's ``TracInCPFast`` family.

Four tables, all in one process:

1. Last-layer influence: ``tc.influence(..., method="last_layer")`` (exact on the final Linear's weight *and* bias)
   vs Captum ``TracInCPFast(final_fc_layer=<last Linear>)``, each compared with an exact reference on the same
   parameters (``tc.influence(..., layers=[<last Linear>], factored=False)``). Captum only scores the weight: its
   difference to the weight-only reference is also shown.
2. Projected top-k at the same ``projection_dim``: ours = ``tc.embeddings(..., method="last_layer",
   projection_dim=d)`` of train (build) and test + ``tc.top_k_embeddings`` (query); Captum =
   ``TracInCPFastRandProj(projection_dim=d)`` (build) + ``influence(test, k)`` (query). Recall@k is against the
   exact last-layer top-k (``tc.top_k(..., method="last_layer")``).
3. Scaling of projected top-k over synthetic training sets (digits-shaped uniform inputs, random labels) with the
   MLP's checkpoints: embedding time, search time and peak memory of the whole build + query.
4. Achieved GFLOP/s of the GEMM stages next to this machine's measured float32 matmul peak.

Usage::

    python benchmarks/bench_speed.py                       # full (scaling to 1M training rows; minutes)
    python benchmarks/bench_speed.py --quick               # scaling 10k and 100k, 1 timed run
    python benchmarks/bench_speed.py --scaling-sizes 10000 100000 1000000 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from common import (
    begin_bench,
    best_time,
    captum_loader,
    fmt,
    max_rel_diff,
    measure,
    peak_memory_mb,
    print_table,
    quiet,
)
from torch import nn
from torch.utils.data import TensorDataset
from workloads import BUILDERS, Workload

import tracin_func as tc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench_speed")
    parser.add_argument("--quick", action="store_true", help="scaling sizes 10000 100000, --repeat 1")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per call, best kept (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument(
        "--scaling-sizes", type=int, nargs="+", default=None, metavar="N",
        help="synthetic training-set sizes of table 3 (default 10000 100000 1000000; quick 10000 100000)",
    )  # fmt: skip
    parser.add_argument(
        "--speed-workloads", nargs="*", choices=["mlp", "cnn"], default=["mlp", "cnn"], metavar="NAME",
        help="workloads of tables 1-2, any of mlp cnn (default both; none: skip tables 1-2)",
    )  # fmt: skip
    parser.add_argument(
        "--projection-dims", type=int, nargs="+", default=[256, 1024], metavar="D",
        help="projection_dim values of table 2 (default 256 1024; perfect squares suit Captum's sqrt(d) per factor)",
    )  # fmt: skip
    parser.add_argument("--scaling-dim", type=int, default=256, help="projection_dim of table 3 (default 256)")
    parser.add_argument("--topk", type=int, default=10, help="k of tables 2-3 (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="Captum's batch size (default 64)")
    parser.add_argument(
        "--chunk", type=int, default=100_000, help="training rows per tc.embeddings call in table 3 (default 100000)"
    )
    parser.add_argument(
        "--embed-batch-size", type=int, default=8192, help="tc.embeddings batch_size in table 3 (default 8192)"
    )
    parser.add_argument("--no-captum", action="store_true", help="skip Captum")
    args, _ = parser.parse_known_args(argv)  # run_all passes flags meant for other modules too
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.scaling_sizes is None:
        args.scaling_sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    return args


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the last ``nn.Linear`` in registration order (the final layer of the workloads)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("model has no nn.Linear")
    return found[-1]


def captum_kwargs(w: Workload, bs: int) -> dict[str, Any]:
    model = copy.deepcopy(w.model)
    return dict(
        model=model,
        final_fc_layer=dict(model.named_modules())[last_linear(model)[0]],
        train_dataset=TensorDataset(*w.train),
        checkpoints=list(w.checkpoint_paths),
        checkpoints_load_func=captum_loader,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=bs,
    )


def recall(pred: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over rows of |pred_row ∩ exact_row| / k."""
    pred, exact = pred.cpu(), exact.cpu()
    k = exact.shape[1]
    hits = [len(set(p.tolist()) & set(e.tolist())) for p, e in zip(pred, exact)]
    return sum(hits) / (k * len(hits))


def _try(fn: Callable[[], Any]) -> tuple[Any, str]:
    try:
        return fn(), ""
    except Exception as err:  # noqa: BLE001 - a failing competitor is a result, not a crash
        return None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"


# --------------------------------------------------------------------------------------- 1. last-layer influence


def bench_last_layer(w: Workload, args: argparse.Namespace) -> list[dict[str, Any]]:
    loss = nn.CrossEntropyLoss()
    name, _ = last_linear(w.model)

    def ckpts() -> list[tc.Checkpoint]:
        return tc.load_checkpoints(w.checkpoint_paths)

    ref_m = measure(
        lambda: tc.influence(w.model, ckpts(), w.train, w.test, loss_fn=loss, layers=[name], factored=False),
        args.repeat,
    )
    ref = ref_m.result
    weight_only = tc.influence(w.model, ckpts(), w.train, w.test, loss_fn=loss, params=[f"{name}.weight"])
    ours = measure(
        lambda: tc.influence(w.model, ckpts(), w.train, w.test, loss_fn=loss, method="last_layer"), args.repeat
    )
    results = []
    table = []

    def add(impl: str, m: Any, note: str, err: str = "") -> None:
        diff = max_rel_diff(m.result, ref) if m else None
        diff_w = max_rel_diff(m.result, weight_only) if m else None
        ratio = m.seconds / ours.seconds if m else None
        table.append([impl, fmt(m.seconds, ".3f") if m else "-", fmt(m.peak_mb, ".1f") if m else "-",
                      fmt(ratio, ".2f"), fmt(diff, ".1e"), fmt(diff_w, ".1e"), err or note])  # fmt: skip
        results.append(
            dict(
                bench="speed",
                table="last_layer",
                workload=w.name,
                impl=impl,
                seconds=m.seconds if m else None,
                peak_mb=m.peak_mb if m else None,
                ratio_vs_ours=ratio,
                max_rel_diff_vs_exact=diff,
                max_rel_diff_vs_weight_only=diff_w,
                note=err or note,
            )
        )

    add("tracin_func last_layer", ours, f"weight+bias of {name}")
    add("tracin_func exact reference", ref_m, f"layers=['{name}'], factored=False")
    if not args.no_captum:
        from captum.influence import TracInCPFast

        kw = captum_kwargs(w, args.batch_size)
        m, err = _try(lambda: measure(quiet(lambda: TracInCPFast(**kw).influence(w.test, k=None)), args.repeat))
        add("Captum TracInCPFast", m, "drops the bias: matches weight-only", err)
    print_table(
        ["implementation", "time s", "peak MB", "x ours", "rel diff exact", "rel diff W-only", "note"],
        table,
        title=f"1. last-layer influence [{w.n_test} x {w.n_train}] -- {w.describe()}",
        align="lrrrrrl",
    )
    print("  rel diff = max|S - S_ref| / max|S_ref|; exact = weight+bias of the last Linear, W-only = its weight only.")
    print()
    return results


# ----------------------------------------------------------------------------------------- 2. projected top-k


def bench_projected(w: Workload, args: argparse.Namespace) -> list[dict[str, Any]]:
    loss = nn.CrossEntropyLoss()
    k = args.topk
    name, layer = last_linear(w.model)

    def ckpts() -> list[tc.Checkpoint]:
        return tc.load_checkpoints(w.checkpoint_paths)

    exact = tc.top_k(w.model, ckpts(), w.train, w.test, k=k, loss_fn=loss, method="last_layer")
    exact_w = tc.top_k(w.model, ckpts(), w.train, w.test, k=k, loss_fn=loss, params=[f"{name}.weight"])
    n_ckpt = len(w.checkpoint_paths)
    results, table = [], []
    for d in args.projection_dims:
        opts = dict(loss_fn=loss, method="last_layer", projection_dim=d, seed=0)
        build_t, E_train = best_time(lambda opts=opts: tc.embeddings(w.model, ckpts(), w.train, **opts), args.repeat)

        def query(E_train: torch.Tensor = E_train, opts: dict = opts) -> tc.TopK:
            return tc.top_k_embeddings(tc.embeddings(w.model, ckpts(), w.test, **opts), E_train, k=k)

        query_t, top = best_time(query, args.repeat)
        ours_total = build_t + query_t
        rows = [("tracin_func", build_t, query_t, top.indices, f"{E_train.shape[1] // n_ckpt}/ckpt, exact search", "")]
        if not args.no_captum:
            from captum.influence import TracInCPFastRandProj

            kw = captum_kwargs(w, args.batch_size)
            out_dim, in_dim = layer.out_features, layer.in_features
            eff = min(int(d**0.5), out_dim) * min(int(d**0.5), in_dim)
            holder: dict[str, Any] = {}

            def cbuild(kw: dict = kw, d: int = d, holder: dict = holder) -> Any:
                holder["obj"] = TracInCPFastRandProj(**kw, projection_dim=d, seed=0)
                return holder["obj"]

            def cquery(holder: dict = holder) -> Any:
                return holder["obj"].influence(w.test, k=k, proponents=True)

            (cb, err) = _try(lambda: best_time(quiet(cbuild), args.repeat))
            cq = None
            if not err:
                cq, err = _try(lambda: best_time(quiet(cquery), args.repeat))
            if cb and cq:
                rows.append(
                    (
                        "Captum TracInCPFastRandProj",
                        cb[0],
                        cq[0],
                        cq[1].indices,
                        f"{eff}/ckpt (W only), Annoy search",
                        "",
                    )
                )
            else:
                rows.append(("Captum TracInCPFastRandProj", None, None, None, "", err))
        for impl, bt, qt, idx, note, err in rows:
            total = bt + qt if bt is not None else None
            ratio = total / ours_total if total is not None else None
            r_exact = recall(idx, exact.indices) if idx is not None else None
            r_w = recall(idx, exact_w.indices) if idx is not None else None
            table.append([str(d), impl, fmt(bt, ".3f"), fmt(qt, ".3f"), fmt(total, ".3f"), fmt(ratio, ".2f"),
                          fmt(r_exact, ".3f"), fmt(r_w, ".3f"), err or note])  # fmt: skip
            results.append(
                dict(
                    bench="speed",
                    table="projected_topk",
                    workload=w.name,
                    impl=impl,
                    projection_dim=d,
                    build_s=bt,
                    query_s=qt,
                    seconds=total,
                    ratio_vs_ours=ratio,
                    recall_exact=r_exact,
                    recall_weight_only=r_w,
                    note=err or note,
                )
            )
    print_table(
        ["proj d", "implementation", "build s", "query s", "total s", "x ours", f"recall@{k}", "rec W-only", "dims"],
        table,
        title=f"2. projected top-{k} proponents, {w.n_test} test x {w.n_train} train -- {w.name}",
        align="rlrrrrrrl",
    )
    print(f"  recall@{k} vs the exact last-layer (weight+bias) top-{k}; 'rec W-only' vs the exact top-{k} of the")
    print(
        "  last Linear's weight alone (what Captum targets: its scores drop the bias, so even unprojected they differ)."
    )
    print("  Captum projects the weight gradient with sqrt(d) x sqrt(d) factors capped at the layer's (out, in) dims.")
    print()
    return results


# ----------------------------------------------------------------------------------------------- 3. scaling


def synthetic_chunks(n: int, chunk: int, in_shape: tuple[int, ...], n_classes: int, seed: int = 0):
    """Digits-like synthetic data: uniform [0, 1] pixels, uniform labels, generated ``chunk`` rows at a time."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        yield start, torch.rand((b, *in_shape), generator=g), torch.randint(0, n_classes, (b,), generator=g)


def bench_scaling(w: Workload, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, float]]:
    loss = nn.CrossEntropyLoss()
    k, d = args.topk, args.scaling_dim
    ckpts = tc.load_checkpoints(w.checkpoint_paths)
    opts = dict(loss_fn=loss, method="last_layer", projection_dim=d, seed=0)
    in_shape = tuple(w.x_train.shape[1:])
    n_classes = last_linear(w.model)[1].out_features
    width = tc.embeddings(w.model, ckpts, (w.x_test[:1], w.y_test[:1]), **opts).shape[1]
    results, table, rows = [], [], []
    gemm: dict[str, float] = {}
    for n in args.scaling_sizes:
        times: dict[str, float] = {}

        def run(n: int = n, times: dict = times) -> tuple[torch.Tensor, tc.TopK]:
            start = time.perf_counter()
            E = torch.empty(n, width, dtype=torch.float32)
            for i, x, y in synthetic_chunks(n, args.chunk, in_shape, n_classes):
                E[i : i + x.shape[0]] = tc.embeddings(w.model, ckpts, (x, y), batch_size=args.embed_batch_size, **opts)
            times["embed"] = time.perf_counter() - start
            start = time.perf_counter()
            E_test = tc.embeddings(w.model, ckpts, w.test, **opts)
            top = tc.top_k_embeddings(E_test, E, k=k)
            times["query"] = time.perf_counter() - start
            return E, top

        peak, (E, top) = peak_memory_mb(run)
        E_test = tc.embeddings(w.model, ckpts, w.test, **opts)
        t_topk, top2 = best_time(lambda E=E, E_test=E_test: tc.top_k_embeddings(E_test, E, k=k), args.repeat)
        assert torch.equal(top.indices, top2.indices)
        emb_mb = E.numel() * E.element_size() / 2**20
        gflops = 2 * E_test.shape[0] * n * width / t_topk / 1e9
        gemm = {"n": n, "gflops": gflops, "t": t_topk}
        rows.append((n, times["embed"], times["query"], t_topk, gflops, peak, emb_mb, peak - emb_mb))
        del E, top, top2
    ref_excess = next((r[7] for r in rows if r[0] == 100_000), rows[0][7])
    for n, te, tq, tt, gf, peak, emb_mb, excess in rows:
        rel = excess / ref_excess if ref_excess > 0 else None
        table.append(
            [
                f"{n:,}",
                fmt(te, ".2f"),
                fmt(n / te / 1e3, ".1f"),
                fmt(tq, ".3f"),
                fmt(tt, ".3f"),
                fmt(gf, ".1f"),
                fmt(peak, ".0f"),
                fmt(emb_mb, ".0f"),
                fmt(excess, ".0f"),
                fmt(rel, ".2f"),
            ]
        )
        results.append(
            dict(
                bench="speed",
                table="scaling",
                workload=w.name,
                n_train=n,
                projection_dim=d,
                width=width,
                embed_s=te,
                query_s=tq,
                topk_s=tt,
                topk_gflops=gf,
                peak_mb=peak,
                embeddings_mb=emb_mb,
                peak_minus_embeddings_mb=excess,
                excess_vs_100k=rel,
            )
        )
    print_table(
        ["n_train", "embed s", "k rows/s", "query s", "top_k_emb s", "GFLOP/s", "peak MB", "E MB", "peak-E MB",
         "x @100k"],
        table,
        title=f"3. scaling of projected top-{k}: {w.name} checkpoints, synthetic train, {w.n_test} test, "
        f"projection_dim={d} (width {width} = C x {width // len(ckpts)})",
    )  # fmt: skip
    print(f"  embed = tc.embeddings over {args.chunk:,}-row chunks (batch_size={args.embed_batch_size}) into a")
    print("  preallocated [n, width] float32 tensor; query = embed test + top_k_embeddings (one run, inside the memory")
    print(
        "  measurement); top_k_emb s = best of --repeat further top_k_embeddings calls. peak = RSS added by the whole"
    )
    print(
        "  build + query; peak-E = peak minus the embeddings' own bytes; x @100k = that excess relative to 100k rows."
    )
    big = [r for r in rows if r[0] >= 1_000_000 and r[1] > 120]
    if big:
        print(f"  NOTE: embedding {big[0][0]:,} rows took {big[0][1]:.0f} s (> 2 min); use --scaling-sizes to skip it.")
    print()
    return results, gemm


# ------------------------------------------------------------------------------------------------- 4. GFLOP/s


def matmul_peak(size: int = 2048, repeat: int = 3) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    t, _ = best_time(lambda: a @ b, repeat)
    return 2 * size**3 / t / 1e9


def bench_gflops(w: Workload, args: argparse.Namespace, gemm: dict[str, float]) -> list[dict[str, Any]]:
    peak = matmul_peak()
    rows = [("float32 GEMM 2048^3 (machine peak)", peak, None, "best of 3")]
    if gemm:
        rows.append(
            (
                f"top_k_embeddings, n_train={gemm['n']:,}",
                gemm["gflops"],
                gemm["t"],
                "2*n_test*n_train*D / time (incl. top-k merges)",
            )
        )
    loss = nn.CrossEntropyLoss()
    ckpts = tc.load_checkpoints(w.checkpoint_paths)
    for label, opts in (("last_layer", dict(method="last_layer")), ("all params", {})):
        E_tr = tc.embeddings(w.model, ckpts, w.train, loss_fn=loss, **opts)
        E_te = tc.embeddings(w.model, ckpts, w.test, loss_fn=loss, **opts)
        t, _ = best_time(lambda E_tr=E_tr, E_te=E_te: E_te @ E_tr.T, max(args.repeat, 3))
        flops = 2 * E_te.shape[0] * E_tr.shape[0] * E_tr.shape[1]
        rows.append(
            (f"exact influence dot, {w.name} {label}", flops / t / 1e9, t, f"E_test @ E_train.T, D={E_tr.shape[1]:,}")
        )
        del E_tr, E_te
    table = [[name, fmt(g, ".1f"), fmt(g / peak, ".0%"), fmt(t, ".4f"), note] for name, g, t, note in rows]
    print_table(["stage", "GFLOP/s", "of peak", "time s", "note"], table, title="4. achieved GFLOP/s", align="lrrrl")
    return [
        dict(bench="speed", table="gflops", stage=name, gflops=g, fraction_of_peak=g / peak, seconds=t, note=note)
        for name, g, t, note in rows
    ]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    begin_bench(
        args.threads,
        f"bench_speed: best of {args.repeat} timed run(s), Captum batch_size={args.batch_size}, k={args.topk}, "
        f"scaling sizes {args.scaling_sizes}{', QUICK' if args.quick else ''}",
    )
    results: list[dict[str, Any]] = []
    mlp = None
    for name in args.speed_workloads:
        w = BUILDERS[name]()
        if name == "mlp":
            mlp = w
        results.extend(bench_last_layer(w, args))
        sys.stdout.flush()
        results.extend(bench_projected(w, args))
        sys.stdout.flush()
    mlp = mlp or BUILDERS["mlp"]()
    gemm: dict[str, float] = {}
    if args.scaling_sizes:
        rows, gemm = bench_scaling(mlp, args)
        results.extend(rows)
        sys.stdout.flush()
    results.extend(bench_gflops(mlp, args, gemm))
    return results


if __name__ == "__main__":
    main()
