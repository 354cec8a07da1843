"""The factored path (layer inputs x output gradients) gives the dense path's numbers on every layer shape,
falls back to vmap(grad) where factors would be wrong, and picks its plan as documented."""

import functools
import warnings

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import tracin_func as tc
import tracin_func._assemble
import tracin_func._plan as plan_module
import tracin_func._representations
from tests.conftest import assert_close
from tests.reference import reference_scores
from tracin_func._setup import auto_batch_size

CE = nn.CrossEntropyLoss()


def _ckpts(model, lrs=(0.4, 1.5)):
    """Perturbed copies of the model's state; tied names (one tensor under two names) keep one tensor."""
    gen, ckpts = torch.Generator().manual_seed(1), []
    for lr in lrs:
        state, perturbed = model.state_dict(), {}
        key = {k: (v.data_ptr(), v.shape, v.dtype) for k, v in state.items()}  # tied names: one key
        for k, v in state.items():
            if key[k] not in perturbed:
                noise = 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else 0
                perturbed[key[k]] = v + noise
        ckpts.append(tc.Checkpoint({k: perturbed[key[k]] for k in state}, lr=lr))
    return ckpts


def _token_task(n_train=7, n_test=3):
    """Token ids ``[n, 5]`` (vocabulary 50) and labels of 3 classes, for training and test."""
    return tuple((torch.randint(0, 50, (n, 5)), torch.randint(0, 3, (n,))) for n in (n_train, n_test))


def _exact_and_explained(model, train, test):
    """Influence and self-influence equal the reference (slow paths allowed); the call's ``tc.explain``."""
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
        return tc.explain(model, ckpts, train, loss_fn=CE)


def _assert_paths_agree(model, train, test, loss_fn=CE, against_loop=True, **kw):
    """Every path gives the same scores (default, `factored=True`, `factored=False`), and the float64 loop's."""
    ckpts = _ckpts(model)
    results = {}
    for factored in (False, None, True):
        opts = dict(loss_fn=loss_fn, factored=factored, batch_size=5, **kw)
        results[factored] = (
            tc.influence(model, ckpts, train, test, **opts),
            tc.influence(model, ckpts, train, test, aggregate=True, **opts),
            tc.self_influence(model, ckpts, train, **opts),
            tc.embeddings(model, ckpts, train, **opts),
        )
    for factored in (None, True):
        for got, want in zip(results[factored], results[False]):
            assert_close(got, want, 1e-10, msg=factored)
    # and the per-example path against the float64 loop (an error both paths shared passed unseen: a review helper's
    # learning rates scaled by 1.01 in the setup)
    if against_loop:
        ref = reference_scores(model, ckpts, train, test, loss_fn=loss_fn, params=kw.get("params"))
        assert_close(results[False][0], ref.influence)
        assert_close(results[False][2], ref.self_influence)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2)
        self.c2 = nn.Conv2d(3, 4, (2, 3), stride=(1, 2), bias=False)
        self.c3 = nn.Conv1d(4, 3, 3, padding=1, dilation=2)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        h = torch.tanh(self.c3(h.flatten(2)))
        return self.fc(h.mean(2))


@pytest.mark.parametrize("chunk", [2, 512])  # grouped per-example conv gradients in several calls, or one
def test_convolutions_with_stride_dilation_padding(monkeypatch, chunk):
    from tracin_func import _layers

    monkeypatch.setattr(_layers, "_GROUPED_CONV_CHUNK", chunk)
    torch.manual_seed(0)
    model = Convs().double().eval()
    x, y = torch.randn(11, 2, 9, 10, dtype=torch.float64), torch.randint(0, 3, (11,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))


class Norms(nn.Module):
    """Conv-BatchNorm2d, Conv1d-BatchNorm1d over a sequence, LayerNorm over two dims and one without bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv1d(3, 4, 3)
        self.bn1 = nn.BatchNorm1d(4)
        self.ln2 = nn.LayerNorm((4, 5))
        self.ln = nn.LayerNorm(4, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.bn2(self.conv(x)))  # [B, 3, 5, 6]
        h = torch.tanh(self.bn1(self.conv1(h.flatten(2)[..., :7])))  # [B, 4, 5]
        h = self.ln2(h)
        return self.fc(self.ln(h.mean(2)))


def test_norm_layers_with_running_statistics():
    torch.manual_seed(0)
    model = Norms().double()
    with torch.no_grad():  # non-trivial running statistics, different in every checkpoint (_ckpts perturbs them)
        for bn in (model.bn2, model.bn1):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    model.eval()
    x, y = torch.randn(9, 2, 5, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    bias_only = [n for n, _ in model.named_parameters() if n != "bn2.weight"]  # no normalised input needed there
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]), params=bias_only)
    assert _plan(model, (x, y)).batched  # every layer gives factors: one batched pass


class InstanceNorms(nn.Module):
    """Affine InstanceNorms: each example's own statistics (the default), and running statistics in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.in2 = nn.InstanceNorm2d(3, affine=True)
        self.conv1 = nn.Conv1d(3, 4, 3)
        self.in1 = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.in2(self.conv(x)))
        return self.fc(torch.tanh(self.in1(self.conv1(h.flatten(2)))).mean(2))


def test_instance_norms_are_norm_sites():
    torch.manual_seed(0)
    model = InstanceNorms().double()
    with torch.no_grad():
        model.in1.running_mean.uniform_(-1, 1), model.in1.running_var.uniform_(0.5, 2)
    model.eval()
    x, y = torch.randn(7, 2, 4, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    plan = _plan(model, (x, y))
    assert plan.batched and not plan.dense and {"in1", "in2"} <= {s.path for s in plan.sites if s.kind == "norm"}

    class Clamped(nn.InstanceNorm2d):  # its own normalisation: not provably the class's function
        def _apply_instance_norm(self, input):
            return super()._apply_instance_norm(input).clamp(-1, 1)

    assert tracin_func._layers.site_kind(Clamped(3, affine=True)) is None


class UnbatchedInstanceNorm(nn.Module):
    """An InstanceNorm called on each example alone (``[C, L]``, no batch dimension), as a per-example loop does."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.InstanceNorm1d(3, affine=True), nn.Linear(15, 3)

    def forward(self, x):
        return self.fc(torch.stack([self.norm(example) for example in x.unbind(0)]).flatten(1))


def test_an_instance_norm_on_unbatched_inputs_is_normalised_as_its_forward_does():
    """Regression (found by fuzzing): its normalised input was computed with ``[C, L]`` read as a batch of C (a raw
    error about the spatial size, or the weight's)."""
    torch.manual_seed(0)
    model = UnbatchedInstanceNorm().double().eval()
    x, y = torch.randn(7, 3, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        _assert_paths_agree(model, (x, y), (x[:3], y[:3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4,), (3, 4)])
def test_a_layernorms_normalised_input_comes_from_the_statistics_its_forward_saved(monkeypatch, dtype, shape):
    from torch.nn import functional as F

    from tracin_func import _layers
    from tracin_func._layers import Site, _saved_statistics, recorded_input

    torch.manual_seed(0)
    layer = nn.LayerNorm(shape, dtype=dtype)
    site = Site("ln", "norm", "ln.weight", "ln.bias", shape)
    x = torch.randn(5, 2, *shape, dtype=dtype) * 3 + 1
    output = layer(x)
    assert _saved_statistics(layer, output) is not None  # the cheap path is taken, not normalising again
    again = F.layer_norm(x, shape, None, None, layer.eps)
    torch.testing.assert_close(recorded_input(layer, site, x, output), again, rtol=0, atol=4 * torch.finfo(dtype).eps)
    torch.testing.assert_close(recorded_input(layer, site, x), again, rtol=0, atol=0)  # no output: normalised again
    with torch.no_grad():  # no graph, no saved statistics: normalised again
        assert _saved_statistics(layer, layer(x)) is None
    monkeypatch.setattr(_layers, "_saved_statistics", lambda module, out: (torch.zeros(()), torch.ones(())))
    assert torch.equal(recorded_input(layer, site, x, output), x)  # the statistics given are the ones used


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 5, padding_idx=0)
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, ids):
        h = self.shared(torch.tanh(self.shared(self.emb(ids))))  # the same module called twice
        return self.out(h.mean(1))


def test_embedding_padding_and_a_module_called_twice():
    torch.manual_seed(0)
    model = Tokens().double().eval()
    ids, y = torch.randint(0, 12, (10, 6)), torch.randint(0, 3, (10,))
    ids[:, -2:] = 0
    _assert_paths_agree(model, (ids, y), (ids[:4], y[:4]))


@pytest.mark.parametrize("block", [1, 7, 1 << 22])  # matches per block: one, a few, all at once
def test_token_rows_match_materialised_embedding_gradients(monkeypatch, block):
    from tracin_func import _representations as _reps
    from tracin_func._layers import Site

    monkeypatch.setattr(_reps, "_PAIR_BLOCK", block * 3)
    gen = torch.Generator().manual_seed(0)
    site = Site("emb", "embedding", "emb.weight", None, (6, 3))
    part = lambda n, t: _reps.Factored(  # noqa: E731  (ids -1 are padding; small vocab: many repeats)
        site, torch.randint(-1, 6, (n, t), generator=gen), torch.randn(n, t, 3, generator=gen, dtype=torch.float64)
    )
    test_a, test_b, train = part(3, 5), part(2, 4), part(7, 4)
    rows = _reps.TokenRows.concat([_reps.TokenRows.of(test_a), _reps.TokenRows.of(test_b)])
    dense_test = _reps.Factored.concat([test_a, test_b])
    flat = lambda p: p.materialize()["emb.weight"].flatten(1)  # noqa: E731
    torch.testing.assert_close(flat(rows), flat(dense_test), rtol=0, atol=0)
    torch.testing.assert_close(rows.dot(train), flat(dense_test) @ flat(train).T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.sq_norm(), flat(dense_test).square().sum(1), rtol=1e-12, atol=1e-12)
    total = flat(dense_test).sum(0, keepdim=True) @ flat(train).T
    torch.testing.assert_close(rows.total().dot(train), total, rtol=1e-12, atol=1e-12)
    assert rows.n == 5 and rows.total().n == 1


def test_every_part_takes_the_examples_in_a_slice_and_a_split_copies_its_head():
    """``take`` keeps a slice's examples of every kind of part (materialised, their dots and norms as the whole's rows),
    and ``Representation.split`` copies the first examples' (a test side kept beyond the joined batch's life), an
    Embedding's rows only those they touch."""
    from tracin_func import _representations as _reps
    from tracin_func._layers import Site

    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    linear = Site("fc", "linear", "fc.weight", "fc.bias", (3, 4))
    emb = Site("emb", "embedding", "emb.weight", None, (6, 3))
    factored = _reps.Factored(linear, randn(7, 2, 4), randn(7, 2, 3))
    ids = torch.randint(-1, 6, (7, 5), generator=gen)
    tokens = _reps.Factored(emb, ids, randn(7, 5, 3))
    wide = Site("pos", "embedding", "pos.weight", None, (50, 3))  # (materialised on the rows its ids touch)
    wide_ids = torch.randint(-1, 50, (7, 5), generator=gen)
    parts = [
        factored,
        factored._formed(),  # Deferred
        _reps.Dense({"w": randn(7, 2, 3), "b": randn(7)}),
        tokens,
        _reps.TokenRows.of(tokens),
        _reps.Rows.of(wide, wide_ids, randn(7, 5, 3)),
        _reps.Tied((factored, _reps.Factored(linear, randn(7, 3, 4), randn(7, 3, 3)))),
        _reps.Zero.of({"u": randn(2, 2)}, 7),
    ]
    for part in parts:
        whole = part.materialize()
        for rows in (slice(0, 2), slice(2, 7), slice(3, 4)):
            taken = part.take(rows)
            for name, g in taken.materialize().items():
                torch.testing.assert_close(g, whole[name][rows], rtol=0, atol=0, msg=type(part).__name__)
            assert _reps.Representation((taken,), tuple(whole)).size == rows.stop - rows.start
        rep = _reps.Representation((part,), tuple(whole))
        head, tail = rep.split(2)
        assert (head.size, tail.size) == (2, 5)
        if isinstance(part, _reps.Rows):  # only the rows the first two examples touch (the batch's: all six)
            first = wide_ids[:2]
            assert head.parts[0].ids.tolist() == sorted(set(first[first >= 0].tolist())) != part.ids.tolist()
        head_leaves = [t for t in optree.tree_leaves(head) if isinstance(t, torch.Tensor) and t.numel()]
        rep_storage = {t.untyped_storage().data_ptr() for t in optree.tree_leaves(rep) if isinstance(t, torch.Tensor)}
        assert not {t.untyped_storage().data_ptr() for t in head_leaves} & rep_storage, type(part).__name__
        if not isinstance(part, _reps.Tied):  # (kept by self-influence plans only: no dot)
            # (token rows, a test side, are dotted with a training side's factors)
            other = _reps.Representation((tokens if isinstance(part, _reps.TokenRows) else part,), rep.names)
            torch.testing.assert_close(head.dot(other.split(2)[1]), rep.dot(other)[:2, 2:], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tail.sq_norm(), rep.sq_norm()[2:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strided", ["neither", "first", "second", "both"])
def test_row_products_read_strided_rows_in_place(strided):
    """``_products``: the ``[n, m, T, S]`` row products of two factor sides, whichever has its rows strided in memory
    (a convolution's unfolded patches, ``[B, d, T]``), equal ``einsum``'s, also where a side has no rows (a batch
    whose rows without gradient were all dropped) or no examples."""
    from tracin_func._representations import _products

    gen = torch.Generator().manual_seed(0)

    def side(n, t, transposed):  # [n, t, d] rows, stored [n, d, t] when transposed
        x = torch.randn(n, 7, t, generator=gen, dtype=torch.float64)
        return x.transpose(1, 2) if transposed else x.transpose(1, 2).contiguous()

    for (n, t), (m, s) in (((3, 5), (4, 6)), ((3, 0), (4, 6)), ((3, 5), (4, 0)), ((0, 5), (4, 6)), ((3, 5), (0, 6))):
        x1, x2 = side(n, t, strided in ("first", "both")), side(m, s, strided in ("second", "both"))
        want = torch.einsum("itd,jsd->ijts", x1.contiguous(), x2.contiguous())
        torch.testing.assert_close(_products(x1, x2), want, rtol=1e-14, atol=1e-14)


def test_materialised_embedding_rows_match_full_gradients():
    """``Rows`` keeps an Embedding's gradients on the ids its batch uses: every operation equals the full
    ``[B, V, d]`` gradients' across batches with the same, overlapping and disjoint ids (and padding), and with ids
    every example reads alike (positions: kept as given where in increasing order)."""
    from tracin_func import _representations as _reps
    from tracin_func._layers import Site

    gen = torch.Generator().manual_seed(0)
    site = Site("emb", "embedding", "emb.weight", None, (9, 3))

    def part(n, t, low, high):  # ids in [low, high), -1 padding
        ids = torch.randint(low, high, (n, t), generator=gen)
        ids[0, -1] = -1
        return _reps.Factored(site, ids, torch.randn(n, t, 3, generator=gen, dtype=torch.float64))

    def positions(n, ids):  # every example the same ids (a [1, T] row broadcast over the batch)
        g = torch.randn(n, len(ids), 3, generator=gen, dtype=torch.float64)
        return _reps.Factored(site, torch.tensor(ids).expand(n, -1), g)

    flat = lambda p: p.materialize()["emb.weight"].flatten(1)  # noqa: E731
    a, b, c = part(4, 5, 0, 5), part(3, 4, 3, 9), part(2, 3, 6, 9)  # a, b overlap; a, c disjoint
    # positions in order (their rows are the gradients as given), not in order, repeated, one example unlike the others
    d, e, f, h = positions(3, [2, 4, 5, 8]), positions(2, [4, 2, 5]), positions(2, [1, 1, 3]), positions(3, [0, 3, 6])
    h = h._replace(a=h.a.clone())  # (written into: its rows share one in memory)
    h.a[1, 2] = 7
    parts = dict(a=a, b=b, c=c, d=d, e=e, f=f, h=h)
    rows = {k: _reps.Rows.of(site, p.a, p.g) for k, p in parts.items()}
    assert rows["c"].ids.tolist() == sorted(set(c.a[c.a >= 0].tolist()))
    assert rows["d"].g.data_ptr() == d.g.data_ptr() and rows["d"].ids.tolist() == [2, 4, 5, 8]
    assert [rows[k].ids.tolist() for k in "efh"] == [[2, 4, 5], [1, 3], [0, 3, 6, 7]]
    for p, r in zip(parts.values(), rows.values()):
        torch.testing.assert_close(flat(r), flat(p), rtol=0, atol=0)
        torch.testing.assert_close(r.sq_norm(), flat(p).square().sum(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r.total().materialize(), p.total().materialize(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r.project(3, 4), p.project(3, 4), rtol=1e-12, atol=1e-12)
        for q, s in zip(parts.values(), rows.values()):
            torch.testing.assert_close(r.dot(s), flat(p) @ flat(q).T, rtol=1e-12, atol=1e-12)
    joined = _reps.Rows.concat(list(rows.values()))
    torch.testing.assert_close(flat(joined), torch.cat([flat(p) for p in parts.values()]), rtol=0, atol=0)
    assert torch.equal(rows["a"].dot(rows["c"]), torch.zeros(4, 2, dtype=torch.float64))


def test_sequence_inputs_and_a_bias_only_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(9, 7, 4, dtype=torch.float64), torch.randn(9, 7, 3, dtype=torch.float64)
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]), loss_fn=nn.MSELoss(), params=["0.bias", "2.weight"])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


class DirectUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(self.a(x) + nn.functional.linear(x, self.a.weight))


class MixesExamples(nn.Module):
    """Centers over the batch, or over all examples but the first (which then gets the same factors in a batch as
    alone): the batched path must not be used."""

    def __init__(self, all_but_first=False):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)
        self.all_but_first = all_but_first

    def forward(self, x):
        h = torch.tanh(self.a(x))
        mixed = int(self.all_but_first)
        return self.b(torch.cat([h[:mixed], h[mixed:] - h[mixed:].mean(0, keepdim=True)]))


def _plan(model, batch, loss_fn=CE, **kw):
    seen = []
    original = plan_module.make_plan
    plan_module.make_plan = lambda *a, **k: seen.append(original(*a, **k)) or seen[-1]
    try:
        tc.self_influence(model, _ckpts(model), batch, loss_fn=loss_fn, **kw)
    finally:
        plan_module.make_plan = original
    return seen[0]


def test_tied_weights_are_materialised_from_every_use():
    """A tensor shared by an Embedding and a Linear (GPT-2's wte / lm_head): its per-example gradient is the sum of
    both uses' gradients from factors, under its first name, never a factored kernel; the call stays batched."""
    torch.manual_seed(0)
    model = Tied().double().eval()
    ids, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 10, (8,))
    _assert_paths_agree(model, (ids, y), (ids[:3], y[:3]))
    plan = _plan(model, (ids, y), factored=True)
    tied = {s.path: s.weight for s in plan.sites if s.tied}
    assert tied == {"emb": "emb.weight", "head": "emb.weight"} and not plan.dense and plan.batched
    assert plan.route("emb.weight") == "materialised" and plan.route("head.bias") == "materialised"


def _scored_every_way(model, ckpts, train, test, factored):
    """Influence (plain, cosine, train-renormalised, per layer), self-influence (whole, per layer) and embeddings
    (whole, projected) of ``train`` (``test``), the training side in batches of 5."""
    opts = dict(loss_fn=CE, factored=factored, batch_size=5)
    scores = [tc.influence(model, ckpts, train, test, normalize=n, **opts) for n in (None, "cosine", "train")]
    scores.append(tc.influence(model, ckpts, train, test, per_layer=True, **opts))
    scores += [tc.self_influence(model, ckpts, train, per_layer=per_layer, **opts) for per_layer in (True, False)]
    scores.append(tc.embeddings(model, ckpts, train, **opts))
    return scores + [tc.embeddings(model, ckpts, train, projection_dim=8, seed=1, **opts)]


def _assert_scores_agree(results, layers=None):
    """Each score of ``results[None]`` (the default) equals ``results[False]``'s; per-layer ones layer by layer."""
    for got, want in zip(results[None], results[False], strict=True):
        if isinstance(want, dict):
            assert got.keys() == want.keys() and (layers is None or set(want) == layers)
            for layer in want:
                assert_close(got[layer], want[layer], 1e-10, msg=layer)
        else:
            assert_close(got, want, 1e-10)


class TiedThrice(nn.Module):
    """A table read by an Embedding and two Linears, one called twice (with a bias of its own), the other once."""

    def __init__(self):
        super().__init__()
        self.emb, self.head, self.back = nn.Embedding(10, 4), nn.Linear(4, 10), nn.Linear(4, 10, bias=False)
        self.head.weight = self.back.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))
        return self.head(h.mean(1)) + self.head(h[:, 0]) * self.back(h[:, -1]).sigmoid()


# one example per chunk (dots: the test side's rows), all at once, or each row of the table (an output channel) apart
@pytest.mark.parametrize("chunk_bytes, block_bytes", [(1, 1 << 24), (1 << 20, 1 << 24), (1, 1)])
def test_a_tied_weight_is_formed_when_scored_from_every_use(monkeypatch, chunk_bytes, block_bytes):
    """A materialised tied weight's per-example gradients are formed chunk by chunk when a batch is scored, its
    Linear-like uses' summed and its Embedding rows added in (one ``Deferred`` part, never a ``[B, V, d]`` tensor
    per batch; where large, a block of the table's rows at a time); a tied Linear's own bias stays next to the dense
    gradients, its layer's share its own. Every use gives the vmap(grad) path's numbers."""
    import tracin_func._assemble as assemble_module
    import tracin_func._representations as representations_module
    from tracin_func._representations import Deferred, Dense

    torch.manual_seed(0)
    model = TiedThrice().double().eval()
    ids, y = torch.randint(0, 10, (11, 5)), torch.randint(0, 10, (11,))
    train, test, ckpts = (ids, y), (ids[:4], y[:4]), _ckpts(model)
    parts = []
    original = assemble_module.assemble

    def spy(*args):
        rep = original(*args)
        parts.append({type(p).__name__: set(p.materialize()) for p in rep.parts if isinstance(p, (Deferred, Dense))})
        assert all(p.by_channels is not None for p in rep.parts if isinstance(p, Deferred))  # (on the CPU)
        return rep

    monkeypatch.setattr(assemble_module, "assemble", spy)
    monkeypatch.setattr(representations_module, "_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(representations_module, "_BLOCK_BYTES", block_bytes)
    results = {factored: _scored_every_way(model, ckpts, train, test, factored) for factored in (False, None)}
    assert parts and all(p == {"Deferred": {"emb.weight"}, "Dense": {"head.bias"}} for p in parts), parts
    _assert_scores_agree(results, layers={"emb", "head"})


class TiedAndDirect(Tied):
    def forward(self, ids):
        h = self.emb(ids).mean(1)
        return self.head(h) + nn.functional.linear(h, self.emb.weight)  # a third use, outside any layer


def test_a_tied_weight_with_a_use_outside_layers_falls_back_to_vmap():
    torch.manual_seed(0)
    model = TiedAndDirect().double().eval()
    ids, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 10, (8,))
    _assert_paths_agree(model, (ids, y), (ids[:3], y[:3]))
    plan = _plan(model, (ids, y), factored=True)
    assert not plan.sites and set(plan.dense) == {"emb.weight", "head.bias"}  # every use of the tensor, or none


class RunsOtherWeights(nn.Module):
    """A Linear ``mid`` run with tensors other than its parameters, as ``how`` says: ``torch.func.functional_call``
    with a masked weight (pruning), a weight scaled by the parent's parameter, one generated by a hypernetwork,
    another layer's parameters (after its own call), or a weight computed in the forward where it is no parameter
    (AWD-LSTM's dropped ``weight_raw``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.inp, self.mid, self.head = how, nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.other, self.z, self.hyper = nn.Linear(8, 8), nn.Parameter(torch.randn(4)), nn.Linear(4, 64)
        self.g = nn.Parameter(torch.tensor(1.3))
        self.register_buffer("mask", (torch.rand(8, 8) > 0.5).float())
        if how == "assigned":
            weight = self.mid.weight
            del self.mid.weight
            self.mid.register_parameter("weight_raw", weight)
            self.mid.weight = weight.detach().clone()  # (a plain tensor, set again by each forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, mid = torch.tanh(self.inp(x)), self.mid
        if self.how == "masked":
            h = functional_call(mid, {"weight": mid.weight * self.mask, "bias": mid.bias}, (h,))
        elif self.how == "scaled":
            h = functional_call(mid, {"weight": mid.weight * self.g, "bias": mid.bias}, (h,))
        elif self.how == "generated":
            h = functional_call(mid, {"weight": self.hyper(self.z).view(8, 8)}, (h,))
        elif self.how == "another_layers":
            h = functional_call(mid, dict(self.other.named_parameters()), (torch.tanh(mid(h)),))
        else:
            mid.weight = self.mask * mid.weight_raw
            h = mid(h)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("how", ["masked", "scaled", "generated", "another_layers", "assigned"])
def test_a_layer_run_with_other_tensors_than_its_parameters_is_not_a_factor_site(how):
    """Its factors give the gradient of the tensor it ran, not its parameters' (found by a review helper: a masked
    weight 4-22% off, silently, a generated one scored where the weight's true gradient is 0, a scaled one refused as
    "not used"). Such a layer leaves the factored path, exact; the last layer too."""
    torch.manual_seed(0)
    model = RunsOtherWeights(how).double().eval()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    explained = _exact_and_explained(model, (x, y), (x[:3], y[:3]))
    reasons = {route.parameter: route.reason for route in explained.routes}
    assert "'mid' is called with another weight or bias than its parameter" in reasons["mid.bias"]
    ckpts = _ckpts(model)
    only = ["mid.weight"] if how == "generated" else None  # (its true gradient: 0)
    if only:
        zero = tc.self_influence(model, ckpts, (x, y), loss_fn=CE, params=only)
        assert torch.equal(zero, torch.zeros_like(zero))


class MaskedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(5, 8), nn.Linear(8, 3)
        self.register_buffer("mask", (torch.rand(3, 8) > 0.5).double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = {"weight": self.head.weight * self.mask, "bias": self.head.bias}
        return functional_call(self.head, head, (torch.tanh(self.body(x)),))


def test_the_last_layer_run_with_a_masked_weight_is_scored_through_its_mask():
    torch.manual_seed(0)
    model = MaskedHead().double().eval()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE, params=["head.weight", "head.bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        got = tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE, method="last_layer")
    assert_close(got, ref.influence)


class SharedTable(nn.Module):
    """T5's and BART's tie: a ``shared`` Embedding that the forward never calls, whose tensor two other Embeddings
    (encoder, decoder) and the LM head use. ``late``: ``shared`` is called itself in a batch where some example
    starts with token 9 (the first examples do not)."""

    def __init__(self, late=False):
        super().__init__()
        self.shared, self.enc, self.dec = nn.Embedding(10, 4), nn.Embedding(10, 4), nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.enc.weight = self.dec.weight = self.head.weight = self.shared.weight
        self.mix = nn.Linear(4, 4)
        self.late = late

    def forward(self, ids, use_shared=False):
        h = torch.tanh(self.mix(self.enc(ids))).mean(1, keepdim=True) + self.dec(ids.flip(1))
        if use_shared or self.late and bool((ids[:, 0] == 9).any()):
            h = h + self.shared(ids)
        return self.head(torch.tanh(h).mean(1))


def test_a_tied_tensors_uncalled_module_leaves_its_other_uses_batched():
    """The uncalled ``shared`` adds nothing: the tensor's gradient is its called uses' (exact, batched, not vmap)."""
    torch.manual_seed(0)
    model = SharedTable().double().eval()
    ids, y = torch.randint(0, 9, (8, 5)), torch.randint(0, 10, (8,))
    _assert_paths_agree(model, (ids, y), (ids[:3], y[:3]))
    ref = reference_scores(model, _ckpts(model), (ids, y), (ids[:3], y[:3]), loss_fn=CE)
    assert_close(tc.influence(model, _ckpts(model), (ids, y), (ids[:3], y[:3]), loss_fn=CE), ref.influence, 1e-12)
    for factored in (None, True):
        plan = _plan(model, (ids, y), factored=factored)
        assert plan.batched and not plan.dense and plan.uncalled == ("shared",)
        assert {s.path for s in plan.sites if s.tied} == {"enc", "dec", "head"}


def test_a_tied_tensors_module_called_only_after_planning_is_refused():
    """``shared`` uncalled on the first examples but called in a later batch would add a use outside the factors:
    refused with the fix, which is exact."""
    torch.manual_seed(0)
    model = SharedTable(late=True).double().eval()
    ids, y = torch.randint(0, 9, (8, 5)), torch.randint(0, 10, (8,))
    ids[6, 0] = 9
    ckpts = _ckpts(model)
    with pytest.raises(ValueError, match=r"module 'shared' \(Embedding\) shares its weight.*factored=False"):
        tc.self_influence(model, ckpts, (ids, y), loss_fn=CE, batch_size=4)
    ref = reference_scores(model, ckpts, (ids, y), loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap fails on the branch: the loop
        assert_close(tc.self_influence(model, ckpts, (ids, y), loss_fn=CE, factored=False), ref.self_influence, 1e-12)


class IndexingTable(nn.Embedding):
    def forward(self, ids):
        return self.weight[ids] * 2.0  # no F.embedding call: a hook at that call would never fire


class SharedIndexingTable(SharedTable):
    def __init__(self):
        super().__init__(late=True)
        self.shared = IndexingTable(10, 4)
        self.enc.weight = self.dec.weight = self.head.weight = self.shared.weight


class TiedWithOwnBias(nn.Module):
    """A Linear whose weight is the Embedding's but whose bias is its own, called only when an example starts with
    token 9: never the module left out for its partners (its bias would have no site)."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj, self.head = nn.Embedding(10, 4), nn.Linear(4, 10), nn.Linear(4, 3)
        self.proj.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        if bool((ids[:, 0] == 9).any()):
            h = h + self.proj(h)[:, :4]
        return self.head(torch.tanh(h))


