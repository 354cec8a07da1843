"""Renormalised scores (``normalize="cosine"`` / ``"train"``) against float64 per-example gradients.

The reference is built from :func:`tests.reference.reference_grads` by the definitions:
``cosine = sum_c lr_c <g_test, g_train> / (|g_test| |g_train|)`` and ``train = sum_c lr_c <g_test, g_train> /
|g_train|``, a zero norm giving 0.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tracin_func as tc
from tests.conftest import assert_close, assert_topk
from tests.models import N_TEST, N_TRAIN, cnn_task, mlp_task, transformer_task
from tests.reference import reference_grads
from tracin_func._representations import Factored, TokenRows

TASKS = {"mlp": mlp_task, "cnn": cnn_task, "transformer": transformer_task}
MODES = ("cosine", "train")


def _inverse_norm(g: torch.Tensor) -> torch.Tensor:
    norm = g.norm(dim=1)
    return torch.where(norm > 0, 1 / norm, torch.zeros_like(norm))


def normalized_reference(model, checkpoints, train, test, loss_fn, normalize, params=None) -> torch.Tensor:
    """``[n_test, n_train]`` float64 renormalised TracIn from one ``autograd.grad`` per example and checkpoint."""
    total = 0
    for ckpt in checkpoints:
        g_train = reference_grads(model, ckpt, train, loss_fn, params)
        g_test = reference_grads(model, ckpt, test, loss_fn, params)
        scores = (g_test @ g_train.T) * _inverse_norm(g_train)[None, :]
        if normalize == "cosine":
            scores = scores * _inverse_norm(g_test)[:, None]
        total = total + float(ckpt.lr) * scores
    return total


@functools.cache
def _task_and_reference(name: str, normalize: str):
    t = TASKS[name]()
    return t, normalized_reference(t.model, t.checkpoints, t.train, t.test, t.loss_fn, normalize)


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("factored", [None, True, False])
@pytest.mark.parametrize("name", sorted(TASKS))
def test_influence_matches_the_reference(name, factored, normalize):
    t, ref = _task_and_reference(name, normalize)
    # batch_size 3: several test batches (norms concatenated) and training batches
    scores = tc.influence(
        t.model,
        t.checkpoints,
        t.train,
        t.test,
        loss_fn=t.loss_fn,
        factored=factored,
        normalize=normalize,
        batch_size=3,
    )
    assert scores.shape == (N_TEST, N_TRAIN)
    assert_close(scores, ref)
    if normalize == "cosine":
        assert bool((scores.abs() <= sum(float(c.lr) for c in t.checkpoints) * (1 + 1e-12)).all())


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_norms_come_from_the_factors(monkeypatch, name, normalize):
    """On the factored path the norms are the factored representations' own ``sq_norm`` (no per-sample gradient)."""
    calls = []
    for cls in (Factored, TokenRows):
        original = cls.sq_norm

        def counted(self, _original=original, _cls=cls):
            calls.append(_cls.__name__)
            return _original(self)

        monkeypatch.setattr(cls, "sq_norm", counted)
    t, ref = _task_and_reference(name, normalize)
    kw = {"loss_fn": t.loss_fn, "factored": True, "normalize": normalize}
    assert_close(tc.influence(t.model, t.checkpoints, t.train, t.test, **kw), ref)
    assert "Factored" in calls


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_aggregate_is_the_sum_over_test_examples(name, normalize):
    """``aggregate=True`` sums the per-test-example normalised scores (a sum of cosines for "cosine")."""
    t, ref = _task_and_reference(name, normalize)
    for factored in (None, False):
        total = tc.influence(
            t.model,
            t.checkpoints,
            t.train,
            t.test,
            loss_fn=t.loss_fn,
            aggregate=True,
            normalize=normalize,
            factored=factored,
            batch_size=3,
        )
        assert_close(total, ref.sum(0, keepdim=True))


