"""Find mislabeled training digits with TracIn self-influence (the TracIn paper's mislabeled-data experiment).

Flips the labels of a fraction of sklearn's digits training set (each to a different random class), trains a
small CNN with SGD while saving checkpoints to files, loads them back with ``tc.load_checkpoints``, ranks the
training examples by ``tc.self_influence`` and reports how many flipped labels are found by inspecting the top
10 / 20 / 30 % of the ranking (against ranking by training loss and a random order). It also shows the top
proponents and opponents (``tc.influence``) of a few test digits, by raw TracIn and by the renormalised
(gradient-cosine, ``normalize="cosine"``) score, and summarises the top-k lists of the first ``--n-stats`` test
digits both ways: raw TracIn lists are dominated by the flipped training digits (their gradients are largest).

    python examples/mislabel_digits.py                       # defaults: ~1500 train digits, 10% flipped
    python examples/mislabel_digits.py --noise 0.2 --seed 1 --out out/noise20

Writes ``mislabel_curve.png``, ``proponents_opponents.png``, ``proponents_opponents_cosine.png``,
``results.json`` and ``checkpoints/`` into ``--out``.
Everything is deterministic for a given ``--seed``; nothing is downloaded (the digits ship with scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import tracin_func as tc  # noqa: E402

FRACTIONS = (0.1, 0.2, 0.3)
SCORES = {None: "raw", "cosine": "cosine"}  # tc.top_k's `normalize` -> name in results.json
FLIP_COLOR = "#d62728"
WRONG_COLOR = "#ff7f0e"


@dataclass(frozen=True)
class Data:
    """Train / test split of the digits, with the given (partly flipped) and original training labels."""

    x_train: torch.Tensor  # [n_train, 1, 8, 8], pixels / 16
    y_train: torch.Tensor  # [n_train] labels used for training (some flipped)
    y_clean: torch.Tensor  # [n_train] original labels
    flipped: torch.Tensor  # [n_train] bool
    x_test: torch.Tensor  # [n_test, 1, 8, 8]
    y_test: torch.Tensor  # [n_test]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="out/mislabel_digits", help="output folder (default: %(default)s)")
    p.add_argument(
        "--noise", type=float, default=0.1, help="fraction of training labels flipped (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for split, flips, init and shuffling (default: %(default)s)"
    )
    p.add_argument("--checkpoints", type=int, default=5, help="checkpoints, evenly spread (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="SGD batch size (default: %(default)s)")
    p.add_argument(
        "--n-train", type=int, default=1500, help="training digits; the rest are test (default: %(default)s)"
    )
    p.add_argument("--n-show", type=int, default=4, help="test digits shown with proponents (default: %(default)s)")
    p.add_argument("--k", type=int, default=5, help="proponents / opponents per test digit (default: %(default)s)")
    p.add_argument(
        "--n-stats",
        type=int,
        default=100,
        help="first test digits whose top-k lists are summarised, raw vs cosine (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads while running; 0 keeps torch's default. The work is small: on a shared machine\n"
        "one thread is much faster than threads waiting for each other (default: %(default)s)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    args = p.parse_args(argv)
    if not 0 < args.noise < 1:
        p.error(f"--noise must be in (0, 1), got {args.noise}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if not 1 <= args.checkpoints <= args.epochs:
        p.error(f"--checkpoints must be between 1 and --epochs ({args.epochs}), got {args.checkpoints}")
    if not 10 <= args.n_train <= 1797 - args.n_show:
        p.error(f"--n-train must be between 10 and {1797 - args.n_show} (digits has 1797 images), got {args.n_train}")
    if not 1 <= args.n_stats <= 1797 - args.n_train:
        p.error(f"--n-stats must be between 1 and the {1797 - args.n_train} test digits, got {args.n_stats}")
    return args


def make_data(n_train: int, noise: float, seed: int) -> Data:
    """Shuffle the digits, split off ``n_train`` for training and flip ``noise`` of their labels."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    x = torch.tensor(digits.images[order] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target[order], dtype=torch.long)
    y_clean = y[:n_train]
    n_flip = round(noise * n_train)
    flip_idx = torch.from_numpy(rng.choice(n_train, size=n_flip, replace=False))
    shift = torch.from_numpy(rng.integers(1, 10, size=n_flip))  # 1..9: always a different class
    y_train = y_clean.clone()
    y_train[flip_idx] = (y_clean[flip_idx] + shift) % 10
    flipped = y_train != y_clean
    return Data(x[:n_train], y_train, y_clean, flipped, x[n_train:], y[n_train:])


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def checkpoint_epochs(epochs: int, n_checkpoints: int) -> list[int]:
    """Epochs after which a checkpoint is saved, evenly spread over training and ending with the last one."""
    return [round(epochs * (i + 1) / n_checkpoints) for i in range(n_checkpoints)]


