"""Parity with captum==0.9.0 `TracInCP` on Captum's own fixtures, and Captum's defects shown against a brute-force
reference (one `torch.autograd.grad` per example, float64).

Captum's default checkpoint loader gives lr = 1, so every comparison here loads Captum's checkpoints with a custom
`checkpoints_load_func` returning a distinct lr != 1 per checkpoint, and gives ours the same lrs.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import tracin_func as tc
from tests.models import EmbedNormNet

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


def _assert_rel(ours: torch.Tensor, theirs: torch.Tensor, rel: float) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = theirs.abs().max()
    assert scale > 0
    err = (ours.to(theirs.dtype) - theirs).abs().max()
    assert err <= rel * scale, f"max abs diff {err:.3e} > {rel:g} * {scale:.3e}"


def _assert_differs(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> None:
    assert (a - b).abs().max() > rel * b.abs().max(), "expected Captum to differ here"


# --- brute-force reference ---------------------------------------------------------------------------------------


def _sum_sq(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum()


def _mean_sq(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _brute_grads(
    net: nn.Module,
    state: dict[str, torch.Tensor],
    batch: Sequence[torch.Tensor],
    example_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """``[n, P]`` per-example gradients, one autograd.grad per example, in float64."""
    model = copy.deepcopy(net).double()
    model.load_state_dict(state)
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    rows = []
    for i in range(batch[-1].shape[0]):
        out = model(*(t[i : i + 1].double() for t in batch[:-1]))
        g = torch.autograd.grad(example_loss(out, batch[-1][i : i + 1].double()), params)
        rows.append(torch.cat([x.flatten() for x in g]))
    return torch.stack(rows)


def _brute_influence(net, ckpts, train, test, train_loss, test_loss=None, names=None, lr_power=1.0):
    test_loss = test_loss or train_loss
    total = 0
    for c in ckpts:
        state = {k: v.double() for k, v in c.params.items()}
        g_test = _brute_grads(net, state, test, test_loss, names)
        g_train = _brute_grads(net, state, train, train_loss, names)
        total = total + float(c.lr) ** lr_power * g_test @ g_train.T
    return total


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
    _assert_rel(scores, captum.influence(test), REL64)

    _assert_rel(
        tc.influence(net, ckpts, train, test, aggregate=True, **kw), captum.influence(test, aggregate=True), REL64
    )

    for proponents in (True, False):
        theirs = captum.influence(test, k=K, proponents=proponents)
        ours = tc.top_k(net, ckpts, train, test, k=K, proponents=proponents, **kw)
        assert torch.equal(ours.indices, theirs.indices)
        _assert_rel(ours.scores, theirs.influence_scores, REL64)
        torch.testing.assert_close(scores.gather(1, ours.indices), ours.scores, rtol=1e-12, atol=0)

    theirs = captum.influence(test, k=K, proponents=True, aggregate=True)
    ours = tc.top_k(net, ckpts, train, test, k=K, aggregate=True, **kw)
    assert torch.equal(ours.indices, theirs.indices)
    _assert_rel(ours.scores, theirs.influence_scores, REL64)

    _assert_rel(tc.self_influence(net, ckpts, train, **kw), captum.self_influence(), REL64)


def test_parity_with_captum_default_loader_lr_one(fixture):
    """Captum's default loader: plain state dicts and lr = 1."""
    net, train, test, directory, _ = fixture
    captum = TracInCP(net, train, directory, loss_fn=nn.MSELoss(reduction="none"), batch_size=8)
    ckpts = tc.load_checkpoints(directory, lr=1.0)
    loss = nn.MSELoss(reduction="none")
    theirs = captum.influence(test)
    _assert_rel(tc.influence(net, ckpts, train, test, loss_fn=loss), theirs, REL64)
    _assert_rel(tc.self_influence(net, ckpts, train, loss_fn=loss), captum.self_influence(), REL64)
    # and the lr really matters: our lr != 1 checkpoints differ from Captum's lr = 1
    _assert_differs(tc.influence(net, _our_checkpoints(directory), train, test, loss_fn=loss), theirs)


def test_parity_matches_brute_force(fixture):
    """Both agree with each other above; this pins them to the ground truth (lr != 1, per-example sum of squares)."""
    net, train, test, directory, _ = fixture
    ckpts = _our_checkpoints(directory)
    reference = _brute_influence(net, ckpts, _as_batch(train), test, _sum_sq)
    _assert_rel(tc.influence(net, ckpts, train, test, loss_fn=nn.MSELoss(reduction="none")), reference, REL64)


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
    _assert_rel(ours, captum.influence(test32), REL32)
    _assert_rel(tc.self_influence(net32, ckpts, train32, **kw), captum.self_influence(), REL32)
    # float32 is not float64: the comparison tolerance is meaningful
    _assert_rel(ours.double(), tc.influence(net, ckpts, train, test, loss_fn=make_loss()), REL32)


# --- Captum's defects: we are right (vs brute force), Captum differs ---------------------------------------------


