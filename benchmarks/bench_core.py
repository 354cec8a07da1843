"""tracin_func vs Captum ``TracInCP`` (and dattri ``TracInAttributor``) on the reference workloads, in one process.

For each reference workload (``workloads.py``: digits MLP and CNN, tiny transformer) and each question (full
influence matrix, top-k proponents, self-influence over the training set) it prints ours (the default, and
``factored=False`` for influence and self-influence), the best wall time, the peak memory of one call, the ratio
(other / ours) and the max relative difference of the scores against ours
(``max|other - ours| / max|ours|``), the proof that both computed the same thing. The calls of a table are timed in
rounds (``common.Rounds``: each round times every call once), so that the machine's drift over minutes shifts ours,
the floor and the peers alike; Captum's per-example loop, too slow to repeat, runs once.

Every measured call does the whole job: ours includes ``tc.load_checkpoints(paths)`` (Captum and dattri load
checkpoint files inside their calls), Captum's includes building its ``TracInCP`` object.

Usage::

    python benchmarks/bench_core.py                 # everything (Captum's per-example path takes minutes)
    python benchmarks/bench_core.py --quick         # transformer subsampled to 10 test x 200 train, 1 timed run
    python benchmarks/bench_core.py --workloads mlp cnn --repeat 5 --batch-size 128
    python benchmarks/bench_core.py --quick --threads 1   # on a shared/loaded machine (see below)
    python benchmarks/bench_core.py --workloads --real    # only the real models (GPT-2, BERT, ResNet-18, ...)
    python benchmarks/bench_core.py --workloads --real lstm resnet18 --captum-train 50
    python benchmarks/bench_core.py --workloads --real bert --real-train 2000 --no-captum   # fixed costs amortised

``--real [NAME ...]`` adds the real-model table (``real_models.py``: Hugging Face GPT-2, BERT, BART, T5, a
Llama-style LM, Falcon, ViT and ConvNeXt from small configs, ResNet-18, MobileNetV3-small, an LSTM classifier; 200
train x 20 test, 3 in-memory checkpoints; ``--quick``: 16 x 4): ours with the default options and
``factored=False``, the plain-backprop floor, and Captum ``TracInCP``'s per-example path at the best of
``--captum-batch-sizes``, for influence and self-influence;
ratios to the floor and to ours. The Hugging Face models are scored in two forms (dict batches with the library's
``tc.BatchLoss``, the issue's form, and a logits criterion, the only one Captum takes). ``transformers`` is needed for
those (the ``bench`` extra).

On a machine where other processes compete for the cores, multi-threaded batched kernels (ours, Captum's batch-wise
path) slow down far more than Captum's per-example loop of tiny ops (OpenMP oversubscription); ``--threads 1`` gives
much more stable ratios there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import bounds
import real_models
import torch
from common import Measurement, Rounds, begin_bench, captum_loader, fmt, max_rel_diff, measure, print_table, quiet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from workloads import BUILDERS, Workload

import tracin_func as tc
from tracin_func._setup import _CPU_TENSOR_BYTES

QUICK_TRANSFORMER = (10, 200)  # (n_test, n_train) of the transformer in --quick mode
REAL_SIZES = (20, 200)  # (n_test, n_train) of the real models
QUICK_REAL = (4, 16)  # the same in --quick mode
FLOOR_BATCH = 512  # batch size of the plain backprop reference rows (real models: ``floor_batch``)
MMAP_CEILING = 32 << 20  # glibc's largest mmap threshold: larger blocks are always mapped afresh (``_allocator``)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench_core")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"subsample the transformer to {QUICK_TRANSFORMER[0]} test x {QUICK_TRANSFORMER[1]} train (for every "
        f"implementation) and default --repeat to 1",
    )
    parser.add_argument(
        "--workloads", nargs="*", choices=sorted(BUILDERS), default=list(BUILDERS), metavar="NAME",
        help=f"reference workloads to run, any of {list(BUILDERS)} (default: all; none with a bare --workloads)",
    )  # fmt: skip
    parser.add_argument(
        "--real", nargs="*", choices=sorted(real_models.BUILDERS), default=None, metavar="NAME",
        help=f"also run the real-model workloads, any of {list(real_models.BUILDERS)} (a bare --real: all)",
    )  # fmt: skip
    parser.add_argument(
        "--captum-batch-sizes", type=int, nargs="+", default=[1, 4, 16], metavar="B",
        help="real models: batch sizes tried for Captum's per-example path, the fastest kept (default 1 4 16: each of "
        "its per-example backward passes runs through the whole batch's graph, so larger batches are slower)",
    )  # fmt: skip
    parser.add_argument(
        "--captum-train",
        type=int,
        default=None,
        metavar="N",
        help="real models: run Captum on the first N training examples only, its ratios taken against the floor and "
        "our default call re-timed on the same subset (default: all)",
    )
    parser.add_argument(
        "--real-train",
        type=int,
        default=None,
        metavar="N",
        help=f"real models: N training examples (default {REAL_SIZES[1]}; --quick {QUICK_REAL[1]}): fixed costs per "
        "call (planning) weigh less against more examples",
    )
    parser.add_argument(
        "--real-test",
        type=int,
        default=None,
        metavar="N",
        help=f"real models: N test examples (default {REAL_SIZES[0]}; --quick {QUICK_REAL[0]}); 1: one prediction's "
        "proponents, where each training gradient meets one test gradient (the plan keeps more layers as factors)",
    )
    parser.add_argument(
        "--real-size", nargs="+", default=[], metavar="KEY=N",
        help="real models: sizes passed to their builders (``real_models``), e.g. dim=256 seq_len=64 for DeBERTa or "
        "Falcon, layers=4 for Falcon (default: each builder's own)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of Captum and dattri (default 64)")
    parser.add_argument(
        "--our-batch-size", type=int, default=None, help="tracin_func's batch_size (default: its own automatic choice)"
    )
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds, best kept (default 3, quick 1)")
    parser.add_argument("--k", type=int, default=5, help="k of the top-k proponents question")
    parser.add_argument("--device", default="cpu", help="device for every implementation (default cpu)")
    parser.add_argument("--no-captum", action="store_true", help="skip Captum")
    parser.add_argument("--no-dattri", action="store_true", help="skip dattri")
    parser.add_argument(
        "--no-per-example", action="store_true", help="skip Captum's slow per-example path on the MLP and CNN"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    args, ignored = parser.parse_known_args(argv)  # run_all passes every module the flags of all
    if ignored:
        print(f"bench_core: ignoring flags it does not take (meant for other modules): {ignored}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    # the peers are the [bench] extra's: a run without them skips their rows (it failed on the first dattri row)
    args.no_dattri = args.no_dattri or importlib.util.find_spec("dattri") is None
    args.no_captum = args.no_captum or importlib.util.find_spec("captum") is None
    if args.real is not None and not args.real:
        args.real = list(real_models.BUILDERS)
    return args


def to_device(w: Workload, device: torch.device) -> Workload:
    return replace(
        w,
        model=w.model.to(device),
        x_train=w.x_train.to(device),
        y_train=w.y_train.to(device),
        x_test=w.x_test.to(device),
        y_test=w.y_test.to(device),
    )


# ----------------------------------------------------------------------------------------------- implementations


def ours(
    w: Workload, bs: int | None, k: int, device: torch.device, factored: bool | None = None
) -> dict[str, Callable[[], Any]]:
    """tracin_func: checkpoints loaded inside every call."""
    common = dict(loss_fn=nn.CrossEntropyLoss(), batch_size=bs, device=device, factored=factored)

    def ckpts() -> list[tc.Checkpoint]:
        return tc.load_checkpoints(w.checkpoint_paths, map_location=device)

    return {
        "influence": lambda: tc.influence(w.model, ckpts(), w.train, w.test, **common),
        "top_k": lambda: tc.top_k(w.model, ckpts(), w.train, w.test, k=k, **common),
        "self": lambda: tc.self_influence(w.model, ckpts(), w.train, **common),
    }


def loaded_states(w: Workload, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The workload's checkpoint files, loaded as every timed call of the digits loads them."""
    return [c.params for c in tc.load_checkpoints(w.checkpoint_paths, map_location=device)]


