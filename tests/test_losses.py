"""Per-example loss semantics on the batched factored path equal the batch-of-one definition (dense vmap path)."""

import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tracin_func as tc
from tests.conftest import assert_close
from tests.reference import reference_scores

N_CLASSES = 4


def _mlp_task(out_features, target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, out_features)).double().eval()
    ckpts = [
        tc.Checkpoint({k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}, lr=lr)
        for lr in (0.2, 1.3)
    ]
    x = torch.randn(12, 5, dtype=torch.float64)
    return model, ckpts, (x, target)


def _soft_targets():
    return torch.softmax(torch.randn(12, N_CLASSES, dtype=torch.float64), dim=1)


CASES = {
    "ce_mean": (nn.CrossEntropyLoss(), lambda: torch.randint(0, N_CLASSES, (12,))),
    "ce_weight_sum": (  # (with reduction="mean" the weights would cancel on one example: refused, test_trust 7n)
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64), reduction="sum"),
        lambda: torch.randint(0, N_CLASSES, (12,)),
    ),
    "ce_ignore_index": (nn.CrossEntropyLoss(ignore_index=2), lambda: torch.arange(12) % N_CLASSES),
    "ce_label_smoothing": (nn.CrossEntropyLoss(label_smoothing=0.1), lambda: torch.randint(0, N_CLASSES, (12,))),
    "ce_soft_targets": (nn.CrossEntropyLoss(), _soft_targets),
    "nll_sum": (
        lambda out, y: nn.functional.nll_loss(out.log_softmax(1), y, reduction="sum"),
        lambda: torch.randint(0, N_CLASSES, (12,)),
    ),
    "mse_mean": (nn.MSELoss(), lambda: torch.randn(12, N_CLASSES, dtype=torch.float64)),
    "mse_none": (nn.MSELoss(reduction="none"), lambda: torch.randn(12, N_CLASSES, dtype=torch.float64)),
    "l1_sum": (nn.L1Loss(reduction="sum"), lambda: torch.randn(12, N_CLASSES, dtype=torch.float64)),
    "bce_logits_mean": (
        nn.BCEWithLogitsLoss(pos_weight=torch.full((N_CLASSES,), 2.0, dtype=torch.float64)),
        lambda: torch.randint(0, 2, (12, N_CLASSES)).double(),
    ),
    "kl_mean": (
        lambda out, y: nn.functional.kl_div(out.log_softmax(1), y, reduction="mean"),
        _soft_targets,
    ),
    "huber_mean": (nn.HuberLoss(delta=0.5), lambda: torch.randn(12, N_CLASSES, dtype=torch.float64)),
}


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")
@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_loss_matches_batch_of_one(case):
    criterion, target = CASES[case]
    model, ckpts, batch = _mlp_task(N_CLASSES, target())
    kw = dict(loss_fn=criterion, batch_size=5)
    dense = tc.influence(model, ckpts, batch, batch, factored=False, **kw)
    batched = tc.influence(model, ckpts, batch, batch, factored=True, **kw)
    assert torch.isfinite(dense).all()
    assert_close(batched, dense, 1e-10)
    self_dense = tc.self_influence(model, ckpts, batch, factored=False, **kw)
    self_batched = tc.self_influence(model, ckpts, batch, factored=True, **kw)
    assert_close(self_batched, self_dense, 1e-10)


class TokenTagger(nn.Module):
    """Per-token logits ``[B, C, T]`` (the class dim second, as ``CrossEntropyLoss`` takes them)."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 6), nn.Linear(6, N_CLASSES)

    def forward(self, ids):
        return self.head(self.emb(ids).tanh()).transpose(1, 2)


TOKEN_CASES = {  # token-level targets: torch's mean divides by the example's weights of the counted tokens
    "weighted": nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)),
    "ignored": nn.CrossEntropyLoss(ignore_index=3),
    "weighted_ignored": nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)),
}


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_token_level_mean_is_torchs_mean_of_the_example(case):
    """Per example, ``reduction="mean"`` is torch's own mean on that example (a weighted mean over its counted
    tokens), as the reference takes it; checked against that formula written out, then the scores against the
    reference, batched and not."""
    criterion = TOKEN_CASES[case]
    torch.manual_seed(0)
    model = TokenTagger().double().eval()
    ckpts = [tc.Checkpoint({k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}, lr=0.7)]
    ids, tags = torch.randint(0, 7, (8, 5)), torch.randint(0, N_CLASSES, (8, 5))
    if case != "weighted":
        tags[:, 1] = criterion.ignore_index if case == "ignored" else -100  # every example has an ignored token
    logits, target = model(ids[:1]), tags[:1]
    kept = target[0] != criterion.ignore_index
    w = criterion.weight[target[0][kept]] if criterion.weight is not None else torch.ones(int(kept.sum()))
    nll = -logits[0].log_softmax(0).T[kept].gather(1, target[0][kept, None])[:, 0]
    assert torch.allclose(criterion(logits, target), (w * nll).sum() / w.sum())
    ref = reference_scores(model, ckpts, (ids, tags), (ids[:3], tags[:3]), loss_fn=criterion)
    for factored in (None, False):
        kw = dict(loss_fn=criterion, factored=factored)
        assert_close(tc.influence(model, ckpts, (ids, tags), (ids[:3], tags[:3]), **kw), ref.influence)
        assert_close(tc.self_influence(model, ckpts, (ids, tags), **kw), ref.self_influence)


class SqueezedRegressor(nn.Module):
    """A regression MLP ending in ``.squeeze()``: a batch of one gets a 0-dim output, with no batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))).squeeze()


