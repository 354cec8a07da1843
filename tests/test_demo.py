"""End-to-end check of the main demo, ``examples/mislabel_digits.py``, on a small setting."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

DEMO = Path(__file__).resolve().parents[1] / "examples" / "mislabel_digits.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Seeds 0-3 of this setting find 85-95% of the flips in the top 10% and all of them in the top 30%.
SMALL = ["--n-train", "400", "--epochs", "20", "--batch-size", "32", "--n-show", "2", "--k", "3", "--no-progress"]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("mislabel_digits", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_detection_curve_counts_flips_in_ranking_order(demo):
    flipped = torch.tensor([False, True, False, True])
    perfect = demo.detection_curve(torch.tensor([0.0, 2.0, 1.0, 3.0]), flipped)
    assert perfect.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    worst = demo.detection_curve(torch.tensor([3.0, 0.0, 2.0, 1.0]), flipped)
    assert worst.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0]


def test_flips_change_every_chosen_label(demo):
    data = demo.make_data(500, 0.2, seed=3)
    assert int(data.flipped.sum()) == 100
    assert bool((data.y_train[data.flipped] != data.y_clean[data.flipped]).all())
    assert bool((data.y_train[~data.flipped] == data.y_clean[~data.flipped]).all())


def test_demo_end_to_end(demo, tmp_path, capsys):  # ~5 s on 2 cores
    results = demo.main([*SMALL, "--seed", "0", "--out", str(tmp_path)])

    for name in ("mislabel_curve.png", "proponents_opponents.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    assert len(list((tmp_path / "checkpoints").glob("ckpt-epoch-*.pt"))) == 5
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"settings", "detection", "test_accuracy", "most_self_influential", "top_k", "timing"} <= set(saved)
    assert saved["detection"] == results["detection"]
    assert set(saved["detection"]) == {"self_influence", "loss", "random"}
    assert set(saved["detection"]["self_influence"]) == {"10%", "20%", "30%"}
    assert len(saved["top_k"]) == 2
    for item in saved["top_k"]:
        props, opps = item["proponents"]["scores"], item["opponents"]["scores"]
        assert len(props) == len(opps) == 3
        assert props == sorted(props, reverse=True) and opps == sorted(opps)
        assert props[0] > opps[0]

    # 40 of 400 labels flipped: a random order finds ~10% / ~30% of them in the top 10% / 30%.
    found = saved["detection"]["self_influence"]
    assert found["10%"] >= 0.6, found
    assert found["30%"] >= 0.8, found

    out = capsys.readouterr().out.strip().splitlines()
    assert str(tmp_path) in out[-1]
