"""Properties every scorer must have whatever the model: symmetry, self-influence on the diagonal, streaming
top-k equal to a dense top-k, invariance to batching / chunking / key order, additivity over checkpoints."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tracin_func as tc
from tests.conftest import assert_close, assert_topk
from tests.models import N_TRAIN, Task, function_task, mlp_task, two_inputs_task

EXACT = 1e-12  # the same numbers computed in another order
FAST = settings(max_examples=6, deadline=None, database=None)


@functools.cache
def task(name: str) -> Task:
    return {"mlp": mlp_task, "function": function_task, "two_inputs": two_inputs_task}[name]()


@functools.cache
def dense(name: str) -> torch.Tensor:
    t = task(name)
    return tc.influence(t.model, t.checkpoints, t.train, t.test, loss_fn=t.loss_fn)


def _call(fn, t: Task, *data, **kw):
    return fn(t.model, t.checkpoints, *data, loss_fn=t.loss_fn, **kw)


@pytest.mark.parametrize("name", ["mlp", "function", "two_inputs"])
def test_symmetric_and_self_influence_on_the_diagonal(name):
    t = task(name)
    s = _call(tc.influence, t, t.train, t.train, batch_size=4)
    assert s.shape == (N_TRAIN, N_TRAIN)
    assert_close(s, s.T, EXACT)
    assert (torch.linalg.eigvalsh(s) > -1e-10 * s.abs().max()).all()  # a Gram matrix: positive semi-definite
    assert_close(_call(tc.self_influence, t, t.train, batch_size=3), torch.diagonal(s), EXACT)


# ---------------------------------------------------------------------------------------------- streaming top-k


@pytest.mark.parametrize(
    ("k", "batch_size"),
    [(1, 1), (3, 1), (3, 2), (4, 3), (N_TRAIN, 3), (N_TRAIN, N_TRAIN), (2, N_TRAIN + 5), (N_TRAIN, 1)],
)
@pytest.mark.parametrize("proponents", [True, False], ids=["proponents", "opponents"])
def test_streaming_top_k_equals_dense_topk(k, batch_size, proponents):
    t = task("mlp")
    top = _call(tc.top_k, t, t.train, t.test, k=k, proponents=proponents, batch_size=batch_size)
    assert_topk(top, dense("mlp"), k, largest=proponents, rtol=EXACT)


@FAST
@given(
    k=st.integers(1, N_TRAIN),
    batch_size=st.integers(1, N_TRAIN + 2),
    proponents=st.booleans(),
    aggregate=st.booleans(),
)
def test_streaming_top_k_property(k, batch_size, proponents, aggregate):
    t = task("two_inputs")
    top = _call(tc.top_k, t, t.train, t.test, k=k, proponents=proponents, aggregate=aggregate, batch_size=batch_size)
    scores = dense("two_inputs").sum(0, keepdim=True) if aggregate else dense("two_inputs")
    assert_topk(top, scores, k, largest=proponents, rtol=EXACT)


def test_top_k_with_exact_ties_across_batches():
    """Duplicated training examples tie exactly; the streaming merge must still return the right scores and
    indices that point at them, without duplicates, wherever the copies fall relative to batch boundaries."""
    t = task("mlp")
    x, y = t.train
    order = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
    train = (x[order], y[order])
    s = _call(tc.influence, t, train, t.test)
    assert_close(s[:, 0], s[:, 2], EXACT)
    for batch_size in (1, 3, 8):
        for proponents in (True, False):
            top = _call(tc.top_k, t, train, t.test, k=5, proponents=proponents, batch_size=batch_size)
            assert_topk(top, s, 5, largest=proponents, rtol=EXACT)


# ---------------------------------------------------------------------------------------------- invariances


@FAST
@given(batch_size=st.integers(1, N_TRAIN + 1), chunk_size=st.one_of(st.none(), st.integers(1, 5)))
def test_batch_size_and_chunk_size_invariance(batch_size, chunk_size):
    t = task("mlp")
    kw = {"batch_size": batch_size, "chunk_size": chunk_size}
    assert_close(_call(tc.influence, t, t.train, t.test, **kw), dense("mlp"), EXACT)
    e = _call(tc.embeddings, t, t.train, **kw)
    assert_close(e, _call(tc.embeddings, t, t.train, batch_size=N_TRAIN), EXACT)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunk_size_invariance_of_every_scorer(chunk_size):
    t = task("two_inputs")
    base = _call(tc.self_influence, t, t.train)
    assert_close(_call(tc.self_influence, t, t.train, chunk_size=chunk_size, batch_size=4), base, EXACT)
    assert_close(_call(tc.influence, t, t.train, t.test, chunk_size=chunk_size), dense("two_inputs"), EXACT)
    top = _call(tc.top_k, t, t.train, t.test, k=3, chunk_size=chunk_size, batch_size=4)
    assert_topk(top, dense("two_inputs"), 3, largest=True, rtol=EXACT)


def _reordered(ckpt: tc.Checkpoint, reverse: bool = True) -> tc.Checkpoint:
    keys = list(ckpt.params)
    keys = keys[::-1] if reverse else keys[1:] + keys[:1]
    return tc.Checkpoint(params={k: ckpt.params[k] for k in keys}, lr=ckpt.lr)


@pytest.mark.parametrize("name", ["mlp", "function"])
@pytest.mark.parametrize("how", ["all_reversed", "mixed"])
def test_key_order_invariance(name, how):
    """Leaves are matched by name: a checkpoint dict in another insertion order gives the same scores, even when
    the checkpoints disagree with each other on the order."""
    t = task(name)
    if how == "all_reversed":
        ckpts = [_reordered(c) for c in t.checkpoints]
    else:
        ckpts = [_reordered(c, reverse=i % 2 == 0) for i, c in enumerate(t.checkpoints)]
    assert [list(c.params) for c in ckpts] != [list(c.params) for c in t.checkpoints]
    got = tc.influence(t.model, ckpts, t.train, t.test, loss_fn=t.loss_fn)
    assert_close(got, dense(name), EXACT)
    self_scores = tc.self_influence(t.model, ckpts, t.train, loss_fn=t.loss_fn)
    assert_close(self_scores, _call(tc.self_influence, t, t.train), EXACT)
    aggregate = tc.influence(t.model, ckpts, t.train, t.test, loss_fn=t.loss_fn, aggregate=True)
    assert_close(aggregate, dense(name).sum(0, keepdim=True), EXACT)


def test_aggregate_is_the_sum_over_test_examples():
    t = task("two_inputs")
    for batch_size in (1, 3, 64):
        agg = _call(tc.influence, t, t.train, t.test, aggregate=True, batch_size=batch_size)
        assert agg.shape == (1, N_TRAIN)
        assert_close(agg, dense("two_inputs").sum(0, keepdim=True), EXACT)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_additive_over_checkpoints_and_linear_in_lr():
    t = task("mlp")
    parts = [tc.influence(t.model, [c], t.train, t.test, loss_fn=t.loss_fn) for c in t.checkpoints]
    assert_close(sum(parts), dense("mlp"), EXACT)
    c0 = t.checkpoints[0]
    scaled = tc.Checkpoint(params=c0.params, lr=torch.tensor(2.5 * c0.lr, dtype=torch.float64))
    assert_close(tc.influence(t.model, [scaled], t.train, t.test, loss_fn=t.loss_fn), 2.5 * parts[0], EXACT)
    # the same checkpoint listed twice counts twice
    twice = tc.self_influence(t.model, [c0, c0], t.train, loss_fn=t.loss_fn)
    assert_close(twice, 2 * tc.self_influence(t.model, [c0], t.train, loss_fn=t.loss_fn), EXACT)


def test_checkpoints_may_be_any_iterable():
    t = task("mlp")
    got = tc.influence(t.model, iter(t.checkpoints), t.train, t.test, loss_fn=t.loss_fn)
    assert_close(got, dense("mlp"), 0)
    got = tc.influence(t.model, tuple(t.checkpoints), t.train, t.test, loss_fn=t.loss_fn)
    assert_close(got, dense("mlp"), 0)


def test_nothing_is_mutated():
    """The model's parameters, requires_grad flags, mode, the checkpoints and the data are left as they were."""
    t = mlp_task()
    t.model.fc1.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in t.model.named_parameters()}
    ckpts = [{k: v.clone() for k, v in c.params.items()} for c in t.checkpoints]
    data = [x.clone() for x in (*t.train, *t.test)]
    grad_enabled = torch.is_grad_enabled()
    _call(tc.influence, t, t.train, t.test)
    _call(tc.top_k, t, t.train, t.test, k=2)
    _call(tc.self_influence, t, t.train)
    _call(tc.embeddings, t, t.train, params=lambda n: "fc2" in n)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in t.model.named_parameters()}
    assert not t.model.training
    assert all(p.grad is None for p in t.model.parameters())
    for saved, c in zip(ckpts, t.checkpoints):
        assert all(torch.equal(saved[k], v) and not v.requires_grad for k, v in c.params.items())
    assert all(torch.equal(a, b) for a, b in zip(data, (*t.train, *t.test)))
    assert torch.is_grad_enabled() == grad_enabled
