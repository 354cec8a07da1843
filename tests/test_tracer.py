"""TracIn inside the training loop (`tc.tracer`, planned once, and `tc.tracer_init` / `tc.tracer_update`, planned at
every step) against a float64 loop reference."""

from __future__ import annotations

import copy
import gc
import itertools
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import tracin_func as tc
import tracin_func._tracer as tracer_module
from tests.conftest import assert_close, assert_differs
from tests.models import CNN, MLP, mlp_function, mlp_task
from tests.reference import reference_grads

DTYPE = torch.float64


def _data(shape, n, n_classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=DTYPE), torch.randint(0, n_classes, (n,), generator=gen)


def _schedule(n_train):
    """Steps (indices, lr): batches of different sizes, repeated indices across steps and within one step."""
    return [
        (torch.tensor([0, 1, 2, 3]), 0.3),
        (torch.tensor([4, 5, 0]), 0.05),
        (torch.tensor([6, 7, 8, 9, 1]), 1.7),
        (torch.tensor([2, 2, 9]), 0.2),  # index 2 twice in one step
    ]


def _sgd_run(model, params, train, test, steps, loss_fn, *, factory=False, **kw):
    """A functional SGD loop threading the tracer (`tc.tracer` when `factory`, else `tc.tracer_update`); returns
    the final state and the parameters of every step."""
    x, y = train
    if factory:
        tracer = tc.tracer(model, test, n_train=x.shape[0], loss_fn=loss_fn, params=params, dtype=DTYPE, **kw)
        state, update = tracer.init(), tracer.update
    else:
        state = tc.tracer_init(test, n_train=x.shape[0], dtype=DTYPE)

        def update(state, *args):
            return tc.tracer_update(state, model, *args, loss_fn=loss_fn, **kw)

    history = []
    for idx, lr in steps:
        history.append((params, lr, idx))
        batch = (x[idx], y[idx])
        state = update(state, params, torch.tensor(lr, dtype=DTYPE), batch, idx)
        g = grad(lambda p, b: loss_fn(functional_call(model, p, (b[0],)), b[1]))(params, batch)
        params = {k: p - lr * g[k] for k, p in params.items()}
    return state, history


def _loop_reference(model, history, train, test, loss_fn, n_train):
    """TracIn by its definition: for every step, one `torch.autograd.grad` per example (tests.reference)."""
    scores = torch.zeros(test[0].shape[0], n_train, dtype=DTYPE)
    self_influence = torch.zeros(n_train, dtype=DTYPE)
    for params, lr, idx in history:
        ckpt = tc.Checkpoint(params={**model.state_dict(), **params}, lr=lr)
        g_test = reference_grads(model, ckpt, test, loss_fn, params=list(params))
        g_batch = reference_grads(model, ckpt, (train[0][idx], train[1][idx]), loss_fn, params=list(params))
        for b, j in enumerate(idx.tolist()):
            scores[:, j] += lr * g_test @ g_batch[b]
            self_influence[j] += lr * g_batch[b].square().sum()
    return scores, self_influence


