"""nn.LSTM / nn.GRU / nn.RNN and their cells as unrolled cells (``_recurrent``): the unrolled forward equals the fused
op, scores equal the float64 per-example loop reference, the plan shows the layers batched (on padded inputs and
PackedSequences), and anything unusual (``proj_size > 0``, a subclass) keeps the old route (vmap(grad), which falls
back to the loop)."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import optree
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import tracin_func as tc
from tests.conftest import assert_close
from tests.reference import reference_scores
from tracin_func._capture import hooked
from tracin_func._model import private_copy
from tracin_func._recurrent import recurrent_sites, why_not_unrolled

F64 = torch.float64
CE = nn.CrossEntropyLoss()
BATCHED = "one batched forward / backward gives every layer's factors"
# (cell, num_layers, bidirectional, batch_first, bias, initial state given as an input)
CONFIGS = {
    "lstm-1": (nn.LSTM, 1, False, True, True, False),
    "lstm-2-bi-h0": (nn.LSTM, 2, True, False, True, True),
    "lstm-2-nobias-h0": (nn.LSTM, 2, False, True, False, True),
    "lstm-1-bi-nobias": (nn.LSTM, 1, True, False, False, False),
    "gru-1": (nn.GRU, 1, False, True, True, False),
    "gru-2-bi-h0": (nn.GRU, 2, True, False, True, True),
    "gru-2-nobias-h0": (nn.GRU, 2, False, True, False, True),
    "gru-1-bi-nobias": (nn.GRU, 1, True, False, False, False),
    "rnn-tanh-2-bi-h0": (nn.RNN, 2, True, True, True, True),
    "rnn-relu-1-nobias": (functools.partial(nn.RNN, nonlinearity="relu"), 1, False, False, False, False),
}


class Net(nn.Module):
    """A recurrent layer over ``x`` ``[B, T, 3]`` (fed time-major when not ``batch_first``), optionally from an
    initial state given per example ``[B, layers * directions, 4]``, then a Linear on the mean output."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.fc = nn.Linear(4 * (1 + rnn.bidirectional), 2)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        x = x if self.rnn.batch_first else x.transpose(0, 1)
        hx = None
        if h0 is not None:
            h = h0.transpose(0, 1).contiguous()
            hx = (h, torch.tanh(h)) if isinstance(self.rnn, nn.LSTM) else h
        out, _ = self.rnn(x, hx)
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        return self.fc(out.mean(1))


def _rnn(config: str, **extra) -> nn.Module:
    cell, layers, bidirectional, batch_first, bias, _ = CONFIGS[config]
    return cell(3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias, **extra)


