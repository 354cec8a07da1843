"""The on-disk index: exact against the float64 loop reference, resumable byte for byte after a kill, refusing
mismatched settings, naming damaged shards; queries, re-ranking and the test side in chunks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tracin_func as tc
from tests.conftest import assert_close, assert_topk
from tests.models import DTYPE, MLP, cnn_task, random_checkpoints
from tests.reference import reference_scores
from tracin_func import _build, _shards

N, N_TEST = 23, 5
LOSS = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    model = MLP().to(DTYPE).eval()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(N, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (N,), generator=gen)
    xt, yt = torch.randn(N_TEST, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (N_TEST,), generator=gen)
    ckpts = random_checkpoints(model.state_dict(), 3)
    return model, ckpts, (x, y), (xt, yt), reference_scores(model, ckpts, (x, y), (xt, yt), loss_fn=LOSS)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_exact_index_matches_the_loop_reference(task, tmp_path):
    model, ckpts, train, test, ref = task
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=DTYPE, shard_size=7, batch_size=4)
    assert len(index) == N and index.dim == ref.train_embeddings.shape[1] and len(index.shards) == 4
    assert_close(index.self_influence(), ref.self_influence)
    assert_close(index.embeddings(), ref.train_embeddings)
    assert_close(index.embeddings([22, 0, 8, -1]), ref.train_embeddings[[22, 0, 8, 22]])
    assert_close(index.embeddings(slice(None, None, -3)), ref.train_embeddings.flip(0)[::3])  # (a negative step: a
    assert_close(index.embeddings(range(5, 1, -2)), ref.train_embeddings[[5, 3]])  # bare ValueError of torch's)
    assert index.embeddings(range(0)).shape == (0, index.dim)
    assert_close(tc.influence(model, ckpts, index, test, loss_fn=LOSS), ref.influence)
    total = tc.influence(model, ckpts, index, test, loss_fn=LOSS, aggregate=True)
    assert_close(total, ref.influence.sum(0, keepdim=True))
    for proponents in (True, False):
        top = tc.top_k(model, ckpts, index, test, k=4, loss_fn=LOSS, proponents=proponents)
        assert_topk(top, ref.influence, 4, largest=proponents)


def test_stored_rows_are_converted_a_few_at_a_time(task, tmp_path, monkeypatch):
    """A block of float32 rows queried in float64 was converted whole, held beside the stored one (3x the block's
    memory, found by review): converted ``_CONVERTED_BYTES`` at a time, the same scores."""
    import tracin_func._search as search

    model, ckpts, train, test, ref = task
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, projection_dim=16, seed=3)
    whole = tc.influence(model, ckpts, index, test, loss_fn=LOSS)
    monkeypatch.setattr(search, "_CONVERTED_BYTES", 3 * index.dim * 8)  # three rows at a time (a GEMM per piece:
    assert_close(tc.influence(model, ckpts, index, test, loss_fn=LOSS), whole, 1e-14)  # this CPU's BLAS rounds
    top = tc.top_k(model, ckpts, index, test, k=4, loss_fn=LOSS)  # another shape's columns otherwise, last bits)
    assert_close(top.scores, whole.topk(4, dim=1).values, 1e-14)


def test_projected_index_keeps_exact_self_influence(task, tmp_path):
    model, ckpts, train, test, ref = task
    dataset = TensorDataset(*train)
    index = tc.build_index(tmp_path, model, ckpts, dataset, loss_fn=LOSS, projection_dim=16, seed=3, shard_size=10)
    assert index.projection == (16, 3) and index.dim == 3 * 16
    assert_close(index.self_influence(), ref.self_influence)  # from the unprojected gradients
    expected = tc.embeddings(model, ckpts, train, loss_fn=LOSS, projection_dim=16, seed=3)
    assert_close(index.embeddings().to(DTYPE), expected.float().to(DTYPE), 1e-6)  # stored in float32
    test_emb = tc.embeddings(model, ckpts, test, loss_fn=LOSS, projection_dim=16, seed=3)
    scores = tc.influence(model, ckpts, index, test, loss_fn=LOSS)
    assert_close(scores, test_emb @ index.embeddings().to(DTYPE).T)


def test_last_layer_index_holds_the_last_layers_embeddings(task, tmp_path, monkeypatch):
    """The manifest's width (and the default shard size) counted every parameter, the shards the last layer's: the
    build failed after computing every shard."""
    model, ckpts, train, test, _ = task
    ref = reference_scores(model, ckpts, train, test, loss_fn=LOSS, params=["fc2.weight", "fc2.bias"])
    width = ref.train_embeddings.shape[1]  # 3 checkpoints x (6 x 3 + 3)
    monkeypatch.setattr(_build, "SHARD_BYTES", 5 * width * DTYPE.itemsize)  # five rows a shard, at this width
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, method="last_layer", storage_dtype=DTYPE)
    assert index.dim == width and [s["stop"] - s["start"] for s in index.shards] == [5, 5, 5, 5, 3]
    assert_close(index.embeddings(), ref.train_embeddings)
    assert_close(index.self_influence(), ref.self_influence)
    assert_close(tc.influence(model, ckpts, index, test, loss_fn=LOSS, method="last_layer"), ref.influence)


def _misfit_task():
    """A linear model and six examples, row 4 a misfit with embeddings (about 3e5) past float16's range."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DTYPE)
    ckpts = [tc.Checkpoint(params={k: v.clone() for k, v in model.state_dict().items()}, lr=0.1)]
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (6,), generator=gen)
    x[4] *= 1e6
    y[4] = model(x[4:5]).argmin()
    return model, ckpts, (x, y), (x[:2], y[:2])


def test_a_storage_dtype_too_narrow_is_refused_before_its_shard_is_written(tmp_path):
    model, ckpts, train, test = _misfit_task()
    ref = reference_scores(model, ckpts, train, test, loss_fn=LOSS)
    largest = ref.train_embeddings[4].abs().max().item()
    assert torch.finfo(torch.float16).max < largest < torch.finfo(torch.bfloat16).max
    kw = dict(loss_fn=LOSS, shard_size=3)
    with pytest.raises(ValueError, match=(
        rf"`storage_dtype`=torch.float16 cannot hold the embeddings of `train` rows \[4\]: their largest magnitude, "
        rf"{re.escape(f'{largest:.4g}')}, .* Pass `storage_dtype=torch.bfloat16` or `storage_dtype=torch.float32`"
    )):  # fmt: skip
        tc.build_index(tmp_path, model, ckpts, train, storage_dtype=torch.float16, **kw)
    assert (tmp_path / "shard-00000.safetensors").exists() and not (tmp_path / "shard-00001.safetensors").exists()
    index = tc.build_index(tmp_path, model, ckpts, train, storage_dtype=torch.bfloat16, overwrite=True, **kw)
    assert_close(tc.influence(model, ckpts, index, test, loss_fn=LOSS), ref.influence, 1e-2)


