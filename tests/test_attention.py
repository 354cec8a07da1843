"""nn.MultiheadAttention run unrolled (``_attention``): the same outputs as the fused op under every mask form,
its in-projection and out_proj as factor sites, exact scores, and the fused op (dense route) where it is not
unrolled."""

import functools
import itertools
import warnings
import weakref
from collections.abc import Mapping

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import tracin_func as tc
import tracin_func._model
from tests.conftest import assert_close
from tests.reference import reference_scores
from tracin_func._attention import attention_forward

F64 = torch.float64
CE = nn.CrossEntropyLoss()


def _masks(n, heads, length):
    gen = torch.Generator().manual_seed(3)
    padding = torch.arange(length) >= torch.tensor([length, length - 2, 1])[:n, None]
    causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=F64)
    return {
        "none": (None, None, False),
        "causal float": (causal, None, False),
        "causal hint": (causal, None, True),
        "bool attn": (torch.rand(length, length, generator=gen) > 0.7, None, False),
        "3-d float attn": (torch.randn(n * heads, length, length, generator=gen, dtype=F64), None, False),
        "bool padding": (None, padding, False),
        "float padding": (None, torch.zeros(n, length, dtype=F64).masked_fill(padding, -1e4), False),
        "causal + padding": (causal, padding.to(F64).masked_fill(padding, float("-inf")), True),
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_unrolled_attention_equals_the_fused_op(batch_first, need_weights, average):
    torch.manual_seed(0)
    n, heads, length, embed = 3, 2, 5, 8
    module = nn.MultiheadAttention(embed, heads, batch_first=batch_first, dtype=F64).eval()
    x = torch.randn(n, length, embed, dtype=F64)
    x = x if batch_first else x.transpose(0, 1)
    for name, (attn_mask, padding, causal) in _masks(n, heads, length).items():
        kw = dict(key_padding_mask=padding, need_weights=need_weights, attn_mask=attn_mask,
                  average_attn_weights=average, is_causal=causal)  # fmt: skip
        fused = module(x, x, x, **kw)
        unrolled = attention_forward(module, {}, x, x, x, **kw)
        assert_close(unrolled[0], fused[0], 1e-12, msg=name)
        assert (unrolled[1] is None) == (fused[1] is None), name
        if fused[1] is not None:
            assert_close(unrolled[1], fused[1], 1e-12, msg=name)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("inputs", ["kv", "k,v", "q=k"])
def test_unrolled_cross_attention_equals_the_fused_op(batch_first, inputs):
    """Queries over another sequence (key and value one tensor, or two; or a query that is its own key), of another
    length, under masks over (query, key) and the key's padding, with and without the weights."""
    torch.manual_seed(0)
    n, heads, lq, lk, embed = 3, 2, 4, 6, 8
    module = nn.MultiheadAttention(embed, heads, batch_first=batch_first, dtype=F64).eval()
    q, m, m2 = (torch.randn(n, length, embed, dtype=F64) for length in (lq, lk, lk))
    q, m, m2 = (t if batch_first else t.transpose(0, 1) for t in (q, m, m2))
    q, k, v = {"kv": (q, m, m), "k,v": (q, m, m2), "q=k": (m, m, m2)}[inputs]
    padding = torch.arange(lk) >= torch.tensor([lk, 3, 1])[:, None]
    attn = torch.randn(q.shape[int(batch_first)], lk, dtype=F64)  # [query length, key length]
    seen = []
    hooks = {"in_proj": lambda weights, args, out: seen.append(args[0].shape)}
    for need_weights, masks in itertools.product((False, True), ((None, None), (attn, None), (attn, padding))):
        kw = dict(attn_mask=masks[0], key_padding_mask=masks[1], need_weights=need_weights)
        fused = module(q, k, v, **kw)
        unrolled = attention_forward(module, hooks, q, k, v, **kw)
        assert_close(unrolled[0], fused[0], 1e-12)
        if need_weights:
            assert_close(unrolled[1], fused[1], 1e-12)
    rows = {"kv": lq + lk, "k,v": lq + 2 * lk, "q=k": 2 * lk}[inputs]
    assert seen[0] == (n, rows, embed)  # one product over the rows of every distinct input


class Seq2Seq(nn.Module):
    """``nn.Transformer``'s encoder-decoder (cross-attention in every decoder layer), sequence-first as by default."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.transformer = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0)
        self.fc = nn.Linear(8, 3)

    def forward(self, src, tgt, src_padding):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=self.fc.weight.dtype)
        h = self.transformer(self.embedding(src).transpose(0, 1), self.embedding(tgt).transpose(0, 1),
                             tgt_mask=causal, src_key_padding_mask=src_padding, memory_key_padding_mask=src_padding)
        return self.fc(h.mean(0))  # fmt: skip


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_an_encoder_decoder_transformer_runs_batched_and_exact():
    torch.manual_seed(0)
    model = Seq2Seq().to(F64).eval()
    ckpts = _ckpts(model)

    def data(n, seed):
        gen = torch.Generator().manual_seed(seed)
        src, tgt = torch.randint(0, 20, (n, 6), generator=gen), torch.randint(0, 20, (n, 4), generator=gen)
        padding = torch.arange(6) >= torch.randint(2, 7, (n,), generator=gen)[:, None]
        return src, tgt, padding, torch.randint(0, 3, (n,), generator=gen)

    _batched_and_exact(model, ckpts, data(7, 0), data(3, 1), "transformer.decoder.layers.0.multihead_attn")


def _batched_and_exact(model, ckpts, train, test, attention):
    """The call is batched with ``attention`` unrolled, and its scores equal the reference (batches of 4 too)."""
    plan = tc.explain(model, ckpts, train, loss_fn=CE)
    assert plan.batching == "one batched forward / backward gives every layer's factors", plan.batching
    routes = {r.parameter: r for r in plan.routes}
    assert routes[f"{attention}.in_proj_weight"].reason.startswith("unrolled attention")
    assert {r.route for r in plan.routes} <= {"factored", "materialised"}
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, batch_size=4), ref.influence, 1e-12)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, batch_size=4), ref.self_influence, 1e-12)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, factored=True), ref.influence, 1e-12)


class Encoder(nn.Module):
    def __init__(self, batch_first=True, nested=False):
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=nested)
        self.fc = nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, tokens, padding):
        h = self.embedding(tokens)
        h = h if self.batch_first else h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=padding)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.fc(h.masked_fill(padding[..., None], 0).sum(1))


def _ckpts(model):
    gen = torch.Generator().manual_seed(1)
    return [
        tc.Checkpoint({k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in
                       model.state_dict().items()}, lr=lr)
        for lr in (0.3, 1.1)
    ]  # fmt: skip


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 20, (n, 6), generator=gen)
    padding = torch.arange(6) >= torch.randint(2, 7, (n,), generator=gen)[:, None]
    return tokens, padding, torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("batch_first,nested", [(True, False), (False, False), (True, True)])
def test_transformer_encoder_runs_batched_and_exact(batch_first, nested):
    torch.manual_seed(0)
    model = Encoder(batch_first, nested).to(F64).eval()
    _batched_and_exact(model, _ckpts(model), _data(7, 0), _data(3, 1), "encoder.layers.1.self_attn")  # [L, B, d] too


class Attend(nn.Module):
    """Attention over ``x`` itself, or over another sequence, ``context(x)``."""

    def __init__(self, attn, context=None):
        super().__init__()
        self.attn, self.fc, self.context = attn, nn.Linear(8, 3), context

    def forward(self, x):
        kv = x if self.context is None else self.context(x)
        return self.fc(self.attn(x, kv, kv, need_weights=False)[0].mean(1))


class Subclassed(nn.MultiheadAttention):
    pass


class HalvedLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) / 2


def _out_proj_hooked() -> nn.MultiheadAttention:
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    attn.out_proj.register_forward_hook(lambda layer, args, out: out * 2)  # the fused op never calls out_proj
    return attn


def _out_proj_halved() -> nn.MultiheadAttention:
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    attn.out_proj = HalvedLinear(8, 8)  # (a LoRA-style wrapper alike): the fused op reads its weight and bias alone
    return attn


_OUT_PROJ = "MultiheadAttention's out_proj is called unrolled, where the fused op reads its weight and bias alone: "


@pytest.mark.parametrize(
    "attn,context,parameter,reason",
    [
        (nn.MultiheadAttention(8, 2, batch_first=True, kdim=4, vdim=4), lambda x: x[..., :4], "attn.q_proj_weight",
         "MultiheadAttention with kdim / vdim other than embed_dim has no unrolled form"),
        (nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True), None, "attn.in_proj_weight",
         "MultiheadAttention with bias_k / bias_v or add_zero_attn has no unrolled form"),
        (Subclassed(8, 2, batch_first=True), None, "attn.in_proj_weight",
         "Subclassed is a subclass of MultiheadAttention, whose forward may differ"),
        (_out_proj_hooked(), None, "attn.in_proj_weight",
         _OUT_PROJ + "NonDynamicallyQuantizableLinear has hooks, whose effect on its output cannot be proven"),
        (_out_proj_halved(), None, "attn.in_proj_weight",
         _OUT_PROJ + "HalvedLinear is not a plain Linear, whose forward may differ"),
    ],
)  # fmt: skip
def test_attention_that_is_not_unrolled_keeps_the_fused_op_and_says_why(attn, context, parameter, reason):
    """An out_proj hooked or of its own forward ran unrolled where the fused op never calls it: scores 72-450% off,
    silently in batches of one (other batches: refused as mixing examples)."""
    torch.manual_seed(0)
    model = Attend(attn, context).to(F64).eval()
    x, y = torch.randn(5, 4, 8, dtype=F64), torch.randint(0, 3, (5,))
    ckpts = _ckpts(model)
    routes = {r.parameter: r for r in tc.explain(model, ckpts, (x, y), loss_fn=CE).routes}
    assert (routes[parameter].route, routes[parameter].reason) == ("vmap", reason)
    ref = reference_scores(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=CE)
    with pytest.warns(tc.SlowPathWarning, match=parameter):
        got = tc.self_influence(model, ckpts, (x, y), loss_fn=CE)
    assert_close(got, ref.self_influence, 1e-12)
    with pytest.warns(tc.SlowPathWarning, match=parameter):
        got = tc.influence(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=CE, batch_size=1)
    assert_close(got, ref.influence, 1e-12)


class Padded(nn.Module):
    """Attention under a boolean padding mask of each example's own, and a parameter that sends the call to vmap
    (``atan2`` has no factored form)."""

    def __init__(self):
        super().__init__()
        self.attn, self.fc, self.scale = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3), nn.Parameter(
            torch.tensor(1.3))

    def forward(self, x, padding):
        return torch.atan2(self.fc(self.attn(x, x, x, key_padding_mask=padding, need_weights=False)[0].mean(1)),
                           self.scale)  # fmt: skip


def test_a_boolean_padding_mask_per_example_runs_under_vmap():
    """The unrolled attention's additive mask was made by filling a fresh tensor in place, which vmap cannot do with
    a mask of each example's own: the call fell to the per-example loop. Made as the fused op makes it, it runs under
    vmap, exact."""
    torch.manual_seed(0)
    model = Padded().to(F64).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 6, 8, dtype=F64, generator=gen)
    padding = torch.arange(6) >= torch.tensor([6, 3, 5, 2, 4])[:, None]
    data = (x, padding, torch.randint(0, 3, (5,), generator=gen))
    ckpts = _ckpts(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = tc.self_influence(model, ckpts, data, loss_fn=CE)
    assert not [w for w in caught if "vmap failed" in str(w.message)]
    assert_close(got, reference_scores(model, ckpts, data, loss_fn=CE).self_influence, 1e-12)


def test_every_combination_of_masks_is_exact_through_the_scorers():
    """Masks reach the unrolled attention unchanged: influence with padding masks equals the loop reference."""
    torch.manual_seed(0)
    model = Encoder().to(F64).eval()
    ckpts = _ckpts(model)
    for seed_train, seed_test in itertools.product((2, 3), (4,)):
        train, test = _data(5, seed_train), _data(2, seed_test)
        ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence, 1e-12)


class _Features(nn.Module):
    """A default ``nn.TransformerEncoder`` (nested tensors enabled), or one ``TransformerEncoderLayer``, over float
    features that need no gradient."""

    def __init__(self, stacked: bool, every_position: bool = False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2) if stacked else layer, nn.Linear(8, 3)
        self.every_position = every_position

    def forward(self, x, pad):
        h = self.encoder(x, src_key_padding_mask=pad)
        return self.head(h.mean(1) if self.every_position else h[:, 0])


@pytest.mark.parametrize(
    "stacked, params",
    [(True, None), (True, ["encoder.layers.1.linear2.weight"]), (False, ["encoder.self_attn.in_proj_weight"])],
)
def test_an_encoders_inference_fast_path_is_not_taken(stacked, params):
    """With no gradient needed in it (its weights' gradients come from factors), a default TransformerEncoder turned
    a padded batch into nested tensors (torch's "NestedTensor layer_norm requires weight and bias" was raised) and an
    encoder layer ran one fused kernel, calling none of its layers ("called fewer times on an example")."""
    g = torch.Generator().manual_seed(0)
    model = _Features(stacked).to(F64).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.5)]

    def data(n):
        pad = torch.arange(5) >= torch.randint(1, 6, (n,), generator=g)[:, None]
        return torch.randn(n, 5, 8, generator=g, dtype=F64), pad, torch.randint(0, 3, (n,), generator=g)

    train, test = data(6), data(3)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE, params=params)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, params=params), ref.influence)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, params=params), ref.self_influence)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("factored", [None, False])
def test_a_frozen_encoder_runs_alone_as_in_the_batch(factored):
    """A frozen default encoder run alone by the spot check took torch's inference path (zeros at padded positions)
    where the batch computes them: a model averaging every position was refused as mixing its batch (a review
    helper's trial). Both run the path autograd runs where a gradient reaches the encoder (README, Limitations)."""
    g = torch.Generator().manual_seed(1)
    model = _Features(stacked=True, every_position=True).to(F64).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.5)]
    x, y = torch.randn(8, 5, 8, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)
    pad = torch.arange(5) >= torch.tensor([5, 5, 4, 2, 2, 2, 5, 5])[:, None]
    head = [model.head.weight, model.head.bias]
    ref = torch.stack([  # (the example's features needing a gradient: autograd's traced path)
        sum(t.square().sum() for t in torch.autograd.grad(CE(model(x[i : i + 1].requires_grad_(), pad[i : i + 1]),
                                                                y[i : i + 1]), head))
        for i in range(8)
    ])  # fmt: skip
    scores = tc.self_influence(model, ckpts, (x, pad, y), loss_fn=CE, params=["head.weight", "head.bias"],
                               factored=factored)  # fmt: skip
    assert_close(scores, 0.5 * ref, 1e-12)


class _FeaturesWithoutGradient(_Features):
    """The default encoder run under ``torch.no_grad()`` in the forward (a frozen feature extractor), the head's
    pooling over each example's own positions, or over every position (``every_position``: the zeros torch's
    inference path gives padded positions), or a teacher's pass through the encoder beside the student's."""

    def __init__(self, every_position: bool, teacher: bool = False):
        super().__init__(stacked=True, every_position=every_position)
        self.teacher = teacher

    def forward(self, x, pad):
        with torch.no_grad():
            h = self.encoder(0.9 * x if self.teacher else x, src_key_padding_mask=pad)
        if self.teacher:
            h = h + self.encoder(x, src_key_padding_mask=pad)
        kept = torch.ones_like(pad) if self.every_position else ~pad
        return self.head((h * kept[..., None].to(h.dtype)).sum(1) / kept.sum(1, keepdim=True).to(h.dtype))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("every_position, teacher", [(False, False), (True, False), (True, True)])
def test_an_encoder_run_without_gradient_runs_as_in_the_model_and_gives_no_factors(every_position, teacher):
    """Under ``torch.no_grad()`` in the forward, a default encoder turns a padded batch into nested tensors: its layers'
    hooks got them (torch's raw "NestedTensor layer_norm requires weight and bias"), and a lone example without
    padding, not nested, made calls the batch did not (refused as mixing: one at a time). Calls that give no gradient
    give no factors: the head batched, the encoder's parameters unused. Under the library's torch function modes,
    torch computed the padded positions it gives zeros in the user's model: a model reading them was 35-219% off on
    every route, silently; the encoder runs with those modes set aside (review helpers' trials)."""
    g = torch.Generator().manual_seed(2)
    model = _FeaturesWithoutGradient(every_position, teacher).to(F64).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.5)]

    def data(n):
        pad = torch.arange(5) >= torch.randint(2, 6, (n,), generator=g)[:, None]
        return torch.randn(n, 5, 8, generator=g, dtype=F64), pad, torch.randint(0, 3, (n,), generator=g)

    train, test = data(6), data(2)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tc.SlowPathWarning)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, factored=False), ref.influence)
    routes = {r.parameter: r.route for r in tc.explain(model, ckpts, train, loss_fn=CE).routes}
    assert routes["head.weight"] == "factored"
    assert routes["encoder.layers.0.norm1.weight"] == ("materialised" if teacher else "unused")
    # a loss calling the user's module itself: its encoders alike, for the call (33% off through a BatchLoss before)
    batch_loss = tc.BatchLoss(lambda p, b: F.cross_entropy(functional_call(model, p, b[:-1]), b[-1], reduction="none"))
    example_loss = tc.ExampleLoss(lambda p, b: F.cross_entropy(functional_call(model, p, b[:-1]), b[-1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        for loss in (batch_loss, example_loss):
            assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), ref.influence)
    assert "forward" not in vars(model.encoder) and "forward" not in vars(model.encoder.layers[0])


class _Distilled(nn.Module):
    """A KL loss to a frozen teacher's soft labels, the teacher (an encoder pooling every position) run under
    ``torch.no_grad()``: held by the criterion module."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, logits, target):
        x, pad = target
        with torch.no_grad():
            soft = self.teacher(x, pad).softmax(-1)
        return F.kl_div(logits.log_softmax(-1), soft, reduction="none").sum(-1)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_an_encoder_the_loss_holds_runs_as_in_the_users_own_call():
    """A teacher's encoder run without gradients in the loss (a global or closed-over teacher, one a criterion module
    holds, a partial's argument) takes torch's inference path, as in the user's own loss: under the library's modes it
    computed the padded positions it gives zeros (27-52% off, silently, on every loss form; a review helper's)."""
    g = torch.Generator().manual_seed(3)
    teacher = _FeaturesWithoutGradient(every_position=True).to(F64).eval().requires_grad_(False)
    student = nn.Sequential(nn.Flatten(), nn.Linear(40, 3)).to(F64).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in student.state_dict().items()}, lr=0.5)]
    pad = torch.arange(5) >= torch.randint(2, 6, (6,), generator=g)[:, None]
    x = torch.randn(6, 5, 8, generator=g, dtype=F64)

    def kl(logits, x, pad, teacher=teacher):
        with torch.no_grad():
            soft = teacher(x, pad).softmax(-1)
        return F.kl_div(logits.log_softmax(-1), soft, reduction="none").sum(-1)

    def per_example(p, b):
        return kl(functional_call(student, p, (b[0],)), *b)

    ref = torch.stack([  # (the user's own loss, one example at a time, no mode active)
        sum(t.square().sum() for t in torch.autograd.grad(
            per_example(dict(student.named_parameters()), (x[i : i + 1], pad[i : i + 1])).sum(),
            list(student.parameters())))
        for i in range(6)
    ])  # fmt: skip
    losses = {  # (a closure's, a global-like default's and a partial's teacher)
        "closure": tc.BatchLoss(per_example),
        "example": tc.ExampleLoss(lambda p, b: per_example(p, b).sum()),
        "partial": tc.BatchLoss(functools.partial(lambda t, p, b: kl(functional_call(student, p, (b[0],)), *b, t),
                                                  teacher)),
    }  # fmt: skip
    for loss in losses.values():
        assert_close(tc.self_influence(student, ckpts, (x, pad), loss_fn=loss), 0.5 * ref, 1e-12)
    assert_close(tc.self_influence(student, ckpts, (x, (x, pad)), loss_fn=_Distilled(teacher)), 0.5 * ref, 1e-12)
    # held in a dict or by the object of a bound method; a frozen teacher called with gradients on, which needs none
    # and so takes torch's inference path in the user's own loss too (each 6% off, silently: a sweep's)
    held = {"train": {"distill": {**dict.fromkeys(range(2000)), "teacher": teacher}}}  # (three levels down, past the
    # 1000 entries once looked into: sweeps')

    def in_dict(p, b):
        with torch.no_grad():
            soft = held["train"]["distill"]["teacher"](*b).softmax(-1)
        return F.kl_div(functional_call(student, p, (b[0],)).log_softmax(-1), soft, reduction="none").sum(-1)

    def gradients_on(p, b):
        soft = teacher(*b).detach().softmax(-1)
        return F.kl_div(functional_call(student, p, (b[0],)).log_softmax(-1), soft, reduction="none").sum(-1)

    class Distiller(nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher = teacher

        def loss(self, p, b):
            return _Distilled(self.teacher)(functional_call(student, p, (b[0],)), b)

    for loss in (in_dict, Distiller().loss, gradients_on):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (the loss's own vmap meets the nested tensors: a loop)
            got = tc.self_influence(student, ckpts, (x, pad), loss_fn=tc.BatchLoss(loss))
        assert_close(got, 0.5 * ref, 1e-12)
    assert not any("forward" in vars(m) for m in teacher.modules())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_the_model_and_the_teachers_a_loss_holds_are_locked_in_one_order(monkeypatch):
    """Each held teacher's locks taken after the model's, tree by tree in the order found, two threads whose losses
    held two teachers in opposite orders waited on each other for good (a sweep's): every lock is taken in one
    order."""
    teachers = sorted((_FeaturesWithoutGradient(True).to(F64).eval() for _ in range(2)),
                      key=lambda t: -min(map(id, t.modules())))  # fmt: skip  (found in an order unsorted by id)
    student = nn.Sequential(nn.Flatten(), nn.Linear(40, 3)).to(F64).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in student.state_dict().items()}, lr=0.5)]
    x, pad = torch.randn(4, 5, 8, dtype=F64), torch.zeros(4, 5, dtype=torch.bool)

    def both(p, b):
        with torch.no_grad():
            soft = (teachers[0](*b) + teachers[1](*b)).softmax(-1)
        return F.kl_div(functional_call(student, p, (b[0],)).log_softmax(-1), soft, reduction="none").sum(-1)

    taken, lock_of = [], tracin_func._model._lock_of
    monkeypatch.setattr(tracin_func._model, "_lock_of", lambda m: taken.append(id(m)) or lock_of(m))
    tc.self_influence(student, ckpts, (x, pad), loss_fn=tc.BatchLoss(both))
    held = {id(m) for t in teachers for m in t.modules()}
    order = [i for i in taken if i in held]
    assert len(set(order)) == len(held) and order[: len(held)] == sorted(held)


