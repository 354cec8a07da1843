"""Layers whose per-example gradients follow from their inputs and output gradients: Linear (and transformers'
``Conv1D``, a Linear with its weight stored transposed), Conv1d / Conv2d (unfolded patches; grouped and depthwise
ones only materialised, as grouped weight gradients), Embedding, whose gradients factor as ``G_i^T A_i``, and the
affine part of LayerNorm / RMSNorm / GroupNorm / InstanceNorm / BatchNorm in eval mode (``sum(normalised input *
G)``, always materialised). Layers of no known kind whose own parameters are vectors or ``[1, ...]`` rows
(``expandable``) get copies of them per example instead (``_capture.batched_factors``).

A layer is a factor site only when it provably computes its class's function (``_is_plain``).

For one example, ``A`` holds the layer's input rows ``[T, d_in]`` (a ones column appended for the bias; token
ids ``[T]`` for an Embedding) and ``G`` the gradient of the loss w.r.t. the layer's output rows ``[T, d_out]``.
"""

from __future__ import annotations

import math
import types
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from ._code import closure_values, loaded_globals, names_read
from ._state import MODULE_SLOTS

# Grouped weight gradients beat unfolded patches + bmm up to about this many channel pairs (measured on CPU: 2-4x
# faster for 16 x 32 and 64 x 64 channels, 1.7x slower for 128 x 128).
_GROUPED_CONV_MAX_CHANNELS = 4096
# Examples per grouped call: CNN self-influence on digits (1500 examples, 5 checkpoints) took 0.32-0.46 s in chunks
# of 512 against 0.46-0.52 s in one call per batch.
_GROUPED_CONV_CHUNK = 512
# Convolutions of more channel pairs than the grouped route takes, with outputs of at least this many positions, get
# each example's weight gradient from the convolution's own backward, one example at a time; fewer positions, from
# unfolded patches (``unfolded``) and a GEMM per example (20 examples, one CPU thread, 3 x 3 kernels: 128 x 128
# channels at 16 x 16 20.2 against 29.2 ms, at 32 x 32 71.6 against 142.0 ms, the summed gradient of the batch taking
# 16.2 / 69.0 ms; 256 x 256 at 8 x 8 54.4 against 45.6 ms). So do 1 x 1 convolutions, whose patches are their input
# (ResNet-18's 64 -> 128 shortcut, 21 examples at 16 x 16: 2.1 ms looped, 1.3 grouped, 0.7 unfolded).
_LOOPED_CONV_MIN_POSITIONS = 256
# Depthwise outputs of at most this many positions may take sums of shifted windows (``_shifted_windows``: a Python
# loop over positions, which torch.compile unrolls: a 1 x 256 output's took 112-116 s to compile against 20-21 s)
_WINDOWED_MAX_POSITIONS = 16
_WEIGHT_GRADS = (torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight, torch.nn.grad.conv3d_weight)  # by dims


Hook = Callable[[Any, tuple[Any, ...], Any], Any]  # forward-hook convention: hook(layer, (input,), output)


class Weights(NamedTuple):
    """What a hook sees as the "layer" of an unrolled product: its weight and bias (as ``layer_output`` reads them),
    and a lookup's ``padding_idx``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    padding_idx: int | None = None


def site_layer(modules: Mapping[str, nn.Module], site: Site) -> nn.Module | None:
    """The module whose configuration ``input_rows`` follows: the site's layer, or the layer owning an unrolled
    product (an EmbeddingBag's ``padding_idx``)."""
    return modules.get(site.path if site.owner is None else site.owner)


def product(hooks: Mapping[str, Hook], key: str, x: torch.Tensor, w: torch.Tensor, b: Any) -> torch.Tensor:
    """``x w^T + b``, passed through ``hooks[key]`` when there is one: a Linear-like product inside an unrolled
    layer (``_recurrent``, ``_attention``), which hooks see as they see a layer call."""
    out = F.linear(x, w, b)
    hook = hooks.get(key)
    if hook is None:
        return out
    replaced = hook(Weights(w, b), (x,), out)
    return out if replaced is None else replaced


class Site(NamedTuple):
    """A factorable layer: its module path, kind and the names of its differentiated parameters."""

    path: str
    # "linear" | "conv" | "embedding" | "norm" | "expanded" (see `expandable`) | "followed": a parameter used outside a
    # factor site's call (read directly; a vector whose copies did not fit), followed to where it meets the batch
    # (``_batch_free``); its path is the parameter's name
    kind: str
    weight: str | None  # full parameter name when the weight is differentiated
    bias: str | None  # full parameter name when the bias is differentiated
    weight_shape: tuple[int, ...]
    transposed: bool = False  # a Linear whose weight is stored [d_in, d_out] (transformers' Conv1D)
    groups: int = 1  # a grouped / depthwise convolution: gradients always materialised, never a factored kernel
    tied: bool = False  # a parameter shared with other sites (GPT-2's lm_head / wte): gradients of every use summed
    owner: str | None = None  # a product of the unrolled layer at this path (see _recurrent)
    others: tuple[str, ...] = ()  # an "expanded" or "followed" site's differentiated parameters (no weight, bias)
    rank: int = 0  # an "expanded" site's output rank, to which its vectors are expanded (found by discovery)

    # a parametrized weight's differentiated tensors (its parametrization's, ``reparametrized``); ``weight`` then
    # keys the gradients of the weight computed from them, which are mapped to these (``through_parametrization``)
    reparam: tuple[str, ...] = ()
    # a "conv" that is a transposed convolution: its weight's per-example gradients are those of the convolution it
    # is the adjoint of, fed its output gradient and giving back its input (``per_example_blocks``); it has no factor
    # rows (``input_rows``, ``output_rows``), so it is always materialised
    adjoint: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (*(self.reparam or (self.weight,)), self.bias, *self.others) if n is not None)

    @property
    def kernel_ok(self) -> bool:
        """Whether factored inner products apply (plain Linear / ungrouped Conv / Embedding, untied, its own
        weight)."""
        plain = self.groups == 1 and not self.tied and not self.reparam and not self.adjoint
        return plain and self.kind not in ("norm", "expanded", "followed")