def test_a_plain_function_criterion_on_squeezed_outputs_is_batched_and_exact():
    """A plain function as the criterion is mapped over a batch's examples, except on a batch of one (planning's
    examples alone, a single test example, ``batch_size=1``), whose squeezed output has no batch dimension to map
    over: there it takes the batch whole, as the reference does."""
    torch.manual_seed(0)
    model = SqueezedRegressor().double().eval()
    ckpts = [tc.Checkpoint({k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}, lr=0.7)]
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    squared = lambda output, target: (output - target) ** 2  # noqa: E731
    assert "one batched forward" in tc.explain(model, ckpts, (x, y), loss_fn=squared).batching
    for test in ((x[:3], y[:3]), (x[:1], y[:1])):
        ref = reference_scores(model, ckpts, (x, y), test, loss_fn=squared)
        assert_close(tc.influence(model, ckpts, (x, y), test, loss_fn=squared), ref.influence)
        assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=squared), ref.self_influence)
        assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=squared, batch_size=1), ref.self_influence)


def test_criterion_is_not_modified():
    criterion = nn.CrossEntropyLoss()
    model, ckpts, batch = _mlp_task(N_CLASSES, torch.randint(0, N_CLASSES, (12,)))
    tc.self_influence(model, ckpts, batch, loss_fn=criterion)
    assert criterion.reduction == "mean"


def _float32_task():
    """A float32 model and checkpoints, scored with ``dtype=torch.float64``; float inputs or token ids."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    bag = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3)).eval()
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    return [
        (m, [tc.Checkpoint({k: v + 0.3 * torch.randn_like(v) for k, v in m.state_dict().items()}, lr=0.7)], (x, y))
        for m, x in ((mlp, torch.randn(6, 5)), (bag, torch.randint(0, 10, (6, 2))))
    ]


@pytest.mark.parametrize("factored", [None, False])
def test_a_criterions_float32_class_weights_follow_the_calls_float64(factored):
    """``nn.CrossEntropyLoss(weight=float32)`` under ``dtype=torch.float64`` failed ("expected scalar type Double but
    found Float", blamed on example 0, or on token ids with `x.float()` as the fix); BCE's ``pos_weight`` too. The
    call runs a copy of the criterion with its tensors in float64, leaving the user's as it was."""
    weight, plain = torch.tensor([0.5, 2.0, 3.0]), nn.CrossEntropyLoss(reduction="sum")
    in_float64 = nn.CrossEntropyLoss(weight=weight.double(), reduction="sum")
    kw = dict(dtype=torch.float64, factored=factored)
    for model, ckpts, (x, y) in _float32_task():
        criterion = nn.CrossEntropyLoss(weight=weight, reduction="sum")
        buffers, train, test = criterion._buffers, (x, y), (x[:2], y[:2])
        ref = reference_scores(model, ckpts, train, test, loss_fn=in_float64)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=criterion, **kw), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=criterion, **kw), ref.self_influence)
        top = tc.top_k(model, ckpts, train, test, k=2, loss_fn=plain, test_loss_fn=criterion, **kw)
        mixed = reference_scores(model, ckpts, train, test, loss_fn=plain, test_loss_fn=in_float64).influence
        assert_close(top.scores, mixed.topk(2, dim=1).values)
        assert criterion._buffers is buffers and criterion.weight is weight and weight.dtype == torch.float32
        # float64 weights in a float32 call: converted to float32
        float32 = tc.self_influence(model, ckpts, train, loss_fn=in_float64, factored=factored)
        assert float32.dtype == torch.float32 and in_float64.weight.dtype == torch.float64
        assert_close(float32, ref.self_influence, 1e-5)
    model, ckpts, (x, _) = _float32_task()[0]
    labels, pos_weight = torch.rand(6, 3).round(), torch.tensor([1.0, 2.0, 3.0])
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="sum")
    want = reference_scores(
        model, ckpts, (x, labels), loss_fn=nn.BCEWithLogitsLoss(pos_weight=pos_weight.double(), reduction="sum")
    ).self_influence
    assert_close(tc.self_influence(model, ckpts, (x, labels), loss_fn=bce, **kw), want)
    assert bce.pos_weight is pos_weight and pos_weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- tc.BatchLoss


def _dict_task():
    model, ckpts, (x, y) = _mlp_task(N_CLASSES, torch.randint(0, N_CLASSES, (12,)))
    return model, ckpts, {"x": x, "label": y}


def _batch_loss(model, reduce=False):
    def losses(params, batch):
        out = nn.functional.cross_entropy(
            torch.func.functional_call(model, params, (batch["x"],)), batch["label"], reduction="none"
        )
        return out.mean() if reduce else out

    return losses


def test_batch_loss_runs_batched_and_equals_the_example_loss():
    model, ckpts, data = _dict_task()
    losses = _batch_loss(model)
    one = tc.ExampleLoss(lambda params, batch: losses(params, batch).sum())
    for factored in (None, False):
        kw = dict(batch_size=5, factored=factored)
        assert_close(tc.influence(model, ckpts, data, data, loss_fn=tc.BatchLoss(losses), **kw),
                     tc.influence(model, ckpts, data, data, loss_fn=one, **kw), 1e-10)  # fmt: skip
        assert_close(tc.self_influence(model, ckpts, data, loss_fn=tc.BatchLoss(losses), **kw),
                     tc.self_influence(model, ckpts, data, loss_fn=one, **kw), 1e-10)  # fmt: skip
    assert tc.explain(model, ckpts, data, loss_fn=tc.BatchLoss(losses)).batching.startswith("one batched forward")
    why = tc.explain(model, ckpts, data, loss_fn=one).batching
    assert "tc.BatchLoss runs whole batches" in why and "tc.seq2seq_lm_loss" in why  # and the ready-made HF losses


