"""Float32 products of per-example gradients kept above the subnormals: the test side is lifted by a power of two
(``Representation.lifted``) and what is read from it lowered by the same power, exactly."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin_func as tc
import tracin_func._representations as representations
from tests.conftest import assert_close
from tests.reference import reference_scores
from tracin_func._representations import Dense, Representation

_SUBNORMAL = torch.finfo(torch.float32).tiny


class SureLM(nn.Module):
    """A next-token model sure of itself (logits spanning hundreds): most of its softmax, and so of its head's
    gradient, is below 1e-20, as a trained language model's is over most of its vocabulary. Its head reads every
    token (factor kernels of several rows); ``tied``: the head's weight is the token embedding's."""

    def __init__(self, sure=30.0, tied=False, vocab=200, d=16):
        super().__init__()
        self.sure = sure
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        with torch.no_grad():
            self.head.weight.normal_(0, 1)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)) * self.sure)


def _next_token_losses(model):
    def losses(params, batch):  # [B]: each example's mean next-token cross-entropy
        ids = batch["ids"]
        logits = torch.func.functional_call(model, params, (ids,))[:, :-1]
        tokens = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        return tokens.view(ids.shape[0], -1).mean(1)

    return losses


def _task(model, n_train=12, n_test=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (n_train + n_test, 6), generator=gen)
    ckpts = []
    for lr in (0.1, 0.05):
        moved = {}  # by storage: a tied weight moves as one
        for v in model.state_dict().values():
            moved.setdefault(v.data_ptr(), v + 0.05 * torch.randn(v.shape, generator=gen))
        ckpts.append(tc.Checkpoint({k: moved[v.data_ptr()] for k, v in model.state_dict().items()}, lr=lr))
    return ckpts, {"ids": ids[:n_train]}, {"ids": ids[n_train:]}


@pytest.mark.parametrize("factored", [None, False])
@pytest.mark.parametrize("tied", [False, True])
def test_a_sure_heads_scores_in_float32_are_the_float64_ones(tied, factored, monkeypatch):
    """Most products of two examples' head gradients are subnormal in float32 (checked here); lifted, the scores of
    every kind match the float64 reference to float32's precision."""
    lifts = []
    lower = representations.lowered
    monkeypatch.setattr(representations, "lowered", lambda v, lift, again: lifts.append(lift) or lower(v, lift, again))
    torch.manual_seed(0)
    model = SureLM(tied=tied).eval()
    ckpts, train, test = _task(model)
    losses = _next_token_losses(model)
    first = losses(dict(model.named_parameters()), {"ids": train["ids"][:1]}).sum()
    (grad,) = torch.autograd.grad(first, model.head.weight)
    assert (grad.abs() < 1e-20)[grad != 0].float().mean() > 0.5  # the products of those: subnormal
    opts = dict(loss_fn=tc.BatchLoss(losses), factored=factored)
    got = {
        "influence": tc.influence(model, ckpts, train, test, **opts),
        "self": tc.self_influence(model, ckpts, train, **opts),
        "by_layer": tc.influence(model, ckpts, train, test, per_layer=True, **opts),
    }
    wide = SureLM(tied=tied).double().eval()
    wide_ckpts = [tc.Checkpoint({k: v.double() for k, v in c.params.items()}, lr=c.lr) for c in ckpts]
    reference = tc.ExampleLoss(lambda params, example: _next_token_losses(wide)(params, example).sum())
    ref = reference_scores(wide, wide_ckpts, train, test, loss_fn=reference)
    assert_close(got["influence"].double(), ref.influence, 1e-5)
    assert_close(got["self"].double(), ref.self_influence, 1e-5)
    assert_close(sum(got["by_layer"].values()).double(), ref.influence, 1e-5)
    assert max(lifts) > 0


@pytest.mark.parametrize("tied", [False, True])
def test_lifting_changes_no_bit_of_ordinary_scores(tied, monkeypatch):
    """Where no product is subnormal, lifted operands (here every one: any entry counted tiny) give the very scores
    of unlifted ones: influence, per layer, renormalised, summed over the test set, top-k; self-influence."""
    monkeypatch.setattr(representations, "_TINY", math.inf)
    torch.manual_seed(0)
    model = SureLM(sure=0.1, tied=tied).eval()
    ckpts, train, test = _task(model)
    loss = tc.BatchLoss(_next_token_losses(model))
    calls = {
        "influence": lambda: tc.influence(model, ckpts, train, test, loss_fn=loss),
        "by_layer": lambda: tc.influence(model, ckpts, train, test, loss_fn=loss, per_layer=True),
        "cosine": lambda: tc.influence(model, ckpts, train, test, loss_fn=loss, normalize="cosine"),
        "train": lambda: tc.influence(model, ckpts, train, test, loss_fn=loss, normalize="train"),
        "aggregate": lambda: tc.influence(model, ckpts, train, test, loss_fn=loss, aggregate=True),
        "top_k": lambda: tc.top_k(model, ckpts, train, test, k=3, loss_fn=loss).scores,
        "self": lambda: tc.self_influence(model, ckpts, train, loss_fn=loss),
    }
    lifted = {name: call() for name, call in calls.items()}
    monkeypatch.setattr(representations, "_LIFTED_DTYPES", ())
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
    test = torch.full((3, 4), 1e-30)  # (mostly tiny: lifted)
    test[:, 0] = 0.5
    rep = _dense(test).lifted()
    assert rep.lift > 0
    assert torch.equal(rep.dot(_dense(train)), test @ train.T)
    assert torch.isfinite(rep.dot(_dense(train))).all()


def test_sides_of_few_tiny_entries_and_float64_ones_are_not_lifted():
    """Lifting costs passes over the operands: only where a quarter or more of the first example's nonzero entries
    are below ``_TINY`` (fewer rarely meet in a product), zeros not counted."""
    mostly = torch.full((2, 8), 1e-20)
    mostly[:, :6] = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert _dense(mostly).lifted().lift == 32  # (a zero is no tiny entry: 2 tiny of 3 nonzero)
    few = torch.full((2, 8), 0.5)
    few[0, 0] = 1e-20
    assert _dense(few).lifted().lift == 0
    assert _dense(torch.full((2, 3), 1e-9)).lifted().lift == 0
    assert _dense(mostly.double()).lifted().lift == 0
    assert _dense(torch.zeros(2, 3)).lifted().lift == 0