def _data(n: int, with_h0: bool, states: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    x = torch.randn(n, 5, 3, generator=gen, dtype=F64)
    y = torch.randint(0, 2, (n,), generator=gen)
    return (x, torch.randn(n, states, 4, generator=gen, dtype=F64), y) if with_h0 else (x, y)


def _checkpoints(model: nn.Module) -> list[tc.Checkpoint]:
    gen = torch.Generator().manual_seed(7)
    state = dict(model.state_dict())
    perturbed = {k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state.items()}
    return [tc.Checkpoint(params=state, lr=0.1), tc.Checkpoint(params=perturbed, lr=0.05)]


@functools.cache
def _task(config: str):
    torch.manual_seed(0)
    model = Net(_rnn(config)).to(F64).eval()
    gen = torch.Generator().manual_seed(1)
    states = model.rnn.num_layers * (1 + model.rnn.bidirectional)
    train, test = (_data(n, CONFIGS[config][5], states, gen) for n in (7, 3))
    ckpts = _checkpoints(model)
    return model, ckpts, train, test, reference_scores(model, ckpts, train, test, loss_fn=CE)


def _record(seen: list, layer, args, out) -> None:
    seen.append(tuple(out.shape))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_unrolled_forward_equals_the_fused_op(config):
    """Each layer and direction: one input-to-hidden product on the whole sequence, one hidden-to-hidden per step."""
    torch.manual_seed(0)
    rnn = _rnn(config).to(F64).eval()
    x = torch.randn(2, 6, 3, dtype=F64)
    x = x if rnn.batch_first else x.transpose(0, 1)
    h = torch.randn(rnn.num_layers * (1 + rnn.bidirectional), 2, 4, dtype=F64)
    copy = private_copy(rnn)
    names = [n for n, _ in copy.named_parameters()]
    for hx in (None, (h, torch.randn_like(h)) if isinstance(rnn, nn.LSTM) else h):
        expected, seen = rnn(x, hx), []
        products = {path: functools.partial(_record, seen) for path in recurrent_sites(copy, names)}
        with hooked(copy, products):
            actual = copy(x, hx)
        assert "forward" not in vars(copy) and "forward" not in vars(rnn)
        assert len(seen) == rnn.num_layers * (1 + rnn.bidirectional) * (1 + x.shape[0 if not rnn.batch_first else 1])
        states = (actual[1], expected[1]) if isinstance(rnn, nn.LSTM) else ((actual[1],), (expected[1],))
        for a, e in [(actual[0], expected[0]), *zip(*states)]:
            assert_close(a, e, 1e-12)


def _batched_and_exact(model, ckpts, train, test, ref, factored, layer):
    """Scores equal the reference with no slow-path or loop warning, the call is batched, and every parameter of
    ``layer`` takes an unrolled product's route; returns those routes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, factored=factored), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, factored=factored), ref.self_influence)
        e = tc.explain(model, ckpts, train, loss_fn=CE, factored=factored)
    assert e.batching == BATCHED
    routes = [r for r in e.routes if r.parameter.startswith(f"{layer}.")]
    assert len(routes) == len(list(getattr(model, layer).parameters()))
    assert all(r.route in ("factored", "materialised") and r.reason.startswith("unrolled recurrent") for r in routes)
    return routes


@pytest.mark.parametrize("factored", [None, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_scores_equal_the_loop_reference(config, factored):
    model, ckpts, train, test, ref = _task(config)
    rnn = _batched_and_exact(model, ckpts, train, test, ref, factored, "rnn")
    if factored:
        assert {r.route for r in rnn} == {"factored"}
    assert "forward" not in vars(model.rnn)


@pytest.mark.parametrize("config", ["lstm-2-bi-h0", "rnn-tanh-2-bi-h0", "lstm-1-bi-nobias", "gru-2-bi-h0"])
def test_the_hidden_products_of_a_batched_pass_are_one_call_where_their_gradient_is_the_gates(config, monkeypatch):
    """An LSTM's and a plain RNN's step adds its two products, so the hidden-to-hidden product's output gradient is the
    input-to-hidden product's: the batched pass calls its hook once for all steps (the hidden inputs ``[B, T, H]``, the
    gradient taken at the input products), a GRU's once per step (its ``n`` gate multiplies the hidden product); either
    way exact, in every direction and layer."""
    import tracin_func._assemble as assemble_module

    model, ckpts, train, test, ref = _task(config)
    calls, original = {}, assemble_module.batched_factors

    def spy(*args, **kwargs):
        factors = original(*args, **kwargs)
        calls.update({path: [tuple(x.shape) for x in xs] for path, (xs, _) in factors.items() if ".hh_" in path})
        return factors

    monkeypatch.setattr(assemble_module, "batched_factors", spy)
    _batched_and_exact(model, ckpts, train, test, ref, None, "rnn")
    layers = CONFIGS[config][1] * (1 + CONFIGS[config][2])
    assert len(calls) == layers
    per_step = config.startswith("gru")
    n = next(iter(calls.values()))[0][0]  # (the last pass's examples)
    assert all(shapes == ([(n, 4)] * 5 if per_step else [(n, 5, 4)]) for shapes in calls.values()), calls


FUSED = ["lstm-1", "lstm-2-bi-h0", "lstm-2-nobias-h0", "rnn-tanh-2-bi-h0", "rnn-relu-1-nobias"]  # (no GRU: per step)


@pytest.mark.parametrize("config", FUSED)
def test_few_examples_run_their_steps_fused_in_float32_as_unrolled(config, monkeypatch):
    """A batch of few examples (planning's lone examples; here every batch) runs an LSTM's or a
    plain RNN's steps in the fused op, through an identity input weight (``_recurrent._fused_steps``): the scores are
    the unrolled steps' up to float32 rounding, and the float64 loop reference's to float32's precision."""
    import tracin_func._recurrent as recurrent

    model, ckpts, train, test, ref = _task(config)
    model32 = Net(_rnn(config)).float().eval()
    ckpts32 = [tc.Checkpoint(params={k: v.float() for k, v in c.params.items()}, lr=c.lr) for c in ckpts]
    train32, test32 = ([t.float() if t.is_floating_point() else t for t in data] for data in (train, test))
    calls, fused = [], recurrent._fused_steps
    monkeypatch.setattr(recurrent, "_fused_steps", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))

    def scores() -> tuple[torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            influence = tc.influence(model32, ckpts32, train32, test32, loss_fn=CE)
            return influence, tc.self_influence(model32, ckpts32, train32, loss_fn=CE)

    influence, self_influence = scores()
    assert len(calls) >= 2 * len(ckpts) * CONFIGS[config][1]  # (both questions' batches, at every checkpoint)
    monkeypatch.setattr(recurrent, "_FUSED_STEPS_MAX_BATCH", 0)
    n = len(calls)
    unrolled, unrolled_self = scores()
    assert len(calls) == n
    assert_close(influence, unrolled, 1e-5)
    assert_close(self_influence, unrolled_self, 1e-5)
    assert_close(influence, ref.influence, 1e-4)
    assert_close(self_influence, ref.self_influence, 1e-4)


def test_steps_run_fused_only_where_the_fused_op_is_exact(precision_restored):
    """Not in float64 (no oneDNN kernel: no gain), not at a lower float32 precision, torch's or oneDNN's recurrent
    layers' own (the identity's products would round the input products), not with an input product that is not
    finite (infinity times the identity's zeros is NaN), not for more examples than ``_FUSED_STEPS_MAX_BATCH``."""
    from tracin_func._recurrent import _FUSED_STEPS_MAX_BATCH, _fused_steps_serve

    xi = torch.randn(3, 5, 16)
    assert _fused_steps_serve(xi)
    assert not _fused_steps_serve(xi.double())
    assert not _fused_steps_serve(torch.randn(_FUSED_STEPS_MAX_BATCH + 1, 5, 16))
    assert not _fused_steps_serve(torch.cat([xi[:1], torch.full_like(xi[:1], float("inf"))]))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert not _fused_steps_serve(xi)
    finally:
        torch.set_float32_matmul_precision(previous)
    if hasattr(torch.backends.mkldnn, "rnn"):  # (torch >= 2.9: a setting per backend and op)
        for holder, value, served in [
            (torch.backends.mkldnn.rnn, "bf16", False),  # oneDNN's recurrent layers' own
            (torch.backends.mkldnn, "bf16", False),
            (torch.backends.cuda.matmul, "tf32", True),  # (a GPU's: after it torch's old getter raises)
        ]:
            previous, holder.fp32_precision = holder.fp32_precision, value
            try:
                assert _fused_steps_serve(xi) == served
            finally:
                holder.fp32_precision = previous
        assert _fused_steps_serve(xi)


@pytest.mark.parametrize("config", ["lstm-2-bi-h0", "gru-2-bi-h0"])
def test_projected_embeddings_equal_the_old_route(config):
    """Projections from factors equal those of the per-example gradients (factored=False: vmap, then the loop)."""
    model, ckpts, train, _, ref = _task(config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.func.vmap failed", category=RuntimeWarning)
        old = tc.embeddings(model, ckpts, train, loss_fn=CE, projection_dim=16, factored=False)
    for factored in (None, True):
        assert_close(tc.embeddings(model, ckpts, train, loss_fn=CE, projection_dim=16, factored=factored), old)
    assert_close(tc.embeddings(model, ckpts, train, loss_fn=CE), ref.train_embeddings)


CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn-tanh": nn.RNNCell, "rnn-relu-nobias": nn.RNNCell}


def _cell(kind: str) -> nn.Module:
    extra = {"nonlinearity": "relu", "bias": False} if kind == "rnn-relu-nobias" else {}
    return CELLS[kind](3, 4, **extra)


class CellNet(nn.Module):
    """A cell stepped by the model's own loop over ``x`` ``[B, T, 3]`` (from a given initial state, or none), then a
    Linear on the last state."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell, self.fc = cell, nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        lstm = isinstance(self.cell, nn.LSTMCell)
        state = None if h0 is None else (h0, h0.tanh()) if lstm else h0
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.fc(state[0] if lstm else state)


@pytest.mark.parametrize("kind", list(CELLS))
def test_an_unrolled_cell_equals_the_fused_op(kind):
    """A cell call is its two products and one step; an unbatched input runs the fused op (no product)."""
    torch.manual_seed(0)
    cell = _cell(kind).to(F64).eval()
    x, h = torch.randn(3, 3, dtype=F64), torch.randn(3, 4, dtype=F64)
    copy, seen = private_copy(cell), []
    products = {path: functools.partial(_record, seen) for path in recurrent_sites(copy, ["weight_ih", "weight_hh"])}
    assert list(products) == ["ih", "hh"]
    for hx in (None, (h, h.tanh()) if isinstance(cell, nn.LSTMCell) else h):
        with hooked(copy, products):
            actual, unbatched = copy(x, hx), copy(x[0])
        for a, e in zip(optree.tree_leaves(actual), optree.tree_leaves(cell(x, hx))):
            assert_close(a, e, 1e-12)
        for a, e in zip(optree.tree_leaves(unbatched), optree.tree_leaves(cell(x[0]))):
            assert torch.equal(a, e)
    assert seen == [(3, 4 * {"lstm": 4, "gru": 3}.get(kind, 1))] * 4  # two products, twice
    assert "forward" not in vars(copy)


@pytest.mark.parametrize("factored", [None, True])
@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_stepped_by_the_model_equal_the_loop_reference(kind, factored):
    torch.manual_seed(0)
    model = CellNet(_cell(kind)).to(F64).eval()
    gen = torch.Generator().manual_seed(4)
    with_h0 = kind != "gru"
    train, test = (_data(n, with_h0, 1, gen) for n in (6, 3))
    if with_h0:  # a [B, 4] initial state
        train, test = ((x, h[:, 0], y) for x, h, y in (train, test))
    ckpts = _checkpoints(model)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    _batched_and_exact(model, ckpts, train, test, ref, factored, "cell")


class Scaled(Net):
    """A free parameter outside any layer, meeting the batch in an op that is not followed (``atan2``):
    the call runs vmap(grad) over examples, the recurrent layer unrolled in it (its fused op has no batching rule),
    its products materialised or factored."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__(rnn)
        self.scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x, h0)
        return torch.atan2(out, self.scale)


@pytest.mark.parametrize("config", ["lstm-2-bi-h0", "gru-1", "rnn-relu-1-nobias"])
def test_dense_paths_run_the_layers_unrolled_too(config, monkeypatch):
    """``factored=False`` (vmap(grad) over examples) runs the unrolled cells, not the fused op, which vmap only loops
    over and which, in cuDNN on a GPU, has no backward in eval mode (the fused op runs only where no gradient is
    taken); the user's layer keeps its own forward."""
    model, ckpts, train, test, ref = _task(config)
    fused = []

    def spied(op, *args, **kwargs):
        if torch.is_grad_enabled():
            fused.append(op)
        return getattr(torch._C._VariableFunctions, op)(*args, **kwargs)

    for op in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        monkeypatch.setattr(torch._VF, op, functools.partial(spied, op))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, factored=False), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, factored=False), ref.self_influence)
    assert fused == [] and "forward" not in vars(model.rnn)


