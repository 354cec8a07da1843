"""Parity with captum==0.9.0 `TracInCP` on Captum's own fixtures, and Captum's defects shown against the brute-force
float64 reference of `tests/reference.py` (one `torch.autograd.grad` per example).

Captum's default checkpoint loader gives lr = 1, so every comparison here loads Captum's checkpoints with a custom
`checkpoints_load_func` returning a distinct lr != 1 per checkpoint, and gives ours the same lrs.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import tracin_func as tc
from tests.conftest import assert_close, assert_differs
from tests.models import EmbedNormNet
from tests.reference import reference_scores

pytest.importorskip("captum")
pytest.importorskip(
    "parameterized",
    reason="captum.testing.helpers.influence.common (Captum's fixtures) imports `parameterized`; add it to the test "
    "extra",
)

from captum.influence import TracInCP, TracInCPFast  # noqa: E402
from captum.testing.helpers.influence.common import (  # noqa: E402
    ExplicitDataset,
    UnpackDataset,
    _format_batch_into_tuple,
    get_random_model_and_data,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# lr of each checkpoint file written by get_random_model_and_data(model_type="random")
LRS = {f"checkpoint-reg-{i}.pt": lr for i, lr in zip(range(1, 6), (0.3, 0.05, 1.7, 0.8, 0.125))}
REL64, REL32 = 1e-10, 1e-5
K = 5


@functools.cache
def _read_state(path: str, mtime_ns: int) -> dict[str, torch.Tensor]:
    del mtime_ns  # part of the cache key only
    return torch.load(path, weights_only=True)


def _load_with_lr(model: nn.Module, path: str) -> float:
    """Captum `checkpoints_load_func`: load the weights in place and return this checkpoint's lr. Files are read
    once (Captum reloads every checkpoint for every training batch, which would dominate the test time)."""
    model.load_state_dict(_read_state(path, os.stat(path).st_mtime_ns))
    return LRS[os.path.basename(path)]


def _our_checkpoints(directory: str) -> list[tc.Checkpoint]:
    names = sorted(LRS, reverse=True)  # any order: the sum over checkpoints does not depend on it
    return tc.load_checkpoints([os.path.join(directory, n) for n in names], lr=[LRS[n] for n in names])


# --- per-example losses for the float64 reference (tests/reference.py) -------------------------------------------


def _sum_sq(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum()


def _mean_sq(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _as_batch(dataset) -> tuple[torch.Tensor, ...]:
    return tuple(next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False))))


# --- Captum's fixture --------------------------------------------------------------------------------------------


_FIXTURES: dict[bool, tuple] = {}


def _captum_fixture(unpack: bool, tmp_path_factory) -> tuple:
    """Captum's `get_random_model_and_data` (BasicLinearNet, or MultLinearNet with 2 inputs), seed 1234, built once
    per module run."""
    if unpack not in _FIXTURES:
        directory = str(tmp_path_factory.mktemp("captum_ckpts"))
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            net, train, test_x, test_y = get_random_model_and_data(directory, unpack)
        test = _format_batch_into_tuple(test_x, test_y, unpack)
        _FIXTURES[unpack] = (net, train, test, directory, unpack)
    return _FIXTURES[unpack]


@pytest.fixture(scope="module", params=[False, True], ids=["single-input", "unpack-inputs"])
def fixture(request, tmp_path_factory):
    return _captum_fixture(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-input fixture, for the defect tests (one model is enough to show each defect)."""
    return _captum_fixture(False, tmp_path_factory)


LOSSES = {
    # name: (criterion, Captum's sample_wise_grads_per_batch)
    "none-per-example": (lambda: nn.MSELoss(reduction="none"), False),
    "sum-batch-wise": (lambda: nn.MSELoss(reduction="sum"), True),
    "mean-batch-wise": (lambda: nn.MSELoss(reduction="mean"), True),
}