@pytest.mark.parametrize("factory", [True, False], ids=["tracer", "tracer_update"])
@pytest.mark.parametrize("factored", [None, False])
@pytest.mark.parametrize("make", [MLP, CNN], ids=["mlp", "cnn"])
def test_tracer_matches_the_loop_reference(make, factored, factory):
    torch.manual_seed(0)
    model = make().to(DTYPE).eval()
    shape = (4,) if make is MLP else (1, 6, 6)
    train, test = _data(shape, 10, seed=1), _data(shape, 4, seed=2)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    before = copy.deepcopy(model.state_dict())
    loss_fn = nn.CrossEntropyLoss()
    state, history = _sgd_run(model, params, train, test, _schedule(10), loss_fn, factory=factory, factored=factored)
    scores, self_influence = _loop_reference(model, history, train, test, loss_fn, 10)
    assert state.scores.shape == (4, 10) and state.scores.dtype == DTYPE
    assert_close(state.scores, scores)
    assert_close(state.self_influence, self_influence)
    assert int(state.steps) == 4
    # the repeated index (2, seen at steps 0 and 3, twice at step 3) is not the same as counting it once
    once = _loop_reference(model, [(p, lr, idx.unique()) for p, lr, idx in history], train, test, loss_fn, 10)
    assert_differs(state.self_influence, once[1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_device_spelled_otherwise_than_tensors_read_it_steps():
    """``device="cpu:0"`` (on a GPU: ``"cuda"``, whose tensors read ``cuda:0``) names the device the state's tensors
    land on: the planned tracer's steps accept its own ``init()`` (they refused it, naming two spellings of one
    device) and score as the default device does."""
    torch.manual_seed(0)
    model = MLP().to(DTYPE).eval()
    train, test = _data((4,), 10, seed=1), _data((4,), 4, seed=2)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss_fn = nn.CrossEntropyLoss()
    spelled, _ = _sgd_run(model, params, train, test, _schedule(10), loss_fn, factory=True, device="cpu:0")
    default, _ = _sgd_run(model, params, train, test, _schedule(10), loss_fn, factory=True)
    assert_close(spelled.scores, default.scores)
    assert_close(spelled.self_influence, default.self_influence)


def test_tracer_update_checks_one_test_examples_batching_on_the_steps_batch():
    """Planned per step on a single test example, whose batched and lone runs are the same, ``tracer_update`` checks
    the batching on the step's training batch: a model mixing a batch's examples is not scored batched (it was:
    scores 15% off, self-influence 112%)."""
    from tests.test_factored import MixesExamples

    torch.manual_seed(0)
    model = MixesExamples().to(DTYPE).eval()
    train, test = _data((4,), 10, seed=1), _data((4,), 1, seed=2)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss_fn = nn.CrossEntropyLoss()
    with pytest.warns(tc.SlowPathWarning, match="a batched forward changed the first examples' factors"):
        state, history = _sgd_run(model, params, train, test, _schedule(10), loss_fn)
    scores, self_influence = _loop_reference(model, history, train, test, loss_fn, 10)
    assert_close(state.scores, scores)
    assert_close(state.self_influence, self_influence)


def test_tracer_checks_one_test_examples_batching_on_the_first_training_batch():
    """``tc.tracer`` planned on a single test example (no training batch at hand) checks the batching on its first
    training batch of two or more examples and refuses a model that mixes them (it was scored batched: 15% off); a
    model that does not mix runs as usual."""
    from tests.test_factored import MixesExamples

    torch.manual_seed(0)
    train, test = _data((4,), 10, seed=1), _data((4,), 1, seed=2)
    loss_fn = nn.CrossEntropyLoss()
    model = MixesExamples().to(DTYPE).eval()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match="batches them \\(a single example.*factored=False.*two or more test examples"):
        _sgd_run(model, params, train, test, _schedule(10), loss_fn, factory=True)
    state, history = _sgd_run(model, params, train, test, _schedule(10), loss_fn, factory=True, factored=False)
    assert_close(state.scores, _loop_reference(model, history, train, test, loss_fn, 10)[0])
    model = MLP().to(DTYPE).eval()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state, history = _sgd_run(model, params, train, test, _schedule(10), loss_fn, factory=True)
    assert_close(state.scores, _loop_reference(model, history, train, test, loss_fn, 10)[0])


def test_update_is_pure():
    t = mlp_task()
    state = tc.tracer_init(t.test, n_train=10, dtype=DTYPE)
    params = dict(t.checkpoints[0].params)
    copies = {k: v.clone() for k, v in params.items()}
    idx = torch.tensor([3, 1, 3])
    batch = (t.train[0][idx], t.train[1][idx])
    new = tc.tracer_update(state, t.model, params, 0.5, batch, idx, loss_fn=t.loss_fn)
    assert not state.scores.any() and not state.self_influence.any() and int(state.steps) == 0
    assert all(torch.equal(copies[k], v) for k, v in params.items())
    assert new.test is state.test
    # the same update twice from the same state gives the same state (no hidden state in between)
    again = tc.tracer_update(state, t.model, params, 0.5, batch, idx, loss_fn=t.loss_fn)
    assert torch.equal(new.scores, again.scores) and torch.equal(new.self_influence, again.self_influence)
    untouched = [j for j in range(10) if j not in (1, 3)]
    assert not new.scores[:, untouched].any() and not new.self_influence[untouched].any()


def test_factory_equals_tracer_update_and_never_plans_again(monkeypatch):
    """`tc.tracer(...).update` is `tc.tracer_update` under a plan made once: the same numbers bit for bit (the same
    plan, made on the test batch), with planning switched off after the factory returned."""
    t = mlp_task()
    tracer = tc.tracer(t.model, t.test, n_train=10, loss_fn=t.loss_fn, dtype=DTYPE)

    def no_planning(*args, **kwargs):
        raise AssertionError("planned again after `tc.tracer`")

    monkeypatch.setattr(tracer_module, "plan_call", no_planning)
    monkeypatch.setattr(tracer_module, "make_setup", no_planning)
    steps = list(zip(_schedule(10), itertools.cycle(t.checkpoints)))
    state = tracer.init()
    for (idx, lr), ckpt in steps:
        state = tracer.update(state, dict(ckpt.params), lr, (t.train[0][idx], t.train[1][idx]), idx)
    monkeypatch.undo()
    simple = tc.tracer_init(t.test, n_train=10, dtype=DTYPE)
    for (idx, lr), ckpt in steps:
        simple = tc.tracer_update(simple, t.model, ckpt.params, lr, (t.train[0][idx], t.train[1][idx]), idx,
                                  loss_fn=t.loss_fn)
    assert torch.equal(state.scores, simple.scores) and torch.equal(state.self_influence, simple.self_influence)
    assert int(state.steps) == 4 and state.scores.abs().max() > 0


class Tempered(nn.Module):
    """A temperature, a scale (a tensor, not a buffer), a gain beside an offset in a settings dict, a NumPy scalar and
    a shift the training loop may change, and a branch on its mode (no dropout)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.temperature = nn.Linear(4, 8), nn.Linear(8, 3), 1.0
        self.scale, self.settings = torch.tensor(1.0), {"gain": 1.0, "offset": torch.tensor([0.0, 0.5, -0.5])}
        self.sharpness = np.float32(1.0)
        self.register_buffer("shift", torch.zeros(3))

    def forward(self, x):
        out = self.fc2(torch.tanh(self.fc1(x))) / self.temperature * self.scale * self.settings["gain"] + self.shift
        out = out * float(self.sharpness) + self.settings["offset"]
        return out * (0.5 if self.training else 1.0)


def test_the_factorys_update_reads_the_model_as_it_is():
    """The tracer's copy of the model was made at planning: a buffer rebound since, an attribute or the mode changed
    since, were silently not seen (the rows of `tc.tracer_update`, which plans every step, differed by 10x; a tensor
    attribute rebound or a settings dict changed in place, 83%). Each step reads them from the model: the same
    numbers as `tc.tracer_update`, bit for bit."""
    torch.manual_seed(0)
    model, ce = Tempered().double().eval(), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (4,), generator=gen))
    test = (torch.randn(2, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (2,), generator=gen))
    tracer, idx = tc.tracer(model, test, n_train=4, loss_fn=ce, dtype=DTYPE), torch.arange(4)
    params = dict(model.named_parameters())
    before = tracer.update(tracer.init(), params, 1.0, batch, idx).scores
    changes = [lambda: setattr(model, "shift", torch.tensor([3.0, -2.0, 0.0], dtype=DTYPE)),
               lambda: setattr(model, "temperature", 0.25), lambda: setattr(model, "scale", torch.tensor(2.0)),
               lambda: model.settings.update(gain=0.3), lambda: setattr(model, "sharpness", np.float32(2.0)),
               model.train]  # fmt: skip
    for change in changes:
        change()
        want = tc.tracer_update(tc.tracer_init(test, n_train=4, dtype=DTYPE), model, params, 1.0, batch, idx,
                                loss_fn=ce)  # fmt: skip
        got = tracer.update(tracer.init(), params, 1.0, batch, idx).scores
        assert torch.equal(got, want.scores) and not torch.equal(got, before)
        before = got


def test_the_factorys_update_follows_hooks_and_layers_changed_since_planning():
    """The tracer's copy of the modules keeps the hooks and layers the model had at planning: a forward hook or pre-hook
    added or removed since, a layer replaced or an object a layer holds rebound (an activation), was silently not seen
    (49-92% off). A step on a model whose modules or forward hooks differ is planned for it, an object rebound is
    followed: the same numbers as `tc.tracer_update`, bit for bit."""
    torch.manual_seed(0)
    model, ce = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval(), nn.CrossEntropyLoss()
    x, y = _data((4,), 6)
    tracer, idx = tc.tracer(model, (x[:2], y[:2]), n_train=6, loss_fn=ce, dtype=DTYPE), torch.arange(2, 6)
    params, batch = dict(model.named_parameters()), (x[idx], y[idx])
    before, handles = tracer.update(tracer.init(), params, 1.0, batch, idx).scores, []
    model[1].act = torch.tanh  # (an object held by a layer: rebound below)
    model[1].forward = types.MethodType(lambda self, h: self.act(h), model[1])
    changes = [lambda: handles.append(model[0].register_forward_hook(lambda m, i, o: 3 * o)),
               lambda: handles.pop().remove(),
               lambda: handles.append(model[2].register_forward_pre_hook(lambda m, i: (i[0] * 2,))),
               lambda: setattr(model[1], "act", torch.sigmoid),  # (scored as planned: 92% off, found by review)
               lambda: model.__setitem__(1, nn.ReLU()),
               # a method bound as a layer's forward, then removed, and a layer's class swapped (46-325%, by review)
               lambda: setattr(model[2], "forward", types.MethodType(lambda self, h: 2 * F.linear(h, self.weight),
                                                                      model[2])),
               lambda: delattr(model[2], "forward"),
               lambda: setattr(model[2], "__class__", _HalvedLinear)]  # fmt: skip
    for change in changes:
        change()
        want = tc.tracer_update(tc.tracer_init((x[:2], y[:2]), n_train=6, dtype=DTYPE), model, params, 1.0, batch,
                                idx, loss_fn=ce)  # fmt: skip
        got = tracer.update(tracer.init(), params, 1.0, batch, idx).scores
        assert torch.equal(got, want.scores) and not torch.equal(got, before)
        before = got
    for scale in (2.0, -3.0, 5.0):  # (each bound method freed after its step: its id given to the next, which reused
        model[2].forward = types.MethodType(lambda self, h, s=scale: s * F.linear(h, self.weight), model[2])  # its
        want = tc.tracer_update(tc.tracer_init((x[:2], y[:2]), n_train=6, dtype=DTYPE), model, params, 1.0, batch,
                                idx, loss_fn=ce)  # fmt: skip  (plan: 83-99% off, a sweep's find)
        assert torch.equal(tracer.update(tracer.init(), params, 1.0, batch, idx).scores, want.scores)
        del model[2].forward
    conv = nn.Conv1d(1, 1, 1).double()  # (an unhashable callable set as `_conv_forward`: the key raised TypeError)
    conv._conv_forward = _Unhashable(conv._conv_forward)
    tc.tracer(nn.Sequential(conv, nn.Flatten(), nn.Linear(4, 3)).double().eval(), (x[:2, None], y[:2]), n_train=6,
              loss_fn=ce, dtype=DTYPE)  # fmt: skip


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class _HalvedLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) / 2


@pytest.mark.parametrize("frozen_at_planning", [False, True])
def test_the_factorys_update_follows_parameters_frozen_or_unfrozen(frozen_at_planning):
    """A backbone frozen after warm-up (or unfrozen later) takes no step (or starts taking them): planned once, the
    tracer kept differentiating the parameters trainable at planning (10.5% off, silently). A step whose trainable
    parameters differ is planned for them (once per set): the same numbers as `tc.tracer_update`, bit for bit."""
    torch.manual_seed(0)
    model, ce = MLP().double().eval(), nn.CrossEntropyLoss()
    model.fc1.requires_grad_(not frozen_at_planning)
    x, y = _data((4,), 6)
    tracer, idx = tc.tracer(model, (x[:2], y[:2]), n_train=6, loss_fn=ce, dtype=DTYPE), torch.arange(2, 6)
    params, batch = dict(model.named_parameters()), (x[idx], y[idx])
    before = tracer.update(tracer.init(), params, 1.0, batch, idx).scores
    for trainable in (frozen_at_planning, not frozen_at_planning):
        model.fc1.requires_grad_(trainable)
        want = tc.tracer_update(tc.tracer_init((x[:2], y[:2]), n_train=6, dtype=DTYPE), model, params, 1.0, batch,
                                idx, loss_fn=ce)  # fmt: skip
        got = tracer.update(tracer.init(), params, 1.0, batch, idx).scores
        assert torch.equal(got, want.scores) and not torch.equal(got, before)
        before = got


def test_the_factorys_plans_for_trainable_sets_are_bounded():
    """Each plan holds a copy of the model's modules: a trainable set changing at every step kept one per step."""
    torch.manual_seed(0)
    model, ce = MLP().double().eval(), nn.CrossEntropyLoss()
    x, y = _data((4,), 6)
    tracer, idx = tc.tracer(model, (x[:2], y[:2]), n_train=6, loss_fn=ce, dtype=DTYPE), torch.arange(2, 6)
    params, state = dict(model.named_parameters()), tracer.init()
    for frozen in itertools.combinations(params, 2):  # six sets
        for name, p in params.items():
            p.requires_grad_(name not in frozen)
        state = tracer.update(state, params, 1.0, (x[idx], y[idx]), idx)
    gc.collect()
    copies = [o for o in gc.get_objects() if isinstance(o, MLP) and o.fc1._parameters["weight"] is model.fc1.weight]
    assert len(copies) <= 1 + 1 + tracer_module._PLANS_KEPT  # (the model, the first plan's copy, the last plans')


def test_the_factorys_update_under_inference_mode_is_refused_clearly():
    """Under `torch.inference_mode()` a step raised torch's "Inference tensors do not track version counter"."""
    t = mlp_task()
    tracer, idx = tc.tracer(t.model, t.test, n_train=10, loss_fn=t.loss_fn, dtype=DTYPE), torch.tensor([0, 1])
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"`tc\.tracer\(\.\.\.\)\.update`: .*inference_mode"):
        tracer.update(tracer.init(), dict(t.model.named_parameters()), 0.1, (t.train[0][idx], t.train[1][idx]), idx)


