"""On a CUDA device: the real models' scores equal the float64 reference computed on the same device, every parameter
takes the route it takes on the CPU, and torch.distributed over NCCL returns the single-process results. Skipped where
no GPU is (CI has none); on a GPU machine: ``python -m pytest tests/test_cuda.py``.

The reference runs on the GPU too: a model's own arithmetic there (cuBLAS and cuDNN kernels, the float32 parts of
Hugging Face code such as rotary tables and T5's position buckets) differs from the CPU's in the last digits of
float32, which float64 scores then carry. Each call is made twice: with the model on the CPU and ``device="cuda"``
(the library moves checkpoints, batches and the model's unsaved buffers; nothing of the user's moves), and with model,
checkpoints and batches on the GPU. One GPU takes one NCCL rank (NCCL refuses two ranks on one device), so the NCCL test
runs a world of one: its collectives run on the GPU, as on a cluster.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import pytest
import torch

import tracin_func as tc
from benchmarks import real_models as rm
from tests.conftest import assert_close
from tests.distributed_worker import assert_same_results, results, spawn
from tests.reference import Reference, reference_scores
from tests.test_real_models import CASES, F64, PLANS, workload

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:This call runs vmap"),
    pytest.mark.filterwarnings("ignore:torch.func.vmap failed on this model"),
]
CUDA = torch.device("cuda")


def _moved(batch):
    return {k: v.to(CUDA) for k, v in batch.items()} if isinstance(batch, dict) else tuple(t.to(CUDA) for t in batch)


@functools.cache
def on_gpu(case: str) -> tuple[rm.RealWorkload, Reference]:
    """The case built afresh (same seeds) with model, checkpoints and batches on the GPU, and its reference computed
    there (cuDNN off: its recurrent kernels have no backward in eval mode, and the reference is plain autograd)."""
    workload(case)  # skips a Hugging Face case without transformers
    w = CASES[case]()
    w.model.to(CUDA)  # a fresh model, which its own losses may call: moved whole
    moved: dict[int, torch.Tensor] = {}  # by identity: tied entries stay one tensor
    ckpts = [
        tc.Checkpoint({k: moved.setdefault(id(v), v.to(CUDA)) for k, v in c.params.items()}, c.lr)
        for c in w.checkpoints
    ]
    w = replace(w, checkpoints=ckpts, train=_moved(w.train), test=_moved(w.test))
    with torch.backends.cudnn.flags(enabled=False):
        return w, reference_scores(w.model, w.checkpoints, w.train, w.test, loss_fn=w.loss_fn)


def _calls(case: str, where: str) -> tuple[rm.RealWorkload, dict]:
    """The workload a call gets and its options: the CPU model with ``device="cuda"``, or the GPU workload."""
    return (workload(case)[0], {"device": CUDA}) if where == "device" else (on_gpu(case)[0], {})


@pytest.mark.parametrize("where", ["device", "model"])
@pytest.mark.parametrize("factored", [None, False], ids=["default", "unfactored"])
@pytest.mark.parametrize("case", list(CASES))
def test_influence_on_the_gpu_matches_reference(case, factored, where):
    w, options = _calls(case, where)
    S = tc.influence(w.model, w.checkpoints, w.train, w.test, loss_fn=w.loss_fn, dtype=F64, factored=factored,
                     **options)  # fmt: skip
    assert S.device.type == "cuda"
    assert_close(S.cpu(), on_gpu(case)[1].influence.cpu())
    assert next(w.model.parameters()).device.type == ("cpu" if where == "device" else "cuda")


@pytest.mark.parametrize("where", ["device", "model"])
@pytest.mark.parametrize("factored", [None, False], ids=["default", "unfactored"])
@pytest.mark.parametrize("case", list(CASES))
def test_self_influence_on_the_gpu_matches_reference(case, factored, where):
    w, options = _calls(case, where)
    s = tc.self_influence(w.model, w.checkpoints, w.train, loss_fn=w.loss_fn, dtype=F64, factored=factored, **options)
    assert_close(s.cpu(), on_gpu(case)[1].self_influence.cpu())


@pytest.mark.parametrize("case", list(PLANS))
def test_plan_on_the_gpu_is_the_cpus(case):
    w, _ = workload(case)
    on = {d: tc.explain(w.model, w.checkpoints, w.train, loss_fn=w.loss_fn, dtype=F64, device=d) for d in ("cpu", CUDA)}
    assert on[CUDA].batching == on["cpu"].batching
    assert [(r.parameter, r.route) for r in on[CUDA].routes] == [(r.parameter, r.route) for r in on["cpu"].routes]


def test_nccl_returns_the_single_process_results(tmp_path):
    (tmp_path / "ranks").mkdir()
    (got,) = spawn(tmp_path / "ranks", 1, "nccl")
    assert_same_results(got, results(False, tmp_path / "index"))


def test_a_float32_convnet_refused_under_tf32_says_so():
    """TF32 (PyTorch's default for cuDNN convolutions) rounds float32 products to about 1e-3: on an H200 the batching
    check refused ResNet-18 with it and passed without it. Either the call stays batched or its refusal names TF32."""
    w = rm.resnet18().subsample(4, 8)
    model = copy.deepcopy(w.model).to(CUDA)
    ckpts = [tc.Checkpoint({k: v.to(CUDA) for k, v in c.params.items()}, c.lr) for c in w.checkpoints]
    before, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, True  # (`flags()` would turn cuDNN off)
    try:
        batching = tc.explain(model, ckpts, _moved(w.train), loss_fn=w.loss_fn).batching
    finally:
        torch.backends.cudnn.allow_tf32 = before
    assert batching.startswith("one batched forward") or "(`torch.backends.cudnn.allow_tf32 = True`" in batching


def test_a_cpu_model_traced_on_the_gpu_steps_as_on_the_cpu():
    """``tc.tracer`` with ``device="cuda"`` on a CPU model with unsaved buffers (BERT's ``position_ids``): each step
    gets them on the GPU, and two steps give the CPU's scores (float64)."""
    w, _ = workload("bert_criterion")
    n = rm.num_examples(w.train)
    states = {}
    for device in ("cpu", CUDA):
        tracer = tc.tracer(w.model, w.test, n_train=n, loss_fn=w.loss_fn, dtype=F64, device=device)
        state = tracer.init()
        for step, ckpt in enumerate(w.checkpoints[:2]):
            rows = torch.arange(step, n, 2)
            batch = tuple(t[rows] for t in w.train)
            state = tracer.update(state, dict(ckpt.params), ckpt.lr, batch, rows)
        states[str(device)] = state
    assert_close(states["cuda"].scores.cpu(), states["cpu"].scores)
    assert_close(states["cuda"].self_influence.cpu(), states["cpu"].self_influence)