class _SeesAttentionSettings(nn.Module):
    """Self-attention by F.scaled_dot_product_attention, recording torch's process-wide kernel settings as it runs."""

    seen: list = []

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        _SeesAttentionSettings.seen.append(
            (torch._C._get_flash_sdp_enabled(), torch._C._get_mem_efficient_sdp_enabled())
        )
        h = self.q(x).view(x.shape[0], 5, 2, 4).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(h, h, h, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], 5, 8).mean(1))


def test_vmap_takes_the_math_attention_kernel_without_changing_torchs_settings():
    """`sdpa_kernel(MATH)` around vmap set process-wide flags: other threads' attention switched kernels mid-run
    (their calls' randomness check refused two runs differing), and concurrent calls left the flags restricted to
    the math kernel for good (their saving and restoring interleaved)."""
    g = torch.Generator().manual_seed(0)
    model = _SeesAttentionSettings().to(F64).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.5)]
    train = (torch.randn(6, 5, 8, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))
    before = (torch._C._get_flash_sdp_enabled(), torch._C._get_mem_efficient_sdp_enabled())
    _SeesAttentionSettings.seen.clear()
    got = tc.self_influence(model, ckpts, train, loss_fn=CE, factored=False)
    assert set(_SeesAttentionSettings.seen) == {before}
    assert_close(got, reference_scores(model, ckpts, train, loss_fn=CE).self_influence)