def test_factory_update_is_pure():
    t = mlp_task()
    test_copy = tuple(x.clone() for x in t.test)
    before = copy.deepcopy(t.model.state_dict())
    tracer = tc.tracer(t.model, t.test, n_train=10, loss_fn=t.loss_fn, dtype=DTYPE)
    state = tracer.init()
    params = dict(t.checkpoints[2].params)
    copies = {k: v.clone() for k, v in params.items()}
    idx = torch.tensor([3, 1, 3])
    batch = (t.train[0][idx], t.train[1][idx])
    batch_copy = tuple(x.clone() for x in batch)
    new = tracer.update(state, params, 0.5, batch, idx)
    assert not state.scores.any() and not state.self_influence.any() and int(state.steps) == 0
    assert all(torch.equal(copies[k], v) for k, v in params.items())
    assert all(torch.equal(a, b) for a, b in zip(batch, batch_copy))
    assert all(torch.equal(a, b) for a, b in zip(t.test, test_copy))
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert new.test is state.test
    # the same update twice from the same state gives the same state (no hidden state in between)
    again = tracer.update(state, params, 0.5, batch, idx)
    assert torch.equal(new.scores, again.scores) and torch.equal(new.self_influence, again.self_influence)
    # init gives new zeros each time; an older state stays as it was when updated further
    fresh = tracer.init()
    assert fresh.scores is not state.scores and not fresh.scores.any()
    # its test batch too (found by review shared: one state's changed in place changed every later init's)
    assert all(a is not b and torch.equal(a, b) for a, b in zip(fresh.test, state.test))
    newer = tracer.update(new, params, 0.5, batch, idx)
    assert torch.equal(new.scores, again.scores) and int(new.steps) == 1 and int(newer.steps) == 2
    assert_close(newer.scores, 2 * new.scores)


