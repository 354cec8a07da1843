"""Smoke test of an INSTALLED tracin_func (run by .ci/wheel_check against the built wheel in a clean venv).

Imports every module the installed package holds and calls each public scorer once on a tiny nn.Linear. Run it
from outside the source tree, so that ``import tracin_func`` cannot pick up the checkout.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import sysconfig
import tempfile

import torch
from torch import nn

import tracin_func as tc

# ---- the import comes from this interpreter's site-packages, not from a source tree or an editable install
site = os.path.realpath(sysconfig.get_paths()["purelib"])
where = os.path.realpath(tc.__file__)
assert where.startswith(site + os.sep), f"tracin_func imported from {where}, not from site-packages {site}"
print(f"tracin_func {tc.__version__} from {where}")

# ---- every module of the installed package imports
modules = sorted(m.name for m in pkgutil.walk_packages(tc.__path__, prefix="tracin_func."))
for name in modules:
    importlib.import_module(name)
for required in ("tracin_func.compat", "tracin_func.compat.captum"):
    assert required in modules, f"{required} is missing from the installed package (found {modules})"
for name in tc.__all__:
    assert hasattr(tc, name), f"tracin_func.__all__ names {name!r}, which is missing"
from tracin_func.compat import captum as compat_captum  # noqa: E402  (the import the issue reports broken)

for name in compat_captum.__all__:
    assert hasattr(compat_captum, name), f"tracin_func.compat.captum.__all__ names {name!r}, which is missing"
assert "captum" not in sys.modules, "tracin_func.compat.captum must not import Captum"
typed = os.path.join(os.path.dirname(where), "py.typed")
assert os.path.isfile(typed), "py.typed is missing from the installed package"
print(f"imported {len(modules)} modules: {', '.join(modules)}")

# ---- one call of each public scorer on a tiny model
torch.manual_seed(0)
n, d_in, d_out, lr = 6, 4, 3, 0.5
model = nn.Linear(d_in, d_out).double()
x, y = torch.randn(n, d_in, dtype=torch.float64), torch.randint(0, d_out, (n,))
loss = nn.CrossEntropyLoss()

with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "ckpt-1.pt")
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": lr}, path)
    ckpts = tc.load_checkpoints([path])
    assert len(ckpts) == 1 and ckpts[0].lr == lr, ckpts
    assert set(ckpts[0].params) == {"weight", "bias"}, sorted(ckpts[0].params)

    S = tc.influence(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=loss)
    assert S.shape == (2, n), S.shape
    full = tc.influence(model, ckpts, (x, y), (x, y), loss_fn=loss)
    assert torch.allclose(full[:2], S, rtol=1e-12, atol=1e-12)

    top = tc.top_k(model, ckpts, (x, y), (x[:2], y[:2]), k=3, loss_fn=loss)
    assert top.indices.shape == top.scores.shape == (2, 3), (top.indices.shape, top.scores.shape)
    assert torch.equal(top.indices, S.topk(3, dim=1).indices), (top.indices, S)

    self_inf = tc.self_influence(model, ckpts, (x, y), loss_fn=loss)
    assert self_inf.shape == (n,), self_inf.shape
    assert torch.allclose(self_inf, full.diagonal(), rtol=1e-12, atol=1e-12), (self_inf, full.diagonal())
    # by hand: for a Linear + cross-entropy, grad_W = (p - e_y) x^T and grad_b = p - e_y, so the self-influence is
    # lr * |p - e_y|^2 * (|x|^2 + 1)
    with torch.no_grad():
        r = torch.softmax(model(x), dim=1) - nn.functional.one_hot(y, d_out).double()
    expected = lr * (r * r).sum(1) * ((x * x).sum(1) + 1)
    assert torch.allclose(self_inf, expected, rtol=1e-12, atol=1e-12), (self_inf, expected)

    emb = tc.embeddings(model, ckpts, (x, y), loss_fn=loss)
    assert emb.shape == (n, d_out * d_in + d_out), emb.shape
    assert torch.allclose(emb @ emb.T, full, rtol=1e-12, atol=1e-12)
    proj = tc.embeddings(model, ckpts, (x, y), loss_fn=loss, projection_dim=4, seed=1)
    assert proj.shape == (n, 4), proj.shape
    assert torch.equal(proj, tc.embeddings(model, ckpts, (x, y), loss_fn=loss, projection_dim=4, seed=1))

    nearest = tc.top_k_embeddings(emb[:2], emb, k=3)
    assert nearest.indices.shape == (2, 3), nearest.indices.shape
    assert torch.equal(nearest.indices, top.indices), (nearest.indices, top.indices)

    # the on-disk index (safetensors shards: a runtime dependency of the wheel)
    index = tc.build_index(os.path.join(tmp, "index"), model, ckpts, (x, y), loss_fn=loss, storage_dtype=torch.float64)
    assert torch.allclose(tc.open_index(index.path).self_influence(), self_inf, rtol=1e-12, atol=1e-12)
    assert torch.equal(tc.top_k(model, ckpts, index, (x[:2], y[:2]), k=3, loss_fn=loss).indices, top.indices)

    # the Captum-compatible adapter, with its default loader reading the same file
    tracin = compat_captum.TracInCP(model, torch.utils.data.TensorDataset(x, y), [path], loss_fn=loss, batch_size=4)
    captum_scores = tracin.influence((x[:2], y[:2]))
    assert torch.allclose(captum_scores, S, rtol=1e-10, atol=1e-12), (captum_scores, S)

print("wheel smoke test: OK")
