"""nn.EmbeddingBag run unrolled (``_bags``): the unrolled forward equals the fused op, scores equal the float64
per-example loop reference, the plan shows the bag's lookup as a site, and what has no unrolled form (``mode="max"``,
a flat input with offsets, a subclass) keeps the old route."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tracin_func as tc
from tests.conftest import assert_close
from tests.reference import reference_scores
from tracin_func._capture import hooked
from tracin_func._model import private_copy
from tracin_func._recurrent import recurrent_sites

F64 = torch.float64
CE = nn.CrossEntropyLoss()
BATCHED = "one batched forward / backward gives every layer's factors"
V, PAD = 12, 0
CONFIGS = {  # EmbeddingBag options, per-sample weights given
    "mean-pad": (dict(mode="mean", padding_idx=PAD), False),
    "sum-pad-weights": (dict(mode="sum", padding_idx=PAD), True),
    "sum": (dict(mode="sum"), False),
    "mean": (dict(mode="mean"), False),
}


class BagNet(nn.Module):
    """A text classifier: a bag of token ids ``[B, N]`` (optionally weighted), then a Linear."""

    def __init__(self, bag: nn.Module) -> None:
        super().__init__()
        self.bag, self.fc = bag, nn.Linear(bag.embedding_dim, 3)

    def forward(self, ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(torch.tanh(self.bag(ids, per_sample_weights=weights)))


def _ids(n: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, V, (n, 6), generator=gen)
    ids[0] = PAD  # a bag of padding only
    ids[1, 3:] = PAD  # and one padded
    ids[2, 1] = ids[2, 0]  # an id twice in one bag
    return ids


def _task(config: str, n_train: int = 7, n_test: int = 3):
    options, weighted = CONFIGS[config]
    torch.manual_seed(0)
    model = BagNet(nn.EmbeddingBag(V, 4, **options)).to(F64).eval()
    gen = torch.Generator().manual_seed(1)

    def data(n):
        ids, y = _ids(n, gen), torch.randint(0, 3, (n,), generator=gen)
        return (ids, torch.rand(ids.shape, generator=gen, dtype=F64), y) if weighted else (ids, y)

    state = dict(model.state_dict())
    gen_ckpt = torch.Generator().manual_seed(7)
    perturbed = {k: v + 0.3 * torch.randn(v.shape, generator=gen_ckpt, dtype=v.dtype) for k, v in state.items()}
    ckpts = [tc.Checkpoint(params=state, lr=0.1), tc.Checkpoint(params=perturbed, lr=0.05)]
    return model, ckpts, data(n_train), data(n_test)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_unrolled_bag_equals_the_fused_op(config):
    """A lookup product (one call, ``[B, N, d]``, the ids as given) and the layer's weighted sum; a flat input with
    offsets runs the fused op (no product)."""
    model, _, (ids, *rest), _ = _task(config)
    weights = rest[0] if len(rest) == 2 else None
    bag = model.bag
    copy, seen = private_copy(bag), []

    def record(layer, args, out):
        seen.append((tuple(out.shape), args[0]))

    with hooked(copy, {path: record for path in recurrent_sites(copy, ["weight"])}):
        actual = copy(ids, per_sample_weights=weights)
        flat = copy(ids.flatten(), torch.arange(0, ids.numel(), ids.shape[1]))
    assert len(seen) == 1 and seen[0][0] == (*ids.shape, 4) and torch.equal(seen[0][1], ids)
    assert_close(actual, bag(ids, per_sample_weights=weights), 1e-12)
    assert torch.equal(flat, bag(ids.flatten(), torch.arange(0, ids.numel(), ids.shape[1])))
    assert torch.equal(actual[0], torch.zeros(4, dtype=F64)) or bag.padding_idx is None
    assert "forward" not in vars(copy)


@pytest.mark.parametrize("factored", [None, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_scores_equal_the_loop_reference(config, factored):
    model, ckpts, train, test = _task(config)
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched: no slow-path or loop warning
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, factored=factored), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, factored=factored), ref.self_influence)
        assert_close(tc.embeddings(model, ckpts, train, loss_fn=CE, factored=factored), ref.train_embeddings)
        e = tc.explain(model, ckpts, train, loss_fn=CE, factored=factored)
    assert e.batching == BATCHED
    route = {r.parameter: r for r in e.routes}["bag.weight"]
    assert route.route in ("factored", "materialised") and route.reason.startswith("unrolled EmbeddingBag, lookup")


class FlatBags(BagNet):
    """Bags passed flat with offsets (each example's ids one bag): the fused op."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(0, ids.numel(), ids.shape[1], device=ids.device)
        return self.fc(torch.tanh(self.bag(ids.flatten(), offsets)))


class Subclassed(nn.EmbeddingBag):
    """Its own class: the unrolled bag cannot be proven to compute its function."""


def _old_route_cases():
    torch.manual_seed(0)
    return {
        "max": (BagNet(nn.EmbeddingBag(V, 4, mode="max")), "mode='max' has no unrolled form"),
        "offsets": (FlatBags(nn.EmbeddingBag(V, 4, mode="mean")), "bags given by offsets"),
        "subclass": (BagNet(Subclassed(V, 4)), "subclass of EmbeddingBag"),
        "scale_grad_by_freq": (BagNet(nn.EmbeddingBag(V, 4, scale_grad_by_freq=True)), "or scale_grad_by_freq"),
    }


@pytest.mark.parametrize("case", ["max", "offsets", "subclass", "scale_grad_by_freq"])
def test_bags_without_an_unrolled_form_keep_the_old_route(case):
    model, reason = _old_route_cases()[case]
    model = model.to(F64).eval()
    state = dict(model.state_dict())
    ckpts = [tc.Checkpoint(params=state, lr=0.1)]
    gen = torch.Generator().manual_seed(2)
    data = (torch.randint(1, V, (5, 6), generator=gen), torch.randint(0, 3, (5,), generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = tc.explain(model, ckpts, data, loss_fn=CE)
        scores = tc.self_influence(model, ckpts, data, loss_fn=CE)
    route = {r.parameter: r for r in e.routes}["bag.weight"]
    assert route.route in ("vmap", "loop") and reason in route.reason, route
    assert_close(scores, reference_scores(model, ckpts, data, loss_fn=CE).self_influence)


def test_a_large_vocabulary_is_not_materialised_per_example():
    """The reason for the site: on ``vmap(grad)`` every example's gradient is a dense ``[V, d]`` table; as a lookup
    site the bytes per example follow the bag's rows, not the vocabulary."""
    torch.manual_seed(0)
    model = BagNet(nn.EmbeddingBag(100_000, 8, mode="mean", padding_idx=0)).eval()
    ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
    data = (torch.randint(0, 100_000, (4, 6)), torch.randint(0, 3, (4,)))
    e = tc.explain(model, ckpts, data, loss_fn=CE)
    assert e.example_bytes < 100_000 * 8 * 4 // 100, e.example_bytes


class Scaled(BagNet):
    """A free parameter outside any layer, meeting the batch in an op that is not followed (``atan2``):
    the call runs vmap(grad) over examples, the bag unrolled in it."""

    def __init__(self, bag: nn.Module) -> None:
        super().__init__(bag)
        self.scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(ids, weights)
        return torch.atan2(out, self.scale)


@pytest.mark.parametrize("factored", [None, True])
def test_unrolled_under_vmap(factored):
    _, _, train, test = _task("sum-pad-weights")
    torch.manual_seed(0)
    model = Scaled(nn.EmbeddingBag(V, 4, mode="sum", padding_idx=PAD)).to(F64).eval()
    ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.3)]
    ref = reference_scores(model, ckpts, train, test, loss_fn=CE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        warnings.filterwarnings("error", message="torch.func.vmap failed", category=RuntimeWarning)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=CE, factored=factored), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=CE, factored=factored), ref.self_influence)
        e = tc.explain(model, ckpts, train, loss_fn=CE, factored=factored)
    routes = {r.parameter: r.route for r in e.routes}
    assert routes["scale"] == "vmap" and routes["bag.weight"] in ("factored", "materialised"), routes