@pytest.mark.filterwarnings("ignore:torch.func.vmap failed on this model")  # the branch: the loop
def test_an_uncalled_tied_module_is_refused_whatever_its_forward_does_or_holds():
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (8, 5))
    ids[6, 0] = 9
    model = SharedIndexingTable().double().eval()
    ckpts = _ckpts(model)
    y = torch.randint(0, 10, (8,))
    with pytest.raises(ValueError, match=r"module 'shared' \(IndexingTable\) shares its weight"):
        tc.self_influence(model, ckpts, (ids, y), loss_fn=CE, batch_size=4)
    model = TiedWithOwnBias().double().eval()
    ckpts, y = _ckpts(model), torch.randint(0, 3, (8,))
    assert _plan(model, (ids, y)).uncalled == ()
    ref = reference_scores(model, ckpts, (ids, y), (ids[:3], y[:3]), loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap fails on the branch: the loop
        for loss in (CE, tc.ExampleLoss(lambda p, b: CE(torch.func.functional_call(model, p, (b[0],)), b[1]))):
            got = tc.self_influence(model, ckpts, (ids, y), loss_fn=loss, batch_size=4)
            assert_close(got, ref.self_influence, 1e-12)


def test_a_tied_tensors_module_called_by_one_loss_only_leaves_the_tensor_to_vmap():
    """The test loss calls ``shared``, the training loss does not: every use of the tensor goes to vmap(grad)."""
    torch.manual_seed(0)
    model = SharedTable().double().eval()
    ids, y = torch.randint(0, 9, (8, 5)), torch.randint(0, 10, (8,))

    def with_shared(params, batch):
        out = torch.func.functional_call(model, params, (batch[0],), {"use_shared": True})
        return nn.functional.cross_entropy(out, batch[1], reduction="none")

    test_loss = tc.BatchLoss(with_shared)
    ckpts = _ckpts(model)
    routes = {r.parameter: r for r in tc.explain(model, ckpts, (ids, y), loss_fn=CE, test_loss_fn=test_loss).routes}
    shared = routes["shared.weight"]
    assert shared.route == "vmap" and "called under one loss and not the other" in shared.reason
    ref = reference_scores(model, ckpts, (ids, y), (ids[:3], y[:3]), loss_fn=CE, test_loss_fn=test_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = tc.influence(model, ckpts, (ids, y), (ids[:3], y[:3]), loss_fn=CE, test_loss_fn=test_loss)
    assert_close(got, ref.influence, 1e-12)


class Table(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 4))  # a layer of no known kind

    def forward(self, x):
        return x + self.table[0]


class UnusedParts(nn.Module):
    """A head the forward never calls and a layer it calls only on inputs above 2 (like wav2vec2's masked
    spectrogram embedding, used in training only): unused on the first examples."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.spare, self.masker = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3), Table()

    def forward(self, x):
        high = (x > 2).any(1, keepdim=True)
        if bool(high.any()):  # (each example as alone: the others keep x)
            x = torch.where(high, self.masker(x), x)
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.filterwarnings("ignore:torch.func.vmap failed on this model")  # factored=False: the loop (the branch)
def test_unused_parameters_get_zero_gradients_on_the_batched_path():
    torch.manual_seed(0)
    model = UnusedParts().double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64).clamp(-2, 2), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]  # rows counted from the geometry alone
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]), params=biases)
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE)
    assert_close(tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE), ref.influence, 1e-12)
    assert_close(tc.embeddings(model, ckpts, (x, y), loss_fn=CE), ref.train_embeddings, 1e-12)
    per_layer = tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE, per_layer=True)
    assert not per_layer["spare"].any() and not per_layer["masker"].any()
    assert_close(sum(per_layer.values()), ref.influence, 1e-12)
    plan = _plan(model, (x, y))
    assert plan.batched and not plan.dense and set(plan.unused) == {"spare.weight", "spare.bias", "masker.table"}
    routes = {r.parameter: r for r in tc.explain(model, ckpts, (x, y), loss_fn=CE).routes}
    assert routes["masker.table"].route == "unused" and "zero gradients" in routes["masker.table"].reason


def test_a_parameter_unused_when_planned_but_reached_later_is_refused():
    """Example 6 uses ``masker``: every call whose batches reach it is refused (its gradients were taken as zero),
    influence too (a batch whose structure differs from the planned one may also mix its examples)."""
    torch.manual_seed(0)
    model = UnusedParts().double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64).clamp(-2, 2), torch.randint(0, 3, (8,))
    x[6, 0] = 3.0
    ckpts = _ckpts(model)
    refused = r"parameter 'masker.table' was not used .* this batch uses it.*factored=False"
    for call in (
        lambda: tc.self_influence(model, ckpts, (x, y), loss_fn=CE, batch_size=4),
        lambda: tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE, batch_size=4),
        lambda: tc.embeddings(model, ckpts, (x, y), loss_fn=CE, batch_size=4),
    ):
        with pytest.raises(ValueError, match=refused):
            call()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap fails on the branch: the loop
        got = tc.self_influence(model, ckpts, (x, y), loss_fn=CE, factored=False)
        ref = reference_scores(model, ckpts, (x, y), loss_fn=CE)
    assert_close(got, ref.self_influence, 1e-12)


class BroadcastRow(nn.Module):
    """Position embeddings looked up once as ``[1, T]`` and broadcast over the batch (BERT, GPT-2); ``mix``
    instead reduces that row over dim 0, which only a batch of one leaves alone."""

    def __init__(self, mix=False):
        super().__init__()
        self.tok, self.pos, self.fc = nn.Embedding(10, 4), nn.Embedding(6, 4), nn.Linear(4, 3)
        self.register_buffer("ids", torch.arange(6)[None], persistent=False)
        self.mix = mix

    def forward(self, tokens):
        pos = self.pos(self.ids[:, : tokens.shape[1]])
        h = self.tok(tokens) + (pos.mean(0) if self.mix else pos)
        return self.fc(torch.tanh(h).mean(1))


@pytest.mark.parametrize("mix", [False, True], ids=["broadcast", "reduced-over-the-batch"])
def test_rows_broadcast_over_the_batch_are_batched_and_mixing_is_refused(mix):
    torch.manual_seed(0)
    model = BroadcastRow(mix).double().eval()
    tokens, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (tokens, y), (tokens[:3], y[:3]))
    plan = _plan(model, (tokens, y))
    assert not plan.dense and plan.batched is not mix
    if mix:
        assert "changed the first examples' factors at 'pos'" in plan.batching



class UnbatchedPositions(nn.Module):
    """nanoGPT's positions: an Embedding on ``torch.arange(T)``, ids without a batch dimension, broadcast over it."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.fc = nn.Embedding(10, 4), nn.Embedding(6, 4), nn.Linear(4, 3)

    def forward(self, tokens):
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        return self.fc(torch.tanh(h).mean(1))


def test_positions_without_a_batch_dimension_are_batched():
    """Regression (found by fuzzing): ids ``[T]`` broadcast over the batch left it for ``vmap(grad)``, "examples
    interact" at 'pos': an example alone kept its ids ``[T]`` where the batch gave them a row per example."""
    torch.manual_seed(0)
    model = UnbatchedPositions().double().eval()
    tokens, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (tokens, y), (tokens[:3], y[:3]))
    plan = _plan(model, (tokens, y))
    assert plan.batched and not plan.dense, plan.batching

class FoldedEmbeddings(nn.Module):
    """Token rows plus position rows ``[1, T]`` broadcast over the batch (an Embedding lookup and a parameter), times
    a scale used elementwise."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(10, 4), nn.Embedding(6, 4)
        self.shift, self.scale = nn.Parameter(torch.randn(1, 6, 4)), nn.Parameter(torch.randn(4))
        self.register_buffer("ids", torch.arange(6)[None], persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        return torch.tanh(self.tok(tokens) + self.pos(self.ids[:, :t]) + self.shift[:, :t]) * self.scale


class FoldedChoices(nn.Module):
    """Multiple choice as Hugging Face runs it: ``[B, C, T]`` tokens folded into the batch (``[B C, T]``), one score
    per choice unfolded into ``[B, C]`` logits; ``mix`` centres every row over the folded batch."""

    def __init__(self, mix=False):
        super().__init__()
        self.embeddings, self.fc, self.mix = FoldedEmbeddings(), nn.Linear(4, 1), mix

    def forward(self, tokens):
        b, c, t = tokens.shape
        h = self.embeddings(tokens.view(b * c, t))
        return self.fc((h - h.mean(0) if self.mix else h).mean(1)).view(b, c)


@pytest.mark.parametrize("mix", [False, True], ids=["folded", "mixed-over-the-folded-batch"])
def test_rows_broadcast_over_a_folded_batch_are_batched(mix):
    """Each broadcast row (lookup, parameter) gets a row per row of the folded batch, summed per example: exact
    and batched (multiple choice ran through the per-example loop); examples mixing over that batch refused."""
    torch.manual_seed(0)
    model = FoldedChoices(mix).double().eval()
    tokens, y = torch.randint(0, 10, (8, 3, 5)), torch.randint(0, 3, (8,))
    train, test = (tokens, y), (tokens[:3], y[:3])
    _assert_paths_agree(model, train, test)
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    for batch_size in (None, 3):  # one batch, and batches of 3, 3, 2
        got = tc.influence(model, ckpts, train, test, loss_fn=CE, batch_size=batch_size)
        assert_close(got, ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, batch_size=batch_size), ref.self_influence)
    plan = _plan(model, train)
    assert plan.fold == 3 and plan.batched is not mix
    if mix:
        assert "changed the first examples' factors" in plan.batching
    else:
        assert not plan.dense and plan.route("embeddings.shift") == plan.route("embeddings.scale") == "materialised"


class Chunked(nn.Module):
    """A long-document classifier: ``[B, L]`` tokens cut into chunks of 4 folded into the batch (``[B L / 4, 4]``), a
    ``[1, 4]`` position row broadcast over them, a scale used elementwise, the chunks summed per document."""

    def __init__(self):
        super().__init__()
        self.embeddings, self.fc = FoldedEmbeddings(), nn.Linear(4, 3)

    def forward(self, tokens):
        return self.fc(self.embeddings(tokens.reshape(-1, 4)).reshape(tokens.shape[0], -1, 4).sum(1))


def test_a_batch_folding_another_number_of_items_is_exact_or_refused():
    """Planned on documents of 3 chunks: a last batch of one document of 1 chunk is exact (its broadcast rows got 3
    copies: 2x the reference, silently); a batch of documents of 2 chunks is refused with the fix (a raw error)."""
    torch.manual_seed(0)
    model = Chunked().double().eval()
    ckpts, g = _ckpts(model), torch.Generator().manual_seed(1)

    def docs(n, chunks):
        return torch.randint(0, 10, (n, 4 * chunks), generator=g), torch.randint(0, 3, (n,), generator=g)

    test = docs(3, 3)
    train = [docs(4, 3), docs(1, 1)]
    refs = [reference_scores(model, ckpts, b, test, loss_fn=CE) for b in train]
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), torch.cat([r.influence for r in refs], 1))
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), torch.cat([r.self_influence for r in refs]))
    assert _plan(model, test).fold == 3
    with pytest.raises(ValueError, match="folds 3 items .* this batch of 3 folds 2 per example.*factored=False"):
        tc.influence(model, ckpts, [docs(4, 3), docs(3, 2)], test, loss_fn=CE)


class ContextAndChoices(nn.Module):
    """A context ``[B, T]`` with a ``[1, T]`` position row, and choices ``[B, C, T]`` folded into the batch through a
    Linear: the row meets the unfolded context."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.proj = nn.Embedding(10, 4), nn.Embedding(5, 4), nn.Linear(4, 4)
        self.register_buffer("ids", torch.arange(5)[None], persistent=False)

    def forward(self, x):  # [B, 1 + C, T]: the context, then the choices
        b, c = x.shape[0], x.shape[1] - 1
        context = torch.tanh(self.tok(x[:, 0]) + self.pos(self.ids)).mean(1)
        choices = self.proj(self.tok(x[:, 1:].reshape(b * c, -1))).mean(1).view(b, c, 4)
        return (choices * context[:, None]).sum(-1)


def test_a_row_broadcast_over_an_unfolded_part_stays_batched():
    """The choices fold (3 rows per example) but the position row meets the context (1): planning retries unfolded."""
    torch.manual_seed(0)
    model = ContextAndChoices().double().eval()
    x, y = torch.randint(0, 10, (8, 4, 5)), torch.randint(0, 3, (8,))
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE)
    assert_close(tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE), ref.influence)
    plan = _plan(model, (x, y))
    assert plan.batched and plan.fold == 1


class RelativeBias(nn.Module):
    """T5's relative position bias: an Embedding looked up on ``[T, T]`` offsets (no batch dimension), added to every
    example's scores."""

    def __init__(self):
        super().__init__()
        self.tok, self.rel, self.fc = nn.Embedding(10, 4), nn.Embedding(9, 1), nn.Linear(4, 3)

    def forward(self, tokens):
        t = torch.arange(tokens.shape[1])
        scores = torch.softmax(self.rel(t[:, None] - t[None] + 4)[..., 0], -1)  # [T, T]
        return self.fc(torch.tanh(scores @ self.tok(tokens)).mean(1))


def test_a_layer_run_once_for_the_whole_batch_is_followed_to_the_batch():
    """Its output, followed through a softmax to the matrix product where it meets each example's rows, gets a probe
    per example there: batched and exact (it took vmap(grad); T5's bias, with transformers' masks, took the loop)."""
    torch.manual_seed(0)
    model = RelativeBias().double().eval()
    tokens, y = torch.randint(0, 10, (8, 4)), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (tokens, y), (tokens[:3], y[:3]))
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, (tokens, y), (tokens[:3], y[:3]), loss_fn=CE)
    train, test = (tokens, y), (tokens[:3], y[:3])
    for bs in (None, 3):
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, batch_size=bs), ref.influence)
        assert_close(tc.self_influence(model, ckpts, (tokens, y), loss_fn=CE, batch_size=bs), ref.self_influence)
    plan = _plan(model, (tokens, y))
    assert plan.batched and plan.batch_free == {"rel"}


class HeadsBias(nn.Module):
    """One relative bias expanded over 2 heads by the model (``bias.expand(H, T, T)``), added to ``[B, H, T, T]``
    attention scores: a copy along the first dimension that is not the batch's."""

    def __init__(self):
        super().__init__()
        self.tok, self.rel, self.fc = nn.Embedding(10, 4), nn.Embedding(9, 1), nn.Linear(4, 3)
        self.q, self.k = nn.Linear(4, 8), nn.Linear(4, 8)

    def forward(self, tokens):
        b, t = tokens.shape
        offsets = torch.arange(t)
        bias = self.rel(offsets[:, None] - offsets[None] + 4).permute(2, 0, 1).expand(2, t, t)
        x = self.tok(tokens)
        q, k = (proj(x).view(b, t, 2, 4).transpose(1, 2) for proj in (self.q, self.k))
        attention = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
        return self.fc(torch.tanh(attention @ x[:, None]).mean((1, 2)))


def test_a_followed_output_copied_over_heads_is_not_taken_for_the_batch():
    """A batch of 2 examples meets the bias copied over 2 heads: each head's gradient was credited to an example
    (36% off, silently; planned on 3 test examples, where 2 heads are no copy over the batch); and compiled."""
    torch.manual_seed(0)
    model = HeadsBias().double().eval()
    tokens, y = torch.randint(0, 10, (10, 4)), torch.randint(0, 3, (10,))
    train, test, ckpts = (tokens, y), (tokens[:3], y[:3]), _ckpts(model)
    for params in (["rel.weight"], None):
        ref = reference_scores(model, ckpts, train, test, loss_fn=CE, params=params)
        opts = dict(loss_fn=CE, batch_size=4, params=params)
        assert_close(tc.influence(model, ckpts, train, test, **opts), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, **opts), ref.self_influence)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, compile=True), ref.influence)
    assert _plan(model, train).batch_free == {"rel"}


class RelativeBiasLeaking(RelativeBias):
    """``scaled``: the bias's mean scaled by a statistic of the whole batch reaches every logit; ``gather``: each
    example's rows are picked from it by the example's tokens."""

    def __init__(self, way):
        super().__init__()
        self.way = way

    def forward(self, tokens):
        t = torch.arange(tokens.shape[1])
        bias = self.rel(t[:, None] - t[None] + 4)[..., 0]  # [T, T]
        if self.way == "gather":
            return self.fc(torch.tanh(bias[tokens % 4] + self.tok(tokens)[..., :1]).mean(1)[:, :4].expand(-1, 4))
        out = super().forward(tokens)
        return out + bias.mean() * tokens.double().mean()


@pytest.mark.parametrize("way", ["scaled", "gather"])
def test_a_layer_run_once_for_the_whole_batch_met_otherwise_is_refused(way):
    torch.manual_seed(0)
    model = RelativeBiasLeaking(way).double().eval()
    tokens, y = torch.randint(0, 10, (8, 4)), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (tokens, y), (tokens[:3], y[:3]))
    assert not _plan(model, (tokens, y)).batched


class CopiedBias(nn.Module):
    """MPNet's relative bias: ``[1, H, T, T]`` copied over the batch by the model (``expand(B, ...).contiguous()``)
    before it meets the scores; ``scaled``: the copy then scaled in place (its rows still equal, no longer the row
    copied); ``source``: the row copied then scaled in place (the copy keeps the old values; the output's gradient
    then reaches the loss other than through its meetings: refused, vmap(grad))."""

    def __init__(self, way):
        super().__init__()
        self.way = way
        self.tok, self.rel, self.fc = nn.Embedding(10, 8), nn.Embedding(9, 2), nn.Linear(8, 3)
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, tokens):
        b, t = tokens.shape
        offsets = torch.arange(t)
        row = self.rel(offsets[:, None] - offsets[None] + 4).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]
        bias = row.expand(b, -1, t, t).contiguous()
        if self.way == "scaled":
            bias.mul_(2.0)
        elif self.way == "source":
            row.mul_(2.0)
        x = self.tok(tokens)
        q, k = (proj(x).view(b, t, 2, 4).transpose(1, 2) for proj in (self.q, self.k))
        attention = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
        return self.fc(torch.tanh(attention @ x[:, None]).mean((1, 2)))


@pytest.mark.parametrize("way", ["copy", "scaled", "source"])
def test_a_followed_output_copied_over_the_batch_is_read_through_its_row(way):
    """The copy's per-example gradients are taken at the row it was made from (through the copy, each example's
    backward formed a ``[B, *shape]`` tensor: MPNet 1.36 s against 0.31 s now, 100 x 3), unless either changed in
    place since, where the copy's own first row is read: exact either way."""
    torch.manual_seed(0)
    model = CopiedBias(way).double().eval()
    tokens, y = torch.randint(0, 10, (10, 4)), torch.randint(0, 3, (10,))
    train, test, ckpts = (tokens, y), (tokens[:3], y[:3]), _ckpts(model)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, batch_size=4), ref.influence)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
    assert _plan(model, train).batch_free == (frozenset() if way == "source" else {"rel"})


class MaskedRelativeBias(nn.Module):
    """T5's attention as transformers runs it with SDPA (its default): a relative bias ``[1, H, T, T]`` from an
    Embedding run once for the whole batch, selected by the batch's padding mask (``where``: ``torch.where(mask,
    bias, min)``; ``masked_fill``: the same by ``masked_fill``; ``plain``: no mask) and given to
    ``scaled_dot_product_attention`` as its additive ``attn_mask``; ``condition``: the bias also decides which scores
    count (``torch.where(bias > 0, scores, 0)``), a meeting whose condition is the followed output."""

    def __init__(self, way):
        super().__init__()
        self.way = way
        self.tok, self.rel, self.fc = nn.Embedding(10, 8), nn.Embedding(9, 2), nn.Linear(8, 3)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, tokens, mask):
        b, t = tokens.shape
        offsets = torch.arange(t)
        bias = self.rel(offsets[:, None] - offsets[None] + 4).permute(2, 0, 1)[None]  # [1, H, T, T]
        x = self.tok(tokens)
        q, k, v = (proj(x).view(b, t, 2, 4).transpose(1, 2) for proj in (self.q, self.k, self.v))
        keep = mask[:, None, None, :].bool()
        if self.way == "condition":
            scores = torch.where(bias > 0, q @ k.transpose(-1, -2) + bias, 0.0)
            out = torch.softmax(scores.masked_fill(~keep, -1e9), -1) @ v
        else:
            least = torch.finfo(bias.dtype).min
            attn_mask = {"where": lambda: torch.where(keep, bias, least), "masked_fill": lambda: bias.masked_fill(
                ~keep, least), "plain": lambda: bias}[self.way]()  # fmt: skip
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.fc(torch.tanh(out.transpose(1, 2).reshape(b, t, 8)).mean(1))


def _padded_tokens(n, t=5):
    g = torch.Generator().manual_seed(2)
    mask = (torch.arange(t) < torch.randint(2, t + 1, (n, 1), generator=g)).long()
    return torch.randint(1, 10, (n, t), generator=g) * mask, mask, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("way", ["where", "masked_fill", "plain"])
def test_a_relative_bias_selected_by_the_padding_mask_into_sdpa_is_followed(way):
    """Transformers' SDPA path gives T5's bias to ``scaled_dot_product_attention`` through ``torch.where`` over the
    padding mask: both meetings were refused, and T5 (built with its default attention) left the batched path for
    vmap, which fails on it: one example at a time. Followed, it is batched and exact."""
    torch.manual_seed(0)
    model = MaskedRelativeBias(way).double().eval()
    tokens, mask, y = _padded_tokens(10)
    train, test = (tokens, mask, y), (tokens[:3], mask[:3], y[:3])
    _assert_paths_agree(model, train, test)
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, batch_size=4), ref.self_influence)
    plan = _plan(model, train)
    assert plan.batched and plan.batch_free == {"rel"}


def test_a_followed_output_deciding_a_selection_is_refused():
    """``torch.where(bias > 0, scores, 0)``: the followed output is the condition, which has no gradient to probe."""
    torch.manual_seed(0)
    model = MaskedRelativeBias("condition").double().eval()
    tokens, mask, y = _padded_tokens(10)
    explained = _exact_and_explained(model, (tokens, mask, y), (tokens[:3], mask[:3], y[:3]))
    assert "meets the batch in where" in explained.batching, explained.batching


class DirectlyRead(nn.Module):
    """Attention with parameters read directly, outside any layer, as Swin's and BEiT's relative position bias reads
    its table: a table indexed by a buffer of offsets into a ``[H, T, T]`` bias added to every example's scores, a
    position table sliced to the length, a vector scaling the pooled features; ``way="helper"``: padding (id 0)
    masked only when the batch has some, as transformers' mask helpers decide (``bool(mask.all())``: vmap fails)."""

    def __init__(self, way="added", d=8, t=5, heads=2):
        super().__init__()
        self.way, self.heads = way, heads
        self.tok, self.qkv, self.fc = nn.Embedding(10, d), nn.Linear(d, 3 * d), nn.Linear(d, 3)
        self.table = nn.Parameter(0.3 * torch.randn(2 * t - 1, heads))
        self.pos = nn.Parameter(0.3 * torch.randn(t + 2, d))
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.register_buffer("offsets", torch.arange(t)[:, None] - torch.arange(t)[None] + t - 1)

    def forward(self, tokens):
        b, t = tokens.shape
        x = self.tok(tokens) + self.pos[:t]
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.table[self.offsets[:t, :t]].permute(2, 0, 1)  # [H, T, T]
        scores, keep = q @ k.transpose(-1, -2) + bias, (tokens != 0)[:, None, None, :]
        if self.way == "helper" and not bool(keep.all()):
            scores = scores.masked_fill(~keep, -1e9)
        out = torch.softmax(scores, -1) @ v
        h = torch.tanh(out.transpose(1, 2).reshape(b, t, -1))
        return self.fc((h * self.scale).mean(1))


def test_parameters_read_directly_are_followed_to_the_batch():
    """A parameter outside every layer (a relative-position table, a sliced position table, a scale vector) sent the
    whole call to vmap(grad). Its uses are now followed to where they meet the batch, as a layer's output run once
    for the whole batch is: the call stays batched, exact on every path and with a test batch of its own shape."""
    torch.manual_seed(0)
    model = DirectlyRead().double().eval()
    tokens, y = torch.randint(0, 10, (10, 5)), torch.randint(0, 3, (10,))
    train, test = (tokens, y), (tokens[:3, :4], y[:3])
    _assert_paths_agree(model, train, test)
    explained = _exact_and_explained(model, train, test)
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
    routes = {r.parameter: (r.route, r.reason) for r in explained.routes}
    followed = ("materialised", plan_module._followed_reason("DirectlyRead has no factored form"))
    assert all(routes[n] == followed for n in ("table", "pos", "scale")), routes
    ref = reference_scores(model, _ckpts(model), train, test, loss_fn=CE)
    assert_close(tc.influence(model, _ckpts(model), train, test, loss_fn=CE, compile=True), ref.influence)


def test_a_parameter_read_directly_keeps_a_model_vmap_cannot_run_off_the_loop():
    """With a parameter outside every layer, a model whose forward branches on the data (transformers' mask helpers)
    took the per-example loop: vmap(grad) cannot run it. Followed, the call is batched and exact (a model of this kind,
    d = 64, T = 32, 200 x 20, 3 checkpoints: influence 1.34 s -> 0.22 s, `benchmarks/bench_followed.py`)."""
    torch.manual_seed(0)
    model = DirectlyRead("helper").double().eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 10, (10, 5), generator=g) * (torch.arange(5) < torch.randint(2, 6, (10, 1), generator=g))
    y = torch.randint(0, 3, (10,), generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "torch.func.vmap failed on this model")
        explained = _exact_and_explained(model, (tokens, y), (tokens[:3], y[:3]))
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching


class OwnVectors(nn.Module):
    """A model's own vectors applied to its hidden states ``[B, T, d]`` while its output is ``[B, classes]``: copies
    expanded to the output's rank (``[B, d]``) meet the hidden states misaligned (``way="added"``), and so do copies
    added in place (``"in_place"``); ``"condition"``: a vector also decides a ``torch.where`` (its sign)."""

    def __init__(self, way):
        super().__init__()
        self.way, self.emb, self.fc = way, nn.Embedding(10, 6), nn.Linear(6, 3)
        self.bias, self.gate = nn.Parameter(0.3 * torch.randn(6)), nn.Parameter(torch.randn(6))

    def forward(self, ids):
        x = self.emb(ids)
        if self.way == "in_place":
            x = x.clone().add_(2 * self.bias) * self.gate
        elif self.way == "condition":
            x = torch.where(self.gate > 0, x, -x) + self.bias
        else:
            x = torch.tanh(x + self.bias) * self.gate + self.bias.square()
        return self.fc(x.mean(1))


@pytest.mark.parametrize("way", ["added", "in_place", "condition"])
def test_vectors_whose_copies_do_not_fit_are_followed_instead(way):
    """Copies of a layer's vectors are planned at its output's rank; where the batching check refuses them, the
    vectors are followed instead (before: vmap(grad) for the whole call). A vector deciding a selection is refused
    again and stays on vmap(grad), with the copies' reason."""
    torch.manual_seed(0)
    model = OwnVectors(way).double().eval()
    tokens, y = torch.randint(0, 10, (8, 4)), torch.randint(0, 3, (8,))
    explained = _exact_and_explained(model, (tokens, y), (tokens[:3], y[:3]))
    routes = {r.parameter: (r.route, r.reason) for r in explained.routes}
    if way == "condition":
        assert "a batched forward changed the first examples' factors at ''" in explained.batching, explained.batching
        assert routes["gate"][0] == "vmap", routes
    else:
        assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
        assert routes["bias"][0] == routes["gate"][0] == "materialised", routes
        assert routes["bias"][1].startswith("followed: used outside a factor site's call ("), routes


class RawWeights(nn.Module):
    """Weights held as raw parameters and multiplied with the batch by the model itself, as research code and
    Falcon's ``FalconLinear`` (``input @ self.weight.T + self.bias``) do: ``way`` is how the first weight ``[5, 6]``
    meets the embeddings ``[B, T, 6]`` ("transposed": Falcon's; "linear": a hand-written ``F.linear``; "left":
    ``w @ x^T``; "derived": a weight computed from it, ``2 w``; "diagonal": the earlier ``x @ diag(scale)``;
    "einsum": ``einsum("btd,ed->bte")``). Then a weight with a dimension of heads ``[2, 5, 4]`` broadcast over
    ``[B, 1, T, 5]`` rows (an einsum's ``"bte,hef->bthf"`` in "einsum"), and one ``[3, 8]`` times
    the pooled ``[B, 8]`` ("mm": by ``torch.mm``; "columns": as ``(out @ z^T)^T``, the batch's rows its columns,
    refused)."""

    def __init__(self, way):
        super().__init__()
        self.way, self.tok = way, nn.Embedding(10, 6)
        self.w, self.b = nn.Parameter(0.4 * torch.randn(5, 6)), nn.Parameter(0.1 * torch.randn(5))
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(6))
        self.heads, self.out = nn.Parameter(0.4 * torch.randn(2, 5, 4)), nn.Parameter(0.4 * torch.randn(3, 8))

    def forward(self, ids):
        x = self.tok(ids) @ torch.diag(self.scale) if self.way == "diagonal" else self.tok(ids)
        if self.way == "linear":
            h = F.linear(x, self.w, self.b)
        elif self.way == "left":
            h = (self.w @ x.transpose(1, 2)).transpose(1, 2) + self.b
        elif self.way == "derived":
            h = x @ (2 * self.w).T + self.b
        elif self.way == "einsum":
            h = torch.einsum("btd,ed->bte", x, self.w) + self.b
        else:
            h = x @ self.w.T + self.b
        if self.way == "einsum":
            z = torch.einsum("bte,hef->bthf", torch.tanh(h), self.heads).flatten(2).mean(1)
        else:
            z = (torch.tanh(h)[:, None] @ self.heads).transpose(1, 2).flatten(2).mean(1)  # [B, 8]
        if self.way == "mm":
            return torch.mm(z, self.out.t())
        return (self.out @ z.T).T if self.way == "columns" else z @ self.out.T