def test_every_score_zero_is_warned():
    """An in-batch contrastive loss (InfoNCE) has nothing to compare on the one example TracIn scores at a time: every
    score 0, silently (found by review). Warned, naming the cause; a call with scores is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    ckpts = [tc.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, 0.1)]
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.long)

    def info_nce(params, batch):
        z = nn.functional.normalize(torch.func.functional_call(model, params, (batch[0],)), dim=-1)
        return nn.functional.cross_entropy(z @ z.T / 0.5, torch.arange(len(z)), reduction="none")

    zero = "Every score is 0: no example's loss has a gradient in the parameters scored"
    for factored in (None, False):
        kw = dict(loss_fn=tc.BatchLoss(info_nce), factored=factored)
        with pytest.warns(UserWarning, match=zero):
            assert not tc.influence(model, ckpts, (x, y), (x, y), **kw).any()
        with pytest.warns(UserWarning, match=zero) as caught:
            assert not tc.self_influence(model, ckpts, (x, y), per_layer=True, **kw)["0"].any()
        # (in float64 it advised `dtype=torch.float64`, a review helper's trial)
        assert "dtype=torch.float64" not in str(next(w.message for w in caught if zero in str(w.message)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tc.self_influence(model, ckpts, (x, torch.arange(5) % 3), loss_fn=nn.CrossEntropyLoss())
    assert not [w for w in caught if zero in str(w.message)]


def test_batch_loss_must_return_one_loss_per_example():
    model, ckpts, data = _dict_task()
    with pytest.raises(ValueError, match=r"`loss_fn`: a tc.BatchLoss must return one loss per example, a tensor of "
                       r"shape \[1\] for a batch of 1, got \(\)"):  # fmt: skip
        tc.self_influence(model, ckpts, data, loss_fn=tc.BatchLoss(_batch_loss(model, reduce=True)))
    column = tc.BatchLoss(lambda p, b: _batch_loss(model)(p, b)[:, None])  # (told not to reduce over the batch)
    with pytest.raises(ValueError, match=r"shape \[1\] for a batch of 1, got \(1, 1\)\. Drop the trailing dimension"):
        tc.self_influence(model, ckpts, data, loss_fn=column)


class _Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, N_CLASSES)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True))  # batch statistics: examples interact


class _CenteredLoss(nn.Module):
    """A criterion mixing the examples of its batch (half their mean logit subtracted)."""

    reduction = "sum"

    def forward(self, out, y):
        return nn.functional.cross_entropy(out - 0.5 * out.mean(0, keepdim=True), y, reduction="sum")


def test_a_loss_mixing_examples_is_told_from_a_model_mixing_them():
    """Each example's loss is its own, computed alone, so a criterion mixing a batch's examples leaves the batched
    path, and the reason says where they meet: after the layer (found by review: blamed on the model's layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, N_CLASSES)).double().eval()
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.5)]
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.arange(6) % N_CLASSES
    after = "its output gradients, its inputs alike: examples interact after it, in a later layer .* or in the loss"
    with pytest.warns(tc.SlowPathWarning, match=after):
        got = tc.self_influence(model, ckpts, (x, y), loss_fn=_CenteredLoss())
    ref = reference_scores(model, ckpts, (x, y), (x, y), loss_fn=_CenteredLoss())
    assert_close(got, ref.self_influence)
    mixing = _InputCentered().double().eval()  # (its layer's inputs differ: the generic reason)
    why = tc.explain(mixing, [tc.Checkpoint(dict(mixing.state_dict()), 0.5)], (x, y), loss_fn=nn.CrossEntropyLoss())
    assert "examples interact, e.g. through batch statistics" in why.batching and "inputs alike" not in why.batching


class _InputCentered(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, N_CLASSES)

    def forward(self, x):
        return self.a(x - x.mean(0, keepdim=True))


def test_batch_loss_on_a_model_that_mixes_examples_is_not_batched():
    torch.manual_seed(0)
    model = _Centered().double().eval()
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.5)]
    _, _, data = _dict_task()
    loss = tc.BatchLoss(_batch_loss(model))
    assert "examples interact" in tc.explain(model, ckpts, data, loss_fn=loss).batching
    with pytest.warns(tc.SlowPathWarning, match="examples interact"):
        got = tc.self_influence(model, ckpts, data, loss_fn=loss)
    assert_close(got, tc.self_influence(model, ckpts, data, loss_fn=loss, factored=False), 1e-10)


def _causal_lm_reference(logits, labels, ignore=-100):
    """Hugging Face's ForCausalLMLoss for a batch of one: the mean next-token cross-entropy over kept labels."""
    logits, labels = logits[0, :-1], labels[0, 1:]
    keep = labels != ignore
    if not keep.any():
        return logits.sum() * 0
    return nn.functional.cross_entropy(logits[keep], labels[keep])


class _LM(nn.Module):
    def __init__(self, out=10):
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, out)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return {"logits": self.head(torch.tanh(h))}


@pytest.mark.filterwarnings("ignore:torch.func.vmap failed on this model")  # the reference's `if`
def test_causal_lm_loss_is_hugging_faces_per_example():
    torch.manual_seed(0)
    model = _LM().double().eval()
    ids = torch.randint(0, 10, (5, 6))
    labels = ids.masked_fill(torch.arange(6) >= torch.tensor([6, 4, 2, 1, 3])[:, None], -100)  # row 3: no label
    data = {"input_ids": ids, "attention_mask": torch.ones(5, 6), "labels": labels}
    state = dict(model.state_dict())
    got = tc.causal_lm_loss(model).fn(state, data)
    want = [_causal_lm_reference(model(ids[i : i + 1])["logits"], labels[i : i + 1]) for i in range(5)]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=0)
    assert got[3] == 0
    ckpts = [tc.Checkpoint(state, lr=0.5)]
    by_example = tc.ExampleLoss(lambda p, b: _causal_lm_reference(torch.func.functional_call(
        model, p, (b["input_ids"],))["logits"], b["labels"]))  # fmt: skip
    assert_close(tc.influence(model, ckpts, data, data, loss_fn=tc.causal_lm_loss(model)),
                 tc.influence(model, ckpts, data, data, loss_fn=by_example), 1e-10)  # fmt: skip