def test_a_narrow_storage_dtype_is_refused_for_every_checkpoint_s_columns_of_the_shard(tmp_path):
    """Decided per batch and checkpoint, the refusal named the first overflowing part's rows and magnitude: it advised
    bfloat16 where a later checkpoint's columns needed float64."""
    model, ckpts, train, _ = _misfit_task()
    ckpts = [tc.Checkpoint(ckpts[0].params, lr) for lr in (1e12, 1e80, 0.3)]  # (the first overflows float16 only)
    ref = reference_scores(model, ckpts, train, train, loss_fn=LOSS)
    largest = ref.train_embeddings.abs().max().item()
    assert torch.finfo(torch.float32).max < largest < torch.finfo(torch.float64).max
    with pytest.raises(ValueError, match=rf"their largest magnitude, {re.escape(f'{largest:.4g}')}, .* Pass "
                                         rf"`storage_dtype=torch.float64`, and"):  # fmt: skip
        tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=torch.float16, batch_size=2)


def test_queries_refuse_an_index_holding_infinities(tmp_path, monkeypatch):
    """Built before the storage check: index influence gave NaN, top_k ranked it first among proponents."""
    model, ckpts, train, test = _misfit_task()
    monkeypatch.setattr(_build, "_refuse_unstorable", lambda *args: None)  # (as builds before it)
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=torch.float16, shard_size=3)
    assert not torch.isfinite(index.embeddings([4])).all()
    refused = r"Non-finite influence scores between `test` rows \[0, 1\] and `train` rows \[4\].*storage_dtype"
    with pytest.raises(FloatingPointError, match=refused):
        tc.influence(model, ckpts, index, test, loss_fn=LOSS)
    for proponents in (True, False):
        with pytest.raises(FloatingPointError, match=refused):
            tc.top_k(model, ckpts, index, test, k=2, loss_fn=LOSS, proponents=proponents)


def test_same_call_resumes_and_ends_byte_identical(task, tmp_path, monkeypatch):
    model, ckpts, train, _, _ = task
    kw = dict(loss_fn=LOSS, projection_dim=8, shard_size=5)
    tc.build_index(tmp_path / "whole", model, ckpts, train, **kw)
    real_write = _shards.write_atomically
    calls = []

    def killed_after_two_shards(path, *chunks):  # the third shard's temporary file is written, never renamed
        calls.append(path)
        if len([p for p in calls if p.endswith(".safetensors")]) == 3:
            data = b"".join(bytes(chunk) for chunk in chunks)
            Path(path + _shards.TEMPORARY).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        real_write(path, *chunks)

    monkeypatch.setattr(_shards, "write_atomically", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        tc.build_index(tmp_path / "resumed", model, ckpts, train, **kw)
    monkeypatch.setattr(_shards, "write_atomically", real_write)
    partial = _files(tmp_path / "resumed")
    assert "shard-00002.safetensors.partial" in partial and json.loads(partial["manifest.json"])["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        tc.open_index(tmp_path / "resumed")
    damaged = tmp_path / "resumed" / "shard-00001.safetensors"  # a byte of its embeddings flipped since written
    damaged.write_bytes(damaged.read_bytes()[:-1] + bytes([damaged.read_bytes()[-1] ^ 1]))
    written = []
    monkeypatch.setattr(_build, "write_shard", lambda path, *a: written.append(path) or _shards.write_shard(path, *a))
    tc.build_index(tmp_path / "resumed", model, ckpts, train, **kw)
    assert [Path(p).name for p in written] == [f"shard-0000{i}.safetensors" for i in (1, 2, 3, 4)]  # 0 kept
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")


_BUILD = """
import os, sys, time, torch, tracin_func as tc
from torch.func import functional_call
torch.manual_seed(0)
model = torch.nn.Linear(4, 3).double()
ckpts = [tc.Checkpoint(params={k: v.detach() for k, v in model.state_dict().items()}, lr=0.1)]
gen = torch.Generator().manual_seed(0)
x, y = torch.randn(60, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (60,), generator=gen)

def slow(params, batch):
    if os.environ.get("SLOW"):  # the same code either way: the loss's fingerprint does not change
        time.sleep(0.05)
    x, y = batch
    return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

tc.build_index(sys.argv[1], model, ckpts, (x, y), loss_fn=tc.ExampleLoss(slow), shard_size=2, batch_size=2)
"""


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(_BUILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, script, tmp_path / "whole"], check=True, env=env)
    target = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, script, target], env={**env, "SLOW": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(list(target.glob("shard-*.safetensors"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = list(target.glob("shard-*.safetensors"))
    assert 3 <= len(shards) < 30, "the build was not killed midway"
    subprocess.run([sys.executable, script, target], check=True, env=env)
    assert _files(target) == _files(tmp_path / "whole")


class ReluMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))


def test_other_settings_are_refused_naming_the_difference(task, tmp_path):
    model, ckpts, train, test, _ = task
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)
    other_lr = [tc.Checkpoint(c.params, lr=2 * c.lr) for c in ckpts]
    with pytest.raises(ValueError, match=r"learning rates.*overwrite=True"):
        tc.build_index(tmp_path, model, other_lr, train, loss_fn=LOSS, shard_size=8)
    with pytest.raises(ValueError, match=r"`projection`.*differ"):
        tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8, projection_dim=4)
    with pytest.raises(ValueError, match=r"the loss .*differ"):
        tc.build_index(tmp_path, model, ckpts, train, loss_fn=nn.CrossEntropyLoss(reduction="sum"), shard_size=8)
    index = tc.open_index(tmp_path)
    with pytest.raises(ValueError, match=r"built with other settings.*checkpoints \[1\]"):
        changed = [ckpts[0], tc.Checkpoint({k: v + 1 for k, v in ckpts[1].params.items()}, ckpts[1].lr), ckpts[2]]
        tc.top_k(model, changed, index, test, k=2, loss_fn=LOSS)
    with pytest.raises(ValueError, match=r"differentiated parameters"):
        tc.influence(model, ckpts, index, test, loss_fn=LOSS, layers=["fc1"])
    with pytest.raises(ValueError, match=r"the number of checkpoints \(3 -> 2\)") as fewer:
        tc.influence(model, ckpts[:2], index, test, loss_fn=LOSS)
    assert "optimizer states" not in str(fewer.value)  # (none has any: said to differ)
    relu = ReluMLP().to(DTYPE).eval()  # its state laid out alike: an index of the other model's (before: 84% off)
    with pytest.raises(ValueError, match=r"built with other settings.*the model's code or settings"):
        tc.influence(relu, ckpts, index, test, loss_fn=LOSS)
    with pytest.raises(ValueError, match=r"the model's code or settings.*overwrite=True"):
        tc.build_index(tmp_path, relu, ckpts, train, loss_fn=LOSS, shard_size=8)
    rebuilt = tc.build_index(tmp_path, model, other_lr, train, loss_fn=LOSS, shard_size=8, overwrite=True)
    assert rebuilt.fingerprint["learning_rates"] == [2 * c.lr for c in ckpts]