@pytest.mark.parametrize("proponents", [True, False])
@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_top_k_is_the_top_k_of_the_normalised_matrix(name, normalize, proponents):
    t, ref = _task_and_reference(name, normalize)
    kw = {"loss_fn": t.loss_fn, "normalize": normalize, "batch_size": 4}
    top = tc.top_k(t.model, t.checkpoints, t.train, t.test, k=4, proponents=proponents, **kw)
    assert_topk(top, ref, 4, largest=proponents)
    matrix = tc.influence(t.model, t.checkpoints, t.train, t.test, **kw)
    assert_topk(top, matrix, 4, largest=proponents, rtol=1e-12)
    agg = tc.top_k(t.model, t.checkpoints, t.train, t.test, k=3, proponents=proponents, aggregate=True, **kw)
    assert_topk(agg, ref.sum(0, keepdim=True), 3, largest=proponents)


def test_raw_scores_are_unchanged_by_default():
    t = mlp_task()
    kw = {"loss_fn": t.loss_fn}
    assert_close(
        tc.influence(t.model, t.checkpoints, t.train, t.test, normalize=None, **kw),
        tc.influence(t.model, t.checkpoints, t.train, t.test, **kw),
        0,
    )


def test_last_layer_norms_are_those_of_the_last_layer():
    t = cnn_task()
    ref = normalized_reference(
        t.model, t.checkpoints, t.train, t.test, t.loss_fn, "cosine", params=["fc.weight", "fc.bias"]
    )
    scores = tc.influence(
        t.model, t.checkpoints, t.train, t.test, loss_fn=t.loss_fn, method="last_layer", normalize="cosine"
    )
    assert_close(scores, ref)


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("factored", [None, True, False])
def test_a_zero_gradient_scores_zero_not_nan(factored, normalize):
    """Example 0 has an exactly zero gradient (zero input, zero bias, target equal to the output): its cosine with
    anything is defined as 0."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2).double().eval()
    ckpts = [
        tc.Checkpoint(
            params={
                "weight": torch.randn(2, 3, generator=gen, dtype=torch.float64),
                "bias": torch.zeros(2, dtype=torch.float64),
            },
            lr=lr,
        )
        for lr in (0.5, 2.0)
    ]
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    x[0], y[0] = 0.0, 0.0
    loss = nn.MSELoss(reduction="sum")
    scores = tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=loss, normalize=normalize, factored=factored)
    assert bool(torch.isfinite(scores).all())
    assert bool((scores[:, 0] == 0).all())
    if normalize == "cosine":
        assert bool((scores[0] == 0).all())
        assert_close(scores.diagonal()[1:], torch.full((2,), 2.5, dtype=torch.float64))  # cos(g, g) = 1
    assert_close(scores, normalized_reference(model, ckpts, (x, y), (x[:3], y[:3]), loss, normalize))



class _BagOfWords(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(1000, 8), nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


class _Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, a, b):
        return self.head(self.enc(a) - self.enc(b))


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("factored", [None, True, False])
def test_a_gradient_of_zero_from_nonzero_factors_scores_zero(factored, normalize):
    """Example 1's gradient is exactly 0 with nonzero factors: an Embedding's test rows of a loss weighted 0 (kept as
    token rows, each example read as nonzero), an encoder's two uses cancelling (a Siamese pair of one input). Refused
    as "too small for its squared norm", in float64 too, advising a scaled loss (review helpers' trials): 0."""
    torch.manual_seed(0)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), reduction="sum")
    ids, y = torch.randint(0, 1000, (6, 5)), torch.tensor([0, 1, 2, 0, 2, 2])
    bag = _BagOfWords().double().eval()
    a = torch.randn(6, 4, dtype=torch.float64)
    b = torch.randn(6, 4, dtype=torch.float64)
    b[1] = a[1]
    siamese = _Siamese().double().eval()
    for model, train, loss, opts in [
        (bag, (ids, y), weighted, {}),
        (siamese, (a, b, y), nn.CrossEntropyLoss(), {"layers": ["enc"]}),
    ]:
        ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.5)]
        test = tuple(t[:3] for t in train)
        scores = tc.influence(model, ckpts, train, test, loss_fn=loss, normalize=normalize, factored=factored, **opts)
        assert bool((scores[:, 1] == 0).all()) and (normalize == "train" or bool((scores[1] == 0).all()))
        params = [n for n in dict(model.named_parameters()) if not opts or n.startswith("enc.")]
        want = normalized_reference(model, ckpts, train, test, loss, normalize, params)
        assert_close(scores, want)

