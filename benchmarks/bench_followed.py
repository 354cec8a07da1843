"""Parameters read directly, outside every layer's call, followed to where they meet the batch (elementwise, or as
weights in matrix products), against the route before (those parameters, with the layers it materialises, through
``vmap(grad)``: following switched off), in one process, in interleaved rounds (best of each).

Workloads (200 train x 20 test, 3 checkpoints, float32):

- ``relative``: self-attention with a relative-position table read directly (``table[offsets]``), whose forward
  masks padding only when the batch has some (``if not bool(mask.all())``, as transformers' mask helpers decide):
  vmap cannot run it, so before it took the per-example loop;
- ``beit``: transformers' BEiT (2 layers, d = 64, 32 x 32 images, patch 4), its relative position tables and layer
  scales read directly;
- ``falcon``: transformers' Falcon causal LM (2 layers, d = 64, 4 heads, 32 tokens, vocabulary 1000), whose
  ``FalconLinear`` computes ``input @ self.weight.T + self.bias`` itself: every projection's weight read directly and
  followed to its product with the batch;
- ``clip_text``: a text tower as CLIP's (d = 64, one encoder layer, 32 tokens), its position table and
  ``text_projection`` held as raw parameters (``x[:, 0] @ self.text_projection``), the rest ``nn`` layers.

Rows: influence and self-influence, followed and not, and the floor (one plain batched forward / backward per
checkpoint over the examples scored: train and test for influence, train for self-influence); ratios to the floor,
and the max relative difference of the followed scores from the others (both routes are exact).

    OMP_NUM_THREADS=1 python benchmarks/bench_followed.py --threads 1 [--rounds 3] [--workloads relative]
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import bench_core
import real_models
import torch
from common import Rounds, ab_workloads, fmt, max_rel_diff, print_table, switched
from torch import nn

from tracin_func import _plan


class RelativeAttention(nn.Module):
    """One self-attention layer with a relative-position table ``[2T - 1, H]`` indexed by a buffer of offsets, the
    padding masked only when the batch has some, mean-pooled into a classifier."""

    def __init__(self, vocab: int = 1000, dim: int = 64, heads: int = 4, seq_len: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.tok, self.qkv, self.out = nn.Embedding(vocab, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, classes)
        self.table = nn.Parameter(0.1 * torch.randn(2 * seq_len - 1, heads))
        positions = torch.arange(seq_len)
        self.register_buffer("offsets", positions[:, None] - positions[None] + seq_len - 1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        q, k, v = self.qkv(self.tok(ids)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + self.table[self.offsets[:t, :t]].permute(2, 0, 1)
        keep = (torch.arange(t) < lengths[:, None])[:, None, None, :]
        if not bool(keep.all()):  # a branch on the data: vmap cannot run it
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        hidden = self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
        return self.fc(torch.tanh(hidden).mean(1))


class ClipText(nn.Module):
    """A text tower as CLIP's (OpenAI's and open_clip's code): token embeddings plus a position table held as a raw
    parameter, a transformer encoder layer, a final LayerNorm, and the first token's features times a raw
    ``text_projection`` matrix (``x @ self.text_projection``); then a Linear classifier."""

    def __init__(self, vocab: int = 1000, dim: int = 64, heads: int = 4, seq_len: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.tok, self.ln = nn.Embedding(vocab, dim), nn.LayerNorm(dim)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(seq_len, dim))
        self.layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.text_projection = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.fc = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.ln(self.layer(self.tok(ids) + self.positional_embedding[: ids.shape[1]]))
        return self.fc(x[:, 0] @ self.text_projection)


def clip_text(n_train: int, n_test: int, seq_len: int = 32, seed: int = 0) -> real_models.RealWorkload:
    torch.manual_seed(seed)
    model = ClipText(seq_len=seq_len).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    ids = torch.randint(1, 1000, (n, seq_len), generator=generator)
    y = torch.randint(0, 4, (n,), generator=generator)
    return real_models._classified("clip_text", model, (ids,), y, n_train, seed)


def relative(n_train: int, n_test: int, seq_len: int = 32, seed: int = 0) -> real_models.RealWorkload:
    torch.manual_seed(seed)
    model = RelativeAttention(seq_len=seq_len).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    lengths = real_models._lengths(n, seq_len, generator)
    ids = torch.randint(1, 1000, (n, seq_len), generator=generator) * (torch.arange(seq_len) < lengths[:, None])
    y = torch.randint(0, 4, (n,), generator=generator)
    return real_models._classified("relative", model, (ids, lengths), y, n_train, seed)


def beit(n_train: int, n_test: int, seed: int = 0) -> real_models.RealWorkload:
    from transformers import BeitConfig, BeitForImageClassification

    config = BeitConfig(
        image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        num_labels=4, use_relative_position_bias=True,
    )  # fmt: skip
    hf = real_models._hf_model(BeitForImageClassification, config, torch.float32, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    data = {"pixel_values": torch.randn(n, 3, 32, 32, generator=generator),
            "labels": torch.randint(0, 4, (n,), generator=generator)}  # fmt: skip
    checkpoints = real_models.make_checkpoints(hf, seed + 2)
    return real_models._hf_workload("beit", hf, checkpoints, data, n_train, "batch_loss", nn.CrossEntropyLoss())


def _not_followed(*args: Any, **kwargs: Any) -> dict:  # (planning's `_followed` off: read directly, left to vmap)
    return {}


WORKLOADS: dict[str, Callable[[int, int], real_models.RealWorkload]] = {
    "relative": relative, "beit": beit, "falcon": real_models.falcon, "clip_text": clip_text
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> list[list[Any]]:
    args, workloads = ab_workloads(argv, "bench_followed", __doc__, WORKLOADS)
    rows = []
    for w in workloads:
        ours = bench_core.real_ours(w, None, torch.device("cpu"))
        timer = Rounds(args.rounds)
        floors = {q: timer.add(bench_core.real_floor(w, with_test=q == "influence")) for q in ("influence", "self")}
        questions = ("influence", "self")
        calls = {
            (q, on): timer.add(switched(ours[q], _plan, "_followed", _not_followed, on))
            for q in questions
            for on in (True, False)
        }
        timer.time()
        for question, floor in floors.items():
            on, off = calls[question, True], calls[question, False]
            rows.append([w.name, question, fmt(floor.seconds, ".3f"), fmt(on.seconds, ".3f"), fmt(off.seconds, ".3f"),
                         fmt(on.seconds / floor.seconds, ".2f"), fmt(off.seconds / floor.seconds, ".2f"),
                         fmt(max_rel_diff(on.result, off.result), ".1e")])  # fmt: skip
    headers = ["workload", "question", "floor s", "followed s", "before s", "followed / floor", "before / floor",
               "rel. diff"]  # fmt: skip
    print_table(headers, rows, title="Parameters read directly: followed against vmap(grad)")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
