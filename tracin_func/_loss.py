"""Per-example losses: what is differentiated for one example."""

from __future__ import annotations

import copy
import inspect
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch import nn
from torch._C import _are_functorch_transforms_active
from torch.overrides import TorchFunctionMode

from ._model import Forward
from ._warn import warn

ExampleLossFn = Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]  # (state, batch of one) -> scalar


@dataclass(frozen=True)
class ExampleLoss:
    """A per-example loss written against the parameters, for full control (e.g. dict batches).

    ``fn(params, batch)`` gets the full state dict of one checkpoint (differentiated and frozen tensors) and a
    batch holding ONE example (every tensor keeps a leading dimension of size 1), and returns a scalar.

    Example:
        >>> import torch, tracin_func as tc
        >>> from torch.func import functional_call
        >>> model = torch.nn.Linear(3, 2)
        >>> def loss(params, batch):
        ...     logits = functional_call(model, params, (batch["x"],))
        ...     return torch.nn.functional.cross_entropy(logits, batch["label"])
        >>> data = {"x": torch.randn(4, 3), "label": torch.tensor([0, 1, 1, 0])}
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> tc.self_influence(model, ckpts, data, loss_fn=tc.ExampleLoss(loss)).shape
        torch.Size([4])
    """

    fn: ExampleLossFn


@dataclass(frozen=True)
class BatchLoss(ExampleLoss):
    """Per-example losses of a whole batch, so that the model runs once per batch (the batched path).

    ``fn(params, batch)`` gets the full state dict of one checkpoint and a batch of ``B`` examples (any structure,
    e.g. a Hugging Face dict) and returns a ``[B]`` tensor: entry ``i`` is example ``i``'s loss, computed as if it
    were alone (no mean over the batch). A batch of one is a special case, so a ``BatchLoss`` is also an
    :class:`ExampleLoss` and runs wherever one does; planning checks on the first examples of a call that the
    batched losses' gradients equal the examples' own, and otherwise computes them one example at a time.
    :func:`causal_lm_loss` and :func:`sequence_classification_loss` are ready-made ones for Hugging Face models.

    Example:
        >>> import torch, tracin_func as tc
        >>> from torch.func import functional_call
        >>> model = torch.nn.Linear(3, 2).eval()
        >>> def losses(params, batch):  # [B]
        ...     logits = functional_call(model, params, (batch["x"],))
        ...     return torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")
        >>> data = {"x": torch.randn(4, 3), "label": torch.tensor([0, 1, 1, 0])}
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> tc.self_influence(model, ckpts, data, loss_fn=tc.BatchLoss(losses)).shape
        torch.Size([4])
        >>> print(tc.explain(model, ckpts, data, loss_fn=tc.BatchLoss(losses)).batching)
        one batched forward / backward gives every layer's factors
    """

    fn: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]