def test_defect_intermediate_quantities_scale_by_lr_not_sqrt_lr(single):
    net, train, test, directory, _ = single
    loss = nn.MSELoss(reduction="none")
    captum = TracInCP(net, train, directory, checkpoints_load_func=_load_with_lr, loss_fn=loss, batch_size=8)
    ckpts = _our_checkpoints(directory)
    reference = _brute_influence(net, ckpts, _as_batch(train), test, _sum_sq)

    ours = tc.embeddings(net, ckpts, test, loss_fn=loss) @ tc.embeddings(net, ckpts, train, loss_fn=loss).T
    _assert_rel(ours, reference, REL64)

    train_loader = DataLoader(train, batch_size=8, shuffle=False)
    theirs = captum.compute_intermediate_quantities(test) @ captum.compute_intermediate_quantities(train_loader).T
    _assert_differs(theirs, reference)
    squared = _brute_influence(net, ckpts, _as_batch(train), test, _sum_sq, lr_power=2.0)
    _assert_rel(theirs, squared, REL64)  # Captum's embeddings give sum_c lr_c^2 <g, g'>
    _assert_rel(captum.influence(test), reference, REL64)  # while its influence is right


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
    _assert_rel(ours, _brute_influence(net, ckpts, _as_batch(train), test, _sum_sq, _mean_sq), REL64)


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
    reference = _brute_influence(net, ckpts, _as_batch(train), test, _mean_sq, _sum_sq)
    ours = tc.influence(net, ckpts, train, test, loss_fn=nn.MSELoss(reduction="mean"), test_loss_fn=summed)
    _assert_rel(ours, reference, REL64)
    theirs = captum.influence(test)
    _assert_differs(theirs, reference)
    _assert_rel(theirs, reference * test[-1].shape[0], REL64)


def test_defect_fast_last_layer_drops_bias_and_differentiates_the_output(single):
    """TracInCPFast on BasicLinearNet (tanh after `linear2`, with a bias) is not TracIn on `linear2`; our
    `method="last_layer"` is: it equals the brute force restricted to linear2's parameters, and TracInCP(layers)."""
    net, train, test, directory, _ = single
    loss = nn.MSELoss(reduction="sum")
    fast = TracInCPFast(net, net.linear2, train, directory, _load_with_lr, loss_fn=loss, batch_size=8)
    ckpts = _our_checkpoints(directory)
    names = ["linear2.weight", "linear2.bias"]
    reference = _brute_influence(net, ckpts, _as_batch(train), test, _sum_sq, names=names)
    ours = tc.influence(net, ckpts, train, test, loss_fn=loss, method="last_layer")
    _assert_rel(ours, reference, REL64)
    _assert_differs(fast.influence(test), reference)
    ours_self = tc.self_influence(net, ckpts, train, loss_fn=loss, method="last_layer")
    train_batch = _as_batch(train)
    self_reference = torch.diagonal(_brute_influence(net, ckpts, train_batch, train_batch, _sum_sq, names=names))
    _assert_rel(ours_self, self_reference, REL64)
    _assert_differs(fast.self_influence(), ours_self)


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
    reference = _brute_influence(net, ckpts, train_batch, test, _sum_sq)

    ours = tc.influence(net, ckpts, train, test, loss_fn=nn.MSELoss(reduction="sum"))
    _assert_rel(ours, reference, REL64)
    assert tc.embeddings(net, ckpts, test, loss_fn=nn.MSELoss()).shape[1] == 2 * sum(
        p.numel() for p in net.parameters()
    )

    theirs = captum.influence(test)
    _assert_differs(theirs, reference)
    fc_only = _brute_influence(net, ckpts, train_batch, test, _sum_sq, names=["fc.weight", "fc.bias"])
    _assert_rel(theirs, fc_only, REL64)  # Captum silently scored the Linear layer only
    ours_fc = tc.influence(net, ckpts, train, test, loss_fn=nn.MSELoss(reduction="sum"), layers=["fc"])
    _assert_rel(ours_fc, theirs, REL64)


def test_defect_default_loader_cannot_carry_a_learning_rate(single, tmp_path):
    net, train, test, directory, _ = single
    state = torch.load(os.path.join(directory, "checkpoint-reg-3.pt"), weights_only=True)
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    flat.mkdir()
    nested.mkdir()
    torch.save({**state, "learning_rate": 0.1}, flat / "ckpt-1.pt")
    torch.save({"model_state_dict": state, "learning_rate": 0.1}, nested / "ckpt-1.pt")
    loss = nn.MSELoss(reduction="none")
    reference = _brute_influence(net, [tc.Checkpoint(state, 0.1)], _as_batch(train), test, _sum_sq)
    for directory_with_lr in (flat, nested):
        captum = TracInCP(net, train, str(directory_with_lr), loss_fn=loss, batch_size=8)
        with pytest.raises(RuntimeError, match="Unexpected key|Missing key"):
            captum.influence(test)
        ckpts = tc.load_checkpoints(str(directory_with_lr))
        assert float(ckpts[0].lr) == 0.1
        _assert_rel(tc.influence(net, ckpts, train, test, loss_fn=loss), reference, REL64)


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