def test_causal_lm_loss_reading_a_padding_position_is_warned():
    """Left padding with only the pads set to -100: the last pad predicts the first real token, a score depending on
    the padding (found by review: 44-250% off the examples scored unpadded, as Hugging Face's loss computes it); right
    padding whose pads are kept as labels is told its own fix."""
    model = _LM().double().eval()
    ids = torch.randint(0, 10, (3, 6))
    mask = (torch.arange(6) >= torch.tensor([0, 2, 3])[:, None]).long()  # left padding
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.5)]
    read = "`causal_lm_loss`: a label is predicted from a padding position (`attention_mask` 0 there)"
    with pytest.warns(UserWarning, match=re.escape(read)):
        tc.self_influence(model, ckpts, {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0,
                          -100)}, loss_fn=tc.causal_lm_loss(model))  # fmt: skip
    first_real = mask.roll(-1, 1).bool() & ~mask.bool()  # (the position each last pad predicts)
    labels = ids.masked_fill((mask == 0) | first_real.roll(1, 1), -100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tc.self_influence(model, ckpts, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                          loss_fn=tc.causal_lm_loss(model))  # fmt: skip
    assert not [w for w in caught if read in str(w.message)]
    right = mask.flip(1)  # right padding, the pads kept as labels: the fix named is theirs (a helper's trial)
    with pytest.warns(UserWarning, match=re.escape(read) + r".*With right padding.*set the pads' labels to -100"):
        tc.self_influence(model, ckpts, {"input_ids": ids, "attention_mask": right, "labels": ids},
                          loss_fn=tc.causal_lm_loss(model))  # fmt: skip


@pytest.mark.parametrize("problem_type", ["single_label_classification", "regression", "multi_label_classification"])
def test_sequence_classification_loss_is_hugging_faces_per_example(problem_type):
    torch.manual_seed(0)
    n_out = 1 if problem_type == "regression" else 3
    model = _LM(n_out).double().eval()
    ids = torch.randint(0, 10, (4, 5))

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = model

        def forward(self, input_ids):
            return (self.lm(input_ids)["logits"].mean(1),)

    pooled = Pooled().eval()
    labels = {
        "single_label_classification": torch.tensor([0, 2, -100, 1]),
        "regression": torch.randn(4, dtype=torch.float64),
        "multi_label_classification": torch.randint(0, 2, (4, 3)).double(),
    }[problem_type]
    data = {"input_ids": ids, "labels": labels}
    state = dict(pooled.state_dict())
    got = tc.sequence_classification_loss(pooled, problem_type=problem_type).fn(state, data)
    want = []
    for i in range(4):  # transformers' BertForSequenceClassification loss on a batch of one
        logits, y = pooled(ids[i : i + 1])[0], labels[i : i + 1]
        if problem_type == "single_label_classification":
            want.append(nn.functional.cross_entropy(logits, y, reduction="sum"))  # -100: 0, HF: NaN
        elif problem_type == "regression":
            want.append(nn.functional.mse_loss(logits.squeeze(), y.squeeze()))
        else:
            want.append(nn.functional.binary_cross_entropy_with_logits(logits, y))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=0)
    # by default, Hugging Face's rule (no config here: one logit is a regression, integer labels a single label)
    torch.testing.assert_close(tc.sequence_classification_loss(pooled).fn(state, data), got, rtol=0, atol=0)


def test_sequence_classification_loss_takes_the_model_configs_problem_type():
    """A config's ``problem_type`` wins, except on a multiple-choice head (always cross-entropy, as in Hugging
    Face); without one, one logit is a regression even with integer labels (cross-entropy over one class would give
    every example a zero loss, and zero influence)."""
    torch.manual_seed(0)
    model = _LM(1).double().eval()

    class Rated(nn.Module):
        def __init__(self, problem_type):
            super().__init__()
            self.lm, self.config = model, SimpleNamespace(num_labels=1, problem_type=problem_type)

        def forward(self, input_ids):
            return (self.lm(input_ids)["logits"].mean(1),)

    data = {"input_ids": torch.randint(0, 10, (4, 5)), "labels": torch.tensor([1, 5, 3, 4])}  # star ratings
    rated = Rated(None).eval()
    state = dict(rated.state_dict())
    got = tc.sequence_classification_loss(rated).fn(state, data)
    logits = rated(data["input_ids"])[0][:, 0]
    torch.testing.assert_close(got, (logits - data["labels"].double()) ** 2, rtol=1e-12, atol=0)
    choices = _LM(3).double().eval()  # a multiple-choice head: one logit per choice, one label; its config is ignored
    chooser = Rated("regression").eval()
    chooser.lm = choices
    picks = data["labels"] % 3
    picked = tc.sequence_classification_loss(chooser).fn(dict(chooser.state_dict()), {**data, "labels": picks})
    want = nn.functional.cross_entropy(chooser(data["input_ids"])[0], picks, reduction="none")
    torch.testing.assert_close(picked, want, rtol=1e-12, atol=0)
    rated.config.problem_type = "multi_label_classification"
    labels = torch.randint(0, 2, (4, 1)).double()
    torch.testing.assert_close(tc.sequence_classification_loss(rated).fn(state, {**data, "labels": labels}),
                               tc.sequence_classification_loss(rated, problem_type="multi_label_classification").fn(
                                   state, {**data, "labels": labels}), rtol=0, atol=0)  # fmt: skip


