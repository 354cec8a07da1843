"""Per-example loss semantics on the batched factored path equal the batch-of-one definition (dense vmap path)."""

import pytest
import torch
from torch import nn

import tracin_func as tc
from tests.conftest import assert_close

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
    "ce_weight": (
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)),
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


def test_criterion_is_not_modified():
    criterion = nn.CrossEntropyLoss()
    model, ckpts, batch = _mlp_task(N_CLASSES, torch.randint(0, N_CLASSES, (12,)))
    tc.self_influence(model, ckpts, batch, loss_fn=criterion)
    assert criterion.reduction == "mean"