@pytest.mark.parametrize("way", ["transposed", "linear", "left", "derived", "diagonal", "mm", "einsum", "columns"])
def test_weights_multiplied_with_the_batch_are_followed_to_their_products(way):
    """A parameter meeting the batch as a weight in a matrix product was refused (a copy per example would make the
    product a batched one, slower than vmap(grad)), and the call took vmap(grad); Falcon's every projection did. Now
    the product's rows give each example's gradient (``x^T g``, as a Linear's): batched and exact on every path. A
    product with the batch's rows as its columns is refused, named, and takes vmap(grad)."""
    torch.manual_seed(0)
    model = RawWeights(way).double().eval()
    tokens, y = torch.randint(0, 10, (10, 5)), torch.randint(0, 3, (10,))
    train, test = (tokens, y), (tokens[:3, :4], y[:3])
    explained = _exact_and_explained(model, train, test)
    routes = {r.parameter: (r.route, r.reason) for r in explained.routes}
    if way == "columns":
        assert "parameter 'out', computed once for the whole batch, meets the batch in matmul" in explained.batching
        assert routes["w"][0] == "vmap", routes
        return
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
    raw = ("w", "b", "heads", "out", *(["scale"] if way == "diagonal" else []))
    assert all(routes[n] == ("materialised", plan_module._followed_reason("RawWeights has no factored form"))
               for n in raw), routes  # fmt: skip
    _assert_paths_agree(model, train, test)
    if way == "transposed":
        ref = reference_scores(model, _ckpts(model), train, test, loss_fn=CE)
        assert_close(tc.influence(model, _ckpts(model), train, test, loss_fn=CE, compile=True), ref.influence)


class SpectralMixing(nn.Module):
    """A Fourier neural operator's spectral layer in miniature: real parameters viewed as complex weights (``way``:
    ``torch.view_as_complex`` of a ``[.., 2]`` tensor, ``torch.complex`` of two, its conjugate, the weight on the
    left) multiplied with the batch's Fourier modes, then back to real values."""

    def __init__(self, way):
        super().__init__()
        self.way, self.lift = way, nn.Linear(2, 4)
        self.w = nn.Parameter(0.4 * torch.randn(4, 4, 3, 2))
        self.w_imag, self.head = nn.Parameter(0.4 * torch.randn(4, 4, 3)), nn.Linear(4, 3)

    def forward(self, u):  # [B, T, 2]
        modes = torch.fft.rfft(self.lift(u), dim=1)[:, :3]  # [B, 3, 4]
        w = torch.view_as_complex(self.w)  # [4, 4, 3]
        if self.way == "complex":
            w = torch.complex(self.w[..., 0], self.w_imag)
        mixed = {
            "einsum": lambda: torch.einsum("bmi,iom->bmo", modes, w),
            "conj": lambda: modes[:, :, None] @ w.conj().permute(2, 0, 1),
            "left": lambda: (w.permute(2, 1, 0) @ modes[..., None]).squeeze(-1),
        }.get(self.way, lambda: (modes[:, :, None] @ w.permute(2, 0, 1)).squeeze(2))()
        h = torch.fft.irfft(mixed.reshape(u.shape[0], 3, 4), n=u.shape[1], dim=1)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("way", ["matmul", "einsum", "complex", "conj", "left"])
def test_real_weights_in_complex_products_are_followed_exactly(way):
    """A real parameter viewed as complex and multiplied with the batch's complex Fourier modes (an FNO's spectral
    weights) was followed with each example's gradient ``x^T g``: the gradient of a complex product is the
    conjugate's, ``x^H g``, so every mode but the real DC one was wrong (influence 46% off, self-influence exact: each
    wrong gradient had the right norm; a review helper's FNO)."""
    torch.manual_seed(0)
    model = SpectralMixing(way).double().eval()
    u, y = torch.randn(8, 8, 2), torch.randint(0, 3, (8,))
    train, test = (u, y), (u[:3], y[:3])
    routes = {r.parameter: r.route for r in _exact_and_explained(model, train, test).routes}
    assert routes["w"] == "materialised", routes
    _assert_paths_agree(model, train, test)


class PositionProjections(nn.Module):
    """DeBERTa's disentangled attention in miniature: a table of position embeddings ``[P, 8]`` read directly,
    normalised, projected and split into heads ``[H, P, 4]``, tiled over the batch by the model (``.repeat(B, 1,
    1)``, as DeBERTa's ``[B H, P, 4]``) and multiplied with each example's queries and keys (``bmm``). ``way``:
    "shared" projects the positions with the tokens' own query and key layers (DeBERTa-v3's ``share_att_key``),
    "own" with layers of their own, both tiling the heads then transposing them (a copy kept by the transpose);
    "tiled_late" shares the layers and transposes the heads, then tiles them; "head_major" lays the tokens' heads out
    head-major (``[H B, T, 4]``) and still tiles the positions' ``B`` times, so that each row of the batch meets the
    positions' head of its row's parity, a block per two rows that are no example's own."""

    def __init__(self, way):
        super().__init__()
        self.way, self.tok, self.fc = way, nn.Embedding(10, 8), nn.Linear(8, 3)
        self.table, self.norm = nn.Parameter(torch.randn(4, 8)), nn.LayerNorm(8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.pq, self.pk = (self.q, self.k) if way != "own" else (nn.Linear(8, 8), nn.Linear(8, 8))

    def forward(self, tokens):
        b, t = tokens.shape
        x = self.tok(tokens)

        def heads(y, major=False):  # [b, rows, 8] -> [b 2, rows, 4] (major: [2 b, rows, 4])
            y = y.view(y.shape[0], y.shape[1], 2, 4)
            return (y.permute(2, 0, 1, 3) if major else y.transpose(1, 2)).reshape(-1, y.shape[1], 4)

        major = self.way == "head_major"
        q, k, v = (heads(proj(x), major) for proj in (self.q, self.k, self.v))
        positions = self.norm(self.table)[None]  # [1, P, 8]
        pos_q, pos_k = heads(self.pq(positions)), heads(self.pk(positions))  # [2, P, 4]
        if self.way == "tiled_late":
            c2p = torch.bmm(q, pos_k.transpose(1, 2).repeat(b, 1, 1))
        else:
            c2p = torch.bmm(q, pos_k.repeat(b, 1, 1).transpose(1, 2))
        p2c = torch.bmm(k, pos_q.repeat(b, 1, 1).transpose(-1, -2)).transpose(1, 2)
        scores = torch.bmm(q, k.transpose(1, 2)) + c2p[..., :t] + p2c[:, :t]
        out = torch.bmm(torch.softmax(scores, -1), v)
        out = (out.view(2, b, t, 4).permute(1, 2, 0, 3) if major else out.view(b, 2, t, 4).transpose(1, 2))
        out = out.reshape(b, t, 8)
        return self.fc(torch.tanh(out).mean(1))


@pytest.mark.parametrize("way", ["shared", "own", "tiled_late", "head_major"])
def test_positions_projected_once_and_tiled_over_the_batch_are_followed(way):
    """DeBERTa with relative attention (v2, and v3: its projections shared with the tokens) took vmap(grad): the
    normalised table, fed to a LayerNorm ``[P, d]``, looked like rows of several examples merged, and the heads tiled
    by ``repeat`` met the batch in ``bmm`` with rows of their own. Now a layer fed tensors computed once for the whole
    batch runs once for it (its output followed, also where the same layer runs on the batch too), and a block tiled
    over the batch meets each example's rows through its block: batched, exact on every path. Blocks that are no
    example's own (head-major rows) would credit one example's gradient to another: refused by the batching check."""
    torch.manual_seed(0)
    model = PositionProjections(way).double().eval()
    tokens, y = torch.randint(0, 10, (10, 4)), torch.randint(0, 3, (10,))
    train, test = (tokens, y), (tokens[:3], y[:3])
    explained = _exact_and_explained(model, train, test)
    if way == "head_major":  # (the first examples' factors, alone and together, differ: refused)
        assert explained.batching.startswith("vmap(grad) over examples: a batched forward changed the first examples'")
        sited = [r for r in explained.routes if r.route in ("factored", "materialised")]  # (their factors by vmap too)
        assert sited and all(r.reason.endswith("; its factors by vmap(grad) over examples") for r in sited), sited
        return
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
    assert all(r.route in ("factored", "materialised") for r in explained.routes), explained.routes
    _assert_paths_agree(model, train, test)
    if way == "shared":
        ref = reference_scores(model, _ckpts(model), train, test, loss_fn=CE)
        assert_close(tc.influence(model, _ckpts(model), train, test, loss_fn=CE, compile=True), ref.influence)


class WindowMask(nn.Module):
    """Swin's shifted windows in miniature: each example's 8 tokens in 2 windows (``[B 2, 4, 8]``), a relative bias
    ``[1, H, 4, 4]`` read from a table directly, plus a mask per window ``[2, 4, 4]`` (a constant) tiled per example
    by the model (``expand`` then ``reshape``), added to each window's scores. ``way``: "tiled" that; "varying": a
    mask of each window's own, not tiled per example (the bias then has rows of its own: refused, vmap(grad))."""

    def __init__(self, way):
        super().__init__()
        self.way, self.tok, self.fc = way, nn.Embedding(10, 8), nn.Linear(8, 3)
        self.table, self.q, self.k = nn.Parameter(0.5 * torch.randn(7, 2)), nn.Linear(8, 8), nn.Linear(8, 8)
        offsets = torch.arange(4)
        self.register_buffer("index", (offsets[:, None] - offsets[None] + 3).flatten(), persistent=False)

    def forward(self, tokens):
        b = tokens.shape[0]
        x = self.tok(tokens).view(b * 2, 4, 8)  # windows
        q, k = (proj(x).view(b * 2, 4, 2, 4).transpose(1, 2) for proj in (self.q, self.k))
        bias = self.table[self.index].view(4, 4, 2).permute(2, 0, 1)[None]  # [1, H, 4, 4]
        if self.way == "varying":
            mask = -torch.arange(b * 2.0, dtype=x.dtype)[:, None, None, None].expand(-1, 1, 4, 4)
        else:
            window = torch.tensor([0.0, -3.0], dtype=x.dtype)[:, None, None].expand(2, 4, 4) * torch.eye(4)
            mask = window[:, None][None].expand(b, -1, -1, -1, -1).reshape(-1, 1, 4, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) + (bias + mask), -1)
        return self.fc(torch.tanh(attention @ q).mean((1, 2)).view(b, 2, 4).flatten(1))


@pytest.mark.parametrize("way", ["tiled", "varying"])
def test_a_constant_tiled_per_example_keeps_a_followed_bias_batched(way):
    """The bias plus the mask tiled per example had rows of its own (``[B 2, H, 4, 4]``): refused, vmap(grad). Now
    its block per example (the bias plus one example's masks) meets each example's windows: batched and exact. A mask
    whose tiles differ is no such copy: still refused, and exact by vmap(grad)."""
    torch.manual_seed(0)
    model = WindowMask(way).double().eval()
    tokens, y = torch.randint(0, 10, (10, 8)), torch.randint(0, 3, (10,))
    train, test = (tokens, y), (tokens[:3], y[:3])
    explained = _exact_and_explained(model, train, test)
    if way == "varying":
        assert "parameter 'table', computed once for the whole batch, meets the batch with rows of its own" in (
            explained.batching
        ), explained.batching
        return
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
    _assert_paths_agree(model, train, test)


def test_a_parameter_read_directly_and_tied_leaves_every_one_to_vmap():
    """A tensor under two names (tied) is not followed: the followed copy would stand for one of them. Then the call
    takes vmap(grad), and the others are not followed either (for nothing): no followed site reaches vmap(grad)."""
    torch.manual_seed(0)
    model = DirectlyRead().double().eval()
    model.holder = nn.Module()
    model.holder.scale = model.scale  # (the same parameter, in a module the forward never calls)
    tokens, y = torch.randint(0, 10, (10, 5)), torch.randint(0, 3, (10,))
    explained = _exact_and_explained(model, (tokens, y), (tokens[:3], y[:3]))
    routes = {r.parameter: r.route for r in explained.routes}
    assert explained.batching.startswith("vmap(grad) over examples, for ") and routes["table"] == "vmap", routes
    plan = _plan(model, (tokens, y))
    assert not plan.batched and all(s.kind != "followed" for s in plan.sites), plan.sites


class LowRankDelta(nn.Module):
    """A parametrization with parameters of its own: the weight plus ``a @ b`` (a LoRA registered as a
    parametrization)."""

    def __init__(self, rows, cols):
        super().__init__()
        self.a, self.b = nn.Parameter(0.3 * torch.randn(rows, 2)), nn.Parameter(0.3 * torch.randn(2, cols))

    def forward(self, w):
        return w + self.a @ self.b


class ParametrizedWeights(nn.Module):
    """wav2vec2's positional convolution (a grouped Conv1d under ``weight_norm`` over dim 2), a Linear under
    ``spectral_norm`` (eval mode: its power iteration's vectors fixed buffers) and one under a parametrization with
    parameters of its own."""

    def __init__(self):
        super().__init__()
        P = nn.utils.parametrizations
        self.conv = P.weight_norm(nn.Conv1d(4, 4, 3, padding=1, groups=2), dim=2)
        self.fc1 = P.spectral_norm(nn.Linear(12, 6))
        self.fc2 = nn.Linear(6, 3)
        nn.utils.parametrize.register_parametrization(self.fc2, "weight", LowRankDelta(3, 6))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


class _FromBasis(nn.Module):
    """A steerable layer's weight: a learned combination of fixed basis tensors, whatever the weight it replaces."""

    def __init__(self, shape, k=3):
        super().__init__()
        self.c = nn.Parameter(torch.randn(k))
        self.register_buffer("basis", torch.randn(k, *shape))

    def forward(self, _):
        return torch.einsum("k,k...->...", self.c, self.basis)


def test_a_parametrization_not_reading_its_original_gives_it_zero_gradients():
    """A weight computed from a basis alone (a steerable layer) leaves the parametrization's `original` unread: the
    vector-Jacobian product raised autograd's "appears to not have been used in the graph" (a review helper's). Its
    gradients are zero; exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    nn.utils.parametrize.register_parametrization(model[0], "weight", _FromBasis((5, 4)).double(), unsafe=True)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    _exact_and_explained(model, (x, y), (x[:2], y[:2]))


def test_parametrized_weights_are_factor_sites():
    """Each example's gradient of the weight a parametrization computes follows from the layer's factors, and of the
    parametrization's tensors by its vector-Jacobian product: one batched pass (every such layer took vmap(grad) for
    the whole model; wav2vec2 1.8-2.0x the floor so, 1.4x now), exact, on every path, for a selection of
    the parametrization's tensors, compiled, and as the last layer (``method="last_layer"`` scored its bias alone)."""
    torch.manual_seed(0)
    model = ParametrizedWeights().double().eval()
    x, y = torch.randn(10, 4, 3, dtype=torch.float64), torch.randint(0, 3, (10,))
    train, test = (x, y), (x[:3], y[:3])
    _assert_paths_agree(model, train, test)
    ckpts = _ckpts(model)
    for params in (None, lambda name: "original1" in name or name.endswith(".b") or "bias" in name):
        ref = reference_scores(model, ckpts, train, test, loss_fn=CE, params=params)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, params=params), ref.influence)
        got = tc.self_influence(model, ckpts, train, loss_fn=CE, batch_size=4, params=params)
        assert_close(got, ref.self_influence)
        compiled = tc.influence(model, ckpts, train, test, loss_fn=CE, compile=True, params=params)  # (eager VJP)
        assert_close(compiled, ref.influence)
    last = [f"fc2.parametrizations.weight.{name}" for name in ("original", "0.a", "0.b")] + ["fc2.bias"]
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE, params=last)  # (the bias alone before: 89% off)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, method="last_layer"), ref.influence)
    plan = _plan(model, train)
    assert plan.batched and not plan.dense, plan.batching
    reparam = {s.path: s.reparam for s in plan.sites if s.reparam}
    assert reparam == {
        "conv": ("conv.parametrizations.weight.original0", "conv.parametrizations.weight.original1"),
        "fc1": ("fc1.parametrizations.weight.original",),
        "fc2": ("fc2.parametrizations.weight.original", "fc2.parametrizations.weight.0.a",
                "fc2.parametrizations.weight.0.b"),
    }  # fmt: skip


def test_the_deprecated_weight_norm_hook_names_the_parametrization():
    """``torch.nn.utils.weight_norm`` recomputes the weight in a forward pre-hook: not a site, its tensors followed to
    the batch, and the reason names the parametrization that is followed as a site."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated)
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]), against_loop=False)  # (the loop deep-copies the model: the
    route = tc.explain(model, _ckpts(model), (x, y), loss_fn=CE).routes[0]  # legacy hook's tensors refuse it)
    assert route.parameter == "0.bias" and route.route == "materialised" and route.reason.startswith("followed: ")
    assert "torch.nn.utils.weight_norm's hook" in route.reason and "parametrizations.weight_norm" in route.reason


class _ShiftedByBias(nn.Module):
    """A parametrization reading its layer's own bias (held by reference)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = [layer]  # (a list: no submodule)

    def forward(self, w):
        return w + self.layer[0].bias[:, None]


class _TiedTransposed(nn.Module):
    """A tied autoencoder's decoder weight: the encoder's, transposed (the encoder a submodule of it)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, _):
        return self.encoder.weight.T


class TiedAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(6, 4), nn.Linear(4, 6)
        nn.utils.parametrize.register_parametrization(self.dec, "weight", _TiedTransposed(self.enc), unsafe=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


@pytest.mark.parametrize("reads", ["bias", "tied"])
def test_a_parametrization_reading_other_tensors_is_no_site(reads):
    """Regression (a review helper's trials): a parametrization reading its layer's bias, or holding a layer the model
    calls too (a tied autoencoder's encoder), was taken as computing the weight from its own tensors alone: those
    uses got no gradient (21-50% off, silently). No site then: exact on every path."""
    torch.manual_seed(0)
    if reads == "bias":
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
        nn.utils.parametrize.register_parametrization(model[0], "weight", _ShiftedByBias(model[0]))
    else:
        model = TiedAutoencoder().double().eval()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    assert not any(s.reparam for s in _plan(model, (x, y)).sites)


def test_checkpoints_of_the_deprecated_weight_norm_score_its_parametrization():
    """A checkpoint of `torch.nn.utils.weight_norm` (`weight_g`, `weight_v`) for the same net under
    `parametrizations.weight_norm`, which its loading takes (a compatibility hook), was refused (a review helper's):
    read as `original0` / `original1`, scored as that net's own."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated)
        old = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)).double()
    new = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
    new = new.double().eval()
    saved = [tc.Checkpoint({k: v.detach() + 0.1 * i for k, v in old.state_dict().items()}, 0.1) for i in (1, 2)]
    assert "0.weight_g" in saved[0].params
    as_new = []
    for ckpt in saved:
        new.load_state_dict(ckpt.params)  # (torch's own reading of them)
        as_new.append(tc.Checkpoint({k: v.detach().clone() for k, v in new.state_dict().items()}, ckpt.lr))
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert_close(tc.self_influence(new, saved, (x, y), loss_fn=CE), tc.self_influence(new, as_new, (x, y), loss_fn=CE))
    both = [tc.Checkpoint({**c.params, **a.params}, c.lr) for c, a in zip(saved, as_new)]  # (a sweep: renamed over
    with pytest.raises(ValueError, match=r"unexpected \['0.weight_g', '0.weight_v'\]"):  # the new names, silently)
        tc.self_influence(new, both, (x, y), loss_fn=CE)


class _StackedWith(nn.Module):
    """A parametrization stacking its tensor with another layer's weight (a list argument)."""

    def __init__(self, other):
        super().__init__()
        self.other = [other]

    def forward(self, w):
        return torch.stack([w, self.other[0].weight]).sum(0)


def test_a_parametrization_reading_another_weight_in_a_list_is_no_site():
    """Regression (a sweep): the tensors a parametrization reads were looked for among an op's arguments, not inside
    a list of them (`torch.stack([w, other.weight])`: 11% off, silently)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    nn.utils.parametrize.register_parametrization(model[2], "weight", _StackedWith(model[0]))
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    assert not any(s.reparam for s in _plan(model, (x, y)).sites)


class ScaledBy(nn.Module):
    """A parametrization scaling its tensor by a parameter of its own."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, t):
        return t * self.scale


def test_a_parametrized_bias_is_followed_to_the_batch():
    """Not a site (only a parametrized weight is followed as one): the layer's tensors are followed to the batch
    (vmap(grad) before), the reason kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    nn.utils.parametrize.register_parametrization(model[2], "bias", ScaledBy().double())
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    explained = _exact_and_explained(model, (x, y), (x[:3], y[:3]))
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
    assert "Linear has a parametrized tensor (followed only as the weight alone" in str(explained)


def test_one_parametrization_on_two_layers_is_neither_layers_own():
    """One parametrization module registered on two Linears (one scale for both weights) is listed once by
    ``model.modules()``: the second layer's share of the scale's gradient was dropped (1.7% off), and with the scale
    alone selected autograd's "inputs argument to grad() cannot be empty" was raised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    scale = ScaledBy().double()
    for layer in (model[0], model[2]):
        nn.utils.parametrize.register_parametrization(layer, "weight", scale)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    _exact_and_explained(model, (x, y), (x[:3], y[:3]))
    ckpts, only = _ckpts(model), ["0.parametrizations.weight.0.scale"]
    ref = reference_scores(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE, params=only)
    assert_close(tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE, params=only), ref.influence)
    assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=CE, params=only), ref.self_influence)


class HeadHoldingItsBias(nn.Module):
    """BERT's masked-LM head: the decoder's bias is a parameter of the head too (tied), its forward never reading it."""

    def __init__(self):
        super().__init__()
        self.body, self.decoder = nn.Linear(4, 5), nn.Linear(5, 3)
        self.bias = self.decoder.bias

    def forward(self, x):
        return self.decoder(torch.tanh(self.body(x)))


class HeadReadingItsBias(HeadHoldingItsBias):
    """Reads the tied bias itself, for the examples past the first ones only: planning, which runs a few first
    examples, cannot see that use."""

    def forward(self, x):
        return super().forward(x) + (x[:, :1] > 1.0) * self.bias.square()


def _late_bias(head, x):
    return (x[:, :1] > 1.0) * head.bias.square()


def _passing_through(forward):
    @functools.wraps(forward)
    def wrapper(self, *args):
        return forward(self, *args)

    return wrapper


class HeadReadingItsBiasInAHelper(HeadHoldingItsBias):
    """The same read, hidden from the class's own code: in a module-level function, behind a `functools.wraps`
    decorator (as transformers' `@can_return_tuple`)."""

    @_passing_through
    def forward(self, x):
        return super().forward(x) + _late_bias(self, x)


@pytest.mark.parametrize("head", [HeadHoldingItsBias, HeadReadingItsBias, HeadReadingItsBiasInAHelper])
def test_a_tied_tensor_held_by_a_module_of_no_factored_form(head):
    """Held only (BERT's, ALBERT's, RoBERTa's masked-LM heads), its holder's code never naming it: the decoder stays a
    site (these models ran one example at a time, vmap failing on them). Named by the holder's code: the decoder
    leaves the sites (a use on later examples only, which planning cannot see, was 12% off)."""
    torch.manual_seed(0)
    model = head().double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    x[:5, 0], x[5:, 0] = -1.0, 2.0  # (the planning examples read no bias)
    _exact_and_explained(model, (x, y), (x[:3], y[:3]))
    assert ("decoder" in {s.path for s in _plan(model, (x, y)).sites}) is (head is HeadHoldingItsBias)  # fmt: skip


class UpsamplingNet(nn.Module):
    """A U-Net's step: a strided convolution down, a transposed one up, the input joined back."""

    def __init__(self, dims, groups, output_padding, dilation):
        super().__init__()
        conv, transposed = (nn.Conv1d, nn.ConvTranspose1d) if dims == 1 else (nn.Conv2d, nn.ConvTranspose2d)
        self.down, self.out = conv(2, 4, 3, stride=2, padding=1), conv(6, 2, 1)
        self.up = transposed(4, 4, 3, stride=2, padding=1, output_padding=output_padding, groups=groups,
                             dilation=dilation)  # fmt: skip

    def forward(self, x):
        up = torch.tanh(self.up(torch.tanh(self.down(x))))
        up = up[(..., *(slice(0, size) for size in x.shape[2:]))]  # (output_padding 0: one row short of x's)
        return self.out(torch.cat([up, x], 1)).flatten(1)


@pytest.mark.parametrize("dims, groups, output_padding, dilation", [(2, 1, 1, 1), (2, 2, 1, 1), (2, 4, 0, 2),
                                                                    (1, 2, 1, 2)])  # fmt: skip
def test_transposed_convolutions_are_followed_to_the_batch(dims, groups, output_padding, dilation):
    """`nn.ConvTranspose*d` (U-Nets, decoders) is no site: its weight, read directly, was not followed through the
    transposed convolution, so the whole model went to vmap(grad). Each example's weight gradient is now the
    adjoint convolution's (input and output gradient swapped): batched, exact."""
    torch.manual_seed(0)
    model = UpsamplingNet(dims, groups, output_padding, dilation).double().eval()
    x = torch.randn(7, 2, *(8,) * dims, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    explained = _exact_and_explained(nn.Sequential(model, nn.Linear(model(x).shape[1], 3)).double(),
                                     (x, y), (x[:3], y[:3]))  # fmt: skip
    assert explained.batching == "one batched forward / backward gives every layer's factors"


def test_a_transposed_convolutions_output_padding_past_its_stride():
    """`output_padding` may reach the dilation (not only the stride): the adjoint convolution then gives positions
    past the input's, which the weight gradient took for a mismatch (torch's "grad_output ... must be equal to output
    size"), sending the model to vmap(grad)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose1d(2, 3, 3, stride=1, dilation=2, output_padding=1), nn.Tanh(),
                          nn.Flatten(), nn.Linear(3 * 11, 3)).double().eval()  # fmt: skip
    x, y = torch.randn(7, 2, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    explained = _exact_and_explained(model, (x, y), (x[:3], y[:3]))
    assert explained.batching == "one batched forward / backward gives every layer's factors"


class TiedConvOnMergedRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.c2.weight = self.c1.weight
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))  # [B, 2, 4, 4]
        z = self.c2(h.reshape(-1, 2, 2, 4))  # the batch merged with the rows: 2 images per example
        return self.fc(torch.tanh(h + z.reshape(h.shape)).flatten(1))


def test_a_tied_layer_fed_merged_rows_takes_its_partners_to_vmap():
    torch.manual_seed(0)
    model = TiedConvOnMergedRows().double().eval()
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    plan = _plan(model, (x, y))
    assert [s.path for s in plan.sites] == ["fc"] and "c1.weight" in plan.dense
    assert plan.reasons["c1.weight"].startswith("'c2' sees 2 rows for one example")


def test_a_weight_also_used_directly_is_followed():
    """A layer whose weight is also used outside it is no site: its tensors are followed to their products with the
    batch (vmap(grad) before)."""
    torch.manual_seed(0)
    model = DirectUse().double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    plan = _plan(model, (x, y), factored=True)
    assert plan.batched and {s.path: s.kind for s in plan.sites} == {
        "b": "linear", "a.weight": "followed", "a.bias": "followed"
    }, plan.sites  # fmt: skip


def test_a_regulariser_in_the_loss_falls_back_to_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()

    def loss(params, batch):
        x, y = batch
        logits = torch.func.functional_call(model, params, (x,))
        return CE(logits, y) + 0.1 * params["2.weight"].square().sum()

    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]), loss_fn=tc.ExampleLoss(loss))
    plan = _plan(model, (x, y), loss_fn=tc.ExampleLoss(loss), factored=True)
    assert [s.path for s in plan.sites] == ["0"] and "2.weight" in plan.dense


class FoldsChoices(nn.Module):
    """Scores an example's C choices ``[B, C, d]`` folded into the batch (``[B C, d]``, multiple-choice heads): its
    Linears see C rows of one example each, the last without a bias."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 1, bias=False)

    def forward(self, x):
        b, c, d = x.shape
        return self.b(torch.tanh(self.a(x.reshape(b * c, d)))).reshape(b, c)


class FoldsChoiceIds(nn.Module):
    """One token id per choice: ids ``[B, C]`` looked up as ``[B C]``."""

    def __init__(self):
        super().__init__()
        self.emb, self.b = nn.Embedding(30, 4), nn.Linear(4, 1)

    def forward(self, ids):
        b, c = ids.shape
        return self.b(torch.tanh(self.emb(ids.reshape(-1)))).reshape(b, c)


@pytest.mark.parametrize("factored", [None, True])
@pytest.mark.parametrize("ids", [False, True], ids=["vectors", "ids"])
def test_a_model_folding_choices_into_its_batch_is_exact_through_vmap(factored, ids):
    """Through vmap(grad) (an ExampleLoss), one example's layer input ``[C, d]`` (or ids ``[C]``) is C rows, not one
    row of C d values (which made the last Linear's "gradient" an outer product of concatenations: scores 2.9x off)
    nor the first id alone."""
    torch.manual_seed(0)
    model = (FoldsChoiceIds() if ids else FoldsChoices()).double().eval()
    x = torch.randint(0, 30, (6, 3)) if ids else torch.randn(6, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    loss = tc.ExampleLoss(lambda p, b: CE(torch.func.functional_call(model, p, (b[0],)), b[1]))
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=loss)
    assert_close(tc.influence(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=loss, factored=factored), ref.influence)
    assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=loss, factored=factored), ref.self_influence)
    assert_close(tc.influence(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=CE), ref.influence)