@pytest.mark.parametrize("config", ["lstm-2-bi-h0", "gru-1"])
def test_a_loss_calling_the_users_module_runs_its_layers_unrolled(config, monkeypatch):
    """A `tc.BatchLoss` calls the user's module itself: its recurrent layers ran the fused op under vmap (torch's
    slow fallback in float32; in float64 vmap failed and examples ran one at a time). They run unrolled now, under
    the module's lock, its own forward back afterwards."""
    model, ckpts, train, test, ref = _task(config)
    per_example = nn.CrossEntropyLoss(reduction="none")
    loss = tc.BatchLoss(lambda params, batch: per_example(functional_call(model, params, batch[:-1]), batch[-1]))
    fused = []

    def spied(op, *args, **kwargs):
        if torch.is_grad_enabled():
            fused.append(op)
        return getattr(torch._C._VariableFunctions, op)(*args, **kwargs)

    for op in ("lstm", "gru"):
        monkeypatch.setattr(torch._VF, op, functools.partial(spied, op))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=loss, factored=False), ref.self_influence)
    assert fused == [] and "forward" not in vars(model.rnn)
    # its fused op's weights its own again (functional_call left the last checkpoint's there, alive: a sweep's)
    assert all(w is p for w, p in zip(model.rnn._flat_weights, model.rnn.parameters(), strict=True))


