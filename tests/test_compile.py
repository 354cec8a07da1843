"""`compile=True` runs the per-checkpoint updates through torch.compile and must give the eager numbers."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import tracin_func as tc
from tests.conftest import assert_close, assert_topk
from tests.models import N_TEST, N_TRAIN, mlp_task
from tests.reference import reference_scores

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_equals_eager(fresh_dynamo):
    t = mlp_task()
    ref = reference_scores(t.model, t.checkpoints, t.train, t.test, loss_fn=t.loss_fn)
    # one batch size for train (N_TRAIN) and one for test (N_TEST): few graphs to compile
    kw = {"loss_fn": t.loss_fn, "batch_size": N_TRAIN}
    args = (t.model, t.checkpoints)
    eager = tc.influence(*args, t.train, t.test, **kw)
    compiled = tc.influence(*args, t.train, t.test, compile=True, **kw)
    assert compiled.shape == (N_TEST, N_TRAIN)
    assert_close(compiled, eager, 1e-12)
    assert_close(compiled, ref.influence)
    # a second compiled call reuses the graphs (lr enters as a tensor) and still agrees
    again = tc.influence(*args, t.train, t.test, compile=True, **kw)
    assert_close(again, eager, 1e-12)
    self_scores = tc.self_influence(*args, t.train, compile=True, **kw)
    assert_close(self_scores, ref.self_influence)
    top = tc.top_k(*args, t.train, t.test, k=3, compile=True, proponents=False, **kw)
    assert_topk(top, ref.influence, 3, largest=False)
    assert all(not p.requires_grad or p.grad is None for p in t.model.parameters())


def test_compiled_updates_drop_rows_without_gradient_as_eager_does(fresh_dynamo):
    """Which rows carry gradient depends on the data; with the updates compiled, the scores still equal the
    reference."""
    from tests.test_factored import CE, ReadsOneRow, _ckpts, _reads_one_row_data

    model = ReadsOneRow().double().eval()
    ckpts, train, test = _ckpts(model), _reads_one_row_data(8), _reads_one_row_data(4)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    kw = {"loss_fn": CE, "batch_size": 4}  # the first batch drops rows of both Linears, the second of one
    assert_close(tc.influence(model, ckpts, train, test, compile=True, **kw), ref.influence)


def test_compiled_batches_of_one_example(fresh_dynamo):
    """Regression: with a last batch of one example, the batched pass under torch.compile read the compiled graph's
    autograd nodes as rows of several examples merged other than by a reshape (a check planning runs eagerly) and
    refused the call, and later calls too."""
    t = mlp_task()
    ref = reference_scores(t.model, t.checkpoints, t.train, t.test, loss_fn=t.loss_fn)
    odd = N_TRAIN - 1  # batches of N_TRAIN - 1 examples, then one
    got = tc.influence(t.model, t.checkpoints, t.train, t.test, loss_fn=t.loss_fn, batch_size=odd, compile=True)
    assert_close(got, ref.influence)
    assert_close(tc.self_influence(t.model, t.checkpoints, t.train, loss_fn=t.loss_fn, batch_size=odd,
                                   compile=True), ref.self_influence)  # fmt: skip


def test_compiled_call_breaks_no_graph_where_dynamo_warns(fresh_dynamo, capfd):
    """The criterion's `ignore_index` read (a value: a break in the compiled updates) made dynamo log a "Graph break
    from `Tensor.item()`" warning, three times a call, pointing at the library's code; it runs eagerly, unwarned."""
    t = mlp_task()
    kw = {"loss_fn": t.loss_fn, "batch_size": N_TRAIN}
    ref = reference_scores(t.model, t.checkpoints, t.train, t.test, loss_fn=t.loss_fn)
    assert_close(tc.influence(t.model, t.checkpoints, t.train, t.test, compile=True, **kw), ref.influence)
    assert "Graph break" not in capfd.readouterr().err