def test_one_pass_at_fixed_params_equals_influence():
    """Property: parameters fixed over the steps, every example seen once with the same lr == `tc.influence` at
    that one checkpoint (and `tc.self_influence`)."""
    t = mlp_task()
    ckpt = tc.Checkpoint(params=t.checkpoints[1].params, lr=0.05)
    state = tc.tracer_init(t.test, n_train=10, dtype=DTYPE)
    order = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4])
    for idx in order.split(3):
        state = tc.tracer_update(state, t.model, ckpt.params, ckpt.lr, (t.train[0][idx], t.train[1][idx]), idx,
                                 loss_fn=t.loss_fn)
    assert_close(state.scores, tc.influence(t.model, [ckpt], t.train, t.test, loss_fn=t.loss_fn))
    assert_close(state.self_influence, tc.self_influence(t.model, [ckpt], t.train, loss_fn=t.loss_fn))


def test_frozen_parameters_take_no_step_and_get_no_gradient():
    """A frozen parameter (a fine-tuned model's backbone) in `dict(model.named_parameters())` was differentiated: 18-49%
    off TracIn over the steps taken. As in the scorers, only trainable parameters are; all frozen: refused."""
    t = mlp_task()
    model = copy.deepcopy(t.model)
    frozen = next(iter(dict(model.named_parameters())))
    model.get_parameter(frozen).requires_grad_(False)
    params = {k: v.detach() for k, v in t.checkpoints[1].params.items() if k in dict(model.named_parameters())}
    ckpt = tc.Checkpoint(params=params, lr=0.05)
    idx = torch.arange(10)
    for update in (lambda s, *a: tc.tracer_update(s, model, *a, loss_fn=t.loss_fn),
                   tc.tracer(model, t.test, n_train=10, loss_fn=t.loss_fn, params=params, dtype=DTYPE).update):
        state = update(tc.tracer_init(t.test, n_train=10, dtype=DTYPE), params, ckpt.lr, t.train, idx)
        assert_close(state.scores, tc.influence(model, [ckpt], t.train, t.test, loss_fn=t.loss_fn))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"every parameter of the model in it is frozen \(`requires_grad=False`"):
        tc.tracer_update(tc.tracer_init(t.test, n_train=10, dtype=DTYPE), model, params, 0.1, t.train, idx,
                         loss_fn=t.loss_fn)  # fmt: skip