class _Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 10)

    def forward(self, input_ids, decoder_input_ids):
        h = self.emb(input_ids).mean(1, keepdim=True) + self.emb(decoder_input_ids)
        return {"logits": self.head(torch.tanh(h))}


class _Seq2SeqWithShift(_Seq2Seq):
    def prepare_decoder_input_ids_from_labels(self, labels):  # Hugging Face's: shifted right behind a start token
        return torch.cat([torch.full_like(labels[:, :1], 7), labels[:, :-1]], 1).masked_fill(labels == -100, 0)


def test_seq2seq_lm_loss_is_hugging_faces_per_example():
    """The mean cross-entropy over each example's labels (no shift), with the decoder's inputs made from the labels
    as the model makes them, or taken from the batch; a model that cannot make them is named."""
    torch.manual_seed(0)
    model = _Seq2SeqWithShift().double().eval()
    labels = torch.randint(0, 10, (4, 5)).masked_fill(torch.arange(5) >= torch.tensor([5, 3, 0, 1])[:, None], -100)
    data = {"input_ids": torch.randint(0, 10, (4, 6)), "labels": labels}
    state = dict(model.state_dict())
    got = tc.seq2seq_lm_loss(model).fn(state, data)
    want = []
    for i in range(4):
        decoder = model.prepare_decoder_input_ids_from_labels(labels[i : i + 1])
        logits, keep = model(data["input_ids"][i : i + 1], decoder)["logits"][0], labels[i] != -100
        want.append(nn.functional.cross_entropy(logits[keep], labels[i][keep]) if keep.any() else 0 * got[0])
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=0)
    assert got[2] == 0
    given = {**data, "decoder_input_ids": torch.zeros_like(labels)}
    own = model(data["input_ids"], given["decoder_input_ids"])["logits"]
    assert_close(tc.seq2seq_lm_loss(model).fn(state, given)[:2], torch.stack(
        [nn.functional.cross_entropy(own[i][labels[i] != -100], labels[i][labels[i] != -100]) for i in range(2)]))
    plain = _Seq2Seq().eval()
    ckpts = [tc.Checkpoint(dict(plain.state_dict()), lr=1.0)]
    with pytest.raises(TypeError, match=r"`prepare_decoder_input_ids_from_labels`.*which _Seq2Seq lacks; put "
                       r"`decoder_input_ids` in the batches"):  # fmt: skip
        tc.self_influence(plain, ckpts, data, loss_fn=tc.seq2seq_lm_loss(plain))
    # labels not [B, T] failed in the model's own making of the decoder's inputs, raw (a review helper's: T5, BART)
    shifts = [tc.Checkpoint(dict(model.state_dict()), lr=1.0)]
    with pytest.raises(ValueError, match=r"tc.seq2seq_lm_loss takes the labels under 'labels' as \[batch, "
                                         r"positions\].*got \(1,\)"):  # fmt: skip
        tc.self_influence(model, shifts, {**data, "labels": labels[:, 0]}, loss_fn=tc.seq2seq_lm_loss(model))


def test_hugging_face_losses_name_the_labels_key():
    model = _LM().eval()
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.5)]
    data = {"input_ids": torch.randint(0, 10, (3, 4)), "target": torch.randint(0, 10, (3, 4))}
    with pytest.raises(TypeError, match=r"tc.causal_lm_loss takes dict batches holding the labels under 'labels'.*"
                       r"pass `labels=`"):  # fmt: skip
        tc.self_influence(model, ckpts, data, loss_fn=tc.causal_lm_loss(model))
    assert tc.self_influence(model, ckpts, data, loss_fn=tc.causal_lm_loss(model, labels="target")).shape == (3,)
    with pytest.raises(ValueError, match="`problem_type` must be None \\(the model's\\) or one of"):
        tc.sequence_classification_loss(model, problem_type="ranking")


def test_hugging_face_losses_name_labels_of_another_shape_or_dtype():
    """Labels the logits cannot take are refused with their key, the shape asked and the shape given (torch's own
    messages blamed a batch size or an index); a batch that is not a dict is told to be one, and one of examples
    without their batch dimension to be batched."""
    model, ids = _LM().eval(), torch.randint(0, 10, (3, 4))
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.5)]
    token = r"under 'labels' shaped as the logits less their last dimension, one per position \(\(1, 4\) here\), got "
    cases = [
        (tc.causal_lm_loss, ids[:, 0], token + r"\(1,\)"),
        (tc.causal_lm_loss, torch.randint(0, 10, (3, 5)), token + r"\(1, 5\)"),
        (tc.causal_lm_loss, ids.float(), r"tc.causal_lm_loss takes the labels under 'labels' as integer ids, got "
                                         r"torch.float32"),
        (tc.token_classification_loss, ids[:, 0], token + r"\(1,\)"),
        # a token classifier's logits [B, T, C] with a label per example: scored over T C flattened "classes" (a
        # review helper's trial), or with labels per position: refused naming the token loss
        (tc.sequence_classification_loss, ids[:, 0], r"logits of shape \(1, 4, 10\), not \[B, C\].+token_class"),
        (tc.sequence_classification_loss, ids, r"logits of shape \(1, 4, 10\), not \[B, C\]"),
    ]  # fmt: skip
    for make, labels, match in cases:
        with pytest.raises(ValueError, match=match):
            tc.self_influence(model, ckpts, {"input_ids": ids, "labels": labels}, loss_fn=make(model))
    pooled = tc.sequence_classification_loss(model, problem_type="multi_label_classification")
    with pytest.raises(ValueError, match=r"shaped as the logits for 'multi_label_classification' \(\(3, 4, 10\) "
                                         r"here\), got \(3, 4, 9\)"):  # fmt: skip
        pooled.fn(dict(model.state_dict()), {"input_ids": ids, "labels": torch.ones(3, 4, 9)})
    with pytest.raises(TypeError, match=r"got a tuple; give the data as dicts, or write a `tc.BatchLoss`"):
        tc.self_influence(model, ckpts, (ids, ids), loss_fn=tc.causal_lm_loss(model))
    # a list of a Dataset's items, each one example without its batch dimension: T examples of one token each, which
    # the model's own code failed on (GPT-2: "too many indices for tensor of dimension 2"; a helper's trial)
    items = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    for make in (tc.causal_lm_loss, tc.token_classification_loss):
        with pytest.raises(ValueError, match=r"takes the labels under 'labels' as \[batch, positions\], and this "
                                             r"batch holds no tensor of two dimensions \(its labels: \(1,\)\).*a "
                                             r"Dataset's item"):  # fmt: skip
            tc.self_influence(model, ckpts, items, loss_fn=make(model))


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, input_ids, decoder_input_ids=None):
        return {"logits": self.head(self.embed(input_ids).mean(1))}