def _summed_loss(model: nn.Module) -> Callable[[Any, Any], torch.Tensor]:
    """``loss(state, (x, y))``: the summed cross-entropy of the model's outputs, as the floor computes it."""
    from torch.func import functional_call

    return lambda state, batch: nn.functional.cross_entropy(
        functional_call(model, state, (batch[0],)), batch[1], reduction="sum"
    )


def backprop_floor(w: Workload, device: torch.device, with_test: bool, bs: int = FLOOR_BATCH) -> Callable[[], Any]:
    """Not TracIn: one ordinary batched forward / backward (summed loss, summed gradients) per checkpoint over the
    training examples (and the test examples when ``with_test``, joined to them), in batches of ``bs``. Any exact
    method does at least this much work."""
    model = copy.deepcopy(w.model)
    loss = _summed_loss(model)
    x, y = (torch.cat([w.x_train, w.x_test]), torch.cat([w.y_train, w.y_test])) if with_test else w.train
    param_names = {name for name, _ in model.named_parameters()}

    def run() -> None:
        for ckpt in tc.load_checkpoints(w.checkpoint_paths, map_location=device):
            state = {k: v.requires_grad_(v.is_floating_point()) for k, v in ckpt.params.items()}
            params = [v for k, v in state.items() if k in param_names]
            for start in range(0, x.shape[0], bs):
                torch.autograd.grad(loss(state, (x[start : start + bs], y[start : start + bs])), params)

    return run


def captum(w: Workload, model: nn.Module, bs: int, k: int, sample_wise: bool) -> dict[str, Callable[[], Any]]:
    """Captum ``TracInCP``; ``sample_wise`` selects its batch-wise hook path (Linear/Conv2d only) or per-example loop.

    ``model`` is Captum's own copy: it loads every checkpoint into it in place.
    """
    from captum.influence import TracInCP

    def make() -> TracInCP:
        return TracInCP(
            model,
            TensorDataset(*w.train),
            list(w.checkpoint_paths),
            checkpoints_load_func=captum_loader,
            loss_fn=nn.CrossEntropyLoss(reduction="sum" if sample_wise else "none"),
            batch_size=bs,
            sample_wise_grads_per_batch=sample_wise,
        )

    return {
        "influence": lambda: make().influence(w.test, k=None),
        "top_k": lambda: make().influence(w.test, k=k, proponents=True),
        "self_by_ckpt": lambda: make().self_influence(None, outer_loop_by_checkpoints=True),
        "self_default": lambda: make().self_influence(None),
    }


