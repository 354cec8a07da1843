"""One rank of tests/test_distributed.py: ``python -m tests.distributed_worker RANK WORLD PORT OUT_DIR [BACKEND]
[CASES]`` (CASES ``one rank``: calls given an argument that fails on one rank alone, ``one_rank_cases``).

Runs every scorer with ``distributed=True`` (gloo on 127.0.0.1, or NCCL on the rank's GPU) on several kinds of data and
saves what it got to ``OUT_DIR/rank{RANK}.pt``; the parent test compares every rank's results with single-process ones.
:func:`spawn` starts the ranks and waits for them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import optree
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, TensorDataset

import tracin_func as tc
from tests.conftest import assert_close
from tests.models import DTYPE, MLP, random_checkpoints

LOSS = torch.nn.CrossEntropyLoss()
ROOT = Path(__file__).parents[1]


def workload():
    """The model, checkpoints and data every rank (and the parent) uses: 7 training examples."""
    torch.manual_seed(0)
    model = MLP().to(DTYPE).eval()
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(7, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (7,), generator=gen)
    xt, yt = torch.randn(3, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (3,), generator=gen)
    return model, random_checkpoints(model.state_dict(), 2), (x, y), (xt, yt)


def datasets(train):
    """Kinds of training data: split by row range (a batch, a Dataset), by batch number (a list of batches, a
    DataLoader over an IterableDataset: its batch sampler has no length), and one example (a rank with no rows)."""
    x, y = train
    return {
        "batch": train,
        "dataset": TensorDataset(x, y),
        "batches": [(x[:3], y[:3]), (x[3:5], y[3:5]), (x[5:], y[5:])],
        "stream": DataLoader(_Stream(x, y), batch_size=3),
        "one": (x[:1], y[:1]),
    }


class _Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def results(distributed, index_dir=None, device=None):
    """Everything the scorers return for each kind of data, keyed by name."""
    model, ckpts, train, test = workload()
    kw = dict(loss_fn=LOSS, distributed=distributed, batch_size=2, device=device)
    out = {}
    for name, data in datasets(train).items():
        k = 1 if name == "one" else 3
        out[f"{name}/influence"] = tc.influence(model, ckpts, data, test, **kw)
        out[f"{name}/cosine"] = tc.influence(model, ckpts, data, test, normalize="cosine", **kw)
        top = tc.top_k(model, ckpts, data, test, k=k, proponents=False, **kw)
        out[f"{name}/top_k"] = (top.indices, top.scores)
        out[f"{name}/self_influence"] = tc.self_influence(model, ckpts, data, **kw)
        out[f"{name}/embeddings"] = tc.embeddings(model, ckpts, data, projection_dim=4, **kw)
    if index_dir is not None:
        index = tc.build_index(index_dir, model, ckpts, train, shard_size=2, **kw)
        out["index/self_influence"] = index.self_influence()
        top = tc.top_k(model, ckpts, index, test, k=3, **kw)
        out["index/top_k"] = (top.indices, top.scores)
        out["index/influence"] = tc.influence(model, ckpts, index, test, **kw)
        batches = tc.build_index(f"{index_dir}_batches", model, ckpts, datasets(train)["batches"], shard_size=2, **kw)
        out["index of batches/self_influence"] = batches.self_influence()  # (each rank reads them all, in order)
        out["index of batches/embeddings"] = batches.embeddings()
    return out


class Unreadable(Mapping):
    """A batch given as a mapping other than a dict whose entries cannot be read (``as_dict`` reads them)."""

    def __getitem__(self, key):
        raise ValueError("this batch cannot be read")

    def __iter__(self):
        return iter(["x"])

    def __len__(self):
        return 1


class Unsized(Dataset):
    """A Dataset whose size cannot be read (its file gone, say): ``num_examples`` raises."""

    def __getitem__(self, i):
        raise IndexError(i)

    def __len__(self):
        raise ValueError("this dataset's size cannot be read")


def failing_checkpoints(ckpts):
    """A generator of checkpoints whose second cannot be loaded."""
    yield ckpts[0]
    raise ValueError("checkpoint 1 cannot be loaded")


def one_rank_cases(rank: int, out_dir: str) -> dict:
    """Arguments read before a call's shared checks, refused on rank 1 alone: each must be raised on every rank (the
    other rank waited in the next collective: gloo's "Connection reset by peer"). After each call the ranks compare
    the case's name: a rank left behind would fall out of step (``in step``)."""
    model, ckpts, train, test = workload()
    kw = dict(loss_fn=LOSS, distributed=True)
    index = tc.build_index(f"{out_dir}/index", model, ckpts, train, shard_size=2, **kw)
    moved = [tc.Checkpoint({k: v + 1 for k, v in c.params.items()}, c.lr) for c in ckpts]
    flipped = lambda k, v: v.flip(0) if k == "fc1.weight" else v  # noqa: E731  (rows swapped: same sum)
    permuted = [tc.Checkpoint({k: flipped(k, v) for k, v in c.params.items()}, c.lr) for c in ckpts]
    other = tc.build_index(f"{out_dir}/other{rank}", model, moved, train, shard_size=2, loss_fn=LOSS)  # (one process)
    from tracin_func import _build, _distributed

    _build._SHARED_WAIT_S = 0.5  # (folders of each rank's own: rank 1 looks for rank 0's file that long)
    summed, summary = [], _distributed._summary
    _distributed._summary = lambda setup: summed.append(1) or summary(setup)  # (counts the checkpoints' sums)
    out: dict = {"out": out_dir}
    batches = datasets(train)["batches"]
    for name, call in {
        "as_dict": lambda: tc.influence(model, ckpts, train, [test, Unreadable()][rank], **kw),
        "test size": lambda: tc.top_k(model, ckpts, train, [test, Unsized()][rank], k=2, **kw),
        "data size": lambda: tc.self_influence(model, ckpts, [train, Unsized()][rank], **kw),
        "index test size": lambda: tc.influence(model, ckpts, index, [test, Unsized()][rank], **kw),
        "index checkpoints": lambda: tc.top_k(model, [iter(ckpts), failing_checkpoints(ckpts)][rank], index, test,
                                              k=2, **kw),  # fmt: skip
        "path": lambda: tc.build_index([f"{out_dir}/index2", None][rank], model, ckpts, train, **kw),
        "unshared path": lambda: tc.build_index(f"{out_dir}/node{rank}", model, ckpts, train, shard_size=2, **kw),
        # an index query's checkpoints are checked once, against the index's fingerprint (every tensor's bytes)
        "index moved": lambda: tc.top_k(model, [ckpts, moved][rank], index, test, k=2, **kw),
        "index permuted": lambda: tc.influence(model, [ckpts, permuted][rank], index, test, **kw),
        "other index": lambda: tc.top_k(model, [ckpts, moved][rank], [index, other][rank], test, k=2, **kw),
        # (found by a review helper: raw errors, ranks out of step, gloo aborting the process, waiting)
        "interrupted": lambda: tc.self_influence(model, ckpts, train, **{**kw, "loss_fn": _interrupted_on_rank_1}),
        "other scorer": [lambda: tc.influence(model, ckpts, train, test, **kw),
                         lambda: tc.self_influence(model, ckpts, train, **kw)][rank],
        "list and stream": lambda: tc.influence(model, ckpts, [batches, iter(batches)][rank], test, **kw),
        "test budget": lambda: tc.top_k(model, ckpts, train, test, k=2, test_memory_bytes=[1 << 30, 2000][rank], **kw),
    }.items():
        try:
            call()
            out[name] = "no error"
        except BaseException as err:  # (any type: every rank must raise, naming the argument; an interrupt too)
            out[name] = f"{type(err).__name__}: {err}"
        out[f"{name} in step"] = len(set(gather_objects(name))) == 1
    summed.clear()
    out["index query"] = tc.top_k(model, ckpts, index, test, k=2, **kw).indices
    out["sums in an index query"] = len(summed)
    return out