@pytest.mark.parametrize(
    "fixture, loss_name, layers",
    [
        (False, "none-per-example", None),
        (False, "none-per-example", ["linear2"]),
        (False, "sum-batch-wise", None),
        (False, "sum-batch-wise", ["linear1", "linear2"]),
        (False, "mean-batch-wise", None),
        (False, "mean-batch-wise", ["linear1"]),
        (True, "none-per-example", None),
        (True, "sum-batch-wise", ["pre", "linear2"]),
        (True, "mean-batch-wise", None),
    ],
    ids=[
        "single-none-all",
        "single-none-linear2",
        "single-sum-all",
        "single-sum-linear1+2",
        "single-mean-all",
        "single-mean-linear1",
        "unpack-none-all",
        "unpack-sum-pre+linear2",
        "unpack-mean-all",
    ],
    indirect=["fixture"],
)
def test_tracincp_parity_float64(fixture, loss_name, layers):
    """influence, aggregate, top-k proponents and opponents, and self-influence, at 1e-10 relative."""
    net, train, test, directory, _ = fixture
    make_loss, sample_wise = LOSSES[loss_name]
    captum = TracInCP(
        net,
        train,
        directory,
        checkpoints_load_func=_load_with_lr,
        layers=layers,
        loss_fn=make_loss(),
        batch_size=8,
        sample_wise_grads_per_batch=sample_wise,
    )
    ckpts = _our_checkpoints(directory)
    kw = dict(loss_fn=make_loss(), layers=layers, batch_size=8)

    scores = tc.influence(net, ckpts, train, test, **kw)
    assert_close(scores, captum.influence(test), REL64)

    assert_close(
        tc.influence(net, ckpts, train, test, aggregate=True, **kw), captum.influence(test, aggregate=True), REL64
    )

    for proponents in (True, False):
        theirs = captum.influence(test, k=K, proponents=proponents)
        ours = tc.top_k(net, ckpts, train, test, k=K, proponents=proponents, **kw)
        assert torch.equal(ours.indices, theirs.indices)
        assert_close(ours.scores, theirs.influence_scores, REL64)
        torch.testing.assert_close(scores.gather(1, ours.indices), ours.scores, rtol=1e-12, atol=0)

    theirs = captum.influence(test, k=K, proponents=True, aggregate=True)
    ours = tc.top_k(net, ckpts, train, test, k=K, aggregate=True, **kw)
    assert torch.equal(ours.indices, theirs.indices)
    assert_close(ours.scores, theirs.influence_scores, REL64)

    assert_close(tc.self_influence(net, ckpts, train, **kw), captum.self_influence(), REL64)


def test_parity_with_captum_default_loader_lr_one(fixture):
    """Captum's default loader: plain state dicts and lr = 1."""
    net, train, test, directory, _ = fixture
    captum = TracInCP(net, train, directory, loss_fn=nn.MSELoss(reduction="none"), batch_size=8)
    ckpts = tc.load_checkpoints(directory, lr=1.0)
    loss = nn.MSELoss(reduction="none")
    theirs = captum.influence(test)
    assert_close(tc.influence(net, ckpts, train, test, loss_fn=loss), theirs, REL64)
    assert_close(tc.self_influence(net, ckpts, train, loss_fn=loss), captum.self_influence(), REL64)
    # and the lr really matters: our lr != 1 checkpoints differ from Captum's lr = 1
    assert_differs(tc.influence(net, _our_checkpoints(directory), train, test, loss_fn=loss), theirs)


def test_parity_matches_brute_force(fixture):
    """Both agree with each other above; this pins them to the ground truth (lr != 1, per-example sum of squares)."""
    net, train, test, directory, _ = fixture
    ckpts = _our_checkpoints(directory)
    reference = reference_scores(net, ckpts, _as_batch(train), test, loss_fn=_sum_sq).influence
    assert_close(tc.influence(net, ckpts, train, test, loss_fn=nn.MSELoss(reduction="none")), reference, REL64)


@pytest.mark.parametrize(
    "fixture, loss_name",
    [(False, "none-per-example"), (True, "sum-batch-wise")],
    ids=["single-none", "unpack-sum"],
    indirect=["fixture"],
)
def test_tracincp_parity_float32(fixture, loss_name):
    net, train, test, directory, unpack = fixture
    make_loss, sample_wise = LOSSES[loss_name]
    net32 = copy.deepcopy(net).float()
    if unpack:
        train32 = UnpackDataset([s.float() for s in train.samples], train.labels.float())
    else:
        train32 = ExplicitDataset(train.samples.float(), train.labels.float())
    test32 = tuple(t.float() for t in test)
    captum = TracInCP(
        net32,
        train32,
        directory,
        checkpoints_load_func=_load_with_lr,
        loss_fn=make_loss(),
        batch_size=8,
        sample_wise_grads_per_batch=sample_wise,
    )
    ckpts = _our_checkpoints(directory)  # float64 files, computed in float32 like Captum's float32 model
    kw = dict(loss_fn=make_loss(), batch_size=8, dtype=torch.float32)
    ours = tc.influence(net32, ckpts, train32, test32, **kw)
    assert ours.dtype == torch.float32
    assert_close(ours, captum.influence(test32), REL32)
    assert_close(tc.self_influence(net32, ckpts, train32, **kw), captum.self_influence(), REL32)
    # float32 is not float64: the comparison tolerance is meaningful
    assert_close(ours.double(), tc.influence(net, ckpts, train, test, loss_fn=make_loss()), REL32)