class SiamesePair(nn.Module):
    """One GRU encoder run on both parts of each example, joined along the batch: part by part (``cat``) or example by
    example (``stack`` then ``flatten``)."""

    def __init__(self, stacked: bool):
        super().__init__()
        self.stacked, self.emb, self.gru, self.cls = stacked, nn.Embedding(30, 8), nn.GRU(8, 6, batch_first=True), \
            nn.Linear(12, 2)  # fmt: skip

    def forward(self, a, b):
        n = a.shape[0]
        both = torch.stack([a, b], 1).flatten(0, 1) if self.stacked else torch.cat([a, b])
        h = self.gru(self.emb(both))[0][:, -1]  # (a view of the output laid out by time, as torch's layer gives it)
        pair = h.view(n, 2 * h.shape[1]) if self.stacked else torch.cat([h[:n], h[n:]], -1)
        return self.cls(pair)


def test_a_pair_joined_part_by_part_along_the_batch_is_named_so():
    """A siamese pair joined part by part (``torch.cat([a, b])``) was refused to vmap(grad) naming batch statistics,
    sorting or a sequence-first layout (a review helper's); the warning names the join and the order that keeps each
    example's rows together, which is batched. Both exact; the unrolled GRU's output is laid out as torch's (a `.view`
    of its last step raised torch's error on one laid out by example)."""
    torch.manual_seed(0)
    data = (torch.randint(0, 30, (8, 5)), torch.randint(0, 30, (8, 5)), torch.randint(0, 2, (8,)))
    for stacked in (False, True):
        model = SiamesePair(stacked).double().eval()
        ckpts = _ckpts(model)
        why = tc.explain(model, ckpts, data, loss_fn=CE).batching
        if stacked:
            assert why.startswith("one batched forward"), why
        else:
            assert "folds 2 rows per example" in why and "torch.stack([a, b], 1).flatten(0, 1)" in why, why
        ref = reference_scores(model, ckpts, data, loss_fn=CE)
        assert_close(tc.self_influence(model, ckpts, data, loss_fn=CE), ref.self_influence)


@pytest.mark.parametrize("all_but_first", [False, True], ids=["all", "all-but-first"])
@pytest.mark.parametrize("equal_first", [False, True])  # the first three examples equal: only the fourth differs
def test_models_that_mix_examples_are_not_batched(all_but_first, equal_first):
    torch.manual_seed(0)
    model = MixesExamples(all_but_first).double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    if equal_first:
        x[1:3], y[1:3] = x[0], y[0]
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    assert not _plan(model, (x, y)).batched
    assert _plan(nn.Sequential(nn.Linear(4, 3)).double().eval(), (x, y)).batched


class CentresInputs(nn.Module):
    """Subtracts the batch's mean input: on inputs of small integers, equal examples get exactly what one alone gets
    (zeros), whatever their number."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x - x.mean(0, keepdim=True))))


def test_equal_first_examples_do_not_count_as_a_check_of_the_batching():
    """Examples that are all equal show no more of how a model batches them than one does, so a plan made on them
    checks the batching as one made on a single example does: on the training data's first examples (a test set of
    four copies made the training passes batched: 75% off, silently; found by fuzzing, so did one input with each
    label, 75% off), or else on the first batch whose inputs differ, which refuses a model that mixes them (first
    training examples all equal: 2.9-3.2x off, silently; by their labels only, 4.2x); planned on a batch in memory,
    the check picks examples that differ among its first ones."""
    torch.manual_seed(0)
    model = CentresInputs().double().eval()
    ckpts = _ckpts(model)
    x, y = torch.randint(-3, 4, (8, 4)).double(), torch.randint(0, 3, (8,))
    for copies in ((x[:1].expand(4, 4), y[:1].expand(4)), (x[:1].expand(3, 4), torch.arange(3))):  # or each label
        ref = reference_scores(model, ckpts, (x, y), copies, loss_fn=CE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tc.SlowPathWarning)
            assert_close(tc.influence(model, ckpts, (x, y), copies, loss_fn=CE), ref.influence)
    x[1:4] = x[0]
    for batch_size, labels in ((None, y[0]), (4, y[0]), (None, torch.arange(3))):
        y[1:4] = labels
        if batch_size is None:  # the check picks among the batch's first examples: it runs one example at a time
            with pytest.warns(tc.SlowPathWarning, match="examples interact"):
                got = tc.self_influence(model, ckpts, (x, y), loss_fn=CE)
            assert_close(got, reference_scores(model, ckpts, (x, y), loss_fn=CE).self_influence)
            continue
        with pytest.raises(ValueError, match=r"\(a single example, examples of equal inputs.*do not stay apart"):
            tc.self_influence(model, ckpts, (x, y), loss_fn=CE, batch_size=batch_size)
    plain = nn.Sequential(nn.Linear(4, 3)).double().eval()  # keeps examples apart: scored batched
    assert_close(tc.self_influence(plain, ckpts := _ckpts(plain), (x, y), loss_fn=CE),
                 reference_scores(plain, ckpts, (x, y), loss_fn=CE).self_influence)  # fmt: skip


class GatedMix(nn.Module):
    """Adds the batch's mean through a gate that is zero at initialisation (ReZero style): the examples mix at the
    checkpoints after the first only."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h + self.gate * h.mean(0, keepdim=True))


def test_the_batching_is_checked_at_the_last_checkpoint():
    """Found by fuzzing: checked at the first checkpoint only, a path mixing examples behind a gate that is zero
    there passed, and the later checkpoints were scored batched (3-36% off, silently). The check runs at the last
    checkpoint, which a list in training order has furthest from initialisation."""
    torch.manual_seed(0)
    model = GatedMix().double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    trained = {k: v + 0.3 for k, v in model.state_dict().items()}
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.1), tc.Checkpoint(trained, lr=0.05)]
    layers = ["a.weight", "a.bias", "b.weight", "b.bias"]
    ref = reference_scores(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE, params=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=CE, params=layers), ref.self_influence)
        assert_close(tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE, params=layers), ref.influence)
        assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=CE, params=layers, batch_size=1),
                     ref.self_influence)  # fmt: skip
    assert "examples interact" in tc.explain(model, ckpts, (x, y), loss_fn=CE, params=layers).batching


def test_one_test_example_checks_the_batching_on_the_training_data():
    """Influence is planned on the test data, whose first batch here holds one example: its batched and lone runs
    are the same, so the training data's first examples are checked instead (a batch, a Dataset, a DataLoader, a
    one-pass generator of batches, whose first batch is kept; a model mixing the training batch's examples got
    batched training passes: 15% off); a model that does not mix stays batched."""
    torch.manual_seed(0)
    model = MixesExamples().double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, (x, y), (x[:1], y[:1]), loss_fn=CE)
    with pytest.warns(tc.SlowPathWarning, match="a batched forward changed the first examples' factors"):
        assert_close(tc.influence(model, ckpts, (x, y), (x[:1], y[:1]), loss_fn=CE), ref.influence)
    top = tc.top_k(model, ckpts, torch.utils.data.TensorDataset(x, y), (x[:1], y[:1]), loss_fn=CE, k=3)
    assert_close(top.scores, ref.influence.topk(3, dim=1).values)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)  # read again after
    with pytest.warns(tc.SlowPathWarning, match="a batched forward changed the first examples' factors"):
        assert_close(tc.influence(model, ckpts, loader, (x[:1], y[:1]), loss_fn=CE), ref.influence)
    one_pass = ((x[i : i + 3], y[i : i + 3]) for i in range(0, 8, 3))  # its first batch is kept for the check
    with pytest.warns(tc.SlowPathWarning, match="a batched forward changed the first examples' factors"):
        assert_close(tc.influence(model, ckpts, one_pass, (x[:1], y[:1]), loss_fn=CE), ref.influence)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    seen = []
    original = plan_module.make_plan
    plan_module.make_plan = lambda *a, **k: seen.append(original(*a, **k)) or seen[-1]
    try:
        tc.influence(plain, _ckpts(plain), (x, y), (x[:1], y[:1]), loss_fn=CE)
    finally:
        plan_module.make_plan = original
    assert seen[0].batched


def test_a_plan_made_on_one_example_checks_its_first_batch_of_two_or_more():
    """Batches of 1, 3 and 4 examples (a bucketing sampler): planned on the first, whose batched and lone runs are the
    same, the call checks the batching on the next batch and refuses a model that mixes the examples of a batch (it
    was scored batched, silently: self-influence, embeddings, and influence of one test example); a model that does
    not mix stays batched and exact, one running a layer once for the whole batch too (shown by two copies of the
    first example since 2026-12-06; refused before, the plan unable to follow it)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    sizes = [[0], [1, 2, 3], [4, 5, 6, 7]]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_sampler=sizes)
    model = MixesExamples().double().eval()
    ckpts = _ckpts(model)
    refused = "a single example.*shows that a batch's examples do not stay apart.*factored=False"
    for call in (
        lambda: tc.self_influence(model, ckpts, loader, loss_fn=CE),
        lambda: tc.embeddings(model, ckpts, loader, loss_fn=CE),
        lambda: tc.influence(model, ckpts, loader, (x[:1], y[:1]), loss_fn=CE),
    ):
        with pytest.raises(ValueError, match=refused):
            call()
    ref = reference_scores(model, ckpts, (x, y), (x[:1], y[:1]), loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap falls back to the loop on the model's batch statistics
        assert_close(tc.self_influence(model, ckpts, loader, loss_fn=CE, factored=False), ref.self_influence)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    ckpts = _ckpts(plain)
    ref = reference_scores(plain, ckpts, (x, y), (x[:1], y[:1]), loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched: no slow-path warning
        assert_close(tc.self_influence(plain, ckpts, loader, loss_fn=CE), ref.self_influence)
        assert_close(tc.influence(plain, ckpts, loader, (x[:1], y[:1]), loss_fn=CE), ref.influence)
    assert _plan(plain, loader).batched and _plan(plain, loader).unchecked == "batching"
    torch.manual_seed(0)  # a layer run once for the whole batch: shown by two copies of the one example (refused by
    model, tokens = RelativeBias().double().eval(), torch.randint(0, 10, (8, 4))  # the next batch's check until then)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, y), batch_sampler=sizes)
    ckpts = _ckpts(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched, its output followed: no slow-path warning
        scores = tc.self_influence(model, ckpts, loader, loss_fn=CE)
    assert_close(scores, reference_scores(model, ckpts, (tokens, y), loss_fn=CE).self_influence)
    assert _plan(model, loader).batch_free == {"rel"}


@pytest.mark.parametrize(
    ("tokens", "kernel"), [(1, True), (40, False)]
)  # T^2 (d_in + d_out) against d_in d_out = 16 * 16
def test_cost_model_chooses_factored_inner_products_for_few_rows(tokens, kernel):
    model = nn.Sequential(nn.Linear(16, 16)).double().eval()
    x, y = torch.randn(4, tokens, 16, dtype=torch.float64), torch.randn(4, tokens, 16, dtype=torch.float64)
    plan = _plan(model, (x, y), loss_fn=nn.MSELoss())
    assert [s.path for s in plan.sites] == ["0"]
    assert (plan.kernel == {"0"}) is kernel


class ReadsOneRow(nn.Module):
    """Rows mixed across positions, then a head on each example's last kept row (as GPT-2's sequence classifier
    reads its last token): ``mid``'s output gradient is zero on every other row, ``inp``'s on the rows ``keep``
    masks. ``extra`` is added to ``mid``'s input."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x, keep, extra):
        h = torch.tanh(self.inp(x)) * keep[..., None]
        last = keep.sum(1).long() - 1
        return self.head(self.mid(h + h.sum(1, keepdim=True) + extra)[torch.arange(x.shape[0]), last])


def _reads_one_row_data(n):
    """Five rows per example; the first four examples keep at most two, the later ones four or five."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([2, 1, 2, 1] + [5, 4] * n)[:n]
    keep = (torch.arange(5) < lengths[:, None]).double()
    x, extra = torch.randn(n, 5, 4, generator=gen, dtype=torch.float64), torch.zeros(n, 5, 6, dtype=torch.float64)
    return x, keep, extra, torch.randint(0, 3, (n,), generator=gen)


class MaskedRows(nn.Module):
    """A Linear on rows read transposed (strided) from its input, of which a mask keeps some: its rows of zero output
    gradient are dropped per batch (all of them, in a batch the mask keeps none of)."""

    def __init__(self):
        super().__init__()
        self.rows, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, mask):
        return self.head((torch.tanh(self.rows(x.transpose(1, 2))) * mask[..., None]).sum(1))


@pytest.mark.parametrize("factored", [None, True])
def test_a_test_batch_without_rows_of_gradient_meets_strided_training_rows(factored):
    """A test batch none of whose rows carries gradient at a layer keeps no rows of it, while a training batch with
    most rows live keeps its strided rows whole: their products are zero (a crash before: a reshape of no elements
    could not infer its width)."""
    torch.manual_seed(0)
    model = MaskedRows().double().eval()
    x, y = torch.randn(8, 4, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    mask = torch.zeros(8, 8, dtype=torch.float64)
    mask[:4, :2], mask[4:, :7] = 1, 1  # the second batch: 7 of 8 rows live, kept whole
    ckpts, train = _ckpts(model), [(x[:4], mask[:4], y[:4]), (x[4:], mask[4:], y[4:])]
    test = (x[:3], torch.zeros(3, 8, dtype=torch.float64), y[:3])
    want = torch.cat([reference_scores(model, ckpts, b, test, loss_fn=CE).influence for b in train], 1)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, factored=factored), want, 1e-12)


def test_a_row_carries_gradient_where_any_entry_is_not_zero():
    """``rows_with_gradient``: a row is live where any entry is nonzero (a tiny negative, an infinity) or NaN, not
    where all are zero (``-0.0`` too), for rows of any width (none: no row is live)."""
    from tracin_func._assemble import rows_with_gradient

    g = torch.zeros(3, 5, 4)
    g[0, 1, 2], g[1, 2, 0], g[1, 0] = 1.0, -1e-40, float("-inf")
    g[2, 3, 3], g[2, 0, 1], g[0, 4, 0] = float("nan"), -0.0, -2.0
    assert torch.equal(rows_with_gradient(g), g.ne(0).any(2))
    assert rows_with_gradient(g).sum() == 5
    assert torch.equal(rows_with_gradient(g[..., :0]), torch.zeros(3, 5, dtype=torch.bool))


@pytest.mark.parametrize("batch_size", [4, None])  # inp's rows dropped in the first batch only, or in none
def test_each_examples_rows_of_zero_output_gradient_are_dropped(monkeypatch, batch_size):
    model = ReadsOneRow().double().eval()
    ckpts, train, test = _ckpts(model), _reads_one_row_data(10), _reads_one_row_data(6)
    reasons = {r.parameter: r.reason for r in tc.explain(model, ckpts, train, loss_fn=CE).routes}
    assert reasons["mid.weight"].endswith("(T = 1): 1 of 5 rows carry gradient in each of the first examples")
    # inp's rows with gradient differ between examples (padding, which later batches fill): costed at all 5 rows
    assert reasons["inp.weight"].endswith("(T = 5)"), reasons["inp.weight"]
    kept, live_rows = [], tracin_func._assemble._live_rows

    def recorded(a, g):
        kept.append(live_rows(a, g)[1].shape[1])
        return live_rows(a, g)

    monkeypatch.setattr(tracin_func._assemble, "_live_rows", recorded)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    opts = dict(loss_fn=CE, batch_size=batch_size)
    assert_close(tc.influence(model, ckpts, train, test, **opts), ref.influence, 1e-12)
    assert_close(tc.self_influence(model, ckpts, train, **opts), ref.self_influence, 1e-12)
    # mid: 1 row; inp: 2 in lengths [2, 1, 2, 1], else 5 (automatic size: the check picks among the first examples
    # of the batch in memory, some of five rows, so inp's are not dropped)
    assert set(kept) == ({1, 2, 5} if batch_size else {1})


def test_rows_without_gradient_in_the_same_places_for_every_example_are_dropped_alike(monkeypatch):
    """Examples of one length keep their rows in the same places (a classifier reading its first token): those rows
    are taken by index (no sort); the scores stay exact."""
    model = ReadsOneRow().double().eval()
    x, keep, extra, y = _reads_one_row_data(8)
    keep[:] = (torch.arange(5) < 2).double()  # every example: rows 0-1 of inp, row 1 of mid
    ckpts, taken, argsort = _ckpts(model), [], torch.argsort

    def sorting(*args, **kwargs):
        taken.append("sorted")
        return argsort(*args, **kwargs)

    monkeypatch.setattr(torch, "argsort", sorting)
    ref = reference_scores(model, ckpts, (x, keep, extra, y), (x[:3], keep[:3], extra[:3], y[:3]), loss_fn=CE)
    taken.clear()
    assert_close(tc.influence(model, ckpts, (x, keep, extra, y), (x[:3], keep[:3], extra[:3], y[:3]), loss_fn=CE),
                 ref.influence, 1e-12)  # fmt: skip
    assert_close(tc.self_influence(model, ckpts, (x, keep, extra, y), loss_fn=CE), ref.self_influence, 1e-12)
    assert not taken


def test_first_examples_without_any_gradient_leave_the_cost_model_at_all_rows():
    """Ignored targets (-100) give the first examples no gradient at all: nothing tells which rows later examples
    use, so every layer is costed at all its rows; the scores stay exact."""
    model = ReadsOneRow().double().eval()
    x, keep, extra, y = _reads_one_row_data(8)
    y[:4] = -100
    ckpts, train = _ckpts(model), (x, keep, extra, y)
    reasons = {r.parameter: r.reason for r in tc.explain(model, ckpts, train, loss_fn=CE).routes}
    assert reasons["mid.weight"].endswith("(T = 5)"), reasons["mid.weight"]
    ref = reference_scores(model, ckpts, train, loss_fn=CE)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, batch_size=4), ref.self_influence, 1e-12)


def test_a_dropped_row_with_an_infinite_input_still_makes_the_gradient_nan():
    """Autograd's gradient of ``mid.weight`` is NaN when its input is infinite on a row no loss reads (0 * inf):
    the call reports it as it does without dropping rows."""
    model = ReadsOneRow().double().eval()
    x, keep, extra, y = _reads_one_row_data(6)
    extra[2, 0] = torch.inf  # row 0 of example 2 (which keeps two): mid's output there is read by nothing
    for factored in (False, None):
        with pytest.raises(FloatingPointError, match=r"examples \[2\]"):
            tc.self_influence(model, _ckpts(model), (x, keep, extra, y), loss_fn=CE, factored=factored)


class TiedHeadOnFirstRow(nn.Module):
    """A token embedding tied to an output head that reads row 0 only: the head's use of the shared weight drops
    its other rows, the embedding's use keeps every row."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))
        return self.head(torch.tanh(self.mid(h + h.mean(1, keepdim=True))))[:, 0]


@pytest.mark.parametrize("factored", [None, True])
def test_a_tied_weights_use_with_dropped_rows_sums_with_its_other_uses(factored):
    model = TiedHeadOnFirstRow().double().eval()
    gen = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 11, (9, 6), generator=gen), torch.randint(0, 11, (9,), generator=gen)
    ckpts, train, test = _ckpts(model), (ids[:6], y[:6]), (ids[6:], y[6:])
    assert {"head", "mid"} <= _plan(model, train, factored=factored).trimmed
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    opts = dict(loss_fn=CE, factored=factored)
    assert_close(tc.influence(model, ckpts, train, test, **opts), ref.influence, 1e-12)
    for batch_size in (2, None):  # self-influence keeps the tied weight as its uses' factors (Tied)
        assert_close(tc.self_influence(model, ckpts, train, batch_size=batch_size, **opts), ref.self_influence, 1e-12)


@pytest.mark.parametrize("factored", [None, True])
def test_batches_with_many_more_rows_than_planned_are_scored_from_formed_gradients(monkeypatch, factored):
    """Dynamic padding: the plan factors ``mix`` for the first batches' 2 rows; batches of 12 rows, where its
    factored products would cost several times more, are scored from formed gradients (unless ``factored=True``
    asks for factors), exactly either way."""
    import tracin_func._representations as representations_module

    model = TokenMixer().double().eval()
    gen = torch.Generator().manual_seed(0)

    def batch(n, rows):
        return torch.randn(n, rows, 16, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)

    train, test, ckpts = [batch(4, 2), batch(4, 12)], [batch(3, 2), batch(3, 12)], _ckpts(model)
    assert tc.explain(model, ckpts, train, loss_fn=CE).routes[0].reason.endswith("(T = 2)")
    formed, form = [], representations_module.Factored._formed
    monkeypatch.setattr(representations_module.Factored, "_formed", lambda f: formed.append(f.a.shape[1]) or form(f))
    S = tc.influence(model, ckpts, train, test, loss_fn=CE, factored=factored)
    s = tc.self_influence(model, ckpts, train, loss_fn=CE, factored=factored)
    refs = [[reference_scores(model, ckpts, b, t, loss_fn=CE) for b in train] for t in test]
    assert_close(S, torch.cat([torch.cat([r.influence for r in row], 1) for row in refs]), 1e-12)
    assert_close(s, torch.cat([r.self_influence for r in refs[0]]), 1e-12)
    assert set(formed) == (set() if factored else {12})


class GroupedConvs(nn.Module):
    """A MobileNet-style block: depthwise and grouped convolutions between plain ones, eval-mode BatchNorm."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.grouped = nn.Conv2d(4, 6, 1, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.c3 = nn.Conv1d(6, 4, 3, groups=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.grouped(torch.relu(self.depthwise(self.c1(x))))))
        return self.fc(torch.tanh(self.c3(h.flatten(2))).mean(2))


class Depthwise(nn.Module):
    """Depthwise convolutions whose weight gradients take both forms: a forward convolution with the output
    gradient as kernel (stride, padding, dilation, 1-d; `strided`: 2 x 2 positions, its kernel spanning 3 rows of its
    input) and sums of shifted windows (`dilated`, `padded`: the output gradient as a kernel spans no more than the
    padding)."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Conv2d(3, 3, 5, stride=2, padding=2, groups=3)  # 7 x 7 -> 4 x 4
        self.dilated = nn.Conv2d(3, 3, 3, stride=2, padding=1, dilation=2, groups=3)  # 4 x 4 -> 1 x 1
        self.strided = nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3, bias=False)  # 4 x 4 -> 2 x 2
        self.padded = nn.Conv2d(3, 3, 5, padding=2, groups=3)  # 2 x 2 -> 2 x 2
        self.seq = nn.Conv1d(3, 3, 3, padding=2, dilation=2, groups=3)  # 16 -> 16
        self.fc = nn.Linear(3 + 12 + 3, 3)

    def forward(self, x):
        h = torch.tanh(self.wide(x))
        strided = self.padded(torch.tanh(self.strided(h)))
        parts = [self.dilated(h).flatten(1), torch.tanh(strided).flatten(1), self.seq(h.flatten(2)).mean(2)]
        return self.fc(torch.cat(parts, 1))


def test_depthwise_gradients_on_many_positions_take_the_convolution(monkeypatch):
    """A depthwise layer's output of one row and many columns (a padding of 2 spans its single row) takes the
    convolution, not the shifted windows' loop over its positions, which torch.compile unrolls (a 1 x 256 output's call
    took 112-116 s to compile against 20-21 s); a 2 x 2 one the windows. Both give each example's gradient."""
    from tracin_func import _layers

    windowed, own = [], _layers._shifted_windows
    monkeypatch.setattr(_layers, "_shifted_windows", lambda x, g, *a: windowed.append(g.shape[2:]) or own(x, g, *a))
    torch.manual_seed(0)
    for size in ((2, 2), (1, 32)):
        layer = nn.Conv2d(3, 3, 5, padding=2, groups=3).double()
        x = torch.randn(4, 3, *size, dtype=torch.float64)
        g = torch.randn_like(layer(x))
        geometry = _layers.ConvGeometry(tuple(layer.weight.shape), 3, (1, 1), (1, 1))
        own_grads = [torch.autograd.grad(layer(x[i : i + 1]), layer.weight, g[i : i + 1])[0] for i in range(4)]
        assert_close(_layers._depthwise_weight_grads(geometry, x, g, (2, 2)), torch.stack(own_grads), 1e-12)
    assert windowed == [(2, 2)], windowed


@pytest.mark.parametrize("chunk", [2, 512])  # grouped per-example weight gradients in several calls, or one
@pytest.mark.parametrize(
    "make,shape,grouped",
    [
        (GroupedConvs, (9, 2, 5, 5), {"depthwise", "grouped", "c3"}),
        (Depthwise, (7, 3, 7, 7), {"wide", "dilated", "strided", "padded", "seq"}),
    ],
)
def test_grouped_and_depthwise_convolutions_are_materialised_from_factors(monkeypatch, chunk, make, shape, grouped):
    from tracin_func import _layers

    monkeypatch.setattr(_layers, "_GROUPED_CONV_CHUNK", chunk)
    windowed, own = set(), _layers._shifted_windows
    spy = lambda x, g, kernel, *a: windowed.add((kernel, g.shape[2:])) or own(x, g, kernel, *a)  # noqa: E731
    monkeypatch.setattr(_layers, "_shifted_windows", spy)
    torch.manual_seed(0)
    model = make().double().eval()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    plan = _plan(model, (x, y))
    assert plan.batched and not plan.dense  # every layer gives factors: one batched pass
    got = {s.path for s in plan.sites if s.groups > 1}
    assert got == grouped and not got & plan.kernel  # never a factored kernel
    if make is Depthwise:  # `dilated` and `padded` (`strided`, at 2 x 2 too, by a convolution)
        assert windowed == {((3, 3), (1, 1)), ((5, 5), (2, 2))}, windowed


class PaddedConvs(nn.Module):
    """Padding the layer applies itself before its product: ``"same"`` (uneven for an even kernel), ``"valid"`` and
    the reflect / replicate / circular modes, on plain, grouped and depthwise Conv2d and on Conv1d."""

    def __init__(self):
        super().__init__()
        self.even = nn.Conv2d(2, 3, 4, padding="same")
        self.reflect = nn.Conv2d(3, 4, 3, padding="same", dilation=2, padding_mode="reflect")
        self.circular = nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="circular", groups=2)
        self.replicate = nn.Conv2d(4, 4, (3, 2), padding="same", padding_mode="replicate", groups=4)
        self.seq = nn.Conv1d(4, 3, 2, padding="same")
        self.valid = nn.Conv1d(3, 3, 3, padding="valid", padding_mode="reflect")
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.reflect(torch.tanh(self.even(x))))
        h = torch.tanh(self.replicate(torch.tanh(self.circular(h))))
        return self.fc(torch.tanh(self.valid(torch.tanh(self.seq(h.flatten(2))))).mean(2))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("chunk", [2, 512])
def test_convolutions_padding_their_input_themselves(monkeypatch, chunk):
    """Factors read the input as the layer's product sees it (padded as its forward pads it): exact against the
    loop reference, and every layer a site (these layers went to ``vmap(grad)`` before)."""
    from tracin_func import _layers

    monkeypatch.setattr(_layers, "_GROUPED_CONV_CHUNK", chunk)
    torch.manual_seed(0)
    model = PaddedConvs().double().eval()
    x, y = torch.randn(7, 2, 7, 8, dtype=torch.float64), torch.randint(0, 3, (7,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]  # rows counted from the geometry alone
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]), params=biases)
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE)
    assert_close(tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE), ref.influence)
    assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=CE, factored=True), ref.self_influence)
    plan = _plan(model, (x, y))
    assert plan.batched and not plan.dense and {s.path for s in plan.sites} == {
        "even", "reflect", "circular", "replicate", "seq", "valid", "fc"
    }


