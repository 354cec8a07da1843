"""torch.distributed: two gloo ranks on 127.0.0.1, spawned by the test, return the single-process results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tracin_func as tc
from tests.conftest import assert_close
from tests.distributed_worker import results

ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every rank's results (two processes, each stopping by itself within the timeout)."""
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed_worker", str(r), "2", str(port), str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_every_rank_returns_the_single_process_result(ranks, tmp_path):
    out, per_rank = ranks
    single = results(False, tmp_path / "index")
    for got in per_rank:
        assert set(single) <= set(got)
        for name, expected in single.items():
            if name.endswith("top_k"):
                assert torch.equal(got[name][0], expected[0]), name
                assert_close(got[name][1], expected[1], 1e-12, msg=name)
            else:
                assert_close(got[name], expected, 1e-12, msg=name)
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(out / "index") == files(tmp_path / "index")  # shards written by two ranks, byte for byte


def test_a_failure_on_one_rank_is_raised_on_every_rank(ranks):
    _, per_rank = ranks
    assert per_rank[1]["error"].startswith("IndexError: `data` example 5 cannot be scored")
    assert per_rank[0]["error"].startswith("RuntimeError: rank 1 failed, so this rank stops too: IndexError")


def test_distributed_needs_a_process_group():
    assert not dist.is_initialized()
    model = torch.nn.Linear(2, 2)
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=1.0)]
    data = (torch.randn(3, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(RuntimeError, match="needs an initialised process group.*torchrun"):
        tc.self_influence(model, ckpts, data, loss_fn=torch.nn.CrossEntropyLoss(), distributed=True)
    with pytest.raises(TypeError, match="`distributed` must be False, True"):
        tc.self_influence(model, ckpts, data, loss_fn=torch.nn.CrossEntropyLoss(), distributed="yes")


def test_data_already_split_or_differing_between_ranks_is_refused_on_every_rank(ranks):
    _, per_rank = ranks
    for got in per_rank:
        assert "DistributedSampler, which already gives each rank a part" in got["sampler"]
        assert "The ranks disagree on the number of test examples: [1, 2]" in got["test sizes"]