class _BooleanMaskAttention(nn.Module):
    """Self-attention by F.scaled_dot_product_attention under a boolean mask (True: attend), causal or a window."""

    def __init__(self, window: int | None):
        super().__init__()
        self.qkv, self.o, self.window = nn.Linear(8, 24), nn.Linear(8, 3), window

    def forward(self, x):
        q, k, v = self.qkv(x)[:, None].chunk(3, -1)
        t = torch.arange(x.shape[1])
        mask = (t[:, None] >= t) & (t[:, None] - t < (self.window or x.shape[1]))
        return self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, 0].mean(1))


@pytest.mark.parametrize("window", [None, 2])
def test_vmaps_math_attention_kernel_hides_a_boolean_masks_keys(window):
    """The math kernel adds its mask: a boolean one was added as 0 / 1, every key kept (found by review: 40% off
    under `factored=False` and `tc.ExampleLoss`, Mistral's sliding window 146%); converted as torch's own op does."""
    g = torch.Generator().manual_seed(0)
    model = _BooleanMaskAttention(window).to(F64).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.5)]
    train = (torch.randn(6, 5, 8, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))
    ref = reference_scores(model, ckpts, train, loss_fn=CE)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, factored=False), ref.self_influence)
    assert_close(tc.influence(model, ckpts, train, train, loss_fn=CE, factored=False), ref.influence)