class WideConvs(nn.Module):
    """Convolutions of more channel pairs than the grouped route takes (4,096) on outputs of 256 positions or more
    (576 here): each example's weight gradient from the convolution's own backward, one example at a time (reflect
    padding, a dilation, a Conv1d); the strided one's 144 positions and the 1 x 1 one's patches (its input) unfolded,
    the stem's few pairs grouped."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 72, 3, padding=1)
        self.reflect = nn.Conv2d(72, 72, 3, padding=1, padding_mode="reflect")
        self.pointwise = nn.Conv2d(72, 72, 1)
        self.dilated = nn.Conv2d(72, 64, 3, padding="same", dilation=2, bias=False)
        self.strided = nn.Conv2d(64, 72, 3, stride=2, padding=1)
        self.seq = nn.Conv1d(64, 72, 3, padding=1)
        self.fc = nn.Linear(72, 3)

    def forward(self, x):
        h = torch.tanh(self.pointwise(torch.tanh(self.reflect(torch.tanh(self.stem(x))))))
        h = torch.tanh(self.dilated(h))
        return self.fc(torch.tanh(self.strided(h)).mean((2, 3)) + torch.tanh(self.seq(h.flatten(2))).mean(2))


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (2, 3)])
@pytest.mark.parametrize("dilation", [(1, 1), (2, 1)])
@pytest.mark.parametrize("padding", [(0, 0), (1, 2)])
@pytest.mark.parametrize("stride", [(1, 1), (2, 3)])
def test_unfolded_patches_are_those_of_f_unfold(kernel, dilation, padding, stride):
    """``unfolded`` (a strided view of the padded input, copied) gives ``F.unfold``'s patches bit for bit, on a
    contiguous input, a transposed one and a slice starting inside its storage; a 1 x 1 kernel's are the input."""
    from tracin_func._layers import unfolded

    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    for given in (x, x.transpose(2, 3).contiguous().transpose(2, 3), torch.randn(2, 5, 7, 9)[:, 1:]):
        expected = F.unfold(given, kernel, dilation=dilation, padding=padding, stride=stride)
        assert torch.equal(unfolded(given, kernel, dilation, padding, stride), expected)


def test_wide_convolutions_on_many_positions_take_each_examples_own_backward(monkeypatch):
    from tracin_func import _layers

    looped, own = [], _layers._looped_weight_grads
    spy = lambda geometry, *a: looped.append(geometry) or own(geometry, *a)  # noqa: E731
    monkeypatch.setattr(_layers, "_looped_weight_grads", spy)
    torch.manual_seed(0)
    model = WideConvs().double().eval()
    x, y = torch.randn(5, 2, 24, 24, dtype=torch.float64), torch.randint(0, 3, (5,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE)
    assert_close(tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE), ref.influence)
    assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=CE, factored=True), ref.self_influence)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert {g.weight_shape for g in looped} == {shapes[f"{name}.weight"] for name in ("reflect", "dilated", "seq")}


def test_large_formed_layers_scored_a_block_of_output_channels_at_a_time(monkeypatch):
    """Formed gradients larger than ``_BLOCK_BYTES`` (here 256 bytes) are formed and dotted a block of output
    channels at a time, on every route (grouped, unfolded, each example's own backward, a Conv1d, a Linear with its
    bias), the test side formed whole and self-influence's examples a block at a time: the scores equal the
    reference. On a GPU they are formed whole."""
    import tracin_func._representations as reps
    from tracin_func import _layers

    monkeypatch.setattr(reps, "_BLOCK_BYTES", 256)
    blocked, of_channels = set(), _layers._of_channels
    monkeypatch.setattr(_layers, "_of_channels", lambda site, *a: blocked.add(site.path) or of_channels(site, *a))
    torch.manual_seed(0)
    cases = [
        (WideConvs(), torch.randn(5, 2, 24, 24, dtype=torch.float64)),
        (RowMixer(), torch.randn(5, 16, 3, dtype=torch.float64)),  # its Linear `mix` formed, over 16 rows
    ]
    cases = [(model.double().eval(), (x, torch.randint(0, 3, (5,)))) for model, x in cases]
    formed = {"stem", "reflect", "pointwise", "dilated", "strided", "seq", "mix"}  # (the heads: factored)
    for question in ("influence", "self_influence"):  # (self-influence: an example's gradients in blocks)
        blocked.clear()
        for model, (x, y) in cases:
            ckpts = _ckpts(model)
            ref = reference_scores(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE)
            if question == "influence":
                assert_close(tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE), ref.influence)
            else:
                assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=CE), ref.self_influence)
        assert blocked == formed, blocked
    stem = _layers.Site("stem", "conv", "stem.weight", "stem.bias", (72, 2, 3, 3))
    assert _layers.channel_split(stem, torch.device("cpu")) and not _layers.channel_split(stem, torch.device("cuda"))


class SparseBag(nn.Module):
    def __init__(self, offsets=False):
        super().__init__()
        self.offsets, self.out = offsets, nn.Linear(4, 3)
        self.emb = nn.EmbeddingBag(12, 4, sparse=True) if offsets else nn.Embedding(12, 4, sparse=True)

    def forward(self, ids):
        if self.offsets:  # (flat ids and offsets, torchtext's form: the fused op)
            return self.out(torch.tanh(self.emb(ids.flatten(), torch.arange(0, ids.numel(), ids.shape[1]))))
        return self.out(torch.tanh(self.emb(ids)).mean(1))


@pytest.mark.filterwarnings("ignore:torch.func.vmap failed on this model")
@pytest.mark.parametrize("offsets", [False, True], ids=["embedding", "bag_with_offsets"])
@pytest.mark.parametrize("factored", [None, False])
def test_an_embedding_with_sparse_gradients_on_every_path(factored, offsets):
    """`sparse=True` gives the per-example loop sparse gradients, which a dense route cannot reshape (a raw torch
    error with `factored=False`): they are made dense where they are stacked. Planning reads them too (a bag given
    offsets raised torch's sparse `ne` error on the default path; a review helper's); the loop's warning names
    `sparse=False`."""
    model = SparseBag(offsets).double().eval()
    gen = torch.Generator().manual_seed(0)
    train = (torch.randint(0, 12, (6, 5), generator=gen), torch.randint(0, 3, (6,), generator=gen))
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, train, train, loss_fn=CE)
    assert_close(tc.influence(model, ckpts, train, train, loss_fn=CE, factored=factored), ref.influence)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, factored=factored), ref.self_influence)
    if offsets:  # (torch's list of backends and build advice left out of the cause)
        assert any("with `sparse=False` the same scores run under vmap" in str(w.message) for w in seen)
        assert not any("these backends" in str(w.message) or "Facebook" in str(w.message) for w in seen)


class TiedHead(nn.Module):
    def __init__(self, head_first=False, bias=False):
        super().__init__()
        if head_first:  # (the head's name is then the shared tensor's first)
            self.head = nn.Linear(4, 10, bias=bias)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=bias)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def test_last_layer_with_a_tied_weight_names_the_shared_tensor():
    """Refused whichever name the shared tensor has first (the head registered before the Embedding scored the
    shared tensor's whole gradient as "the last layer's", silently)."""
    ids, y = torch.randint(0, 10, (4, 3)), torch.randint(0, 10, (4,))
    for head_first, first in ((False, "emb.weight"), (True, "head.weight")):
        model = TiedHead(head_first).double().eval()
        shared = rf"shares its weight 'head.weight' with 'emb.weight'.*params=\['{first}'\]"
        with pytest.raises(ValueError, match=shared):
            tc.self_influence(model, _ckpts(model), (ids, y), loss_fn=CE, method="last_layer")
    model = TiedHeadOnFirstRow().double().eval()
    model.emb.requires_grad_(False)  # (a frozen tied head: the tying refusal advised scoring it, found by review)
    with pytest.raises(ValueError, match="the last nn.Linear 'head' has no trainable parameter"):
        tc.self_influence(model, _ckpts(model), (torch.randint(0, 11, (4, 6)), y), loss_fn=CE, method="last_layer")


def test_a_tied_tensor_is_selected_and_saved_under_any_of_its_names():
    """`layers=['head']` selected the head's bias alone (its weight is the Embedding's, named there first), silently;
    `params=['head.weight']` was unknown; a checkpoint holding the tensor only under the head's name was missing it."""
    model = TiedHead(bias=True).double().eval()
    gen = torch.Generator().manual_seed(0)
    train = (torch.randint(0, 10, (5, 3), generator=gen), torch.randint(0, 10, (5,), generator=gen))
    test = (train[0][:2], train[1][:2])
    ckpts = _ckpts(model)
    want = reference_scores(model, ckpts, train, test, loss_fn=CE, params=["emb.weight", "head.bias"]).influence
    for selection in ({"layers": ["head"]}, {"params": ["head.weight", "head.bias"]},
                      {"params": lambda n: n.startswith("head")}):  # fmt: skip
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, **selection), want)
    saved_as_head = [tc.Checkpoint({k: v for k, v in c.params.items() if k != "emb.weight"}, c.lr) for c in ckpts]
    assert_close(tc.influence(model, saved_as_head, train, test, loss_fn=CE, layers=["head"]), want)


class TiedEverywhere(nn.Module):
    """One [V, d] tensor used as an Embedding (with padding), a Linear head, and again as a Linear over the tokens;
    a second tensor shared by two Linears, one with a bias of its own; T = 6 tokens."""

    def __init__(self, conv1d=None):
        super().__init__()
        self.emb = nn.Embedding(40, 16, padding_idx=0)
        self.head, self.mix = nn.Linear(16, 40, bias=False), nn.Linear(16, 40, bias=False)
        self.head.weight = self.mix.weight = self.emb.weight
        self.a, self.b = nn.Linear(40, 40, bias=False), nn.Linear(40, 40)
        self.b.weight = self.a.weight
        self.out = nn.Linear(40, 3)

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))  # [B, T, d]
        h = torch.tanh(self.mix(h))  # [B, T, V]
        return self.out(torch.tanh(self.b(torch.tanh(self.a(h)))).mean(1) + self.head(h[..., :16].mean(1)))


def test_self_influence_keeps_tied_weights_factored_with_the_cross_terms_between_uses():
    """Self-influence keeps a tied weight as every use's factors (Embedding ids with padding against Linear rows,
    Linear against Linear) when that is cheaper, exact against the loop reference; a use with a bias of its own
    keeps the materialised route; influence plans materialise."""
    torch.manual_seed(0)
    model = TiedEverywhere().double().eval()
    ids = torch.randint(0, 40, (7, 6))
    ids[:, -2:] = 0  # padding tokens
    data = (ids, torch.randint(0, 3, (7,)))
    ckpts = _ckpts(model)
    routes = {r.parameter: r for r in tc.explain(model, ckpts, data, loss_fn=CE, question="self_influence").routes}
    assert routes["emb.weight"].route == "factored" and routes["emb.weight"].reason.startswith("tied weight, every use")
    assert routes["a.weight"].route == "materialised"  # b, a use of a.weight, has a bias of its own
    explained = {r.parameter: r.route for r in tc.explain(model, ckpts, data, loss_fn=CE).routes}
    assert explained["emb.weight"] == "materialised"
    ref = reference_scores(model, ckpts, data, loss_fn=CE)
    for factored in (None, True):
        got = tc.self_influence(model, ckpts, data, loss_fn=CE, factored=factored, batch_size=4)
        assert_close(got, ref.self_influence, 1e-12, msg=factored)
    per_layer = tc.self_influence(model, ckpts, data, loss_fn=CE, per_layer=True)
    assert_close(sum(per_layer.values()), ref.self_influence, 1e-12)
    emb_only = reference_scores(model, ckpts, data, loss_fn=CE, params=["emb.weight"]).self_influence
    assert_close(per_layer["emb"], emb_only, 1e-12)


def test_transformers_conv1d_is_a_transposed_linear_site():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Gpt2Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj, self.fc = Conv1D(6, 3), Conv1D(3, 6), nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.c_proj(torch.tanh(self.c_fc(x)))).mean(1))

    class Scaled(Conv1D):  # a subclass is not recognised: it may compute anything
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = Gpt2Mlp().double().eval()
    x, y = torch.randn(8, 2, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))
    projected = [  # a Conv1D weight [d_in, d_out] gets the same projection from factors as materialised
        tc.embeddings(model, _ckpts(model), (x, y), loss_fn=CE, projection_dim=16, factored=f) for f in (True, False)
    ]
    assert_close(*projected)
    plan = _plan(model, (x, y), factored=True)
    assert plan.batched and {s.path for s in plan.sites if s.transposed} == {"c_fc", "c_proj"}
    model.c_fc = Scaled(6, 3).double()
    assert "c_fc" not in {s.path for s in _plan(model, (x, y), factored=True).sites}
    _assert_paths_agree(model, (x, y), (x[:3], y[:3]))



class NodesOfAGraph(nn.Module):
    """Node classification: two message-passing layers over a graph the model holds, each example a node's row."""

    def __init__(self, nodes=500, edges=4000):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("features", torch.randn(nodes, 8, generator=gen))
        self.register_buffer("edges", torch.randint(0, nodes, (2, edges), generator=gen))
        self.l1, self.l2 = nn.Linear(8, 64), nn.Linear(64, 3)

    def forward(self, idx):
        src, dst = self.edges
        h = torch.relu(self.l1(self.features))
        h = torch.zeros_like(h).index_add_(0, dst, h[src])  # [edges, 64] messages, read by every node's loss
        return self.l2(h)[idx]


def test_the_batch_size_of_a_per_example_route_counts_what_every_example_reads():
    """A node's loss reads the whole graph's messages, made from the checkpoint alone: the batch size counted the
    largest tensor made from the example (12 bytes), and vmap(grad) held each example's gradient of the messages (a
    review helper's GCN: 1.4 GB at 512 examples, 0.5 GB at 16). Where examples are differentiated one by one, it is
    counted too."""
    model = NodesOfAGraph().eval()
    idx = torch.arange(40)
    explained = tc.explain(model, _ckpts(model), (idx, torch.randint(0, 3, (40,))), loss_fn=CE)
    assert "vmap(grad)" in explained.batching, explained.batching
    assert explained.tensor_bytes >= 4000 * 64 * 4
    assert explained.batch_size <= (16 << 20) // (4000 * 64 * 4)


class _BackcastBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.back, self.fore = nn.Linear(24, 16), nn.Linear(16, 24), nn.Linear(16, 6)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.back(h), self.fore(h)


class NBeatsLike(nn.Module):
    """N-BEATS's blocks: the last block's backcast Linear runs and its output is never read."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_BackcastBlock(), _BackcastBlock()])

    def forward(self, x):
        forecast = 0
        for block in self.blocks:
            backcast, fore = block(x)
            x, forecast = x - backcast, forecast + fore
        return forecast


@pytest.mark.parametrize("factored", [None, True])
def test_aggregate_over_a_layer_whose_every_row_is_dropped(factored):
    """A Linear run whose output the loss never reads: its rows of zero output gradient all dropped, the test side's
    total reshaped 0 rows by -1 (a raw "cannot reshape tensor of 0 elements", a review helper's N-BEATS)."""
    torch.manual_seed(0)
    model = NBeatsLike().double().eval()
    ckpts, mse = _ckpts(model), nn.MSELoss()
    train = (torch.randn(10, 24, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64))
    test = (torch.randn(3, 24, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
    want = reference_scores(model, ckpts, train, test, loss_fn=mse).influence.sum(0, keepdim=True)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=mse, aggregate=True, factored=factored), want)

def test_explain_names_every_route_and_reason():
    torch.manual_seed(0)
    model = GroupedConvs().double().eval()
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    plan = tc.explain(model, _ckpts(model), (x, y), loss_fn=CE)
    routes = {r.parameter: r.route for r in plan.routes}
    assert routes == {n: "factored" if n.startswith("fc.") else "materialised" for n, _ in model.named_parameters()}
    assert plan.batching == "one batched forward / backward gives every layer's factors"
    reasons = {r.parameter: r.reason for r in plan.routes}
    # 5 x 5 output positions, 2 x 3 x 3 inputs and a bias, 4 outputs
    assert reasons["c1.weight"] == "T^2 (d_in + d_out) = 14375 >= d_in d_out = 76 (T = 25)"
    assert reasons["depthwise.weight"] == "grouped convolution: per-example gradients from factors"
    lines = str(plan).splitlines()
    counts = f"materialised {len(routes) - 2}, factored 2"  # fc's weight and bias
    assert lines[0] == f"batching: {plan.batching}" and lines[2] == f"routes: {counts}"
    assert len(lines) == 4 + len(routes) + bool(plan.checked_later)  # (random images end alike: no padding)
    # the largest tensor the forward makes from one example: 6 channels of 5 x 5 in float64 (the grouped output)
    assert plan.example_bytes > 0 and plan.tensor_bytes == 6 * 5 * 5 * 8
    assert plan.batch_size == auto_batch_size(plan.example_bytes, torch.device("cpu"), tensor_bytes=plan.tensor_bytes)
    kb, tensor_kb = plan.example_bytes / 1024, plan.tensor_bytes / 1024
    per_example = f"per example: {kb:,.1f} KB of gradients, {tensor_kb:,.1f} KB in the forward's largest tensor"
    assert lines[1] == f"batch size: at most {plan.batch_size} examples ({per_example})"
    assert tc.explain(model, _ckpts(model), (x, y), loss_fn=CE, batch_size=4).batch_size == 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    assert "batch size: the data's own batches" in str(tc.explain(model, _ckpts(model), loader, loss_fn=CE))


def test_explain_calls_only_the_shared_tensor_tied():
    """A tied layer's bias is its own: its reason names the layer's weight (found by review: "tied weight")."""

    class Tied(nn.Module):  # two Linears sharing their weight; dec a transposed conv of groups 2 (no factored form)
        def __init__(self, conv: bool):
            super().__init__()
            self.enc = nn.Conv2d(2, 2, 3, groups=2 if conv else 1) if conv else nn.Linear(4, 4)
            self.dec = nn.ConvTranspose2d(2, 2, 3, groups=2) if conv else nn.Linear(4, 4)
            self.dec.weight = self.enc.weight
            self.fc = nn.Linear(32 if conv else 4, 3)

        def forward(self, x):
            return self.fc(self.dec(torch.tanh(self.enc(x))).flatten(1))

    def reasons(conv, x):
        model = Tied(conv).double().eval()
        plan = tc.explain(model, _ckpts(model), (x, torch.randint(0, 3, (6,))), loss_fn=CE)
        return {r.parameter: r.reason for r in plan.routes}

    linear = reasons(False, torch.randn(6, 4, dtype=torch.float64))
    assert linear["enc.weight"] == "tied weight: per-example gradients of every use from factors, summed"
    assert linear["enc.bias"] == linear["dec.bias"] == (
        "its layer's weight is tied: per-example gradients from factors, formed with the weight's"
    )
    conv = reasons(True, torch.randn(6, 2, 4, 4, dtype=torch.float64))
    assert conv["enc.weight"] == "its tensor is shared with a module that is not a factor site (weight tying)"
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double().eval()
    model[2].weight = model[0].bias  # (its bias, not its weight: "its layer's weight is tied" said; a review helper's)
    plan = tc.explain(model, _ckpts(model), (torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))),
                      loss_fn=CE)  # fmt: skip
    said = {r.parameter: r.reason for r in plan.routes}
    assert said["0.weight"].startswith("its layer's bias is tied") and said["2.bias"].startswith("its layer's weight")
    assert said["0.bias"].startswith("tied bias: per-example gradients of every use")
    assert conv["enc.bias"] == "a tensor of its layer is shared with a module that is not a factor site (weight tying)"


def test_leaving_the_batched_path_warns_with_the_module_and_the_reason():
    class Hooked(nn.Module):  # (its parameters meet the batch in a convolution padded by "same", unevenly: not
        def __init__(self):  # followed)
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Conv1d(1, 3, 4, padding="same")
            self.b.register_forward_hook(lambda m, args, out: 2 * out)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))[:, None]).flatten(1)

    model = Hooked().double().eval()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.warns(tc.SlowPathWarning, match=r"'b.weight' \(Conv1d has hooks, whose effect .*tc.explain"):
        tc.self_influence(model, _ckpts(model), (x, y), loss_fn=CE)
    calls = {
        "influence": lambda: tc.influence(model, _ckpts(model), (x, y), (x, y), loss_fn=CE),
        "top_k": lambda: tc.top_k(model, _ckpts(model), (x, y), (x, y), loss_fn=CE, k=2),
        "self_influence": lambda: tc.self_influence(model, _ckpts(model), (x, y), loss_fn=CE),
        "embeddings": lambda: tc.embeddings(model, _ckpts(model), (x, y), loss_fn=CE),
        "tracer": lambda: tc.tracer(model, (x, y), n_train=6, loss_fn=CE),
    }
    for name, call in calls.items():
        with pytest.warns(tc.SlowPathWarning) as caught:
            call()
        assert [w.filename for w in caught] == [__file__], name  # the caller's line, however deep the cause
    routes = {r.parameter: (r.route, r.reason) for r in tc.explain(model, _ckpts(model), (x, y), loss_fn=CE).routes}
    assert routes["b.weight"] == ("vmap", "Conv1d has hooks, whose effect on its output cannot be proven")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tc.SlowPathWarning)  # an explicit factored=False is not a surprise
        tc.self_influence(model, _ckpts(model), (x, y), loss_fn=CE, factored=False)


class TokenMixer(nn.Module):
    """A Linear on every token of ``[B, T, d]``, then a mean over tokens (its tensors grow with T). At d = 16 over T = 4
    positions: T^2 (d_in + d_out) = 528 >= d_in d_out = 272, but < (T + 1) d_in d_out."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.mix, self.head = nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)).mean(1))


def test_self_influence_factors_a_layer_whose_pairs_are_cheaper_materialised():
    """A gradient that meets only itself pays for its own materialisation: self-influence keeps the factors of a
    layer that influence materialises (its materialised gradients serve every test example), and both are exact."""
    torch.manual_seed(0)
    model = TokenMixer().double().eval()
    x, y = torch.randn(9, 4, 16, dtype=torch.float64), torch.randint(0, 3, (9,))
    ckpts = _ckpts(model)
    routes = {
        q: {r.parameter: (r.route, r.reason) for r in tc.explain(model, ckpts, (x, y), loss_fn=CE, question=q).routes}
        for q in ("influence", "self_influence")
    }
    assert routes["influence"]["mix.weight"] == ("materialised", "T^2 (d_in + d_out) = 528 >= d_in d_out = 272 (T = 4)")
    assert routes["self_influence"]["mix.weight"] == (
        "factored", "T^2 (d_in + d_out) = 528 < (T + 1) d_in d_out = 1360 (T = 4)"
    )
    ref = reference_scores(model, ckpts, (x, y), loss_fn=CE)
    assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=CE, batch_size=4), ref.self_influence, 1e-12)
    assert_close(tc.influence(model, ckpts, (x, y), (x, y), loss_fn=CE, batch_size=4), ref.influence, 1e-12)
    with pytest.raises(ValueError, match=r"`question` must be one of \('influence', 'self_influence'\), got 'self'"):
        tc.explain(model, ckpts, (x, y), loss_fn=CE, question="self")


def test_influence_on_few_test_examples_factors_a_layer_whose_forming_they_cannot_share(monkeypatch):
    """A training gradient formed for P test examples pays ``T d_in d_out`` for P products: an influence call on few
    (one prediction's proponents, a tracer's test examples) keeps the factors of a layer it forms for many, and is
    exact either way; summed test examples (``aggregate``) plan as many. ``tc.explain(n_test=...)`` shows it."""
    from tracin_func import _representations

    torch.manual_seed(0)
    model = TokenMixer().double().eval()
    x, y = torch.randn(9, 4, 16, dtype=torch.float64), torch.randint(0, 3, (9,))
    ckpts = _ckpts(model)

    def route(n_test, normalize=None):
        plan = tc.explain(model, ckpts, (x, y), loss_fn=CE, n_test=n_test, normalize=normalize)
        return next((r.route, r.reason) for r in plan.routes if r.parameter == "mix.weight")

    assert route(None) == ("materialised", "T^2 (d_in + d_out) = 528 >= d_in d_out = 272 (T = 4)")
    assert route(1) == ("factored", "T^2 (d_in + d_out) = 528 < (T + 1) d_in d_out = 1360 (T = 4)")
    assert route(4) == ("factored", "P T^2 (d_in + d_out) = 2112 < (T + P) d_in d_out = 2176 (T = 4, P = 4)")
    assert route(5) == ("materialised", "P T^2 (d_in + d_out) = 2640 >= (T + P) d_in d_out = 2448 (T = 4, P = 5)")
    assert route(4, "cosine") == route(5)  # (the norm taken too: as influence(normalize="cosine") plans 4)
    dotted = []
    factored_dot = _representations.Factored.dot

    def spy(self, other):
        dotted.append(self.site.path)
        return factored_dot(self, other)

    monkeypatch.setattr(_representations.Factored, "dot", spy)
    ref = reference_scores(model, ckpts, (x, y), loss_fn=CE).influence
    for n_test, factored in ((1, True), (4, True), (5, False)):
        dotted.clear()
        test = (x[:n_test], y[:n_test])
        assert_close(tc.influence(model, ckpts, (x, y), test, loss_fn=CE, batch_size=4), ref[:n_test], 1e-12)
        assert ("mix" in dotted) == factored, n_test
    dotted.clear()
    summed = tc.influence(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=CE, aggregate=True)
    assert "mix" not in dotted
    assert_close(summed, ref[:2].sum(0, keepdim=True), 1e-12)
    dotted.clear()
    tracer = tc.tracer(model, (x[:1], y[:1]), n_train=9, loss_fn=CE, dtype=torch.float64)
    state = tracer.update(tracer.init(), dict(ckpts[0].params), torch.tensor(1.0), (x, y), torch.arange(9))
    assert "mix" in dotted
    step = reference_scores(model, ckpts[:1], (x, y), loss_fn=CE).influence[:1] / ckpts[0].lr  # lr 1 at ckpts[0]
    assert_close(state.scores, step, 1e-12)
    for bad, error, why in ((0, ValueError, "got 0"), (2.0, TypeError, "got 2.0 of type float")):
        with pytest.raises(error, match=f"`n_test` must be a positive int, {why}"):
            tc.explain(model, ckpts, (x, y), loss_fn=CE, n_test=bad)
    with pytest.raises(ValueError, match='`n_test` is for question="influence"'):
        tc.explain(model, ckpts, (x, y), loss_fn=CE, question="self_influence", n_test=1)
    with pytest.raises(ValueError, match='`normalize` is for question="influence"'):  # (as `self_influence` refuses it)
        tc.explain(model, ckpts, (x, y), loss_fn=CE, question="self_influence", normalize="cosine")


def test_a_training_gradients_own_norm_counts_among_the_products_it_takes_part_in(monkeypatch):
    """Scores divided by the training gradients' norms (cosine, ``normalize="train"``) and a tracer's step (its
    self-influence) take each training gradient's norm as well as its products with the test examples: one more
    partner in the plan. The TokenMixer's layer is factored for 4 partners and formed for 5, and exact either way."""
    from tracin_func import _representations

    torch.manual_seed(0)
    model = TokenMixer().double().eval()
    x, y = torch.randn(9, 4, 16, dtype=torch.float64), torch.randint(0, 3, (9,))
    ckpts, test = _ckpts(model), (x[:4], y[:4])
    dotted = []
    factored_dot, factored_norm = _representations.Factored.dot, _representations.Factored.sq_norm
    monkeypatch.setattr(_representations.Factored, "dot", lambda f, o: dotted.append(f.site.path) or factored_dot(f, o))
    monkeypatch.setattr(_representations.Factored, "sq_norm", lambda f: dotted.append(f.site.path) or factored_norm(f))
    for normalize, factored in ((None, True), ("train", False), ("cosine", False)):
        dotted.clear()
        opts = dict(loss_fn=CE, normalize=normalize, batch_size=4)
        got = tc.influence(model, ckpts, (x, y), test, **opts)
        assert ("mix" in dotted) == factored, normalize
        assert_close(got, tc.influence(model, ckpts, (x, y), test, factored=False, **opts), 1e-12)
    params, lr = dict(ckpts[0].params), torch.tensor(1.0)
    ref = reference_scores(model, ckpts[:1], (x, y), loss_fn=CE)
    for n_test, factored in ((3, True), (4, False)):
        dotted.clear()
        tracer = tc.tracer(model, (x[:n_test], y[:n_test]), n_train=9, loss_fn=CE, dtype=torch.float64)
        state = tracer.update(tracer.init(), params, lr, (x, y), torch.arange(9))
        assert ("mix" in dotted) == factored, n_test
        assert_close(state.scores, ref.influence[:n_test] / ckpts[0].lr, 1e-12)
        assert_close(state.self_influence, ref.self_influence / ckpts[0].lr, 1e-12)


class Wide(nn.Module):
    """16 MB of weights (dense per-sample gradients: 16 examples per batch) whose factors take 20 KB per example."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4096, 1024)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_the_automatic_batch_size_follows_the_plan(as_dataset):
    """A batch or a Dataset is planned on its first examples and cut for the plan's factors (not for dense
    per-sample gradients: 16 examples) from the first batch on, in even batches. Scores equal those of an explicit
    batch size."""
    torch.manual_seed(0)
    model = Wide().eval()
    x, y = torch.randn(100, 4096), torch.randint(0, 1024, (100,))
    sizes = []

    def losses(state, batch):
        sizes.append(len(batch[0]))
        logits = torch.func.functional_call(model, state, (batch[0],))
        return nn.functional.cross_entropy(logits, batch[1], reduction="none")

    data = torch.utils.data.TensorDataset(x, y) if as_dataset else (x, y)
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.5)]
    got = tc.self_influence(model, ckpts, data, loss_fn=tc.BatchLoss(losses))
    assert [s for s in sizes if s > 6] == [100]  # planning runs the first 4 alone, then 6 rows together
    assert_close(got, tc.self_influence(model, ckpts, data, loss_fn=tc.BatchLoss(losses), batch_size=7), 1e-5)


def test_influence_sizes_training_batches_for_training_examples():
    """Influence plans on the test data's first examples: short queries (T = 1) against long documents (T = 128) had
    the training batches sized by the queries (all 600 in one batch, its largest tensor 19 MB, past the 16 MB an
    automatic CPU batch keeps to), 512 as self-influence and explain size them. Scores equal a batch size's."""
    torch.manual_seed(0)
    model = TokenMixer(64).eval()
    train = (torch.randn(600, 128, 64), torch.randint(0, 3, (600,)))
    test = (torch.randn(2, 1, 64), torch.tensor([0, 2]))
    sizes = []

    def losses(state, batch):
        sizes.append(len(batch[0]))
        logits = torch.func.functional_call(model, state, (batch[0],))
        return nn.functional.cross_entropy(logits, batch[1], reduction="none")

    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.5)]
    got = tc.influence(model, ckpts, train, test, loss_fn=tc.BatchLoss(losses))
    assert max(sizes) <= tc.explain(model, ckpts, train, loss_fn=tc.BatchLoss(losses), n_test=2).batch_size == 512
    assert_close(got, tc.influence(model, ckpts, train, test, loss_fn=nn.CrossEntropyLoss(), batch_size=100), 1e-5)


