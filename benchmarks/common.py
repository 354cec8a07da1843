"""Shared benchmark helpers: timing, peak memory of a call, score comparison, plain-text tables."""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tracin_func._allocator import keep_freed_batches

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    """Resident set size of this process, from ``/proc/self/statm`` (Linux); 0 where it is unavailable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so an RSS baseline is not inflated by earlier calls."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RssSampler:
    """Background thread recording the peak RSS every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def peak_memory_mb(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, Any]:
    """Run ``fn()`` once; return (peak memory it added in MB, its result).

    CPU: peak RSS sampled every ~1 ms by a background thread, minus the RSS just before the call (after garbage
    collection and ``malloc_trim``). Allocations that live shorter than the sampling interval can be missed.
    CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call (device memory only).
    """
    device = torch.device(device)
    _release_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, result
    before = _rss_bytes()
    with _RssSampler() as sampler:
        result = fn()
    return max(sampler.peak - before, 0) / 2**20, result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], repeat: int = 3, device: str | torch.device = "cpu") -> tuple[float, Any]:
    """Best wall time (``time.perf_counter``) of ``repeat`` calls of ``fn()``; return (seconds, last result)."""
    device = torch.device(device)
    best, result = float("inf"), None
    for _ in range(max(repeat, 1)):
        result = None
        gc.collect()
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


@dataclass
class Measurement:
    seconds: float
    peak_mb: float
    result: Any
    runs: int


def measure(fn: Callable[[], Any], repeat: int = 3, device: str | torch.device = "cpu") -> Measurement:
    """Peak memory of one call (its own run, which also warms up), then the best time of ``repeat`` further calls.

    With ``repeat=0`` the memory run is also the only timed run (for calls that take minutes); its time then
    includes the first-call warm-up and the ~1 ms sampler thread.
    """
    device = torch.device(device)
    _sync(device)
    start = time.perf_counter()
    peak, result = peak_memory_mb(fn, device)
    _sync(device)
    first = time.perf_counter() - start
    if repeat <= 0:
        return Measurement(first, peak, result, 1)
    result = None
    seconds, result = best_time(fn, repeat, device)
    return Measurement(seconds, peak, result, repeat)