def test_pure_function_model_and_example_loss():
    t = mlp_task()
    gen = torch.Generator().manual_seed(5)
    params = {
        "w1": torch.randn(4, 5, generator=gen, dtype=DTYPE), "b1": torch.randn(5, generator=gen, dtype=DTYPE),
        "w2": torch.randn(5, 3, generator=gen, dtype=DTYPE), "b2": torch.randn(3, generator=gen, dtype=DTYPE),
    }
    idx = torch.tensor([4, 0, 4])
    batch = (t.train[0][idx], t.train[1][idx])
    state = tc.tracer_init(t.test, n_train=10, dtype=DTYPE)
    criterion = nn.CrossEntropyLoss()
    by_criterion = tc.tracer_update(state, mlp_function, params, 0.7, batch, idx, loss_fn=criterion)
    example_loss = tc.ExampleLoss(lambda p, b: criterion(mlp_function(p, b[0]), b[1]))
    by_example = tc.tracer_update(state, mlp_function, params, 0.7, batch, idx, loss_fn=example_loss)
    factories = [tc.tracer(mlp_function, t.test, n_train=10, loss_fn=fn, params=params, dtype=DTYPE)
                 for fn in (criterion, example_loss)]
    by_factory = [f.update(f.init(), params, 0.7, batch, idx) for f in factories]
    ckpt = tc.Checkpoint(params=params, lr=0.7)
    g_test = reference_grads(mlp_function, ckpt, t.test, criterion)
    g_batch = reference_grads(mlp_function, ckpt, batch, criterion)
    expected = torch.zeros(4, 10, dtype=DTYPE).index_add(1, idx, 0.7 * g_test @ g_batch.T)
    assert_close(by_criterion.scores, expected)
    assert_close(by_example.scores, expected)
    assert_close(by_example.self_influence, by_criterion.self_influence)
    for traced in by_factory:
        assert_close(traced.scores, expected)
        assert_close(traced.self_influence, by_criterion.self_influence)


def test_torch_optim_loop_with_a_test_loss():
    """A plain torch.optim loop: `dict(model.named_parameters())` before `optimizer.step()`; the model's own
    parameters require grad and are updated in place by the optimizer, the tracer only reads them."""
    torch.manual_seed(3)
    model = MLP().to(DTYPE).eval()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    train, test = _data((4,), 10, seed=3), _data((4,), 4, seed=4)
    loss_fn, test_loss_fn = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    state = tc.tracer_init(test, n_train=10, dtype=DTYPE)
    tracer = tc.tracer(model, test, n_train=10, loss_fn=loss_fn, test_loss_fn=test_loss_fn, dtype=DTYPE)
    planned = tracer.init()
    history = []
    for idx, lr in _schedule(10):
        for group in optimizer.param_groups:
            group["lr"] = lr
        history.append(({k: v.detach().clone() for k, v in model.named_parameters()}, lr, idx))
        state = tc.tracer_update(state, model, dict(model.named_parameters()), lr, (train[0][idx], train[1][idx]),
                                 idx, loss_fn=loss_fn, test_loss_fn=test_loss_fn)
        planned = tracer.update(planned, dict(model.named_parameters()), lr, (train[0][idx], train[1][idx]), idx)
        optimizer.zero_grad()
        loss_fn(model(train[0][idx]), train[1][idx]).backward()
        optimizer.step()
    assert not torch.equal(start["fc1.weight"], model.fc1.weight)
    scores = torch.zeros(4, 10, dtype=DTYPE)
    for params, lr, idx in history:
        ckpt = tc.Checkpoint(params=params, lr=lr)
        g_test = reference_grads(model, ckpt, test, test_loss_fn)
        g_batch = reference_grads(model, ckpt, (train[0][idx], train[1][idx]), loss_fn)
        scores.index_add_(1, idx, lr * g_test @ g_batch.T)
    assert_close(state.scores, scores)
    assert_close(planned.scores, scores)


@pytest.mark.slow
def test_compiled_update_equals_eager():
    torch._dynamo.reset()
    try:
        t = mlp_task()
        params = dict(t.checkpoints[0].params)
        state = tc.tracer_init(t.test, n_train=10, dtype=DTYPE)
        update = torch.compile(tc.tracer_update)
        eager, compiled = state, state
        for idx, lr in _schedule(10)[:3]:
            batch, lr = (t.train[0][idx], t.train[1][idx]), torch.tensor(lr, dtype=DTYPE)
            eager = tc.tracer_update(eager, t.model, params, lr, batch, idx, loss_fn=t.loss_fn)
            compiled = update(compiled, t.model, params, lr, batch, idx, loss_fn=t.loss_fn)
        assert_close(compiled.scores, eager.scores, 1e-12)
        assert_close(compiled.self_influence, eager.self_influence, 1e-12)
        assert int(compiled.steps) == 3
    finally:
        torch._dynamo.reset()