def test_a_failing_training_example_is_named_where_influence_sizes_its_batches():
    """Sizing the training batches runs a training example's forward inside the test data's planning: one that failed
    (a label out of range) raised torch's bare error there; the scoring pass names it, and a loader's batches, which
    the automatic size does not cut, are not read for it."""
    torch.manual_seed(0)
    model = TokenMixer(64).eval()
    x, y = torch.randn(6, 8, 64), torch.tensor([7, 0, 1, 2, 0, 1])
    test = (torch.randn(2, 1, 64), torch.tensor([0, 2]))
    ckpts = [tc.Checkpoint(dict(model.state_dict()), lr=0.5)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    for train in ((x, y), loader):
        with pytest.raises(IndexError, match=r"^`train` example 0 cannot be scored: IndexError: Target 7 is out"):
            tc.influence(model, ckpts, train, test, loss_fn=nn.CrossEntropyLoss())


class PositionsAndWords(nn.Module):
    """Word and position embeddings (positions 0..T-1 in every example, like BERT's), summed, then a head."""

    def __init__(self):
        super().__init__()
        self.words, self.positions = nn.Embedding(500, 6, padding_idx=0), nn.Embedding(64, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        return self.head(torch.tanh(self.words(ids) + self.positions(positions)).mean(1))


def test_token_rows_are_kept_where_ids_rarely_recur_across_examples():
    """V >= 8 T for both Embeddings; the influence plan looks at the ids of the first examples: positions match T
    times per pair of examples (materialised), words rarely (token rows); self-influence keeps both factored."""
    torch.manual_seed(0)
    model = PositionsAndWords().double().eval()
    ids = torch.randint(1, 500, (9, 8))
    ids[:, -2:] = 0  # padding matches nothing
    data, ckpts = (ids, torch.randint(0, 3, (9,))), _ckpts(model)
    routes = {r.parameter: (r.route, r.reason) for r in tc.explain(model, ckpts, data, loss_fn=CE).routes}
    assert routes["positions.weight"] == (
        "materialised", "Embedding: 8.0 equal ids per pair of the first examples: 16 x 8.0 >= V = 64, materialising "
        "costs less"
    )  # fmt: skip
    assert routes["words.weight"][0] == "factored" and "token rows" in routes["words.weight"][1]
    plan = tc.explain(model, ckpts, data, loss_fn=CE, question="self_influence")
    assert {r.parameter: r.route for r in plan.routes}["positions.weight"] == "factored"
    ref = reference_scores(model, ckpts, data, data, loss_fn=CE)
    assert_close(tc.influence(model, ckpts, data, data, loss_fn=CE, batch_size=4), ref.influence, 1e-12)
    assert_close(tc.self_influence(model, ckpts, data, loss_fn=CE, batch_size=4), ref.self_influence, 1e-12)


def test_the_automatic_batch_size_is_cache_sized_on_cpu():
    """256 MB of representations bound every device; on CPU a batch holds 64 MB of representations, at least 128 and
    at most 512 examples, or 4 MB when that is more (small examples), fewer where the forward's largest tensor would
    outgrow 16 MB, and never fewer than 16 (but where 16 would pass the 256 MB) or more than 4096."""
    from tracin_func._setup import auto_batch_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_batch_size(27_436, cuda) == 4096  # the digits CNN's factors: 256 MB hold 9784
    assert auto_batch_size(27_436, cpu) == 512
    assert auto_batch_size(10_000, cpu) == 512  # 4 MB hold 419
    assert auto_batch_size(5_000, cpu) == (1 << 22) // 5_000 == 838  # 4 MB hold more than 512 examples
    assert auto_batch_size(208_788, cpu) == (1 << 26) // 208_788 == 321  # the tiny transformer's: 64 MB
    assert auto_batch_size(672_768, cpu) == 128  # GPT-2's: 64 MB hold 99, but at least 128 examples
    assert auto_batch_size(672_768, cuda) == 399
    assert auto_batch_size(2_356, cpu) == 1780 and auto_batch_size(2_356, cuda) == 4096  # the digits MLP's
    assert auto_batch_size(6_371_628, cpu) == auto_batch_size(6_371_628, cuda) == 42  # ResNet-18's: memory bounds it
    assert auto_batch_size(16 << 20, cpu) == auto_batch_size(16 << 20, cuda) == 16
    assert auto_batch_size(50 << 20, cpu) == auto_batch_size(50 << 20, cuda) == 5  # (16 of them held 800 MB)
    assert auto_batch_size(1 << 30, cpu) == auto_batch_size(1 << 30, cuda) == 1  # (16 GB)
    mamba = dict(tensor_bytes=256 << 10)  # its scan's [B, 128, 32, 16] float32 tensors
    assert auto_batch_size(517_939, cpu, **mamba) == 64 and auto_batch_size(517_939, cuda, **mamba) == 518
    assert auto_batch_size(672_768, cpu, tensor_bytes=128_000) == 128  # GPT-2's logits: 32 tokens of 1000 classes
    assert auto_batch_size(27_436, cpu, tensor_bytes=8 << 10) == 512
    assert auto_batch_size(100, cpu, tensor_bytes=1 << 20) == 16  # never fewer


def test_the_batch_size_before_a_plan_is_at_least_16():
    """Before a plan (index builds cut their rows by it), the size counts dense gradients, which overstate what most
    plans hold: bounded below 16 by them, a 69 MB model's build ran in batches of 3."""
    from tracin_func._setup import make_setup

    model = torch.nn.Linear(4096, 1100)  # 18 MB of dense gradients an example: 256 MB hold 14
    setup = make_setup(model, [tc.Checkpoint(dict(model.state_dict()), 0.1)], loss_fn=torch.nn.MSELoss())
    assert setup.auto_batch and setup.batch_size == 16


class HeldAsFactors(nn.Module):
    """Token ids through an Embedding of few rows and positions through another (each materialised on the rows its
    ids touch), a token-wise Linear (materialised: 12 rows per example), their mean through a classifier (factored:
    one row)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(16, 8), nn.Embedding(12, 8)
        self.mix, self.fc = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]  # [1, T]: the same ids for every example
        return self.fc(self.mix(self.emb(ids) + self.pos(positions)).tanh().mean(1))


def test_the_automatic_batch_size_counts_what_a_batch_holds_until_scored():
    """A layer formed when scored is held as its factors until then, ``T (d_in + d_out)`` entries per example (more
    than its gradient here), an Embedding materialised on the rows its ids touch as those rows where every example
    reads the same ids (positions: ``U d``, less than its gradient), and its gradient where examples read other ids
    (the rows a batch touches grow with it): the automatic batch size follows what a batch holds."""
    from tracin_func._setup import auto_batch_size

    torch.manual_seed(0)
    model = HeldAsFactors().double().eval()
    ids, y = torch.randint(0, 16, (6, 12)), torch.randint(0, 3, (6,))
    plan = tc.explain(model, _ckpts(model), (ids, y), loss_fn=CE)
    routes = {r.parameter: r.route for r in plan.routes}
    assert routes == {n: "factored" if n.startswith("fc.") else "materialised" for n, _ in model.named_parameters()}
    # the tokens' gradient, the positions' rows, the Linears' inputs with a one and their outputs
    held = 16 * 8 + 12 * 8 + 12 * (8 + 1 + 8) + 1 * (8 + 1 + 3)
    assert plan.example_bytes == 8 * held  # (their gradients: 16 * 8 + 12 * 8 + 8 * 9 + 3 * 9 entries)
    assert plan.batch_size == auto_batch_size(8 * held, torch.device("cpu"), tensor_bytes=plan.tensor_bytes)


class Outer(nn.Module):
    """A forward making an outer product of each example's features, ``[B, 1024, 512]`` (4 MB per example in
    float64), or not; either way a tensor of 8 MB made from the checkpoint alone (a buffer's), and a view expanded to
    4 MB."""

    def __init__(self, outer: bool):
        super().__init__()
        self.outer, self.a, self.b = outer, nn.Linear(8, 1024), nn.Linear(8, 512)
        self.register_buffer("table", torch.randn(1024, 1024) / 1024)
        self.head = nn.Linear(512, 3)

    def forward(self, x):
        mixed = self.a(x) @ self.table.exp()  # (the exponential: made from the checkpoint alone)
        spread = self.b(x)[:, None, :].expand(-1, 1024, -1)  # (a view: no tensor made)
        if self.outer:
            return self.head((mixed[:, :, None] * spread).mean(1))
        return self.head(mixed[:, :512] * spread.mean(1))


def test_the_automatic_batch_size_keeps_the_forwards_largest_tensor_cached_on_cpu():
    """The plan measures the largest tensor one example's forward makes from the example: an outer product of 4 MB
    per example gets batches of 16 on CPU (the least; 4 fit 16 MB), exact over them; the checkpoint's own tensors,
    however large, and views count for nothing."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 8, dtype=torch.float64), torch.randint(0, 3, (40,))
    plans = {}
    for outer, tensor_bytes in ((True, 1024 * 512 * 8), (False, 1024 * 8)):
        model = Outer(outer).double().eval()
        plan = plans[outer] = tc.explain(model, _ckpts(model), (x, y), loss_fn=CE)
        assert plan.tensor_bytes == tensor_bytes
        assert plan.batch_size == auto_batch_size(plan.example_bytes, torch.device("cpu"), tensor_bytes=tensor_bytes)
    assert plans[True].batch_size == 16 and plans[False].batch_size > 40
    model = Outer(True).double().eval()
    ref = reference_scores(model, _ckpts(model), (x, y), (x, y), loss_fn=CE).self_influence
    assert_close(tc.self_influence(model, _ckpts(model), (x, y), loss_fn=CE), ref, 1e-12)


# ---------------------------------------------------------------------------------------------- elementwise scales


class RMSNorm(nn.Module):
    """Llama's RMSNorm as a model defines it: a layer of no known kind whose weight scales its output elementwise."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class ScaleShift(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return torch.addcmul(self.bias, x, self.weight)


class Scaled(nn.Module):
    """Tokens through ``norm`` (called twice: its calls' gradients add up) and a scale-and-shift, then a head."""

    def __init__(self, norm):
        super().__init__()
        self.emb, self.norm, self.shift, self.fc = nn.Embedding(50, 8), norm, ScaleShift(8), nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.norm(self.shift(self.norm(self.emb(ids)))).mean(1))


def _scaled_task(norm):
    torch.manual_seed(0)
    model = Scaled(norm).double().eval()
    train = (torch.randint(0, 50, (7, 5)), torch.randint(0, 3, (7,)))
    test = (torch.randint(0, 50, (3, 5)), torch.randint(0, 3, (3,)))
    return model, _ckpts(model), train, test


class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm: its weight and bias passed to ``F.layer_norm``, which wants them of the normalized shape."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.linspace(0.5, 1.5, d)), nn.Parameter(torch.linspace(-1, 1, d))

    def forward(self, x):
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class FunctionalRMSNorm(RMSNorm):
    def forward(self, x):
        return nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _batched_routes(model, ckpts, train, test) -> dict[str, tuple[str, str]]:
    """Each parameter's route and the start of its reason, after checking that the call is exact against the reference
    and stays on the batched path, unwarned."""
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow-path warning
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
        plan = tc.explain(model, ckpts, train, loss_fn=CE)
    assert plan.batching == "one batched forward / backward gives every layer's factors"
    return {r.parameter: (r.route, r.reason.split(":")[0]) for r in plan.routes}


@pytest.mark.parametrize("norm", [RMSNorm, NanoLayerNorm, FunctionalRMSNorm])
def test_elementwise_scales_run_batched_and_exact(norm):
    """Vectors of layers of no known kind (an RMSNorm, a scale-and-shift) get per-example gradients from copies
    expanded over the batch: the call stays on the batched path, and the scores equal the reference. A norm passing
    them to `F.layer_norm` / `F.rms_norm` (nanoGPT's) sent the whole model to `vmap(grad)` (torch refused copies of
    another shape than the normalized one)."""
    routes = _batched_routes(*_scaled_task(norm(8)))
    for name in ("norm.weight", "shift.weight", "shift.bias", *(["norm.bias"] if norm is NanoLayerNorm else [])):
        assert routes[name] == ("materialised", "expanded"), routes


class InlineNorm(nn.Module):
    """Its own vectors passed to `F.layer_norm` on a hidden state of another rank than its output: copies do not fit,
    the vectors are followed to where they meet the batch (the norm's product and sum)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, 3)
        self.w, self.b = nn.Parameter(torch.linspace(0.5, 1.5, 8)), nn.Parameter(torch.linspace(-1, 1, 8))

    def forward(self, ids):
        return self.fc(nn.functional.layer_norm(self.emb(ids), (8,), self.w, self.b, 1e-5)).mean(1)


def test_vectors_passed_to_a_functional_norm_are_followed_to_the_batch():
    """Found by review: the whole model went to `vmap(grad)` (the norm was no meeting with the batch)."""
    _, _, train, test = _scaled_task(nn.Identity())
    model = InlineNorm().double().eval()
    routes = _batched_routes(model, _ckpts(model), train, test)
    assert routes["w"] == routes["b"] == ("materialised", "followed"), routes


class FirstEntry(nn.Module):
    """Scales by the weight's first entry: an expanded copy's first row is a whole vector, not that entry."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight[0]


class Summed(nn.Module):
    """Scales by the weight's sum: over expanded copies, a sum over the batch (examples would interact)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight.sum()


class Diagonal(nn.Module):
    """Multiplies by ``torch.diag(weight)``, which takes 1-D or 2-D tensors: an expanded copy breaks it."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x @ torch.diag(self.weight)


class GroupNormed(nn.Module):
    """Its weight and bias given to ``F.group_norm`` over channels-first rows, which wants them of their own shape."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.linspace(0.5, 1.5, d)), nn.Parameter(torch.linspace(-1, 1, d))

    def forward(self, x):
        return F.group_norm(x.transpose(1, 2), 2, self.weight, self.bias).transpose(1, 2)


@pytest.mark.parametrize(
    ("norm", "why"),
    [
        (FirstEntry, "did not give the first example its gradient"),
        (Summed, "changed the first examples' factors"),
        (Diagonal, r"a forward with parameters copied over the batch \('.*'\) failed .*broadcast it as it is"),
        (GroupNormed, r"one given whole to an op that wants it of its own shape .*`w\[:, None\]` for `\[B, C, T\]`"),
    ],
)
def test_vectors_not_used_elementwise_are_refused_and_scored_exactly(norm, why):
    """Planning checks what an expanded copy gives: the first example's true gradient, the first examples run
    alone and together alike, no shape error; otherwise the call leaves the batched path, saying why, and is exact."""
    model, ckpts, train, test = _scaled_task(norm(8))
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with pytest.warns(tc.SlowPathWarning, match=why):
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
    with pytest.warns(tc.SlowPathWarning, match=why):
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)


class SeparableConv(nn.Module):
    """ConvBERT's separable convolution: depthwise then pointwise, plus a bias ``[C, 1]`` of its own added to the
    channels-first ``[B, C, T]`` output (a vector shaped for that broadcast)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.depthwise = nn.Conv1d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.pointwise = nn.Conv1d(c_in, c_out, 1, bias=False)
        self.bias = nn.Parameter(torch.linspace(-1, 1, c_out)[:, None])

    def forward(self, x):
        return self.pointwise(self.depthwise(x)) + self.bias


class MatrixTimesBias(SeparableConv):
    def forward(self, x):  # ``torch.mm`` takes 2-D tensors only: copies [B, C, 1] break it
        return self.pointwise(self.depthwise(x)) * torch.mm(self.bias, self.bias.t()).sum()


class TokensThroughConv(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.emb, self.conv, self.fc = nn.Embedding(50, 8), conv, nn.Linear(6, 3)

    def forward(self, ids):
        return self.fc(torch.tanh(self.conv(self.emb(ids).transpose(1, 2))).mean(2))


@pytest.mark.parametrize("conv", [SeparableConv, MatrixTimesBias])
def test_channels_first_vectors_are_expanded(conv):
    """A vector shaped ``[C, 1]`` for a channels-first output takes copies ``[B, C, 1]``: batched and exact; one used
    otherwise (here by a 2-D-only op, whose copies planning's check refuses) is followed instead: batched and exact
    too (before: vmap(grad))."""
    torch.manual_seed(0)
    plan = _exact_and_explained(TokensThroughConv(conv(8, 6)).double().eval(), *_token_task())
    routes = {r.parameter: (r.route, r.reason.split(":")[0]) for r in plan.routes}
    assert plan.batching == "one batched forward / backward gives every layer's factors"
    way = "expanded" if conv is SeparableConv else "followed"
    assert routes["conv.bias"] == ("materialised", way), routes


def test_torch_rmsnorm_is_a_norm_site():
    """``nn.RMSNorm``: per-example gradients of its weight from the normalised input, like a LayerNorm's."""
    model, ckpts, train, test = _scaled_task(nn.RMSNorm(8))
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
        routes = {r.parameter: (r.route, r.reason) for r in tc.explain(model, ckpts, train, loss_fn=CE).routes}
    assert routes["norm.weight"] == ("materialised", "norm layer")


class TupleScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight, x


class UsesTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.scale, self.fc = nn.Embedding(50, 8), TupleScale(8), nn.Linear(8, 3)

    def forward(self, ids):
        scaled, _ = self.scale(self.emb(ids))
        return self.fc(scaled.mean(1))


def test_a_vector_layer_with_a_tuple_output_is_followed():
    """Its output is no tensor to expand copies to (PoolFormer's layer scale, in a block returning a tuple): the
    vector is followed to where it meets the batch instead (it went to vmap(grad))."""
    torch.manual_seed(0)
    model = UsesTuple().double().eval()
    train, ckpts = (torch.randint(0, 50, (5, 4)), torch.randint(0, 3, (5,))), _ckpts(UsesTuple().double().eval())
    routes = {r.parameter: (r.route, r.reason) for r in tc.explain(model, ckpts, train, loss_fn=CE).routes}
    assert routes["scale.weight"][0] == "materialised" and routes["scale.weight"][1].startswith("followed: ")
    ref = reference_scores(model, ckpts, train, train, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tc.SlowPathWarning)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)


class ClassTokenEmbeddings(nn.Module):
    """ViT's embeddings: a class token and position embeddings, rows ``[1, ...]`` the layer broadcasts over the
    batch (``take_first``: position rows read as ``pos[0]``, the same for every example either way)."""

    def __init__(self, take_first=False):
        super().__init__()
        self.emb, self.take_first = nn.Embedding(50, 8), take_first
        self.cls_token, self.pos = nn.Parameter(torch.randn(1, 1, 8)), nn.Parameter(torch.randn(1, 6, 8))

    def forward(self, ids):
        h = torch.cat([self.cls_token.expand(ids.shape[0], -1, -1), self.emb(ids)], 1)
        return h + (self.pos[0] if self.take_first else self.pos)


class ClassTokenNet(nn.Module):
    def __init__(self, take_first=False):
        super().__init__()
        self.embeddings, self.fc = ClassTokenEmbeddings(take_first), nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(torch.tanh(self.embeddings(ids))[:, 0])


@pytest.mark.parametrize("take_first", [False, True])
def test_rows_broadcast_over_the_batch_get_copies_per_example(take_first):
    """A class token and position embeddings (``[1, ...]`` parameters of a custom layer) run batched and exact;
    read as ``pos[0]`` an expanded copy's first row serves every example, which the check refuses."""
    torch.manual_seed(0)
    model = ClassTokenNet(take_first).double().eval()
    ckpts = _ckpts(model)
    train = (torch.randint(0, 50, (7, 5)), torch.randint(0, 3, (7,)))
    test = (torch.randint(0, 50, (3, 5)), torch.randint(0, 3, (3,)))
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
    slow = [str(w.message) for w in caught if issubclass(w.category, tc.SlowPathWarning)]
    routes = {r.parameter: r.route for r in tc.explain(model, ckpts, train, loss_fn=CE).routes}
    if take_first:
        assert len(slow) == 2 and all("examples' factors" in m for m in slow), slow
        assert routes["embeddings.pos"] == "vmap"
    else:
        assert not slow
        assert routes["embeddings.cls_token"] == routes["embeddings.pos"] == "materialised"



@pytest.mark.parametrize("other", ["unused matrix", "positions [T, d]"])
def test_a_class_token_beside_a_parameter_of_another_shape_keeps_its_copies(other):
    """A matrix the layer never reads, or its positions stored ``[T, d]`` beside the class token: the layer's
    parameters were all left to other routes (a layer's all or none), the class token's met the batch in `cat`, and
    the whole call took vmap(grad) (a review helper's ViTs). The rows and vectors among them keep their copies."""
    torch.manual_seed(0)
    model = ClassTokenNet().double().eval()
    if other == "unused matrix":
        model.embeddings.unused = nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
    else:
        model.embeddings.pos = nn.Parameter(model.embeddings.pos.data[0].clone())
    train = (torch.randint(0, 50, (7, 5)), torch.randint(0, 3, (7,)))
    explained = _exact_and_explained(model, train, (train[0][:3], train[1][:3]))
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
    routes = {r.parameter: r.route for r in explained.routes}
    assert routes["embeddings.cls_token"] == "materialised"

def test_groupnorm_is_a_norm_site():
    """``nn.GroupNorm`` (statistics per example and group): per-example gradients of its weight and bias from the
    normalised input, summed over positions per channel, like an eval-mode BatchNorm's."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3)
    ).double().eval()
    ckpts = _ckpts(model)
    train = (torch.randn(7, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (7,)))
    test = (torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,)))
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
        plan = tc.explain(model, ckpts, train, loss_fn=CE)
    assert {r.parameter: (r.route, r.reason) for r in plan.routes}["1.weight"] == ("materialised", "norm layer")
    assert plan.batching == "one batched forward / backward gives every layer's factors"


class LegacyTanh(torch.autograd.Function):
    """An autograd.Function in the old style (no ``setup_context``), as BLOOM's GeLU: torch.func refuses it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class LegacyActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(LegacyTanh.apply(self.a(x)))


def test_a_legacy_autograd_function_runs_batched_or_by_plain_autograd():
    """Planning and the batched path use plain autograd, so the default call is exact and quiet; per-example
    torch.func (``factored=False``) cannot run the Function, so those gradients are taken by plain autograd, one
    example at a time, with a warning naming the cause."""
    torch.manual_seed(0)
    model = LegacyActivation().double().eval()
    ckpts = _ckpts(model)
    train = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    test = (torch.randn(2, 4, dtype=torch.float64), torch.randint(0, 3, (2,)))
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
    looped = r"vmap failed on this model.*one example at a time, in a loop by plain autograd.*setup_context"
    with pytest.warns(RuntimeWarning, match=looped):
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, factored=False), ref.influence)


class SparseBagOfWords(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 8, sparse=True), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def test_the_loop_warning_quotes_torchs_error_without_its_kernel_table():
    """A sparse Embedding's gradient fails under vmap (``factored=False``); the warning quoted torch's
    NotImplementedError with the table of where each dispatch key's kernel is registered after it (about 50 lines,
    7,000 characters; a helper's trial), and its list of backends and build advice (a sweep's)."""
    torch.manual_seed(0)
    model = SparseBagOfWords().double().eval()
    ckpts = _ckpts(model)
    train = (torch.randint(0, 20, (6, 5)), torch.randint(0, 4, (6,)))
    cause = r"The cause, in full: NotImplementedError: Could not run 'aten::view' with arguments from the 'SparseCPU'"
    with pytest.warns(RuntimeWarning, match=r"vmap failed on this model.*" + cause) as caught:
        said = tc.self_influence(model, ckpts, train, loss_fn=CE, factored=False)
    assert_close(said, reference_scores(model, ckpts, train, train, loss_fn=CE).self_influence)
    boilerplate = ("registered at", "these backends", "custom build", "Facebook")
    assert not [w for w in caught if any(words in str(w.message) for words in boilerplate)]


def _capped_ce(out, y):
    loss = nn.functional.cross_entropy(out, y)
    if loss > 10:  # (Python control flow on a tensor: vmap cannot run it)
        loss = loss.clamp(max=10)
    return loss


def test_the_loop_warning_of_a_criterion_says_the_call_stays_batched():
    """A criterion vmap cannot run is mapped over the batched pass's outputs one example at a time, its gradients
    still from one backward: the warning said the model's per-example gradients ran in a loop (a helper's trial)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    ckpts = _ckpts(model)
    train = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    criterion = r"vmap failed on the criterion \(`loss_fn`, over the batched forward's outputs\)"
    with pytest.warns(RuntimeWarning, match=criterion + r", so each example's loss") as caught:
        got = tc.self_influence(model, ckpts, train, loss_fn=_capped_ce)
    assert not [w for w in caught if "failed on this model" in str(w.message)]
    assert_close(got, reference_scores(model, ckpts, train, train, loss_fn=_capped_ce).self_influence)


def test_plain_grad_keeps_torch_func_grads_contract():
    """The plain-autograd stand-in for ``torch.func.grad`` gives the same trees: several argnums, aux outputs
    detached, zeros for an input the output does not use; the caller's tensors are left as they were."""
    from torch.func import grad

    from tracin_func._grads import plain_grad

    def f(a, b, c):
        return (a["w"] * b[0]).sum() + c.sum(), {"seen": a["w"] * 2}

    a, b, c = {"w": torch.randn(3)}, [torch.randn(3), torch.randn(3)], torch.ones(2)
    expected = grad(f, argnums=(0, 1), has_aux=True)(a, b, c)
    actual = plain_grad(f, argnums=(0, 1), has_aux=True)(a, b, c)
    assert optree.tree_structure(actual) == optree.tree_structure(expected)
    for x, y in zip(optree.tree_leaves(actual), optree.tree_leaves(expected)):
        assert torch.equal(x, y) and not x.requires_grad
    assert torch.equal(actual[0][1][1], torch.zeros(3))  # b[1] is unused
    assert not any(t.requires_grad for t in (a["w"], *b, c))
    assert torch.equal(plain_grad(lambda x: (x * x).sum())(c), grad(lambda x: (x * x).sum())(c))
    constant = plain_grad(lambda x, y: (y * y).sum(), argnums=0)(c, c)  # a loss using none of them: zeros
    assert torch.equal(constant, grad(lambda x, y: (y * y).sum(), argnums=0)(c, c))
    assert plain_grad(lambda d, y: (y * y).sum())({}, c) == {}  # no tensor to differentiate


# ------------------------------------------------------------------------- Embedding subclasses, flattened rows


class ScaledEmbedding(nn.Embedding):
    """Gemma's word embedding: the plain lookup, scaled."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class OffsetPositions(nn.Embedding):
    """OPT's / BART's learned positions: ids computed from the attention mask, shifted by an offset."""

    def forward(self, mask):
        return super().forward((torch.cumsum(mask, 1) * mask - 1) + 2)


class AlsoMeanOfWeight(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) + self.weight.mean()


class SubclassedEmbeddings(nn.Module):
    def __init__(self, words):
        super().__init__()
        self.words, self.positions, self.fc = words, OffsetPositions(20, 8, padding_idx=1), nn.Linear(8, 3)

    def forward(self, ids):
        mask = (ids > 0).long()
        return self.fc((self.words(ids) + self.positions(mask)).mean(1))


@pytest.mark.parametrize("words", [ScaledEmbedding, AlsoMeanOfWeight])
def test_embedding_subclasses_are_sites_at_their_lookup(words):
    """An Embedding subclass with its own forward gives factors where it calls ``F.embedding`` on its weight (the
    scale and the id arithmetic around it are differentiated as usual); another use of the weight is found and
    left to vmap(grad). Exact either way."""
    torch.manual_seed(0)
    model = SubclassedEmbeddings(words(50, 8)).double().eval()
    routes = {r.parameter: (r.route, r.reason) for r in _exact_and_explained(model, *_token_task()).routes}
    if words is ScaledEmbedding:
        assert {route for route, _ in routes.values()} <= {"factored", "materialised"}, routes
    else:
        assert routes["words.weight"] == ("vmap", "'words' is also used outside the layer (tied weight, direct use "
                                          "or a term of the loss)")


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """ConvNeXt's and timm's LayerNorm over the channels of ``[B, C, H, W]``: the plain one between two permutes."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class OwnEpsLayerNorm(nn.LayerNorm):
    def forward(self, x):  # not the layer's own configuration: an unhooked use of its parameters
        h = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, 1e-3)
        return h.permute(0, 3, 1, 2)


class DelegatingLayerNorm(nn.LayerNorm):
    """Calls a LayerNorm of its own holding the same (tied) weight and bias: a call site would also see the inner
    layer's call, counted again by the inner layer's own hook."""

    def __init__(self, d):
        super().__init__(d)
        self.inner = nn.LayerNorm(d)
        self.inner.weight, self.inner.bias = self.weight, self.bias

    def forward(self, x):
        return self.inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * 1.5


class ConvNeXtBlock(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.stem, self.norm, self.fc = nn.Conv2d(2, 6, 3, padding=1), norm(6), nn.Linear(6, 3)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)

    def forward(self, x):
        h = self.stem(x)
        return self.fc(torch.tanh(self.norm(self.dw(h)) + h).mean((2, 3)))