def dattri_influence(w: Workload, model: nn.Module, bs: int, device: torch.device, project: bool) -> Callable:
    """dattri 0.3.0 ``TracInAttributor``; returns a callable giving ``[n_test, n_train]`` (dattri's is transposed).

    dattri's ``weight_list`` is the per-checkpoint learning rate and its loss function scores one example, so with
    ``normalized_grad=False`` and no projection the scores are exactly TracIn's. Its constructor always installs a
    random projector (``DEFAULT_PROJECTOR_KWARGS``: 512 dims, seed 0, even when ``projector_kwargs=None``); the exact
    variant switches it off by setting ``attributor.projector_kwargs = None``, which ``attribute`` checks.
    """
    import dattri.algorithm.tracin as dattri_tracin
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    dattri_tracin.tqdm = lambda iterable, **kwargs: iterable  # silence its per-batch progress bars

    def loss_func(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = data
        out = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    def load(m: nn.Module, path: str) -> nn.Module:
        obj = torch.load(path, map_location=device, weights_only=True)
        m.load_state_dict(obj["model_state_dict"])
        return m.eval()

    def run() -> torch.Tensor:
        task = AttributionTask(
            loss_func=loss_func, model=model, checkpoints=list(w.checkpoint_paths), checkpoints_load_func=load
        )
        projector = {"device": str(device)} if device.type != "cpu" else None
        attributor = TracInAttributor(
            task=task,
            weight_list=torch.full((len(w.checkpoint_paths),), w.lr),
            normalized_grad=False,
            projector_kwargs=projector,
            device=str(device),
        )
        if not project:
            attributor.projector_kwargs = None
        train = DataLoader(TensorDataset(*w.train), batch_size=bs, shuffle=False)
        test = DataLoader(TensorDataset(*w.test), batch_size=bs, shuffle=False)
        with torch.no_grad():
            return attributor.attribute(train, test).T

    return run


# ------------------------------------------------------------------------------------------------- real models


def real_forms(name: str, n_test: int, n_train: int, **sizes: int) -> list[real_models.RealWorkload]:
    """The workload in each form it is scored in: the Hugging Face models (``real_models.HF_MODELS``) on dict batches
    with the library's per-example loss (``tc.causal_lm_loss`` / ``tc.seq2seq_lm_loss`` /
    ``tc.sequence_classification_loss``, a ``tc.BatchLoss``; first: the issue's form) and as a logits criterion
    (Captum's only form); the others as a criterion. (The third form, ``tc.ExampleLoss`` of the model's own ``.loss``,
    runs one example at a time by definition.) ``sizes``: the builder's size arguments."""
    build = real_models.BUILDERS[name]
    if name in real_models.HF_MODELS:
        return [build(n_train, n_test, form=form, **sizes) for form in ("batch_loss", "criterion")]
    return [build(n_train, n_test, **sizes)]


def real_to_device(w: real_models.RealWorkload, device: torch.device) -> real_models.RealWorkload:
    if device.type == "cpu":
        return w

    def move(batch: Any) -> Any:
        if isinstance(batch, dict):
            return {k: v.to(device) for k, v in batch.items()}
        return tuple(t.to(device) for t in batch)

    moved: dict[int, torch.Tensor] = {}  # by identity: tied names (GPT-2's lm_head) stay one tensor
    ckpts = [
        tc.Checkpoint(params={k: moved.setdefault(id(v), v.to(device)) for k, v in c.params.items()}, lr=c.lr)
        for c in w.checkpoints
    ]
    return replace(w, model=w.model.to(device), checkpoints=ckpts, train=move(w.train), test=move(w.test))


def real_ours(w: real_models.RealWorkload, bs: int | None, device: torch.device, **options: Any) -> dict[str, Callable]:
    common = dict(loss_fn=w.loss_fn, batch_size=bs, device=device, **options)
    return {
        "influence": lambda: tc.influence(w.model, w.checkpoints, w.train, w.test, **common),
        "self": lambda: tc.self_influence(w.model, w.checkpoints, w.train, **common),
    }


def floor_batch(w: real_models.RealWorkload) -> int:
    """Examples per batch of the plain-backprop rows: ``FLOOR_BATCH``, or, where the forward's largest tensor would
    then pass glibc's largest mmap threshold on the training examples (``MMAP_CEILING``, above which every allocation
    of it is faulted in afresh), as many as our automatic batch size takes for it (16 MB; ``tracin_func._setup``).
    Mamba's floor (256 KB per example in its scan's tensors) took 14-23 s on its 220 examples in one batch, 6.0 s in
    batches of 127, 3.4-4.3 s in batches of 25-50. On a GPU (no glibc heap, a cost per kernel) ``FLOOR_BATCH``: GPT-2's
    floor on 2000 training examples in batches of 128 took longer than our call in batches of 400 on an H200."""
    if next(w.model.parameters()).device.type != "cpu":
        return FLOOR_BATCH
    tensor_bytes = max(1, tc.explain(w.model, w.checkpoints, w.train, loss_fn=w.loss_fn).tensor_bytes)
    largest = min(FLOOR_BATCH, w.n_train) * tensor_bytes
    return FLOOR_BATCH if largest < MMAP_CEILING else max(16, _CPU_TENSOR_BYTES // tensor_bytes)


def floor_batches(w: real_models.RealWorkload, data: Sequence[Any], bs: int | None = None) -> list[Any]:
    """``data`` (whole example sets) cut into even batches of at most ``bs`` (``floor_batch``) examples each."""
    bs, batches = bs or floor_batch(w), []
    for d in data:
        n = real_models.num_examples(d)
        each = -(-n // -(-n // bs))  # (as our automatic size cuts them: no small last batch)
        batches += [real_models.take(d, i, i + each) for i in range(0, n, each)]
    return batches


def real_floor(w: real_models.RealWorkload, with_test: bool, bs: int | None = None) -> Callable[[], Any]:
    """Not TracIn: one ordinary batched forward / backward of the summed per-example losses per checkpoint over
    the training examples (and the test examples when ``with_test``) in ``floor_batch``es, as ``backprop_floor``."""
    names = [name for name, _ in w.model.named_parameters()]  # tied tensors once
    batches = floor_batches(w, [w.train, w.test] if with_test else [w.train], bs)
    # cuDNN's recurrent kernels (a GPU's LSTM) have no backward in eval mode: the floor runs torch's own there (no
    # effect on the CPU: the LSTM's floor 0.0364-0.0366 s with cuDNN off, 0.0363-0.0369 s on)
    recurrent = any(isinstance(m, nn.RNNBase) for m in w.model.modules())

    def run() -> None:
        for ckpt in w.checkpoints:
            leaves: dict[int, torch.Tensor] = {}  # one leaf per tensor: tied names (GPT-2's lm_head) share it
            differentiated = {id(ckpt.params[n]) for n in names}  # parameters, not buffers
            for v in ckpt.params.values():
                leaves.setdefault(id(v), v.detach().requires_grad_(id(v) in differentiated))
            state = {k: leaves[id(v)] for k, v in ckpt.params.items()}
            params = [state[n] for n in names]
            for batch in batches:  # (an unused parameter, wav2vec2's masked-spectrogram embedding, has no gradient)
                with torch.backends.cudnn.flags(enabled=False) if recurrent else contextlib.nullcontext():
                    torch.autograd.grad(w.batch_loss(state, batch), params, allow_unused=True)

    return run


def real_captum(w: real_models.RealWorkload, bs: int) -> dict[str, Callable[[], Any]]:
    """Captum ``TracInCP``'s per-example path (``sample_wise_grads_per_batch=False``, a reduction="none" criterion
    with one loss per example) on a criterion-form workload, checkpoints loaded from memory into its own model copy,
    train and test examples in batches of ``bs``."""
    from captum.influence import TracInCP

    model = copy.deepcopy(w.model)
    states = {f"ckpt-{i}": c for i, c in enumerate(w.checkpoints)}

    def load(m: nn.Module, key: str) -> float:
        m.load_state_dict(states[key].params)
        return float(states[key].lr)

    def make() -> TracInCP:
        return TracInCP(
            model,
            TensorDataset(*w.train),
            list(states),
            checkpoints_load_func=load,
            loss_fn=w.captum_loss,
            batch_size=bs,
            sample_wise_grads_per_batch=False,
        )

    return {
        # test examples in batches of ``bs`` too: a single tuple would be one batch, whose per-example backward
        # passes each run through the graph of the whole test set
        "influence": lambda: make().influence(DataLoader(TensorDataset(*w.test), batch_size=bs), k=None),
        "self": lambda: make().self_influence(None),
    }


def route_summary(w: real_models.RealWorkload) -> str:
    """How the default call handles the parameters (``tc.explain``, where this version has it): the share of
    parameter elements per route and the batching line."""
    if not hasattr(tc, "explain"):
        return "routes: tc.explain not available"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = tc.explain(w.model, w.checkpoints, w.train, loss_fn=w.loss_fn, n_test=w.n_test)
    except Exception as err:  # noqa: BLE001 - a diagnostic, not the measurement
        return f"routes: tc.explain failed: {type(err).__name__}: {str(err)[:80]}"
    sizes = {k: v.numel() for k, v in w.checkpoints[0].params.items()}
    total = sum(sizes[r.parameter] for r in e.routes)
    parts = []
    for route in ("factored", "materialised", "vmap", "loop"):
        names = [r.parameter for r in e.routes if r.route == route]
        if names:
            share = sum(sizes[n] for n in names) / total
            parts.append(f"{route} {share:.0%} ({len(names)} tensors)")
    others = sorted({r.route for r in e.routes} - {"factored", "materialised", "vmap", "loop"})
    parts += [f"{route} ({sum(r.route == route for r in e.routes)} tensors)" for route in others]
    return f"routes of the default call ({w.form}): {', '.join(parts)}; batching: {e.batching}"


def captum_real_rows(
    rows: Rows,
    w: real_models.RealWorkload,
    args: argparse.Namespace,
    floors: dict[str, Measurement],
    ours: dict[str, Measurement],
) -> None:
    """Captum's per-example path on ``w`` (criterion form): influence at each of ``--captum-batch-sizes``, the
    fastest kept, then self-influence at that batch size. With ``--captum-train N`` Captum runs on the first N
    training examples, and the floor and our default call are re-timed on the same subset for its ratios."""
    device = torch.device(args.device)
    sub = w
    if args.captum_train is not None and args.captum_train < w.n_train:
        sub = w.subsample(None, args.captum_train)
        timer = Rounds(args.repeat, device)
        floors = {q: timer.add(quiet(real_floor(sub, q == "influence"))) for q in ("influence", "self")}
        ours = {q: timer.add(quiet(fn)) for q, fn in real_ours(sub, args.our_batch_size, device).items()}
        timer.time()
    subset = ""
    if sub is not w:
        subset = (
            f"; on {sub.n_test} x {sub.n_train} (ratios vs floor {floors['influence'].seconds:.2f} / "
            f"{floors['self'].seconds:.2f} s and ours {ours['influence'].seconds:.2f} / {ours['self'].seconds:.2f} s "
            f"on that subset)"
        )
    tried: dict[int, tuple[Measurement | None, str]] = {}
    for bs in args.captum_batch_sizes:
        tried[bs] = _try(lambda bs=bs: once(real_captum(sub, bs)["influence"], device))
    note = "tried " + ", ".join(
        f"b{bs}: {fmt(m.seconds, '.1f')} s" if m else f"b{bs}: {err}" for bs, (m, err) in tried.items()
    )
    ok = {bs: m for bs, (m, _) in tried.items() if m is not None}
    if not ok:
        impl = "Captum TracInCP per-example"
        rows.add("influence", impl, None, ours["influence"], None, note, floor=floors["influence"])
        return
    best = min(ok, key=lambda bs: ok[bs].seconds)
    impl = f"Captum TracInCP per-example (b{best})"
    m = ok[best]
    diff = max_rel_diff(m.result, ours["influence"].result)
    rows.add("influence", impl, m, ours["influence"], diff, note + subset, floor=floors["influence"])
    m, err = _try(lambda: once(real_captum(sub, best)["self"], device))
    diff = max_rel_diff(m.result, ours["self"].result) if m else None
    note = (err or "self_influence(None), default loop order") + subset
    rows.add("self-influence", impl, m, ours["self"], diff, note, floor=floors["self"])


def once(fn: Callable[[], Any], device: torch.device) -> Measurement:
    """A call too slow to repeat (a peer's per-example loop): its memory run is its one timed run."""
    return measure(quiet(fn), 0, device)


def bench_real(name: str, args: argparse.Namespace, device: torch.device) -> tuple[Rows, str]:
    n_test, n_train = QUICK_REAL if args.quick else REAL_SIZES
    n_test, n_train = args.real_test or n_test, args.real_train or n_train
    sizes = {key: int(value) for key, value in (size.split("=") for size in args.real_size)}
    forms = [real_to_device(w, device) for w in real_forms(name, n_test, n_train, **sizes)]
    rows = Rows(name, floor_column=True)
    timer = Rounds(args.repeat, device)  # everything below but Captum, timed in rounds together

    def run(fn: Callable[[], Any]) -> Measurement:
        return timer.add(quiet(fn))

    primary = forms[0]
    floors = {
        "influence": run(real_floor(primary, with_test=True)),
        "self": run(real_floor(primary, with_test=False)),
    }
    questions = (("influence", "influence"), ("self", "self-influence"))
    states = [c.params for c in primary.checkpoints]
    one = real_models.take(primary.train, 0, 1)
    first_example = lambda: primary.batch_loss(states[0], one)  # noqa: E731
    bounded = product_bounds(primary.model, first_example, primary, args.repeat)
    lower = {}
    for q, _ in questions:
        data = floor_batches(primary, [primary.train, primary.test] if q == "influence" else [primary.train])
        lower[q] = (
            run(bounds.forward_only(primary.batch_loss, states, data)),
            run(bounds.activation_backward(primary.model, primary.batch_loss, states, data)),
        )
    calls = []
    checks = {q: bounds.CheckRuns(primary.model) for q, _ in questions}  # the primary form's default calls' checks
    for w in forms:
        mine = real_ours(w, args.our_batch_size, device)
        watched = {q: checks[q].watched(fn) if w is primary else fn for q, fn in mine.items()}
        default = {q: run(fn) for q, fn in watched.items()}
        unfactored = {q: run(fn) for q, fn in real_ours(w, args.our_batch_size, device, factored=False).items()}
        calls.append((w, default, unfactored))
    checked = {  # (replayed on the data each question checks first)
        q: run(checks[q].replayed(primary.batch_loss, states[-1], lambda n, d=data: real_models.take(d, 0, n)))
        for q, data in (("influence", primary.test), ("self", primary.train))
    }
    timer.time()

    for q, question in questions:
        rows.add(question, "plain backprop (floor)", floors[q], None, None, "not TracIn", floor=floors[q])
    described = {q: (checked[q], checks[q].describe()) for q, _ in questions}
    for label, bound, note in bounded.influence(floors["influence"], described["influence"]):
        rows.add("influence", label, bound, None, None, note, floor=floors["influence"])
    # (not on the floor: self-influence needs no summed parameter gradient)
    for label, bound, note in bounded.self_influence(lower["self"][1], described["self"]):
        rows.add("self-influence", label, bound, None, None, note, floor=floors["self"])
    for q, question in questions:
        forward, backward = lower[q]
        rows.add(question, "forward only", forward, None, None, "lower bound of any method", floor=floors[q])
        rows.add(question, "forward + backward to layer outputs", backward, None, None, _TO_OUTPUTS, floor=floors[q])
    first: dict[str, Measurement] = {}
    for w, default, unfactored in calls:
        label = {"batch_loss": "BatchLoss", "example_loss": "ExampleLoss", "criterion": "criterion"}[w.form]
        for q, question in questions:
            note = f"[{'x'.join(map(str, default[q].result.shape))}]"
            if q in first:  # a second form of the same workload: the same scores?
                note += f"; rel diff vs first form {fmt(max_rel_diff(default[q].result, first[q].result), '.1e')}"
            first.setdefault(q, default[q])
            rows.add(question, f"tracin_func ({label})", default[q], default[q], None, note, floor=floors[q])
            rows.add(
                question,
                f"tracin_func factored=False ({label})",
                unfactored[q],
                default[q],
                max_rel_diff(unfactored[q].result, default[q].result),
                floor=floors[q],
            )
        rows.notes.append(route_summary(w))
        if w.captum_loss is None or args.no_captum:
            continue
        captum_real_rows(rows, w, args, floors, default)
    rows.notes.append(
        "x floor = time / plain backprop (one batched forward / backward of the summed loss per checkpoint over the "
        "same examples); x ours = time / tracin_func's default call in the same form; rel diff vs that call. "
        "+ the checks' runs: plus the model's runs on a few examples that the first form's default call makes to check "
        "what it is trusted with (bounds.CheckRuns), replayed plainly. Checkpoints are in memory for every row (no "
        "file loading). Every row but Captum's is the best of "
        f"{args.repeat} rounds that time each call once in turn; Captum rows are one run."
    )
    return rows, "; ".join(w.describe() for w in forms)


class Bounds(NamedTuple):
    """Rows ``(label, measurement, note)`` of the bounds, given the timed calls they add to: ``influence(floor,
    checks)``, ``self_influence(to_outputs, checks)``; ``checks``: the checks' replayed runs and what they are."""

    influence: Callable[[Measurement, tuple[Measurement, str]], list[tuple[str, Measurement, str]]]
    self_influence: Callable[[Measurement, tuple[Measurement, str]], list[tuple[str, Measurement, str]]]


def product_bounds(model: nn.Module, run_one_example: Callable[[], Any], w: Any, repeat: int) -> Bounds:
    """The bounds' products, timed in rounds of their own here (their random operands, up to 256 MB per layer, are
    freed before the table's calls run). Influence: the floor plus the pair products of the influence matrix, a lower
    bound (``bounds.pair_products``); that plus what forming the materialised layers' per-example gradients as batched
    GEMMs costs beyond the same products summed (``bounds.per_example_gradients``), an estimate of what a method that
    materialises those layers needs (not a bound: the floor spends more on parameter gradients than those GEMMs).
    Self-influence: the forward and backward to the layers' outputs plus the checks' runs (a bound for a call that
    checks as ours does), and plus each example's squared norms (``bounds.per_example_norms``, an estimate)."""
    layers = bounds.layer_shapes(model, run_one_example)
    n_ckpts = len(getattr(w, "checkpoints", None) or w.checkpoint_paths)
    timer = Rounds(repeat)
    pairs, what = bounds.pair_products(layers, w.n_test, w.n_train, n_ckpts)
    m = timer.add(pairs)
    batched, summed = (timer.add(f) for f in bounds.per_example_gradients(layers, w.n_test + w.n_train, n_ckpts))
    norms = timer.add(bounds.per_example_norms(layers, w.n_train, n_ckpts))
    timer.time()

    def influence(floor: Measurement, checks: tuple[Measurement, str]) -> list[tuple[str, Measurement, str]]:
        excess = max(0.0, batched.seconds - summed.seconds)
        with_pairs = Measurement(floor.seconds + m.seconds, max(floor.peak_mb, m.peak_mb), None, m.runs)
        return [
            ("floor + pair products", with_pairs, f"lower bound; pair GEMMs of {what} {m.seconds:.3f} s"),
            (
                "floor + pairs + per-example GEMMs",
                replace(with_pairs, seconds=with_pairs.seconds + excess),
                f"an estimate, not a bound: materialised layers' per-example gradients as batched GEMMs "
                f"{batched.seconds:.3f} s vs the floor's summed GEMMs {summed.seconds:.3f} s",
            ),
            _with_checks("floor + pairs + the checks' runs", with_pairs, *checks),
        ]

    def self_influence(to_outputs: Measurement, checks: tuple[Measurement, str]) -> list[tuple[str, Measurement, str]]:
        label, bound, note = _with_checks("fwd + bwd + the checks' runs", to_outputs, *checks)
        return [
            (label, bound, note),
            (
                "fwd + bwd + checks + norms",
                replace(bound, seconds=bound.seconds + norms.seconds),
                f"an estimate, not a bound: plus each example's squared norm of {len(layers)} layers' gradients "
                f"(factor kernels or formed, the fewer flops; every row live) {norms.seconds:.3f} s",
            ),
        ]

    return Bounds(influence, self_influence)


_TO_OUTPUTS = "what any gradient method runs (torch's kernels): the backward to every layer's output, no parameter's"


def _with_checks(label: str, bound: Measurement, checks: Measurement, what: str) -> tuple[str, Measurement, str]:
    """A bound plus the plain replay of a call's checks (``bounds.CheckRuns``): the least a call checking as ours
    does can take, not any method."""
    return (
        label,
        replace(bound, seconds=bound.seconds + checks.seconds),
        f"lower bound for a call that checks as ours does: {what}, plainly, {checks.seconds:.3f} s",
    )


# ----------------------------------------------------------------------------------------------------- the bench


class Rows:
    """Accumulates table rows and machine-readable results for one workload; ``floor_column`` adds each row's ratio
    to the floor (the real-model tables, sorted by question)."""

    def __init__(self, workload: str, *, floor_column: bool = False) -> None:
        self.workload = workload
        self.floor_column = floor_column
        self.rows: list[list[str]] = []
        self.results: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def add(
        self,
        question: str,
        impl: str,
        m: Measurement | None,
        ours: Measurement | None,
        diff: float | None,
        note: str = "",
        *,
        floor: Measurement | None = None,
    ) -> None:
        seconds = m.seconds if m else None
        x_ours = seconds / ours.seconds if seconds is not None and ours is not None and ours.seconds > 0 else None
        x_floor = seconds / floor.seconds if seconds is not None and floor is not None else None
        ratios = [x_floor, x_ours] if self.floor_column else [x_ours]
        self.rows.append(
            [
                question,
                impl,
                fmt(seconds, ".3f") if seconds is not None else "-",
                str(m.runs) if m else "-",
                fmt(m.peak_mb, ".1f") if m else "-",
                *(fmt(r, ".2f") if r is not None else "-" for r in ratios),
                fmt(diff, ".1e") if diff is not None else "-",
                note,
            ]
        )
        result = {
            "bench": "core-real" if self.floor_column else "core",
            "workload": self.workload,
            "question": question,
            "impl": impl,
            "seconds": seconds,
            "runs": m.runs if m else None,
            "peak_mb": m.peak_mb if m else None,
            "ratio_vs_ours": x_ours,
            "max_rel_diff_vs_ours": diff,
            "note": note,
        }
        self.results.append({**result, "ratio_vs_floor": x_floor} if self.floor_column else result)

    def print(self, title: str) -> None:
        headers = ["question", "implementation", "time s", "runs", "peak MB", "x ours", "rel diff", "note"]
        rows = self.rows
        if self.floor_column:
            headers.insert(5, "x floor")
            order = ["influence", "self-influence"]
            rows = sorted(rows, key=lambda row: order.index(row[0]) if row[0] in order else len(order))
        print_table(headers, rows, title=title, align="llrrr" + "r" * (len(headers) - 6) + "l")
        for note in self.notes:
            print(f"  note: {note}")
        if self.notes or self.floor_column:
            print()


def _try(fn: Callable[[], Measurement]) -> tuple[Measurement | None, str]:
    try:
        return fn(), ""
    except Exception as err:  # noqa: BLE001 - a failing competitor is a result, not a crash
        return None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"


def bench_workload(w: Workload, args: argparse.Namespace, device: torch.device) -> Rows:
    bs, k = args.batch_size, args.k
    rows = Rows(w.name)
    is_transformer = w.name == "tiny_transformer"
    timer = Rounds(args.repeat, device)  # every call but Captum's per-example loop, timed in rounds together
    peers: list[tuple[Any, ...]] = []  # Rows.add's arguments, added once the calls are timed

    def run(fn: Callable[[], Any], slow: bool = False) -> Measurement:
        return once(fn, device) if slow else timer.add(quiet(fn))

    mine = ours(w, args.our_batch_size, k, device)
    checks = {q: bounds.CheckRuns(w.model) for q in ("influence", "self")}
    o_inf, o_top, o_self = (
        run(checks[q].watched(mine[q]) if q in checks else mine[q]) for q in ("influence", "top_k", "self")
    )
    S, top, s = o_inf.result, o_top.result, o_self.result
    dense = ours(w, args.our_batch_size, k, device, factored=False)
    d_inf, d_self = run(dense["influence"]), run(dense["self"])
    # the floor, and the bound below, at the faster of two batch sizes: FLOOR_BATCH or every example in one batch
    sizes = (FLOOR_BATCH, len(w.x_train) + len(w.x_test))
    floors = {wt: [run(backprop_floor(w, device, wt, bs)) for bs in sizes] for wt in (True, False)}
    bounded = product_bounds(w.model, lambda: w.model(w.x_train[:1].to(device)), w, args.repeat)
    states = loaded_states(w, device)
    checked = {  # (replayed on the data each question checks first)
        q: run(
            checks[q].replayed(
                _summed_loss(w.model), states[-1], lambda n, x=x, y=y: (x[:n].to(device), y[:n].to(device))
            )
        )
        for q, (x, y) in (("influence", (w.x_test, w.y_test)), ("self", (w.x_train, w.y_train)))
    }
    loss = _summed_loss(w.model)

    def to_outputs_in(bs: int) -> Callable[[], None]:  # (files loaded inside, as the floor and our call load them)
        train = [(w.x_train[i : i + bs].to(device), w.y_train[i : i + bs].to(device))
                 for i in range(0, len(w.x_train), bs)]  # fmt: skip
        return lambda: bounds.activation_backward(w.model, loss, loaded_states(w, device), train)()

    to_outputs_at = [run(to_outputs_in(bs)) for bs in sizes]

    if not args.no_captum:
        # (label, sample_wise, all questions?): the path Captum users would pick gets every question
        if is_transformer:  # its batch-wise path cannot differentiate Embedding/LayerNorm/attention
            paths = [("per-example", False, True), ("batch-wise", True, False)]
        else:
            paths = [("batch-wise", True, True)] + ([] if args.no_per_example else [("per-example", False, False)])
        for label, sample_wise, full_path in paths:
            slow = not sample_wise
            cap = captum(w, copy.deepcopy(w.model), bs, k, sample_wise)
            impl = f"Captum TracInCP {label}"
            m, err = _try(lambda cap=cap, slow=slow: run(cap["influence"], slow=slow))
            diff = max_rel_diff(m.result, S) if m else None
            note = err
            if not err and is_transformer and sample_wise and diff is not None and diff > 1e-3:
                note = "silently wrong: its hooks skip Embedding/LayerNorm/attention"
            peers.append(("influence", impl, m, o_inf, diff, note))
            if not full_path:
                continue  # the secondary path is reported for influence only
            m, err = _try(lambda cap=cap, slow=slow: run(cap["top_k"], slow=slow))
            if m is not None:
                agree = (m.result.indices.cpu() == top.indices.cpu()).float().mean().item()
                peers.append(("top-k", impl, m, o_top, max_rel_diff(m.result.influence_scores, top.scores),
                              f"k={k}; indices agree {agree:.0%}"))  # fmt: skip
            else:
                peers.append(("top-k", impl, None, o_top, None, err))
            for key, desc in (("self_by_ckpt", "outer_loop_by_checkpoints=True"), ("self_default", "default")):
                m, err = _try(lambda cap=cap, key=key, slow=slow: run(cap[key], slow=slow))
                peers.append(("self-influence", impl, m, o_self, max_rel_diff(m.result, s) if m else None, err or desc))
        rows.notes.append(
            "Captum per-example rows are a single run (they are slow); its loss is CrossEntropyLoss(reduction='none'), "
            "batch-wise uses reduction='sum'."
        )

    if not args.no_dattri and not is_transformer:
        for project, impl, note in (
            (False, "dattri TracIn exact", "projector_kwargs=None after init"),
            (True, "dattri TracIn default", "random projection to 512 dims (its default)"),
        ):
            fn = dattri_influence(w, copy.deepcopy(w.model), bs, device, project)
            m, err = _try(lambda fn=fn: run(fn))
            peers.append(("influence", impl, m, o_inf, max_rel_diff(m.result, S) if m else None, err or note))
        rows.notes.append(
            "dattri: TracInAttributor(weight_list=lr per checkpoint, normalized_grad=False); no rescaling needed. "
            "It always projects gradients to 512 dims unless its projector_kwargs attribute is cleared after init."
        )
    timer.time()
    named = (str(FLOOR_BATCH), "all in one")
    fastest = lambda ms: min(zip(ms, named), key=lambda m: m[0].seconds)  # noqa: E731
    (floor_inf, bs_inf), (floor_self, bs_self) = fastest(floors[True]), fastest(floors[False])
    to_outputs, bs_out = fastest(to_outputs_at)

    ref_top = S.topk(k, dim=1)  # our own consistency: top-k equals the top of the influence matrix
    rows.add("influence", "tracin_func", o_inf, o_inf, None, f"[{S.shape[0]} x {S.shape[1]}]")
    rows.add(
        "top-k",
        "tracin_func",
        o_top,
        o_top,
        max_rel_diff(top.scores, ref_top.values),
        f"k={k}; diff vs topk(own influence)",
    )
    rows.add("self-influence", "tracin_func", o_self, o_self, None, "")
    for question, m, mine_m, result in (("influence", d_inf, o_inf, S), ("self-influence", d_self, o_self, s)):
        rows.add(question, "tracin_func factored=False", m, mine_m, max_rel_diff(m.result, result), "vmap(grad)")
    floor = "not TracIn: summed gradients only; batches: {}"
    rows.add("influence", "plain backprop (floor)", floor_inf, o_inf, None, floor.format(bs_inf))
    rows.add("self-influence", "plain backprop (floor)", floor_self, o_self, None, floor.format(bs_self))
    for label, bound, note in bounded.influence(floor_inf, (checked["influence"], checks["influence"].describe())):
        rows.add("influence", label, bound, o_inf, None, note)
    to_outputs_note = f"{_TO_OUTPUTS}; batches: {bs_out}"
    rows.add("self-influence", "forward + backward to layer outputs", to_outputs, o_self, None, to_outputs_note)
    for label, bound, note in bounded.self_influence(to_outputs, (checked["self"], checks["self"].describe())):
        rows.add("self-influence", label, bound, o_self, None, note)
    for peer in peers:
        rows.add(*peer)
    rows.notes.insert(
        0,
        f"plain backprop (floor) = one ordinary forward / backward per checkpoint over the same examples (batches of "
        f"{FLOOR_BATCH} or all in one, the faster; summed loss): the least work any exact method "
        f"does; 'x ours' < 1 shows how close we are. "
        f"floor + pair products = the floor plus the influence matrix's inner products alone (bounds.py): no exact "
        f"influence matrix takes less; its time / the floor's is the best 'x floor' possible here. + per-example "
        f"GEMMs: plus the excess of forming the materialised layers' per-example gradients (batched GEMMs) over "
        f"the same products summed (an estimate, not a bound). + the checks' runs: plus the runs of the model on a "
        f"few examples that our call makes to check what it is trusted with (bounds.CheckRuns), replayed plainly: no "
        f"call checking as ours does takes less. Every row but Captum's per-example ones is the best of "
        f"{args.repeat} rounds that time each call once in turn.",
    )
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    begin_bench(
        args.threads,
        f"bench_core: batch_size={args.batch_size} (Captum, dattri), {args.our_batch_size or 'automatic'} (ours), "
        f"k={args.k}, best of {args.repeat} timed round(s) after one memory run, device={device}"
        f"{', QUICK' if args.quick else ''}",
        "columns: 'x ours' = time / our time for the same question; 'rel diff' = max|scores - ours| / max|ours|",
    )
    results: list[dict[str, Any]] = []
    for name in args.workloads:
        w = BUILDERS[name]()
        if args.quick and name == "transformer":
            w = w.subsample(*QUICK_TRANSFORMER)
        w = to_device(w, device)
        rows = bench_workload(w, args, device)
        rows.print(w.describe())
        sys.stdout.flush()
        results.extend(rows.results)
    for name in args.real or ():
        rows, title = bench_real(name, args, device)
        rows.print(title)
        sys.stdout.flush()
        results.extend(rows.results)
    return results


if __name__ == "__main__":
    main()