class Scaled(MLP):
    """Its forward reads a helper method and a private setting: an index of one was taken for the other's."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self._scale = scale

    def act(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h * self._scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc2(self.act(self.fc1(x))))


TEMPERATURE = 1.0


def _tempered(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out / TEMPERATURE, y)


def _through(module):
    return lambda out, y: LOSS(module(out), y) if isinstance(module, nn.Linear) else module(out, y)


def test_what_else_a_model_or_loss_computes_with_is_fingerprinted(task, tmp_path, monkeypatch):
    """Not seen before, so an index built with one was queried (or resumed) with the other, silently (33-306% off): a
    helper method's code, a private setting, a module's mode, a forward hook, a global the loss reads, the weights of
    a module a loss calls that is not the model's."""
    _, ckpts, train, test, _ = task
    model = Scaled().to(DTYPE).eval()
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=_tempered, shard_size=8)
    index = tc.open_index(tmp_path)
    query = lambda m, loss=_tempered: tc.influence(m, ckpts, index, test, loss_fn=loss)  # noqa: E731
    query(model)
    other = Scaled(3.0).to(DTYPE).eval()
    with pytest.raises(ValueError, match="the model's code or settings"):
        query(other)
    with monkeypatch.context() as patched:
        patched.setattr(Scaled, "act", lambda self, h: torch.relu(h * self._scale))
        with pytest.raises(ValueError, match="the model's code or settings"):
            query(model)
    with pytest.raises(ValueError, match="the model's code or settings"):
        query(model.train())
    model.eval()
    handle = model.fc1.register_forward_hook(lambda layer, args, out: 2 * out)
    with pytest.raises(ValueError, match="the model's code or settings"):
        query(model)
    handle.remove()
    monkeypatch.setattr(sys.modules[__name__], "TEMPERATURE", 4.0)
    with pytest.raises(ValueError, match="the loss"):
        query(model)
    # a head, or a criterion's settings, in a loss's closure (the same code around them)
    for first, second in [[nn.Linear(3, 3).to(DTYPE) for _ in range(2)],
                          [nn.CrossEntropyLoss(label_smoothing=s) for s in (0.0, 0.5)]]:  # fmt: skip
        tc.build_index(tmp_path, model, ckpts, train, loss_fn=_through(first), overwrite=True)
        with pytest.raises(ValueError, match="the loss"):
            tc.influence(model, ckpts, tc.open_index(tmp_path), test, loss_fn=_through(second))
    # a hook's code (under the call's guard: it was described as "code" only)
    handle = model.fc1.register_forward_hook(lambda layer, args, out: 2 * out)
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, overwrite=True)
    handle.remove()
    model.fc1.register_forward_hook(lambda layer, args, out: 3 * out)
    with pytest.raises(ValueError, match="the model's code or settings"):
        tc.influence(model, ckpts, tc.open_index(tmp_path), test, loss_fn=LOSS)


class Shifted(MLP):
    """Its forward adds a buffer that no checkpoint holds (``persistent=False``), read as the model's own."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(6, dtype=DTYPE), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc2(torch.tanh(self.fc1(x) + self.shift)))


def test_a_buffer_no_checkpoint_holds_is_fingerprinted(task, tmp_path):
    """A changed buffer registered with ``persistent=False`` went unseen: a build resumed after it mixed shards of
    both values, and a query of the changed model was answered (both 17-20% off, silently; a helper's trial)."""
    _, ckpts, train, test, _ = task
    model = Shifted().to(DTYPE).eval()
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=DTYPE, shard_size=8)
    assert_close(tc.influence(model, ckpts, index, test, loss_fn=LOSS),
                 reference_scores(model, ckpts, train, test, loss_fn=LOSS).influence)  # fmt: skip
    model.shift.fill_(0.5)
    with pytest.raises(ValueError, match="the model's code or settings"):
        tc.influence(model, ckpts, index, test, loss_fn=LOSS)
    with pytest.raises(ValueError, match="the model's code or settings.*overwrite=True"):
        tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=DTYPE, shard_size=8)


def test_another_computation_dtype_is_named_alone(task, tmp_path):
    """A float32 query of a float64 index also listed "the tensors of checkpoints [0, 1, 2]" and learning rates
    "0.1 -> 0.10000000149011612" as differing: both are taken in the computation dtype."""
    model, ckpts, train, test, _ = task
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)
    with pytest.raises(ValueError, match="other settings") as refused:
        tc.influence(model, ckpts, index, test, loss_fn=LOSS, dtype=torch.float32)
    said = str(refused.value)
    assert "computation dtype" in said and "the tensors of checkpoints" not in said and "learning rates" not in said


def test_a_shard_written_again_after_opening_is_not_read(task, tmp_path):
    """An open index read the shards another build wrote over it later (lr x4: scores 2x), silently."""
    model, ckpts, train, test, _ = task
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)
    faster = [tc.Checkpoint(c.params, lr=4 * c.lr) for c in ckpts]
    tc.build_index(tmp_path, model, faster, train, loss_fn=LOSS, shard_size=8, overwrite=True)
    with pytest.raises(ValueError, match="changed since the index was opened"):
        tc.influence(model, ckpts, index, test, loss_fn=LOSS)
    with pytest.raises(ValueError, match="changed since the index was opened"):
        index.self_influence()