def _sure(margin: float, second: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """An example the identity-like model below predicts class 0 for, its logit ``margin`` above the others."""
    return torch.tensor([[margin, 0.0, 0.0, second]]), torch.tensor([0])


@pytest.mark.parametrize("normalize", MODES)
def test_gradients_too_small_for_float32_norms_are_refused(normalize):
    """A sure prediction's gradient (entries 1e-21, a logit 50 above the others) has a squared norm below float32's
    range: its renormalised scores came out 0.8% off, or 0 with a warning that no example has a gradient, silently,
    and two sure examples' cosine was refused as not finite (a review helper's trial). Refused naming float64; a
    margin of 40 (entries 1e-16) is scored as in float64, and an exactly zero gradient still scores 0."""
    model = nn.Linear(4, 3, bias=False).eval()
    ckpts = [tc.Checkpoint({"weight": torch.eye(3, 4)}, lr=1.0)]
    test, ce = (torch.tensor([[1.0, 2.0, 0.5, 0.3]]), torch.tensor([2])), nn.CrossEntropyLoss()
    score = functools.partial(tc.influence, model, ckpts, loss_fn=ce, normalize=normalize)
    assert_close(score(_sure(40.0), test).double(), score(_sure(40.0), test, dtype=torch.float64), 1e-6)
    small = r"`normalize`: {} has a gradient too small for its squared norm to be taken in float32 .*=torch.float64"
    for margin in (50.0, 53.0):  # (0.8% off; scored 0)
        with pytest.raises(ValueError, match=small.format(r"a `train` example \(0 in a batch\)")):
            score(_sure(margin), test)
    assert bool((score((torch.zeros(1, 4), torch.tensor([0])), test) == 0).all())  # (a zero input: no gradient)
    if normalize == "cosine":
        with pytest.raises(ValueError, match=small.format("`test` example 0")):
            score(_sure(50.0), _sure(50.0, 2.0))
        with pytest.raises(ValueError, match=r"gradients are both so small \(their norms multiply below 2\^-100"):
            score(_sure(42.0), _sure(42.0, 2.0))


@pytest.mark.parametrize("normalize", MODES)
def test_gradients_too_small_for_float64_norms_are_refused_naming_a_scaled_loss(normalize):
    """In float64 a gradient of entries 1e-160 scored 5.7e-5 off, and 1e-170 every cosine 0 with a warning that no
    example has a gradient (a review helper's trial): refused naming a scaled loss, whose cosines are the same (and
    `"train"` scores scaled alike)."""
    t = mlp_task()
    ce = nn.CrossEntropyLoss()

    def scaled(factor):
        return lambda out, y: factor * ce(out, y)

    score = functools.partial(tc.influence, t.model, t.checkpoints, t.train, t.test, normalize=normalize)
    want = score(loss_fn=ce)
    assert_close(score(loss_fn=scaled(1e-100)), want * (1e-100 if normalize == "train" else 1.0), 1e-12)
    small = r"too small for its squared norm to be taken in float64 \(entries of 1e-154 and less.*Multiply the loss"
    with pytest.raises(ValueError, match=small):
        score(loss_fn=scaled(1e-170))
    if normalize == "cosine":
        with pytest.raises(ValueError, match=r"multiply below 2\^-996.*Multiply the loss by a constant"):
            score(loss_fn=scaled(1e-152))


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("normalize, size, lr", [("cosine", 1e18, 1e-10), ("train", 1e12, 1e-33)])
def test_large_gradients_and_a_small_lr_keep_their_digits(normalize, size, lr, per_layer):
    """``lr / (|g_test| |g_train|)`` (``lr / |g_train|``) was formed first: below float32's normal range where ``lr``
    times the score is not (found by review: inputs of 1e18 and lr 1e-10 scored every cosine 0, warned as underflowing
    gradients; 1e12 and 1e-33, 36 of 40 "train" scores 0); the norms' inverses now come first, then ``lr``."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(8, 2, bias=False)
    ckpts = [tc.Checkpoint({"weight": torch.randn(2, 8, generator=g)}, lr=lr)]
    train = (size * torch.randn(10, 8, generator=g), torch.randint(0, 2, (10,), generator=g))
    test = (size * torch.randn(4, 8, generator=g), torch.randint(0, 2, (4,), generator=g))
    ce = nn.CrossEntropyLoss()
    wide = [tc.Checkpoint({"weight": ckpts[0].params["weight"].double()}, lr=lr)]
    wider = lambda batch: (batch[0].double(), batch[1])  # noqa: E731
    ref = normalized_reference(model.double(), wide, wider(train), wider(test), ce, normalize)
    got = tc.influence(model.float(), ckpts, train, test, loss_fn=ce, normalize=normalize, per_layer=per_layer)
    assert_close(sum(got.values()) if per_layer else got, ref.float(), 1e-5)


@pytest.mark.parametrize("normalize", MODES)
def test_self_influence_refuses_normalize_and_says_why(normalize):
    t = mlp_task()
    with pytest.raises(ValueError, match="`normalize`=") as err:
        tc.self_influence(t.model, t.checkpoints, t.train, loss_fn=t.loss_fn, normalize=normalize)
    message = str(err.value)
    assert repr(normalize) in message
    assert "sum_c lr_c for every example" in message and "ranks" in message  # the cosine self-influence is constant
    assert "tc.influence" in message and "tc.top_k" in message
    # None is the default TracIn self-influence
    plain = tc.self_influence(t.model, t.checkpoints, t.train, loss_fn=t.loss_fn)
    assert_close(tc.self_influence(t.model, t.checkpoints, t.train, loss_fn=t.loss_fn, normalize=None), plain, 0)


@pytest.mark.parametrize(
    ("value", "error"),
    [("cos", ValueError), ("Cosine", ValueError), ("", ValueError), (1, TypeError), (True, TypeError)],
)
@pytest.mark.parametrize("scorer", ["influence", "top_k", "self_influence"])
def test_bad_values_name_the_argument_the_value_and_the_choices(scorer, value, error):
    t = mlp_task()
    kw = {"loss_fn": t.loss_fn, "normalize": value}
    call = {
        "influence": lambda: tc.influence(t.model, t.checkpoints, t.train, t.test, **kw),
        "top_k": lambda: tc.top_k(t.model, t.checkpoints, t.train, t.test, k=2, **kw),
        "self_influence": lambda: tc.self_influence(t.model, t.checkpoints, t.train, **kw),
    }[scorer]
    with pytest.raises(error) as err:
        call()
    message = str(err.value)
    assert message.startswith(f"`normalize`={value!r} is not allowed")
    for allowed in ("None", "'cosine'", "'train'"):
        assert allowed in message


def test_embeddings_take_no_normalize():
    t = mlp_task()
    with pytest.raises(TypeError, match="normalize"):
        tc.embeddings(t.model, t.checkpoints, t.train, loss_fn=t.loss_fn, normalize="cosine")


@pytest.mark.slow
def test_compiled_update_gives_the_same_normalised_scores():
    torch._dynamo.reset()
    try:
        t, ref = _task_and_reference("mlp", "cosine")
        kw = {"loss_fn": t.loss_fn, "batch_size": N_TRAIN, "normalize": "cosine"}
        assert_close(tc.influence(t.model, t.checkpoints, t.train, t.test, compile=True, **kw), ref)
    finally:
        torch._dynamo.reset()
