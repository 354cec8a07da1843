"""Run every benchmark module and print its tables; flags pass through to each module (each ignores, and names,
those it does not take).

Usage::

    python benchmarks/run_all.py                      # full run
    python benchmarks/run_all.py --quick              # quick check (subsampled transformer, one timed run)
    python benchmarks/run_all.py --workloads mlp cnn --json results.json

``--json PATH`` (handled here) writes every module's result rows to PATH; every other flag goes to the modules.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_adapter  # noqa: E402
import bench_core  # noqa: E402
import bench_speed  # noqa: E402

MODULES = [("core", bench_core), ("adapter", bench_adapter), ("speed", bench_speed)]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="Run all tracin_func benchmarks.", add_help=False)
    parser.add_argument("--json", metavar="PATH", help="write all result rows as JSON to PATH")
    parser.add_argument("--only", nargs="+", choices=[n for n, _ in MODULES], help="run only these modules")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        print("\nOther flags are passed to every module:\n")
        for _, module in MODULES:
            try:
                module.main(["--help"])
            except SystemExit:
                pass
        return []
    results: list[dict[str, Any]] = []
    for name, module in MODULES:
        if args.only and name not in args.only:
            continue
        print(f"=== bench {name} ===\n")
        start = time.perf_counter()
        results.extend(module.main(rest))
        print(f"=== bench {name} done in {time.perf_counter() - start:.0f} s ===\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results written to {args.json}")
    return results


if __name__ == "__main__":
    main()