@pytest.mark.parametrize("norm", [ChannelsFirstLayerNorm, OwnEpsLayerNorm, DelegatingLayerNorm])
def test_layer_norm_subclasses_are_sites_at_their_call(norm):
    """A LayerNorm subclass with its own forward gives factors where it calls ``F.layer_norm`` on its own parameters
    with its own configuration (the permutes around it are differentiated as usual); a call with another
    configuration is an unhooked use, its parameters followed to the batch. Exact either way."""
    torch.manual_seed(0)
    train = (torch.randn(7, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (7,)))
    test = (torch.randn(3, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (3,)))
    explained = _exact_and_explained(ConvNeXtBlock(norm).double().eval(), train, test)
    routes = {r.parameter: (r.route, r.reason) for r in explained.routes}
    if norm is ChannelsFirstLayerNorm:
        assert explained.batching == "one batched forward / backward gives every layer's factors"
        assert routes["norm.weight"] == routes["norm.bias"] == ("materialised", "norm layer")
    elif norm is OwnEpsLayerNorm:  # followed to where they meet the batch: the norm's product and sum (was vmap)
        assert routes["norm.weight"][0] == routes["norm.bias"][0] == "materialised"
        assert routes["norm.weight"][1].startswith("followed"), routes
    else:  # a subclass with layers of its own is no call site: exact through vmap(grad) (was 4x the reference)
        assert routes["norm.weight"] == ("vmap", "DelegatingLayerNorm overrides LayerNorm's own forward")


class HandWrittenLinear(nn.Module):
    """Research code's linear layer: its own ``weight`` and ``bias`` given to ``F.linear``."""

    def __init__(self, d_in, d_out, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class HalvedLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * 0.5


class AppliedTwice(HandWrittenLinear):
    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.weight, self.bias)), self.weight, self.bias)


class BiasAddedApart(HandWrittenLinear):
    def forward(self, x):  # not the layer's own call: its parameters are used elsewhere too
        return F.linear(x, self.weight) + self.bias


class MaskedWeight(HandWrittenLinear):
    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.register_buffer("mask", (torch.rand(d_out, d_in) > 0.3).float())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class ColumnsWeight(nn.Module):
    """A weight stored ``[d_in, d_out]`` and used by ``@``: no ``F.linear`` call."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5), nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class PenalisedWeight(HandWrittenLinear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + 0.1 * self.weight.square().sum()


class TokensThrough(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.emb, self.mid, self.fc = nn.Embedding(50, 8), layer(8, 8), nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(torch.tanh(self.mid(self.emb(ids))).mean(1))


def _hand_written_mlp(layer):
    return nn.Sequential(layer(8, 8), nn.Tanh(), layer(8, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()


_OWN_CALLS = [HandWrittenLinear, functools.partial(HandWrittenLinear, bias=False), HalvedLinear, AppliedTwice]


@pytest.mark.parametrize("layer", _OWN_CALLS, ids=["bias", "no_bias", "linear_subclass", "twice"])
def test_hand_written_linear_layers_are_sites_at_their_call(layer):
    """A layer calling ``F.linear`` on its own weight and bias (a hand-written one, or an ``nn.Linear`` subclass with
    its own forward) gives factors at that call, as a Linear does; what its forward does around the call is
    differentiated as usual. An MLP of them ran through vmap(grad) (12x slower), and each of them in a larger model
    was followed to the batch, its gradients always formed."""
    torch.manual_seed(0)
    train = (torch.randn(7, 8, dtype=torch.float64), torch.randint(0, 3, (7,)))
    test = (torch.randn(3, 8, dtype=torch.float64), torch.randint(0, 3, (3,)))
    explained = _exact_and_explained(_hand_written_mlp(layer), train, test)
    assert explained.batching == "one batched forward / backward gives every layer's factors"
    assert {r.route for r in explained.routes} == {"factored"}, explained.routes
    _assert_paths_agree(_hand_written_mlp(layer), train, test)
    tokens = _exact_and_explained(TokensThrough(layer).double().eval(), *_token_task())
    assert all(r.reason.startswith("T^2") for r in tokens.routes if r.parameter.startswith("mid.")), tokens.routes


@pytest.mark.parametrize("layer", [BiasAddedApart, MaskedWeight, ColumnsWeight, PenalisedWeight])
def test_hand_written_linear_layers_used_otherwise_are_exact(layer):
    """A linear layer's parameters used other than in its own ``F.linear`` call (a bias added apart, a masked weight,
    ``x @ W``, a penalty) are no call site: followed to the batch, or through vmap(grad). Exact either way."""
    torch.manual_seed(0)
    model = TokensThrough(layer).double().eval()
    routes = {r.parameter: r for r in _exact_and_explained(model, *_token_task()).routes}
    assert all(routes[n].reason.startswith("followed") for n in ("mid.weight", "mid.bias")), routes


def test_hand_written_decoder_tied_to_the_embedding():
    """A hand-written output layer holding the token embedding's weight: both uses are sites, summed."""
    torch.manual_seed(0)

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.dec = nn.Embedding(50, 8), HandWrittenLinear(8, 50, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, ids):
            return self.dec(torch.tanh(self.emb(ids)).mean(1))

    ids = torch.randint(0, 50, (10, 5))
    explained = _exact_and_explained(TiedLM().double().eval(), (ids[:7], ids[:7, 0]), (ids[7:], ids[7:, 0]))
    assert explained.batching == "one batched forward / backward gives every layer's factors"
    assert [r.route for r in explained.routes] == ["materialised"], explained.routes


class OwnPositions(HandWrittenLinear):
    """Its own positions (a buffer ``[T, d]``, rows of no example) projected by its own call, added to the input."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.register_buffer("positions", torch.randn(5, d_in))

    def forward(self, x):
        return x + F.linear(self.positions, self.weight, self.bias)


class PositionsProjected(nn.Module):
    """A Linear fed its model's buffer ``[T, d]`` directly, its output added to every example's tokens."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.register_buffer("positions", torch.randn(5, d_in))

    def forward(self, x):
        return x + self.proj(self.positions)


@pytest.mark.parametrize("layer", [OwnPositions, PositionsProjected])
def test_a_layer_fed_a_tensor_of_the_state_runs_once_for_the_batch(layer):
    """A layer fed a buffer of the model as it is (``[T, d]``, no example's rows) runs once for the whole batch, its
    output followed to the batch. Its rows were taken for several examples' merged into one dimension, which sent the
    whole call to vmap(grad) with that reason; batches of as many examples as the buffer has rows included."""
    torch.manual_seed(0)
    model = TokensThrough(layer).double().eval()
    for n_train in (5, 7):
        explained = _exact_and_explained(model, *_token_task(n_train))
        assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
    _assert_paths_agree(model, *_token_task())


class SeedPooling(nn.Module):
    """The Set Transformer's pooling by attention (SigLIP's too): learned seeds ``[1, k, d]`` brought to the batch,
    attending over each example's set."""

    def __init__(self, d=8, k=2):
        super().__init__()
        self.seeds, self.attention = nn.Parameter(torch.randn(1, k, d)), nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x):
        return self.attention(self.seeds.repeat(x.shape[0], 1, 1), x, x)[0]


class TiledSeeds(SeedPooling):
    def forward(self, x):
        return self.attention(torch.tile(self.seeds, (x.shape[0], 1, 1)), x, x)[0]


class SeedsRepeatedByTuple(SeedPooling):
    def forward(self, x):
        return self.attention(self.seeds.repeat((x.shape[0], 1, 1)), x, x)[0]


class SeedsRepeatedTwice(SeedPooling):
    def forward(self, x):  # each seed twice: not one row per example
        return self.attention(self.seeds.repeat(x.shape[0], 2, 1), x, x)[0][:, ::2]


class SetClassifier(nn.Module):
    def __init__(self, pooling):
        super().__init__()
        self.embed, self.pool, self.fc = nn.Linear(3, 8), pooling(), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.tanh(self.embed(x))).flatten(1))


@pytest.mark.parametrize("pooling", [SeedPooling, TiledSeeds, SeedsRepeatedByTuple, SeedsRepeatedTwice])
def test_seeds_repeated_over_the_batch_stay_one_row_per_example(pooling):
    """Learned seeds ``[1, k, d]`` repeated by the batch size (``repeat(B, 1, 1)``, ``torch.tile``) are copied per
    example already (an expanded site): repeated again they took ``B^2`` rows and the call took vmap(grad). Repeated
    otherwise (each seed twice) they are not one row per example: exact either way."""
    torch.manual_seed(0)
    sets = torch.randn(10, 4, 3, dtype=torch.float64)
    labels = torch.randint(0, 3, (10,))
    model = SetClassifier(pooling).double().eval()
    explained = _exact_and_explained(model, (sets[:7], labels[:7]), (sets[7:], labels[7:]))
    if pooling is not SeedsRepeatedTwice:
        assert explained.batching == "one batched forward / backward gives every layer's factors"
        assert {r.route for r in explained.routes if r.parameter == "pool.seeds"} == {"materialised"}


class FlattensTokens(nn.Module):
    """OPT's decoder MLP: tokens flattened into rows ``[B T, d]`` before the Linear layers, restored after."""

    def __init__(self):
        super().__init__()
        self.emb, self.up, self.down, self.fc = nn.Embedding(50, 8), nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        flat = self.down(torch.tanh(self.up(h.reshape(-1, h.shape[-1]))))
        return self.fc((h + flat.reshape(h.shape)).mean(1))


class FramesInBatch(nn.Module):
    """Video frames merged into the batch for a convolution: its rows are frames, which a conv site cannot split;
    ``order``: "example" major (each example's frames in a row), or "frame" major (the first frames of every example,
    then the second ones)."""

    def __init__(self, order):
        super().__init__()
        self.order, self.conv, self.fc = order, nn.Conv2d(1, 3, 3, padding=1), nn.Linear(3, 3)

    def forward(self, video):  # [B, F, 1, H, W]
        b = video.shape[0]
        if self.order == "example":
            return self.fc(self.conv(video.flatten(0, 1)).mean((2, 3)).reshape(b, -1, 3).mean(1))  # [B F, 3, H, W]
        return self.fc(self.conv(video.transpose(0, 1).flatten(0, 1)).mean((2, 3)).reshape(-1, b, 3).mean(0))


class ConvPerExample(nn.Module):
    """A convolution called on each example without a batch dimension (a loop over the batch)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, images):
        return self.fc(torch.stack([torch.tanh(self.conv(image)).flatten(1).mean(1) for image in images]))


class FilmOfOneTask(nn.Module):
    """A FiLM of one task's embedding, looked up by a 0-d index, applied to every example."""

    def __init__(self):
        super().__init__()
        self.task, self.film = nn.Embedding(3, 4), nn.Linear(4, 10)
        self.a, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        scale, shift = self.film(self.task(torch.tensor(1))).chunk(2)
        return self.head(torch.tanh(self.a(x) * scale + shift))


def test_an_embedding_looked_up_by_a_0d_index_is_scored():
    """Regression (a review helper's hypernetwork): an Embedding looked up by a 0-d index crashed every call with a
    raw IndexError (its rows split per example); it is no site, its weight followed to the batch."""
    torch.manual_seed(0)
    x = (torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,)))
    explained = _exact_and_explained(FilmOfOneTask().double().eval(), x, x)
    why = {r.parameter: r.reason for r in explained.routes}["task.weight"]
    assert "'task' is called on an input without a batch dimension (a lookup of one 0-d index)" in why, why
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching


class FilmOfOneTaskRow(FilmOfOneTask):
    """The task's id given as `[1]` (a row), its FiLM `[1, 10]` broadcast over the batch."""

    def forward(self, x):
        scale, shift = self.film(self.task(torch.tensor([1]))).chunk(2, -1)
        return self.head(torch.tanh(self.a(x) * scale + shift))


def test_a_lookup_of_one_id_broadcast_over_the_batch_runs_batched():
    """Regression (a review helper's FiLM): an Embedding given one id `[1]` for the whole batch was no broadcast row
    (only `[1, T]` ids were), and the layer after it was refused as fed merged rows (vmap(grad)). Exact and batched."""
    torch.manual_seed(0)
    x = (torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,)))
    explained = _exact_and_explained(FilmOfOneTaskRow().double().eval(), x, x)
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching


def test_a_layer_called_on_unbatched_inputs_is_named_so():
    """A convolution called example by example on `[C, H, W]` (a review helper's trial) was said to see its output
    channels as rows of one example, and following its weight failed with torch's shape error as the cause: it is
    named as called without a batch dimension, and left to vmap(grad), exact."""
    torch.manual_seed(0)
    images = (torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    explained = _exact_and_explained(ConvPerExample().double().eval(), images, images)
    why = {r.parameter: r.reason for r in explained.routes}["conv.weight"]
    assert why == "'conv' is called on an input without a batch dimension (a loop over the batch's examples, say)"
    assert "failed" not in explained.batching, explained.batching


@pytest.mark.parametrize("order", ["example", "frame"])
def test_rows_of_examples_merged_into_the_batch_dimension(order):
    """A token-wise layer fed ``[B T, d]`` gets its rows split per example (checked example-major on the first
    examples) and runs batched. A convolution fed frames merged into the batch is no site (it sees several rows for
    one example): its weight and bias are followed into ``F.conv2d`` (before: refused, vmap(grad)), each example's
    gradient summed over its rows, example-major. Frames merged frame-major would give the rows to the wrong examples:
    the batching check refuses that, naming the layer, and vmap(grad) scores it exactly."""
    torch.manual_seed(0)
    model = FlattensTokens().double().eval()
    ckpts = _ckpts(model)
    train = (torch.randint(0, 50, (7, 5)), torch.randint(0, 3, (7,)))
    test = (torch.randint(0, 50, (3, 5)), torch.randint(0, 3, (3,)))
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
    model = FramesInBatch(order).double().eval()
    video = (torch.randn(5, 2, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    explained = _exact_and_explained(model, video, video)
    why = {r.parameter: r.reason for r in explained.routes}["conv.weight"]
    if order == "frame":
        assert explained.batching.startswith("vmap(grad) over examples: a batched forward changed the first examples' "
                                             "factors at 'conv.weight'"), explained.batching  # fmt: skip
        # (told as examples interacting alone before: a review helper's)
        assert "other than example by example (frames time-major" in explained.batching, explained.batching
        assert why.startswith("'conv' sees 2 rows for one example"), why
        return
    assert why.startswith("followed: used outside a factor site's call ('conv' sees 2 rows for one example"), why
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
    _assert_paths_agree(model, video, video)



class _RouterGate(nn.Module):
    """A hand-written gate reshaping its input to rows itself (Mixtral's router: a no-op on rows merged already)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, h):
        return F.linear(h.reshape(-1, 8), self.weight)


class RoutedTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.gate, self.fc = nn.Embedding(20, 8), _RouterGate(), nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        flat = h.view(-1, h.shape[-1])
        weights = torch.softmax(self.gate(flat), -1)
        return self.fc((flat * weights[:, :1]).reshape(h.shape).mean(1))


def test_rows_reshaped_again_within_each_row_are_followed_to_the_batch():
    """A gate's own `h.reshape(-1, d)` of rows merged before it stopped the walk back to the batch's reshape: refused
    as rows merged other than by a reshape of the batch (a review helper's trial on Mixtral's router), vmap(grad)."""
    torch.manual_seed(0)
    model = RoutedTokens().double().eval()
    train = (torch.randint(0, 20, (6, 5)), torch.randint(0, 3, (6,)))
    explained = _exact_and_explained(model, train, (train[0][:2], train[1][:2]))
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching


class _StepDecay(nn.Module):
    """RWKV's time-first pattern: a vector added to each step's slice ``[B, d]`` of its ``[B, T, d]`` input, in a
    Python loop, the input's shape unpacked first."""

    def __init__(self, d):
        super().__init__()
        self.u, self.lin = nn.Parameter(torch.linspace(-1, 1, d)), nn.Linear(d, d)

    def forward(self, x):
        batch, steps, width = x.shape
        k = self.lin(x)
        return torch.stack([torch.tanh(self.u + k[:, t]) for t in range(steps)], 1)


class StackedStepDecay(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.blocks, self.head = nn.ModuleList([_StepDecay(d), _StepDecay(d)]), nn.Linear(d, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).mean(1)


def test_copies_breaking_a_shape_unpacked_in_python_leave_them_to_vmap():
    """A vector's copies per example (``[B, 1, d]``) added to a step's ``[B, d]`` made the block's output 4-d, and the
    next block's ``B, T, C = x.shape`` raised a ValueError planning let through (a review helper's RWKV): the user was
    sent to `factored=False`. Like torch's shape errors, it sends the copies elsewhere: exact."""
    torch.manual_seed(0)
    model = StackedStepDecay().double().eval()
    train = (torch.randn(8, 5, 8, dtype=torch.float64), torch.randint(0, 3, (8,)))
    _exact_and_explained(model, train, (train[0][:2], train[1][:2]))

class GeneratedWeight(nn.Module):
    """A hypernetwork's weight generated from a learned code vector, reshaped to the target layer's shape."""

    def __init__(self):
        super().__init__()
        self.z, self.hyper, self.head = nn.Parameter(torch.randn(3)), nn.Linear(3, 20), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(F.linear(x, self.hyper(self.z).view(4, 5))))


def test_copies_failing_a_batched_forward_are_named_as_the_forwards():
    """A code vector's copies over the batch broke a reshape the model's own batched forward passes: the call said
    its batched forward "failed where examples alone ran", as if the model's (a review helper's). It names the
    copies it ran with; exact."""
    torch.manual_seed(0)
    model = GeneratedWeight().double().eval()
    train = (torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,)))
    explained = _exact_and_explained(model, train, (train[0][:2], train[1][:2]))
    assert "a batched forward with parameters copied over the batch ('z') failed where" in explained.batching


class RowsOfItsInput(nn.Module):
    """A Linear fed the model's own input ``[B, T, d]`` merged into rows ``[B T, d]``: example-major (a reshape), or
    "time"-major (the first positions of every example, then the second ones)."""

    def __init__(self, order):
        super().__init__()
        self.order, self.a, self.fc = order, nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        b, t, d = x.shape
        if self.order == "example":
            return self.fc(torch.tanh(self.a(x.reshape(-1, d))).reshape(b, t, -1).mean(1))
        return self.fc(torch.tanh(self.a(x.transpose(0, 1).reshape(-1, d))).reshape(t, b, -1).mean(0))


@pytest.mark.parametrize("order", ["example", "time"])
def test_a_layer_fed_the_models_input_merged_into_rows(order):
    """The rows' order was read from the reshaped tensor's ``_base``, the tensor its batch was sliced from: planning's
    single examples never passed, and every such model left the batched path. Rows that are a batch tensor's memory
    in order are example-major (batched); a copy in another order is refused (vmap(grad)); both exact."""
    torch.manual_seed(0)
    model = RowsOfItsInput(order).double().eval()
    gen = torch.Generator().manual_seed(1)
    train = (torch.randn(6, 3, 4, dtype=torch.float64, generator=gen), torch.randint(0, 3, (6,), generator=gen))
    test = (train[0][:2], train[1][:2])
    explained = _exact_and_explained(model, train, test)
    if order == "example":
        assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
    else:
        assert "fed rows of several examples merged into one dimension" in explained.batching, explained.batching


class Deferrable(nn.Module):
    """A Conv1d and a Linear called twice, many rows per example: both materialised from factors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3, padding=1)
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).transpose(1, 2)
        return self.b(torch.tanh(self.a(torch.tanh(self.a(h))))).mean(1)


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])  # one example per chunk (dots: the test side's rows), or all
def test_materialised_layers_are_formed_when_scored_and_exact_in_every_use(monkeypatch, tmp_path, chunk_bytes):
    """Materialised layers' per-example gradients are formed chunk by chunk when a batch is scored (``Deferred``);
    every use of a representation (dots, norms, projections, renormalised scores, per-layer shares, an index's
    columns, a tracer step) gives the vmap(grad) path's numbers."""
    import tracin_func._assemble as assemble_module
    import tracin_func._representations as representations_module
    from tracin_func._representations import Deferred

    torch.manual_seed(0)
    model = Deferrable().double().eval()
    x, y = torch.randn(11, 3, 12, dtype=torch.float64), torch.randint(0, 4, (11,))
    train, test, ckpts = (x, y), (x[:4], y[:4]), _ckpts(model)
    deferred = []
    original = assemble_module.assemble

    def spy(*args):
        rep = original(*args)
        deferred.append({p.site.path for p in rep.parts if isinstance(p, Deferred)})
        return rep

    monkeypatch.setattr(assemble_module, "assemble", spy)
    monkeypatch.setattr(representations_module, "_CHUNK_BYTES", chunk_bytes)
    results = {}
    for factored in (False, None):
        scores = _scored_every_way(model, ckpts, train, test, factored)
        opts = dict(loss_fn=CE, factored=factored, batch_size=5)
        index = tc.build_index(tmp_path / str(factored), model, ckpts, train, storage_dtype=torch.float64, **opts)
        scores += [index.self_influence(), index.embeddings()]
        tracer = tc.tracer(model, test, n_train=11, loss_fn=CE, factored=factored, dtype=torch.float64)
        params = {k: v.detach() for k, v in model.named_parameters()}
        scores.append(tracer.update(tracer.init(), params, torch.tensor(0.7), train, torch.arange(11)).scores)
        results[factored] = scores
    assert {"conv", "a", "b"} in deferred  # the default formed every layer when scored
    _assert_scores_agree(results)


def test_a_gpu_forms_a_batchs_gradients_of_a_layer_at_once():
    """On the CPU a deferred layer is formed a cache-sized chunk of examples at a time (1 MB: 16 examples of a 256 x
    64 float32 weight); on another device (a cost per kernel, no cache) the whole batch at once, up to 256 MB (what a
    batch of the automatic size holds)."""
    from tracin_func._layers import Site
    from tracin_func._representations import Factored

    site = Site("fc", "linear", "fc.weight", "fc.bias", (256, 64))

    def chunks(n, device):
        a, g = torch.empty(n, 2, 64, device=device), torch.empty(n, 2, 256, device=device)
        return Factored(site, a, g)._formed()._chunks()

    assert chunks(200, "cpu")[:2] == [slice(0, 16), slice(16, 32)] and len(chunks(200, "cpu")) == 13
    assert chunks(200, "meta") == [slice(0, 200)]
    assert chunks(5000, "meta") == [slice(0, 4096), slice(4096, 5000)]  # 4096 examples of 64 KB: 256 MB


class FunctionalConvs(nn.Module):
    """Convolutions on the model's own weight and bias, read directly (Mamba's depthwise causal ``F.conv1d``):
    ``way`` "depthwise" that (keywords); "folded": on each example's two halves in the batch dimension (``[B 2, C,
    T / 2]``); "grouped": a 2-d convolution with two groups, strides, padding and dilation, given by position;
    "volume": a 3-d one (VideoMAE's tubelets); "same": ``padding="same"``, an odd kernel's (torch's numbers);
    "same_even": an even kernel's, padded more on one side, which is not followed (refused: vmap(grad))."""

    def __init__(self, way):
        super().__init__()
        self.way, self.tok, self.fc = way, nn.Embedding(10, 4), nn.Linear(4, 3)
        shape = {"grouped": (4, 2, 2, 3), "volume": (4, 2, 1, 2, 2), "same_even": (4, 4)}.get(way, (4, 3))
        self.w, self.b = nn.Parameter(torch.randn(shape)), nn.Parameter(torch.randn(4))

    def forward(self, tokens):
        b, t = tokens.shape
        x = self.tok(tokens).transpose(1, 2)  # [B, 4, T]
        if self.way == "depthwise":
            h = F.conv1d(x, weight=self.w.unsqueeze(1), bias=self.b, padding=2, groups=4)[..., :t]
        elif self.way == "folded":
            halves = x.reshape(b, 4, 2, t // 2).transpose(1, 2).reshape(b * 2, 4, t // 2)
            h = F.conv1d(halves, self.w.unsqueeze(1), self.b, 1, 2, 1, 4)[..., : t // 2].reshape(b, 2, 4, -1)
            h = h.transpose(1, 2).flatten(2)
        elif self.way == "grouped":
            h = F.conv2d(x.reshape(b, 4, 2, t // 2), self.w, self.b, (1, 2), (1, 1), (2, 1), 2)
        elif self.way == "volume":
            h = F.conv3d(x.reshape(b, 4, 2, 2, 2), self.w, self.b, padding=(0, 1, 0), groups=2)
        else:
            h = F.conv1d(x, self.w.unsqueeze(1), self.b, padding="same", groups=4)
        return self.fc(torch.tanh(h).flatten(2).mean(2))


@pytest.mark.parametrize("way", ["depthwise", "folded", "grouped", "volume", "same", "same_even"])
def test_a_weight_read_directly_into_a_convolution_is_followed(way):
    """A followed weight meeting the batch in ``F.conv1d`` to ``F.conv3d`` was refused (vmap(grad)). Now the
    convolution is a weight product: each example's weight gradient from its input and output gradient (summed over
    its rows where the model folds them into the batch), the bias added per channel as an elementwise meeting; batched
    and exact on every path. Padding by "same" is followed where it is even (an odd kernel's; it was refused naming
    convolutions as followed: a review helper's); an even kernel's is refused, named with its fix, and exact by
    vmap."""
    torch.manual_seed(0)
    model = FunctionalConvs(way).double().eval()
    tokens, y = torch.randint(0, 10, (10, 8)), torch.randint(0, 3, (10,))
    train, test = (tokens, y), (tokens[:3], y[:3])
    explained = _exact_and_explained(model, train, test)
    if way == "same_even":
        assert "parameter 'w', computed once for the whole batch, meets the batch in a convolution padded by 'same' " \
               "with an even kernel" in explained.batching, explained.batching  # fmt: skip
        return
    assert explained.batching == "one batched forward / backward gives every layer's factors", explained.batching
    assert {r.route for r in explained.routes if r.parameter in ("w", "b")} == {"materialised"}, explained.routes
    _assert_paths_agree(model, train, test)


class RowMixer(nn.Module):
    """A Linear over 16 rows per example with 3 inputs and 4 outputs: its gradients are formed (``Deferred``), cheaper
    than factored products, on the training and the test side."""

    def __init__(self):
        super().__init__()
        self.mix, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)).mean(1))


@pytest.mark.parametrize("layout", ["row_major", "column_major", "strided"])
@pytest.mark.parametrize(("b", "k"), [(1, 5), (7, 0), (7, 3), (20, 50_000), (2, 2_000_000)])
def test_squared_norms_of_rows_in_every_layout(layout, b, k):
    """``_sq_norms`` (every per-example squared norm of formed gradients): row-major in parts of its columns,
    column-major (the test side) in blocks of its ``[K, B]`` storage (50,000 x 20 spans several), any other layout as
    given; each equal to the float64 sum of squares, in float32 to its rounding (a norm over 2M columns at once was
    8e-5 off: found by review, 1.6e-4 at 4M)."""
    from tracin_func._representations import _sq_norms

    rows = torch.randn(b, 2 * k if layout == "strided" else k, dtype=torch.float64)
    rows = {"row_major": rows, "column_major": rows.T.contiguous().T, "strided": rows[:, ::2]}[layout]
    if not k:
        assert _sq_norms(rows).tolist() == [0.0] * b
        return
    assert_close(_sq_norms(rows), (rows * rows).sum(1), 1e-12)  # (the same sums in another order)
    assert_close(_sq_norms(rows.float()).double(), (rows * rows).sum(1), 1e-6)


@pytest.mark.parametrize("whole", [False, True], ids=["chunk_by_chunk", "formed_whole"])
def test_test_batches_joined_column_major_score_exactly(monkeypatch, whole):
    """The test side's formed layers are column-major (read fastest by every training batch's products), formed
    chunk by chunk or (layers of few examples per chunk) whole, and stay so when test batches are joined into one
    chunk; the scores equal the reference."""
    import tracin_func._representations as reps

    if whole:
        monkeypatch.setattr(reps, "_COLUMN_CHUNK", 10**9)

    joined = []

    def spy(tensors):
        out = cat_examples(tensors)
        joined.append(all(reps._rows(t).T.is_contiguous() for t in (*tensors, out)) and len(tensors) > 1)
        return out

    cat_examples = reps._cat_examples
    monkeypatch.setattr(reps, "_cat_examples", spy)
    torch.manual_seed(0)
    model = RowMixer().double().eval()
    ckpts = _ckpts(model)
    train = (torch.randn(7, 16, 3, dtype=torch.float64), torch.randint(0, 3, (7,)))
    test = (torch.randn(5, 16, 3, dtype=torch.float64), torch.randint(0, 3, (5,)))
    routes = {r.parameter: r.route for r in tc.explain(model, ckpts, train, loss_fn=CE).routes}
    assert routes["mix.weight"] == "materialised" and routes["head.weight"] == "factored", routes
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, batch_size=2), ref.influence)
    assert joined and all(joined), joined


