"""torch.distributed: two gloo ranks on 127.0.0.1, spawned by the test, return the single-process results."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import tracin_func as tc
from tests.distributed_worker import assert_same_results, free_port, results, spawn


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every rank's results (two processes, each stopping by itself within the timeout)."""
    out = tmp_path_factory.mktemp("ranks")
    return out, spawn(out, 2)


def test_every_rank_returns_the_single_process_result(ranks, tmp_path):
    out, per_rank = ranks
    single = results(False, tmp_path / "index")
    for got in per_rank:
        assert_same_results(got, single)
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    for index in ("index", "index_batches"):  # shards written by two ranks, byte for byte (a list of batches: streamed)
        assert files(out / index) == files(tmp_path / index)


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
        assert "DistributedSampler, which already gives each rank a part" in got["batch sampler"]
        assert "DistributedSampler, which already gives each rank a part" in got["sampler, influence"]
        assert "`test` is a DataLoader with a DistributedSampler, which already gives" in got["sampler, test"]
        assert "`train` is a DataLoader with a DistributedSampler, which already gives" in got["sampler, index"]
        assert "The ranks disagree on the training examples' number where known before reading" in got["list lengths"]
        assert "[6, 7] (rank by rank)" in got["list lengths"]
        assert "The ranks disagree on the checkpoints" in got["embeddings"]
        assert "The ranks disagree on the number of test examples: [1, 2]" in got["test sizes"]
        assert "The ranks disagree on the options: [(3, True, False, None), (4, True, False, None)]" in got["k"]
        assert "The ranks disagree on the checkpoints (their learning rates, tensors' sums" in got["checkpoints"]
        assert "The ranks disagree on the checkpoints" in got["permuted"]
        assert "The ranks disagree on the parameters differentiated (`params`, `layers`, `method`)" in got["params"]
        assert "The ranks disagree on the losses (`loss_fn`, `test_loss_fn`)" in got["loss"]
        assert "The ranks disagree on the computation dtype (`dtype`)" in got["dtype"]  # (named the checkpoints)


def test_a_failure_in_one_ranks_setup_is_raised_on_every_rank(ranks):
    """A call's checks and setup ran before any collective: raised on one rank, they left the other waiting."""
    _, per_rank = ranks
    assert per_rank[1]["setup"].startswith("ValueError: `checkpoints[0]` does not match the model: missing")
    assert per_rank[0]["setup"].startswith("RuntimeError: rank 1 failed, so this rank stops too: ValueError")
    # (an index query's setup, and a DistributedSampler on one rank: found by review, the ranks fell out of step)
    assert per_rank[1]["index setup"].startswith("ValueError: `checkpoints[0]` does not match the model: missing")
    assert per_rank[0]["index setup"].startswith("RuntimeError: rank 1 failed, so this rank stops too: ValueError")
    assert "DistributedSampler, which already gives each rank a part" in per_rank[1]["sampler on one rank"]
    assert per_rank[0]["sampler on one rank"].startswith("RuntimeError: rank 1 failed, so this rank stops too")
    for got in per_rank:
        assert "The ranks disagree on the number of test examples: [1, 2]" in got["index test sizes"]
    for name, refused in {
        "k on one rank": "ValueError: `k` must be a positive int, got 0",
        "normalize on one rank": "ValueError: `normalize`='l2' is not allowed",
        "projection on one rank": "ValueError: `projection_dim` must be a positive int, got 0",
        "rerank on one rank": "ValueError: `rerank` must be the training data the index was built from",
    }.items():  # (refused on rank 1 alone: rank 0 waited in the first collective, or failed with gloo's error)
        assert per_rank[1][name].startswith(refused.split(":")[0]) and refused in per_rank[1][name], name
        assert per_rank[0][name].startswith(f"RuntimeError: rank 1 failed, so this rank stops too: {refused}"), name


def test_nccl_needs_a_gpu_device(monkeypatch):
    """NCCL reduces GPU tensors only: a call computing on the CPU is refused before any work, naming the fix (a
    one-rank gloo group in this process stands in for NCCL, its backend's name patched)."""
    model = torch.nn.Linear(2, 2)
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=1.0)]
    data = (torch.randn(3, 2), torch.tensor([0, 1, 0]))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        with pytest.raises(ValueError, match=r"over NCCL.*`device`='cpu': pass `device='cuda'`"):
            tc.self_influence(model, ckpts, data, loss_fn=torch.nn.CrossEntropyLoss(), distributed=True)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """Every rank's outcomes of calls given an argument that fails on rank 1 alone (killed after 180 s: a rank left
    waiting in a collective shows as a timeout, not a frozen run)."""
    return spawn(tmp_path_factory.mktemp("one_rank"), 2, cases="one rank", timeout=180)