class FirstRow(nn.Module):
    """Reads the first row of each example's matrix, whatever its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(x[:, 0]).sum(-1, keepdim=True))


def test_data_reshaped_is_other_data(tmp_path):
    """The data's digest held its bytes alone: a resumed build kept the shards of `x`'s for `x.reshape(6, 3, 2)`
    (5-45% off)."""
    model = FirstRow().to(DTYPE).eval()
    ckpts = random_checkpoints(model.state_dict(), 2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, 3, generator=gen, dtype=DTYPE), torch.randint(0, 3, (6,), generator=gen)
    reshaped = (x.reshape(6, 3, 2), y)
    tc.build_index(tmp_path, model, ckpts, (x, y), loss_fn=LOSS, shard_size=3, storage_dtype=DTYPE)
    (tmp_path / "shard-00001.safetensors").unlink()
    index = tc.build_index(tmp_path, model, ckpts, reshaped, loss_fn=LOSS, shard_size=3, storage_dtype=DTYPE)
    assert_close(index.self_influence(), tc.self_influence(model, ckpts, reshaped, loss_fn=LOSS))


def test_a_directory_that_is_not_an_index_is_never_deleted(task, tmp_path):
    """Nor any of its files: a `.partial` of a name like a shard's was deleted before the folder was refused, and
    another program's `manifest.json` was replaced with `overwrite=True` (with the files named like shards)."""
    model, ckpts, train, _, _ = task
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "shard-00000.safetensors.partial").write_text("mine too")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"not empty and holds no tracin_func index.*never deleted"):
            tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, overwrite=overwrite)
    assert _files(tmp_path) == {"notes.txt": b"mine", "shard-00000.safetensors.partial": b"mine too"}
    for manifest in ('{"name": "my web app"}', "[1, 2]", "not json"):
        (tmp_path / "manifest.json").write_text(manifest)
        (tmp_path / "shard-00000.safetensors").write_text("my weights")
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=r"manifest.*never replaced, even with `overwrite=True`"):
                tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, overwrite=overwrite)
        assert (tmp_path / "manifest.json").read_text() == manifest
        assert (tmp_path / "shard-00000.safetensors").read_text() == "my weights"


def test_an_index_manifest_cut_short_beside_a_users_file(task, tmp_path):
    """A damaged manifest beside a file of the user's: `open_index` advised `overwrite=True`, which the build then
    refused, in the same message (found by review). The refusal says why and what works: the files moved out,
    `overwrite=True` rebuilds."""
    model, ckpts, train, _, _ = task
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"beside files that are no index's \(\['notes.txt'\]\).*Move those files out"):
        tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8, overwrite=True)
    (tmp_path / "notes.txt").unlink()
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8, overwrite=True)
    assert_close(index.self_influence(), tc.self_influence(model, ckpts, train, loss_fn=LOSS))


def test_damaged_shards_are_named(task, tmp_path):
    model, ckpts, train, test, _ = task
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in the embeddings
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors` is corrupt.*build_index"):
        tc.open_index(tmp_path)
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)  # the same call redoes that shard
    assert shard.read_bytes() != bytes(data)
    tc.open_index(tmp_path)
    shard.write_bytes(bytes(data))
    with pytest.raises(TypeError, match=r"`verify` must be True or False, got 'no'"):  # (truthy: it verified)
        tc.open_index(tmp_path, verify="no")
    index = tc.open_index(tmp_path, verify=False)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors` changed since the index was opened.*build_index"):
        tc.influence(model, ckpts, index, test, loss_fn=LOSS)
    with pytest.raises(ValueError, match=r"shard-00001.safetensors` is not a readable index shard"):
        tc.open_index(tmp_path, verify=False)
    shard.unlink()
    with pytest.raises(ValueError, match=r"shard-00001.safetensors` is missing"):
        tc.open_index(tmp_path)
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)  # the same call repairs it
    tc.open_index(tmp_path)


def test_a_lost_manifest_is_rebuilt_by_the_same_call(task, tmp_path):
    """Only the manifest deleted: `open_index` said to build one with `tc.build_index`, which refused the directory
    as not an index. The same call now takes the shards as a resumed build's (checked against its plan)."""
    model, ckpts, train, _, _ = task
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)
    before = _files(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="holds no index.*build_index"):
        tc.open_index(tmp_path)
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)
    assert _files(tmp_path) == before
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no tracin_func index"):
        tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)


def test_a_second_build_removing_the_files_being_written_is_named(tmp_path, monkeypatch):
    """A build starting removes the temporary files a killed build left, so one running beside it lost the file it
    was writing: a raw FileNotFoundError from `os.replace`."""
    target = tmp_path / "shard-00000.safetensors"

    def removed_meanwhile(fd):
        os.remove(str(target) + _shards.TEMPORARY)

    monkeypatch.setattr(_shards.os, "fsync", removed_meanwhile)
    with pytest.raises(RuntimeError, match="another `tc.build_index` of the same directory started meanwhile"):
        _shards.write_atomically(str(target), b"rows")


def test_an_edited_or_damaged_manifest_is_refused(task, tmp_path):
    """The manifest's own settings were never checked: `rows` edited to 5 gave 5 rows to `len` and `k` and 23 to
    the scores, `storage_dtype` edited converted every embedding read back, no `shards` gave a bare KeyError."""
    model, ckpts, train, _, _ = task
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    edits = [
        ({**manifest, "rows": 5}, "was changed since its build"),
        ({**manifest, "storage_dtype": "float16"}, "was changed since its build"),
        ({k: v for k, v in manifest.items() if k != "shards"}, r"lacks \['shards'\]"),
        ({**manifest, "shards": manifest["shards"][1:]}, r"do not cover its 23 rows once, in order"),
    ]
    for edited, match in edits:
        (tmp_path / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=match + ".*overwrite=True"):
            tc.open_index(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(ValueError, match=r"format version 1; this tracin_func reads version 4. Build it again with "
                                         r"`tc.build_index\(.*, \.\.\., overwrite=True\)`"):  # fmt: skip
        tc.open_index(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "digest": "0" * 64}))  # (the repair it advises:
    with pytest.raises(ValueError, match=r"changed since its build.*running the same `tc.build_index"):
        tc.open_index(tmp_path)
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=8)  # the same call, refused as "other
    tc.open_index(tmp_path, verify=True)  # settings: its fingerprint", repairs it
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_disk_space_is_checked_first(task, tmp_path, monkeypatch):
    model, ckpts, train, _, _ = task
    monkeypatch.setattr(_build.shutil, "disk_usage", lambda path: SimpleNamespace(free=100))
    with pytest.raises(ValueError, match=r"needs about .* GiB .* free.*projection_dim="):
        tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS)
    assert not list(tmp_path.glob("shard-*"))