def test_per_token_losses_refuse_a_sequence_classifier():
    """A sequence classifier's logits [B, C] and labels [B] passed the labels' shape check (the logits less their
    last dimension), then torch raised an IndexError (a review helper's trial)."""
    model = _Classifier().eval()
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.5)]
    ids = torch.randint(0, 10, (3, 4))
    data = {"input_ids": ids, "decoder_input_ids": ids, "labels": torch.randint(0, 3, (3,))}
    for make in (tc.causal_lm_loss, tc.token_classification_loss, tc.seq2seq_lm_loss):
        with pytest.raises(ValueError, match=rf"tc.{make.__name__} scores logits per position, \[batch, positions, "
                                             r"classes\], and the model returns \(1, 3\): a sequence classifier's "
                                             r"are scored by `tc.sequence_classification_loss`"):  # fmt: skip
            tc.self_influence(model, ckpts, data, loss_fn=make(model))


class _CachingLM(_LM):
    """A forward taking ``use_cache`` (transformers'), recording what each call got."""

    def __init__(self):
        super().__init__()
        self.got = []

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        self.got.append(use_cache)
        return super().forward(input_ids, attention_mask)


def test_hugging_face_losses_build_no_cache():
    """``use_cache=False`` goes to a forward that takes it (a score never reads a key / value cache), not to one that
    does not (``_LM``'s would fail on it)."""
    ids = torch.randint(0, 10, (3, 1))
    cases = [(tc.causal_lm_loss, torch.randint(0, 10, (3, 1))), (tc.token_classification_loss, ids),
             (tc.sequence_classification_loss, torch.tensor([1, 0, 2]))]  # fmt: skip
    for make, labels in cases:
        data = {"input_ids": ids, "labels": labels}
        model, plain = _CachingLM().eval(), _LM().eval()
        make(model).fn(dict(model.state_dict()), data)
        assert model.got == [False], make
        assert make(plain).fn(dict(plain.state_dict()), data).shape == (3,)