# The classes whose own forward a factor site must run: a subclass overriding it (a scaled output, a standardised
# or clamped weight) computes something else, and its factors would give wrong scores.
_PLAIN_FORWARD = {
    nn.Linear: ("forward",),
    nn.Conv1d: ("forward", "_conv_forward"),
    nn.Conv2d: ("forward", "_conv_forward"),
    nn.ConvTranspose1d: ("forward",),
    nn.ConvTranspose2d: ("forward",),
    nn.Embedding: ("forward",),
    nn.LayerNorm: ("forward",),
    nn.RMSNorm: ("forward",),
    nn.GroupNorm: ("forward",),
    nn.modules.batchnorm._BatchNorm: ("forward",),
    nn.modules.instancenorm._InstanceNorm: ("forward", "_apply_instance_norm", "_handle_no_batch_input"),
}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


INSTANCE_OVERRIDES = {"forward", "_conv_forward"}  # set on the instance, they replace the class's own function


class UnrolledForward(partial):
    """The forward this library sets on a layer of a call's private copy (``_recurrent``): the class's own function,
    computed unrolled, so the layer still counts as exactly its class."""


def not_exactly(module: nn.Module, cls: type) -> str:
    """Why ``module``'s call may not be ``cls``'s own function (``wrapped``, or a subclass), in words, or ``""``."""
    if wrapped(module):
        return wrapped(module)
    if type(module) is not cls:
        return f"{type(module).__name__} is a subclass of {cls.__name__}, whose forward may differ"
    return ""


def wrapped(module: nn.Module) -> str:
    """Why ``module``'s call may differ from its class's function whatever the class (hooks, a parametrized weight,
    a ``forward`` set on the instance), in words; ``""`` when none applies."""
    name = type(module).__name__
    if _hooks_of_effect(module):
        hooks = [getattr(h, "__wrapped__", h) for h in module._forward_pre_hooks.values()]  # (the call's guard's)
        legacy = {type(h).__name__ for h in hooks} & {"WeightNorm", "SpectralNorm"}
        if legacy:  # torch.nn.utils.weight_norm / spectral_norm: a hook recomputing the weight before each call
            form = {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}[sorted(legacy)[0]]
            return (
                f"{name} has torch.nn.utils.{form}'s hook, whose effect on its output cannot be proven (with "
                f"torch.nn.utils.parametrizations.{form} instead, its weight is followed through the parametrization)"
            )
        return f"{name} has hooks, whose effect on its output cannot be proven"
    if parametrize.is_parametrized(module) and not reparametrized(module):
        return f"{name} has a parametrized tensor (followed only as the weight alone of a Linear or a convolution)"
    if any(not isinstance(vars(module)[k], UnrolledForward) for k in INSTANCE_OVERRIDES & set(vars(module))):
        return f"{name} has a forward set on the instance"
    return ""


# transformers' forward hooks that change no value: ``enable_input_require_grads``'s (which
# ``gradient_checkpointing_enable()`` installs on the input embeddings) sets ``requires_grad`` on the output; the output
# capturing one (installed at a model's first forward on the modules its ``_can_record_outputs`` names: attention
# layers, decoder layers, routers) appends the output to the collector of a call asking for attentions or hidden states
_PASSIVE_HOOKS = {
    "make_inputs_require_grads": "transformers.",
    "output_capturing_hook": "transformers.utils.output_capturing",
}


def _hooks_of_effect(module: nn.Module) -> bool:
    """Whether ``module`` has hooks that may change its inputs, outputs or gradients (any but ``_PASSIVE_HOOKS``)."""
    return any(getattr(module, hooks) for hooks in _HOOKS) and not _passive_hooks_only(module)


def _passive_hooks_only(module: nn.Module) -> bool:
    """Whether ``module``'s only hooks are forward hooks of transformers' that change no value or gradient
    (``_PASSIVE_HOOKS``). (As any other hook, ``enable_input_require_grads``'s sent BERT to vmap(grad), there one
    example at a time; the output capturing one left WavLM's attention, which holds its own parameters, said to
    have hooks whose effect cannot be proven.)"""
    hooks = [getattr(h, "__wrapped__", h) for h in module._forward_hooks.values()]  # (the call's guard's)
    others = any(getattr(module, slot) for slot in _HOOKS if slot != "_forward_hooks")
    return not others and bool(hooks) and all(
        (getattr(h, "__module__", None) or "").startswith(_PASSIVE_HOOKS.get(getattr(h, "__name__", ""), "\0"))
        for h in hooks  # (a function made by `exec` without `__name__` in its globals: `__module__` None)
    )


def reparametrized(module: nn.Module) -> bool:
    """A Linear or Conv1d / Conv2d whose weight alone is parametrized (``torch.nn.utils.parametrizations.weight_norm``:
    wav2vec2's and HuBERT's positional convolution; ``spectral_norm`` in eval mode; any ``register_parametrization``).
    Its weight, computed from the parametrization's tensors without the batch, is used as a plain layer's: each
    example's gradient of it follows from the factors, and of those tensors by the parametrization's vector-Jacobian
    product (``through_parametrization``)."""
    plain_kind = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
    return plain_kind and parametrize.is_parametrized(module) and set(module.parametrizations) == {"weight"}


