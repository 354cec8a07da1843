"""Real-model workloads: Hugging Face GPT-2 (language model and sequence classifier), BERT, DeBERTa-v3, BART, T5, a
Llama-style LM, Falcon, ViT, Swin and ConvNeXt (small configs, random weights), ResNet-18, a MobileNetV3-small-style
net and an LSTM classifier, each with three in-memory checkpoints and random data.

Nothing is trained or downloaded: each builder makes the model from a seed, derives three ``tc.Checkpoint`` from
its initial weights by seeded noise (every floating parameter perturbed; BatchNorm running statistics made
non-trivial), and draws its data from the same seed. ``transformers`` is only needed by :func:`gpt2`,
:func:`gpt2_classifier`, :func:`bert`, :func:`bart`, :func:`llama` and :func:`vit` (an optional ``test`` /
``bench`` dependency, never a runtime one); torchvision is not used (its registry wheel does not import with the
CPU torch), so ResNet-18 and MobileNetV3-small are defined here.

Each builder takes the sizes (``n_train``, ``n_test``, sequence length or image size, ``dtype``) so that the tests
run them tiny in float64 and ``bench_core.py --real`` at the issue's 200 train x 20 test. It returns a
:class:`RealWorkload`: the model in eval mode, the checkpoints, a train and a test batch (a tuple with the target
last, or a dict for ``tc.ExampleLoss``), the ``loss_fn`` as the scorers take it, a batched summed loss for the
plain-backprop floor, and (for tuple batches) a per-example criterion Captum's ``TracInCP`` accepts.

- ``gpt2``: ``GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64))``
  (eager attention, ``lm_head`` tied to ``wte``), random token sequences whose last tokens (random length) are
  padding with label -100. Per-example loss: HF's causal-LM loss, the mean next-token cross-entropy over the
  example's non-ignored (shifted) labels. ``form="batch_loss"``: dict batches ``{"input_ids", "labels"}`` and
  ``tc.causal_lm_loss(model)`` (the library's per-example HF loss, run on whole batches);
  ``form="example_loss"``: the same batches and ``tc.ExampleLoss(... .loss)`` (the model's own ``.loss``, one
  example at a time); ``form="criterion"``: :class:`LogitsOnly` (logits ``[B, T, V]``) with
  :class:`CausalLMLoss` and batches ``(input_ids, labels)``.
- ``gpt2_cls``: ``GPT2ForSequenceClassification`` at the ``gpt2`` sizes (4 labels, padding id 0), right-padded
  sequences with their ``attention_mask``: the classifier reads each example's last non-padding token, so the last
  block's Linears after attention have one row with gradient per example. The forms of ``bert``.
- ``bert``: ``BertForSequenceClassification(BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
  intermediate_size=128, vocab_size=1000, num_labels=4))``, right-padded sequences (random lengths) with their
  ``attention_mask``, 4 classes. ``form="batch_loss"``: dict batches ``{"input_ids", "attention_mask",
  "labels"}`` with ``tc.sequence_classification_loss(model)``; ``form="example_loss"``: the same batches with
  ``tc.ExampleLoss(... .loss)``; ``form="criterion"``: :class:`LogitsOnly` with
  ``CrossEntropyLoss`` and batches ``(input_ids, attention_mask, labels)``.
- ``deberta``: ``DebertaV2ForSequenceClassification`` at the ``bert`` sizes with DeBERTa-v3's attention
  (``relative_attention=True``, 16 position buckets each way, ``share_att_key=True``, ``norm_rel_ebd="layer_norm"``,
  ``position_biased_input=False``): the relative embeddings' table is read directly, normalised, projected by the
  query and key layers the tokens use too, and tiled over the batch per head; the data and forms of ``bert``.
- ``bart``: ``BartForConditionalGeneration(BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, 4 heads,
  ffn 128, vocab_size=1000))``: the token table is held by ``model.shared`` (never called) and used by the encoder's
  and the decoder's embeddings and the LM head; right-padded source sequences with their ``attention_mask``,
  right-padded targets of half their length (padding labelled -100). ``form="batch_loss"``: dict batches with
  ``tc.seq2seq_lm_loss(model)`` (the decoder's inputs made from the labels by the model's own shift);
  ``form="example_loss"``: the model's own ``.loss``; ``form="criterion"``: :class:`LogitsOnly` with
  :class:`Seq2SeqLMLoss` and batches ``(input_ids, attention_mask, decoder_input_ids, labels)``.
- ``llama``: ``LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))``: RMSNorm (a layer of no known kind, its weight
  an elementwise scale), rotary positions, grouped key / value heads, SwiGLU; right-padded sequences with their
  ``attention_mask``, the causal-LM loss; the same three forms as ``gpt2``.
- ``falcon``: ``FalconForCausalLM(FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
  vocab_size=1000))``: its projections are ``FalconLinear`` (``input @ self.weight.T``, no layer of a known kind);
  the data and forms of ``llama``.
- ``vit``: ``ViTForImageClassification(ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
  intermediate_size=128, patch_size=4, num_labels=10))`` on random 32x32 images: its class token and position
  embeddings are parameters of ``ViTEmbeddings`` itself (rows ``[1, ...]`` broadcast over the batch); the forms of
  ``bert`` (``pixel_values`` for ``input_ids`` and the mask).
- ``swin``: ``SwinForImageClassification(SwinConfig(patch_size=2, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
  window_size=4, num_labels=10))`` on random 32x32 images: 16 and 4 windows per image, every second block's shifted
  (a mask per window, tiled per image, added to its relative position bias); the forms of ``vit``.
- ``convnext``: ``ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[32, 64], depths=[2, 2],
  num_stages=2, patch_size=4, num_labels=10))`` on random 32x32 images: depthwise 7x7 convolutions, channels-first
  LayerNorms (an ``nn.LayerNorm`` subclass permuting around its ``F.layer_norm`` call) and layer scales (vectors of
  the block itself); the forms of ``vit``.
- ``resnet18``: :class:`ResNet18` (BasicBlock, [2, 2, 2, 2], 64-512 channels by default, CIFAR stem: 3x3 conv
  stride 1, no max-pool), 32x32 images, 10 classes, ``CrossEntropyLoss``.
- ``mobilenet``: :class:`MobileNetV3Small` (torchvision's MobileNetV3-small block table: inverted residuals with
  depthwise 3x3 / 5x5 convolutions, squeeze-excitation, hardswish / hardsigmoid, BatchNorm; stem stride 1 for
  32x32 images), 10 classes, ``CrossEntropyLoss``.
- ``lstm``: :class:`LSTMClassifier` (Embedding(1000, 64), LSTM(64, 64, batch_first), Linear(64, 4) on the last
  hidden state), token sequences, ``CrossEntropyLoss``; ``rnn``: the same with a vanilla ``nn.RNN``; ``lstm_cell``:
  with an ``nn.LSTMCell`` stepped by the model's own loop; ``packed_lstm``: the LSTM on sequences of lengths 8..32
  packed by the model (``pack_padded_sequence``), the last state at each example's own end.
- ``bag``: :class:`BagClassifier` (PyTorch's text classification tutorial: EmbeddingBag(20000, 64, mean),
  Linear(64, 4)), bags of 32 token ids, ``CrossEntropyLoss``.

Example:
    >>> w = resnet18(n_train=4, n_test=2, image_size=8, width=4)
    >>> len(w.checkpoints), w.train[0].shape, w.n_test
    (3, torch.Size([4, 3, 8, 8]), 2)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import tracin_func as tc

LRS = (0.1, 0.05, 0.02)  # learning rates of the three checkpoints
NOISE = 0.05  # checkpoint noise, relative to each parameter's RMS (absolute where the RMS is 0)

BatchLoss = Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]  # (state, batch) -> summed per-example loss
# builders of Hugging Face models (``form=``: the loss form)
HF_MODELS = (
    "gpt2", "gpt2_cls", "bert", "bert_mlm", "deberta", "bart", "t5", "llama", "falcon", "mamba", "vit", "swin",
    "convnext", "wav2vec2",
)  # fmt: skip


@dataclass(frozen=True)
class RealWorkload:
    """A model (eval mode), its checkpoints, one train and one test batch, and the losses to score them with."""

    name: str
    model: nn.Module
    checkpoints: list[tc.Checkpoint]
    train: Any  # (x1, ..., xk, y) or a dict of tensors
    test: Any
    loss_fn: Any  # a criterion or a tc.ExampleLoss, as the scorers take it
    batch_loss: BatchLoss  # sum over a batch of the per-example losses, batched (the plain-backprop floor)
    captum_loss: nn.Module | None = None  # reduction="none" criterion with one loss per example; None: dict batches
    form: str = "criterion"  # "criterion" | "example_loss"

    @property
    def n_train(self) -> int:
        return num_examples(self.train)

    @property
    def n_test(self) -> int:
        return num_examples(self.test)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def subsample(self, n_test: int | None = None, n_train: int | None = None) -> RealWorkload:
        """The first ``n_test`` test and ``n_train`` training examples (same model and checkpoints)."""
        return replace(self, train=take(self.train, 0, n_train), test=take(self.test, 0, n_test))

    def describe(self) -> str:
        return (
            f"{self.name} ({self.form}): {self.n_params:,} params, {len(self.checkpoints)} checkpoints "
            f"(lr {', '.join(str(c.lr) for c in self.checkpoints)}), {self.n_test} test x {self.n_train} train"
        )


def num_examples(batch: Any) -> int:
    """Examples in a tuple or dict batch."""
    return next(iter(batch.values())).shape[0] if isinstance(batch, Mapping) else batch[0].shape[0]


def take(batch: Any, start: int = 0, stop: int | None = None) -> Any:
    """Examples ``start:stop`` of a tuple or dict batch."""
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    return tuple(t[start:stop] for t in batch)


# ----------------------------------------------------------------------------------------------------- checkpoints


def make_checkpoints(
    model: nn.Module, seed: int, lrs: Sequence[float] = LRS, noise: float = NOISE
) -> list[tc.Checkpoint]:
    """One checkpoint per learning rate: the model's state with every floating parameter perturbed by seeded
    Gaussian noise (``noise`` times the parameter's RMS, or ``noise`` where it is 0); BatchNorm running means and
    variances drawn at random (mean ~ N(0, 0.1^2), var ~ U(0.5, 1.5)); integer buffers copied. Tied parameters
    (GPT-2's ``lm_head.weight`` and ``wte.weight``) stay one tensor under both names."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict(keep_vars=True)
    params = {id(p) for p in model.parameters()}
    bn_stats = {
        id(t): kind
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for kind, t in (("mean", m.running_mean), ("var", m.running_var))
        if t is not None
    }
    checkpoints = []
    for lr in lrs:
        new: dict[int, torch.Tensor] = {}  # keyed by tensor identity: tied names share one new tensor
        for t in state.values():  # keep_vars: the parameter and buffer objects themselves
            if id(t) in new:
                continue
            value = t.detach()
            if id(t) in params and value.is_floating_point():
                rms = value.square().mean().sqrt().item() if value.numel() else 0.0
                scale = noise * (rms if rms > 0 else 1.0)
                value = value + scale * torch.randn(value.shape, generator=generator, dtype=value.dtype)
            elif bn_stats.get(id(t)) == "mean":
                value = 0.1 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
            elif bn_stats.get(id(t)) == "var":
                value = 0.5 + torch.rand(value.shape, generator=generator, dtype=value.dtype)
            else:
                value = value.clone()
            new[id(t)] = value
        checkpoints.append(tc.Checkpoint(params={k: new[id(v)] for k, v in state.items()}, lr=lr))
    return checkpoints


def _criterion_batch_loss(model: nn.Module, per_example: nn.Module) -> BatchLoss:
    """Summed per-example losses of a tuple batch; ``per_example`` (reduction "none") gives one loss per example."""

    def loss(state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        *inputs, target = batch
        return per_example(functional_call(model, state, tuple(inputs)), target).sum()

    return loss


# ------------------------------------------------------------------------------------------------------- losses


class CausalLMLoss(nn.Module):
    """Causal-LM loss as a criterion ``(logits [B, T, V], labels [B, T]) -> loss``, with one loss per example.

    Example ``i``'s loss is Hugging Face's: the mean cross-entropy of ``logits[i, :-1]`` against ``labels[i, 1:]``
    over the labels that are not ``ignore_index``. ``reduction`` then acts over examples like any criterion's:
    ``"none"`` gives ``[B]`` (what Captum's per-example path needs), ``"sum"`` / ``"mean"`` their sum / mean, so
    the per-example loss of a batch of one is the same under every reduction.
    """

    def __init__(self, reduction: str = "none", ignore_index: int = -100) -> None:
        super().__init__()
        self.reduction = reduction
        self.ignore_index = ignore_index

    shift = True  # position t predicts label t + 1

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.shift:  # (the last position predicts nothing: its label ignored, as tc.causal_lm_loss and HF do)
            labels = nn.functional.pad(labels, (0, 1), value=self.ignore_index)[:, 1:]
        tokens = nn.functional.cross_entropy(  # (0 at ignored labels; rows of classes, as tc.causal_lm_loss reads them)
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=self.ignore_index, reduction="none"
        ).view(labels.shape)
        counts = (labels != self.ignore_index).sum(1).clamp(min=1)
        losses = tokens.sum(1) / counts
        if self.reduction == "sum":
            return losses.sum()
        if self.reduction == "mean":
            return losses.mean()
        return losses


class Seq2SeqLMLoss(CausalLMLoss):
    """Sequence-to-sequence LM loss as a criterion ``(logits [B, T, V], labels [B, T]) -> loss``: example ``i``'s is
    Hugging Face's, the mean cross-entropy of ``logits[i]`` against ``labels[i]`` (no shift) over the labels that are
    not ``ignore_index``; ``reduction`` as :class:`CausalLMLoss`'s."""

    shift = False  # the decoder's output at a position predicts that position's label


class LogitsOnly(nn.Module):
    """A Hugging Face model called with positional inputs (``names``), returning ``.logits``: the criterion form
    (plain ``loss_fn(outputs, targets)``, usable by Captum too). Its state-dict names carry the prefix ``hf.``."""

    def __init__(self, hf: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.hf = hf
        self.names = tuple(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.hf(**dict(zip(self.names, inputs))).logits


def _hf_example_loss(model: nn.Module) -> tc.ExampleLoss:
    def loss(params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, params, (), dict(batch)).loss

    return tc.ExampleLoss(loss)


def _prefixed(checkpoints: Sequence[tc.Checkpoint], prefix: str) -> list[tc.Checkpoint]:
    return [tc.Checkpoint(params={prefix + k: v for k, v in c.params.items()}, lr=c.lr) for c in checkpoints]


def _lengths(n: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Random sequence lengths in ``[seq_len // 2, seq_len]``."""
    return torch.randint(max(2, seq_len // 2), seq_len + 1, (n,), generator=generator)


def _right_padded(n: int, seq_len: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids ``[n, seq_len]`` whose last positions (a random number, ``_lengths``) are padding (id 0),
    and the padding mask."""
    ids = torch.randint(0, vocab, (n, seq_len), generator=generator)
    pad = torch.arange(seq_len) >= _lengths(n, seq_len, generator)[:, None]
    return ids.masked_fill(pad, 0), pad


def _split(t: Any, n_train: int) -> tuple[Any, Any]:
    if isinstance(t, Mapping):
        return {k: v[:n_train] for k, v in t.items()}, {k: v[n_train:] for k, v in t.items()}
    return t[:n_train], t[n_train:]


# --------------------------------------------------------------------------------------------- Hugging Face models


# GPT-2's sizes here; its own token ids (50256) lie outside this vocabulary
_GPT2_SIZES = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0)


def gpt2(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """GPT-2 (2 layers, 64 dims, 4 heads, vocabulary 1000) scored with its causal-LM loss (see the module doc)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = _hf_model(GPT2LMHeadModel, GPT2Config(**_GPT2_SIZES), dtype, seed)
    hf.loss_type = "ForCausalLM"  # the default it would pick, with a warning, from the class name
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    ids, pad = _right_padded(n, seq_len, hf.config.vocab_size, generator)
    labels = ids.masked_fill(pad, -100)
    checkpoints = make_checkpoints(hf, seed + 2)
    return _hf_workload("gpt2", hf, checkpoints, {"input_ids": ids, "labels": labels}, n_train, form, CausalLMLoss())


def gpt2_classifier(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """GPT-2 sequence classifier (the ``gpt2`` sizes, 4 labels), which reads each example's last non-padding token,
    on right-padded random tokens with their attention mask."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(**_GPT2_SIZES, pad_token_id=0, num_labels=4, problem_type="single_label_classification")
    hf = _hf_model(GPT2ForSequenceClassification, config, dtype, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    ids, pad = _right_padded(n, seq_len, config.vocab_size - 1, generator)
    ids = (ids + 1).masked_fill(pad, 0)  # the classifier finds each example's last token by the padding id 0
    labels = torch.randint(0, config.num_labels, (n,), generator=generator)
    data = {"input_ids": ids, "attention_mask": (~pad).long(), "labels": labels}
    checkpoints = make_checkpoints(hf, seed + 2)
    return _hf_workload("gpt2_cls", hf, checkpoints, data, n_train, form, nn.CrossEntropyLoss())


def llama(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """Llama-style causal LM (2 layers, 64 dims, 4 heads of which 2 key / value, RMSNorm, rotary positions, SwiGLU)
    on right-padded random tokens with their attention mask."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    hf = _hf_model(LlamaForCausalLM, config, dtype, seed)
    return _causal_lm_workload("llama", hf, n_train, n_test, seq_len, form, seed)


def falcon(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    dim: int = 64,
    layers: int = 2,
) -> RealWorkload:
    """Falcon causal LM (2 layers, 64 dims, 4 heads, multi-query attention, vocabulary 1000) on right-padded random
    tokens with their attention mask: its ``FalconLinear`` computes ``input @ self.weight.T`` itself, so every
    projection's weight is followed to its product with the batch."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=4, vocab_size=1000)
    hf = _hf_model(FalconForCausalLM, config, dtype, seed)
    return _causal_lm_workload("falcon", hf, n_train, n_test, seq_len, form, seed)


def mamba(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    dim: int = 64,
) -> RealWorkload:
    """Mamba causal LM (2 layers, ``dim`` dims, state 16, expansion 2, vocabulary 1000) on right-padded random tokens
    with their attention mask, through transformers' PyTorch path (no CUDA kernels): its mixer reads its depthwise
    convolution's and its time step projection's weights, ``A_log`` and ``D`` directly, each followed to the batch."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(hidden_size=dim, num_hidden_layers=2, vocab_size=1000, state_size=16, expand=2, conv_kernel=4)
    hf = _hf_model(MambaForCausalLM, config, dtype, seed)
    return _causal_lm_workload("mamba", hf, n_train, n_test, seq_len, form, seed)


def _causal_lm_workload(
    name: str, hf: nn.Module, n_train: int, n_test: int, seq_len: int, form: str, seed: int
) -> RealWorkload:
    """A causal LM's workload on right-padded random tokens with their attention mask (padding labelled -100)."""
    generator = torch.Generator().manual_seed(seed + 1)
    ids, pad = _right_padded(n_train + n_test, seq_len, hf.config.vocab_size, generator)
    data = {"input_ids": ids, "attention_mask": (~pad).long(), "labels": ids.masked_fill(pad, -100)}
    checkpoints = make_checkpoints(hf, seed + 2)
    return _hf_workload(name, hf, checkpoints, data, n_train, form, CausalLMLoss())


def vit(
    n_train: int = 200,
    n_test: int = 20,
    image_size: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """ViT image classifier (2 layers, 64 dims, 4 heads, 4 x 4 patches, 10 labels) on random images."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=image_size, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
    )  # fmt: skip
    hf = _hf_model(ViTForImageClassification, config, dtype, seed)
    return _image_classifier("vit", hf, n_train, n_test, image_size, form, dtype, seed)


def swin(
    n_train: int = 200,
    n_test: int = 20,
    image_size: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    embed: int = 32,
) -> RealWorkload:
    """Swin image classifier (2 stages of 2 blocks, ``embed`` then ``2 embed`` dims, 2 / 4 heads, 2 x 2 patches,
    windows of 4 x 4, every second block's shifted, 10 labels) on random images."""
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(
        image_size=image_size, patch_size=2, embed_dim=embed, depths=[2, 2], num_heads=[2, 4], window_size=4,
        num_labels=10,
    )  # fmt: skip
    hf = _hf_model(SwinForImageClassification, config, dtype, seed)
    return _image_classifier("swin", hf, n_train, n_test, image_size, form, dtype, seed)


def convnext(
    n_train: int = 200,
    n_test: int = 20,
    image_size: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """ConvNeXt image classifier (2 stages of 2 blocks, widths 32 / 64, 4 x 4 patches, 10 labels) on random images."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(num_channels=3, patch_size=4, hidden_sizes=[32, 64], depths=[2, 2], num_stages=2,
                            num_labels=10, image_size=image_size)  # fmt: skip
    hf = _hf_model(ConvNextForImageClassification, config, dtype, seed)
    return _image_classifier("convnext", hf, n_train, n_test, image_size, form, dtype, seed)


def wav2vec2(
    n_train: int = 200,
    n_test: int = 20,
    samples: int = 4000,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """wav2vec2 speech classifier (a 2-layer convolutional feature extractor, 2 transformer layers of 64 dims, 4 heads,
    a positional convolution under ``weight_norm``, 4 labels) on random waveforms of ``samples`` samples."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_labels=4, vocab_size=10,
    )  # fmt: skip
    hf = _hf_model(Wav2Vec2ForSequenceClassification, config, dtype, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    waves = torch.randn(n, samples, generator=generator, dtype=dtype)
    data = {"input_values": waves, "labels": torch.randint(0, 4, (n,), generator=generator)}
    checkpoints = make_checkpoints(hf, seed + 2)
    return _hf_workload("wav2vec2", hf, checkpoints, data, n_train, form, nn.CrossEntropyLoss())


def _image_classifier(
    name: str, hf: nn.Module, n_train: int, n_test: int, image_size: int, form: str, dtype: torch.dtype, seed: int
) -> RealWorkload:
    """A Hugging Face image classifier (10 labels) on random RGB images with random labels."""
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    images = torch.randn(n, 3, image_size, image_size, generator=generator, dtype=dtype)
    data = {"pixel_values": images, "labels": torch.randint(0, 10, (n,), generator=generator)}
    checkpoints = make_checkpoints(hf, seed + 2)
    return _hf_workload(name, hf, checkpoints, data, n_train, form, nn.CrossEntropyLoss())


def bart(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """BART encoder-decoder (2 + 2 layers, 64 dims, 4 heads, vocabulary 1000; the token table shared by both
    embeddings and the LM head) on right-padded source sequences with their ``attention_mask`` and right-padded
    targets of half their length (padding labelled -100), scored with its sequence-to-sequence LM loss."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=1000, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    hf = _hf_model(BartForConditionalGeneration, config, dtype, seed)
    return _seq2seq_workload("bart", hf, 3, n_train, n_test, seq_len, form, seed)  # ids 0-2: special tokens


def t5(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """T5 encoder-decoder (2 + 2 layers, 64 dims, 4 heads, vocabulary 1000, relative position biases computed once
    for the whole batch) on the data of ``bart``'s shape: right-padded sources with their ``attention_mask`` and
    right-padded targets of half their length (padding labelled -100), scored with its sequence-to-sequence LM loss."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=1000,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    hf = _hf_model(T5ForConditionalGeneration, config, dtype, seed)
    return _seq2seq_workload("t5", hf, 2, n_train, n_test, seq_len, form, seed)  # ids 0-1: padding, end of sequence


def _seq2seq_workload(
    name: str, hf: nn.Module, specials: int, n_train: int, n_test: int, seq_len: int, form: str, seed: int
) -> RealWorkload:
    """An encoder-decoder's workload: right-padded sources (ids above its ``specials`` special tokens, padded with its
    pad token) with their ``attention_mask``, right-padded targets of half their length (padding labelled -100)."""
    generator = torch.Generator().manual_seed(seed + 1)
    n, vocab = n_train + n_test, hf.config.vocab_size - specials
    ids, pad = _right_padded(n, seq_len, vocab, generator)
    target, target_pad = _right_padded(n, seq_len // 2, vocab, generator)
    ids = (ids + specials).masked_fill(pad, hf.config.pad_token_id)
    labels = (target + specials).masked_fill(target_pad, -100)
    data = {"input_ids": ids, "attention_mask": (~pad).long(), "labels": labels}
    if form == "criterion":  # a logits criterion gets no labels: the decoder's inputs as the model makes them
        data = {**data, "decoder_input_ids": hf.prepare_decoder_input_ids_from_labels(labels)}
        data["labels"] = data.pop("labels")
    return _hf_workload(name, hf, make_checkpoints(hf, seed + 2), data, n_train, form, Seq2SeqLMLoss())


_BERT_SIZES = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=1000)


def bert(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """BERT sequence classifier (2 layers, 64 dims, 4 heads, 4 labels) on right-padded random tokens."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        **_BERT_SIZES,
        num_labels=4,
        problem_type="single_label_classification",  # else transformers sets it on the first call
    )
    hf = _hf_model(BertForSequenceClassification, config, dtype, seed)
    return _classifier_workload("bert", hf, n_train, n_test, seq_len, form, seed)


def bert_mlm(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """BERT masked LM (the classifier's sizes) on right-padded random tokens, 15% of the real ones its targets
    (labels -100 elsewhere); its output projection tied to the token table, its bias to the head's."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(**_BERT_SIZES)
    hf = _hf_model(BertForMaskedLM, config, dtype, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    ids, pad = _right_padded(n_train + n_test, seq_len, config.vocab_size, generator)
    targets = (torch.rand(ids.shape, generator=generator) < 0.15) & ~pad
    data = {"input_ids": ids, "attention_mask": (~pad).long(), "labels": ids.masked_fill(~targets, -100)}
    checkpoints = make_checkpoints(hf, seed + 2)
    return _hf_workload("bert_mlm", hf, checkpoints, data, n_train, form, Seq2SeqLMLoss())


def deberta(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    form: str = "batch_loss",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    dim: int = 64,
    buckets: int = 16,
) -> RealWorkload:
    """DeBERTa-v3 sequence classifier (2 layers, 64 dims, 4 heads, 4 labels) on right-padded random tokens, with
    v3's disentangled attention: relative positions in ``buckets`` buckets each way, their embeddings normalised and
    projected by the tokens' own query and key layers (``share_att_key``), no absolute positions."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(
        num_hidden_layers=2, hidden_size=dim, num_attention_heads=4, intermediate_size=2 * dim, vocab_size=1000,
        num_labels=4, problem_type="single_label_classification", relative_attention=True, position_buckets=buckets,
        max_relative_positions=2 * buckets, pos_att_type=["p2c", "c2p"], share_att_key=True,
        norm_rel_ebd="layer_norm", position_biased_input=False,
    )  # fmt: skip
    hf = _hf_model(DebertaV2ForSequenceClassification, config, dtype, seed)
    return _classifier_workload("deberta", hf, n_train, n_test, seq_len, form, seed)


def _classifier_workload(
    name: str, hf: nn.Module, n_train: int, n_test: int, seq_len: int, form: str, seed: int
) -> RealWorkload:
    """A sequence classifier's workload on right-padded random tokens with their attention mask."""
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    mask = (torch.arange(seq_len) < _lengths(n, seq_len, generator)[:, None]).long()
    ids = torch.randint(1, hf.config.vocab_size, (n, seq_len), generator=generator) * mask
    labels = torch.randint(0, hf.config.num_labels, (n,), generator=generator)
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    checkpoints = make_checkpoints(hf, seed + 2)
    return _hf_workload(name, hf, checkpoints, data, n_train, form, nn.CrossEntropyLoss())


def _hf_model(model_class: type, config: Any, dtype: torch.dtype, seed: int, attention: str = "eager") -> nn.Module:
    """A Hugging Face model with seeded random weights, in eval mode; ``attention``: eager (the same ops in every
    run), or ``"sdpa"`` (transformers' default where a model supports it)."""
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return model_class(config).to(dtype).eval()


def _hf_workload(
    name: str,
    hf: nn.Module,
    checkpoints: list[tc.Checkpoint],
    data: dict[str, torch.Tensor],
    n_train: int,
    form: str,
    criterion: nn.Module,
) -> RealWorkload:
    train, test = _split(data, n_train)
    if form == "batch_loss":
        causal, seq2seq = tc.causal_lm_loss, tc.seq2seq_lm_loss
        losses = {"gpt2": causal, "llama": causal, "falcon": causal, "mamba": causal, "bart": seq2seq, "t5": seq2seq,
                  "bert_mlm": tc.token_classification_loss}  # fmt: skip
        loss = losses.get(name, tc.sequence_classification_loss)(hf)

        def summed(state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
            return loss.fn(state, batch).sum()

        return RealWorkload(name, hf, checkpoints, train, test, loss, summed, None, form)
    if form == "example_loss":

        def batch_loss(state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
            # HF's batch loss is a mean over the batch's tokens / examples; the floor only needs its cost
            return functional_call(hf, state, (), dict(batch)).loss * num_examples(batch)

        return RealWorkload(name, hf, checkpoints, train, test, _hf_example_loss(hf), batch_loss, None, form)
    if form != "criterion":
        raise ValueError(f"`form` must be 'batch_loss', 'example_loss' or 'criterion', got {form!r}.")
    names = [k for k in data if k != "labels"]
    model = LogitsOnly(hf, names).eval()

    def as_tuple(d: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return (*(d[k] for k in names), d["labels"])

    captum_loss = type(criterion)(reduction="none")
    return RealWorkload(
        name,
        model,
        _prefixed(checkpoints, "hf."),
        as_tuple(train),
        as_tuple(test),
        criterion,
        _criterion_batch_loss(model, captum_loss),
        captum_loss,
        form,
    )


# ------------------------------------------------------------------------------------------------------ ResNet-18


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block (3x3, 3x3) with BatchNorm; a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]; channels ``width * (1, 2, 4, 8)``, 64-512 by default) with the CIFAR
    stem (3x3 conv, stride 1, no max-pool), global average pooling and a Linear classifier."""

    def __init__(self, n_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, c_in = [], width
        for i, blocks in enumerate((2, 2, 2, 2)):
            c_out = width * 2**i
            stage = [BasicBlock(c_in, c_out, 1 if i == 0 else 2)]
            stage += [BasicBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(c_in, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(
    n_train: int = 200,
    n_test: int = 20,
    image_size: int = 32,
    *,
    width: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """ResNet-18 on random ``3 x image_size x image_size`` images, 10 classes."""
    torch.manual_seed(seed)
    model = ResNet18(10, width).to(dtype).eval()
    return _image_workload("resnet18", model, n_train, n_test, image_size, dtype, seed)


def _image_workload(
    name: str, model: nn.Module, n_train: int, n_test: int, image_size: int, dtype: torch.dtype, seed: int
) -> RealWorkload:
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    x = torch.randn(n, 3, image_size, image_size, generator=generator, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=generator)
    return _classified(name, model, x, y, n_train, seed)


def _classified(
    name: str, model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor, n_train: int, seed: int
) -> RealWorkload:
    """A classifier's workload: the first ``n_train`` of ``(*x, y)`` to train on, the rest to test, cross-entropy."""
    data = (*(x if isinstance(x, tuple) else (x,)), y)
    return RealWorkload(
        name,
        model,
        make_checkpoints(model, seed + 2),
        tuple(t[:n_train] for t in data),
        tuple(t[n_train:] for t in data),
        nn.CrossEntropyLoss(),
        _criterion_batch_loss(model, nn.CrossEntropyLoss(reduction="none")),
        nn.CrossEntropyLoss(reduction="none"),
    )


# ------------------------------------------------------------------------------------------------ MobileNetV3-small


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never down by more than 10%."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int, act: type[nn.Module] | None):
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out, eps=0.001, momentum=0.01),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Squeeze-excitation: global average pool, 1x1 conv, ReLU, 1x1 conv, hardsigmoid, channel scaling."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.relu = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.scale_activation(self.fc2(self.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expansion (skipped when not expanding), depthwise k x k conv (groups = channels), SE,
    1x1 linear projection; a residual connection when stride 1 and the channels match."""

    def __init__(self, c_in: int, kernel: int, expanded: int, c_out: int, se: bool, act: str, stride: int) -> None:
        super().__init__()
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(_conv_bn(c_in, expanded, 1, 1, 1, activation))
        layers.append(_conv_bn(expanded, expanded, kernel, stride, expanded, activation))
        if se:
            layers.append(SqueezeExcitation(expanded, _divisible(expanded // 4)))
        layers.append(_conv_bn(expanded, c_out, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# torchvision's mobilenet_v3_small table: input, kernel, expanded, output, SE, activation, stride
MOBILENET_V3_SMALL = (
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
)


class MobileNetV3Small(nn.Module):
    """MobileNetV3-small (torchvision's block table, last conv 576 channels, classifier 576-1024-classes with
    hardswish and dropout) with a stride-1 stem for 32x32 inputs. ``width`` scales every channel count."""

    def __init__(self, n_classes: int = 10, width: float = 1.0, stem_stride: int = 1) -> None:
        super().__init__()

        def c(v: int) -> int:
            return _divisible(v * width)

        layers: list[nn.Module] = [_conv_bn(3, c(16), 3, stem_stride, 1, nn.Hardswish)]
        for c_in, k, e, c_out, se, act, s in MOBILENET_V3_SMALL:
            layers.append(InvertedResidual(c(c_in), k, c(e), c(c_out), se, act, s))
        last = c(576)
        layers.append(_conv_bn(c(96), last, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        hidden = c(1024)
        self.classifier = nn.Sequential(
            nn.Linear(last, hidden), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(hidden, n_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet(
    n_train: int = 200,
    n_test: int = 20,
    image_size: int = 32,
    *,
    width: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """MobileNetV3-small-style net on random ``3 x image_size x image_size`` images, 10 classes."""
    torch.manual_seed(seed)
    model = MobileNetV3Small(10, width).to(dtype).eval()
    return _image_workload("mobilenet", model, n_train, n_test, image_size, dtype, seed)


# ----------------------------------------------------------------------------------------------------------- LSTM


class LSTMClassifier(nn.Module):
    """Embedding -> recurrent layer (batch_first) -> Linear on the last time step's hidden state. ``layer``:
    ``"lstm"`` (``nn.LSTM``), ``"rnn"`` (a vanilla tanh ``nn.RNN``) or ``"lstm_cell"`` (``nn.LSTMCell`` stepped by
    this model's own loop, as research code writes it)."""

    def __init__(self, vocab: int = 1000, dim: int = 64, n_classes: int = 4, layer: str = "lstm") -> None:
        super().__init__()
        self.layer = layer
        self.embedding = nn.Embedding(vocab, dim)
        kinds = {"lstm": nn.LSTM, "rnn": nn.RNN, "lstm_cell": nn.LSTMCell}
        self.lstm = kinds[layer](dim, dim) if layer == "lstm_cell" else kinds[layer](dim, dim, batch_first=True)
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding(tokens)
        if lengths is not None:  # the padding skipped: each example's last state is at its own end
            _, (h, _) = self.lstm(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False))
            return self.fc(h[-1])
        if self.layer == "lstm_cell":
            state = None
            for t in range(x.shape[1]):
                state = self.lstm(x[:, t], state)
            return self.fc(state[0])
        _, h = self.lstm(x)
        return self.fc((h[0] if self.layer == "lstm" else h)[-1])


def lstm(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    layer: str = "lstm",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """Recurrent classifier (:class:`LSTMClassifier` with ``layer``) on random token sequences, 4 classes."""
    torch.manual_seed(seed)
    model = LSTMClassifier(layer=layer).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    x = torch.randint(0, 1000, (n, seq_len), generator=generator)
    y = torch.randint(0, 4, (n,), generator=generator)
    return _classified(layer, model, x, y, n_train, seed)


def packed_lstm(
    n_train: int = 200, n_test: int = 20, seq_len: int = 32, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> RealWorkload:
    """:func:`lstm` on sequences of lengths ``seq_len / 4 .. seq_len``, padded, packed by the model
    (``pack_padded_sequence``) so that the LSTM skips the padding."""
    torch.manual_seed(seed)
    model = LSTMClassifier().to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    lengths = torch.randint(seq_len // 4, seq_len + 1, (n,), generator=generator)
    x = torch.randint(1, 1000, (n, seq_len), generator=generator) * (torch.arange(seq_len) < lengths[:, None])
    y = torch.randint(0, 4, (n,), generator=generator)
    return _classified("packed_lstm", model, (x, lengths), y, n_train, seed)


def rnn(n_train: int = 200, n_test: int = 20, seq_len: int = 32, **kw: Any) -> RealWorkload:
    """:func:`lstm` with a vanilla ``nn.RNN``."""
    return lstm(n_train, n_test, seq_len, layer="rnn", **kw)


def lstm_cell(n_train: int = 200, n_test: int = 20, seq_len: int = 32, **kw: Any) -> RealWorkload:
    """:func:`lstm` with an ``nn.LSTMCell`` stepped by the model's own loop."""
    return lstm(n_train, n_test, seq_len, layer="lstm_cell", **kw)


# ------------------------------------------------------------------------------------------------- EmbeddingBag


class BagClassifier(nn.Module):
    """PyTorch's text classification tutorial model: EmbeddingBag (mean of a bag of token ids) -> Linear."""

    def __init__(self, vocab: int = 20_000, dim: int = 64, n_classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab, dim, mode="mean", padding_idx=0)
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(tokens))


def bag(
    n_train: int = 200,
    n_test: int = 20,
    seq_len: int = 32,
    *,
    vocab: int = 20_000,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealWorkload:
    """EmbeddingBag classifier on random bags of token ids (the last quarter of each padding), 4 classes."""
    torch.manual_seed(seed)
    model = BagClassifier(vocab).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    n = n_train + n_test
    x = torch.randint(1, vocab, (n, seq_len), generator=generator)
    x[:, seq_len - seq_len // 4 :] = 0
    y = torch.randint(0, 4, (n,), generator=generator)
    return _classified("bag", model, x, y, n_train, seed)


BUILDERS: dict[str, Callable[..., RealWorkload]] = {
    "gpt2": gpt2,
    "gpt2_cls": gpt2_classifier,
    "bert": bert,
    "bert_mlm": bert_mlm,
    "deberta": deberta,
    "bart": bart,
    "t5": t5,
    "llama": llama,
    "falcon": falcon,
    "mamba": mamba,
    "vit": vit,
    "swin": swin,
    "convnext": convnext,
    "wav2vec2": wav2vec2,
    "resnet18": resnet18,
    "mobilenet": mobilenet,
    "lstm": lstm,
    "packed_lstm": packed_lstm,
    "rnn": rnn,
    "lstm_cell": lstm_cell,
    "bag": bag,
}


if __name__ == "__main__":
    for build in BUILDERS.values():
        print(build().describe())