class _MHAUnderMasks(nn.Module):
    """``nn.MultiheadAttention`` without its weights, under one of ``_masks``' attention masks."""

    def __init__(self, mask: str):
        super().__init__()
        self.attn, self.o = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)
        self.attn_mask, _, self.causal = _masks(1, 2, 5)[mask]

    def forward(self, x):
        mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype if self.attn_mask.is_floating_point() else
                                                                     torch.bool)  # fmt: skip
        out = self.attn(x, x, x, attn_mask=mask, need_weights=False, is_causal=self.causal)[0]
        return self.o(out.mean(1))


@pytest.mark.parametrize("mask", ["none", "causal hint"])
def test_vmap_runs_multi_head_attentions_math_kernel(mask):
    """``nn.MultiheadAttention`` calls SDPA inside ``F.multi_head_attention_forward``, which the math-kernel mode saw
    whole: under vmap the fused CPU kernel ran by torch's per-example fallback ("not yet implemented the batching
    rule ... performance drop", warned; found by a review helper). It runs the path giving weights, by the math,
    where no mask can hide a query's every key (other masks: the fused kernel, as before, warned by torch)."""
    g = torch.Generator().manual_seed(0)
    model = _MHAUnderMasks(mask).to(F64).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.5)]
    train = (torch.randn(6, 5, 8, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tc.self_influence(model, ckpts, train, loss_fn=CE, factored=False)
    assert_close(got, reference_scores(model, ckpts, train, loss_fn=CE).self_influence)


class _LeftPaddedCausal(nn.Module):
    """Attention without its weights under a causal mask over left-padded sequences: a padded query hides every key
    (the padded positions' outputs dropped)."""

    def __init__(self):
        super().__init__()
        self.emb, self.o = nn.Linear(3, 8), nn.Linear(8, 2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.register_buffer("causal", torch.triu(torch.ones(4, 4, dtype=torch.bool), 1))

    def forward(self, x, pad):
        h = self.emb(x)
        a = self.attn(h, h, h, attn_mask=self.causal, key_padding_mask=pad, need_weights=False)[0]
        return self.o(torch.where(pad[..., None], torch.zeros_like(a), a).sum(1))


def test_vmap_keeps_sdpas_zeros_for_a_query_hiding_every_key():
    """The path giving weights softmaxes a row of -inf to NaN, where SDPA's kernels give 0: run under vmap for every
    attention without weights, it made such a model's gradients NaN (refused as not finite; a review helper's). It runs
    only where no mask can hide a query's every key."""
    g = torch.Generator().manual_seed(0)
    model = _LeftPaddedCausal().to(F64).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.5)]
    x, y = torch.randn(4, 4, 3, generator=g, dtype=F64), torch.randint(0, 2, (4,), generator=g)
    pad = torch.tensor([[True, False, False, False], [False] * 4, [True, True, False, False], [False] * 4])
    got = tc.self_influence(model, ckpts, (x, pad, y), loss_fn=CE, factored=False)
    assert_close(got, reference_scores(model, ckpts, (x, pad, y), loss_fn=CE).self_influence)


class _InterruptedLayer(nn.TransformerEncoderLayer):
    """Raises a KeyboardInterrupt when run without gradients."""

    def forward(self, src, *args, **kwargs):
        if not torch.is_grad_enabled():
            raise KeyboardInterrupt("interrupted")
        return super().forward(src, *args, **kwargs)


class _FeaturesInterrupted(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = _InterruptedLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.encoder(x)
        return self.head(h.mean(1) + x.mean(1))


def test_an_interrupted_encoder_leaves_the_callers_torch_function_modes():
    """The library's modes set aside around an encoder run without gradients were put back by an ``always_call``
    forward hook, which torch runs on an Exception only: a KeyboardInterrupt left them off the stack, the user's own
    mode popped by the library's exits instead and the interrupt turned into "trying to pop from empty mode stack" (a
    review helper's)."""
    from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

    class Users(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model = _FeaturesInterrupted().to(F64).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.5)]
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(4, 5, 8, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    users = Users()
    with users:
        with pytest.raises(KeyboardInterrupt):
            tc.self_influence(model, ckpts, train, loss_fn=CE)
        assert _get_current_function_mode_stack() == [users]
    assert _get_current_function_mode_stack() == []


class _Proxy:
    """No __dict__, and a __getattr__ raising other than AttributeError (a lazy proxy's)."""

    __slots__ = ()

    def __getattr__(self, name):
        raise RuntimeError(f"no {name}")


def test_the_search_for_a_losss_teachers_passes_proxies_and_cycles():
    """Looking into what a loss holds: an object whose attribute lookup raises is passed over, a cycle walked once."""
    from types import SimpleNamespace

    from tracin_func._encoders import _modules_within

    layer = nn.Linear(2, 2)
    looped = SimpleNamespace(layer=layer)
    looped.itself = looped
    assert list(_modules_within({"proxy": _Proxy(), "deeper": {"list": [layer]}})) == [layer]
    assert list(_modules_within(looped)) == [layer]
    # a dead weak proxy and a mapping whose items raise passed over (raw ReferenceError / KeyError before: a sweep's)
    dead = weakref.proxy(_Holder())  # (its referent gone at once)
    assert list(_modules_within({"cfg": {"cache": [dead], "lazy": _Raising()}, "t": {"t": {"t": layer}}})) == [layer]
    # data rows beside a config: mappings looked into first (12,000 rows spent the budget before the teacher's dict)
    held = {"rows": [(i, i % 7) for i in range(12_000)], "distill": {"teachers": {"main": layer}}}
    assert list(_modules_within(held)) == [layer]
    held = SimpleNamespace(data=[{"i": i} for i in range(12_000)], extra=[0, {"x": layer}])  # (rows of dicts: opened
    assert list(_modules_within(held)) == [layer]  # 100 of one container's items at most, a sweep's)


class _Holder:
    pass


class _Raising(Mapping):
    def __getitem__(self, key):
        raise KeyError(key)

    def __iter__(self):
        return iter("ab")

    def __len__(self):
        return 2


class _Aliases:
    """A criterion keeping its own bound methods as attributes (each read again through every other: 3 s a call)."""

    def __init__(self, n):
        for i in range(n):
            setattr(self, f"step{i}", self.__call__)

    def __call__(self, out, y):
        return F.cross_entropy(out, y)


_GLOBAL_TEACHER = nn.Linear(2, 2)


class _TwoMethods:
    """A loss whose bound method calls another of its object's, which loads the teacher as a global."""

    def __init__(self):
        self.soft = self.soft_labels

    def loss(self, p, b):
        return self.soft(b)

    def soft_labels(self, b):
        return _GLOBAL_TEACHER(b)


def _get_teacher():
    return _GLOBAL_TEACHER


def _shared():
    return _get_teacher()


def _c():
    return _shared()


def _b():
    return _c()


def _a():
    return _b()


def _chained_loss(p, b):
    return _a() if b is None else _shared()


def test_what_a_loss_holds_is_read_once():
    """Each object and function a loss holds is read once (an object keeping its own bound methods was read again
    through each: exponential, 3-5 s a call; a sweep's), a second method of one object too (its function's globals)."""
    from tracin_func._code import held_values

    assert len(held_values(_Aliases(12))) <= 13  # (its 12 attributes and its method's global: read once each)
    assert any(v is _GLOBAL_TEACHER for _, v in held_values(_TwoMethods().loss))
    # a helper met first at the depth limit through a chain is read again where met less deep (a sweep's)
    assert any(v is _GLOBAL_TEACHER for _, v in held_values(_chained_loss))
