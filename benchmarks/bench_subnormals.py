"""Float32 products of per-example gradients kept above the subnormals (``Representation.lifted`` and the factor
kernels' ``_lifted_bmm``), against the same calls with lifting switched off, in one process, in interleaved rounds
(best of each).

Workloads: a next-token language model sure of itself, as a trained one is (2 pre-norm MLP blocks, d = 64, a
vocabulary of 500, 16 tokens; its head's weight drawn N(0, 1), so its logits over a LayerNorm'd state span about 60
and most of its softmax is below 1e-20), scored by a ``tc.BatchLoss`` of each example's mean token loss, 200 train x
20 test, 3 checkpoints:

- ``tied_lm``: the head's weight is the token embedding's (kept as both uses' factors);
- ``untied_lm``: a head of its own (materialised).

Rows: influence and self-influence, lifted and not, ``factored=False`` lifted and not, and the floor (one plain
batched forward / backward per checkpoint over the examples scored); ratios to the floor, and the max relative
difference of the lifted scores from the others.

    OMP_NUM_THREADS=1 python benchmarks/bench_subnormals.py --threads 1 [--rounds 3] [--workloads tied_lm]
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import bench_core
import real_models
import torch
import torch.nn.functional as F
from common import Rounds, ab_workloads, fmt, max_rel_diff, print_table, switched
from torch import nn

import tracin_func as tc
from tracin_func import _representations


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(self.ln(h))))


class SureLM(nn.Module):
    def __init__(self, tied: bool, vocab: int = 500, dim: int = 64) -> None:
        super().__init__()
        self.emb, self.blocks = nn.Embedding(vocab, dim), nn.Sequential(Block(dim), Block(dim))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        with torch.no_grad():
            self.head.weight.normal_(0, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.emb(ids))))


def sure_lm(tied: bool, n_train: int, n_test: int, seq_len: int = 16, seed: int = 0) -> real_models.RealWorkload:
    torch.manual_seed(seed)
    model = SureLM(tied).eval()
    ids = torch.randint(0, 500, (n_train + n_test, seq_len), generator=torch.Generator().manual_seed(seed + 1))

    def losses(params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["ids"]
        logits = torch.func.functional_call(model, dict(params), (ids,))[:, :-1]
        tokens = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        return tokens.view(ids.shape[0], -1).mean(1)

    name = "tied_lm" if tied else "untied_lm"
    return real_models.RealWorkload(
        name, model, real_models.make_checkpoints(model, seed + 2), {"ids": ids[:n_train]}, {"ids": ids[n_train:]},
        tc.BatchLoss(losses), lambda state, batch: losses(state, batch).sum(), None, "batch_loss",
    )  # fmt: skip


WORKLOADS: dict[str, Callable[[int, int], real_models.RealWorkload]] = {
    "tied_lm": lambda n_train, n_test: sure_lm(True, n_train, n_test),
    "untied_lm": lambda n_train, n_test: sure_lm(False, n_train, n_test),
}


def main(argv: Sequence[str] | None = None) -> list[list[Any]]:
    args, workloads = ab_workloads(argv, "bench_subnormals", __doc__, WORKLOADS)
    rows = []
    for w in workloads:
        timer = Rounds(args.rounds)
        floors = {q: timer.add(bench_core.real_floor(w, with_test=q == "influence")) for q in ("influence", "self")}
        calls = {}
        for factored in (None, False):
            ours = bench_core.real_ours(w, None, torch.device("cpu"), factored=factored)
            for q, on in itertools.product(ours, (True, False)):
                calls[q, factored, on] = timer.add(switched(ours[q], _representations, "_LIFTED_DTYPES", (), on))
        timer.time()
        for (question, factored, on), call in calls.items():
            if not on:
                continue
            off, floor = calls[question, factored, False], floors[question]
            rows.append([w.name, question, "default" if factored is None else "factored=False",
                         fmt(floor.seconds, ".3f"), fmt(call.seconds, ".3f"), fmt(off.seconds, ".3f"),
                         fmt(call.seconds / floor.seconds, ".2f"), fmt(off.seconds / floor.seconds, ".2f"),
                         fmt(max_rel_diff(call.result, off.result), ".1e")])  # fmt: skip
    headers = ["workload", "question", "call", "floor s", "lifted s", "not lifted s", "lifted / floor",
               "not lifted / floor", "rel. diff"]  # fmt: skip
    print_table(headers, rows, title="Subnormal products: lifted against not")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