def test_both_forms_compute_their_gradients_eagerly_inside_compiled_code():
    """The README's promise for `torch.compile(tracer.update)`: the gradient part is not traced (a refactor left
    the factory's without it: 27 graphs, 20-26 s to compile a 3-layer MLP's step)."""
    for products in (tracer_module._products, tracer_module._planned_products):
        assert getattr(products, "_torchdynamo_disable", False), products


def test_a_learning_rate_requiring_grad_leaves_no_graph_in_the_state():
    t = mlp_task()
    tracer, idx = tc.tracer(t.model, t.test, n_train=10, loss_fn=t.loss_fn, dtype=DTYPE), torch.arange(3)
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    state = tracer.update(tracer.init(), dict(t.checkpoints[0].params), lr, (t.train[0][:3], t.train[1][:3]), idx)
    assert not state.scores.requires_grad and not state.self_influence.requires_grad


@pytest.mark.slow
def test_compiled_factory_update_equals_eager():
    torch._dynamo.reset()
    try:
        t = mlp_task()
        tracer = tc.tracer(t.model, t.test, n_train=10, loss_fn=t.loss_fn, dtype=DTYPE)
        update = torch.compile(tracer.update)
        eager = compiled = tracer.init()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for (idx, lr), ckpt in zip(_schedule(10)[:3], t.checkpoints):
                batch, lr = (t.train[0][idx], t.train[1][idx]), torch.tensor(lr, dtype=DTYPE)
                eager = tracer.update(eager, dict(ckpt.params), lr, batch, idx)
                compiled = update(compiled, dict(ckpt.params), lr, batch, idx)
        # (dynamo warned it could not trace the call's stash of saved-tensors hooks: "please file an issue")
        assert not [w for w in caught if "Dynamo does not know how to trace" in str(w.message)]
        assert_close(compiled.scores, eager.scores, 1e-12)
        assert_close(compiled.self_influence, eager.self_influence, 1e-12)
        assert int(compiled.steps) == 3
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def call():
    t = mlp_task()
    state = tc.tracer_init(t.test, n_train=10, dtype=DTYPE)
    idx = torch.tensor([0, 1])
    args = dict(state=state, model=t.model, params=dict(t.checkpoints[0].params), lr=0.1,
                batch=(t.train[0][:2], t.train[1][:2]), indices=idx, loss_fn=t.loss_fn)
    return lambda **kw: tc.tracer_update(**{**args, **kw})


def test_error_indices_out_of_range(call):
    with pytest.raises(ValueError, match=r"`indices` \[10\] are outside \[0, n_train\) = \[0, 10\)"):
        call(indices=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"`indices` \[-1\] are outside"):
        call(indices=torch.tensor([-1, 0]))


def test_error_indices_length(call):
    with pytest.raises(ValueError, match="`indices` has 3 entries but `batch` holds 2 examples"):
        call(indices=torch.tensor([0, 1, 2]))


def test_error_indices_type(call):
    with pytest.raises(TypeError, match="`indices` must be a 1-d integer tensor.*torch.float32"):
        call(indices=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="`indices` must be a 1-d integer tensor.*list"):
        call(indices=[0, 1])
    with pytest.raises(TypeError, match=r"`indices` must be a 1-d integer tensor.*shape \(2, 1\)"):
        call(indices=torch.tensor([[0], [1]]))


def test_error_lr(call):
    with pytest.raises(ValueError, match="`lr` must be finite and non-negative.*-0.1"):
        call(lr=-0.1)
    with pytest.raises(ValueError, match=r"`lr` must be a number or a floating 0-d tensor.*shape \(2,\)"):
        call(lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="`lr` must be a number or a 0-d tensor, got '0.1'"):
        call(lr="0.1")


def test_error_state_and_params(call):
    with pytest.raises(TypeError, match="`state` must be the `tc.TracerState`"):
        call(state={"scores": torch.zeros(4, 10)})
    with pytest.raises(ValueError, match="`params` holds none of the model's parameters"):
        call(params={"weight": torch.zeros(3)})
    with pytest.raises(TypeError, match="`params` must be a non-empty dict"):
        call(params=[torch.zeros(3)])


def test_error_batch_without_target(call):
    with pytest.raises(ValueError, match="`batch`: a batch of 1 element has no target"):
        call(batch=(torch.zeros(2, 4, dtype=DTYPE),))