def _interrupted_on_rank_1(outputs, target):
    if dist.get_rank() == 1:
        raise KeyboardInterrupt  # (that rank's user pressing Ctrl-C)
    return LOSS(outputs, target)


def gather_objects(value):
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, value)
    return got


def main(rank: int, world: int, port: int, out_dir: str, backend: str = "gloo", cases: str = "all") -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        if cases == "one rank":
            torch.save(one_rank_cases(rank, out_dir), f"{out_dir}/rank{rank}.pt")
            return
        if backend == "nccl":  # the scorers' results, computed and reduced on the GPU
            got = results(True, f"{out_dir}/index", device=f"cuda:{rank}")
            torch.save(optree.tree_map(torch.Tensor.cpu, got), f"{out_dir}/rank{rank}.pt")
            return
        out = results(True, f"{out_dir}/index")
        model, ckpts, train, test = workload()
        (x, y), (xt, yt) = train, test
        kw = dict(loss_fn=LOSS, distributed=True)
        bad = (x, torch.where(torch.arange(7) == 5, 9, y))  # example 5, on rank 1, has a label out of range
        try:
            tc.self_influence(model, ckpts, bad, loss_fn=LOSS, distributed=True)
        except Exception as err:  # every rank must raise, naming the failing one
            out["error"] = f"{type(err).__name__}: {err}"
        dataset = TensorDataset(x, y)
        split = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, shuffle=False))
        batched_split = DataLoader(dataset, batch_sampler=BatchSampler(DistributedSampler(dataset, shuffle=False), 2,
                                                                       False))  # fmt: skip
        lacking = [tc.Checkpoint({k: v for k, v in c.params.items() if k != "fc2.bias"}, c.lr) for c in ckpts]
        moved = [tc.Checkpoint({k: v + rank for k, v in c.params.items()}, c.lr) for c in ckpts]
        flipped = lambda k, v: v.flip(0) if rank and k == "fc1.weight" else v  # noqa: E731  (rows swapped: same sum)
        permuted = [tc.Checkpoint({k: flipped(k, v) for k, v in c.params.items()}, c.lr) for c in ckpts]
        index = tc.open_index(f"{out_dir}/index")
        for name, call in {
            "sampler": lambda: tc.self_influence(model, ckpts, split, loss_fn=LOSS, distributed=True),
            "batch sampler": lambda: tc.self_influence(model, ckpts, batched_split, loss_fn=LOSS, distributed=True),
            "sampler, influence": lambda: tc.influence(model, ckpts, split, test, loss_fn=LOSS, distributed=True),
            # a test side, and build_index's training data, already split: each rank's test half was scored against
            # its own share and the halves summed, an index built of one rank's rows (found by review, 2026-12-07)
            "sampler, test": lambda: tc.influence(model, ckpts, train, split, loss_fn=LOSS, distributed=True),
            "sampler, index": lambda: tc.build_index(f"{out_dir}/split", model, ckpts, split, loss_fn=LOSS,
                                                     distributed=True),  # fmt: skip
            # lists of batches of different lengths: the shorter's width, a batch lost (found by review, 2026-12-07)
            "list lengths": lambda: tc.influence(model, ckpts, [(x[i : i + 2], y[i : i + 2]) for i in range(0, 6 + rank,
                                                 2)], test, **kw),  # fmt: skip
            "embeddings": lambda: tc.embeddings(model, moved, train, **kw),  # (no check at all)
            "test sizes": lambda: tc.influence(model, ckpts, train, (xt[: 1 + rank], yt[: 1 + rank]), **kw),
            # a failure in the call's setup on rank 1 alone (the other rank waited in the first collective)
            "setup": lambda: tc.self_influence(model, ckpts if rank == 0 else lacking, train, **kw),
            # each left the other rank in the next collective (found by review on 2026-12-05): the calls after them
            # check that the ranks stay in step
            "sampler on one rank": lambda: tc.self_influence(model, ckpts, split if rank else dataset, **kw),
            "index setup": lambda: tc.influence(model, ckpts if rank == 0 else lacking, index, test, **kw),
            "index test sizes": lambda: tc.top_k(model, ckpts, index, (xt[: 1 + rank], yt[: 1 + rank]), k=2, **kw),
            "k": lambda: tc.top_k(model, ckpts, train, test, k=3 + rank, **kw),  # (gloo aborted the process)
            # an argument refused on one rank alone (the other rank waited in the first collective: gloo's connection
            # error there), before a call and after an index's setup
            "k on one rank": lambda: tc.top_k(model, ckpts, train, test, k=[3, 0][rank], **kw),
            "normalize on one rank": lambda: tc.influence(model, ckpts, train, test, normalize=[None, "l2"][rank],
                                                          **kw),  # fmt: skip
            "projection on one rank": lambda: tc.embeddings(model, ckpts, train, projection_dim=[4, 0][rank], **kw),
            "rerank on one rank": lambda: tc.top_k(model, ckpts, index, test, k=2, rerank=[train, test][rank], **kw),
            "checkpoints": lambda: tc.influence(model, moved, train, test, **kw),  # (mixed into one result)
            # (each mixed into one result, silently, found by review on 2026-12-05)
            "params": lambda: tc.influence(model, ckpts, train, test, params=[None, ["fc2.weight"]][rank], **kw),
            "loss": lambda: tc.self_influence(model, ckpts, train, loss_fn=torch.nn.CrossEntropyLoss(
                label_smoothing=0.1 * rank), distributed=True),
            "permuted": lambda: tc.self_influence(model, permuted, train, **kw),
            "dtype": lambda: tc.self_influence(model, ckpts, train, dtype=[torch.float64, torch.float32][rank], **kw),
        }.items():
            try:
                call()
            except (ValueError, RuntimeError) as err:
                out[name] = f"{type(err).__name__}: {err}"
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out: Path, world: int, backend: str = "gloo", cases: str = "all", timeout: float = 300) -> list[dict]:
    """Run ``world`` ranks of this module, each stopping by itself within the timeout (killed after ``timeout``
    seconds); every rank's results."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed_worker", str(r), str(world), str(port), str(out), backend,
             cases],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world)
    ]  # fmt: skip
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_same_results(got: dict, single: dict) -> None:
    """A rank's results equal the single-process ones (top-k indices exactly, every number to 1e-12)."""
    assert set(single) <= set(got)
    for name, expected in single.items():
        if name.endswith("top_k"):
            assert torch.equal(got[name][0], expected[0]), name
            assert_close(got[name][1], expected[1], 1e-12, msg=name)
        else:
            assert_close(got[name], expected, 1e-12, msg=name)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:])
