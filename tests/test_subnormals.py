"""Float32 products of per-example gradients kept above the subnormals: the test side is lifted by a power of two
(``Representation.lifted``) and what is read from it lowered by the same power, exactly."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin_func as tc
import tracin_func._representations as representations
from tests.conftest import assert_close
from tests.reference import reference_scores
from tracin_func._layers import Site
from tracin_func._representations import Dense, Factored, Representation

CE = nn.CrossEntropyLoss()
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
    train = torch.randn(6, 1200, generator=gen) * 1e-21
    test = torch.randn(3, 1200, generator=gen) * 1e-21
    test[:, 0] = 0.5  # (the largest entry sets the lift)
    rep = _dense(test).lifted()
    assert rep.lift == 48
    lifted = rep.parts[0].grads["p"]
    assert (lifted.abs().amax() < 2.0**48) and (lifted.abs().amax() >= 2.0**47)
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
    train = torch.full((2, 1024), 2.0**100)
    test = torch.full((3, 1024), 1e-30)  # (mostly tiny: lifted)
    test[:, 0] = 0.5
    rep = _dense(test).lifted()
    assert rep.lift > 0
    assert torch.equal(rep.dot(_dense(train)), test @ train.T)
    assert torch.isfinite(rep.dot(_dense(train))).all()


def test_sides_of_few_tiny_entries_and_float64_ones_are_not_lifted():
    """Lifting costs passes over the operands: only where a quarter or more of the first example's nonzero entries
    are below ``_TINY`` (fewer rarely meet in a product), zeros not counted, and an example holds 1024 entries or
    more (a smaller one's products cost little however slow)."""
    mostly = torch.full((2, 1024), 0.5)
    mostly[:, :600], mostly[:, 600:800] = 0.0, 1e-20
    assert _dense(mostly).lifted().lift == 48  # (a zero is no tiny entry: 200 tiny of 424 nonzero)
    few = torch.full((2, 1024), 0.5)
    few[0, :200] = 1e-20
    assert _dense(few).lifted().lift == 0
    assert _dense(mostly[:, 600:1000]).lifted().lift == 0  # (an example of fewer than 1024 entries)
    assert _dense(torch.full((2, 3), 1e-9)).lifted().lift == 0
    assert _dense(mostly.double()).lifted().lift == 0
    assert _dense(torch.zeros(2, 3)).lifted().lift == 0


def test_test_batches_concatenated_keep_their_least_lift():
    """A test set read in several batches is concatenated per chunk: each batch is brought to the least lift among
    them (exact, powers of two), not unlifted (lifting was lost on every test set of more than one batch: a tied
    LM's 100 test examples in batches of 32 took 3.65 s, 0.39 s lifted)."""
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(3, 1024, generator=gen) * 1e-21, torch.randn(2, 1024, generator=gen) * 1e-25
    first[:, 0], second[:, 0] = 0.5, 1e-3
    lifted = [_dense(first).lifted(), _dense(second).lifted()]
    assert [rep.lift for rep in lifted] == [48, 57]
    joined = Representation.concat(lifted)
    assert joined.lift == 48
    assert torch.equal(joined.unlifted().parts[0].grads["p"], torch.cat([first, second]))


def test_a_sure_first_test_example_leaves_the_others_finite():
    """The test side's lift is read from every example: a sure first test example (gradients of 1e-30) lifted by
    its own largest entry took a wrong one's factored norms (about 1) past float32's range, and the call refused
    them as non-finite; a lifted part's norms past the range are formed again from its factors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Flatten(), nn.Linear(192, 3))
    with torch.no_grad():
        model[-1].weight.mul_(800)
    x = torch.randn(10, 6, 32)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[1], y[4:] = logits[1].argmin(), logits[4:].argmin(1)  # (the second test example and some training ones wrong)
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.1)]
    got = tc.influence(model, ckpts, (x[2:], y[2:]), (x[:2], y[:2]), loss_fn=CE)
    want = tc.influence(model, ckpts, (x[2:], y[2:]), (x[:2], y[:2]), loss_fn=CE, dtype=torch.float64)
    assert_close(got.double(), want, 1e-5)
    part = Factored(Site("fc", "linear", "fc.weight", None, (3, 4)), torch.ones(1, 2, 4), torch.ones(1, 2, 3))
    assert representations._times(part._replace(norms=torch.tensor([2.0**100])), 2.0**40).norms is None


def test_scores_below_the_least_normal_number_are_warned():
    """Scores whose largest lies among float32's subnormals keep few digits or none (found by review: gradient entries
    of 1e-22 scored 38 of 40 influences 0 and the largest 2.7x off, self-influence 14%, unwarned): warned, naming
    float64, on every scorer returning scores; ordinary scores are not."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(8, 3).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.1)]
    x, y = torch.randn(10, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    tiny = (3e-23 * x, y)  # the loss's gradient in the weight: entries of 1e-23; the bias's: ordinary
    only_weight = dict(loss_fn=CE, params=["weight"])
    lost = r"The largest score is \d\.\d\de-4\d, below float32's least normal number .*Pass `dtype=torch.float64`"
    with pytest.warns(UserWarning, match=lost):
        tc.influence(model, ckpts, tiny, tiny, **only_weight)
    with pytest.warns(UserWarning, match=lost):
        tc.self_influence(model, ckpts, tiny, **only_weight)
    with pytest.warns(UserWarning, match=lost):
        tc.top_k(model, ckpts, tiny, tiny, k=3, **only_weight)
    wide = tc.self_influence(model, ckpts, tiny, dtype=torch.float64, **only_weight)
    assert 0 < float(wide.max()) < _SUBNORMAL  # float64 holds them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tc.influence(model, ckpts, tiny, tiny, loss_fn=CE)  # the bias's gradient is ordinary: so are the scores
        tc.self_influence(model, ckpts, tiny, dtype=torch.float64, **only_weight)