class _Stores(nn.Module):
    """Stores a fresh object on itself at every forward (the training loop's forward runs between steps)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        self.last = object()
        return self.fc2(torch.tanh(self.fc1(x)))


def test_an_object_the_model_stores_at_every_forward_plans_nothing_again(monkeypatch):
    """Rebound objects are followed at each step, not planned for: a model storing a fresh one at every forward was
    planned again at every step (found by review: 20 steps 0.47 s against 0.17 s)."""
    import tracin_func._tracer as tracer_module

    model, ce = _Stores().double().eval(), nn.CrossEntropyLoss()
    x, y = _data((4,), 6)
    tracer, plans = tc.tracer(model, (x[:2], y[:2]), n_train=6, loss_fn=ce, dtype=DTYPE), []
    planned = tracer_module.plan_call
    monkeypatch.setattr(tracer_module, "plan_call", lambda *a, **k: plans.append(1) or planned(*a, **k))
    state, params = tracer.init(), dict(model.named_parameters())
    for step in range(3):
        model(x)  # (the training loop's forward)
        state = tracer.update(state, params, 0.1, (x[step : step + 2], y[step : step + 2]), torch.arange(2) + step)
    assert not plans


def test_the_state_holds_a_copy_of_the_test_batch():
    """`init()`'s test batch was the user's own tensors where no conversion copied them: changed in place after, they
    changed the scores (found by review); `n_train` may be a NumPy or 0-d tensor integer."""
    t = mlp_task()
    test = tuple(x.clone() for x in t.test)
    tracer = tc.tracer(t.model, test, n_train=np.int64(10), loss_fn=t.loss_fn, dtype=DTYPE)
    args = (dict(t.checkpoints[0].params), 0.5, (t.train[0][:3], t.train[1][:3]), torch.arange(3))
    before = tracer.update(tracer.init(), *args).scores
    test[0].mul_(2)
    assert torch.equal(tracer.update(tracer.init(), *args).scores, before)
    assert tc.tracer_init(test, n_train=torch.tensor(10)).test[0].data_ptr() != test[0].data_ptr()


def test_error_init():
    test = (torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`n_train` must be a positive int.*got 0"):
        tc.tracer_init(test, n_train=0)
    with pytest.raises(ValueError, match="`dtype`=torch.float16: inner products of gradients in half"):
        tc.tracer_init(test, n_train=3, dtype=torch.float16)
    with pytest.raises(TypeError, match="`dtype` must be a floating torch.dtype"):
        tc.tracer_init(test, n_train=3, dtype=torch.int64)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        tc.tracer_init((torch.randn(2, 3), torch.tensor([0, 1, 2])), n_train=3)


@pytest.fixture
def planned_call():
    t = mlp_task()
    tracer = tc.tracer(t.model, t.test, n_train=10, loss_fn=t.loss_fn, dtype=DTYPE)
    args = dict(state=tracer.init(), params=dict(t.checkpoints[0].params), lr=0.1,
                batch=(t.train[0][:2], t.train[1][:2]), indices=torch.tensor([0, 1]))
    return lambda **kw: tracer.update(**{**args, **kw})


def test_factory_error_params_other_than_planned(planned_call):
    params = dict(mlp_task().checkpoints[0].params)
    missing = {k: v for k, v in params.items() if k != "fc2.bias"}
    with pytest.raises(ValueError, match=r"`params` does not match the names the tracer was planned for: missing "
                                         r"\['fc2.bias'\], unexpected \[\]\..*make a new tracer"):
        planned_call(params=missing)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra'\]"):
        planned_call(params={**params, "extra": torch.zeros(3, dtype=DTYPE)})
    with pytest.raises(ValueError, match=r"unexpected \['_orig_mod.fc1.weight', .*carry the prefix of a wrapper"):
        planned_call(params={f"_orig_mod.{k}": v for k, v in params.items()})  # (a compiled module's names)
    with pytest.raises(ValueError, match=r"`params\['fc1.weight'\]` has shape \(6, 5\) but the tracer was planned "
                                         r"for shape \(6, 4\)"):
        planned_call(params={**params, "fc1.weight": torch.zeros(6, 5, dtype=DTYPE)})
    with pytest.raises(TypeError, match=r"`params\['fc1.bias'\]` is a list, not a torch.Tensor"):
        planned_call(params={**params, "fc1.bias": [0.0] * 6})
    with pytest.raises(TypeError, match=r"`params\['fc1.bias'\]` is a torch.int64 tensor but is differentiated"):
        planned_call(params={**params, "fc1.bias": torch.zeros(6, dtype=torch.long)})
    with pytest.raises(TypeError, match="`params` must be a dict .* with the names the tracer was planned for; got "
                                        "list"):
        planned_call(params=list(params.values()))


def test_factory_error_state_of_another_shape(planned_call):
    t = mlp_task()
    with pytest.raises(ValueError, match=r"`state` holds torch.float64 scores of shape \(4, 12\) on cpu, but this "
                                         r"tracer was made for torch.float64 \[n_test, n_train\] = \[4, 10\]"):
        planned_call(state=tc.tracer_init(t.test, n_train=12, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"`state` holds torch.float32 scores .* start from this tracer's `init\(\)`"):
        planned_call(state=tc.tracer_init(t.test, n_train=10, dtype=torch.float32))
    with pytest.raises(TypeError, match="`state` must be the `tc.TracerState`"):
        planned_call(state={"scores": torch.zeros(4, 10)})


def test_factory_errors_of_the_step(planned_call):
    with pytest.raises(ValueError, match=r"`indices` \[10\] are outside .*a larger `n_train` to `tc.tracer`"):
        planned_call(indices=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="`indices` has 3 entries but `batch` holds 2 examples"):
        planned_call(indices=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="`lr` must be finite and non-negative.*-0.1"):
        planned_call(lr=-0.1)
    with pytest.raises(ValueError, match="`batch`: a batch of 1 element has no target"):
        planned_call(batch=(torch.zeros(2, 4, dtype=DTYPE),))


def test_factory_error_model_switched_to_training_mode():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).to(DTYPE).eval()
    train, test = _data((4,), 6, seed=6), _data((4,), 2, seed=7)
    tracer = tc.tracer(model, test, n_train=6, loss_fn=nn.CrossEntropyLoss(), dtype=DTYPE)
    params = dict(model.named_parameters())
    idx = torch.tensor([0, 1])
    tracer.update(tracer.init(), params, 0.1, (train[0][idx], train[1][idx]), idx)
    model.train()
    in_loop = "`model` has Dropout '1' in training mode.*Call `model.eval\\(\\)`.*`model.train\\(\\)` after it"
    with pytest.raises(ValueError, match=in_loop):
        tracer.update(tracer.init(), params, 0.1, (train[0][idx], train[1][idx]), idx)



class _Switched(nn.Module):
    """Dropout in its own code, on in training mode or when its flag is set, and a buffer updated in training mode."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.mc = nn.Linear(4, 5), nn.Linear(5, 3), False
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.seen += x.shape[0]
        h = nn.functional.dropout(torch.tanh(self.fc1(x)), 0.5, self.training or self.mc)
        return self.fc2(h)