@pytest.mark.parametrize("factored", [None, True])
@pytest.mark.parametrize("config", ["lstm-2-bi-h0", "gru-1"])
def test_unrolled_under_vmap(config, factored):
    torch.manual_seed(0)
    model = Scaled(_rnn(config)).to(F64).eval()
    gen = torch.Generator().manual_seed(3)
    train, test = (_data(n, CONFIGS[config][5], model.rnn.num_layers * (1 + model.rnn.bidirectional), gen) for n in
                   (5, 2))
    ckpts = _checkpoints(model)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        warnings.filterwarnings("error", message="torch.func.vmap failed", category=RuntimeWarning)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, factored=factored), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, factored=factored), ref.self_influence)
        e = tc.explain(model, ckpts, train, loss_fn=CE, factored=factored)
    assert "parameter 'scale', computed once for the whole batch, meets the batch in atan2" in e.batching, e.batching
    routes = {r.parameter: r.route for r in e.routes}
    assert routes.pop("scale") == "vmap" and set(routes.values()) <= {"factored", "materialised"}, routes


class Subclassed(nn.GRU):
    """Its own class: the unrolled cells cannot be proven to compute its function."""


class SubclassedCell(nn.GRUCell):
    """Its own class, as ``Subclassed``."""


def _old_route_cases():
    torch.manual_seed(0)
    proj = Net(_rnn("lstm-1", proj_size=2))
    proj.fc = nn.Linear(2, 2)
    return {
        "proj_size": (proj, "proj_size > 0"),
        "subclass": (Net(Subclassed(3, 4, batch_first=True)), "subclass of GRU"),
        "cell_subclass": (CellNet(SubclassedCell(3, 4)), "subclass of GRUCell"),
    }


@pytest.mark.parametrize("case", ["proj_size", "subclass", "cell_subclass"])
def test_unusual_recurrent_layers_keep_the_old_route(case):
    model, reason = _old_route_cases()[case]
    model = model.to(F64).eval()
    ckpts = _checkpoints(model)
    gen = torch.Generator().manual_seed(2)
    data = (torch.randn(5, 4, 3, generator=gen, dtype=F64), torch.randint(0, 2, (5,), generator=gen))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.func.vmap failed", category=RuntimeWarning)
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        e = tc.explain(model, ckpts, data, loss_fn=CE)
        scores = tc.self_influence(model, ckpts, data, loss_fn=CE)
    rnn = [r for r in e.routes if not r.parameter.startswith("fc.")]
    assert rnn and all(r.route in ("vmap", "loop") and reason in r.reason for r in rnn), rnn
    assert_close(scores, reference_scores(model, ckpts, data, loss_fn=CE).self_influence)


def test_an_instance_forward_is_not_unrolled():
    """A ``forward`` set on the module object (not its class's) is not proven to be the LSTM's function."""
    rnn = nn.GRU(3, 4, batch_first=True)
    assert recurrent_sites(rnn, ["weight_ih_l0"])
    rnn.forward = functools.partial(nn.GRU.forward, rnn)
    assert recurrent_sites(rnn, ["weight_ih_l0"]) == {}
    assert why_not_unrolled(rnn) == "GRU has a forward set on the instance"


class Packed(nn.Module):
    """A recurrent layer over a PackedSequence of ``x [B, T, 3]`` (lengths per example, an initial state per example
    or none), then a Linear on the padded outputs' sum and the last layer's last states."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.fc = nn.Linear(4 * (1 + rnn.bidirectional) * 2, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed, None if h0 is None else _states(self.rnn, h0.transpose(0, 1).contiguous()))
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        last = (h[0] if isinstance(self.rnn, nn.LSTM) else h)[-1 - self.rnn.bidirectional :]  # [directions, B, 4]
        return self.fc(torch.cat([padded.sum(1), *last], 1))


def _states(rnn: nn.Module, h: torch.Tensor) -> Any:
    return (h, torch.tanh(h)) if isinstance(rnn, nn.LSTM) else h


def _packed_task(config: str) -> tuple:
    torch.manual_seed(0)
    model = Packed(_rnn(config)).to(F64).eval()
    gen = torch.Generator().manual_seed(3)
    states = model.rnn.num_layers * (1 + model.rnn.bidirectional)
    train, test = (_data(n, CONFIGS[config][5], states, gen) for n in (8, 3))
    lengths = torch.tensor([4, 2, 5, 1, 1, 2, 1, 3]), torch.tensor([2, 1, 1])  # batches of 3: longest 5, 2, 3
    train, test = ((x, length, *rest) for (x, *rest), length in zip((train, test), lengths))
    return model, _checkpoints(model), train, test


@pytest.mark.parametrize("config", list(CONFIGS))
def test_unrolled_forward_on_a_packed_sequence_equals_the_fused_op(config):
    """Padded in the batch's own order, steps past an example's end leave its state; the output is packed as the fused
    op packs it (sorted by length, or as given: ``enforce_sorted``), and the last states are at each example's end."""
    torch.manual_seed(0)
    rnn = _rnn(config).to(F64).eval()
    x = torch.randn(4, 6, 3, dtype=F64)
    states = torch.randn(rnn.num_layers * (1 + rnn.bidirectional), 4, 4, dtype=F64)
    copy, seen = private_copy(rnn), []
    products = {path: functools.partial(_record, seen) for path in recurrent_sites(copy, ["weight_ih_l0"])}
    for lengths, enforce_sorted in ((torch.tensor([3, 6, 1, 3]), False), (torch.tensor([6, 3, 3, 1]), True)):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
        for hx in (None, _states(rnn, states)):
            with hooked(copy, products):
                actual = copy(packed, hx)
            expected = rnn(packed, hx)
            assert torch.equal(actual[0].batch_sizes, expected[0].batch_sizes)
            for name in ("sorted_indices", "unsorted_indices"):
                a, e = getattr(actual[0], name), getattr(expected[0], name)
                assert a is e is None or torch.equal(a, e)
            for a, e in zip(optree.tree_leaves(actual), optree.tree_leaves(expected)):
                assert a.shape == e.shape and torch.allclose(a, e, rtol=1e-12, atol=1e-14), (a - e).abs().max()
    assert seen == [(4, 6, 4 * {nn.LSTM: 4, nn.GRU: 3}.get(type(rnn), 1))] * 4  # ih_l0 on the padded sequence
    unbatched = torch.randn(5, 3, dtype=F64)
    with hooked(copy, products):
        assert torch.equal(copy(unbatched)[0], rnn(unbatched)[0])  # the fused op, no product called
    assert len(seen) == 4