def test_bad_arguments(task, tmp_path):
    model, ckpts, train, test, _ = task
    with pytest.raises(TypeError, match="must be read more than once to be indexed"):
        tc.build_index(tmp_path, model, ckpts, iter([train]), loss_fn=LOSS)
    with pytest.raises(TypeError, match="storage_dtype"):
        tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=torch.int8)
    with pytest.raises(ValueError, match="holds no index"):
        tc.open_index(tmp_path)
    index = tc.build_index(tmp_path / "i", model, ckpts, train, loss_fn=LOSS)
    with pytest.raises(ValueError, match="normalize.*not available with an index"):
        tc.top_k(model, ckpts, index, test, k=2, loss_fn=LOSS, normalize="cosine")
    with pytest.raises(ValueError, match="`rerank` must be the training data"):
        tc.top_k(model, ckpts, index, test, k=2, loss_fn=LOSS, rerank=(train[0][:5], train[1][:5]))
    with pytest.raises(ValueError, match=r"got data of unknown size; a DataLoader: pass its `dataset`"):
        tc.top_k(model, ckpts, index, test, k=2, loss_fn=LOSS, rerank=DataLoader(TensorDataset(*train)))
    with pytest.raises(ValueError, match="pass a `tc.Index` as `train`"):
        tc.top_k(model, ckpts, train, test, k=2, loss_fn=LOSS, rerank=train)
    with pytest.raises(TypeError, match=r"call `index.self_influence\(\)`"):
        tc.self_influence(model, ckpts, index, loss_fn=LOSS)
    with pytest.raises(ValueError, match=r"`k`=30 exceeds the number of rows of the index \(23\)"):
        tc.top_k(model, ckpts, index, test, k=30, loss_fn=LOSS)


def test_rerank_returns_exact_scores_and_recovers_the_exact_top_k(task, tmp_path):
    model, ckpts, train, test, ref = task
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, projection_dim=4, seed=1)
    reranked = tc.top_k(model, ckpts, index, test, k=3, loss_fn=LOSS, rerank=train, candidates=8)
    assert_close(reranked.scores, torch.gather(ref.influence, 1, reranked.indices))  # exact TracIn scores
    everything = tc.top_k(model, ckpts, index, test, k=3, loss_fn=LOSS, rerank=TensorDataset(*train), candidates=N)
    assert_topk(everything, ref.influence, 3, largest=True)
    subclassed = tc.top_k(model, ckpts, index, test, k=3, loss_fn=LOSS, rerank=_Batch(train), candidates=8)
    assert torch.equal(subclassed.scores, reranked.scores)  # (a tuple subclass: "of unknown size" before; a sweep's)


class _Batch(tuple):
    pass


def test_rerank_matches_data_batched_otherwise_and_strings_are_refused_as_such(task, tmp_path):
    """A shard's digest of its input rows does not depend on the batching: an index built in batches of 4 is
    re-ranked in batches of 5 or 7, from a batch, a TensorDataset or a Dataset. Non-tensor fields (a string per
    example) are refused by the build before any shard is written, and by a re-ranking query as such (it said the
    rows differ from the index's)."""
    model, ckpts, train, test, ref = task
    x, y = train
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, projection_dim=4, seed=1, batch_size=4)

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, name=False):
            self.name = name

        def __len__(self):
            return N

        def __getitem__(self, i):
            return (x[i], f"row {i}", y[i]) if self.name else (x[i], y[i])

    for rerank, size in ((train, 5), (TensorDataset(*train), 7), (Pairs(), 5)):
        top = tc.top_k(model, ckpts, index, test, k=3, loss_fn=LOSS, rerank=rerank, candidates=N, batch_size=size)
        assert_topk(top, ref.influence, 3, largest=True)
    with pytest.raises(TypeError, match="every element of a batch must be a tensor"):
        tc.build_index(tmp_path / "named", model, ckpts, Pairs(name=True), loss_fn=LOSS, shard_size=10)
    assert not [p for p in (tmp_path / "named").iterdir() if p.name != "manifest.json"]
    with pytest.raises(TypeError, match="every element of a batch must be a tensor"):  # (not "its rows differ")
        tc.top_k(model, ckpts, index, test, k=3, loss_fn=LOSS, rerank=Pairs(name=True), candidates=N)


def test_the_test_side_in_chunks_gives_the_same_results(task, tmp_path):
    model, ckpts, train, test, ref = task
    small = dict(test_memory_bytes=1, batch_size=2)  # every test batch is a chunk of its own
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=LOSS, **small), ref.influence)
    assert_topk(tc.top_k(model, ckpts, train, test, k=3, loss_fn=LOSS, **small), ref.influence, 3, largest=True)
    cos = dict(loss_fn=LOSS, normalize="cosine", aggregate=True)
    summed = tc.influence(model, ckpts, train, test, **cos)
    assert_close(tc.influence(model, ckpts, train, test, **cos, **small), summed)
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=DTYPE)
    assert_close(tc.influence(model, ckpts, index, test, loss_fn=LOSS, **small), ref.influence)
    assert_topk(tc.top_k(model, ckpts, index, test, k=3, loss_fn=LOSS, **small), ref.influence, 3, largest=True)


def test_cnn_index_through_the_factored_path(tmp_path):
    t = cnn_task()
    ref = reference_scores(t.model, t.checkpoints, t.train, t.test, loss_fn=t.loss_fn)
    index = tc.build_index(
        tmp_path, t.model, t.checkpoints, t.train, loss_fn=t.loss_fn, storage_dtype=DTYPE, shard_size=3
    )
    assert_close(index.self_influence(), ref.self_influence)
    assert_close(tc.influence(t.model, t.checkpoints, index, t.test, loss_fn=t.loss_fn), ref.influence)