# --- Captum's defects: we are right (vs brute force), Captum differs ---------------------------------------------


def test_defect_intermediate_quantities_scale_by_lr_not_sqrt_lr(single):
    net, train, test, directory, _ = single
    loss = nn.MSELoss(reduction="none")
    captum = TracInCP(net, train, directory, checkpoints_load_func=_load_with_lr, loss_fn=loss, batch_size=8)
    ckpts = _our_checkpoints(directory)
    reference = reference_scores(net, ckpts, _as_batch(train), test, loss_fn=_sum_sq).influence

    ours = tc.embeddings(net, ckpts, test, loss_fn=loss) @ tc.embeddings(net, ckpts, train, loss_fn=loss).T
    assert_close(ours, reference, REL64)

    train_loader = DataLoader(train, batch_size=8, shuffle=False)
    theirs = captum.compute_intermediate_quantities(test) @ captum.compute_intermediate_quantities(train_loader).T
    assert_differs(theirs, reference)
    lr_squared = [tc.Checkpoint(c.params, float(c.lr) ** 2) for c in ckpts]
    squared = reference_scores(net, lr_squared, _as_batch(train), test, loss_fn=_sum_sq).influence
    assert_close(theirs, squared, REL64)  # Captum's embeddings give sum_c lr_c^2 <g, g'>
    assert_close(captum.influence(test), reference, REL64)  # while its influence is right


def test_defect_test_loss_fn_reduction_ignored_raises(single):
    """loss_fn "sum" + test_loss_fn "mean" on the batch-wise path: Captum uses loss_fn's reduction for the test
    loss and fails its own assertion; we score per-example means for test examples."""
    net, train, test, directory, _ = single
    captum = TracInCP(
        net,
        train,
        directory,
        checkpoints_load_func=_load_with_lr,
        loss_fn=nn.MSELoss(reduction="sum"),
        test_loss_fn=nn.MSELoss(reduction="mean"),
        batch_size=8,
        sample_wise_grads_per_batch=True,
    )
    with pytest.raises(AssertionError, match="does not match"):
        captum.influence(test)
    ckpts = _our_checkpoints(directory)
    ours = tc.influence(
        net, ckpts, train, test, loss_fn=nn.MSELoss(reduction="sum"), test_loss_fn=nn.MSELoss(reduction="mean")
    )
    reference = reference_scores(net, ckpts, _as_batch(train), test, loss_fn=_sum_sq, test_loss_fn=_mean_sq)
    assert_close(ours, reference.influence, REL64)


def test_defect_test_loss_fn_reduction_ignored_silently_misscales(single):
    """loss_fn "mean" + a test loss without `.reduction` that sums: Captum applies loss_fn's "mean" rescaling
    (x batch size) to the test gradients, so its scores are n_test times too large, silently."""
    net, train, test, directory, _ = single

    def summed(out, target):  # no `.reduction`: one example's loss is its sum of squares
        return ((out - target) ** 2).sum()

    captum = TracInCP(
        net,
        train,
        directory,
        checkpoints_load_func=_load_with_lr,
        loss_fn=nn.MSELoss(reduction="mean"),
        test_loss_fn=summed,
        batch_size=8,
        sample_wise_grads_per_batch=True,
    )
    ckpts = _our_checkpoints(directory)
    reference = reference_scores(net, ckpts, _as_batch(train), test, loss_fn=_mean_sq, test_loss_fn=_sum_sq).influence
    ours = tc.influence(net, ckpts, train, test, loss_fn=nn.MSELoss(reduction="mean"), test_loss_fn=summed)
    assert_close(ours, reference, REL64)
    theirs = captum.influence(test)
    assert_differs(theirs, reference)
    assert_close(theirs, reference * test[-1].shape[0], REL64)


def test_defect_fast_last_layer_drops_bias_and_differentiates_the_output(single):
    """TracInCPFast on BasicLinearNet (tanh after `linear2`, with a bias) is not TracIn on `linear2`; our
    `method="last_layer"` is: it equals the brute force restricted to linear2's parameters, and TracInCP(layers)."""
    net, train, test, directory, _ = single
    loss = nn.MSELoss(reduction="sum")
    fast = TracInCPFast(net, net.linear2, train, directory, _load_with_lr, loss_fn=loss, batch_size=8)
    ckpts = _our_checkpoints(directory)
    names = ["linear2.weight", "linear2.bias"]
    reference = reference_scores(net, ckpts, _as_batch(train), test, loss_fn=_sum_sq, params=names).influence
    ours = tc.influence(net, ckpts, train, test, loss_fn=loss, method="last_layer")
    assert_close(ours, reference, REL64)
    assert_differs(fast.influence(test), reference)
    ours_self = tc.self_influence(net, ckpts, train, loss_fn=loss, method="last_layer")
    train_batch = _as_batch(train)
    self_reference = reference_scores(net, ckpts, train_batch, loss_fn=_sum_sq, params=names).self_influence
    assert_close(ours_self, self_reference, REL64)
    assert_differs(fast.self_influence(), ours_self)