@pytest.mark.parametrize("factored", [None, True])
@pytest.mark.parametrize("config", ["lstm-2-bi-h0", "gru-1", "rnn-tanh-2-bi-h0", "lstm-1-bi-nobias"])
def test_packed_sequences_are_batched_and_exact(config, factored):
    """Batches of other longest lengths (the steps run), an example of length 1, the initial states given."""
    model, ckpts, train, test = _packed_task(config)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tc.influence(model, ckpts, train, test, loss_fn=CE, factored=factored, batch_size=3)
        mine = tc.self_influence(model, ckpts, train, loss_fn=CE, factored=factored, batch_size=3)
        e = tc.explain(model, ckpts, train, loss_fn=CE, factored=factored, batch_size=3)
    assert_close(got, ref.influence)
    assert_close(mine, ref.self_influence)
    assert e.batching == BATCHED
    assert all(r.route in ("factored", "materialised") for r in e.routes), e.routes


def test_a_packed_layer_is_sized_at_the_longest_sequence_checked():
    """Planned on the first example's own length, a short first example sized batches of long ones (a batch of 512
    sequences of 60-64 steps took 3-6x the memory budget) and kept as factors what every batch then formed (a review
    helper's trial): sized, and routed, as where the first example is the longest."""
    model, ckpts, (x, lengths, y), _ = _packed_task("lstm-1-bi-nobias")
    plans = {}
    for first in (1, 5):
        data = (x, torch.cat([torch.tensor([first]), lengths[1:].clamp(min=4)]), y)  # the others 4 or 5 steps long
        plans[first] = tc.explain(model, ckpts, data, loss_fn=CE, n_test=3)
    assert plans[1].example_bytes == plans[5].example_bytes
    assert [r.route for r in plans[1].routes] == [r.route for r in plans[5].routes]
    assert "(T = 5" in next(r.reason for r in plans[1].routes if r.parameter == "rnn.weight_hh_l0")


class _SortedPacking(nn.Module):
    """Packs with `enforce_sorted=True`: each batch given sorted by length, which a test batch joined with a training
    batch is not."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=True))
        return self.head(h[-1])


def test_a_torch_error_naming_an_argument_is_not_taken_for_a_refusal():
    """torch's "`lengths` array must be sorted ..." starts with a name in backticks, as the library's refusals do: the
    joined pass of test and training examples re-raised it instead of scoring them apart."""
    torch.manual_seed(0)
    model = _SortedPacking().double().eval()
    ckpts = [tc.Checkpoint({k: v + 0.1 * c for k, v in model.state_dict().items()}, 0.1) for c in range(2)]
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    train, test = (x[:4], torch.tensor([5, 4, 2, 1]), torch.tensor([0, 1, 2, 1])), (x[4:], torch.tensor([5, 3]),
                                                                                   torch.tensor([2, 0]))  # fmt: skip
    want = reference_scores(model, ckpts, train, test, loss_fn=nn.CrossEntropyLoss()).influence
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=nn.CrossEntropyLoss()), want)


class _FrozenUnderNoGrad(nn.Module):
    """A frozen recurrent layer the model runs without gradient itself."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True).requires_grad_(False), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out, _ = self.rnn(x)
        return self.head(out[:, -1])


def test_a_frozen_layer_run_without_gradient_stays_on_vmap():
    """The fused op served any pass without gradient, under vmap too, which has no batching rule for it: a frozen
    layer the model runs under `torch.no_grad()` sent `factored=False` to the per-example loop."""
    torch.manual_seed(0)
    model = _FrozenUnderNoGrad().double().eval()
    ckpts = [tc.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, 0.1)]
    data = (torch.randn(4, 5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (the loop's fallback warning)
        got = tc.self_influence(model, ckpts, data, loss_fn=nn.CrossEntropyLoss(), factored=False)
    assert_close(got, reference_scores(model, ckpts, data, loss_fn=nn.CrossEntropyLoss()).self_influence)


def test_packed_sequences_off_the_batched_path_run_through_plain_autograd(monkeypatch):
    """torch.func cannot run the fused op on a PackedSequence (no storage behind its wrapped tensors), even one
    example at a time: with ``factored=False`` the layer's gradients are taken by plain autograd, one example at a
    time, with a warning giving the cause, and the scores are exact. On the CPU that loop runs the fused op (3x
    faster than unrolled steps), not unrolled cells."""
    model, ckpts, train, test = _packed_task("lstm-1")
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    fused = []

    def spied(*args, **kwargs):  # a gradient taken outside torch.func's transforms: the loop's
        fused.append(torch.is_grad_enabled() and torch._C._functorch.peek_interpreter_stack() is None)
        return torch._C._VariableFunctions.lstm(*args, **kwargs)

    monkeypatch.setattr(torch._VF, "lstm", spied)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, factored=False), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, factored=False), ref.self_influence)
        e = tc.explain(model, ckpts, train, loss_fn=CE, factored=False)
    said = [str(w.message) for w in caught if "in a loop by plain autograd" in str(w.message)]
    assert said and "The cause, in full: RuntimeError: " in said[0], said  # (vmap's, the loop not tried by torch.func)
    assert e.batching.endswith("vmap failed on this model, so examples run one at a time by plain autograd")
    assert {r.route for r in e.routes} == {"loop"} and any(fused), fused
    head = ["fc.weight", "fc.bias"]  # the recurrent layer frozen: packing sorts the batch, unpacking restores it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tc.explain(model, ckpts, train, loss_fn=CE, params=head).batching == BATCHED
        got = tc.self_influence(model, ckpts, train, loss_fn=CE, params=head)
    assert_close(got, reference_scores(model, ckpts, train, loss_fn=CE, params=head).self_influence)