def train(
    model: nn.Module,
    data: Data,
    ckpt_dir: str,
    *,
    epochs: int,
    n_checkpoints: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool,
) -> list[str]:
    """Plain SGD on the (noisy) training labels; saves ``{"model_state_dict", "learning_rate"}`` files."""
    os.makedirs(ckpt_dir, exist_ok=True)
    for name in os.listdir(ckpt_dir):  # stale checkpoints of an earlier run would be loaded with ours
        if name.startswith("ckpt-epoch-") and name.endswith(".pt"):
            os.remove(os.path.join(ckpt_dir, name))
    save_at = set(checkpoint_epochs(epochs, n_checkpoints))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    paths = []
    model.train()
    bar = tqdm(range(1, epochs + 1), desc="training", unit="epoch", disable=not progress)
    for epoch in bar:
        order = torch.randperm(n, generator=shuffle)
        total = 0.0
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        bar.set_postfix(loss=f"{total / n:.3f}")
        if epoch in save_at:
            path = os.path.join(ckpt_dir, f"ckpt-epoch-{epoch:03d}.pt")
            torch.save({"model_state_dict": model.state_dict(), "learning_rate": lr}, path)
            paths.append(path)
    model.eval()
    return paths


def detection_curve(scores: torch.Tensor, flipped: torch.Tensor) -> np.ndarray:
    """Fraction of flipped examples found after inspecting the top-i examples, i = 0..n (highest score first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    found = torch.cumsum(flipped[order].double(), 0) / flipped.sum()
    return np.concatenate([[0.0], found.numpy()])


def at_fractions(curve: np.ndarray) -> dict[str, float]:
    n = len(curve) - 1
    return {f"{f:.0%}": float(curve[round(f * n)]) for f in FRACTIONS}


def pick_test_digits(pred: torch.Tensor, y_test: torch.Tensor, n_show: int) -> list[int]:
    """A misclassified test digit (if any, the most interesting case) and correctly classified ones of other classes."""
    wrong = (pred != y_test).nonzero().flatten().tolist()
    picked = wrong[:1]
    for i in range(len(y_test)):
        if len(picked) >= n_show:
            break
        if pred[i] == y_test[i] and all(y_test[j] != y_test[i] for j in picked):
            picked.append(i)
    return sorted(picked)


def plot_curve(curves: dict[str, np.ndarray], noise: float, path: str) -> None:
    """Fraction of flipped labels found vs fraction of training data inspected: full range, and a zoom on the knee."""
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11.0, 4.6), dpi=130, gridspec_kw={"width_ratios": [1, 1]})
    x = np.linspace(0, 1, len(next(iter(curves.values()))))
    styles = {
        "self_influence": ("TracIn self-influence", "#1f77b4", 2.2),
        "loss": ("training loss at last checkpoint", "#ff7f0e", 1.6),
    }
    for ax in (full, zoom):
        ax.plot([0, noise, 1], [0, 1, 1], color="0.55", lw=1, ls=":", label="perfect ranking")
        ax.plot([0, 1], [0, 1], color="0.45", lw=1.2, ls="--", label="random order")
        for key, curve in curves.items():
            label, color, lw = styles[key]
            found = " / ".join(f"{v:.0%}" for v in at_fractions(curve).values())
            ax.plot(x, curve, color=color, lw=lw, label=f"{label}: {found}")
        for f in FRACTIONS:
            ax.axvline(f, color="0.8", lw=0.8, zorder=0)
            for key, curve in curves.items():
                ax.plot([f], [curve[round(f * (len(x) - 1))]], "o", color=styles[key][1], ms=4, zorder=5)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=0.25)
        ax.set_xlabel("fraction of training data inspected (highest score first)")
    lo = min(float(np.interp(noise / 2, x, c)) for c in curves.values())
    zoom.set(xlim=(noise / 2, min(1.0, max(FRACTIONS) + noise / 2)), ylim=(max(0.0, lo - 0.02), 1.01))
    zoom.set_title("zoom on the top of the ranking", fontsize=10)
    full.set(xlim=(0, 1), ylim=(0, 1.02))
    full.set_ylabel("fraction of flipped labels found")
    full.set_title("all training data", fontsize=10)
    full.legend(loc="lower right", fontsize=8, title="ranking: found at top 10 / 20 / 30 %", title_fontsize=8)
    fig.suptitle(f"Finding mislabeled digits: {noise:.0%} of {len(x) - 1} training labels flipped", fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _score_format(shown: list[dict[str, Any]]) -> str:
    largest = max(abs(v) for item in shown for kind in ("proponents", "opponents") for v in item[kind]["scores"])
    return "{:+.1f}" if largest >= 10 else "{:+.3f}"


def _show_digit(ax: Any, image: torch.Tensor, title: str, *, color: str = "black", frame: str | None = None) -> None:
    ax.imshow(image.squeeze(0).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7.5, color=color, linespacing=1.2, pad=3)
    for spine in ax.spines.values():
        spine.set_edgecolor(frame or "0.75")
        spine.set_linewidth(2.5 if frame else 0.8)


SCORE_CAPTIONS = {
    "raw": "score: TracIn influence of the training digit on the test digit's loss (summed over checkpoints).",
    "cosine": "score: renormalised TracIn, sum over checkpoints of lr x cosine of the two loss gradients "
    '(normalize="cosine").',
}


def plot_proponents(data: Data, shown: list[dict[str, Any]], path: str, scoring: str = "raw") -> None:
    """One row per test digit: the digit, then its top-k proponents and top-k opponents among the training digits,
    by the ``scoring`` named in ``SCORE_CAPTIONS``."""
    k = len(shown[0]["proponents"]["indices"])
    fmt = _score_format(shown)
    widths = [1.0, 0.35] + [1.0] * k + [0.35] + [1.0] * k  # test | gap | proponents | gap | opponents
    fig = plt.figure(figsize=(1.1 * sum(widths), 1.55 * len(shown) + 0.5), dpi=130)
    grid = fig.add_gridspec(len(shown), len(widths), width_ratios=widths, hspace=0.45, wspace=0.3)
    headers: dict[str, tuple[Any, Any]] = {}
    for row, item in enumerate(shown):
        ok = item["prediction"] == item["label"]
        color = "black" if ok else WRONG_COLOR
        title = f"test #{item['test_index']}\ntrue {item['label']}, pred {item['prediction']}" + (
            "" if ok else " (wrong)"
        )
        _show_digit(fig.add_subplot(grid[row, 0]), data.x_test[item["test_index"]], title, color=color, frame=color)
        for kind, first_col in (("proponents", 2), ("opponents", 3 + k)):
            axes = []
            for j, (idx, score) in enumerate(zip(item[kind]["indices"], item[kind]["scores"])):
                given, clean = int(data.y_train[idx]), int(data.y_clean[idx])
                flipped = given != clean
                title = f"label {given}" + (f" (was {clean})" if flipped else "") + f"\n#{idx}  " + fmt.format(score)
                ax = fig.add_subplot(grid[row, first_col + j])
                flip_color = FLIP_COLOR if flipped else None
                _show_digit(ax, data.x_train[idx], title, color=flip_color or "black", frame=flip_color)
                axes.append(ax)
            headers.setdefault(kind, (axes[0], axes[-1]))
    fig.canvas.draw()  # title extents are final only after a draw
    to_fig = fig.transFigure.inverted()
    for kind, (first, last) in headers.items():
        x0, x1 = first.get_position().x0, last.get_position().x1
        top = first.title.get_window_extent().transformed(to_fig).y1
        color = "#2ca02c" if kind == "proponents" else "#9467bd"
        fig.text(
            (x0 + x1) / 2,
            top + 0.015,
            f"top-{k} {kind}",
            ha="center",
            va="bottom",
            fontsize=11,
            weight="bold",
            color=color,
        )
    bottom = min(a.get_position().y0 for a in fig.axes)
    fig.text(
        0.5,
        bottom - 0.02,
        f"{SCORE_CAPTIONS[scoring]}  Red: flipped training label (original in brackets).",
        ha="center",
        va="top",
        fontsize=8.5,
    )
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def top_k_lists(
    model: nn.Module,
    ckpts: list[tc.Checkpoint],
    data: Data,
    test_idx: list[int],
    *,
    k: int,
    normalize: str | None,
    progress: bool,
) -> dict[str, tc.TopK]:
    """Top-k proponents and opponents of the test digits ``test_idx`` (scored with their true labels), from one
    ``tc.influence`` matrix: a few hundred test digits by 1500 training digits is small, and one call gives both
    lists (``tc.top_k`` streams them instead, for training sets whose matrix would not fit)."""
    test = (data.x_test[test_idx], data.y_test[test_idx])
    train = (data.x_train, data.y_train)
    scores = tc.influence(
        model, ckpts, train, test, loss_fn=nn.CrossEntropyLoss(), normalize=normalize, batch_size=256, progress=progress
    )
    lists = {}
    for kind in ("proponents", "opponents"):
        values, indices = torch.topk(scores, k, dim=1, largest=kind == "proponents")
        lists[kind] = tc.TopK(indices, values)
    return lists


def top_k_table(
    data: Data, found: dict[str, tc.TopK], rows: list[int], test_idx: list[int], pred: torch.Tensor
) -> list[dict[str, Any]]:
    """The lists of ``found`` at ``rows``, for test digits ``test_idx``, as JSON-ready dicts."""
    return [
        {
            "test_index": i,
            "label": int(data.y_test[i]),
            "prediction": int(pred[i]),
            **{
                kind: {
                    "indices": top.indices[row].tolist(),
                    "scores": top.scores[row].tolist(),
                    "flipped": data.flipped[top.indices[row]].tolist(),
                }
                for kind, top in found.items()
            },
        }
        for row, i in zip(rows, test_idx)
    ]


def list_statistics(data: Data, found: dict[str, tc.TopK], test_idx: list[int]) -> dict[str, float]:
    """How the top-k lists of the test digits ``test_idx`` (rows of ``found``, in order) look: the fraction of
    proponents whose training label is correct and equal to the test digit's, and how many distinct training digits
    the opponents are (a score that picks the same few opponents for every test digit is of little use)."""
    props, opps = found["proponents"].indices, found["opponents"].indices
    same = (data.y_train[props] == data.y_test[test_idx][:, None]) & ~data.flipped[props]
    return {
        "proponents_correct_same_label": float(same.double().mean()),
        "proponents_flipped": float(data.flipped[props].double().mean()),
        "opponents_distinct": int(opps.unique().numel()),
        "opponents_total": int(opps.numel()),
        "opponents_flipped": float(data.flipped[opps].double().mean()),
    }


def print_summary(results: dict[str, Any], data: Data, scores: torch.Tensor, n_top: int = 10) -> None:
    det, s = results["detection"], results["settings"]
    n_flip = int(data.flipped.sum())
    print(
        f"\n{n_flip} of {len(data.y_train)} training labels flipped; test accuracy {results['test_accuracy']:.1%} "
        f"({s['checkpoints']} checkpoints over {s['epochs']} epochs)"
    )
    print("flipped labels found when inspecting the top ...")
    print(f"  {'':>8}  {'self-influence':>14}  {'loss':>6}  {'random':>6}")
    for key in det["self_influence"]:
        print(f"  {key:>8}  {det['self_influence'][key]:>14.1%}  {det['loss'][key]:>6.1%}  {det['random'][key]:>6.1%}")
    print("\nmost self-influential training digits (rank: index, given label -> original label):")
    for rank, idx in enumerate(torch.argsort(scores, descending=True)[:n_top].tolist(), 1):
        given, clean = int(data.y_train[idx]), int(data.y_clean[idx])
        mark = f"FLIPPED (was {clean})" if given != clean else "correct label"
        print(f"  {rank:>2}: #{idx:<5} label {given}  {mark:<20} score {float(scores[idx]):.3f}")
    for key, title in (("top_k", "raw TracIn"), ("top_k_cosine", 'renormalised, normalize="cosine"')):
        print(f"\ntop proponents / opponents of test digits, {title} (training index:label, * = flipped):")
        for item in results[key]:
            print(f"  test #{item['test_index']} (true {item['label']}, pred {item['prediction']})")
            for kind in ("proponents", "opponents"):
                cells = [
                    f"#{i}:{int(data.y_train[i])}{'*' if f else ''} ({v:+.2f})"
                    for i, v, f in zip(item[kind]["indices"], item[kind]["scores"], item[kind]["flipped"])
                ]
                print(f"    {kind:<10} " + "  ".join(cells))
    stats = results["top_k_statistics"]
    raw, cos = stats["raw"], stats["cosine"]
    header = f"top-{s['k']} lists of the first {stats['n_test']} test digits"
    print(f"\n{header:<46}  {'raw':>7}  {'cosine':>7}")
    rows = [
        ("proponents: correct label = test digit's", "proponents_correct_same_label", "{:.1%}"),
        ("proponents: flipped label", "proponents_flipped", "{:.1%}"),
        (f"opponents: distinct training digits (of {raw['opponents_total']})", "opponents_distinct", "{}"),
        ("opponents: flipped label", "opponents_flipped", "{:.1%}"),
    ]
    for label, key, fmt in rows:
        print(f"  {label:<44}  {fmt.format(raw[key]):>7}  {fmt.format(cos[key]):>7}")


def _rows(top: tc.TopK, n: int) -> tc.TopK:
    """The first ``n`` rows of ``top`` (the scored digits are sorted, so these are test digits 0..n-1)."""
    return tc.TopK(top.indices[:n], top.scores[:n])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment; returns the results also written to ``results.json``."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting as it was


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The experiment for parsed arguments (see :func:`main`)."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    os.makedirs(args.out, exist_ok=True)
    data = make_data(args.n_train, args.noise, args.seed)
    with torch.random.fork_rng():  # seeded model init without touching the caller's global RNG
        torch.manual_seed(args.seed)
        model = make_model()
    timing: dict[str, float] = {}

    t = time.perf_counter()
    ckpt_dir = os.path.join(args.out, "checkpoints")
    train(
        model,
        data,
        ckpt_dir,
        epochs=args.epochs,
        n_checkpoints=args.checkpoints,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=args.progress,
    )
    timing["train_s"] = time.perf_counter() - t

    ckpts = tc.load_checkpoints(ckpt_dir)  # the real workflow: score the files saved during training
    with torch.no_grad():
        pred = model(data.x_test).argmax(1)
        last = torch.func.functional_call(model, dict(ckpts[-1].params), (data.x_train,))
        loss_last = nn.functional.cross_entropy(last, data.y_train, reduction="none")

    t = time.perf_counter()
    scores = tc.self_influence(
        model,
        ckpts,
        (data.x_train, data.y_train),
        loss_fn=nn.CrossEntropyLoss(),
        batch_size=256,
        progress=args.progress,
    )
    timing["self_influence_s"] = time.perf_counter() - t

    curves = {"self_influence": detection_curve(scores, data.flipped), "loss": detection_curve(loss_last, data.flipped)}
    detection = {key: at_fractions(curve) for key, curve in curves.items()}
    detection["random"] = {f"{f:.0%}": f for f in FRACTIONS}

    t = time.perf_counter()
    test_idx = pick_test_digits(pred, data.y_test, args.n_show)
    stats_idx = list(range(args.n_stats))
    scored = sorted(set(test_idx) | set(stats_idx))  # one tc.influence call per score covers both
    shown, stats = {}, {"n_test": args.n_stats}
    for normalize, name in SCORES.items():
        found = top_k_lists(model, ckpts, data, scored, k=args.k, normalize=normalize, progress=args.progress)
        shown[name] = top_k_table(data, found, [scored.index(i) for i in test_idx], test_idx, pred)
        stats[name] = list_statistics(data, {kind: _rows(top, args.n_stats) for kind, top in found.items()}, stats_idx)
    timing["top_k_s"] = time.perf_counter() - t

    t = time.perf_counter()
    plot_curve(curves, args.noise, os.path.join(args.out, "mislabel_curve.png"))
    plot_proponents(data, shown["raw"], os.path.join(args.out, "proponents_opponents.png"))
    plot_proponents(data, shown["cosine"], os.path.join(args.out, "proponents_opponents_cosine.png"), "cosine")
    timing["plots_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t_start
    timing["total_cpu_s"] = time.process_time() - cpu_start  # all threads; wall time depends on machine load

    order = torch.argsort(scores, descending=True)
    results = {
        "settings": {
            **{key: value for key, value in vars(args).items() if key != "progress"},
            "checkpoint_epochs": checkpoint_epochs(args.epochs, args.checkpoints),
            "n_test": len(data.y_test),
            "n_flipped": int(data.flipped.sum()),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "test_accuracy": float((pred == data.y_test).double().mean()),
        "detection": detection,
        "most_self_influential": [
            {
                "index": i,
                "score": float(scores[i]),
                "given_label": int(data.y_train[i]),
                "original_label": int(data.y_clean[i]),
                "flipped": bool(data.flipped[i]),
            }
            for i in order[:20].tolist()
        ],
        "top_k": shown["raw"],
        "top_k_cosine": shown["cosine"],
        "top_k_statistics": stats,
        "timing": timing,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_summary(results, data, scores)
    phases = ", ".join(
        f"{key[:-2].replace('_', '-')} {timing[key]:.1f} s"
        for key in ("train_s", "self_influence_s", "top_k_s", "plots_s")
    )
    print(f"\ntook {timing['total_s']:.1f} s wall, {timing['total_cpu_s']:.1f} s CPU ({phases})")
    print(
        "wrote mislabel_curve.png, proponents_opponents.png, proponents_opponents_cosine.png, results.json, "
        f"checkpoints/ to {args.out}"
    )
    return results


if __name__ == "__main__":
    main()