def test_compiled_cosine_scores_check_their_norms_without_dynamo_warnings(fresh_dynamo):
    """The check that a renormalised score's norms are within float32's range reads values (eager inside the compiled
    updates): called inside an expression, it left dynamo unable to resume there ("does not know how to trace the
    builtin `Tensor.mul_`")."""
    import warnings

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    ckpts = [tc.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, 0.1)]
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    score = functools.partial(tc.influence, model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=nn.CrossEntropyLoss(),
                              normalize="cosine")  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = score(compile=True)
    assert not [w for w in caught if "Dynamo" in str(w.message)]
    assert_close(compiled, score(), 1e-5)


def test_compiled_convolutions_of_every_route_trace_without_warnings(fresh_dynamo, capfd):
    """A CNN whose convolutions take each route (grouped, 1 x 1 from its patches, depthwise by a convolution and by
    shifted windows) scores as the reference with its updates compiled, without a warning of dynamo's: the patches
    were first taken by `as_strided`, which dynamo cannot trace ("does not know how to trace the builtin"). (It may
    log that the layers' hooks reached its recompile limit, as the README says.)"""
    import warnings

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 3),
    ).double().eval()  # fmt: skip
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    ckpts = [tc.Checkpoint(params={k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.1)]
    loss_fn = nn.CrossEntropyLoss()
    ref = reference_scores(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=loss_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_close(tc.influence(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=loss_fn, compile=True), ref.influence)
        assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=loss_fn, compile=True), ref.self_influence)
    warned = [w for w in caught if "_dynamo" in w.filename or issubclass(w.category, tc.SlowPathWarning)]
    assert not warned, [str(w.message) for w in warned]
    assert "Graph break" not in capfd.readouterr().err


def test_compiled_stacked_bidirectional_recurrent_layers(fresh_dynamo):
    """A two-layer bidirectional LSTM from a given initial state crashed inductor ("'NoneType' object has no attribute
    'numel'"): dynamo traced the base of a view its layer's hook reads (``_grads.lasting_edge``) as a tensor that is
    None when the graph runs (a review helper's finding). That read runs eagerly now: compiled equals eager."""
    from tests.test_recurrent import CE, CONFIGS, Net, _data, _rnn

    config = "lstm-2-bi-h0"
    gen = torch.Generator().manual_seed(1)
    states = CONFIGS[config][1] * (1 + CONFIGS[config][2])
    train, test = ([t.float() if t.is_floating_point() else t for t in _data(n, True, states, gen)] for n in (10, 3))
    torch.manual_seed(0)
    model = Net(_rnn(config)).float().eval()
    ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
    kw = {"loss_fn": CE, "batch_size": 5}
    eager = tc.influence(model, ckpts, train, test, **kw)
    assert_close(tc.influence(model, ckpts, train, test, compile=True, **kw), eager, 1e-5)


class _TeacherPass(torch.nn.Module):
    """A scored layer run once more under `no_grad` for a constant (a teacher's pass), its result cloned."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            teacher = self.fc(2 * x)
        return self.fc(x) + teacher.clone()


def test_compiled_forward_with_a_pass_without_gradients(fresh_dynamo):
    """The check for a reentrant checkpointed region walked the stack looking frames' code up in a set, which a frame
    under torch.compile made raise "unhashable type: 'dict'" (found by review): by identity."""
    model = _TeacherPass().double().eval()
    ckpts = [tc.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, 0.1)]
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
    loss = torch.nn.CrossEntropyLoss()
    want = reference_scores(model, ckpts, data, loss_fn=loss).self_influence
    assert_close(tc.self_influence(model, ckpts, data, loss_fn=loss, compile=True), want)


def test_compiled_projections_trace_their_block_keys_without_warnings(fresh_dynamo):
    """A projection's block key hashes the block's name with `zlib.crc32`, which dynamo cannot trace: it warned, from
    the library's code. The key is a constant to the compiled update."""
    import warnings

    t = mlp_task()
    embed = functools.partial(tc.embeddings, t.model, t.checkpoints, t.train, loss_fn=t.loss_fn, projection_dim=8,
                              batch_size=N_TRAIN)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = embed(compile=True)
    assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message) for w in caught]
    assert_close(compiled, embed(), 1e-6)


_lin_compiled = torch.compile(lambda x, w, b: x @ w.T + b, backend="eager")