class Stepped(nn.Module):
    """A cell stepped by the model's own loop to the batch's longest length: ``masked``, an example's state is held
    past its end (as packing does); unmasked, the steps past its end change it, so that an example's score depends
    on the batch it is in."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.masked, self.cell, self.fc = masked, nn.GRUCell(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 4)
        for t in range(int(lengths.max())):
            stepped = self.cell(x[:, t], h)
            h = torch.where((t < lengths)[:, None], stepped, h) if self.masked else stepped
        return self.fc(h)


@pytest.mark.parametrize("masked", [True, False])
def test_steps_past_an_examples_end_are_batched_only_when_they_leave_it_unchanged(masked):
    """The batching check compares each example's rows of nonzero output gradient, alone and in the batch: steps
    past an example's end add rows of zero gradient there (accepted, exact), unless they change its state (refused:
    the call leaves the batched path, and stays exact)."""
    torch.manual_seed(0)
    model = Stepped(masked).to(F64).eval()
    ckpts = _checkpoints(model)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 5, 3, generator=gen, dtype=F64), torch.randint(0, 2, (6,), generator=gen)
    train, test = (x, torch.tensor([2, 5, 3, 1, 4, 5]), y), (x[:2], torch.tensor([1, 3]), y[:2])
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE), ref.self_influence)
        e = tc.explain(model, ckpts, train, loss_fn=CE)
    assert (e.batching == BATCHED) == masked, e.batching


class FirstSteps(nn.Module):
    """A Linear on the rows of ``packed.data`` that hold each example's first step (by decreasing length), put back
    in the batch's order by ``unsorted_indices``: a correct model whose rows are in packing's order."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return self.fc(out.data[: int(out.batch_sizes[0])])[out.unsorted_indices]


class PaddedMean(nn.Module):
    """The mean over ``pad_packed_sequence``'s output without ``total_length``: padded to the batch's longest, so an
    example's output depends on its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return self.fc(pad_packed_sequence(out, batch_first=True)[0].mean(1))


class LastStep(nn.Module):
    """Each example's last step, read at the lengths ``pad_packed_sequence`` gives (in the batch's order)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        padded, ends = pad_packed_sequence(out, batch_first=True)
        return self.fc(padded[torch.arange(x.shape[0]), ends - 1])


class Pooled(nn.Module):
    """Attention pooling with a query vector of the model's own, outside any layer: the call runs vmap(grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.query, self.fc = nn.GRU(3, 4, batch_first=True), nn.Parameter(torch.randn(4)), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        score = (h @ self.query).masked_fill(torch.arange(x.shape[1])[None] >= lengths[:, None], float("-inf"))
        return self.fc((score.softmax(1)[..., None] * h).sum(1))


@pytest.mark.parametrize(
    "case, lengths, batching",
    [
        # the first batch sorted by length: the order is the identity there, and the watch sees its use
        ("first_steps", [6, 5, 4, 3, 1, 3, 6, 2], "it indexes the rows of its batch by a sort"),
        # ... but the lengths unpacking puts back in the batch's order are no order (the padded length, 4, is the
        # batch's: read as a sort's, they were refused)
        ("last_step", [4, 2, 3, 1, 6, 2, 5, 3], BATCHED),
        ("padded_mean", [4, 2, 5, 1, 4, 4, 4, 3], "'rnn.ih_l0' runs another number of times"),
        # off the batched path (the query vector's copies break its shape) the fused op runs: an unrolled layer's
        # steps differ per example there
        ("pooled", [2, 5, 1, 3, 4, 2, 6, 1], "a forward with parameters copied over the batch ('query') failed"),
    ],
)
def test_packed_sequences_the_batched_path_cannot_follow_stay_exact(case, lengths, batching):
    """Found by fuzzing: silently 16-60% off, or a raw error (and, by review, a model reading each example's last
    step refused)."""
    torch.manual_seed(0)
    cases = {"first_steps": FirstSteps, "last_step": LastStep, "padded_mean": PaddedMean, "pooled": Pooled}
    model = cases[case]().to(F64).eval()
    gen = torch.Generator().manual_seed(1)
    train = (torch.randn(8, 6, 3, generator=gen, dtype=F64), torch.tensor(lengths), torch.randint(0, 2, (8,)))
    ckpts = _checkpoints(model)
    ref = reference_scores(model, ckpts, train, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, batch_size=4), ref.self_influence)
        e = tc.explain(model, ckpts, train, loss_fn=CE, batch_size=4)
    assert batching in e.batching, e.batching
    if case == "pooled":
        rnn = [r for r in e.routes if r.parameter.startswith("rnn.")]
        assert all(r.route == "loop" and "'rnn' runs on a PackedSequence, unrolled on the batched path only" in
                   r.reason for r in rnn), rnn  # fmt: skip


def test_packed_sequences_of_one_length_are_batched_and_checked_where_lengths_differ():
    """First examples of one length cannot show whether the model reads the padding a longer example adds: they were
    refused, so fixed-length data and length-bucketed batches ran one example at a time by plain autograd. A batch
    of one length has no padding and is exact batched; the batching is checked on the first batch whose lengths
    differ, which refuses a model reading the padding (a mean over the padded steps: 16% off unchecked)."""
    torch.manual_seed(0)
    model, ckpts, train, test = _packed_task("gru-1")
    x, _, *rest = train
    for lengths, batch_size in ((torch.full((8,), 5), None), (torch.tensor([3, 3, 3, 5, 5, 5, 2, 2]), 3)):
        data = (x, lengths, *rest)
        ref = reference_scores(model, ckpts, data, loss_fn=CE)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert tc.explain(model, ckpts, data, loss_fn=CE, batch_size=batch_size).batching == BATCHED
            got = tc.self_influence(model, ckpts, data, loss_fn=CE, batch_size=batch_size)
        assert_close(got, ref.self_influence)
    padded_mean = PaddedMean().to(F64).eval()
    data = (x, torch.tensor([4, 4, 4, 4, 2, 5, 1, 3]), torch.randint(0, 2, (8,)))
    ckpts = _checkpoints(padded_mean)
    with pytest.raises(ValueError, match=r"(?s)examples of one length, packed or padded alike.*factored=False"):
        tc.self_influence(padded_mean, ckpts, data, loss_fn=CE, batch_size=4)
    with pytest.warns(tc.SlowPathWarning):  # planned on the batch in memory: its check picks examples of other lengths
        got = tc.self_influence(padded_mean, ckpts, data, loss_fn=CE)
    assert_close(got, reference_scores(padded_mean, ckpts, data, loss_fn=CE).self_influence)


class SortedPacked(nn.Module):
    """Packs with ``enforce_sorted=True``: the data comes sorted by decreasing length."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=True))[1][-1])


