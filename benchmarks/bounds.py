"""Lower bounds on the time of any exact TracIn method, measured in the same process as the floor, so that a
target ratio can be checked against what is physically possible on this machine.

- ``pair_products``: the influence matrix needs, beyond the per-example gradients, one inner product per (test,
  train) pair and checkpoint. Per layer the cheapest known exact form is either the factored one (``T = 1``:
  ``(A_test A_train^T) * (G_test G_train^T)``, two GEMMs and a product; ``T^2 (d_in + d_out)`` per pair) or the
  materialised one (one GEMM of ``d_in d_out`` per pair). This times those GEMMs alone, on random tensors of each
  layer's shapes, at the cheaper form by flop count (layers whose cheaper form is factored with ``T > 1``, and
  every other kind of parameter, are left out: leaving work out keeps it a lower bound). ``floor + pair products``
  then bounds any exact influence matrix from below: it does the floor's forward / backward work (or more) and
  these inner products.
- ``per_example_gradients``: the layers whose pair products are materialised need each example's gradient
  ``G_i^T A_i`` (``T`` rows per example), where the floor forms one summed weight gradient ``G^T A`` over all rows.
  Same flops, but as batched small GEMMs (``K = T``) against one large GEMM; this times both on random tensors of
  those layers' shapes. Their difference estimates what materialising costs beyond the floor (not a bound: the
  floor's parameter gradients cost it more than these GEMMs alone).
- ``per_example_norms``: self-influence needs each example's squared gradient norm per layer, by the cheaper by flop
  count of the factored form (``T = 1``: ``|a|^2 |g|^2``; else the ``[T, T]`` kernels ``(A A^T) * (G G^T)`` summed,
  ``T^2 (d_in + d_out)``) and the materialised one (``G^T A`` per example, ``T d_in d_out``, and its norm). This
  times that work on random tensors of each layer's shapes. An estimate, not a bound: every row counts as live (a
  call drops rows without gradient: BERT's last layer reads one token), and layers of other kinds are left out.
- ``forward_only``: one forward pass (no autograd) per checkpoint over the same examples, which every gradient
  method runs at least once: ``Captum / forward_only`` is the most any method can be faster than Captum.
- ``activation_backward``: one forward / backward per checkpoint that takes the gradient of the summed loss at every
  layer's output and at no parameter. Any exact method needs each example's gradient at every layer's output
  (a parameter's gradient is formed from it), and torch's kernels give it by this backward: ``Captum /
  activation_backward`` is the most a method running them can be faster than Captum. It skips the floor's parameter
  gradients, so a factored method may beat the floor, never this (the CPU ``nn.LSTM``'s fused backward costs about as
  much without its weights' gradients: this is about the floor there).
- ``CheckRuns``: a call of ours that checks what it is trusted with (the forward check, discovery, the batching check,
  each batch's spot check: ``docs/batching_check.md``) runs the model on a few examples beside its batched passes. This
  records those runs in one call and replays them plainly (a forward, or a forward and a backward to the layer
  outputs only, at the last checkpoint): no call checking as ours does can run them for less. ``floor + pair products
  + the checks' runs`` bounds such a call's influence, ``activation_backward`` + the checks' runs its self-influence
  (which needs no summed parameter gradient), not every method's.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import optree
import torch
from torch import nn
from torch.autograd.graph import GradientEdge

_BLOCK_ELEMENTS = 1 << 26  # of one block of materialised training gradients (256 MB in float32)
# of one block of per-example gradients formed at once: 1 MB in float32, as ours are formed when scored. Whole blocks of
# 2,000 BERT-sized examples (32 MB each, past glibc's mmap threshold: fresh pages every call) took 0.73 s against 0.30
# s in these blocks, and made the estimate twice what forming costs.
_FORMED_ELEMENTS = 1 << 18


class Layer(NamedTuple):
    name: str
    rows: int  # T: rows of A / G per example
    d_in: int  # with the bias, a constant input
    d_out: int


def layer_shapes(model: nn.Module, run_one_example: Callable[[], Any]) -> list[Layer]:
    """Every Linear-like product of one example's forward (Linear, transformers' Conv1D, Conv1d / Conv2d, the
    in-projection of nn.MultiheadAttention, the input and hidden products of nn.LSTM / GRU / RNN), with its rows per
    example, summed over the layer's calls."""
    found: dict[str, Layer] = {}

    def add(name: str, rows: int, d_in: int, d_out: int) -> None:  # a layer called again adds its rows
        prev = found.get(name)
        found[name] = Layer(name, rows + (prev.rows if prev else 0), d_in, d_out)

    def hook_for(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if isinstance(mod, nn.MultiheadAttention):  # the in-projection, and out_proj (used by the fused op)
                rows = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
                add(name, rows, mod.embed_dim + (mod.in_proj_bias is not None), 3 * mod.embed_dim)
                add(f"{name}.out_proj", rows, mod.embed_dim + (mod.out_proj.bias is not None), mod.embed_dim)
            elif isinstance(mod, nn.RNNBase):  # per layer and direction, an input and a hidden product, T rows each
                data = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
                rows, gates = data.numel() // data.shape[-1], {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
                for layer in range(mod.num_layers):
                    for suffix in ("", "_reverse")[: 1 + mod.bidirectional]:
                        d_in = mod.input_size if layer == 0 else mod.hidden_size * (1 + mod.bidirectional)
                        for kind, d in (("ih", d_in), ("hh", mod.hidden_size)):
                            add(f"{name}.{kind}_l{layer}{suffix}", rows, d + mod.bias, gates * mod.hidden_size)
            elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                if mod.groups == 1:  # grouped: no pair GEMM of this form (left out)
                    rows = math.prod(output.shape[2:]) * output.shape[0]
                    add(name, rows, math.prod(mod.weight.shape[1:]) + (mod.bias is not None), mod.weight.shape[0])
            else:
                weight = mod.weight if isinstance(mod, nn.Linear) else mod.weight.t()  # Conv1D: stored [d_in, d_out]
                add(name, x.numel() // x.shape[-1], weight.shape[1] + (mod.bias is not None), weight.shape[0])

        return hook

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention, nn.RNNBase)
    handles = [
        module.register_forward_hook(hook_for(name, module))
        for name, module in model.named_modules()
        if isinstance(module, kinds) or type(module).__qualname__ == "Conv1D"
    ]
    try:
        run_one_example()  # with autograd on: nn.Transformer* layers would otherwise take a fused path, no calls
    finally:
        for h in handles:
            h.remove()
    return list(found.values())


def _materialised(layer: Layer) -> bool:
    """Whether a pair's inner product is cheaper on the materialised gradient (``d_in d_out``) than on the factors
    (``T^2 (d_in + d_out)``)."""
    return layer.rows**2 * (layer.d_in + layer.d_out) >= layer.d_in * layer.d_out


def pair_products(
    layers: Sequence[Layer], n_test: int, n_train: int, checkpoints: int, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], None], str]:
    """A function running every layer's pair GEMMs once per checkpoint, and a description of what it runs."""
    gen = torch.Generator().manual_seed(0)
    work: list[Callable[[], Any]] = []
    kept = []
    for layer in layers:
        materialised = layer.d_in * layer.d_out
        if not _materialised(layer) and layer.rows > 1:
            continue  # its cheapest form is a [T, T] kernel per pair: left out (still a lower bound)
        if not _materialised(layer):
            a = [torch.randn(n, layer.d_in, generator=gen, dtype=dtype) for n in (n_test, n_train)]
            g = [torch.randn(n, layer.d_out, generator=gen, dtype=dtype) for n in (n_test, n_train)]
            work.append(lambda a=a, g=g: (a[0] @ a[1].T).mul_(g[0] @ g[1].T))
            kept.append(f"{layer.name} factored")
        else:
            block = max(1, min(n_train, _BLOCK_ELEMENTS // materialised))  # training rows per GEMM (bounded memory)
            t = torch.randn(n_test, materialised, generator=gen, dtype=dtype)
            r = torch.randn(block, materialised, generator=gen, dtype=dtype)
            sizes = [min(block, n_train - start) for start in range(0, n_train, block)]
            work.append(lambda t=t, r=r, sizes=sizes: [t @ r[:m].T for m in sizes])
            kept.append(f"{layer.name} materialised")

    def run() -> None:
        for _ in range(checkpoints):
            for fn in work:
                fn()

    return run, f"{len(kept)} of {len(layers)} layers"


def per_example_gradients(
    layers: Sequence[Layer], n_examples: int, checkpoints: int, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(batched, summed)``: every materialised layer's (as ``pair_products`` chooses) per-example weight gradients
    ``G_i^T A_i`` for ``n_examples`` examples per checkpoint as one batched GEMM per block of examples (1 MB of
    gradients), and the same rows' summed gradient ``G^T A`` as one GEMM per block (the floor's weight gradient)."""
    gen = torch.Generator().manual_seed(0)
    work: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []
    for layer in layers:
        if not _materialised(layer) or layer.rows == 1:
            continue  # factored (no per-example gradient), or one row per example: the floor's GEMM is the same
        block = max(1, min(n_examples, _FORMED_ELEMENTS // (layer.d_in * layer.d_out)))
        a = torch.randn(block, layer.rows, layer.d_in, generator=gen, dtype=dtype)
        g = torch.randn(block, layer.rows, layer.d_out, generator=gen, dtype=dtype)
        work.append((a, g, [min(block, n_examples - start) for start in range(0, n_examples, block)]))

    def batched() -> None:
        for _ in range(checkpoints):
            for a, g, sizes in work:
                for m in sizes:
                    torch.bmm(g[:m].transpose(1, 2), a[:m])

    def summed() -> None:
        for _ in range(checkpoints):
            for a, g, sizes in work:
                for m in sizes:
                    g[:m].reshape(-1, g.shape[-1]).T @ a[:m].reshape(-1, a.shape[-1])

    return batched, summed


def norm_form(layer: Layer) -> str:
    """How ``per_example_norms`` takes a layer's norms: ``"rows"`` (one row: a product of two row norms), ``"kernels"``
    (the ``[T, T]`` kernels, fewer flops) or ``"formed"`` (each example's gradient, then its norm)."""
    if layer.rows == 1:
        return "rows"
    return "kernels" if layer.rows * (layer.d_in + layer.d_out) < layer.d_in * layer.d_out else "formed"


def sq_norms(form: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]``: each example's squared norm of ``G_i^T A_i`` from ``a`` ``[B, T, d_in]`` and ``g`` ``[B, T, d_out]``,
    in ``form`` (``norm_form``)."""
    if form == "rows":
        return torch.linalg.vector_norm(a[:, 0], dim=1).square() * torch.linalg.vector_norm(g[:, 0], dim=1).square()
    if form == "kernels":
        return (a @ a.mT).mul_(g @ g.mT).sum((1, 2))
    return torch.linalg.vector_norm((g.mT @ a).flatten(1), dim=1).square()


def per_example_norms(
    layers: Sequence[Layer], n_examples: int, checkpoints: int, dtype: torch.dtype = torch.float32
) -> Callable[[], None]:
    """Every layer's per-example squared gradient norms (``norm_form``) for ``n_examples`` examples per checkpoint,
    in blocks of examples whose formed gradients (or kernels) take about 1 MB."""
    gen = torch.Generator().manual_seed(0)
    work: list[tuple[str, torch.Tensor, torch.Tensor, list[int]]] = []
    for layer in layers:
        form = norm_form(layer)
        per_example = layer.d_in * layer.d_out if form == "formed" else 2 * layer.rows**2
        block = max(1, min(n_examples, _FORMED_ELEMENTS // per_example))
        a = torch.randn(block, layer.rows, layer.d_in, generator=gen, dtype=dtype)
        g = torch.randn(block, layer.rows, layer.d_out, generator=gen, dtype=dtype)
        work.append((form, a, g, [min(block, n_examples - start) for start in range(0, n_examples, block)]))

    def run() -> None:
        for _ in range(checkpoints):
            for form, a, g, sizes in work:
                for m in sizes:
                    sq_norms(form, a[:m], g[:m])

    return run


def forward_only(
    forward: Callable[[Any, Any], Any], states: Sequence[Any], batches: Sequence[Any]
) -> Callable[[], None]:
    """``forward(state, batch)`` under ``no_grad`` for every checkpoint state and batch."""

    def run() -> None:
        with torch.no_grad():
            for state in states:
                for batch in batches:
                    forward(state, batch)

    return run


def activation_backward(
    module: nn.Module, loss: Callable[[Any, Any], torch.Tensor], states: Sequence[Any], batches: Sequence[Any]
) -> Callable[[], None]:
    """``loss(state, batch)`` (the summed per-example losses of a batch) and its gradient at the outputs of every
    module holding parameters, for every checkpoint state and batch, with no tensor of the state requiring a
    gradient: the first such output becomes the leaf the backward reaches, and every later layer lies between it and
    the loss."""
    holders = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    leaves: list[torch.Tensor] = []

    def hook(layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
            leaves.append(output.requires_grad_())  # (a layer fed by none that needs one: a leaf of its own)

    def run() -> None:
        handles = [m.register_forward_hook(hook) for m in holders]
        try:
            for state in states:
                detached: dict[int, torch.Tensor] = {}  # tied names (GPT-2's lm_head) keep sharing one tensor
                state = {k: detached.setdefault(id(v), v.detach()) for k, v in state.items()}
                for batch in batches:
                    leaves.clear()
                    with torch.enable_grad():
                        torch.autograd.grad(loss(state, batch), leaves)
        finally:
            for handle in handles:
                handle.remove()

    return run


_CHECK_EXAMPLES = 8  # the most examples a check runs together (the batching check: six)
# where a run of the model is decided, innermost first: a check's (planning's forward check, discovery, the batching
# checks, each batch's spot check) or the scoring's own (a batched pass, the per-example loop), whatever its size
_CHECKS = {"_purity.py": None, "_batching.py": None, "_capture.py": {"discover"}}
_SCORING = {"_assemble.py": {"batched"}, "_grads.py": {"_looped"}}


def _a_check() -> bool:
    """Whether the model's run now in progress is one of tracin_func's checks: not a batch it scores (a batch of
    eight or fewer examples, or a lone example of the per-example loop, is not a check's), nor one it cannot name."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/tracin_func/" in path:
            file, name = path.rsplit("/", 1)[1], frame.f_code.co_name
            for kinds, verdict in ((_SCORING, False), (_CHECKS, True)):
                if file in kinds and (kinds[file] is None or name in kinds[file]):
                    return verdict
        frame = frame.f_back
    return False


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    """The tensors of a model's output: in tuples, lists and mappings (a Hugging Face ``ModelOutput``) too."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (tuple, list)):
        for value in tree:
            yield from _tensors(value)


def _reaches(outputs: Any, nodes: set[Any]) -> bool:
    """Whether the graph behind ``outputs`` (a tensor or a sequence of them) holds any of autograd's ``nodes``: a
    gradient taken through a check's run, not through another graph (a parametrization's weight, after a spot
    check)."""
    if not nodes:
        return False
    roots = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    stack, seen = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node in nodes:
            return True
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


class CheckRuns:
    """The runs of ``model`` on at most ``_CHECK_EXAMPLES`` examples that a call makes, recorded in its first call
    through ``watched(call)`` as ``(examples, backward)``: ``backward`` where a gradient was then taken through the
    model (at a layer's output or a leaf tensor), not only at the model's outputs (a criterion's spot check). A run
    under ``torch.vmap`` (its inputs per example) is not one of them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.runs: list[list[Any]] = []  # [examples, backward]

    def watched(self, call: Callable[[], Any]) -> Callable[[], Any]:
        """``call``, recording its runs the first time it is called."""
        done: list[bool] = []

        def first() -> Any:
            if done:
                return call()
            done.append(True)
            with self._recording():
                return call()

        return first

    @contextmanager
    def _recording(self) -> Iterator[None]:
        grad, runs = torch.autograd.grad, self.runs
        last: list[list[Any] | None] = [None]  # the last run, where it is a check's (the hook holds no model: the
        # call refuses a hook reading the original's tensors)
        made: list[set[Any]] = [set()]  # the autograd nodes of the last check's outputs (none: run without a graph)

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = next((t for t in optree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
            small = x is not None and x.dim() > 0 and x.shape[0] <= _CHECK_EXAMPLES
            if small and not torch._C._functorch.is_functorch_wrapped_tensor(x) and _a_check():
                last[0] = [x.shape[0], False]
            else:
                last[0] = None
            made[0] = set()
            if last[0] is not None:
                runs.append(last[0])

        def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if last[0] is not None:
                made[0] = {t.grad_fn for t in _tensors(output) if t.grad_fn is not None}

        def recorded_grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            through = [inputs] if isinstance(inputs, (torch.Tensor, GradientEdge)) else list(inputs)
            inside = any(isinstance(t, GradientEdge) or t.grad_fn is None for t in through)
            if last[0] is not None and inside and _reaches(outputs, made[0]):  # (through the check's own graph)
                last[0][1] = True
            return grad(outputs, inputs, *args, **kwargs)

        handles = [
            self.model.register_forward_pre_hook(pre, with_kwargs=True),
            self.model.register_forward_hook(post, with_kwargs=True),
        ]
        torch.autograd.grad = recorded_grad
        try:
            yield
        finally:
            torch.autograd.grad = grad
            for handle in handles:
                handle.remove()

    def replayed(
        self, loss: Callable[[Any, Any], torch.Tensor], state: Any, first: Callable[[int], Any]
    ) -> Callable[[], None]:
        """The recorded runs, plainly: ``loss(state, first(n))`` (a batch of the first ``n`` examples) under
        ``no_grad``, or with its gradient at the layer outputs (``activation_backward``)."""

        def replay(n: int, backward: bool) -> Callable[[], None]:
            if backward:
                return activation_backward(self.model, loss, [state], [first(n)])
            return forward_only(loss, [state], [first(n)])

        runs = [replay(n, backward) for n, backward in self.runs]

        def run() -> None:
            for each in runs:
                each()

        return run

    def describe(self) -> str:
        backward = sum(b for _, b in self.runs)
        sizes = "/".join(map(str, sorted({n for n, _ in self.runs})))
        return f"{len(self.runs)} runs of the model on {sizes} examples, {backward} with a backward"