def test_an_argument_read_before_the_checks_is_raised_on_every_rank(one_rank):
    """The data (`as_dict`, its size), the checkpoints of an index query (a generator, listed) and an index's `path`
    were read before a call's shared checks: failing on rank 1 alone, they left rank 0 in the next collective."""
    for name, refused in {
        "as_dict": "ValueError: this batch cannot be read",
        "test size": "ValueError: this dataset's size cannot be read",
        "data size": "ValueError: this dataset's size cannot be read",
        "index test size": "ValueError: this dataset's size cannot be read",
        "index checkpoints": "ValueError: checkpoint 1 cannot be loaded",
        "path": "TypeError: `path` must be the index directory, a str or os.PathLike",
    }.items():
        assert one_rank[1][name].startswith(refused), (name, one_rank[1][name])
        assert one_rank[0][name].startswith(f"RuntimeError: rank 1 failed, so this rank stops too: {refused}"), name
        assert one_rank[0][f"{name} in step"] and one_rank[1][f"{name} in step"], name


def test_ranks_interrupted_or_making_other_calls_are_refused_on_every_rank(one_rank):
    """Found by a review helper: a KeyboardInterrupt on one rank left the other waiting (or paired with the next
    call's collectives); ranks calling different scorers got a raw `KeyError` or each other's arguments as an error;
    a list on one rank and a stream on the other, or another test budget, aborted the process in gloo."""
    assert one_rank[1]["interrupted"].startswith("KeyboardInterrupt")
    assert one_rank[0]["interrupted"].startswith("RuntimeError: rank 1 failed, so this rank stops too: KeyboardInt")
    for got in one_rank:
        assert got["other scorer"].startswith("ValueError: The ranks are at different steps of a call: "), got
        assert "The ranks disagree on the training examples' number where known before reading" in got[
            "list and stream"]  # fmt: skip
        assert "The ranks disagree on the options shaping the work (`factored`, `batch_size`, `chunk_size`, " in got[
            "test budget"]  # fmt: skip
        assert all(got[f"{name} in step"] for name in ("interrupted", "other scorer", "list and stream"))


def test_checkpoints_holding_a_nan_compare_equal():
    """Identical checkpoints with a NaN in a tensor the call does not read were refused as the ranks disagreeing (a
    NaN sum is not equal to itself)."""
    from types import SimpleNamespace

    from tracin_func import _distributed

    setup = SimpleNamespace(checkpoints=[SimpleNamespace(lr=0.1, state={"w": torch.tensor([float("nan"), 1.0])},
                                                         adam=None)])  # fmt: skip
    assert _distributed._summary(setup) == _distributed._summary(setup)


def test_ranks_building_an_index_in_folders_of_their_own_are_refused(one_rank):
    """Each rank given a folder of its own (no shared filesystem) built part of an index in each, then failed naming a
    missing shard and asked for the same call again, which failed alike (a review helper's trial)."""
    refused = "ValueError: `path`='{}/node1' is not one directory every rank sees: rank 1 does not see the file"
    assert one_rank[1]["unshared path"].startswith(refused.format(one_rank[1]["out"])), one_rank[1]["unshared path"]
    assert one_rank[0]["unshared path"].startswith(f"RuntimeError: rank 1 failed, so this rank stops too: "
                                                   f"{refused.format(one_rank[1]['out'])}")  # fmt: skip
    assert one_rank[0]["unshared path in step"] and one_rank[1]["unshared path in step"]
    assert not [f for f in os.listdir(f"{one_rank[0]['out']}/node0") if "ranks" in f]  # (rank 0's file removed)


def test_an_index_query_checks_the_checkpoints_once_and_still_refuses_others_on_one_rank(one_rank):
    """An index query compares each rank's checkpoints with the index's fingerprint (every tensor's bytes), not
    again by their sums over the ranks; checkpoints other than the index's on one rank (moved, or permuted: equal
    sums) are refused on every rank, and so are ranks given other indexes, each matching its own checkpoints."""
    for name in ("index moved", "index permuted"):
        refused = "ValueError: `train` is an index built with other settings than this call's: the tensors of"
        assert one_rank[1][name].startswith(refused), (name, one_rank[1][name])
        assert one_rank[0][name].startswith(f"RuntimeError: rank 1 failed, so this rank stops too: {refused}"), name
    for got in one_rank:
        assert got["other index"].startswith("ValueError: The ranks disagree on the index (its settings' digest)")
        assert got["sums in an index query"] == 0  # (the checkpoints' float64 sums: a second pass over every tensor)
    assert torch.equal(one_rank[0]["index query"], one_rank[1]["index query"])


def test_an_arguments_error_is_raised_before_distributeds():
    """`distributed` was read before the other checks: an argument's error was hidden by `distributed`'s."""
    model = torch.nn.Linear(2, 2)
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=1.0)]
    data = (torch.randn(3, 2), torch.tensor([0, 1, 0]))
    for distributed in ("yes", True):  # (refused; no process group)
        with pytest.raises(ValueError, match="`k` must be a positive int, got 0"):
            tc.top_k(model, ckpts, data, data, k=0, loss_fn=torch.nn.CrossEntropyLoss(), distributed=distributed)
        with pytest.raises(TypeError, match=r"`self_influence` got unknown option\(s\) \['foo'\]"):
            tc.self_influence(model, ckpts, data, loss_fn=torch.nn.CrossEntropyLoss(), distributed=distributed, foo=1)