@pytest.mark.slow
def test_the_example_resumes_after_a_kill(tmp_path):
    pytest.importorskip("sklearn")
    example = Path(__file__).parents[1] / "examples" / "index_digits.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, str(example), "--out", str(tmp_path), "--shard-size", "300"]
    killed = subprocess.run([*run, "--kill-after", "2"], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert not json.loads((tmp_path / "index" / "manifest.json").read_text())["complete"]
    done = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    assert "Index(" in done.stdout and "rows=1500" in done.stdout and "most self-influential" in done.stdout
    tc.open_index(tmp_path / "index")


def test_adam_checkpoints_index_the_adam_updates_and_query_with_plain_gradients(tmp_path):
    from tests.test_adam import _run

    model, ckpts, train, test, ref = _run("adam")
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=DTYPE)
    assert_close(tc.influence(model, ckpts, index, test, loss_fn=LOSS), ref.influence)
    plain = [tc.Checkpoint(c.params, c.lr) for c in ckpts]
    with pytest.raises(ValueError, match="optimizer states"):
        tc.influence(model, plain, index, test, loss_fn=LOSS)


def _read_only(monkeypatch):
    """Every file the build writes refused, as in a folder it may not write to (the tests run as root too)."""

    def refused(path, *chunks):
        raise PermissionError(13, "Permission denied", path + _shards.TEMPORARY)

    monkeypatch.setattr(_shards, "write_atomically", refused)


def test_the_same_build_of_a_complete_index_leaves_it_untouched(task, tmp_path, monkeypatch):
    """It wrote the manifest twice (marked incomplete, then complete): a read-only index failed to build again."""
    model, ckpts, train, test, ref = task
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=DTYPE, shard_size=10)
    before, manifest = _files(tmp_path), os.stat(tmp_path / "manifest.json")
    _read_only(monkeypatch)
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=DTYPE, shard_size=10)
    assert _files(tmp_path) == before and os.stat(tmp_path / "manifest.json") == manifest
    assert_close(tc.influence(model, ckpts, index, test, loss_fn=LOSS), ref.influence)


def test_a_folder_it_cannot_write_is_named(task, tmp_path, monkeypatch):
    model, ckpts, train, _, _ = task
    _read_only(monkeypatch)
    folder = tmp_path / "index"
    with pytest.raises(PermissionError, match=rf"`path`=.*: the index cannot be written in `{re.escape(str(folder))}`"):
        tc.build_index(folder, model, ckpts, train, loss_fn=LOSS)


def test_changed_training_data_is_recomputed_not_reused(task, tmp_path):
    model, ckpts, train, _, ref = task
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=DTYPE, shard_size=7)
    relabelled = (train[0], (train[1] + 1) % 3)
    index = tc.build_index(tmp_path, model, ckpts, relabelled, loss_fn=LOSS, storage_dtype=DTYPE, shard_size=7)
    assert_close(index.self_influence(), tc.self_influence(model, ckpts, relabelled, loss_fn=LOSS))


def test_killed_while_writing_the_first_manifest_or_with_an_unreadable_one(task, tmp_path):
    model, ckpts, train, _, _ = task
    (tmp_path / "manifest.json.partial").write_text('{"format": "tracin_fu')
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS)
    assert not list(tmp_path.glob("*.partial"))
    (tmp_path / "manifest.json").write_text('{"format": "tracin_fu')
    with pytest.raises(ValueError, match=r"not a readable index manifest.*overwrite=True"):
        tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS)
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, overwrite=True)
    tc.open_index(tmp_path)


_LOSSES = """
import functools, torch
from tests.models import MLP
from tracin_func._fingerprint import describe_loss, describe_model
ce = torch.nn.functional.cross_entropy

def comprehension(out, y):
    return sum(ce(o[None], t[None]) for o, t in zip(out, y)) if "x" in {"a", "b", "x"} else [1 for _ in ()]

print(describe_loss(comprehension))
print(describe_loss(functools.partial(ce, label_smoothing=0.1)))
model = MLP()
model.kept = (torch.float32, torch.device("cpu"), slice(1, 2), object())  # (no __dict__, or an address in the repr)
print(describe_model(model))
"""


def test_the_loss_fingerprint_is_stable_across_processes_and_tells_settings_apart(tmp_path):
    script = tmp_path / "losses.py"
    script.write_text(_LOSSES)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    runs = [subprocess.run([sys.executable, script], env={**env, "PYTHONHASHSEED": seed}, capture_output=True,
                           text=True, check=True).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] and "0x" not in runs[0]
    from functools import partial

    from tracin_func._fingerprint import describe_loss

    ce = nn.functional.cross_entropy
    assert describe_loss(partial(ce, label_smoothing=0.1)) != describe_loss(partial(ce, label_smoothing=0.5))
    assert describe_loss(nn.CrossEntropyLoss()) == describe_loss(nn.CrossEntropyLoss().eval())
    assert describe_loss(nn.CrossEntropyLoss()) != describe_loss(nn.CrossEntropyLoss(label_smoothing=0.1))
    scale = 2.0
    first = describe_loss(lambda out, y: scale * ce(out, y))
    scale = 3.0
    assert describe_loss(lambda out, y: scale * ce(out, y)) != first  # captured values count


def test_test_memory_bytes_belongs_to_scorers_with_a_test_side(task):
    model, ckpts, train, _, _ = task
    with pytest.raises(TypeError, match="no test side"):
        tc.self_influence(model, ckpts, train, loss_fn=LOSS, test_memory_bytes=10)


def test_shards_are_plain_safetensors_files(task, tmp_path):
    from safetensors import safe_open

    model, ckpts, train, _, ref = task
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=torch.float16, shard_size=10)
    rows, self_influence = [], []
    for shard in index.shards:
        with safe_open(tmp_path / shard["file"], framework="pt") as f:
            assert json.loads(f.metadata()["tracin_func"])["rows"] == [shard["start"], shard["stop"]]
            rows.append(f.get_tensor("embeddings"))
            self_influence.append(f.get_tensor("self_influence"))
    assert torch.cat(rows).dtype == torch.float16
    assert torch.equal(torch.cat(rows), ref.train_embeddings.half())
    assert_close(torch.cat(self_influence), ref.self_influence)