def quiet(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with its warnings (a slow-path warning on every call of ``factored=False``) silenced."""

    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()

    return run


class Rounds:
    """Calls timed in interleaved rounds: each call's memory run when added (``measure(fn, 0)``, which also warms it
    up and gives its result), then ``time()`` runs ``repeat`` rounds, each timing every call once, and keeps each
    call's best. Timed back to back, a call and the floor it is divided by ran minutes apart, while this machine's
    speed drifts by 10-40% over minutes: a GPT-2 table timed so caught its floor in a fast stretch (forward only came
    out at 0.60x the floor and the forward / backward bound at 1.09x, above the floor it bounds; in rounds, 0.43x
    and 0.87x). In rounds, drift shifts every call alike."""

    def __init__(self, repeat: int, device: str | torch.device = "cpu") -> None:
        self.repeat, self.device = repeat, torch.device(device)
        self.calls: list[tuple[Callable[[], Any], Measurement]] = []

    def add(self, fn: Callable[[], Any]) -> Measurement:
        """``fn``'s memory run; its ``seconds`` are that run's until ``time()`` (``repeat`` 0: for good)."""
        m = measure(fn, 0, self.device)
        self.calls.append((fn, m))
        return m

    def time(self) -> None:
        """``repeat`` rounds over the calls added since the last ``time()``; each measurement's seconds become its
        best round's."""
        calls, self.calls = self.calls, []
        if self.repeat <= 0:
            return
        best = [float("inf")] * len(calls)
        for _ in range(self.repeat):
            for i, (fn, _) in enumerate(calls):
                best[i] = min(best[i], best_time(fn, 1, self.device)[0])
        for (_, m), seconds in zip(calls, best):
            m.seconds, m.runs = seconds, self.repeat


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64 on the CPU (``b`` is the reference); inf if the shapes differ."""
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def environment() -> list[tuple[str, str]]:
    """Versions, threads and hardware, for the header of every benchmark."""
    rows = [
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("torch threads", f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"),
        (
            "cpu count",
            f"{os.cpu_count()} (affinity {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'})",
        ),
        ("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"),
    ]
    for name in ("captum", "dattri", "tracin_func"):
        try:
            rows.append((name, importlib.metadata.version(name.replace("_", "-"))))
        except importlib.metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        rows.append(("load average", load))
    except OSError:
        pass
    return rows


def print_kv(title: str, rows: Sequence[tuple[str, str]], file: Any = None) -> None:
    file = file or sys.stdout
    print(title, file=file)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=file)
    print(file=file)


def fmt(value: Any, spec: str = "") -> str:
    """Format a table cell: ``None`` as ``-``, floats with ``spec``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return format(value, spec) if spec else f"{value:.3g}"
    return str(value)


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    title: str | None = None,
    align: str | None = None,
    file: Any = None,
) -> None:
    """Plain fixed-width text table of ``str(cell)``.

    ``align``: one letter per column, ``l`` or ``r``; by default the first column is left-aligned, the rest right.
    """
    file = file or sys.stdout
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(widths[i]) if align[i] == "l" else v.rjust(widths[i]) for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    if title:
        print(title, file=file)
    print(line(headers), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print(line(row), file=file)
    print(file=file)


def captum_loader(model: torch.nn.Module, path: str) -> float:
    """Captum ``checkpoints_load_func``: load a ``{"model_state_dict", "learning_rate"}`` file into ``model`` and
    return its learning rate (Captum's default loader cannot carry one)."""
    device = next(model.parameters()).device
    obj = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(obj["model_state_dict"])
    return float(obj["learning_rate"])


def begin_bench(threads: int | None, *header: str) -> None:
    """Set torch's thread count, print the environment and the bench's header lines, and warn when the machine is
    busy (other processes competing for the cores slow multi-threaded batched kernels most)."""
    if threads is not None:
        torch.set_num_threads(threads)
    keep_freed_batches()  # as a scoring call does, before the floor or any peer runs
    print_kv("environment", environment())
    for line in header:
        print(line)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > (os.cpu_count() or 1) * 0.75:
        print(
            f"WARNING: load average {load:.1f} on {os.cpu_count()} CPUs: timings are unreliable (batched kernels "
            f"suffer most from oversubscription; consider --threads 1)."
        )
    print()


def switched(fn: Callable[[], Any], owner: Any, name: str, off: Any, on: bool) -> Callable[[], Any]:
    """``fn`` run with ``owner.name`` as it is (``on``) or replaced by ``off`` for the call (a feature switched off):
    an A/B pair in one process."""

    def run() -> Any:
        if on:
            return fn()
        original = getattr(owner, name)
        setattr(owner, name, off)
        try:
            return fn()
        finally:
            setattr(owner, name, original)

    return run


def ab_workloads(argv: Sequence[str] | None, prog: str, doc: str, workloads: Mapping[str, Callable[[int, int], Any]]):
    """The arguments of a bench timing one feature on against off on real workloads (``bench_followed``,
    ``bench_subnormals``), the bench begun (``begin_bench``), and each chosen workload built and described with its
    batching, in turn: ``(args, iterator of workloads)``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], prog=prog)
    parser.add_argument("--workloads", nargs="+", choices=sorted(workloads), default=list(workloads), metavar="NAME")
    parser.add_argument("--train", type=int, default=200, help="training examples (default 200)")
    parser.add_argument("--test", type=int, default=20, help="test examples (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds, best kept (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    begin_bench(args.threads, f"{args.test} test x {args.train} train, best of {args.rounds} interleaved rounds")

    def built() -> Iterator[Any]:
        import tracin_func as tc

        for name in args.workloads:
            w = workloads[name](args.train, args.test)
            print(f"{w.describe()}: {tc.explain(w.model, w.checkpoints, w.train, loss_fn=w.loss_fn).batching}")
            yield w

    return args, built()