def _is_plain(module: nn.Module) -> bool:
    """Whether ``module`` provably computes its base class's function: the class's own ``forward`` (and conv
    ``_conv_forward``), no hooks that could change inputs, outputs or weights, no parametrization (but of the weight
    alone of a Linear or a convolution, ``reparametrized``)."""
    if wrapped(module) or type(module).__call__ is not nn.Module.__call__:
        return False
    if _is_transformers_conv1d(module):
        return True
    base = next((cls for cls in _PLAIN_FORWARD if isinstance(module, cls)), None)
    return base is not None and all(getattr(type(module), f) is getattr(base, f) for f in _PLAIN_FORWARD[base])


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` itself (GPT-2's projections: ``addmm(bias, x, weight)``, weight ``[d_in, d_out]``),
    recognised by its defining module so that transformers is never imported; a subclass is not recognised."""
    cls = type(module)
    return cls.__qualname__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


def why_not_a_site(module: nn.Module) -> str:
    """Why ``module`` (holding a differentiated parameter) is not a factor site, in words for ``tc.explain``."""
    name = type(module).__name__
    if wrapped(module):
        return wrapped(module)
    base = next((cls for cls in _PLAIN_FORWARD if isinstance(module, cls)), None)
    base = base or next((cls for cls in type(module).__mro__[1:] if cls.__qualname__ == "Conv1D"), None)
    if base is None and not _is_transformers_conv1d(module):
        return f"{name} has no factored form"
    if not _is_plain(module):
        return f"{name} overrides {base.__name__}'s own forward"
    return f"{name} with {_configuration(module)} has no factored form"


def _configuration(module: nn.Module) -> str:
    """What keeps a plain layer of a site's class from its factored form (``site_kind``), in words."""
    if isinstance(module, nn.Embedding):
        return "max_norm (its rows renormalised in place)" if module.max_norm is not None else "scale_grad_by_freq"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        return "training mode" if module.training else "no running statistics (each batch's own)"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.affine:
        return "running statistics in training mode"
    if isinstance(module, _TRANSPOSED_CONVS):
        return "groups or an output padding of a stride or more"
    return "no affine weight"


def global_hooks_present() -> bool:
    """Global module hooks (``register_module_forward_hook``) run on every layer: no layer is provably plain."""
    m = nn.modules.module
    # (a backward pre-hook may change a batch's gradients together, a clip by their norm: 79% off batched, found by
    # review, where the first examples' norm was under the clip)
    return bool(
        m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )  # fmt: skip


def call_site(module: nn.Module) -> Callable[..., Any] | None:
    """The functional at whose calls a layer with its own ``forward`` is a site, or None: ``F.embedding`` for an
    ``nn.Embedding`` subclass (Gemma's scaled word embedding, OPT's and BART's learned positions with an offset),
    ``F.layer_norm`` for an ``nn.LayerNorm`` subclass (ConvNeXt's and timm's channels-first LayerNorms, which permute
    around it), ``F.linear`` for an ``nn.Linear`` subclass or a hand-written linear layer (its own parameters a
    ``weight`` ``[d_out, d_in]`` and maybe a ``bias`` ``[d_out]``: research code's ``F.linear(x, self.weight,
    self.bias)``). Its factors are taken where the forward calls that function on the layer's own parameters with the
    layer's own configuration (``_capture.hooked``); whatever the forward does around the call is differentiated as
    usual, and any other use of the parameters is found by discovery. A layer with layers of its own is none: the
    mode would also see their calls, which a shared weight could not tell from its own."""
    if type(module) in _OWN_CLASSES:  # (torch's class itself: its own forward, none whatever its hooks; 6 us a layer)
        return None
    if type(module).__call__ is not nn.Module.__call__ or wrapped(module) or next(module.children(), None) is not None:
        return None
    if _is_plain(module):  # (a site at its own calls: transformers' Conv1D, a hand-written linear layer in form)
        return None
    if isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward:
        plain = module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
        return F.embedding if plain else None
    if isinstance(module, nn.LayerNorm) and type(module).forward is not nn.LayerNorm.forward:
        return F.layer_norm if module.elementwise_affine else None
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward or _hand_written_linear(module):
        return F.linear
    return None


# The classes of ``_PLAIN_FORWARD`` a module can be exactly (not the abstract bases), whose ``call_site`` is None.
_OWN_CLASSES = frozenset(cls for cls in _PLAIN_FORWARD if not cls.__name__.startswith("_"))


def _hand_written_linear(module: nn.Module) -> bool:
    """A layer of no torch class whose own parameters are a matrix ``weight`` and maybe a vector ``bias`` of its rows
    (a layer whose parameters are all vectors or rows ``[1, d]`` keeps its copies expanded over the batch instead,
    ``expandable``)."""
    own = dict(module.named_parameters(recurse=False))
    weight, bias = own.get("weight"), own.get("bias")
    torch_layer = any(cls.__module__.startswith("torch.") for cls in type(module).__mro__[:-2])  # (but Module, object)
    if torch_layer or weight is None or set(own) - {"weight", "bias"} or weight.dim() != 2 or expandable(module):
        return False
    return bias is None and getattr(module, "bias", None) is None or bias is not None and bias.shape == weight.shape[:1]


_CALL_SITE_KINDS = {F.embedding: "embedding", F.layer_norm: "norm", F.linear: "linear"}


def site_kind(module: nn.Module) -> str | None:
    """The factored form of a provably plain layer ("linear", "conv", "embedding", "norm"), else None."""
    if not _is_plain(module):
        return _CALL_SITE_KINDS.get(call_site(module))
    if isinstance(module, nn.Linear) or _is_transformers_conv1d(module):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, _TRANSPOSED_CONVS):  # (an output padding of a stride or more: the adjoint's sizes differ)
        plain = module.groups == 1 and all(p < s for p, s in zip(module.output_padding, module.stride))
        return "conv" if plain else None
    if isinstance(module, nn.Embedding):
        return "embedding" if module.max_norm is None and not module.scale_grad_by_freq else None
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return "norm" if module.elementwise_affine else None
    if isinstance(module, nn.GroupNorm):  # statistics per example and group
        return "norm" if module.affine else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # eval mode with running statistics: per example
        return "norm" if module.affine and module.running_mean is not None and not module.training else None
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):  # statistics per example and channel, or running
        return "norm" if module.affine and not (module.training and module.track_running_stats) else None
    return None


_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d)


def expandable(module: nn.Module) -> bool:
    """A layer of no known kind whose own parameters are vectors (the weight of Llama's RMSNorm or T5's LayerNorm,
    ConvNeXt's layer scale; also shaped ``[C, 1, ...]`` for channels-first tensors, like ConvBERT's bias) or rows
    ``[1, ...]`` (ViT's class token and position embeddings). If it uses the vectors elementwise on a tensor of its
    output's rank and broadcasts the rows over the batch, copies expanded over the batch (``[B, 1, ..., d]``,
    ``[B, ...]``) give each example its own gradient in one batched pass. Planning checks that use (the first
    example's true gradient, the first examples alone and together, no shape error)."""
    own = list(module.parameters(recurse=False))
    return _of_no_known_kind(module) and bool(own) and all(map(_expandable_parameter, own))


def expandable_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The own parameters of a layer of no known kind that are vectors or rows (``expandable``), also of a layer
    holding others beside a row it broadcasts (a ViT's class token beside a matrix it never reads, or its positions
    stored ``[T, d]``: all its parameters were left to other routes, the class token's met the batch in `cat`, and
    the call took vmap(grad)); a layer of matrices and vectors (a raw-weight Linear, a recurrent layer's subclass)
    keeps all of them together."""
    if not expandable(module) and not (_of_no_known_kind(module) and any(map(broadcast_row, module.parameters(False)))):
        return {}
    return {n: p for n, p in module.named_parameters(recurse=False) if _expandable_parameter(p)}


def _of_no_known_kind(module: nn.Module) -> bool:
    """A layer called plainly whose class is not torch's own (known semantics: a site kind, or none applies)."""
    plain_call = type(module).__call__ is nn.Module.__call__ and not wrapped(module)
    return plain_call and not type(module).__module__.startswith("torch.")


def _expandable_parameter(p: torch.Tensor) -> bool:
    return p.dim() >= 1 and (broadcast_row(p) or all(size == 1 for size in p.shape[1:]))


def broadcast_row(p: torch.Tensor) -> bool:
    """A parameter ``[1, ...]`` that a layer broadcasts over the batch; its copies take the batch in place of the 1
    (any other expandable parameter is a vector, its copies ``[B, 1, ..., *shape]`` of the output's rank)."""
    return p.dim() >= 2 and p.shape[0] == 1


def factorable_sites(model: nn.Module, diff_names: Sequence[str]) -> dict[str, Site]:
    """Factorable layers holding differentiated parameters, keyed by module path.

    A parameter shared by several modules (weight tying, e.g. GPT-2's ``lm_head`` and token embedding) is a site
    of each when every one of them is a factor site: each site's per-example gradient is materialised under the
    parameter's (first) name and the uses are summed. Otherwise it is left to the dense path. A module called
    several times is fine: its calls are concatenated along ``T``.
    """
    if global_hooks_present():
        return {}
    diff = set(diff_names)
    names = {id(p): n for n, p in model.named_parameters()}  # a tied tensor under its first name, as `diff` has it
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    # the modules a parametrization runs on its tensors, without the batch: their parameters are the parametrized
    # layer's (``reparametrized``), or read directly; as sites of their own they were counted twice (5-100% off)
    parametrizing = {
        inner
        for path, module in model.named_modules()
        if isinstance(module, parametrize.ParametrizationList)
        for inner, _ in module.named_modules(prefix=path)
    }
    # a parametrization registered on several layers (one scale ``s`` for two weights) lists its parameters once in
    # ``model.modules()``: held by two layers' lists, they are no layer's own (one layer's share was dropped)
    # a tied tensor's other holders of no factored form may leave it to the layers when they provably never read it
    # (BERT's LM head holding its decoder's bias: ``_holds_only``)
    called_as: dict[int, set[str]] = {}  # each tensor's attribute names, wherever it is held
    for path, p in model.named_parameters(remove_duplicate=False):
        called_as.setdefault(id(p), set()).add(path.rsplit(".", 1)[-1])
    listed = Counter(
        id(p) for m in model.modules() if isinstance(m, parametrize.ParametrizationList) for p in m.parameters()
    )
    sites = {}
    for path, module in model.named_modules():
        if path in parametrizing:
            continue
        kind = site_kind(module)
        own = dict(module.named_parameters(recurse=False))
        shared = [p for p in own.values() if len(owners[id(p)]) > 1]
        expanded = expandable_parameters(module) if kind is None and not shared else {}
        if expanded:
            others = tuple(names[id(p)] for p in expanded.values() if names[id(p)] in diff)
            if others:
                shape = tuple(next(iter(expanded.values())).shape)
                sites[path] = Site(path, "expanded", None, None, shape, others=others)
            continue
        if kind and parametrize.is_parametrized(module) and not _parametrized_apart(model, path, module):
            continue
        computed = dict(module.parametrizations.weight.named_parameters()) if kind and reparametrized(module) else {}
        shared += [p for p in computed.values() if len(owners[id(p)]) > 1 or listed[id(p)] > 1]  # (another's too)
        holders = [m for p in shared for m in owners[id(p)] if site_kind(m) is None]
        if kind is None or any(not _holds_only(m, called_as[id(p)]) for p in shared for m in holders):
            continue
        weight = names[id(own["weight"])] if "weight" in own and names[id(own["weight"])] in diff else None
        bias = names[id(own["bias"])] if "bias" in own and names[id(own["bias"])] in diff else None
        reparam = tuple(names[id(p)] for p in computed.values() if names[id(p)] in diff)
        weight = (f"{path}.weight" if path else "weight") if reparam else weight  # (not a parameter's name)
        if weight or bias:
            shape, groups = tuple(module.weight.shape), getattr(module, "groups", 1)
            conv1d, adjoint = _is_transformers_conv1d(module), isinstance(module, _TRANSPOSED_CONVS)
            sites[path] = Site(path, kind, weight, bias, shape, conv1d, groups, bool(shared), reparam=reparam,
                               adjoint=adjoint)  # fmt: skip
    return sites


def _parametrized_apart(model: nn.Module, path: str, module: nn.Module) -> bool:
    """Whether a layer's parametrized weight is computed from its parametrization's own tensors alone, none of them
    another module's: the vector-Jacobian product ``through_parametrization`` takes holds nothing else. A
    parametrization reading the layer's own bias, another layer's weight, or holding a layer the model also calls
    (a tied autoencoder's encoder, its weight transposed) gave those no gradient of that use (0.2-50% off, silently;
    a review helper's): no site then, every use differentiated by vmap(grad)."""
    listed = module.parametrizations.weight
    inside = f"{path}.parametrizations.weight." if path else "parametrizations.weight."
    held = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    elsewhere = {id(t) for name, t in held if not name.startswith(inside)}
    own = {n: t for n, t in [*listed.named_parameters(), *listed.named_buffers()]}
    if any(id(t) in elsewhere for t in own.values()):
        return False
    reads = _Reads()
    with torch.no_grad(), reads:  # (on copies of its tensors: a power iteration's in-place steps leave the layer's)
        functional_call(listed, {n: t.clone() for n, t in own.items()}, ())
    return not (reads.ids & elsewhere)


class _Reads(TorchFunctionMode):
    """The identities of the tensors the ops run within it read."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.ids.update(id(t) for t in optree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))  # (a
        # list of them too: `torch.stack([w, other.weight])`; a sweep's)
        return func(*args, **kwargs)


# how a module's code may read its parameters other than by their names
_PARAMETER_ACCESS = frozenset({
    "parameters", "named_parameters", "_parameters", "get_parameter", "state_dict", "__dict__", "getattr", "vars",
    "_modules", "modules", "named_modules", "children", "named_children", "apply",
})  # fmt: skip


# methods that build, initialise or print a module: never run by its forward pass
_NOT_IN_A_FORWARD = frozenset({"__init__", "__repr__", "extra_repr", "reset_parameters", "_reset_parameters"})


def _holds_only(holder: nn.Module, names: set[str]) -> bool:
    """Whether ``holder``, a module of no factored form holding a tied tensor (BERT's, ALBERT's, RoBERTa's masked-LM
    heads hold the decoder's bias), provably never reads it: no hooks, and no code its classes' methods can run (the
    functions they wrap, close over or call by a global name, to a few levels) names the tensor (``names``: its
    attribute names wherever held) or reaches parameters otherwise; a callable of another kind reached (a partial, an
    object) proves nothing. A use planning could not see (its check runs a few first examples, at the last
    checkpoint: a use on later examples only, or zero there) would be scored wrong, silently: a holder that may read
    it leaves the layer to vmap(grad)."""
    if isinstance(holder, parametrize.ParametrizationList) or _hooks_of_effect(holder):
        return False
    # (callables set on the instance too: a lambda over ``self.bias`` its forward calls as ``self.fn``)
    own = [v for k, v in vars(holder).items() if k not in MODULE_SLOTS]
    functions = [v for v in own if callable(v) and not isinstance(v, nn.Module)]
    for cls in type(holder).__mro__:
        if cls in (nn.Module, object):
            continue
        for name, value in vars(cls).items():
            if name in _NOT_IN_A_FORWARD:
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            functions += [value.fget, value.fset] if isinstance(value, property) else [value]
    read = _names_read([f for f in functions if callable(f)])
    return read is not None and not read & (names | _PARAMETER_ACCESS)


def _names_read(functions: list[Any], depth: int = 0) -> set[str] | None:
    """The attribute and global names ``functions`` read, with those of the functions they wrap (``__wrapped__``),
    close over or call by a global name (a module-level helper), ``depth`` levels down; None where one is a callable
    whose code cannot be read (a partial, an object), closes over a tensor (which it may be), or past the depth."""
    read: set[str] = set()
    for fn in functions:
        if isinstance(fn, type) or not isinstance(fn, types.FunctionType) and _is_builtin(fn):
            continue  # (a class, torch's or Python's own functions: they see only what they are given)
        closed = closure_values(fn) if isinstance(fn, types.FunctionType) else []
        if not isinstance(fn, types.FunctionType) or depth > 3 or any(isinstance(v, torch.Tensor) for v in closed):
            return None
        called = [fn.__globals__.get(n) for n in loaded_globals(fn.__code__)]
        inner = [getattr(fn, "__wrapped__", None), *closed, *called]
        more = _names_read([f for f in inner if callable(f) and not isinstance(f, nn.Module)], depth + 1)
        if more is None:
            return None
        read |= names_read(fn.__code__) | more
    return read


def _is_builtin(fn: Any) -> bool:
    return isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)) or getattr(
        fn, "__module__", ""
    ).split(".")[0] in ("torch", "builtins", "math", "operator", "functools", "typing")


def token_wise(layer: nn.Module | None, site: Site) -> bool:
    """A layer that treats every row of its input alike (a Linear, an Embedding, a LayerNorm / RMSNorm): fed the
    rows of several examples merged into one dimension (``[B T, d]``), it still gives each example's factors."""
    return site.kind in ("linear", "embedding") or isinstance(layer, (nn.LayerNorm, nn.RMSNorm))


def layer_output(module: nn.Module, site: Site, x: torch.Tensor, size: Sequence[int], *, detach: bool) -> torch.Tensor:
    """Recompute the layer's output, of ``size``, from its input (``detach``: without gradient to its own
    parameters)."""
    w, b = module.weight, getattr(module, "bias", None)
    if detach:
        w, b = w.detach(), (b.detach() if b is not None else None)
    if site.kind == "linear":
        return F.linear(x, w.t() if site.transposed else w, b)
    if site.adjoint:  # (its output padding as the call's output size asked: ``forward(x, output_size)``)
        dims = len(module.kernel_size)
        padding = module._output_padding(x, size[-dims:], module.stride, module.padding, module.kernel_size, dims,
                                         module.dilation)  # fmt: skip
        transposed = F.conv_transpose1d if dims == 1 else F.conv_transpose2d
        return transposed(x, w, b, module.stride, module.padding, padding, module.groups, module.dilation)
    if site.kind == "conv":
        return module._conv_forward(x, w, b)
    if site.kind == "norm":
        return _normalized(module, x, w, b)
    return F.embedding(x, w, module.padding_idx)


def recorded_input(module: nn.Module, site: Site, x: torch.Tensor, output: Any = None) -> torch.Tensor:
    """What a hook keeps of a layer's input: the input itself, or a norm layer's normalised input (computed in
    the forward pass, while the module holds the checkpoint's running statistics; a LayerNorm's from the
    statistics its ``output`` saved for the backward pass, when it has them: then without a graph)."""
    if site.kind != "norm" or site.weight is None:
        return x
    saved = _saved_statistics(module, output)  # (scaled in place: [220, 32, 64] 0.18 ms against 0.34 into a new tensor)
    return _normalized(module, x) if saved is None else (x.detach() - saved[0]).mul_(saved[1]).to(x.dtype)


def _saved_statistics(module: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mean and ``1 / std`` a LayerNorm's forward saved for its backward pass, or None. Normalising with them is
    the kernel's own ``(x - mean) * rstd`` (equal to normalising again up to rounding; bitwise in all 200 float32 /
    float64 cases checked) and 5-6x cheaper: normalising again took 1.1 ms of a BERT factor pass over 100 examples
    (26 ms)."""
    node = getattr(output, "grad_fn", None)
    if not isinstance(module, nn.LayerNorm) or type(node).__name__ != "NativeLayerNormBackward0":
        return None
    return node._saved_result1, node._saved_result2


def _normalized(module: nn.Module, x: torch.Tensor, w: Any = None, b: Any = None) -> torch.Tensor:
    """A LayerNorm / RMSNorm / GroupNorm / InstanceNorm / eval-mode BatchNorm applied to ``x``, with affine ``w`` and
    ``b`` (None: the normalised input)."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, w, b, module.eps)
    if isinstance(module, nn.RMSNorm):  # no bias
        return F.rms_norm(x, module.normalized_shape, w, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, w, b, module.eps)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        if x.dim() == module._get_no_batch_dim():  # an unbatched input, as its forward takes it
            return _normalized(module, x.unsqueeze(0), w, b).squeeze(0)
        if module.running_mean is None or module.training:  # each example's own statistics (no running update)
            return F.instance_norm(x, None, None, w, b, True, 0.0, module.eps)
        return F.instance_norm(x, module.running_mean, module.running_var, w, b, False, 0.0, module.eps)
    return F.batch_norm(x, module.running_mean, module.running_var, w, b, False, 0.0, module.eps)


def input_rows(module: nn.Module, site: Site, x: torch.Tensor) -> torch.Tensor:
    """``A`` of a batch: ``[B, T, d_in]`` floats (``d_in = 0`` when the weight is not differentiated), or ``[B, T]``
    token ids for an Embedding (-1: a padding token, which gets no gradient)."""
    if site.kind == "embedding":
        ids = x.reshape(x.shape[0], -1)
        if module.padding_idx is not None:
            ids = torch.where(ids == module.padding_idx, torch.full_like(ids, -1), ids)
        return ids
    if site.weight is None:
        return x.new_zeros(x.shape[0], _rows(module, site, x), 0)
    if site.kind == "conv":
        x, padding = _conv_padded(module, x)
        kernel, dilation, padding, stride = ConvGeometry.of(module, site).as_2d(padding)
        x = x.unsqueeze(2) if isinstance(module, nn.Conv1d) else x
        return unfolded(x, kernel, dilation, padding, stride).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def unfolded(
    x: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """``F.unfold``'s patches ``[B, C kh kw, L]`` of a 2-d input, as one copy of a strided view of it (padded first,
    windows by ``Tensor.unfold``, which dynamo traces, as it does not ``as_strided``): the same values, in 27-78% less
    time than its im2col on CPU (21 examples, one thread: 256 channels at 8 x 8 3.77 -> 2.12 ms, 128 at 16 x 16
    7.96 -> 1.76 ms, stride 2 2.45 -> 1.79 ms, 64 at 32 x 32 29.4 -> 13.3 ms)."""
    spans = _spans(kernel, dilation)
    windows = _zero_padded(x, padding).unfold(2, spans[0], stride[0]).unfold(3, spans[1], stride[1])  # (B C rows cols)
    windows = windows[..., :: dilation[0], :: dilation[1]]  # [B, C, rows, cols, kh, kw]
    b, c, rows, cols = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kernel[0] * kernel[1], rows * cols)


def _zero_padded(x: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
    """A 2-d input ``[B, C, H, W]`` with ``padding`` ``(rows, columns)`` of zeros on each side (itself where none)."""
    return F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x


def _spans(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """Input rows / columns a dilated kernel covers."""
    return [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]


def _rows(module: nn.Module, site: Site, x: torch.Tensor) -> int:
    """Rows per example: tokens of a Linear input, output positions of a convolution."""
    if site.kind != "conv":
        return x[0].numel() // x.shape[-1]
    spatial = x.shape[2:]
    padding = module._reversed_padding_repeated_twice  # (left, right) per dimension, the last first: every mode's
    rows = 1
    for i, (n, k, d, s) in enumerate(zip(spatial, module.kernel_size, module.dilation, module.stride)):
        both = padding[2 * (len(spatial) - 1 - i)] + padding[2 * (len(spatial) - 1 - i) + 1]
        rows *= (n + both - d * (k - 1) - 1) // s + 1
    return rows


def _conv_padded(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A convolution's input and the zero padding left to its products: zero padding given as numbers is left to
    them (no copy); ``padding="same"`` (uneven for an even kernel), ``"valid"`` and the other padding modes are
    applied here, as the layer's forward applies them, leaving none."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str) or module.padding == "valid":
        return x, (0,) * len(module.kernel_size) if module.padding == "valid" else module.padding
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), (0,) * len(module.kernel_size)


class ConvGeometry(NamedTuple):
    """What a convolution's weight gradient depends on besides its input and output gradient."""

    weight_shape: tuple[int, ...]  # [C_out, C_in / groups, *kernel]: one to three spatial dimensions
    groups: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]

    @staticmethod
    def of(module: nn.Module, site: Site) -> ConvGeometry:
        return ConvGeometry(tuple(site.weight_shape), site.groups, tuple(module.stride), tuple(module.dilation))

    def as_2d(self, padding: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """Kernel, dilation, ``padding`` and stride of a 1-d or 2-d convolution seen as a 2-d convolution's."""
        kernel = tuple(self.weight_shape[2:])
        if len(kernel) == 1:
            return (1, kernel[0]), (1, self.dilation[0]), (0, padding[0]), (1, self.stride[0])
        return kernel, self.dilation, tuple(padding), self.stride


def output_rows(site: Site, g: torch.Tensor) -> torch.Tensor:
    """``G`` ``[B, T, d_out]`` from the gradient w.r.t. the layer output of a batch, ``[B, ...]``."""
    if site.kind == "conv":
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)  # [B, C_out, L] -> [B, L, C_out]
    return g.reshape(g.shape[0], -1, g.shape[-1])


def per_example_blocks(
    module: nn.Module, site: Site, x: torch.Tensor, g: torch.Tensor, blocks: Sequence[slice | None]
) -> Iterator[dict[str, torch.Tensor]]:
    """Per-example gradients ``{name: [B, *shape]}`` from one call's layer input ``x`` and output gradient ``g``
    (batches), of each block of output channels in turn (``None``: all of them; a slice needs ``channel_split``), the
    input prepared (unfolded, padded) once, each block's route the whole layer's."""
    if site.kind == "norm":
        yield _norm_grads(module, site, x, g)
        return
    if site.adjoint:  # (never split by channels: ``channel_split``)
        yield _adjoint_grads(module, site, x, g)
        return
    pointwise = site.kind == "conv" and site.groups == 1 and math.prod(site.weight_shape[2:]) == 1  # 1 x 1
    many_channels = math.prod(site.weight_shape[:2]) > _GROUPED_CONV_MAX_CHANNELS and site.groups == 1
    looped = site.kind == "conv" and many_channels and math.prod(g.shape[2:]) >= _LOOPED_CONV_MIN_POSITIONS
    if site.kind != "conv" or site.weight is None or pointwise or many_channels and not looped:
        yield from materialized_blocks(site, input_rows(module, site, x), output_rows(site, g), blocks)
        return
    x, padding = _conv_padded(module, x)
    weight_grads = _looped_weight_grads if looped else conv_weight_grads
    for block in blocks:
        part, g_part = (site, g) if block is None else _of_channels(site, g[:, block], 1)
        out = {part.weight: weight_grads(ConvGeometry.of(module, part), x, g_part, padding)}
        if part.bias is not None:
            out[part.bias] = g_part.flatten(2).sum(2)
        yield out


def _adjoint_grads(module: nn.Module, site: Site, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """A transposed convolution's per-example gradients: its weight's are the weight gradients of the convolution it
    is the adjoint of (the same weight, stride, padding and dilation), fed the output gradient ``g`` and giving back
    its input ``x`` (one example at a time where channels are many: 256 x 256 at 4 x 4 took 41-64 ms against 65-97
    grouped, 32 examples, one thread)."""
    out = {}
    if site.weight is not None:
        geometry = ConvGeometry(tuple(site.weight_shape), 1, tuple(module.stride), tuple(module.dilation))
        looped = math.prod(site.weight_shape[:2]) > _GROUPED_CONV_MAX_CHANNELS
        out[site.weight] = (_looped_weight_grads if looped else conv_weight_grads)(geometry, g, x, module.padding)
    if site.bias is not None:
        out[site.bias] = g.flatten(2).sum(2)
    return out


def _norm_grads(module: nn.Module, site: Site, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Affine norm layers: weight gradient ``sum(x * g)`` for the normalised input ``x``, bias ``sum(g)``, over
    every dimension but the batch and the parameter's (LayerNorm / RMSNorm: the trailing normalised ones;
    BatchNorm / GroupNorm / InstanceNorm: channels, dim 1)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        dims = tuple(range(1, g.dim() - len(site.weight_shape)))
    else:
        dims = tuple(range(2, g.dim()))

    def total(t: torch.Tensor) -> torch.Tensor:
        return t.sum(dims) if dims else t

    out = {}
    if site.weight is not None:
        out[site.weight] = total(x * g)  # x: the normalised input (recorded_input)
    if site.bias is not None:
        out[site.bias] = total(g)
    return out


def conv_weight_grads(
    geometry: ConvGeometry, x: torch.Tensor, g: torch.Tensor, padding: tuple[int, ...]
) -> torch.Tensor:
    """``[B, *weight_shape]``: each example's weight gradient of a convolution from its input ``x`` (with the zero
    ``padding`` left to the products) and output gradient ``g``, in chunks of examples."""
    c_out, c_in, *kernel = geometry.weight_shape
    depthwise = geometry.groups == c_out and c_in == 1 and len(kernel) <= 2  # one channel in and out per group
    weight_grads = _depthwise_weight_grads if depthwise else _grouped_weight_grads
    n = _GROUPED_CONV_CHUNK
    chunks = [weight_grads(geometry, xs, gs, padding) for xs, gs in zip(x.split(n), g.split(n))]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


@torch.compiler.disable  # a loop over the batch's examples: run eagerly inside compiled updates, not unrolled
def _looped_weight_grads(
    geometry: ConvGeometry, x: torch.Tensor, g: torch.Tensor, padding: tuple[int, ...]
) -> torch.Tensor:
    """``[B, *weight_shape]``: each example's weight gradient from the convolution's own backward, one example at a
    time (``_LOOPED_CONV_MIN_POSITIONS``); ``x`` and ``padding`` as ``_conv_padded`` gives them."""
    weight = x.new_zeros(geometry.weight_shape)  # (the backward reads its shape only: no input gradient is asked)
    zeros, mask = (0,) * len(geometry.stride), (False, True, False)
    conv_backward = torch.ops.aten.convolution_backward
    return torch.stack([
        conv_backward(gi, xi, weight, None, geometry.stride, padding, geometry.dilation, False, zeros, 1, mask)[1]
        for xi, gi in zip(x.split(1), g.split(1))
    ])  # fmt: skip


def _grouped_weight_grads(
    geometry: ConvGeometry, x: torch.Tensor, g: torch.Tensor, padding: tuple[int, ...]
) -> torch.Tensor:
    """``[B, *weight_shape]``: the batch as the groups of one convolution (times the layer's own groups), whose
    weight gradient holds every example's (no unfolded patches); ``x`` and ``padding`` as ``_conv_padded`` gives
    them."""
    b, (c_out, c_in, *kernel), groups = x.shape[0], geometry.weight_shape, geometry.groups
    w = _WEIGHT_GRADS[len(kernel) - 1](
        x.reshape(1, b * c_in * groups, *x.shape[2:]),
        (b * c_out, c_in, *kernel),
        g.reshape(1, b * c_out, *g.shape[2:]),
        geometry.stride,
        padding,
        geometry.dilation,
        groups=b * groups,
    )
    return w.view(b, *geometry.weight_shape)


def _depthwise_weight_grads(
    geometry: ConvGeometry, x: torch.Tensor, g: torch.Tensor, padding: tuple[int, ...]
) -> torch.Tensor:
    """``[B, *weight_shape]`` of a depthwise convolution: each example and channel's weight gradient correlates its
    padded input with its output gradient. Computed as a forward convolution with the gradient as the kernel (its
    taps ``stride`` apart, the layer's dilation as the stride), which is several times faster than the grouped
    weight gradient on CPU for 5 x 5 kernels; where that kernel spans no more than the padding, which oneDNN leaves to
    a slow kernel (21 examples of 576 channels, one thread: a 5 x 5 kernel at 2 x 2 2.5 ms, at 1 x 1 24 ms; at 2 x 2
    from 4 x 4, stride 2, 0.36 ms), as sums of shifted windows (``_shifted_windows``: 1.2 and 0.3 ms there), on at most
    ``_WINDOWED_MAX_POSITIONS`` positions."""
    kernel, dilation, padding, stride = geometry.as_2d(padding)
    if len(geometry.weight_shape) == 3:  # (1-d)
        x, g = x.unsqueeze(2), g.unsqueeze(2)
    b, c, ho, wo = g.shape
    spanned = any(p >= s * (n - 1) + 1 for p, s, n in zip(padding, stride, (ho, wo)))  # by the padding
    if spanned and ho * wo <= _WINDOWED_MAX_POSITIONS:
        out = _shifted_windows(x, g, kernel, dilation, padding, stride)
    else:
        out = F.conv2d(
            x.reshape(1, b * c, *x.shape[2:]),
            g.reshape(b * c, 1, ho, wo),
            padding=padding,
            stride=dilation,
            dilation=stride,
            groups=b * c,
        )[..., : kernel[0], : kernel[1]]
    return out.reshape(b, *geometry.weight_shape)


def _shifted_windows(
    x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], padding: tuple[int, ...],
    stride: tuple[int, ...],
) -> torch.Tensor:
    """``[B, C, *kernel]``: the sum over output positions of the padded input's window there times the position's
    gradient, channels last (each window's rows contiguous: 576 channels at 2 x 2, 5 x 5 kernel, 21 examples 1.2
    against 1.8 ms channels first)."""
    b, c, ho, wo = g.shape
    padded = _zero_padded(x, padding).permute(0, 2, 3, 1).contiguous()
    g = g.permute(0, 2, 3, 1)
    span = _spans(kernel, dilation)
    out = x.new_zeros(b, *kernel, c)
    for p in range(ho):
        for q in range(wo):
            rows, cols = p * stride[0], q * stride[1]
            window = padded[:, rows : rows + span[0] : dilation[0], cols : cols + span[1] : dilation[1]]
            out.addcmul_(window, g[:, p : p + 1, q : q + 1])
    return out.permute(0, 3, 1, 2)


def channel_split(site: Site, device: torch.device) -> bool:
    """Whether the site's per-example gradients are formed a block of output channels at a time where large: rows of
    the weight (dim 0) and of the bias, from those channels of the output gradient alone (``per_example_blocks``,
    ``materialize`` with ``channels``): Linears and convolutions of one group, weight stored ``[d_out, ...]``, not
    parametrized, on the CPU (blocks stay in its caches and off glibc's fresh pages; a GPU, with neither concern and
    a cost per kernel, forms them whole)."""
    plain = site.weight is not None and site.groups == 1 and not (site.transposed or site.adjoint or site.reparam)
    return plain and site.kind in ("linear", "conv") and device.type == "cpu"


def _of_channels(site: Site, g: torch.Tensor, dim: int) -> tuple[Site, torch.Tensor]:
    """The site as seen by the output-gradient channels ``g`` (sliced along its channel dimension ``dim``)."""
    return site._replace(weight_shape=(g.shape[dim], *site.weight_shape[1:])), g


def scatter_rows(ids: torch.Tensor, g: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """Add an Embedding's per-example gradients (rows ``g`` ``[B, T, d]`` at ``ids`` ``[B, T]``, -1: padding) into
    ``into`` ``[B, V, d]`` (contiguous: every caller makes it), in place."""
    b, v, d = into.shape
    rows = (torch.arange(b, device=ids.device)[:, None] * v + ids.clamp(min=0)).reshape(-1)  # into's [B V, d] rows
    valid = ids >= 0
    g = g if bool(valid.all()) else g * valid.unsqueeze(-1)  # (no padding: no copy)
    into.view(b * v, d).index_add_(0, rows, g.reshape(-1, d))  # 3x scatter_add_'s speed
    return into


@torch.compiler.disable  # its backward, batched over examples, runs eagerly inside compiled updates (no rule there)
def through_parametrization(
    model: nn.Module, site: Site, state: Mapping[str, torch.Tensor]
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """For a site whose weight is parametrized (``Site.reparam``): per-example gradients keyed by ``site.weight``
    (those of the weight it computes, ``[B, *shape]``) mapped to the gradients of the parametrization's tensors at
    ``state``: the vector-Jacobian product of the weight's computation, one for every example at once (it does not
    depend on the example)."""
    prefix = f"{site.path}.parametrizations.weight." if site.path else "parametrizations.weight."
    tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    leaves = {k: v.detach().requires_grad_() for k, v in tensors.items() if prefix + k in site.reparam}
    with torch.enable_grad():
        weight = functional_call(model.get_submodule(site.path).parametrizations.weight, {**tensors, **leaves}, ())

    @torch.compiler.disable
    def mapped(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        grads = dict(grads)
        at_weight = grads.pop(site.weight)
        per_example = torch.autograd.grad(  # (a tensor the weight's computation does not read: zeros, a steerable
            weight, list(leaves.values()), at_weight, retain_graph=True, is_grads_batched=True, allow_unused=True
        )  # layer's `original`, its weight a combination of fixed basis tensors)
        unread = lambda t: at_weight.new_zeros(len(at_weight), *t.shape)  # noqa: E731
        of_leaves = {prefix + k: unread(t) if g is None else g for (k, t), g in zip(leaves.items(), per_example)}
        return {**of_leaves, **grads}

    return mapped


def materialized_blocks(
    site: Site, a: torch.Tensor, g: torch.Tensor, blocks: Sequence[slice | None]
) -> Iterator[dict[str, torch.Tensor]]:
    """``materialize`` of each block of output channels in turn (``None``: all of them)."""
    return (materialize(site, a, g, block) for block in blocks)


def materialize(
    site: Site, a: torch.Tensor, g: torch.Tensor, channels: slice | None = None
) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{name: [B, *shape]}`` from factors ``a`` ``[B, T, ...]`` and ``g`` ``[B, T, d_out]``;
    of the output ``channels`` only when given (``channel_split``)."""
    if channels is not None:
        site, g = _of_channels(site, g[..., channels], -1)
    out: dict[str, Any] = {}
    if site.kind == "embedding":
        w = torch.zeros(g.shape[0], site.weight_shape[0], g.shape[-1], dtype=g.dtype, device=g.device)
        out[site.weight] = scatter_rows(a, g, w)
        return out
    if site.weight is not None and a.shape[1] == 1:  # outer products: einsum multiplies without a GEMM
        spec = "bti,bto->bio" if site.transposed else "bti,bto->boi"
        out[site.weight] = torch.einsum(spec, a, g).reshape(-1, *site.weight_shape)
    elif site.weight is not None:  # one GEMM per example in the weight's layout (einsum may permute and copy)
        grads = torch.bmm(a.transpose(1, 2), g) if site.transposed else torch.bmm(g.transpose(1, 2), a)
        out[site.weight] = grads.reshape(-1, *site.weight_shape)
    if site.bias is not None:
        out[site.bias] = g.sum(1)
    return out