class _Penalised(nn.Module):
    """A classifier and a learned temperature its training loss reads, plus a penalty on its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.log_t = nn.Linear(5, 3), nn.Parameter(torch.zeros(()))
        self.label_smoothing = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def penalised(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y) + 0.5 * self.fc.weight.square().sum()

    def smoothed(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y, label_smoothing=self.label_smoothing)


def test_a_criterion_reading_the_models_parameters_is_refused():
    """A criterion reading a parameter of the model (a learned temperature through a closure, a weight penalty in a
    bound method) got the user's tensor, not the checkpoint's: that term had no gradient and the checkpoint's value
    was never used (5-48% off, silently). Refused, naming the parameter (also where the call's dtype= copies the
    criterion); one reading the model's settings, a parameter's device, dtype or shape, or a frozen parameter,
    scores."""
    torch.manual_seed(0)
    model = _Penalised().double().eval()
    ckpts = [tc.Checkpoint({k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}, 0.1)]
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    tempered = lambda out, y: nn.functional.cross_entropy(out * model.log_t.exp(), y)  # noqa: E731
    for criterion, read in ((tempered, "'log_t'"), (model.penalised, "'fc.weight'")):
        for factored in (None, False):
            with pytest.raises(ValueError, match=f"`loss_fn` computes with the model's parameter {read}"):
                tc.self_influence(model, ckpts, (x, y), loss_fn=criterion, factored=factored)
    with pytest.raises(ValueError, match="`test_loss_fn` computes with the model's parameter 'log_t'"):
        tc.influence(model, ckpts, (x, y), (x[:1], y[:1]), loss_fn=nn.CrossEntropyLoss(), test_loss_fn=tempered)
    got = tc.self_influence(model, ckpts, (x, y), loss_fn=model.smoothed)
    assert_close(got, reference_scores(model, ckpts, (x, y), loss_fn=model.smoothed).self_influence)
    # a parameter's device, dtype or shape read (`y.to(next(model.parameters()).device)`): no value, scored
    moved = lambda out, y: nn.functional.cross_entropy(  # noqa: E731
        out[:, : model.fc.weight.shape[0]].to(model.fc.weight.dtype), y.to(next(model.parameters()).device)
    )
    got = tc.self_influence(model, ckpts, (x, y), loss_fn=moved)
    assert_close(got, reference_scores(model, ckpts, (x, y), loss_fn=moved).self_influence)
    # held by a criterion module in another dtype than the call's: refused too (a copy in the call's dtype hid it)
    single = _Penalised().eval()
    with pytest.raises(ValueError, match="`loss_fn` computes with the model's parameter 'log_t'"):
        tc.self_influence(single, ckpts, (x, y), loss_fn=_Tempered(single.log_t), dtype=torch.float64)
    # a frozen parameter (class weights kept with the model, to move with it) is read as it is: scored
    model.class_weight = nn.Parameter(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), requires_grad=False)
    weighted = nn.CrossEntropyLoss(weight=model.class_weight, reduction="sum")
    ckpts = [tc.Checkpoint({**ckpts[0].params, "class_weight": model.class_weight.detach().clone()}, 0.1)]
    got = tc.self_influence(model, ckpts, (x, y), loss_fn=weighted)
    assert_close(got, reference_scores(model, ckpts, (x, y), loss_fn=weighted).self_influence)


def test_a_loss_reading_the_models_own_tensor_is_refused_where_a_checkpoint_differs():
    """A loss reading the model's own tensor scored every checkpoint with the model's value: a frozen one (not in
    `params=`, or outside the last layer) that checkpoints hold other values of, through a criterion's closure (53%
    off, silently); through `tc.ExampleLoss` / `tc.BatchLoss` beside `params`, frozen or differentiated (53-56%
    off); a loss calling the model itself instead of through `params`. Refused, naming the tensor and a checkpoint
    holding another value; one whose value every checkpoint holds is read as it is, and a checkpoint sharing the
    model's storage (`state_dict()` uncloned) is not mistaken for the model."""
    torch.manual_seed(0)
    model = _Penalised().double().eval()
    states = [{k: v + 0.1 * c for k, v in model.state_dict().items()} for c in range(3)]
    ckpts = [tc.Checkpoint({**state, "log_t": torch.tensor(0.5 * c).double()}, 0.1) for c, state in enumerate(states)]
    with torch.no_grad():
        model.log_t.copy_(ckpts[-1].params["log_t"])  # the model as training left it: the last checkpoint's
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2])
    run = lambda params, batch: torch.func.functional_call(model, params, (batch[0],))  # noqa: E731
    tempered = lambda out, y: nn.functional.cross_entropy(out * model.log_t.exp(), y)  # noqa: E731
    beside = tc.ExampleLoss(lambda p, b: nn.functional.cross_entropy(run(p, b) * model.log_t.exp(), b[1]))
    batched = tc.BatchLoss(
        lambda p, b: nn.functional.cross_entropy(run(p, b) * model.log_t.exp(), b[1], reduction="none")
    )
    direct = tc.ExampleLoss(lambda p, b: nn.functional.cross_entropy(model(b[0]) * p["log_t"].exp(), b[1]))
    head = ["fc.weight", "fc.bias"]
    frozen = "computes with the model's tensor 'log_t' itself .* whose value checkpoint 0 does not hold"
    for loss_fn, options in ((tempered, {"params": head}), (tempered, {"method": "last_layer"}),
                             (beside, {"params": head}), (batched, {"params": head})):  # fmt: skip
        with pytest.raises(ValueError, match=frozen):
            tc.self_influence(model, ckpts, (x, y), loss_fn=loss_fn, **options)
    for loss_fn in (beside, batched):  # differentiated: no gradient through the model's own
        with pytest.raises(ValueError, match="computes with the model's parameter 'log_t' itself .* no gradient"):
            tc.self_influence(model, ckpts, (x, y), loss_fn=loss_fn)
    with pytest.raises(ValueError, match=r"the model's parameter 'fc.weight' itself \(the model called as it is"):
        tc.self_influence(model, ckpts, (x, y), loss_fn=direct)
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 5, bias=False)).double()
    tied[3].weight = tied[0].weight  # read as `3.weight`: named as `params` holds it, `0.weight`
    held = [tc.Checkpoint({k: v + c for k, v in tied.state_dict().items() if k != "3.weight"}, 0.1) for c in (1, 2)]
    penalised = lambda out, y: nn.functional.cross_entropy(out, y) + tied[3].weight.square().sum()  # noqa: E731
    with pytest.raises(ValueError, match="computes with the model's tensor '0.weight' itself .* checkpoint 0"):
        tc.self_influence(tied, held, (y, y), loss_fn=penalised, params=["2.weight", "2.bias"])
    # with `method="last_layer"` the head is chosen after the check: its own weight read by the loss where one
    # checkpoint holds the model's values was scored (40% off)
    one = [tc.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, 0.1)]
    with pytest.raises(ValueError, match="computes with the model's parameter 'fc.weight' itself"):
        tc.self_influence(model, one, (x, y), loss_fn=model.penalised, method="last_layer")
    live = dict(model.named_parameters())  # a tracer's step: the checkpoint holds the model's own parameters
    with pytest.raises(ValueError, match="computes with the model's parameter 'log_t' itself"):
        tc.tracer(model, (x[:2], y[:2]), n_train=6, loss_fn=tempered, params=live)
    # every checkpoint holding the model's value: read as it is, scored
    same = [tc.Checkpoint({**c.params, "log_t": model.log_t.detach().clone()}, c.lr) for c in ckpts]
    exact = tc.ExampleLoss(lambda p, b: nn.functional.cross_entropy(run(p, b) * p["log_t"].exp(), b[1]))
    want = reference_scores(model, same, (x, y), loss_fn=exact, params=head).self_influence
    for loss_fn in (tempered, beside, batched):
        assert_close(tc.self_influence(model, same, (x, y), loss_fn=loss_fn, params=head), want)
    # the model's own state as the checkpoint (shared storage): its tensors read through `params`, scored
    shared = [tc.Checkpoint(model.state_dict(), 0.1)]
    want = reference_scores(model, shared, (x, y), loss_fn=exact).self_influence
    assert_close(tc.self_influence(model, shared, (x, y), loss_fn=exact), want)


