"""The benchmark scripts still run end to end (small settings, no competitors), so they do not rot between
benchmark sessions. Their numbers are printed, never asserted."""

import os
import time

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)


@pytest.mark.slow
def test_bench_core_runs(capsys):
    import bench_core

    results = bench_core.main(["--quick", "--no-captum", "--no-dattri", "--workloads", "mlp", "--repeat", "1"])
    impls = {(r["question"], r["impl"]) for r in results}
    assert ("influence", "tracin_func") in impls and ("self-influence", "plain backprop (floor)") in impls
    assert ("influence", "floor + pairs + per-example GEMMs") in impls
    assert ("influence", "floor + pairs + the checks' runs") in impls and (
        "self-influence",
        "fwd + bwd + the checks' runs",
    ) in impls
    assert ("self-influence", "fwd + bwd + checks + norms") in impls
    assert ("self-influence", "tracin_func factored=False") in impls
    assert all(r["max_rel_diff_vs_ours"] < 1e-4 for r in results if r["max_rel_diff_vs_ours"] is not None)
    assert all(r["seconds"] > 0 for r in results)
    assert "digits_mlp" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_core_real_models_run(capsys):
    """The real-model table at its --quick size (16 train x 4 test), the LSTM only, Captum at one batch size."""
    import bench_core

    results = bench_core.main(["--quick", "--workloads", "--real", "lstm", "--captum-batch-sizes", "8"])
    impls = {(r["question"], r["impl"]) for r in results}
    assert ("influence", "tracin_func factored=False (criterion)") in impls
    assert ("self-influence", "plain backprop (floor)") in impls
    assert ("influence", "forward + backward to layer outputs") in impls
    assert ("influence", "floor + pairs + the checks' runs") in impls and (
        "self-influence",
        "fwd + bwd + the checks' runs",
    ) in impls
    assert ("self-influence", "fwd + bwd + checks + norms") in impls
    assert ("self-influence", "Captum TracInCP per-example (b8)") in impls
    assert all(r["seconds"] > 0 for r in results)
    assert all(r["max_rel_diff_vs_ours"] < 1e-4 for r in results if r["max_rel_diff_vs_ours"] is not None)
    assert "lstm (criterion)" in capsys.readouterr().out


def test_check_runs_records_a_calls_few_example_runs_and_whether_they_reach_inside_the_model(monkeypatch):
    """``bounds.CheckRuns``: runs on at most eight examples, a backward where a gradient is taken at a leaf or a
    layer's output through that run's graph (not at the model's outputs alone, nor through another graph after it),
    none under vmap; recorded on the first call only, leaving no hook on the model and ``torch.autograd.grad`` as it
    was. (Every run here is taken for a check's: ``bounds._a_check`` tells them from a call's scoring.)"""
    import bounds
    import torch
    from torch import nn

    monkeypatch.setattr(bounds, "_a_check", lambda: True)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    grad = torch.autograd.grad

    def call():
        w = model[0].weight.detach().requires_grad_()
        state = {**dict(model.named_parameters()), "0.weight": w}
        torch.autograd.grad(torch.func.functional_call(model, state, torch.randn(1, 4)).sum(), [w])  # through it
        out = model(torch.randn(3, 4))
        torch.autograd.grad(out.sum(), [out])  # at its outputs alone
        edges = []
        handle = model[0].register_forward_hook(lambda m, a, o: edges.append(torch.autograd.graph.get_gradient_edge(o)))
        out = model(torch.randn(6, 4))
        handle.remove()
        torch.autograd.grad(out.sum(), edges)  # at a layer's output
        with torch.no_grad():
            model(torch.randn(2, 4))
        v = model[0].weight.detach().requires_grad_()
        torch.autograd.grad((v * 2).sum(), [v])  # a leaf, but not through the last run (a parametrization's)
        model(torch.randn(100, 4))  # a batched pass: no check
        torch.func.vmap(model)(torch.randn(5, 4))  # per example under vmap: none either
        return 7

    checks = bounds.CheckRuns(model)
    watched = checks.watched(call)
    assert watched() == 7 and watched() == 7
    assert checks.runs == [[1, True], [3, False], [6, True], [2, False]]
    assert "4 runs of the model on 1/2/3/6 examples, 2 with a backward" == checks.describe()
    assert torch.autograd.grad is grad and not model._forward_pre_hooks and not model._forward_hooks
    replayed = []

    def loss(state, batch):
        replayed.append((batch[0].shape[0], torch.is_grad_enabled()))
        return nn.functional.cross_entropy(torch.func.functional_call(model, state, batch[0]), batch[1])

    data = lambda n: (torch.randn(n, 4), torch.zeros(n, dtype=torch.long))  # noqa: E731
    checks.replayed(loss, dict(model.named_parameters()), data)()
    assert replayed == [(1, True), (3, False), (6, True), (2, False)]  # a forward, or a forward and a backward


def test_check_runs_leaves_out_the_batches_a_call_scores():
    """Batches of eight or fewer examples that a call scores (``batch_size=4``), and the gradient of a parametrized
    weight taken after a spot check, are not a check's runs (they were: 18 batched passes, and 3 spot checks with a
    backward)."""
    import bounds
    import torch
    from torch import nn
    from torch.nn.utils.parametrizations import weight_norm

    import tracin_func as tc

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 8)), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    ckpts = [tc.Checkpoint(params={k: v.clone() for k, v in model.state_dict().items()}, lr=0.1)] * 3
    for kw in ({}, {"batch_size": 4}):
        checks = bounds.CheckRuns(model)
        checks.watched(lambda kw=kw: tc.self_influence(model, ckpts, (x, y), loss_fn=nn.CrossEntropyLoss(), **kw))()
        assert sorted(map(tuple, checks.runs)).count((4, True)) == 0
        # the batching check's (four examples alone, then together) and planning's first example and batch of three,
        # a graph through their layers' detached outputs, which need gradients as they do scored
        assert sum(b for _, b in checks.runs) == 7