@pytest.mark.parametrize("batch_size", [2, 4])
def test_packing_that_asks_for_sorted_batches_stays_batched(batch_size):
    """The batching check runs the first examples together with copies after them, which are not
    sorted: packing raised there, and the call left the batched path (or, planned on two examples of one length,
    was refused at a later batch as mixing its examples). The examples then run together as given."""
    torch.manual_seed(0)
    model = SortedPacked().to(F64).eval()
    ckpts = _checkpoints(model)
    x = torch.randn(8, 6, 3, dtype=F64)
    train = (x, torch.tensor([6, 6, 5, 4, 3, 3, 2, 1]), torch.randint(0, 2, (8,)))
    ref = reference_scores(model, ckpts, train, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tc.self_influence(model, ckpts, train, loss_fn=CE, batch_size=batch_size)
        assert tc.explain(model, ckpts, train, loss_fn=CE, batch_size=batch_size).batching == BATCHED
    assert_close(got, ref.self_influence)


class Siamese(nn.Module):
    """Two inputs (a premise and a hypothesis), each packed and encoded by one GRU: a correct model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.fc = nn.Embedding(9, 4), nn.GRU(4, 5, batch_first=True), nn.Linear(10, 3)

    def encoded(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False)
        return self.rnn(packed)[1][-1]

    def forward(self, a: torch.Tensor, a_lengths: torch.Tensor, b: torch.Tensor, b_lengths: torch.Tensor):
        return self.fc(torch.cat([self.encoded(a, a_lengths), self.encoded(b, b_lengths)], 1))


def test_two_packed_inputs_one_of_one_length_stay_batched():
    """Found by fuzzing: a correct model packing two inputs, one of them of one length among the first examples
    (a fixed-length field), was refused ("does not pack its examples in its own order"). The examples show the
    padding where either input's lengths differ."""
    torch.manual_seed(0)
    model = Siamese().to(F64).eval()
    ckpts = _checkpoints(model)
    gen = torch.Generator().manual_seed(3)
    fixed, varied = ([3, 5, 2, 6, 4, 1, 3, 2], [4] * 8), ([3, 3, 3, 3, 5, 2, 6, 4], [2, 4, 3, 5, 2, 2, 4, 6])
    for a_lengths, b_lengths in (fixed, varied):  # the hypotheses of one length; the first premises of one length
        a, b = (torch.randint(1, 9, (8, 6), generator=gen) for _ in range(2))
        train = (a, torch.tensor(a_lengths), b, torch.tensor(b_lengths), torch.randint(0, 3, (8,), generator=gen))
        ref = reference_scores(model, ckpts, train, loss_fn=CE)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, batch_size=4), ref.self_influence)


