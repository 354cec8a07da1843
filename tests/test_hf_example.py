"""End-to-end check of ``examples/hf_text_classifier.py``: a small BERT trained with AdamW on dict batches, its
flipped labels found by self-influence and its test sentences' proponents sharing their label."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_text_classifier.py"


def test_hf_example_finds_flipped_labels_and_proponents_of_the_same_label():
    spec = importlib.util.spec_from_file_location("hf_text_classifier", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # seeds 0-3: accuracy 0.975-1.00, 80-100% of the flips among the top 40 (seed 1: 100% with one or two threads),
    # proponents 100% / opponents 0% of the test sentence's label
    got = module.main(["--seed", "1"])
    assert got["accuracy"] >= 0.9 and got["found"] >= 0.8, got
    assert got["proponents"] >= 0.9 and got["opponents"] <= 0.1, got