def test_defect_batch_wise_path_drops_embedding_and_layernorm(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = EmbedNormNet().double().eval()
        names = []
        for i in range(2):
            state = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
            names.append(f"checkpoint-reg-{i + 1}.pt")
            torch.save(state, tmp_path / names[-1])
        tokens = torch.randint(0, 7, (12, 5)).double()
        targets = torch.randn(12, 3, dtype=torch.float64)
    train = ExplicitDataset(tokens[:8], targets[:8])
    test = (tokens[8:], targets[8:])
    captum = TracInCP(
        net,
        train,
        str(tmp_path),
        checkpoints_load_func=_load_with_lr,
        loss_fn=nn.MSELoss(reduction="sum"),
        batch_size=4,
        sample_wise_grads_per_batch=True,
    )
    ckpts = tc.load_checkpoints([tmp_path / n for n in names], lr=[LRS[n] for n in names])
    train_batch = (tokens[:8], targets[:8])
    reference = reference_scores(net, ckpts, train_batch, test, loss_fn=_sum_sq).influence

    ours = tc.influence(net, ckpts, train, test, loss_fn=nn.MSELoss(reduction="sum"))
    assert_close(ours, reference, REL64)
    assert tc.embeddings(net, ckpts, test, loss_fn=nn.MSELoss()).shape[1] == 2 * sum(
        p.numel() for p in net.parameters()
    )

    theirs = captum.influence(test)
    assert_differs(theirs, reference)
    fc_only = reference_scores(net, ckpts, train_batch, test, loss_fn=_sum_sq, params=["fc.weight", "fc.bias"])
    assert_close(theirs, fc_only.influence, REL64)  # Captum silently scored the Linear layer only
    ours_fc = tc.influence(net, ckpts, train, test, loss_fn=nn.MSELoss(reduction="sum"), layers=["fc"])
    assert_close(ours_fc, theirs, REL64)


def test_defect_default_loader_cannot_carry_a_learning_rate(single, tmp_path):
    net, train, test, directory, _ = single
    state = torch.load(os.path.join(directory, "checkpoint-reg-3.pt"), weights_only=True)
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    flat.mkdir()
    nested.mkdir()
    torch.save({**state, "learning_rate": 0.1}, flat / "ckpt-1.pt")
    torch.save({"model_state_dict": state, "learning_rate": 0.1}, nested / "ckpt-1.pt")
    loss = nn.MSELoss(reduction="none")
    reference = reference_scores(net, [tc.Checkpoint(state, 0.1)], _as_batch(train), test, loss_fn=_sum_sq).influence
    for directory_with_lr in (flat, nested):
        captum = TracInCP(net, train, str(directory_with_lr), loss_fn=loss, batch_size=8)
        with pytest.raises(RuntimeError, match="Unexpected key|Missing key"):
            captum.influence(test)
        ckpts = tc.load_checkpoints(str(directory_with_lr))
        assert float(ckpts[0].lr) == 0.1
        assert_close(tc.influence(net, ckpts, train, test, loss_fn=loss), reference, REL64)


def test_defect_checkpoint_list_resorted_and_requires_grad_changed(single):
    net, train, _, directory, _ = single
    net = copy.deepcopy(net)
    net.linear1.weight.requires_grad_(False)
    given = [os.path.join(directory, n) for n in ("checkpoint-reg-3.pt", "checkpoint-reg-1.pt")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum = TracInCP(net, train, list(given), layers=["linear1"], loss_fn=nn.MSELoss(reduction="none"))
    assert captum.checkpoints == sorted(given)  # Captum re-sorted the user's list
    assert net.linear1.weight.requires_grad  # and switched requires_grad on for good

    frozen = copy.deepcopy(net)
    frozen.linear1.weight.requires_grad_(False)
    ckpts = tc.load_checkpoints(given, lr=[0.3, 0.1])
    assert [float(c.lr) for c in ckpts] == [0.3, 0.1]
    assert torch.equal(ckpts[0].params["linear1.weight"], torch.load(given[0], weights_only=True)["linear1.weight"])
    tc.self_influence(frozen, ckpts, train, loss_fn=nn.MSELoss(), layers=["linear1"])
    assert not frozen.linear1.weight.requires_grad