class PairsPackedTogether(nn.Module):
    """Pairs ``[B, 2, T]`` with their lengths ``[B, 2]``, both sides packed in one call (``2 B`` sequences, an
    example's two in a row) and encoded by one GRU: a correct model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.fc = nn.Embedding(9, 4), nn.GRU(4, 5, batch_first=True), nn.Linear(10, 3)

    def forward(self, pairs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        flat = pack_padded_sequence(self.emb(pairs.flatten(0, 1)), lengths.flatten(), True, enforce_sorted=False)
        return self.fc(self.rnn(flat)[1][-1].view(len(pairs), -1))


def test_pairs_packed_as_two_sequences_each_stay_batched():
    """Found by fuzzing: a correct siamese model packing both sides of each pair in one call was refused once a first
    batch of full-length pairs had left the lengths to be checked ("does not pack its examples in its own order"):
    its packing records two lengths per example. Those are read as an example's, in a row."""
    torch.manual_seed(0)
    model = PairsPackedTogether().to(F64).eval()
    ckpts = _checkpoints(model)
    gen = torch.Generator().manual_seed(3)

    def batch(lengths: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        n = torch.tensor(lengths)
        pairs = torch.randint(1, 9, (len(lengths), 2, 6), generator=gen) * (torch.arange(6) < n[..., None])
        return pairs, n, torch.randint(0, 3, (len(lengths),), generator=gen)

    batches = [batch([(6, 6)] * 4), batch([(2, 6), (5, 5), (6, 1), (4, 3)])]
    flat = tuple(torch.cat(parts) for parts in zip(*batches))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tc.self_influence(model, ckpts, batches, loss_fn=CE)
    assert_close(got, reference_scores(model, ckpts, flat, loss_fn=CE).self_influence)


class WeightDrop(nn.Module):
    """AWD-LSTM's WeightDrop: the layer's weight is no longer its parameter; the wrapper registers ``<name>_raw``
    and sets the weight (dropped out in training) on the layer before each call."""

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module, self.name = module, name
        weight = getattr(module, name)
        del module._parameters[name]
        module.register_parameter(f"{name}_raw", nn.Parameter(weight.detach().clone()))

    def forward(self, *args):
        raw = getattr(self.module, f"{self.name}_raw")
        setattr(self.module, self.name, nn.functional.dropout(raw, 0.3, self.training) * 1.0)  # not a Parameter
        return self.module(*args)


class Dropped(nn.Module):
    def __init__(self, cell: bool) -> None:
        super().__init__()
        self.cell = cell
        self.rnn = WeightDrop(nn.GRUCell(3, 4), "weight_hh") if cell else WeightDrop(_rnn("lstm-1"), "weight_hh_l0")
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cell:
            return self.fc(self.rnn(x)[0][:, -1])
        h = None
        for t in range(x.shape[1]):
            h = self.rnn(x[:, t], h)
        return self.fc(h)


@pytest.mark.parametrize("cell", [False, True])
def test_weights_set_by_a_wrapper_keep_the_old_route(cell):
    """A layer whose weights a wrapper sets (not its own parameters) is not unrolled: planning failed reading the
    weight's shape (a raw AttributeError), or, once the model had run, refused its ``_raw`` parameter as unused."""
    torch.manual_seed(0)
    for run_first in (False, True):
        model = Dropped(cell).to(F64).eval()
        data = (torch.randn(5, 4, 3, dtype=F64), torch.randint(0, 2, (5,)))
        if run_first:  # (the layer then holds its last weight as an attribute)
            with torch.no_grad():
                model(data[0])
        ckpts = [tc.Checkpoint(params={k: v.clone() for k, v in model.state_dict().items()}, lr=0.1)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = tc.self_influence(model, ckpts, data, loss_fn=CE)
            e = tc.explain(model, ckpts, data, loss_fn=CE)
        assert_close(scores, reference_scores(model, ckpts, data, loss_fn=CE).self_influence)
        rnn = [r for r in e.routes if r.parameter.startswith("rnn.")]
        assert rnn and all("WeightDrop" in r.reason for r in rnn), rnn


class _LearnedH0(nn.Module):
    """A GRU whose initial state is a parameter, held ``[1, 1, H]`` and expanded over the batch's dimension of
    ``h0`` (the second: ``expand(1, B, H)``, ``expand(-1, B, -1)`` or ``repeat(1, B, 1)``), or held ``[1, H]``
    (``row_first``), expanded over its first and unsqueezed."""

    def __init__(self, row_first: bool, form: str = "expand"):
        super().__init__()
        self.row_first, self.form = row_first, form
        self.emb, self.rnn, self.fc = nn.Embedding(20, 6), nn.GRU(6, 5, batch_first=True), nn.Linear(5, 3)
        self.h0 = nn.Parameter(torch.randn(1, 5) if row_first else torch.randn(1, 1, 5))

    def forward(self, x):
        b = x.shape[0]
        if self.row_first:
            h0 = self.h0.expand(b, 5).unsqueeze(0)
        else:
            h0 = {"expand": lambda: self.h0.expand(1, b, 5), "expand_kept": lambda: self.h0.expand(-1, b, -1),
                  "repeat": lambda: self.h0.repeat(1, b, 1)}[self.form]()  # fmt: skip
        return self.fc(self.rnn(self.emb(x), h0)[0][:, -1])


@pytest.mark.parametrize("form", ["expand", "expand_kept", "repeat"])
def test_a_learned_initial_state_is_exact_and_a_row_the_model_expands_elsewhere_names_the_layout_to_hold(form):
    """A learned ``h0`` ``[1, 1, H]`` expanded over the batch in its second dimension cannot take copies per example
    in its first: the call left the batched path with torch's shape error alone, or (``expand(-1, B, -1)``,
    ``repeat``: every example given the first one's copy) blaming examples interacting (review helpers'). Exact
    either way; the warning names the layout that stays batched, ``[1, H]``, which does."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 20, (9, 7)), torch.randint(0, 3, (9,))
    for row_first in (False, True):
        model = _LearnedH0(row_first, form).double().eval()
        ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.3)]
        want = reference_scores(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert_close(tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=CE), want.influence)
        slow = [str(w.message) for w in caught if issubclass(w.category, tc.SlowPathWarning)]
        if row_first:
            assert not slow, slow
        else:
            assert len(slow) == 1 and "'h0' [1, 1, 5] is copied over the batch in its first dimension" in slow[0]
            assert "hold it as [1, 5]" in slow[0]