def test_scores_of_a_loss_reading_a_tensor_that_needs_gradients_hold_no_graph():
    """A loss reading the model's own tensor (which needs gradients; every checkpoint holds its value) kept the scores
    of `vmap(grad)` in a graph of it, returned (`requires_grad=True`, found by review): the caller's tensor held by
    the scores, and a graph built in every call. Scores are plain tensors on every path."""
    torch.manual_seed(0)
    model = _Penalised().double().eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, 0.1)]
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2])
    tempered = lambda out, y: nn.functional.cross_entropy(out * model.log_t.exp(), y)  # noqa: E731
    head = {"params": ["fc.weight", "fc.bias"]}
    for options in ({}, {"factored": False}):
        scores = [
            tc.self_influence(model, ckpts, (x, y), loss_fn=tempered, **head, **options),
            tc.influence(model, ckpts, (x, y), (x, y), loss_fn=tempered, **head, **options),
            tc.embeddings(model, ckpts, (x, y), loss_fn=tempered, **head, **options),
            tc.top_k(model, ckpts, (x, y), (x, y), k=2, loss_fn=tempered, **head, **options).scores,
        ]
        assert [s.requires_grad for s in scores] == [False] * 4, options
    want = reference_scores(model, ckpts, (x, y), loss_fn=tempered, params=head["params"]).self_influence
    assert_close(scores[0], want)


def test_the_loss_check_tells_values_read_from_metadata_read():
    """What the loss check refuses and passes beyond a plain read: a tensor read for its dtype or device alone
    (`y.type_as(p)`, `y.to(p)` in a `tc.ExampleLoss`: refused when the check came to those losses) passes; an
    integer buffer's `.item()` is a value read (taken as a shape: 33% off); a NaN the model and every checkpoint
    hold alike passes; class weights of the model that `dtype=` converted with the criterion are still the model's
    (44% off); a forward computing with a parameter through a dict attribute `functional_call` does not swap, under
    a criterion (58% off), is refused naming `model`."""
    torch.manual_seed(0)
    model = _Penalised().double().eval()
    model.register_buffer("shift", torch.tensor(1))
    model.register_buffer("nan", torch.tensor([1.0, float("nan")], dtype=torch.float64))
    states = [{k: v + 0.1 * c if v.is_floating_point() else v for k, v in model.state_dict().items()} for c in (1, 2)]
    ckpts = [tc.Checkpoint({**state, "nan": model.nan.clone()}, 0.1) for state in states]
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2])
    run = lambda params, batch: torch.func.functional_call(model, params, (batch[0],))  # noqa: E731
    like = tc.ExampleLoss(
        lambda p, b: nn.functional.cross_entropy(run(p, b), b[1].to(next(model.parameters()).device))
        + 0 * b[0].type_as(model.fc.weight).sum() + model.nan[0] - 1
    )
    exact = tc.ExampleLoss(lambda p, b: nn.functional.cross_entropy(run(p, b), b[1]))
    want = reference_scores(model, ckpts, (x, y), loss_fn=exact).self_influence
    assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=like), want)
    shifted = lambda out, y: nn.functional.cross_entropy(out.roll(model.shift.item(), 1), y)  # noqa: E731
    shifts = [tc.Checkpoint({**c.params, "shift": torch.tensor(2)}, 0.1) for c in ckpts]
    with pytest.raises(ValueError, match="computes with the model's tensor 'shift' itself"):
        tc.self_influence(model, shifts, (x, y), loss_fn=shifted)
    single = _Penalised().eval()
    single.register_buffer("weights", torch.tensor([1.0, 2.0, 0.5]))
    held = [tc.Checkpoint({**single.state_dict(), "weights": torch.tensor([2.0, 1.0, 1.0])}, 0.1)]
    weighted = nn.CrossEntropyLoss(weight=single.weights, reduction="sum")
    for dtype in (None, torch.float64):
        with pytest.raises(ValueError, match="computes with the model's tensor 'weights' itself"):
            tc.self_influence(single, held, (x.float(), y), loss_fn=weighted, dtype=dtype)
    aliased = _Aliased().double().eval()
    ckpts = [tc.Checkpoint({k: v + 0.1 * c for k, v in aliased.state_dict().items()}, 0.1) for c in (1, 2)]
    with pytest.raises(ValueError, match="`model` computes with its own parameter 'fc.weight' in its forward pass"):
        tc.self_influence(aliased, ckpts, (x, y), loss_fn=nn.CrossEntropyLoss())


class _Aliased(nn.Module):
    """A forward reading its weight through a dict attribute, which `functional_call` does not swap."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.refs = {"w": self.fc.weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.refs["w"], self.fc.bias)


class _Tempered(nn.Module):
    """Cross-entropy of logits scaled by a learned temperature it holds (the model's parameter)."""

    def __init__(self, log_t: nn.Parameter) -> None:
        super().__init__()
        self.log_t = log_t

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out * self.log_t.exp(), y)


class _MarginLoss(nn.Module):
    """A margin head inside the criterion (pytorch-metric-learning's ArcFaceLoss style): class weights of its own."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, embedding, target):
        return nn.functional.cross_entropy(embedding @ self.W.T, target, reduction="sum")


def test_a_criterion_holding_parameters_that_need_gradients_is_warned_of():
    """Regression (review helpers' trials): a criterion holding parameters that need gradients was scored at their
    value now at every checkpoint, and never differentiated (52% off the training's run, silently): warned, naming
    them (refused, a distillation teacher run under no_grad was falsely); frozen, the model is scored at their value,
    unwarned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh()).double()
    criterion = _MarginLoss()
    ckpts = [tc.Checkpoint({k: v.detach() + 0.1 for k, v in model.state_dict().items()}, 0.1)]
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected = reference_scores(model, ckpts, (x, y), loss_fn=criterion).self_influence
    with pytest.warns(UserWarning, match=r"`loss_fn` holds parameters that need gradients \(\['W'\]\)"):
        assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=criterion), expected)
    criterion.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=criterion), expected)