def test_queries_stream_the_index_in_small_blocks(task, tmp_path, monkeypatch):
    from tracin_func import _index, _search

    model, ckpts, train, test, ref = task
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, storage_dtype=DTYPE, shard_size=10)
    for module in (_index, _search):
        monkeypatch.setattr(module, "BLOCK_BYTES", 3 * N_TEST * 8)  # scores [5, 3] in float64; rows of D > 15 values
    assert [(offset, len(b)) for offset, b in index.blocks()] == [(row, 1) for row in range(N)]
    assert_close(tc.influence(model, ckpts, index, test, loss_fn=LOSS), ref.influence)
    assert_topk(tc.top_k(model, ckpts, index, test, k=4, loss_fn=LOSS), ref.influence, 4, largest=True)


def test_rerank_checks_the_shards_holding_candidates(task, tmp_path, monkeypatch):
    """`rerank=` data is checked against the digests of the shards whose rows are re-scored (it hashed all of the
    training data on every query, rows no score reads). A candidate's shard that differs is still refused."""
    model, ckpts, train, (xt, yt), _ = task
    index = tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, projection_dim=8, shard_size=5)
    hashed, real = [], _build._data_digest
    monkeypatch.setattr(_build, "_data_digest", lambda *a: hashed.append(a[2]) or real(*a))
    one = (xt[:1], yt[:1])
    top = tc.top_k(model, ckpts, index, one, k=1, candidates=1, rerank=train, loss_fn=LOSS)
    assert hashed == [int(top.indices) // 5 * 5] and len(index) > 5  # (its one candidate's shard of several)
    x, y = train
    other = x.clone()
    other[top.indices.flatten()] += 1
    with pytest.raises(ValueError, match=rf"`rerank` must be the training data .* its rows \[{hashed[0]}, "):
        tc.top_k(model, ckpts, index, one, k=1, candidates=1, rerank=(other, y), loss_fn=LOSS)


def test_a_build_shows_one_progress_bar_over_rows(task, tmp_path, capfd):
    """Each shard opened a bar of its own ("embeddings", of no known length) under the build's: one a shard, escape
    sequences in logs. The build's bar over rows advances batch by batch."""
    model, ckpts, train, _, _ = task
    tc.build_index(tmp_path, model, ckpts, train, loss_fn=LOSS, shard_size=10, batch_size=4, progress=True)
    err = capfd.readouterr().err
    assert "index rows" in err and "embeddings" not in err


def _pure_mlp(params, x):
    return torch.tanh(x @ params["w"].T) @ params["v"].T


def test_a_pure_function_s_index_describes_the_user_s_function(tmp_path):
    """Calls give a pure function its entries in the first checkpoint's order through a wrapper; the fingerprint
    described that wrapper, so an index built before it was refused as of other code."""
    from tracin_func._fingerprint import describe_model
    from tracin_func._index import read_manifest

    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 4, generator=gen, dtype=DTYPE), "v": torch.randn(3, 5, generator=gen, dtype=DTYPE)}
    x, y = torch.randn(6, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (6,), generator=gen)
    tc.build_index(tmp_path, _pure_mlp, [tc.Checkpoint(params, 0.1)], (x, y), loss_fn=LOSS)
    assert read_manifest(str(tmp_path))["fingerprint"]["model"] == describe_model(_pure_mlp)


def test_a_models_fingerprint_leaves_out_the_hooks_another_call_puts_on_it():
    """A loss calling the user's module (`tc.sequence_classification_loss(model)`) has a call's running-module hooks on
    it while the call runs: an index built meanwhile in another thread stored them, and every later query was
    refused ("the model's code or settings differ"; a helper's stress test, 8 of 9 builds)."""
    from tracin_func._fingerprint import describe_model
    from tracin_func._purity import _running_modules

    model = MLP().to(DTYPE).eval()
    alone = describe_model(model)
    with _running_modules(model):
        assert describe_model(model) == alone
    model.fc1.register_forward_hook(lambda module, args, output: output * 2)  # (the user's own hooks still count)
    assert describe_model(model) != alone


def test_a_shard_written_meanwhile_by_a_build_over_other_data_is_refused(task, tmp_path, monkeypatch):
    """Two builds of one path with the same settings over other data resumed each other's shards: each returned an
    index holding both's rows, scored silently (a helper's two-process trial: 2.2-2.6 off on scores of 4). The build
    compares each shard's input rows with its own as it ends."""
    import shutil

    import tracin_func._build as build

    model, ckpts, (x, y), test, ref = task
    tc.build_index(tmp_path / "other", model, ckpts, (x + 1, y), loss_fn=LOSS, shard_size=8, storage_dtype=DTYPE)
    write_shard = build.write_shard

    def then_overwritten(file, *parts):  # (the other build's first shard, over this one's, once this one has all)
        sha = write_shard(file, *parts)
        if Path(file).name == "shard-00001.safetensors":
            first = "shard-00000.safetensors"
            shutil.copyfile(tmp_path / "other" / first, Path(file).parent / first)
        return sha

    monkeypatch.setattr(build, "write_shard", then_overwritten)
    with pytest.raises(ValueError, match=r"shard-00000.safetensors` holds other training rows than this build's"):
        tc.build_index(tmp_path / "index", model, ckpts, (x, y), loss_fn=LOSS, shard_size=8, storage_dtype=DTYPE)
    monkeypatch.setattr(build, "write_shard", write_shard)
    alone = dict(loss_fn=LOSS, shard_size=8, storage_dtype=DTYPE)  # (the same call alone: the other's shard redone)
    index = tc.build_index(tmp_path / "index", model, ckpts, (x, y), **alone)
    assert_close(tc.influence(model, ckpts, index, test, loss_fn=LOSS), ref.influence)