class _CompiledHelper(torch.nn.Module):
    """A forward calling a function it compiled itself on a layer's weight read directly."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(_lin_compiled(x, self.a.weight, self.a.bias)))


def test_a_function_the_model_compiled_itself_leaves_the_batched_path(fresh_dynamo):
    """Dynamo, compiling the model's own function on the weight followed to the batch, failed with its raw "Guard failed
    on the same frame it was created" (a review helper's trial): the batched forward failing there, the call takes
    vmap(grad) or the loop, exact."""
    import warnings

    torch.manual_seed(0)
    model = _CompiledHelper().double().eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, 0.1)]
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    loss = torch.nn.CrossEntropyLoss()
    ref = reference_scores(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(tc.influence(model, ckpts, (x, y), (x[:3], y[:3]), loss_fn=loss), ref.influence)


def test_a_compiled_loss_is_scored_on_every_path(fresh_dynamo):
    """Under vmap (`factored=False`) dynamo failed on its own assertion, a raw AssertionError (a review helper's
    trial): looped, warned. (The call's mode's saved-tensor hook lookup is a graph break dynamo skips: traced
    through, a compiled BatchLoss over an nn.Sequential failed inside dynamo, a sweep's find.)"""
    t = mlp_task()
    loss = torch.compile(torch.nn.CrossEntropyLoss(), backend="eager")
    ref = reference_scores(t.model, t.checkpoints, t.train, t.test, loss_fn=t.loss_fn)
    with pytest.warns(RuntimeWarning, match="vmap failed"):  # (first: the batched call's compiled code runs under vmap)
        assert_close(tc.influence(t.model, t.checkpoints, t.train, t.test, loss_fn=loss, factored=False), ref.influence)
    assert_close(tc.influence(t.model, t.checkpoints, t.train, t.test, loss_fn=loss), ref.influence)


@torch.compile(backend="eager")
def _doubled_tanh(h):
    return torch.tanh(h) * 2


class _CallsACompiledHelper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.b(_doubled_tanh(self.a(x)))


def test_a_compiled_helper_of_the_model_meets_no_dynamo_warning_of_the_calls_modes(fresh_dynamo):
    """Dynamo tracing the model's compiled helper through the call's modes warned it could not trace their saved-tensor
    hook lookup, asking to file a PyTorch issue (a sweep's): the lookup is one dynamo skips; scores exact."""
    import warnings

    torch.manual_seed(0)
    model = _CallsACompiledHelper().double().eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, 0.1)]
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss = torch.nn.CrossEntropyLoss()
    ref = reference_scores(model, ckpts, (x, y), (x, y), loss_fn=loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_close(tc.self_influence(model, ckpts, (x, y), loss_fn=loss), ref.self_influence)
    assert not [w for w in caught if "Dynamo does not know" in str(w.message)], [str(w.message) for w in caught]


def test_a_scorer_inside_the_users_torch_compile_runs_eagerly():
    """Traced by the user's ``torch.compile``, a scorer's planning checks failed on dynamo's tensors: it warned that
    the model fails batched, took vmap(grad) and 20-50 s for a 0.1 s call (a review helper's). It runs eagerly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.1)]
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    loss = torch.nn.CrossEntropyLoss()
    compiled = torch.compile(lambda x, y: tc.self_influence(model, ckpts, (x, y), loss_fn=loss))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tc.SlowPathWarning)
        got = compiled(x, y)
    assert torch.equal(got, tc.self_influence(model, ckpts, (x, y), loss_fn=loss))


class _Branches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return torch.cond(h.mean() > 0, lambda h: self.b(h), lambda h: self.c(h) * 2, (h,))


def test_torch_cond_in_the_model_is_named_with_the_fix(fresh_dynamo):
    """`torch.cond` meets the call's dispatch mode in torch's raw "no rule registered for HigherOrderOperator" (a review
    helper's): the refusal names it and `torch.where`."""
    torch.manual_seed(0)
    model = _Branches().eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, 0.1)]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    fix = r"higher-order ops \(`torch.cond`.*`torch.where` over both branches"
    with pytest.raises(NotImplementedError, match=fix) as e:
        tc.self_influence(model, ckpts, (x, y), loss_fn=torch.nn.CrossEntropyLoss())
    assert "supports_higher_order_operators" not in str(e.value)  # (torch's hint: to change the library's mode)