class RowByRow(nn.Module):
    """A square Linear run on each example's 1-D row in a Python loop."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.stack([torch.tanh(self.a(row)) for row in x]))


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_a_layer_run_row_by_row_in_small_batches_is_exact(batch_size):
    """Planning's check compares a layer's rows alone and together: rows of one dimension are none it can compare
    (found by review: an IndexError with batches of 1-3)."""
    model = RowByRow().double().eval()
    gen = torch.Generator().manual_seed(0)
    train = (torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, train, train, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        assert_close(tc.influence(model, ckpts, train, train, loss_fn=CE, batch_size=batch_size), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, batch_size=batch_size), ref.self_influence)


class ScaledInPlaceAfterProduct(nn.Module):
    """Attention-style heads ``[B, H, T, d]`` (a strided view) multiplied by a parameter read directly, then scaled
    in place (Longformer's ``q /= sqrt(d)``): plain autograd accepts it (matmul keeps a folded copy of ``q``)."""

    def __init__(self):
        super().__init__()
        self.emb, self.q = nn.Embedding(11, 8), nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(4, 4) * 0.4)
        self.head = nn.Linear(40, 3)

    def forward(self, ids):
        q = self.q(self.emb(ids)).view(ids.shape[0], 5, 2, 4).transpose(1, 2)
        r = torch.tanh(q @ self.w)
        q /= 2.0
        return self.head((q + r).reshape(ids.shape[0], -1))


def test_an_operand_of_a_direct_product_changed_in_place_afterwards_is_exact():
    """Each example's gradient of ``w`` is formed from ``q`` as it was in the product: changed in place since, the
    batched path is refused (found by review: ``q``'s later value read, 2.5-7.4% off, silently)."""
    torch.manual_seed(0)
    model = ScaledInPlaceAfterProduct().double().eval()
    gen = torch.Generator().manual_seed(1)
    train, test = (
        (torch.randint(1, 11, (n, 5), generator=gen), torch.randint(0, 3, (n,), generator=gen))
        for n in (9, 3)
    )
    ckpts = _ckpts(model)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with pytest.warns(tc.SlowPathWarning, match="changed in place after the product"):
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, batch_size=5), ref.influence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, batch_size=5), ref.self_influence)


class Siamese(nn.Module):
    """One encoder on both halves of a pair, scored on their difference: each example's encoder gradient is the
    difference of two nearly equal rows' where the halves are close."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        return self.head(h[:, 0] - h[:, 1])


@pytest.mark.parametrize("dtype, distance, rtol", [(torch.float64, 1e-4, 1e-10), (torch.float32, 1e-3, 1e-3)])
@pytest.mark.parametrize("formed_side_bytes", [None, 600])
def test_rows_that_cancel_are_multiplied_as_formed_gradients(monkeypatch, dtype, distance, rtol, formed_side_bytes):
    """The factored products' rounding grows with the square of how much an example's rows cancel, a formed
    gradient's with its first power: such a batch is formed (found by review: float64 4.7e-8 off, float32 6.5%), the
    smaller side in parts of at most ``_FORMED_SIDE_BYTES`` (here: one or two examples' gradients)."""
    if formed_side_bytes is not None:
        monkeypatch.setattr(tracin_func._representations, "_FORMED_SIDE_BYTES", formed_side_bytes)
    torch.manual_seed(0)
    model = Siamese().to(dtype).eval()
    gen = torch.Generator().manual_seed(0)

    def pairs(n):
        x = torch.randn(n, 1, 16, generator=gen, dtype=torch.float64)
        return torch.cat([x, x + distance * torch.randn(n, 1, 16, generator=gen, dtype=torch.float64)], 1).to(dtype)

    train, test = ((pairs(n), torch.randint(0, 2, (n,), generator=gen)) for n in (8, 3))
    ckpts = [tc.Checkpoint({k: v.to(dtype) for k, v in c.params.items()}, c.lr) for c in _ckpts(model.double())]
    model = model.to(dtype)
    params = ["enc.weight", "enc.bias"]
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE, params=params)
    routes = {r.parameter: r.route for r in tc.explain(model, ckpts, train, loss_fn=CE, params=params).routes}
    assert routes["enc.weight"] == "factored"
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, params=params), ref.influence, rtol)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, params=params), ref.self_influence, rtol)


def _weighted_by_class(out, target):  # class weights read in Python: vmap cannot run it
    weights = torch.tensor([[1.0, 2.0, 0.5][int(i)] for i in target], dtype=out.dtype)
    return F.cross_entropy(out, target, reduction="none") * weights


def test_explain_says_what_a_test_loss_that_vmap_cannot_run_does():
    """A ``test_loss_fn`` vmap cannot run makes every vmap route loop, which ``tc.explain`` says; on a batched plan,
    whose only vmap runs were a check's, it says nothing of a loop (found by review: "vmap" on the first, "examples
    run one at a time" on the second)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    train = (torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dense = tc.explain(model, _ckpts(model), train, loss_fn=CE, test_loss_fn=_weighted_by_class, factored=False)
        batched = tc.explain(model, _ckpts(model), train, loss_fn=CE, test_loss_fn=_weighted_by_class)
    assert {r.route for r in dense.routes} == {"loop"} and "one at a time" in dense.batching
    assert {r.route for r in batched.routes} == {"factored"} and "one at a time" not in batched.batching


class _ReadsItem(nn.Module):
    """Reads a value of each example with `.item()`: vmap cannot run it, examples run one at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h * (1.0 + 0.1 * h.abs().max().item()))


def test_explain_says_the_loop_of_factors_off_the_batched_path():
    """Off the batched path (a `tc.ExampleLoss`) factors come from vmap too, and from a loop where vmap fails: the
    routes said "factored" and the batching line no loop (found by review); `factored=False`'s batching line named
    it, not "no layer gives factors", and `method="last_layer"`'s routes name it, not `factored=True`."""
    model = _ReadsItem().double().eval()
    data = {"x": torch.randn(5, 4, dtype=torch.float64), "y": torch.randint(0, 3, (5,))}
    loss = tc.ExampleLoss(lambda p, b: CE(torch.func.functional_call(model, p, (b["x"],)), b["y"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plan = tc.explain(model, _ckpts(model), data, loss_fn=loss, question="self_influence")
    assert {r.route for r in plan.routes} == {"loop"} and "one at a time" in plan.batching
    sited = [r for r in plan.routes if r.reason.startswith("T^2")]  # (a site's reason said how factors are used)
    assert sited and all(r.reason.endswith("; its factors from each example alone") for r in sited), plan.routes
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    train = (torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,)))
    plan = tc.explain(mlp, _ckpts(mlp), train, loss_fn=CE, factored=False)
    assert plan.batching == "vmap(grad) over examples: `factored=False`"
    plan = tc.explain(mlp, _ckpts(mlp), train, loss_fn=CE, method="last_layer")  # (its reason said "factored=True")
    assert {r.reason for r in plan.routes} == {'method="last_layer": factored'}


class _TokenFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.up, self.head = nn.Embedding(50, 16), nn.Linear(16, 64), nn.Linear(64, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.up(self.embed(ids))).mean(1))


def test_explain_plans_on_the_test_data_as_the_call_does(monkeypatch):
    """An influence call plans on its first test examples: short queries against long documents took other routes
    than `tc.explain` planned on the documents said (left for later by review); `test=` plans as the call does."""
    import tracin_func._driver as driver

    torch.manual_seed(0)
    model = _TokenFeatures().double().eval()
    train = (torch.randint(0, 50, (12, 40)), torch.randint(0, 3, (12,)))
    test = (torch.randint(0, 50, (3, 2)), torch.randint(0, 3, (3,)))
    made, plan_call = [], driver.plan_call
    monkeypatch.setattr(driver, "plan_call", lambda *a, **k: made.append(plan_call(*a, **k)) or made[-1])
    tc.influence(model, _ckpts(model), train, test, loss_fn=CE)
    call = made[0].plan
    explained = tc.explain(model, _ckpts(model), train, test=test, loss_fn=CE)
    assert [(r.parameter, r.route) for r in explained.routes] == [(n, call.route(n)) for n in call.names]
    assert (explained.example_bytes, explained.tensor_bytes) == (call.example_bytes, call.tensor_bytes)
    on_documents = tc.explain(model, _ckpts(model), train, loss_fn=CE, n_test=3)
    assert [r.route for r in on_documents.routes] != [r.route for r in explained.routes]
    with pytest.raises(ValueError, match=r'`test` is for question="influence" \(got \'self_influence\'\)'):
        tc.explain(model, _ckpts(model), train, test=test, loss_fn=CE, question="self_influence")


_BATCHED_SIZES: list[int] = []  # (a global: the call's private copy of the model copies its lists)


class _WideActivations(nn.Module):
    """A forward whose largest tensor is 128 KB an example (the automatic size: 128 of them), batch sizes recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("ones", torch.ones(4096))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch._C._functorch.get_interpreter_stack():  # (a batched pass, not vmap's)
            _BATCHED_SIZES.append(x.shape[0])
        return self.b((torch.tanh(self.a(x))[:, :, None] * self.ones).mean(-1))


def test_explain_runs_no_larger_a_batch_than_the_call():
    """`tc.explain` ran the call's update on the data's first batch as cut before planning (1500 examples: 5x the
    memory of the call it describes); it runs the batch the plan sizes."""
    model = _WideActivations().eval()
    data = (torch.randn(1500, 4), torch.randint(0, 3, (1500,)))
    _BATCHED_SIZES.clear()
    plan = tc.explain(model, _ckpts(model), data, loss_fn=CE, question="self_influence")
    assert plan.batch_size == 128 and max(_BATCHED_SIZES) == 128


class TiedSiamese(nn.Module):
    """Two branches through one weight (two Linears tied), scored on their difference."""

    def __init__(self, d=48):
        super().__init__()
        self.fa, self.fb, self.head = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False), nn.Linear(d, 3)
        self.fb.weight = self.fa.weight

    def forward(self, x):
        return self.head(torch.tanh(self.fa(x[:, 0]) - self.fb(x[:, 1]) + 0.1))


def test_a_tied_weights_uses_that_cancel_are_normed_as_their_formed_sum():
    """Self-influence through a tied weight sums every pair of uses' products; where an example's uses cancel, the
    summed gradient is formed (found by review: 47% off in float32)."""
    torch.manual_seed(0)
    model = TiedSiamese().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 48, generator=gen, dtype=torch.float64)
    train = (torch.cat([x, x + 1e-3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)], 1).float(),
             torch.randint(0, 3, (12,), generator=gen))  # fmt: skip
    ckpts = _ckpts(model)
    routes = {r.parameter: r.route for r in tc.explain(model, ckpts, train, loss_fn=CE, question="self_influence",
                                                         params=["fa.weight"]).routes}  # fmt: skip
    assert routes == {"fa.weight": "factored"}
    ref = reference_scores(model, ckpts, train, loss_fn=CE, params=["fa.weight"]).self_influence
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, params=["fa.weight"]), ref, 1e-3)


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, h):
        return h


class GateUsedAtAnotherRank(nn.Module):
    """A layer's vector used outside its call, on the pooled output: copies at the layer's output rank do not fit."""

    def __init__(self):
        super().__init__()
        self.fc, self.gate = nn.Linear(4, 3), _Gate()

    def forward(self, x):
        return self.gate(self.fc(x)).mean(1) * self.gate.v


def test_a_vector_whose_copies_do_not_fit_is_followed_and_says_why():
    """The route's reason says why copies were not taken (found by review: it gave the refused route's reason)."""
    model = GateUsedAtAnotherRank().double().eval()
    train = (torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    reasons = {r.parameter: r.reason for r in tc.explain(model, _ckpts(model), train, loss_fn=CE).routes}
    assert reasons["gate.v"].startswith("followed: used outside a factor site's call (its copies over the batch did")
    _exact_and_explained(model, train, (train[0][:2], train[1][:2]))


class SiameseBag(nn.Module):
    """Two sentences through one Embedding call, scored on the difference of their mean embeddings: each shared
    token's row gets two nearly opposite output gradients."""

    def __init__(self, vocab=20000, d=16):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, 2)

    def forward(self, pair):
        n, _, length = pair.shape
        e = self.emb(pair.reshape(n, 2 * length)).view(n, 2, length, -1).mean(2)
        return self.head(torch.tanh(e[:, 0]) - torch.tanh(e[:, 1]))


def test_an_embeddings_repeated_tokens_are_summed_before_any_product():
    """A training example's rows of one token are summed before they meet the test rows or each other (found by
    review: multiplied each, then summed, the shared tokens' nearly opposite gradients cancelled after rounding, 20x
    a formed gradient's error in float32)."""
    torch.manual_seed(0)
    model = SiameseBag().eval()
    gen = torch.Generator().manual_seed(1)

    def pairs(n):
        a = torch.randint(0, 20000, (n, 256), generator=gen)
        b = a.clone()
        b[:, 0] = torch.randint(0, 20000, (n,), generator=gen)  # the sentences share all tokens but one
        return torch.stack([a, b], 1), torch.randint(0, 2, (n,), generator=gen)

    train, test, ckpts = pairs(12), pairs(3), _ckpts(model)
    routes = {r.parameter: r.route for r in tc.explain(model, ckpts, train, loss_fn=CE, params=["emb.weight"]).routes}
    assert routes == {"emb.weight": "factored"}
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE, params=["emb.weight"])
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, params=["emb.weight"]), ref.influence, 2e-4)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, params=["emb.weight"]), ref.self_influence, 2e-5)


def test_long_rows_multiplied_as_factors_are_checked_for_cancelling():
    """Rows so long that their norms are formed are not checked when a batch is assembled, but where a pair of
    batches still multiplies them as factors (one test example), they are (found by review: 7.6e-2 off in float32,
    1e-4 formed)."""
    from tracin_func._layers import Site
    from tracin_func._representations import Factored

    torch.manual_seed(0)
    d, site = 8, Site("fc", "linear", "fc.weight", None, (8, 8))

    def example(n):  # rows 5..8 nearly rows 0..3, with opposite gradients
        a, g = torch.randn(n, 5, d, dtype=torch.float64), torch.randn(n, 5, d, dtype=torch.float64)
        g[:, 4] *= 1e-3
        a = torch.cat([a, a[:, :4] + 1e-3 * torch.randn(n, 4, d, dtype=torch.float64)], 1)
        return a, torch.cat([g, -g[:, :4] + 1e-3 * torch.randn(n, 4, d, dtype=torch.float64)], 1)

    (ta, tg), (ra, rg) = example(1), example(64)
    grads = [Factored(site, a, g).materialize()["fc.weight"].flatten(1) for a, g in ((ta, tg), (ra, rg))]
    test, train = (Factored(site, a.float(), g.float(), costed=True) for a, g in ((ta, tg), (ra, rg)))
    assert test.conditioned() is None and train.conditioned() is None  # (long rows: norms formed)
    assert_close(test.dot(train), grads[0] @ grads[1].T, 1e-3)


class _PositionRows(nn.Module):
    """Position vectors for a batch, called with its size (Perceiver's ``output_position_encodings(batch_size)``) or
    with nothing."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.linspace(-1, 1, 8)[None])

    def forward(self, batch_size=1):
        return self.pos.expand(batch_size, -1)


class _PositionsAdded(nn.Module):
    def __init__(self, sized):
        super().__init__()
        self.sized, self.pe, self.fc1, self.fc2 = sized, _PositionRows(), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) + (self.pe(x.shape[0]) if self.sized else self.pe())))


@pytest.mark.parametrize("sized, way", [(True, "expanded"), (False, "followed")])
def test_a_layer_called_without_a_tensor_runs_batched_and_exact(sized, way):
    """A layer of no known kind called with an int or with no argument: planning's watch read its first argument as a
    tensor, and every call failed with torch's raw error (found trying Perceiver)."""
    torch.manual_seed(0)
    model = _PositionsAdded(sized).double().eval()
    x, y = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 3, (10,))
    routes = _batched_routes(model, _ckpts(model), (x[:6], y[:6]), (x[6:], y[6:]))
    assert routes["pe.pos"] == ("materialised", way), routes  # (one row for the batch: followed to it)


class _PositionTable(nn.Embedding):
    """Whisper's positional embedding: its forward picks rows of its weight by index, without `F.embedding`."""

    def forward(self, position_ids):
        return self.weight[position_ids]


class _PositionsPicked(nn.Module):
    def __init__(self, per_example):
        super().__init__()
        self.per_example = per_example
        self.emb, self.pos, self.fc = nn.Embedding(50, 8), _PositionTable(6, 8), nn.Linear(8, 3)

    def forward(self, ids):
        b, t = ids.shape
        positions = (ids % 6) if self.per_example else torch.arange(t).unsqueeze(0).repeat(b, 1)
        return self.fc(torch.tanh(self.emb(ids) + self.pos(positions))).mean(1)


def test_a_position_table_indexed_by_positions_copied_over_the_batch_runs_batched():
    """Whisper's decoder picks its position table's rows by ``arange(T).unsqueeze(0).repeat(B, 1)``: one row of
    indices copied over the batch, so the rows picked are copies too, met by each example's rows (the whole model ran
    ``vmap(grad)``: "meets the batch with rows of its own")."""
    torch.manual_seed(0)
    model = _PositionsPicked(per_example=False).double().eval()
    ids, y = torch.randint(0, 50, (10, 5)), torch.randint(0, 3, (10,))
    routes = _batched_routes(model, _ckpts(model), (ids[:6], y[:6]), (ids[6:], y[6:]))
    assert routes["pos.weight"] == ("materialised", "followed"), routes


def test_a_position_table_indexed_per_example_stays_exact():
    """Rows picked by indices of the batch's own (each example's): not copies, scored exactly off the batched path."""
    torch.manual_seed(0)
    model = _PositionsPicked(per_example=True).double().eval()
    ids, y = torch.randint(0, 50, (10, 5)), torch.randint(0, 3, (10,))
    ckpts, train, test = _ckpts(model), (ids[:6], y[:6]), (ids[6:], y[6:])
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (slow path)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)


class _Upsampled(nn.Module):
    """A decoder's upsampling: a transposed convolution (1-d or 2-d, strided, with an output padding, or its output
    size asked at the call), then a convolution and a classifier."""

    def __init__(self, dims, output_size=False, **options):
        super().__init__()
        conv, transposed = (nn.Conv1d, nn.ConvTranspose1d) if dims == 1 else (nn.Conv2d, nn.ConvTranspose2d)
        self.output_size = output_size
        self.down = conv(2, 4, 3, stride=2, padding=1)
        self.up = transposed(4, 3, 3, **options)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.down(x))
        h = self.up(h, output_size=x.shape[2:]) if self.output_size else self.up(h)
        return self.fc(torch.tanh(h).flatten(2).mean(2))


def _routes_on_images(model, dims=2):
    """``_batched_routes`` on 10 random 2-channel inputs of 8 per side (1-d or 2-d): 6 to train on, 4 to test."""
    x, y = torch.randn(10, 2, *(8,) * dims, dtype=torch.float64), torch.randint(0, 3, (10,))
    return _batched_routes(model, _ckpts(model), (x[:6], y[:6]), (x[6:], y[6:]))


@pytest.mark.parametrize(
    "dims, output_size, options",
    [
        (2, False, dict(stride=2, padding=1, output_padding=1)),
        (2, True, dict(stride=2, padding=1)),  # (the output padding the call's size asks: 1)
        (1, False, dict(stride=2, padding=2, dilation=2, output_padding=1, bias=False)),
        (2, False, dict(stride=1, padding=1)),
    ],
    ids=["2d_padded", "2d_output_size", "1d_dilated", "2d_unstrided"],
)
def test_transposed_convolutions_are_factor_sites(dims, output_size, options):
    """A transposed convolution (U-Nets', decoders') gets each example's weight gradient as the convolution it is the
    adjoint of does, from its output gradient and input: materialised, exact. It was followed through the forward
    (a mode over every op: a small U-Net's default call 0.19-0.20 s against 0.165-0.19 s for `factored=False`)."""
    torch.manual_seed(0)
    routes = _routes_on_images(_Upsampled(dims, output_size, **options).double().eval(), dims)
    for name in ("up.weight", *(["up.bias"] if options.get("bias", True) else [])):
        assert routes[name] == ("materialised", "transposed convolution"), routes


def test_a_transposed_convolution_padded_past_its_stride_is_followed():
    """An output padding of a stride or more (torch allows it below the dilation) leaves the adjoint convolution other
    sizes: no factor site; its weight is followed to where it meets the batch, exact."""
    torch.manual_seed(0)
    routes = _routes_on_images(_Upsampled(2, stride=1, padding=1, dilation=2, output_padding=1).double().eval())
    assert routes["up.weight"] == ("materialised", "followed"), routes


class _TiedAutoencoder(nn.Module):
    """A convolutional autoencoder whose decoder's transposed convolution shares the encoder's weight."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.dec.weight = self.enc.weight
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.dec(torch.tanh(self.enc(x)))).mean((2, 3)))


def test_a_weight_tied_between_a_convolution_and_its_transpose_sums_both_uses():
    """Both uses are sites of the one weight: their per-example gradients, each in the weight's layout, summed."""
    torch.manual_seed(0)
    routes = _routes_on_images(_TiedAutoencoder().double().eval())
    assert routes["enc.weight"] == ("materialised", "tied weight"), routes


class _MaskPicked(nn.Module):
    """Picks entries of its own table by a uint8 mask (torch reads a uint8 index as a mask), equal in every row."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.linspace(-1, 1, 6).reshape(3, 2))
        self.register_buffer("mask", torch.tensor([[1, 0]] * 3, dtype=torch.uint8))
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x * self.table[self.mask])


def test_a_mask_index_is_no_copied_row_of_indices():
    """A review's find: a uint8 mask with equal rows was taken for one row of indices copied over the batch, and the
    rows picked by its first row alone broke every call."""
    torch.manual_seed(0)
    model = _MaskPicked().double().eval()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,))
    ckpts, train, test = _ckpts(model), (x[:6], y[:6]), (x[6:], y[6:])
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's deprecation of uint8 masks)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)


def test_a_transposed_convolution_is_formed_whole():
    """Its weight's rows are input channels, not the output gradient's: never split by output channels (the blocks a
    large layer is formed in), never a factored kernel, no factor rows."""
    from tracin_func._layers import channel_split, factorable_sites

    model = _Upsampled(2, stride=2, padding=1)
    site = factorable_sites(model, [n for n, _ in model.named_parameters()])["up"]
    assert site.adjoint and not site.transposed and not site.kernel_ok
    assert not channel_split(site, torch.device("cpu"))


class _LoraLinear(nn.Linear):
    """loralib's style: a Linear subclass adding its own low-rank parameters, its weight frozen."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.weight.requires_grad_(False)
        self.lora_A, self.lora_B = nn.Parameter(0.1 * torch.randn(2, d_in)), nn.Parameter(0.1 * torch.randn(d_out, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + x @ self.lora_A.T @ self.lora_B.T


def test_a_parameter_a_layer_subclass_adds_is_named_as_such():
    """loralib's ``lora_A`` / ``lora_B`` on a Linear subclass were said to be weight tying (a review helper's)."""
    torch.manual_seed(0)
    model = nn.Sequential(_LoraLinear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    explained = _exact_and_explained(model, (x, y), (x[:2], y[:2]))
    reason = {r.parameter: r.reason for r in explained.routes}["0.lora_A"]
    assert "'lora_A' is not the layer's weight or bias (a parameter _LoraLinear adds" in reason


class _PerHeadValues(nn.Module):
    """A block whose attention scales each head's values by its own parameter ``[H]`` (IA3) and shifts each head's
    keys by its own ``[H, 1, d]``, read as ``[B, H, L, d]``, among gates and scales of other shapes (a review
    helper's)."""

    def __init__(self, vocab=40, d=8, heads=2, longest=16):
        super().__init__()
        self.heads, self.emb, self.qkv = heads, nn.Embedding(vocab, d), nn.Linear(d, 3 * d)
        self.o, self.ff, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)
        self.s_head = nn.Parameter(1 + 0.2 * torch.randn(heads))
        self.s_chan, self.s_pos = nn.Parameter(1 + 0.2 * torch.randn(d)), nn.Parameter(1 + 0.2 * torch.randn(longest))
        self.temp, self.gamma = nn.Parameter(torch.tensor(1.3)), nn.Parameter(0.5 + 0.1 * torch.randn(d))
        self.pos, self.cls = nn.Parameter(0.3 * torch.randn(1, longest, d)), nn.Parameter(0.3 * torch.randn(d))
        self.bias_hd = nn.Parameter(0.1 * torch.randn(heads, 1, d // heads))

    def forward(self, ids):
        b, n = ids.shape
        d = self.cls.shape[0]
        x = (self.emb(ids) + self.pos[:, :n]) * self.s_pos[:n, None]
        x = torch.cat([self.cls.view(1, 1, d).expand(b, 1, d), x], 1)
        q, k, v = (t.view(b, n + 1, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        k, v = k + self.bias_hd, v * self.s_head[:, None, None]
        x = x + self.gamma * self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n + 1, d))
        x = x + F.gelu(self.ff(x).transpose(1, 2) * self.s_chan[:, None]).transpose(1, 2)
        return self.head(x[:, 0]) * self.temp


def test_explain_given_the_test_data_plans_as_the_influence_call_does():
    """``tc.explain(train, test=test)`` planned without the training examples the call's batching check picks among
    too: it showed one batched pass where the call left it for vmap(grad) (a review helper's)."""
    torch.manual_seed(0)
    model = _PerHeadValues().eval()
    g = torch.Generator().manual_seed(0)
    ckpts = [tc.Checkpoint({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()},
                           lr=0.1 * (c + 1)) for c in range(3)]  # fmt: skip
    wide = [tc.Checkpoint({k: v.double() for k, v in c.params.items()}, c.lr) for c in ckpts]
    train, test = ((torch.randint(0, 40, (n, 6), generator=g), torch.randint(0, 3, (n,), generator=g))
                   for n, g in ((10, torch.Generator().manual_seed(1)), (3, torch.Generator().manual_seed(2))))
    params = ["s_head", "bias_hd"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*test), batch_size=3)
    for given in (test, [test], loader):  # (of no known size too: the pool compared None with a count; a sweep's)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = tc.influence(model, ckpts, train, given, loss_fn=CE, params=params)
        said = " ".join(str(w.message) for w in caught if issubclass(w.category, tc.SlowPathWarning))
        batching = tc.explain(model, ckpts, train, test=given, loss_fn=CE, params=params).batching
        assert f"This call runs {batching}" in said if said else batching.startswith("one batched")
    want = reference_scores(model.double(), wide, train, test, loss_fn=CE, params=params).influence
    assert_close(scores.double(), want, 1e-5)  # (float32: the mismatch's plan is of float32's checks)


def test_parts_of_the_same_factors_share_their_row_products(monkeypatch):
    """Parts holding the same factors (an LSTM's input and hidden products: both its gates' output gradients; query,
    key and value projections: one input) compute each row product once when a batch is assembled, with or without
    a bias's added 1, and every part's norms and flags stay those it gets alone (float64)."""
    import tracin_func._representations as reps
    from tracin_func._assemble import _conditioned
    from tracin_func._layers import Site
    from tracin_func._representations import Factored

    gen = torch.Generator().manual_seed(0)
    a, other, g = (torch.randn(6, 5, d, dtype=torch.float64, generator=gen) for d in (3, 4, 7))
    sites = [Site(p, "linear", f"{p}.weight", f"{p}.bias" if bias else None, (7, 3)) for p, bias in
             (("q", True), ("k", False), ("v", True))]  # fmt: skip
    hidden = Site("hh", "linear", "hh.weight", "hh.bias", (7, 4))
    parts = [Factored(s, a, g) for s in sites] + [Factored(hidden, other, g)]
    alone = [p.conditioned() for p in parts]
    bmms = []
    monkeypatch.setattr(reps, "_lifted_bmm", lambda x, y: bmms.append(1) or x @ y.mT)
    together = _conditioned(list(parts))
    assert len(bmms) == 1  # (the output gradients' products: once for the four parts)
    for part, (lone, flag) in zip(together, alone):
        assert torch.equal(part.norms, lone.norms) and part.cancelling == bool(flag)
    assert torch.equal(parts[0].a, a) and torch.equal(parts[0].g, g)  # (factors left as they were)


class _TopPrior(nn.Module):
    """A flow's last steps: an affine normalisation whose log-determinant sums its log-scale whole, and a learned
    prior computed from a zero buffer expanded over the batch (Glow's), scaled by a ``[1, C, 1, 1]`` parameter."""

    def __init__(self, c=3):
        super().__init__()
        self.loc, self.logs = nn.Parameter(0.1 * torch.randn(1, c, 1, 1)), nn.Parameter(0.1 * torch.randn(1, c, 1, 1))
        self.register_buffer("h", torch.zeros(1, c, 2, 2))
        self.conv, self.scale = nn.Conv2d(c, 2 * c, 3, padding=1), nn.Parameter(0.1 * torch.randn(1, 2 * c, 1, 1))

    def forward(self, x):
        z, logdet = (x + self.loc) * torch.exp(self.logs), 4 * self.logs.sum()
        mean, logsd = (self.conv(self.h.expand(x.shape[0], -1, -1, -1)) * torch.exp(3 * self.scale)).chunk(2, 1)
        logp = -0.5 * (2 * logsd + (z - mean) ** 2 * torch.exp(-2 * logsd)).flatten(1).sum(1)
        return -(logp + logdet)[:, None]


def test_copies_a_forward_reduces_whole_are_named_as_such():
    """A flow's log-determinant `logs.sum()` of a parameter copied over the batch sums every example's copy: the
    refusal said the examples interact "through batch statistics ... or in the loss", which this model does not (a
    review helper's Glow). It names the copies' use; exact."""
    torch.manual_seed(0)
    model = _TopPrior().double().eval()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    ckpts, loss = _ckpts(model), lambda out, y: out.sum()
    train, test = (x, torch.zeros(6)), (x[:2], torch.zeros(2))
    ref = reference_scores(model, ckpts, train, test, loss_fn=loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), ref.influence)
    batching = tc.explain(model, ckpts, train, loss_fn=loss).batching
    assert "the forward uses a copied parameter otherwise than broadcast over the batch" in batching, batching
