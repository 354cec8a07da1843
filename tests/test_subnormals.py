"""Float32 products of per-example gradients kept above the subnormals: the test side is lifted by a power of two
(``Representation.lifted``) and what is read from it lowered by the same power, exactly."""

import pytest
import torch
from torch import nn

import tracin_func as tc
import tracin_func._representations as representations
from tests.conftest import assert_close
from tests.reference import reference_scores
from tracin_func._representations import Dense, Representation

CE = nn.CrossEntropyLoss()
_SUBNORMAL = torch.finfo(torch.float32).tiny


class SureLM(nn.Module):
    """A token classifier whose head is sure of itself (logits spanning about 60): most of its softmax, and so of
    its head's gradient, is below 1e-20, as a trained language model's is over most of its vocabulary."""

    def __init__(self, sure=30.0, vocab=200, d=16):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        with torch.no_grad():
            self.head.weight.normal_(0, sure)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def _task(model, n_train=12, n_test=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (n_train + n_test, 5), generator=gen)
    labels = torch.randint(0, 200, (n_train + n_test,), generator=gen)
    ckpts = []
    for lr in (0.1, 0.05):
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
        ckpts.append(tc.Checkpoint(state, lr=lr))
    return ckpts, (ids[:n_train], labels[:n_train]), (ids[n_train:], labels[n_train:])


def _wide(model, ckpts):
    wide = [tc.Checkpoint({k: v.double() for k, v in c.params.items()}, lr=c.lr) for c in ckpts]
    return model.double(), wide


@pytest.mark.parametrize("factored", [None, False])
def test_a_sure_heads_scores_in_float32_are_the_float64_ones(factored):
    """Most products of two examples' head gradients are subnormal in float32 (checked here); lifted, the scores of
    every kind match the float64 reference to float32's precision."""
    torch.manual_seed(0)
    model = SureLM().eval()
    ckpts, train, test = _task(model)
    grads = torch.autograd.grad(CE(model(train[0][:1]), train[1][:1]), model.head.weight)[0]  # (one example's)
    assert ((grads != 0) & (grads.abs() < 1e-20)).float().mean() > 0.5  # the products of those: subnormal
    opts = dict(loss_fn=CE, factored=factored)
    got = {
        "influence": tc.influence(model, ckpts, train, test, **opts),
        "self": tc.self_influence(model, ckpts, train, **opts),
        "by_layer": tc.influence(model, ckpts, train, test, per_layer=True, **opts),
    }
    ref = reference_scores(*_wide(model, ckpts), train, test, loss_fn=CE)
    assert_close(got["influence"].double(), ref.influence, 1e-5)
    assert_close(got["self"].double(), ref.self_influence, 1e-5)
    assert_close(sum(got["by_layer"].values()).double(), ref.influence, 1e-5)


def _without_lifting(monkeypatch):
    monkeypatch.setattr(representations, "_LIFTED_DTYPES", ())


def test_lifting_changes_no_bit_of_ordinary_scores(monkeypatch):
    """Where no product is subnormal, the lifted test side gives the very scores of the unlifted one: influence,
    per layer, renormalised, summed over the test set, top-k."""
    torch.manual_seed(0)
    model = SureLM(sure=0.1).eval()
    ckpts, train, test = _task(model)
    calls = {
        "influence": lambda: tc.influence(model, ckpts, train, test, loss_fn=CE),
        "by_layer": lambda: tc.influence(model, ckpts, train, test, loss_fn=CE, per_layer=True),
        "cosine": lambda: tc.influence(model, ckpts, train, test, loss_fn=CE, normalize="cosine"),
        "train": lambda: tc.influence(model, ckpts, train, test, loss_fn=CE, normalize="train"),
        "aggregate": lambda: tc.influence(model, ckpts, train, test, loss_fn=CE, aggregate=True),
        "top_k": lambda: tc.top_k(model, ckpts, train, test, k=3, loss_fn=CE).scores,
    }
    lifted = {name: call() for name, call in calls.items()}
    _without_lifting(monkeypatch)
    for name, call in calls.items():
        plain = call()
        for got, want in zip(*(x.values() if isinstance(x, dict) else [x] for x in (lifted[name], plain))):
            assert torch.equal(got, want), name


def _dense(grads):
    return Representation((Dense({"p": grads}),), ("p",))


def test_products_with_a_lifted_side_are_not_subnormal():
    """Entries of 1e-21 on both sides multiply to 1e-42, a subnormal; against the lifted side, to normal numbers.
    Lowering reads the products exactly, and ``unlifted`` gives back the very gradients."""
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(6, 300, generator=gen) * 1e-21
    test = torch.randn(3, 300, generator=gen) * 1e-21
    test[:, 0] = 0.5  # (the largest entry sets the lift)
    rep = _dense(test).lifted()
    assert rep.lift == 32
    lifted = rep.parts[0].grads["p"]
    assert (lifted.abs().amax() < 2.0**32) and (lifted.abs().amax() >= 2.0**31)
    products = train[:, None, 1:] * lifted[None, :, 1:]
    assert ((products != 0) & (products.abs() < _SUBNORMAL)).sum() == 0
    assert ((train[:, None, 1:] * test[None, :, 1:]).abs() < _SUBNORMAL).all()  # (unlifted: every one)
    assert torch.equal(rep.unlifted().parts[0].grads["p"], test)
    want = train.double() @ test.double().T
    assert_close(rep.dot(_dense(train)).T.double(), want, 1e-6)
    assert_close(rep.sq_norm().double(), test.double().square().sum(1), 1e-6)


def test_a_product_past_float32s_range_once_lifted_is_read_unlifted():
    """A training gradient's entries of 2^100 against a lifted test side would multiply past float32's range (inf):
    such a product is computed from the gradients themselves."""
    train = torch.full((2, 4), 2.0**100)
    test = torch.full((3, 4), 0.5)
    rep = _dense(test).lifted()
    assert rep.lift > 0
    assert torch.equal(rep.dot(_dense(train)), test @ train.T)
    assert torch.isfinite(rep.dot(_dense(train))).all()


def test_float64_and_other_devices_sides_are_not_lifted():
    assert _dense(torch.full((2, 3), 1e-30, dtype=torch.float64)).lifted().lift == 0
    assert _dense(torch.zeros(2, 3)).lifted().lift == 0