class _Streamed(torch.utils.data.IterableDataset):
    """An IterableDataset of batches (how every scorer reads one), its ``__len__`` the batches it yields unless
    ``length`` says otherwise; ``rows``: how many rows its first pass and its later ones yield (data changing)."""

    def __init__(self, x, y, size, length=None, rows=(None, None)):
        self.x, self.y, self.size, self.length, self.rows, self.passes = x, y, size, length, rows, 0

    def __iter__(self):
        self.passes += 1
        n = self.rows[self.passes > 1] or len(self.x)
        cuts = [slice(i, min(n, i + self.size)) for i in range(0, n, self.size)]
        return iter([(self.x[c], self.y[c]) for c in cuts])

    def __len__(self):
        return -(-(self.rows[0] or len(self.x)) // self.size) if self.length is None else self.length


class _Unsized(torch.utils.data.IterableDataset):
    def __init__(self, x, y, size):
        self.streamed = _Streamed(x, y, size)

    def __iter__(self):
        return iter(self.streamed)


class _Examples(torch.utils.data.IterableDataset):
    def __init__(self, x, y, length):
        self.x, self.y, self.length = x, y, length

    def __iter__(self):
        return zip(self.x, self.y)

    def __len__(self):
        return self.length


def test_an_iterable_dataset_is_indexed_as_the_scorers_read_it_and_a_wrong_length_is_named(task, tmp_path):
    """An ``IterableDataset`` (with ``__len__`` or not) and a DataLoader over one were refused as of unknown size,
    where every scorer reads them: they are counted by one pass and indexed as the batch is, shard by shard (each
    shard's rows cut from the stream), resumed alike. A declared length the iteration does not yield, or data that
    yields other rows when read again, is refused naming it, never dropped or padded."""
    model, ckpts, (x, y), _, ref = task
    want = tc.build_index(tmp_path / "batch", model, ckpts, (x, y), loss_fn=LOSS, shard_size=4)
    loader = torch.utils.data.DataLoader(_Examples(x, y, N), batch_size=5)
    for name, data in {"len": _Streamed(x, y, 3), "no_len": _Unsized(x, y, 3), "loader": loader}.items():
        index = tc.build_index(tmp_path / name, model, ckpts, data, loss_fn=LOSS, shard_size=4)
        assert_close(index.self_influence(), ref.self_influence)
        assert torch.equal(index.embeddings(), want.embeddings())
        again = tc.build_index(tmp_path / name, model, ckpts, data, loss_fn=LOSS, shard_size=4)
        assert torch.equal(again.embeddings(), want.embeddings())
    sampled = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=4, sampler=list(range(N - 5)))
    index = tc.build_index(tmp_path / "sampled", model, ckpts, sampled, loss_fn=LOSS, storage_dtype=DTYPE)
    assert_close(index.self_influence(), ref.self_influence[: N - 5])  # (a sampler's subset: no length disagrees)
    empty_last = [(x, y), (x[:0], y[:0])]  # (a trailing empty batch: no rows more than counted)
    assert_close(tc.build_index(tmp_path / "empty", model, ckpts, empty_last, loss_fn=LOSS).self_influence(),
                 ref.self_influence)  # fmt: skip
    streamed = _Streamed(x, y, 3)
    for _ in range(2):  # built, then kept: a pass counting its rows and one reading its shards, not one per shard
        tc.build_index(tmp_path / "passes", model, ckpts, streamed, loss_fn=LOSS, shard_size=4)
    assert streamed.passes == 4
    with pytest.raises(ValueError, match=r"`train` declares a length of 9 .* yielded 8 batches"):
        tc.build_index(tmp_path / "wrong", model, ckpts, _Streamed(x, y, 3, length=9), loss_fn=LOSS)
    short = torch.utils.data.DataLoader(_Examples(x, y, N + 1), batch_size=5)
    with pytest.raises(ValueError, match=rf"`train` declares a length of {N + 1} .* yielded {N} examples"):
        tc.build_index(tmp_path / "short", model, ckpts, short, loss_fn=LOSS)
    for rows, got in [((N - 2, None), f"more than {N - 2}"), ((None, N - 2), f"{N - 2}")]:
        changed = _Streamed(x, y, 3, rows=rows)
        message = rf"`train` yielded {got} examples when read again, but {rows[0] or N} when"
        if rows[0] is None:  # a whole pass shorter than the first: refused as it ends, before its rows are checked
            message = rf"`train` gave {N - 2} examples when iterated again, {N} before"
        with pytest.raises(ValueError, match=message):
            tc.build_index(tmp_path / "changed", model, ckpts, changed, loss_fn=LOSS, shard_size=4, overwrite=True)


def test_a_tensor_copied_to_be_read_is_held_while_its_bytes_are_hashed(tmp_path):
    """A checkpoint's or batch's tensor that is not contiguous (or not on the CPU) is copied to be hashed; the copy was
    freed before its bytes were read, so that its digest read freed memory (allocator bookkeeping in its first bytes:
    the digest changed from call to call, the index's fingerprint with it)."""
    from tracin_func._fingerprint import tensor_digest

    def digest(t):
        d = hashlib.sha256()
        tensor_digest(d, t)
        return d.hexdigest()

    x = torch.arange(64, dtype=torch.float64).reshape(8, 8)
    assert digest(x.T) == digest(x.T) == digest(x.T.contiguous()) != digest(x)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)
    state = {k: v.T.contiguous().T if v.dim() == 2 else v for k, v in model.state_dict().items()}  # column-major
    ckpts, data = [tc.Checkpoint(state, 0.1)], (torch.randn(6, 4, dtype=DTYPE), torch.tensor([0, 1] * 3))
    index = tc.build_index(tmp_path, model, ckpts, data, loss_fn=LOSS, storage_dtype=DTYPE)  # (queries were refused)
    direct = tc.influence(model, ckpts, data, data, loss_fn=LOSS)
    assert_close(tc.influence(model, ckpts, index, data, loss_fn=LOSS), direct)
    sparse = x.T.to_sparse()  # (its indices are not contiguous)
    assert digest(sparse) == digest(sparse.clone()) == digest(x.T.contiguous().to_sparse()) != digest(x.to_sparse())


def test_a_shards_rows_are_freed_before_the_next_shard_is_made(task, tmp_path, monkeypatch):
    """A build held the last shard's rows while it made the next one: two shards at once, 2.3x a shard's memory
    where the README says a build holds a shard's rows once (a review helper's)."""
    import weakref

    model, ckpts, (x, y), _, ref = task
    made, alive = [], []
    make, write = _build._shard_rows, _build.write_shard

    def shard_rows(*args, **kwargs):
        alive.append([ref() is not None for ref in made])
        return make(*args, **kwargs)

    def write_shard(file, embeddings, *args, **kwargs):
        made.append(weakref.ref(embeddings))
        return write(file, embeddings, *args, **kwargs)

    monkeypatch.setattr(_build, "_shard_rows", shard_rows)
    monkeypatch.setattr(_build, "write_shard", write_shard)
    index = tc.build_index(tmp_path, model, ckpts, (x, y), loss_fn=LOSS, shard_size=4)
    assert len(index.shards) > 2 and alive[1:] and not any(map(any, alive))
    assert_close(index.self_influence(), ref.self_influence)