@pytest.mark.parametrize("switch", ["train", "flag"])
def test_a_step_after_a_switch_since_planning_is_checked_as_planning_checks(switch):
    """A model switched to training mode (or a flag of its own turning its dropout on) after the tracer was planned
    reused the plan made in eval mode: random scores (77-117% off, the RNG advanced) and, in training mode, the user's
    buffer updated. A step under other switches is planned for them, whose checks refuse it; the buffer and the RNG
    are untouched."""
    torch.manual_seed(0)
    model = _Switched().to(DTYPE).eval()
    train, test = _data((4,), 6, seed=6), _data((4,), 2, seed=7)
    tracer = tc.tracer(model, test, n_train=6, loss_fn=nn.CrossEntropyLoss(), dtype=DTYPE)
    params, idx = dict(model.named_parameters()), torch.tensor([0, 1])
    step = (train[0][idx], train[1][idx])
    tracer.update(tracer.init(), params, 0.1, step, idx)
    model.train() if switch == "train" else setattr(model, "mc", True)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"(draws random numbers|writes into the checkpoint's tensor 'seen')"):
        tracer.update(tracer.init(), params, 0.1, step, idx)
    assert float(model.seen) == 0 and torch.equal(torch.get_rng_state(), rng)
    model.eval() if switch == "train" else setattr(model, "mc", False)
    tracer.update(tracer.init(), params, 0.1, step, idx)  # (planned as before: scored again)


def test_a_compiled_model_is_refused_with_the_tracers_way_to_compile():
    """The refusal advised `compile=True`, which `tc.tracer` does not take."""
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"compile the step instead: `torch.compile\(tracer.update\)`"):
        tc.tracer(torch.compile(model), _data((4,), 2), n_train=4, loss_fn=nn.CrossEntropyLoss())

def test_factory_error_arguments():
    t = mlp_task()
    with pytest.raises(TypeError, match="`params` is required when `model` is a function"):
        tc.tracer(mlp_function, t.test, n_train=10, loss_fn=t.loss_fn)
    with pytest.raises(ValueError, match="`n_train` must be a positive int.*got 0"):
        tc.tracer(t.model, t.test, n_train=0, loss_fn=t.loss_fn)
    with pytest.raises(ValueError, match="`params` holds none of the model's parameters"):
        tc.tracer(t.model, t.test, n_train=10, loss_fn=t.loss_fn, params={"weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="`test`: a batch of 1 element has no target"):
        tc.tracer(t.model, (t.test[0],), n_train=10, loss_fn=t.loss_fn)


def test_empty_test_and_step_batches_are_refused():
    """An empty step raised torch's "cannot reshape tensor of 0 elements", an empty test batch an IndexError."""
    model, x, y = nn.Linear(4, 3), torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"`test` holds no examples"):
        tc.tracer(model, (x[:0], y[:0]), n_train=6, loss_fn=loss_fn)
    tracer = tc.tracer(model, (x[:2], y[:2]), n_train=6, loss_fn=loss_fn)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=r"`batch` holds no examples"):
        tracer.update(tracer.init(), params, 0.1, (x[:0], y[:0]), torch.tensor([], dtype=torch.int64))


def test_failing_examples_and_foreign_params_are_named():
    """A label out of range raised torch's bare IndexError in a tracer (the scorers name the example); `params` with
    an unknown key was called `checkpoints[0]`, an argument the tracer does not have."""
    model, x, y = nn.Linear(4, 3), torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss_fn, bad = nn.CrossEntropyLoss(), torch.tensor([0, 9])
    with pytest.raises(IndexError, match=r"`test` example 1 cannot be scored: IndexError: Target 9"):
        tc.tracer(model, (x[:2], bad), n_train=6, loss_fn=loss_fn)
    tracer = tc.tracer(model, (x[:2], y[:2]), n_train=6, loss_fn=loss_fn)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(IndexError, match=r"`batch` example 1 cannot be scored: IndexError: Target 9"):
        tracer.update(tracer.init(), params, 0.1, (x[:2], bad), torch.tensor([0, 1]))
    state = tc.tracer_init((x[:2], y[:2]), n_train=6)
    with pytest.raises(ValueError, match=r"`params` does not match the model: missing \[\], unexpected \['extra'\]"):
        tc.tracer_update(state, model, {**params, "extra": torch.ones(2)}, 0.1, (x[:2], y[:2]), torch.tensor([0, 1]),
                         loss_fn=loss_fn)  # fmt: skip