class BatchedLoss(NamedTuple):
    """A :class:`BatchLoss` inside the core: ``per_example(state, batch)`` gives ``[B]`` losses, and calling it on a
    batch of one gives that example's loss (an ``ExampleLossFn``)."""

    fn: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]
    name: str  # the argument it came from, for messages

    def per_example(self, state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        losses = self.fn(dict(state), batch)  # (a copy: `functional_call` writes a buffer its forward rebinds into it)
        n = optree.tree_leaves(batch, none_is_leaf=True)[0].shape[0]
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            fix = (  # (a per-example loss kept in a column, `.sum(1, keepdim=True)`: a review helper's)
                "Drop the trailing dimension (`.squeeze(-1)`)." if got == (n, 1)
                else "Do not reduce over the batch (e.g. `reduction='none'`, then a mean per example)."
            )
            raise ValueError(
                f"`{self.name}`: a tc.BatchLoss must return one loss per example, a tensor of shape [{n}] for a batch "
                f"of {n}, got {got}. {fix}"
            )
        return losses

    def __call__(self, state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return self.per_example(state, batch)


class OneExampleLoss(NamedTuple):
    """A :class:`ExampleLoss` inside the core: ``fn(state, batch)``, checked to return one loss, for a batch of one."""

    fn: ExampleLossFn
    name: str  # the argument it came from, for messages

    def __call__(self, state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        loss = self.fn(dict(state), batch)  # (a copy: `functional_call` writes a buffer its forward rebinds into it:
        # the next run took it, DINO's centre, refused as random; a review helper's)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:  # (a [1] tensor, a batch of one's, is one loss)
            got = f"tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"`{self.name}`: a tc.ExampleLoss must return a scalar, the loss of the one example it is given, as a "
                f"0-d tensor computed from `params`, got a {got}. Reduce the model's outputs to the example's loss "
                f"(e.g. `F.cross_entropy(logits, batch['label'])`); losses of a whole batch, `[B]`: a tc.BatchLoss."
            )
        return loss


def _logits(output: Any) -> torch.Tensor:
    """A model output's logits: ``.logits`` (Hugging Face ``ModelOutput``), ``["logits"]``, the first element of a
    tuple, or the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"The model returned a {type(output).__name__} without logits (`.logits`, ['logits'], [0]).")
    return logits


def _model_inputs(
    batch: Any, labels: str, loss: str, options: Mapping[str, Any], per_position: bool = True
) -> tuple[dict[str, Any], torch.Tensor]:
    """The model's keyword arguments (``options``, then every entry of ``batch`` but the labels) and the labels,
    ``per_position`` (a sequence of them per example) where so."""
    if not isinstance(batch, Mapping) or labels not in batch:
        got, fix = (
            (f"keys {list(batch)[:6]}", "pass `labels=` to name the key")
            if isinstance(batch, Mapping)
            else (f"a {type(batch).__name__}", "give the data as dicts, or write a `tc.BatchLoss` for these batches")
        )
        raise TypeError(
            f"`loss_fn`: tc.{loss} takes dict batches holding the labels under {labels!r} (the model gets the other "
            f"entries as keyword arguments), got {got}; {fix}."
        )
    inputs, target = {k: v for k, v in batch.items() if k != labels}, batch[labels]
    tensors = [t for t in optree.tree_leaves([inputs, target]) if isinstance(t, torch.Tensor)]
    if per_position and tensors and all(t.dim() < 2 for t in tensors):  # (the model's own code fails on them, GPT-2's
        labelled = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__  # with "too many
        raise ValueError(  # indices for tensor of dimension 2", blaming example 0)
            f"`loss_fn`: tc.{loss} takes the labels under {labels!r} as [batch, positions], and this batch holds no "
            f"tensor of two dimensions (its labels: {labelled}): a batch is read as examples along its "
            f"first dimension, so a dict of [T] tensors, one example without its batch dimension as a Dataset's item "
            f"is, reads as T examples of one token. Give batches of examples ([B, T] tensors, as "
            f"`tokenizer(..., return_tensors='pt')` or a DataLoader's collator makes them), or the Dataset itself."
        )
    return {**options, **inputs}, target


_PER_TOKEN = "shaped as the logits less their last dimension, one per position"


def _check_labels(loss: str, key: str, target: torch.Tensor, shape: tuple[int, ...], what: str, ids: bool) -> None:
    """Raise, naming the labels' key, where ``target`` is not of ``shape`` (``what`` says why) or, for ``ids``, not of
    integer ids: torch's own message would blame a batch size or an index."""
    if tuple(target.shape) != shape:
        raise ValueError(
            f"`loss_fn`: tc.{loss} takes the labels under {key!r} {what} ({shape} here), got {tuple(target.shape)}."
        )
    if ids and (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool):
        raise ValueError(f"`loss_fn`: tc.{loss} takes the labels under {key!r} as integer ids, got {target.dtype}.")


def _check_per_position(loss: str, logits: torch.Tensor) -> None:
    """Raise where ``logits`` hold no positions: a sequence classifier's ``[B, C]``, whose labels ``[B]`` pass as
    the logits less their last dimension (torch's IndexError came next)."""
    if logits.dim() < 3:
        raise ValueError(
            f"`loss_fn`: tc.{loss} scores logits per position, [batch, positions, classes], and the model returns "
            f"{tuple(logits.shape)}: a sequence classifier's are scored by `tc.sequence_classification_loss`."
        )


def _without_cache(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` for a model whose forward takes ``use_cache`` (transformers' decoders): scores never
    read a key / value cache, which costs time to build, and Mamba's updates its state in place, which ``vmap``
    cannot batch (it sent Mamba to the per-example loop)."""
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # (no signature: a builtin or a C extension's forward)
        return {}
    return {"use_cache": False} if takes else {}


def causal_lm_loss(model: nn.Module, *, labels: str = "labels", ignore_index: int = -100) -> BatchLoss:
    """Hugging Face's causal-LM loss, one per example, for dict batches (``input_ids``, ``attention_mask``, ...).

    The model gets every entry of the batch but ``labels`` as keyword arguments (and ``use_cache=False`` where its
    forward takes it: no key / value cache is built); example ``i``'s loss is the mean next-token cross-entropy of
    ``logits[i, :-1]`` against ``labels[i, 1:]`` over the labels that are not ``ignore_index`` (padding, prompt tokens):
    what ``model(**batch).loss`` is for a batch holding only that example (a whole batch's averages over all its
    tokens, weighting an example by its number of labels; terms a model adds to it, such as a mixture of experts'
    router loss, are not included: a ``tc.BatchLoss`` scores those). An example with no label left has loss 0
    (Hugging Face's would be NaN). The cross-entropy is computed in the logits' dtype (transformers upcasts it to
    float32, so in float64 the two differ at float32 rounding). A label predicted from a padding position
    (``attention_mask`` 0: the last pad before the first real token, with left padding; a pad kept as a label, with
    right padding) is warned: that term depends on the padding; set the first real token's label (right padding: the
    pads') to ``ignore_index`` to score each example as it is unpadded (for a model with absolute positions that does
    not derive them from the mask, GPT-2's, give ``position_ids`` too: ``attention_mask.cumsum(-1) - 1``, clamped at
    0; left padding shifts every position otherwise).

    Args:
        model: the module the scorers get (e.g. ``GPT2LMHeadModel``); it returns logits ``[B, T, V]`` as
            ``.logits``, ``["logits"]``, its first element or itself.
        labels: the batch key of the ``[B, T]`` token labels (``input_ids`` with ignored positions set to
            ``ignore_index``; the shift happens here).
        ignore_index: the label of positions that carry no loss.

    Returns:
        A :class:`BatchLoss`, for ``loss_fn=`` (the model then runs once per batch when it can).

    Example:
        >>> import torch, tracin_func as tc
        >>> class TinyLM(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)
        ...     def forward(self, input_ids):
        ...         return {"logits": self.head(self.embed(input_ids))}
        >>> model = TinyLM().eval()
        >>> ids = torch.randint(0, 10, (3, 5))
        >>> data = {"input_ids": ids, "labels": ids.masked_fill(torch.arange(5) >= 4, -100)}  # last token ignored
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> tc.self_influence(model, ckpts, data, loss_fn=tc.causal_lm_loss(model)).shape
        torch.Size([3])
    """
    from torch.func import functional_call

    options = _without_cache(model)

    def losses(params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        inputs, target = _model_inputs(batch, labels, "causal_lm_loss", options)
        logits = _logits(functional_call(model, dict(params), (), inputs))
        _check_per_position("causal_lm_loss", logits)
        _check_labels("causal_lm_loss", labels, target, tuple(logits.shape[:-1]), _PER_TOKEN, True)
        # position t predicts label t + 1, the last nothing (Hugging Face's padded labels): every position's logits
        # read in place (a slice of them is copied, and its gradient zero-filled and copied back: GPT-2's batch of 220,
        # forward and backward 25 against 37 ms)
        shifted = F.pad(target, (0, 1), value=ignore_index)[:, 1:]
        _warn_padding_read(inputs.get("attention_mask"), shifted, ignore_index)
        return _mean_token_loss(logits, shifted, ignore_index)

    return BatchLoss(losses)


def _warn_padding_read(mask: Any, shifted: torch.Tensor, ignore_index: int) -> None:
    """Warn where a label is predicted from a padding position (``attention_mask`` 0): left padding with only the pads
    ignored scores the first real token from the last pad, whose logits depend on the padding (and, its attention row
    all masked, on the attention kernel). Not under a torch.func transform or compiling (no reading values there)."""
    if not (isinstance(mask, torch.Tensor) and mask.shape == shifted.shape):
        return
    if _are_functorch_transforms_active() or torch.compiler.is_compiling():
        return
    if bool(((mask == 0) & (shifted != ignore_index)).any()):
        warn(
            f"`causal_lm_loss`: a label is predicted from a padding position (`attention_mask` 0 there): with left "
            f"padding, the last pad predicts the first real token, whose score then depends on the padding (as in "
            f"Hugging Face's loss). Set the first real token's label to {ignore_index} too to score each example as it "
            f"is unpadded (and give `position_ids`, `attention_mask.cumsum(-1) - 1` clamped at 0, to a model of "
            f"absolute positions that does not derive them from the mask, as GPT-2). With right padding, pads kept as "
            f"labels are predicted from the pads before them: set the pads' labels to {ignore_index} (as Hugging "
            f"Face's language-modeling collator does).",
            UserWarning,
        )


def seq2seq_lm_loss(model: nn.Module, *, labels: str = "labels", ignore_index: int = -100) -> BatchLoss:
    """Hugging Face's sequence-to-sequence LM loss (BART, T5, Marian, Pegasus, ...), one per example, for dict
    batches (``input_ids``, ``attention_mask``, ``labels``: the target tokens).

    The model gets every entry of the batch but ``labels`` as keyword arguments (and ``use_cache=False`` where its
    forward takes it: no key / value cache is built), and ``decoder_input_ids`` made from the labels as the model makes
    them when it is given labels (``model.prepare_decoder_input_ids_from_labels``: the labels shifted right behind the
    decoder's start token) unless the batch holds them. Example ``i``'s loss is the mean cross-entropy of ``logits[i]``
    against ``labels[i]`` (no shift: the decoder's output at a position predicts that position's label) over the labels
    that are not ``ignore_index``: what ``model(**batch).loss`` is for a batch holding only that example. An example
    with no label left has loss 0 (Hugging Face's would be NaN).

    Args:
        model: the module the scorers get; it returns logits ``[B, T, V]`` as ``.logits``, ``["logits"]``, its first
            element or itself.
        labels: the batch key of the ``[B, T]`` labels (``ignore_index`` where a position carries no loss).
        ignore_index: the label of positions that carry no loss.

    Returns:
        A :class:`BatchLoss`, for ``loss_fn=``.

    Example:
        >>> import torch, tracin_func as tc
        >>> class TinySeq2Seq(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)
        ...     def forward(self, input_ids, decoder_input_ids):
        ...         h = self.embed(input_ids).mean(1, keepdim=True) + self.embed(decoder_input_ids)
        ...         return {"logits": self.head(h)}
        ...     def prepare_decoder_input_ids_from_labels(self, labels):
        ...         return torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1].clamp(min=0)], 1)
        >>> model = TinySeq2Seq().eval()
        >>> data = {"input_ids": torch.randint(0, 10, (3, 5)), "labels": torch.randint(0, 10, (3, 4))}
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> tc.self_influence(model, ckpts, data, loss_fn=tc.seq2seq_lm_loss(model)).shape
        torch.Size([3])
    """
    from torch.func import functional_call

    options = _without_cache(model)

    def losses(params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        inputs, target = _model_inputs(batch, labels, "seq2seq_lm_loss", options)
        try:  # (the decoder's inputs made from labels not [B, T] failed in the model's own code, raw)
            if "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
                inputs["decoder_input_ids"] = _decoder_inputs(model, target.masked_fill(target == ignore_index, -100))
            logits = _logits(functional_call(model, dict(params), (), inputs))
        except (IndexError, RuntimeError, ValueError) as err:
            if target.dim() == 2:
                raise
            raise ValueError(
                f"`loss_fn`: tc.seq2seq_lm_loss takes the labels under {labels!r} as [batch, positions], one per "
                f"position of the decoder, got {tuple(target.shape)}."
            ) from err
        _check_per_position("seq2seq_lm_loss", logits)
        _check_labels("seq2seq_lm_loss", labels, target, tuple(logits.shape[:-1]), _PER_TOKEN, True)
        return _mean_token_loss(logits, target, ignore_index)

    return BatchLoss(losses)


def token_classification_loss(model: nn.Module, *, labels: str = "labels", ignore_index: int = -100) -> BatchLoss:
    """Hugging Face's token-classification loss (NER, tagging), one per example, for dict batches.

    The model gets every entry of the batch but ``labels`` as keyword arguments (and ``use_cache=False`` where its
    forward takes it: no key / value cache is built) and returns logits ``[B, T, C]``. Example ``i``'s loss is the mean
    cross-entropy of its tokens' logits against their labels ``[B, T]`` (no shift) over the labels that are not
    ``ignore_index`` (padding, a word's later sub-tokens): what ``model(**batch).loss`` is for a batch holding only that
    example. An example with no label left has loss 0.

    Args:
        model: the module the scorers get; it returns logits ``[B, T, C]`` as ``.logits``, ``["logits"]``, its first
            element or itself.
        labels: the batch key of the ``[B, T]`` labels (``ignore_index`` where a position carries no loss).
        ignore_index: the label of positions that carry no loss.

    Returns:
        A :class:`BatchLoss`, for ``loss_fn=``.

    Example:
        >>> import torch, tracin_func as tc
        >>> class Tagger(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)
        ...     def forward(self, input_ids):
        ...         return {"logits": self.head(self.embed(input_ids))}
        >>> model = Tagger().eval()
        >>> data = {"input_ids": torch.randint(0, 10, (3, 5)), "labels": torch.randint(0, 3, (3, 5))}
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> tc.self_influence(model, ckpts, data, loss_fn=tc.token_classification_loss(model)).shape
        torch.Size([3])
    """
    from torch.func import functional_call

    options = _without_cache(model)

    def losses(params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        inputs, target = _model_inputs(batch, labels, "token_classification_loss", options)
        logits = _logits(functional_call(model, dict(params), (), inputs))
        _check_per_position("token_classification_loss", logits)
        _check_labels("token_classification_loss", labels, target, tuple(logits.shape[:-1]), _PER_TOKEN, True)
        return _mean_token_loss(logits, target, ignore_index)

    return BatchLoss(losses)


def _decoder_inputs(model: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """The decoder's inputs as the model makes them from labels: its ``prepare_decoder_input_ids_from_labels``, or,
    for the models whose forward shifts them itself (Whisper, Blenderbot, M2M100: no such method), the labels
    shifted right behind the config's ``decoder_start_token_id``, ``-100`` read as its ``pad_token_id`` (another
    ``ignore_index`` is given as ``-100`` here: it was read as a token id)."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=target)
    config = getattr(model, "config", None)
    start, pad = getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None)
    if start is None or pad is None:
        raise TypeError(
            f"`loss_fn`: tc.seq2seq_lm_loss makes `decoder_input_ids` from the labels with the model's "
            f"`prepare_decoder_input_ids_from_labels`, or its config's `decoder_start_token_id` and `pad_token_id`, "
            f"which {type(model).__name__} lacks; put `decoder_input_ids` in the batches."
        )
    shifted = torch.cat([torch.full_like(target[:, :1], start), target[:, :-1]], 1)
    return shifted.masked_fill(shifted == -100, pad)


def _mean_token_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[B]``: each example's mean cross-entropy of ``logits [B, T, V]`` against ``target [B, T]`` over the targets
    that are not ``ignore_index`` (0 where none is left). Read as ``[B T, V]`` rows, classes last: a slice of GPT-2's
    logits, ``[220, 31, 1000]``, took 37 ms forward and backward against 74 with the classes as dimension 1."""
    rows = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index, reduction="none"
    )
    tokens = rows.view(target.shape)
    return tokens.sum(1) / (target != ignore_index).sum(1).clamp(min=1)


def sequence_classification_loss(
    model: nn.Module, *, labels: str = "labels", problem_type: str | None = None
) -> BatchLoss:
    """Hugging Face's sequence-classification loss, one per example, for dict batches.

    The model gets every entry of the batch but ``labels`` as keyword arguments (and ``use_cache=False`` where its
    forward takes it: no key / value cache is built) and returns logits ``[B, C]``. Example ``i``'s loss is what
    ``model(**batch).loss`` is for a batch holding only that example, by ``problem_type``:
    ``"single_label_classification"`` the cross-entropy of its class label (a label ``-100`` gives 0), ``"regression"``
    the mean squared error over its outputs, and ``"multi_label_classification"`` the mean binary cross-entropy with
    logits over its labels. Default: the model config's ``problem_type``, or where it sets none Hugging Face's rule: one
    logit per example (``num_labels=1``) is a regression, integer labels a single-label classification, other labels a
    multi-label one; logits ``[B, C]`` with one integer label per example (a multiple-choice head,
    ``*ForMultipleChoice``) always a single-label classification, as there.

    Args:
        model: the module the scorers get; it returns logits ``[B, C]`` as ``.logits``, ``["logits"]``, its first
            element or itself.
        labels: the batch key of the labels: ``[B]`` class indices, or ``[B, C]`` / ``[B]`` floats for the other
            problem types.
        problem_type: as above; None: the model config's, or Hugging Face's rule.

    Returns:
        A :class:`BatchLoss`, for ``loss_fn=``.

    Example:
        >>> import torch, tracin_func as tc
        >>> class Classifier(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)
        ...     def forward(self, input_ids, attention_mask):
        ...         h = (self.embed(input_ids) * attention_mask[..., None]).sum(1)
        ...         return (self.head(h),)
        >>> model = Classifier().eval()
        >>> data = {"input_ids": torch.randint(0, 10, (4, 6)), "attention_mask": torch.ones(4, 6),
        ...         "labels": torch.tensor([0, 2, 1, 0])}
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> loss = tc.sequence_classification_loss(model)
        >>> tc.influence(model, ckpts, data, data, loss_fn=loss).shape
        torch.Size([4, 4])
    """
    from torch.func import functional_call

    kinds = ("single_label_classification", "regression", "multi_label_classification")
    if problem_type not in (None, *kinds):
        raise ValueError(f"`problem_type` must be None (the model's) or one of {kinds}, got {problem_type!r}.")
    options = _without_cache(model)

    def losses(params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        inputs, target = _model_inputs(batch, labels, "sequence_classification_loss", options, per_position=False)
        logits = _logits(functional_call(model, dict(params), (), inputs))
        kind = problem_type or _problem_type(model, logits, target)
        n, name = logits.shape[0], "sequence_classification_loss"
        if kind == "single_label_classification":
            if logits.dim() > 2 and math.prod(logits.shape[1:-1]) > 1:  # (scored over T C flattened "classes")
                raise ValueError(
                    f"`{name}`: the model returns logits of shape {tuple(logits.shape)}, not [B, C]: a class per "
                    f"position (a token classifier's [B, T, C]), and `{labels}` holds one per example. Score a token "
                    f"classifier with `tc.token_classification_loss(model)` (labels [B, T]), or pool the positions "
                    f"into one prediction per example in the model."
                )
            one_each = target.reshape(-1) if target.numel() == n else target  # ([B] or [B, 1])
            _check_labels(name, labels, one_each, (n,), "one class per example", True)
            return F.cross_entropy(logits.reshape(n, -1), one_each, reduction="none")
        if target.numel() != logits.numel():  # (a regression's one logit per example: labels [B] or [B, 1])
            _check_labels(name, labels, target, tuple(logits.shape), f"shaped as the logits for {kind!r}", False)
        if kind == "regression":
            each = F.mse_loss(logits.reshape(n, -1), target.reshape(n, -1).to(logits.dtype), reduction="none")
        else:
            each = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        return each.reshape(n, -1).mean(1)

    return BatchLoss(losses)


def _problem_type(model: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> str:
    """The model config's ``problem_type``, or the one Hugging Face's sequence classifiers infer when it is None
    (``num_labels == 1``, here one logit per example: a multiple-choice head has one per choice, and one label)."""
    configured = getattr(getattr(model, "config", None), "problem_type", None)
    if configured is not None and not _choices(logits, target):
        return configured
    if logits[0].numel() == 1:
        return "regression"
    return "single_label_classification" if target.dtype in (torch.long, torch.int) else "multi_label_classification"


def _choices(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """Logits ``[B, C]`` against one integer label per example: a multiple-choice head, which Hugging Face always
    scores with cross-entropy, whatever its config says."""
    return logits.dim() == 2 and logits.shape[1] > 1 and target.dim() == 1 and not target.is_floating_point()


def example_loss(forward: Forward, loss_fn: Any, name: str) -> ExampleLossFn:
    """The loss of one example as a function of the state.

    A criterion ``loss_fn(outputs, targets)`` is applied to a batch of one and its output summed: for
    ``reduction="none"`` / ``"sum"`` that is the sum over the example's elements, for ``"mean"`` their mean,
    and a callable without ``.reduction`` gives whatever it reduces to (as Captum defines the per-example loss).
    """
    if isinstance(loss_fn, BatchLoss):
        return BatchedLoss(loss_fn.fn, name)
    if isinstance(loss_fn, ExampleLoss):
        return OneExampleLoss(loss_fn.fn, name)
    if not callable(loss_fn):
        raise TypeError(
            f"`{name}` must be a criterion `loss_fn(outputs, targets)` or `tc.ExampleLoss(fn)` (`tc.BatchLoss(fn)` "
            f"for per-example losses of a whole batch), got {loss_fn!r}."
        )
    reduction = getattr(loss_fn, "reduction", "none")
    if reduction not in ("none", "sum", "mean"):
        batchmean = reduction == "batchmean"
        same = " (on one example, `KLDivLoss`'s 'batchmean' is its 'sum': pass that)" if batchmean else ""
        raise ValueError(f"`{name}.reduction` must be 'none', 'sum' or 'mean', got {reduction!r}{same}.")
    _warn_trained_criterion(loss_fn, name)
    return CriterionLoss(forward, loss_fn, name)


def _warn_trained_criterion(criterion: Any, name: str) -> None:
    """Warn of a criterion holding parameters that need gradients: a margin head inside the loss (as
    pytorch-metric-learning's ``ArcFaceLoss`` holds its class weights), which training steps, was scored at its value
    now at every checkpoint and never differentiated (52% off, silently; a review helper's). A teacher run under
    ``no_grad`` in a distillation loss holds such parameters too, never stepped (refused, it was falsely: a sweep's)."""
    held = criterion.named_parameters() if isinstance(criterion, nn.Module) else ()
    trained = [n for n, p in held if p.requires_grad]
    if trained:
        warn(
            f"`{name}` holds parameters that need gradients ({trained[:5]}), which no checkpoint holds and no score "
            f"differentiates: every checkpoint is scored at their value now. Where training steps them (a margin head "
            f"inside the loss), move them into the model, its checkpoints holding them; where it does not (a frozen "
            f"teacher), `{name}.requires_grad_(False)` says so.",
            UserWarning,
        )


class CriterionLoss(NamedTuple):
    """``criterion(forward(state, *inputs), target).sum()`` for a batch ``(*inputs, target)`` of one example.

    Kept apart from an opaque ``ExampleLoss`` so that the forward pass can run on a whole batch at once and only
    the criterion is mapped over examples (``_capture.batched_factors``).
    """

    forward: Forward
    criterion: Callable[[Any, Any], torch.Tensor]
    name: str  # the argument it came from, for messages

    def __call__(self, state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        *inputs, target = batch
        return self.of_example(self.forward(state, *inputs), target)

    def of_example(self, output: Any, target: Any) -> torch.Tensor:
        """The criterion's loss of one example's output and target (a batch of one)."""
        if torch.compiler.is_compiling():  # (checked where planning ran it, eagerly)
            return self.criterion(output, target).sum()
        with naming_a_dropped_batch(output, target), _CancellingWeights(self.name, self.criterion, target):
            return self.criterion(output, target).sum()


@contextmanager
def naming_a_dropped_batch(output: Any, target: Any) -> Iterator[None]:
    """Re-raise a criterion's error on one example's scalar output and a target of some shape naming the likely cause,
    a ``.squeeze()`` in the model (a binary classifier's ``[B, 1] -> [B]``), which drops a batch of one's dimension."""
    try:
        yield
    except (ValueError, RuntimeError, IndexError) as err:
        if not (isinstance(output, torch.Tensor) and output.dim() == 0 and isinstance(target, torch.Tensor)):
            raise
        raise type(err)(  # (torch's errors and a ValueError carry their message alone)
            f"{err}. The model's output for one example (a batch of one) is a scalar where its target has shape "
            f"{list(target.shape)}: a `.squeeze()` in the model drops a batch of one's batch dimension. Squeeze only "
            f"the dimension meant (`.squeeze(-1)`), as batches of one need in training too"
        ) from err


class _CancellingWeights(TorchFunctionMode):
    """Refuses cross-entropy / NLL weighted by class with reduction "mean" on one class index: it divides the loss by
    the example's own weight, so on one example the weights cancel and every loss is unweighted. Watched as the
    criterion calls them: a module, a ``functools.partial`` of ``F.cross_entropy``, a lambda or a wrapper (only the
    first was refused: the others scored the unweighted loss, silently); a TorchScript module, which runs no torch
    function mode, by its attributes."""

    _WATCHED = {F.cross_entropy: inspect.signature(F.cross_entropy), F.nll_loss: inspect.signature(F.nll_loss)}

    def __init__(self, name: str, criterion: Any, target: Any) -> None:
        super().__init__()
        self.name, self.criterion = name, criterion
        if isinstance(criterion, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
            for what, weight, reduction in _scripted_losses(criterion):
                self._refuse_cancelling(what, {"weight": weight, "target": target, "reduction": reduction})

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        signature = self._WATCHED.get(func)
        if signature is not None:
            c = self.criterion
            what = type(c).__name__ if isinstance(c, (nn.CrossEntropyLoss, nn.NLLLoss)) else f"F.{func.__name__}"
            self._refuse_cancelling(what, signature.bind(*args, **kwargs).arguments)
        return func(*args, **kwargs)

    def _refuse_cancelling(self, what: str, given: Mapping[str, Any]) -> None:
        target = given.get("target")
        one_index = isinstance(target, torch.Tensor) and not target.is_floating_point() and target.numel() == 1
        legacy = given.get("size_average") is not None or given.get("reduce") is not None  # (their own reduction)
        mean = given.get("reduction", "mean") == "mean" and not legacy
        if given.get("weight") is not None and mean and one_index:
            smoothed = " (and divides label smoothing's term by it)" if given.get("label_smoothing") else ""
            raise ValueError(
                f"`{self.name}`: {what}(weight=...) with reduction='mean' divides an example's loss by its own "
                f"class weight, so on one example the weight cancels from its cross-entropy{smoothed}, which is "
                f"then unweighted. Pass reduction='sum' for losses weighted by class (as they weigh in training), "
                f"or leave weight= out."
            )


_TRACED_LOSSES = {"aten::cross_entropy_loss": "CrossEntropyLoss", "aten::nll_loss": "NLLLoss",
                  "aten::nll_loss_nd": "NLLLoss", "aten::nll_loss2d": "NLLLoss"}  # fmt: skip
_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # (torch's enum, as a traced graph holds it)


def _scripted_losses(criterion: torch.jit.ScriptModule | torch.jit.ScriptFunction) -> list[tuple[str, Any, Any]]:
    """``(name, weight, reduction)`` of the class-weighted cross-entropy / NLL a TorchScript criterion computes:
    a scripted module's by its attributes, a traced one's (a traced function's too) by its graph's ops, whose
    reduction is a constant there (no attribute keeps it: refused whatever it was, then; a sweep's)."""
    if criterion not in _TRACED:  # (its graph read once: 0.3 ms a read, each example's)
        _TRACED[criterion] = _traced_losses(criterion)
    scripted = [
        (layer.original_name, layer.weight, layer.reduction)
        for layer in (criterion.modules() if isinstance(criterion, torch.jit.ScriptModule) else ())
        if layer.original_name in ("CrossEntropyLoss", "NLLLoss") and getattr(layer, "weight", None) is not None
        and hasattr(layer, "reduction")
    ]
    return scripted + _TRACED[criterion]


_TRACED: weakref.WeakKeyDictionary[Any, list[tuple[str, Any, Any]]] = weakref.WeakKeyDictionary()


def _traced_losses(criterion: torch.jit.ScriptModule | torch.jit.ScriptFunction) -> list[tuple[str, Any, Any]]:
    found = []
    for node in criterion.inlined_graph.nodes():
        what = _TRACED_LOSSES.get(node.kind())
        inputs = list(node.inputs())
        if what is not None and len(inputs) > 3 and not isinstance(inputs[2].type(), torch._C.NoneType):
            reduction = inputs[3].toIValue()  # (None where a scripted module computes it: read from its attributes)
            if reduction is not None:
                found.append((what, True, _REDUCTIONS.get(reduction)))
    return found


def floating_leaves(tree: Any) -> list[torch.Tensor]:
    """The floating tensors of ``tree`` (a model's outputs), in order."""
    return [t for t in optree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


# Built-in criteria whose "none" output holds one loss per element with the batch first, so that the loss of one
# example under "mean" is the mean of its elements (when no class weights or ignored targets rescale it).
_ELEMENTWISE = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.CrossEntropyLoss,
    nn.NLLLoss,
    nn.KLDivLoss,
    nn.SoftMarginLoss,
)


@torch.compiler.disable  # (a value read: eager inside compiled updates, without dynamo's graph-break warning)
def _holds(target: torch.Tensor, value: int) -> bool:
    return bool((target == value).any())


def batch_losses(criterion: Callable[[Any, Any], torch.Tensor], output: Any, target: Any) -> torch.Tensor | None:
    """The criterion's losses of a whole batch, without mapping over examples (what ``reduction='none'`` gives, the
    sum for ``'sum'``, each example's mean for a built-in elementwise ``'mean'``), whose sum is ``sum_i
    criterion(output_i, target_i)``; ``None`` when that cannot be done exactly for this criterion (the caller then
    maps it over examples)."""
    reduction = getattr(criterion, "reduction", None)
    if reduction in ("none", "sum"):
        return criterion(output, target)
    if reduction != "mean" or type(criterion) not in _ELEMENTWISE or getattr(criterion, "weight", None) is not None:
        return None
    ignore = getattr(criterion, "ignore_index", None)
    if ignore is not None and isinstance(target, torch.Tensor) and _holds(target, ignore):
        return None
    per_element = copy.copy(criterion)  # a shallow copy: the user's criterion keeps its reduction
    per_element.reduction = "none"
    losses = per_element(output, target)
    # (one element per example, a class index's cross-entropy: its own mean, exactly, without a mean and its backward)
    return losses if losses.dim() == 1 else losses.reshape(losses.shape[0], -1).mean(1)