@pytest.mark.slow
def test_bench_speed_scaling_runs(capsys):
    import bench_speed

    results = bench_speed.main(["--speed-workloads", "--scaling-sizes", "600", "--repeat", "1", "--no-captum"])
    scaling = [r for r in results if r["table"] == "scaling"]
    assert [r["n_train"] for r in scaling] == [600] and scaling[0]["embed_s"] > 0
    assert "scaling of projected top-10" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_batch_size_runs(capsys):
    import bench_batch_size

    results = bench_batch_size.main(["--workloads", "mlp", "--sizes", "500", "--rounds", "1"])
    assert [r["question"] for r in results] == ["influence", "self"]
    assert all(r["auto"] > 0 and r["best_size"] == 500 and sum(r["auto_sizes"]) == 1500 for r in results)
    assert "auto / best" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_followed_runs(capsys):
    import bench_followed

    rows = bench_followed.main(["--workloads", "relative", "clip_text", "--train", "8", "--test", "2", "--rounds", "1"])
    assert [r[:2] for r in rows] == [[w, q] for w in ("relative", "clip_text") for q in ("influence", "self")]
    assert all(float(r[-1]) < 1e-5 for r in rows), rows  # the two routes agree (float32)
    assert "followed against vmap(grad)" in capsys.readouterr().out


def test_bench_subnormals_runs(capsys):
    import bench_subnormals

    rows = bench_subnormals.main(["--workloads", "tied_lm", "--train", "6", "--test", "2", "--rounds", "1"])
    calls = ("default", "factored=False")
    assert [r[:3] for r in rows] == [["tied_lm", q, c] for c in calls for q in ("influence", "self")]
    assert all(float(r[-1]) < 1e-5 for r in rows), rows  # lifted or not, the same scores (float32)
    assert "lifted against not" in capsys.readouterr().out


def test_rounds_time_every_call_once_per_round_and_keep_the_best():
    """Calls interleave (a, b, a, b, ...), each keeps its fastest round, and the result is the memory run's."""
    from common import Rounds

    order, slow = [], {"a": [0.3, 0.0, 0.3], "b": [0.0, 0.05, 0.3]}  # per name: the memory run's, then rounds'

    def call(name):
        def run():
            time.sleep(slow[name][len([o for o in order if o == name])])
            order.append(name)
            return f"{name} run {len([o for o in order if o == name])}"

        return run

    timer = Rounds(repeat=2)
    a, b = timer.add(call("a")), timer.add(call("b"))
    assert a.result == "a run 1" and b.result == "b run 1" and a.seconds >= 0.3
    timer.time()
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert a.seconds < 0.1 and 0.05 <= b.seconds < 0.3 and a.runs == b.runs == 2
    timer.time()  # nothing added since: nothing runs again
    assert len(order) == 6


def test_per_example_norms_take_each_examples_squared_gradient_norm_in_the_form_of_fewer_flops():
    """The norms estimate times real work: every form gives each example's |G_i^T A_i|^2 (float64, against the
    gradients formed one example at a time), and each layer takes the form of fewer flops."""
    import bounds
    import torch

    gen = torch.Generator().manual_seed(0)
    for form, (rows, d_in, d_out) in (("rows", (1, 5, 3)), ("kernels", (3, 9, 7)), ("formed", (6, 3, 2))):
        layer = bounds.Layer("layer", rows, d_in, d_out)
        assert bounds.norm_form(layer) == form
        a, g = (torch.randn(3, rows, d, generator=gen, dtype=torch.float64) for d in (d_in, d_out))
        expected = torch.stack([(gi.T @ ai).square().sum() for ai, gi in zip(a, g)])
        for way in ("rows", "kernels", "formed") if rows == 1 else ("kernels", "formed"):
            torch.testing.assert_close(bounds.sq_norms(way, a, g), expected, rtol=1e-12, atol=0)
    run = bounds.per_example_norms([bounds.Layer("a", 1, 65, 10), bounds.Layer("b", 32, 65, 64)], 7, 2)
    run()


def test_layer_shapes_count_every_product_of_a_recurrent_layer():
    """The bounds take each recurrent layer's input and hidden products (per layer and direction, ``T`` rows each),
    whose weights and biases are every parameter of the layer: the LSTM's pair products were left out (its "floor +
    pairs" bound read 1.00x)."""
    import bounds
    import torch
    from torch import nn

    for kind, gates in ((nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)):
        layer = kind(5, 7, num_layers=2, bidirectional=True, batch_first=True)
        found = bounds.layer_shapes(layer, lambda layer=layer: layer(torch.randn(1, 9, 5)))
        assert len(found) == 8 and {f.rows for f in found} == {9} and {f.d_out for f in found} == {gates * 7}
        assert sum(f.d_in * f.d_out for f in found) == sum(p.numel() for p in layer.parameters())
        assert {f.d_in for f in found if "ih_l1" in f.name} == {15}  # layer 1 reads both directions
