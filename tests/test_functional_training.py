"""The torch.func training example: in-memory checkpoints of a functional loop, scored against the reference."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch
from torch import nn

import tracin_func as tc
from tests.conftest import assert_close, assert_topk
from tests.reference import reference_scores

pytest.importorskip("sklearn")

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "functional_training.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("functional_training_example", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = _load_example()


def test_functional_training_checkpoints_score_like_the_reference():
    torch.manual_seed(0)
    model = example.make_model(hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    train_data, test_data, flipped = example.load_data(40, 6, n_flipped=4, seed=1, dtype=torch.float64)
    assert train_data[0].dtype == torch.float64 and len(flipped) == 4
    params, ckpts, state = example.train(
        model, train_data, epochs=3, batch_size=16, lr=0.4, decay=0.5, checkpoint_every=3, dtype=torch.float64
    )
    assert state is None  # no test examples: no tracer
    # 3 epochs x 3 steps, a checkpoint every 3 steps: steps 0, 3, 6, each with its epoch's learning rate
    assert [c.lr for c in ckpts] == pytest.approx([0.4, 0.2, 0.1])
    assert all(isinstance(c, tc.Checkpoint) and set(c.params) == set(before) for c in ckpts)
    assert not torch.equal(ckpts[0].params["0.weight"], ckpts[-1].params["0.weight"])
    assert not torch.equal(ckpts[-1].params["0.weight"], params["0.weight"])
    assert all(not v.requires_grad for c in ckpts for v in c.params.values())

    loss_fn = nn.CrossEntropyLoss()
    ref = reference_scores(model, ckpts, train_data, test_data, loss_fn=loss_fn)
    args = (model, ckpts)
    scores = tc.influence(*args, train_data, test_data, loss_fn=loss_fn, batch_size=16)
    assert scores.dtype == torch.float64
    assert_close(scores, ref.influence)
    assert_close(tc.self_influence(*args, train_data, loss_fn=loss_fn, batch_size=16), ref.self_influence)
    for proponents in (True, False):
        top = tc.top_k(*args, train_data, test_data, k=5, loss_fn=loss_fn, proponents=proponents, batch_size=7)
        assert_topk(top, ref.influence, 5, largest=proponents)

    # training and scoring never touched the module's own parameters
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_functional_training_learns():
    torch.manual_seed(0)
    model = example.make_model(hidden=16)
    train_data, test_data, _ = example.load_data(300, 100, n_flipped=0, seed=2)
    params, ckpts, _ = example.train(model, train_data, epochs=8, batch_size=32, lr=0.5, checkpoint_every=20)
    assert len(ckpts) == 4
    initial = {k: v.detach() for k, v in model.named_parameters()}
    assert example.accuracy(model, params, test_data) > example.accuracy(model, initial, test_data) + 0.3


def test_traced_full_batch_training_is_tracin_over_every_step():
    """Full-batch steps with a checkpoint at every step: the tracer's sum over the steps is exactly TracIn over
    those checkpoints (the float64 loop reference); the batch order is shuffled, so indices must be honoured."""
    torch.manual_seed(0)
    model = example.make_model(hidden=8)
    train_data, test_data, _ = example.load_data(24, 5, n_flipped=2, seed=3, dtype=torch.float64)
    _, ckpts, state = example.train(
        model, train_data, epochs=4, batch_size=24, lr=0.4, decay=0.5, checkpoint_every=1, dtype=torch.float64,
        test=test_data,
    )
    assert len(ckpts) == 4 and int(state.steps) == 4
    ref = reference_scores(model, ckpts, train_data, test_data, loss_fn=nn.CrossEntropyLoss())
    assert_close(state.scores, ref.influence)
    assert_close(state.self_influence, ref.self_influence)


def test_torch_optim_loop_traces_like_the_functional_loop():
    """Minibatches: the plain torch.optim loop takes the same steps as the functional one, so the traces agree;
    the user's module is left as it was."""
    torch.manual_seed(0)
    model = example.make_model(hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_data, test_data, _ = example.load_data(40, 6, n_flipped=4, seed=1, dtype=torch.float64)
    kw = dict(epochs=3, batch_size=16, lr=0.4, decay=0.5, dtype=torch.float64)
    params, _, functional = example.train(model, train_data, test=test_data, **kw)
    trained, optim = example.train_torch_optim(model, train_data, test_data, **kw)
    assert_close(optim.scores, functional.scores)
    assert_close(optim.self_influence, functional.self_influence)
    assert_close(trained.state_dict()["0.weight"], params["0.weight"])
    assert (functional.self_influence > 0).all()  # 3 epochs: every example was seen
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
