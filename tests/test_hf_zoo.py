"""Hugging Face architectures beyond the benchmark's (``tests/test_real_models.py``), tried as a new user would: each
built from a small config with random weights (nothing downloaded), scored on dict batches with the library's
Hugging Face losses, exact against the one-backward-per-example reference, with the call's batching pinned: fully
batched, or the reason ``tc.explain`` gives for leaving the batched path.

6 train x 3 test examples of 8 tokens (16 x 16 images), 3 checkpoints, float64; the mixture-of-experts models run
in float32 against a float32 loop (their grouped matmul has no float64 kernel on the CPU), and so do the state-space
models whose scan casts to float32 (Mamba2, Bamba, Zamba2).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import tracin_func as tc
from benchmarks import real_models as rm
from tests.conftest import assert_close
from tests.reference import reference_scores, with_formula_norms

T = pytest.importorskip("transformers")
F64 = torch.float64
N_TRAIN, SEQ = 6, 8
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
BATCHED = "one batched forward / backward gives every layer's factors"

Built = tuple[torch.nn.Module, dict[str, torch.Tensor], tc.BatchLoss]


def _model(model_cls: type, config: Any, dtype: torch.dtype, attention: str = "eager") -> torch.nn.Module:
    return rm._hf_model(model_cls, config, dtype, seed=0, attention=attention)


def classifier(config_cls: type, model_cls: type, dtype: torch.dtype = F64, **sizes: Any) -> Built:
    model = _model(model_cls, config_cls(num_labels=3, **sizes), dtype)
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(SEQ) < rm._lengths(N_TRAIN + 3, SEQ, g)[:, None]).long()
    ids = torch.randint(3, 100, (N_TRAIN + 3, SEQ), generator=g) * mask
    data = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (N_TRAIN + 3,), generator=g)}
    return model, data, tc.sequence_classification_loss(model)


def causal_lm(config_cls: type, model_cls: type, dtype: torch.dtype = F64, **sizes: Any) -> Built:
    model = _model(model_cls, config_cls(**sizes), dtype)
    ids, pad = rm._right_padded(N_TRAIN + 3, SEQ, 100, torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "attention_mask": (~pad).long(), "labels": ids.masked_fill(pad, -100)}
    return model, data, tc.causal_lm_loss(model)


def seq2seq(
    config_cls: type, model_cls: type, dtype: torch.dtype = F64, attention: str = "eager", **sizes: Any
) -> Built:
    model = _model(model_cls, config_cls(**sizes), dtype, attention)
    g = torch.Generator().manual_seed(1)
    ids, pad = rm._right_padded(N_TRAIN + 3, SEQ, 97, g)
    target, target_pad = rm._right_padded(N_TRAIN + 3, SEQ // 2, 97, g)
    data = {"input_ids": (ids + 3).masked_fill(pad, 1), "attention_mask": (~pad).long(),
            "labels": (target + 3).masked_fill(target_pad, -100)}  # fmt: skip
    return model, data, tc.seq2seq_lm_loss(model)


def speech_to_text(**sizes: Any) -> Built:
    """Whisper on log-mel features (8 bins, 20 frames), its target tokens right-padded."""
    config = T.WhisperConfig(num_mel_bins=8, max_source_positions=10, max_target_positions=20, vocab_size=100,
                             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                             suppress_tokens=None, begin_suppress_tokens=None, **sizes)  # fmt: skip
    model = _model(T.WhisperForConditionalGeneration, config, F64)
    g = torch.Generator().manual_seed(1)
    target, target_pad = rm._right_padded(N_TRAIN + 3, SEQ // 2, 97, g)
    data = {"input_features": torch.randn(N_TRAIN + 3, 8, 20, generator=g, dtype=F64),
            "labels": (target + 3).masked_fill(target_pad, -100)}  # fmt: skip
    return model, data, tc.seq2seq_lm_loss(model)


def multiple_choice(config_cls: type, model_cls: type, choices: int = 3, **sizes: Any) -> Built:
    """``[B, choices, T]`` inputs, which the model folds into its batch (``[B choices, T]``), and a label each."""
    model = _model(model_cls, config_cls(**sizes), F64)
    g, n = torch.Generator().manual_seed(1), N_TRAIN + 3
    mask = (torch.arange(SEQ) < torch.randint(3, SEQ + 1, (n, choices, 1), generator=g)).long()
    data = {"input_ids": torch.randint(3, 100, (n, choices, SEQ), generator=g) * mask, "attention_mask": mask,
            "labels": torch.randint(0, choices, (n,), generator=g)}  # fmt: skip
    return model, data, tc.sequence_classification_loss(model)


def masked_lm(config_cls: type, model_cls: type, **sizes: Any) -> Built:
    """Every third token a target (labels -100 elsewhere and at padding); the output projection tied to the token
    table, its bias to the head's."""
    model = _model(model_cls, config_cls(**sizes), F64)
    ids, pad = rm._right_padded(N_TRAIN + 3, SEQ, 100, torch.Generator().manual_seed(1))
    targets = (torch.arange(SEQ) % 3 == 0) & ~pad
    data = {"input_ids": ids, "attention_mask": (~pad).long(), "labels": ids.masked_fill(~targets, -100)}
    return model, data, tc.token_classification_loss(model)


def image(config_cls: type, model_cls: type, size: int = 16, dtype: torch.dtype = F64, **sizes: Any) -> Built:
    model = _model(model_cls, config_cls(num_labels=3, **sizes), dtype)
    g = torch.Generator().manual_seed(1)
    data = {"pixel_values": torch.randn(N_TRAIN + 3, 3, size, size, generator=g, dtype=dtype),
            "labels": torch.randint(0, 3, (N_TRAIN + 3,), generator=g)}  # fmt: skip
    return model, data, tc.sequence_classification_loss(model)


class PooledByProbe(torch.nn.Module):
    """SigLIP's vision tower pooled by its attention head (a learned probe ``[1, 1, d]`` brought to the batch by
    ``repeat(B, 1, 1)``), then a Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        config = T.SiglipVisionConfig(image_size=16, patch_size=4, vision_use_head=True, **VIT)
        self.vision, self.fc = _model(T.SiglipVisionModel, config, F64), torch.nn.Linear(32, 3, dtype=F64)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(self.vision(pixel_values=pixel_values).pooler_output)


def pooled_by_probe() -> Built:
    model = PooledByProbe().eval()
    g = torch.Generator().manual_seed(1)
    data = {"pixel_values": torch.randn(N_TRAIN + 3, 3, 16, 16, generator=g, dtype=F64),
            "labels": torch.randint(0, 3, (N_TRAIN + 3,), generator=g)}  # fmt: skip
    return model, data, tc.sequence_classification_loss(model)


def video(config_cls: type, model_cls: type, **sizes: Any) -> Built:
    """A video classifier on clips of 2 frames of 16 x 16."""
    model = _model(model_cls, config_cls(num_labels=3, image_size=16, num_frames=2, **sizes), F64)
    g = torch.Generator().manual_seed(1)
    data = {"pixel_values": torch.randn(N_TRAIN + 3, 2, 3, 16, 16, generator=g, dtype=F64),
            "labels": torch.randint(0, 3, (N_TRAIN + 3,), generator=g)}  # fmt: skip
    return model, data, tc.sequence_classification_loss(model)


def audio(config_cls: type, model_cls: type, **sizes: Any) -> Built:
    """A sequence classifier on raw waveforms (400 samples)."""
    model = _model(model_cls, config_cls(num_labels=3, **sizes), F64)
    g, n = torch.Generator().manual_seed(1), N_TRAIN + 3
    waves, labels = torch.randn(n, 400, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)
    data = {"input_values": waves, "labels": labels}
    return model, data, tc.sequence_classification_loss(model)


# wav2vec2-style speech encoders: a convolutional feature extractor, then a positional convolution under weight_norm
SPEECH = dict(conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8,
              num_conv_pos_embedding_groups=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, vocab_size=10)  # fmt: skip
KV = dict(num_key_value_heads=2, max_position_embeddings=40)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
MAMBA = dict(hidden_size=32, num_hidden_layers=2, vocab_size=100, expand=2)
# name -> (builder, BATCHED or the reason `tc.explain` gives for leaving the batched path)
ZOO: dict[str, tuple[Callable[[], Built], str]] = {
    "roberta": (lambda: classifier(T.RobertaConfig, T.RobertaForSequenceClassification, pad_token_id=1,
                                   max_position_embeddings=40, **SMALL), BATCHED),  # fmt: skip
    "distilbert": (lambda: classifier(T.DistilBertConfig, T.DistilBertForSequenceClassification, dim=32, n_layers=2,
                                      n_heads=4, hidden_dim=64, vocab_size=100), BATCHED),  # fmt: skip
    "albert": (lambda: classifier(T.AlbertConfig, T.AlbertForSequenceClassification, embedding_size=16, **SMALL),
               BATCHED),  # fmt: skip  (one layer's weights shared by every layer: its calls concatenated)
    "electra": (lambda: classifier(T.ElectraConfig, T.ElectraForSequenceClassification, embedding_size=16, **SMALL),
                BATCHED),  # fmt: skip
    "convbert": (lambda: classifier(T.ConvBertConfig, T.ConvBertForSequenceClassification, **SMALL),
                 BATCHED),  # fmt: skip  (its separable convolutions' own bias [C, 1]: expanded copies)
    "mpnet": (lambda: classifier(T.MPNetConfig, T.MPNetForSequenceClassification, **SMALL),
              BATCHED),  # fmt: skip  (its relative position bias, like T5's)
    "esm": (lambda: classifier(T.EsmConfig, T.EsmForSequenceClassification, pad_token_id=1, max_position_embeddings=40,
                               **SMALL), BATCHED),  # fmt: skip  (protein language model)
    "longformer": (  # its attention's projections are fed sequence-first ([T, B, d]), and it scales queries with /=
        lambda: classifier(T.LongformerConfig, T.LongformerForSequenceClassification, attention_window=4,
                           pad_token_id=1, max_position_embeddings=40, **SMALL), BATCHED),  # fmt: skip
    "deberta_v2": (lambda: classifier(T.DebertaV2Config, T.DebertaV2ForSequenceClassification, **SMALL), BATCHED),
    "deberta_v2_relative": (  # its relative embeddings' table, read directly, through its own projections per head
        lambda: classifier(T.DebertaV2Config, T.DebertaV2ForSequenceClassification, relative_attention=True,
                           position_buckets=4, max_relative_positions=8, pos_att_type=["p2c", "c2p"], **SMALL),
        BATCHED),  # fmt: skip  (tiled over the batch, `.repeat(B, 1, 1)`: followed to its products with the batch)
    "deberta_v3": (  # DeBERTa-v3's configuration: the relative embeddings, normalised, through the content's own query
        lambda: classifier(T.DebertaV2Config, T.DebertaV2ForSequenceClassification, relative_attention=True,
                           position_buckets=4, max_relative_positions=8, pos_att_type=["p2c", "c2p"],
                           share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, **SMALL),
        BATCHED),  # fmt: skip  (and key projections: those layers run both for the batch and once for the whole batch)
    # their heads hold the decoder's bias too (tied), and use it only through the decoder
    "bert_mlm": (lambda: masked_lm(T.BertConfig, T.BertForMaskedLM, **SMALL), BATCHED),
    "roberta_mlm": (lambda: masked_lm(T.RobertaConfig, T.RobertaForMaskedLM, pad_token_id=1, **SMALL), BATCHED),
    "bert_multiple_choice": (  # [B, C, T] folded into [B C, T]: its [1, T] position row gets a row per row of that
        lambda: multiple_choice(T.BertConfig, T.BertForMultipleChoice, **SMALL), BATCHED),  # fmt: skip
    "gpt_neo": (lambda: causal_lm(T.GPTNeoConfig, T.GPTNeoForCausalLM, hidden_size=32, num_layers=2, num_heads=4,
                                  vocab_size=100, attention_types=[[["global", "local"], 1]],
                                  max_position_embeddings=40, bos_token_id=0, eos_token_id=0), BATCHED),  # fmt: skip
    "gptj": (lambda: causal_lm(T.GPTJConfig, T.GPTJForCausalLM, n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                               rotary_dim=4, n_positions=40, bos_token_id=0, eos_token_id=0), BATCHED),  # fmt: skip
    "gpt_neox": (lambda: causal_lm(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, max_position_embeddings=40, **SMALL),
                 BATCHED),  # fmt: skip
    "gpt_bigcode": (lambda: causal_lm(T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, n_embd=32, n_layer=2, n_head=4,
                                      vocab_size=100, n_positions=40, bos_token_id=0, eos_token_id=0),
                    BATCHED),  # fmt: skip
    "codegen": (lambda: causal_lm(T.CodeGenConfig, T.CodeGenForCausalLM, n_embd=32, n_layer=2, n_head=4,
                                  vocab_size=100, rotary_dim=4, n_positions=40, bos_token_id=0, eos_token_id=0),
                BATCHED),  # fmt: skip
    "opt": (lambda: causal_lm(T.OPTConfig, T.OPTForCausalLM, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, ffn_dim=64, vocab_size=100, word_embed_proj_dim=32,
                              max_position_embeddings=40, pad_token_id=1), BATCHED),  # fmt: skip
    "bloom": (lambda: causal_lm(T.BloomConfig, T.BloomForCausalLM, hidden_size=32, n_layer=2, n_head=4,
                                vocab_size=100), BATCHED),  # fmt: skip
    "phi": (lambda: causal_lm(T.PhiConfig, T.PhiForCausalLM, max_position_embeddings=40, **SMALL), BATCHED),
    "qwen2": (lambda: causal_lm(T.Qwen2Config, T.Qwen2ForCausalLM, **KV, **SMALL), BATCHED),
    "mistral": (lambda: causal_lm(T.MistralConfig, T.MistralForCausalLM, **KV, **SMALL), BATCHED),
    "gemma2": (lambda: causal_lm(T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=8, **KV, **SMALL), BATCHED),
    "phi3": (lambda: causal_lm(T.Phi3Config, T.Phi3ForCausalLM, pad_token_id=0, **KV, **SMALL), BATCHED),
    "qwen3": (lambda: causal_lm(T.Qwen3Config, T.Qwen3ForCausalLM, head_dim=8, **KV, **SMALL), BATCHED),
    "gemma": (lambda: causal_lm(T.GemmaConfig, T.GemmaForCausalLM, head_dim=8, **KV, **SMALL), BATCHED),
    "stablelm": (lambda: causal_lm(T.StableLmConfig, T.StableLmForCausalLM, **KV, **SMALL), BATCHED),
    "olmo": (lambda: causal_lm(T.OlmoConfig, T.OlmoForCausalLM, **KV, **SMALL), BATCHED),
    "falcon": (  # FalconLinear overrides nn.Linear's forward (`input @ self.weight.T`): not provably a Linear; its
        lambda: causal_lm(T.FalconConfig, T.FalconForCausalLM, hidden_size=32, num_hidden_layers=2,  # weights are
                          num_attention_heads=4, vocab_size=100),  # followed to their products with the batch
        BATCHED),  # fmt: skip
    "bart": (lambda: seq2seq(T.BartConfig, T.BartForConditionalGeneration, d_model=32, encoder_layers=1,
                             decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                             encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=40,
                             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
             BATCHED),  # fmt: skip
    "blenderbot": (  # no `prepare_decoder_input_ids_from_labels` (its forward shifts the labels itself): the loss
        lambda: seq2seq(T.BlenderbotConfig, T.BlenderbotForConditionalGeneration, d_model=32, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=40, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),  # shifts them as the config says
        BATCHED),  # fmt: skip
    "t5": (lambda: seq2seq(T.T5Config, T.T5ForConditionalGeneration, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                           num_heads=4, vocab_size=100, decoder_start_token_id=0, pad_token_id=1),
           BATCHED),  # fmt: skip  (its relative position biases run once for the whole batch: followed to the batch)
    "t5_sdpa": (  # transformers' default attention: the biases meet the padding mask in a `where`, then SDPA's mask
        lambda: seq2seq(T.T5Config, T.T5ForConditionalGeneration, attention="sdpa", d_model=32, d_kv=8, d_ff=64,
                        num_layers=2, num_heads=4, vocab_size=100, decoder_start_token_id=0, pad_token_id=1),
        BATCHED),  # fmt: skip
    "wav2vec2": (  # its positional convolution's weight_norm: the weight followed through the parametrization
        lambda: audio(T.Wav2Vec2Config, T.Wav2Vec2ForSequenceClassification, **SPEECH), BATCHED),  # fmt: skip
    "hubert": (lambda: audio(T.HubertConfig, T.HubertForSequenceClassification, **SPEECH), BATCHED),  # fmt: skip
    "resnet": (lambda: image(T.ResNetConfig, T.ResNetForImageClassification, embedding_size=8, hidden_sizes=[8, 16],
                             depths=[1, 1]), BATCHED),  # fmt: skip
    "mobilevit": (lambda: image(T.MobileViTConfig, T.MobileViTForImageClassification, size=32, image_size=32,
                                hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16]),
                  BATCHED),  # fmt: skip
    "convnext": (lambda: image(T.ConvNextConfig, T.ConvNextForImageClassification, hidden_sizes=[8, 16], depths=[1, 1],
                               num_stages=2), BATCHED),  # fmt: skip  (its LayerNorms: at their F.layer_norm calls)
    "convnextv2": (lambda: image(T.ConvNextV2Config, T.ConvNextV2ForImageClassification, hidden_sizes=[8, 16],
                                 depths=[1, 1], num_stages=2), BATCHED),  # fmt: skip
    "beit": (lambda: image(T.BeitConfig, T.BeitForImageClassification, image_size=16, patch_size=4, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           use_relative_position_bias=True),
             BATCHED),  # fmt: skip  (its relative position tables and layer scales, read directly: followed)
    "poolformer": (lambda: image(T.PoolFormerConfig, T.PoolFormerForImageClassification, hidden_sizes=[8, 16],
                                 depths=[1, 1], num_encoder_blocks=2, patch_sizes=[3, 3], strides=[2, 2],
                                 padding=[1, 1], pool_size=3, mlp_ratio=2.0),
                   BATCHED),  # fmt: skip  (its layer scales, in blocks returning tuples: followed)
    "dinov2": (lambda: image(T.Dinov2Config, T.Dinov2ForImageClassification, image_size=16, patch_size=4,
                             hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2),
               BATCHED),  # fmt: skip
    "segformer": (lambda: image(T.SegformerConfig, T.SegformerForImageClassification, num_encoder_blocks=2,
                                depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                                patch_sizes=[3, 3], strides=[2, 2], mlp_ratios=[2, 2]), BATCHED),  # fmt: skip
    "xlnet": (lambda: classifier(T.XLNetConfig, T.XLNetForSequenceClassification, d_model=32, n_layer=2, n_head=4,
                                 d_inner=64, vocab_size=100),
              "XLNetRelativeAttention has no factored form"),  # fmt: skip  (its projections are raw einsum weights)
    "funnel": (lambda: classifier(T.FunnelConfig, T.FunnelForSequenceClassification, block_sizes=[1, 1], d_model=32,
                                  n_head=4, d_head=8, d_inner=64, vocab_size=100),
               BATCHED),  # fmt: skip  (its relative attention's raw kernels and biases, in einsums: followed)
    "siglip_pooled": (pooled_by_probe, BATCHED),  # (its probe's copies, one per example, not repeated again)
    "swin": (lambda: image(T.SwinConfig, T.SwinForImageClassification, image_size=16, patch_size=2, embed_dim=8,
                           depths=[1, 1], num_heads=[2, 2], window_size=4),
             BATCHED),  # fmt: skip  (its relative position tables, read directly: followed to the batch)
    "swin_shifted": (lambda: image(T.SwinConfig, T.SwinForImageClassification, image_size=16, patch_size=2,
                                   embed_dim=8, depths=[2], num_heads=[2], window_size=4),
                     BATCHED),  # fmt: skip  (the shifted windows' mask per window, tiled per image, plus the table)
    "falcon_mamba": (lambda: causal_lm(T.FalconMambaConfig, T.FalconMambaForCausalLM, state_size=4, conv_kernel=4,
                                       **MAMBA), BATCHED),  # fmt: skip  (its mixer's parameters, read directly)
    "videomae": (lambda: video(T.VideoMAEConfig, T.VideoMAEForVideoClassification, patch_size=4, tubelet_size=2,
                               **VIT), BATCHED),  # fmt: skip  (its tubelets' Conv3d, no site: followed into F.conv3d)
    "vivit": (lambda: video(T.VivitConfig, T.VivitForVideoClassification, tubelet_size=[2, 4, 4], **VIT),
              BATCHED),  # fmt: skip
    "whisper": (lambda: speech_to_text(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64),
                BATCHED),  # fmt: skip  (its position table picked by positions copied over the batch: followed)
    "jamba": (lambda: causal_lm(T.JambaConfig, T.JambaForCausalLM, num_experts=1, attn_layer_period=2,
                                attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=4, use_mamba_kernels=False, **KV,
                                **SMALL), BATCHED),  # fmt: skip  (attention and Mamba layers, one expert)
}


def without_mask(build: Callable[[], Built]) -> Callable[[], Built]:
    """``build``'s examples without their padding mask, every token real."""

    def built() -> Built:
        model, data, loss = build()
        return model, {**{k: v for k, v in data.items() if k != "attention_mask"},
                       "input_ids": data["input_ids"].clamp(min=3)}, loss  # fmt: skip

    return built


# more of the commonly used architectures, from a survey of 52 beyond the above (2026-12-06: 42 batched and exact; of
# those not batched, Nystromformer's landmarks are a true interaction, pinned here)
BART_SIZES = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=40, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)  # fmt: skip
ZOO.update({
    "llama": (lambda: causal_lm(T.LlamaConfig, T.LlamaForCausalLM, **KV, **SMALL), BATCHED),
    "vit": (lambda: image(T.ViTConfig, T.ViTForImageClassification, image_size=16, patch_size=4, **VIT), BATCHED),
    "deit": (lambda: image(T.DeiTConfig, T.DeiTForImageClassification, image_size=16, patch_size=4, **VIT), BATCHED),
    "clip_vision": (lambda: image(T.CLIPConfig, T.CLIPForImageClassification, text_config=dict(
        max_position_embeddings=40, **SMALL), vision_config=dict(image_size=16, patch_size=4, **VIT)), BATCHED),
    "pegasus": (lambda: seq2seq(T.PegasusConfig, T.PegasusForConditionalGeneration, **BART_SIZES), BATCHED),
    "marian": (lambda: seq2seq(T.MarianConfig, T.MarianMTModel, **{**BART_SIZES, "decoder_start_token_id": 1}),
               BATCHED),  # fmt: skip
    "mbart": (lambda: seq2seq(T.MBartConfig, T.MBartForConditionalGeneration, **BART_SIZES), BATCHED),
    "xlm_roberta": (lambda: classifier(T.XLMRobertaConfig, T.XLMRobertaForSequenceClassification, pad_token_id=1,
                                       max_position_embeddings=40, **SMALL), BATCHED),  # fmt: skip
    "mobilebert": (lambda: classifier(T.MobileBertConfig, T.MobileBertForSequenceClassification, hidden_size=32,
                                      embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                                      num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                                      num_feedforward_networks=2, vocab_size=100, max_position_embeddings=40),
                   BATCHED),  # fmt: skip
    "bigbird": (lambda: classifier(T.BigBirdConfig, T.BigBirdForSequenceClassification, attention_type="original_full",
                                   max_position_embeddings=40, **SMALL), BATCHED),  # fmt: skip
    "sew": (lambda: audio(T.SEWConfig, T.SEWForSequenceClassification, squeeze_factor=2, **SPEECH), BATCHED),
    "unispeech": (lambda: audio(T.UniSpeechConfig, T.UniSpeechForSequenceClassification, **SPEECH), BATCHED),
    "mobilenet_v2": (lambda: image(T.MobileNetV2Config, T.MobileNetV2ForImageClassification, size=32, image_size=32,
                                   depth_multiplier=0.1), BATCHED),  # fmt: skip
    "efficientnet": (lambda: image(T.EfficientNetConfig, T.EfficientNetForImageClassification, size=32, image_size=32,
                                   width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128), BATCHED),  # fmt: skip
    "regnet": (lambda: image(T.RegNetConfig, T.RegNetForImageClassification, embedding_size=8, hidden_sizes=[8, 16],
                             depths=[1, 1], groups_width=8), BATCHED),  # fmt: skip
    # its position-bias MLP runs on a [1, ...] buffer, taken for a row broadcast over the batch, which the model
    # reshapes with `view(-1, heads)`: only the first example's copy is read (run once and followed instead, the
    # in-place ReLU after it changes the followed output: not followed yet)
    "swinv2": (lambda: image(T.Swinv2Config, T.Swinv2ForImageClassification, image_size=16, patch_size=2, embed_dim=8,
                             depths=[1, 1], num_heads=[2, 2], window_size=4),
               "changed the first examples' factors at"),  # fmt: skip
    # its landmark attention divides by the largest key sum over the whole batch (`iterative_inv`): examples interact,
    # and each example's own score is its loss computed alone (no mask: with one, transformers' shapes fail)
    "nystromformer": (without_mask(lambda: classifier(T.NystromformerConfig, T.NystromformerForSequenceClassification,
                                                      num_landmarks=4, segment_means_seq_len=SEQ,
                                                      max_position_embeddings=40, **SMALL)),
                      "examples interact after it"),  # fmt: skip
})

MOE = {
    "mixtral": lambda: causal_lm(T.MixtralConfig, T.MixtralForCausalLM, torch.float32, num_local_experts=4,
                                 num_experts_per_tok=2, **KV, **SMALL),  # fmt: skip
    "qwen2_moe": lambda: causal_lm(T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, torch.float32, num_experts=4,
                                   num_experts_per_tok=2, moe_intermediate_size=16,
                                   shared_expert_intermediate_size=32, **KV, **SMALL),  # fmt: skip
}

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.func.vmap failed on this model"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
]


def _split(data: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return {k: v[:N_TRAIN] for k, v in data.items()}, {k: v[N_TRAIN:] for k, v in data.items()}


@pytest.mark.parametrize("name", list(ZOO))
def test_scores_are_exact_and_the_batching_is_pinned(name):
    build, why = ZOO[name]
    model, data, loss = build()
    ckpts = rm.make_checkpoints(model, 2)
    train, test = _split(data)
    e = tc.explain(model, ckpts, train, loss_fn=loss)
    assert e.batching.startswith(BATCHED if why == BATCHED else "vmap(grad) over examples"), e.batching
    assert why in str(e)
    ref = reference_scores(model, ckpts, train, test, loss_fn=tc.ExampleLoss(lambda p, b: loss.fn(p, b).sum()))
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), ref.influence)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=loss), ref.self_influence)


def test_nan_gradients_of_hugging_faces_own_forward_are_named_not_taken_for_mixing():
    """Llama in float64 with left padding gives NaN (rows masked whole) in Hugging Face's own forward: the batching
    check compared an expanded norm's NaN gradients as unequal and refused the model as mixing examples; the call
    names the examples whose gradients are not finite, as `factored=False` does."""
    config = T.LlamaConfig(**{**SMALL, "num_hidden_layers": 1}, num_key_value_heads=2, pad_token_id=0)
    model = _model(T.LlamaForCausalLM, config, F64)
    ids = torch.randint(3, 100, (5, SEQ), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(SEQ) >= SEQ - torch.tensor([SEQ, SEQ, 3, SEQ, 5])[:, None]).long()  # left padded
    batches = [{"input_ids": ids[i : i + 2] * mask[i : i + 2], "attention_mask": mask[i : i + 2]} for i in (0, 2)]
    batches = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in batches]
    ckpts = [tc.Checkpoint(dict(model.state_dict()), 0.1)]
    for factored in (None, False):
        with pytest.raises(FloatingPointError, match=r"Non-finite gradients for `data` examples \[2"):
            tc.self_influence(model, ckpts, batches, loss_fn=tc.causal_lm_loss(model), factored=factored)


def test_a_cache_of_parameter_values_is_refused():
    """LeViT keeps its attention biases, computed from a parameter, in a dict across forward passes in eval mode:
    later passes would score every checkpoint with the first one's biases. Refused, the model left as it was."""
    model, data, loss = image(T.LevitConfig, T.LevitForImageClassification, size=32, image_size=32,
                              hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                              key_dim=[8, 8, 8], patch_size=16)  # fmt: skip
    ckpts, (train, test) = rm.make_checkpoints(model, 2), _split(data)
    with pytest.raises(ValueError, match="'levit.encoder.stages.0.layers.0.module' .* keeps 'attention_bias_cache'"):
        tc.influence(model, ckpts, train, test, loss_fn=loss)
    assert all(not m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache"))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_in_train_mode_is_refused_with_the_fix(reentrant):
    """`gradient_checkpointing_enable()` checkpoints BERT's layers in train mode (dropout 0): torch's own errors came
    out instead ("a different number of tensors was saved" in float32; in float64 "mat1 and mat2 must have the same
    dtype", from recomputing with the module's float32 weights, and said to fail "with plain autograd too"; reentrant:
    `autograd.grad` refused)."""
    model, data, loss = classifier(T.BertConfig, T.BertForSequenceClassification, torch.float32,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SMALL)  # fmt: skip
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpts, (train, test) = rm.make_checkpoints(model.train(), 2), _split(data)
    for dtype in (None, F64):
        for factored in (None, False):
            with pytest.raises(ValueError, match="activation checkpointing.*gradient_checkpointing_disable"):
                tc.influence(model, ckpts, train, test, loss_fn=loss, dtype=dtype, factored=factored)


def test_gradient_checkpointing_enabled_in_eval_mode_stays_batched():
    """In eval mode Hugging Face checkpoints nothing, but `gradient_checkpointing_enable()` also installs
    `enable_input_require_grads`' hook on the token embeddings: as any hook, it sent them to vmap(grad), and BERT ran
    one example at a time. The hook changes no value or gradient: batched, exact."""
    model, data, loss = classifier(T.BertConfig, T.BertForSequenceClassification, **SMALL)
    model.gradient_checkpointing_enable()
    ckpts, (train, test) = rm.make_checkpoints(model, 2), _split(data)
    ref = reference_scores(model, ckpts, train, test, loss_fn=loss)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), ref.influence)
    assert tc.explain(model, ckpts, train, loss_fn=loss).batching == BATCHED


def test_transformers_output_capturing_hooks_change_no_route():
    """At a model's first forward transformers hooks the modules its `_can_record_outputs` names (attention and decoder
    layers, routers), to record their outputs for a call asking for attentions; the hook changes nothing. WavLM's
    attention holds parameters of its own, and was said to have hooks whose effect cannot be proven: it leaves the
    batched path for its raw `F.multi_head_attention_forward` alone. Exact."""
    from tracin_func._layers import wrapped

    model, data, loss = audio(T.WavLMConfig, T.WavLMForSequenceClassification, num_buckets=16, max_bucket_distance=32,
                              **SPEECH)  # fmt: skip
    ckpts, (train, test) = rm.make_checkpoints(model, 2), _split(data)
    model(train["input_values"])  # (the first forward installs the hooks)
    hooked = [m for m in model.modules() if m._forward_hooks]
    assert hooked and not any(map(wrapped, hooked))
    e = tc.explain(model, ckpts, train, loss_fn=loss)
    assert "has hooks" not in str(e) and "multi_head_attention_forward" in e.batching, e.batching
    ref = reference_scores(model, ckpts, train, test, loss_fn=tc.ExampleLoss(lambda p, b: loss.fn(p, b).sum()))
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), ref.influence)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=loss), ref.self_influence)


def test_a_model_taking_one_example_at_a_time_is_scored_per_example():
    """GPT-2's sequence classifier without a pad token refuses batches of more than one example (transformers'
    ValueError, raised as it was from planning's batched run): per example, exact, the reason given."""
    model, data, loss = classifier(T.GPT2Config, T.GPT2ForSequenceClassification, n_embd=32, n_layer=2, n_head=4,
                                   vocab_size=100, pad_token_id=None)  # fmt: skip
    data = {"input_ids": data["input_ids"].clamp(min=1), "labels": data["labels"]}  # (no padding: no pad id)
    ckpts, (train, test) = rm.make_checkpoints(model, 2), _split(data)
    ref = reference_scores(model, ckpts, train, test, loss_fn=loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tc.SlowPathWarning)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), ref.influence)
    why = "a batched forward failed where examples alone ran (ValueError: Cannot handle batch sizes > 1"
    assert why in tc.explain(model, ckpts, train, loss_fn=loss).batching


def test_another_ignore_index_is_no_decoder_token():
    """`tc.seq2seq_lm_loss(model, ignore_index=-1)`: the decoder's inputs, made from the labels, took -1 for a token
    id ("index out of range in self"); ignored positions are the pad token there, as -100's are."""
    model, data, loss = ZOO["bart"][0]()
    ckpts, (train, _) = rm.make_checkpoints(model, 2), _split(data)
    other = {**train, "labels": train["labels"].masked_fill(train["labels"] == -100, -1)}
    assert (other["labels"] == -1).any()
    want = tc.self_influence(model, ckpts, train, loss_fn=loss)
    assert_close(tc.self_influence(model, ckpts, other, loss_fn=tc.seq2seq_lm_loss(model, ignore_index=-1)), want)


def _float32_loop(model: torch.nn.Module, ckpts: list[tc.Checkpoint], train: Any, test: Any, loss: tc.BatchLoss):
    """``sum_c lr_c G_test G_train^T``, one ``torch.autograd.grad`` per example, in the model's float32."""

    def grads(state: dict[str, torch.Tensor], params: list[torch.Tensor], example: Any) -> torch.Tensor:
        gs = torch.autograd.grad(loss.fn(state, example).sum(), params, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gs, params)])

    scores = 0
    for ckpt in ckpts:
        copies: dict[int, torch.Tensor] = {}  # one leaf per tensor: tied names (an embedding and the head) share it
        params = {k: copies.setdefault(id(v), v.detach().clone().requires_grad_())
                  for k, v in ckpt.params.items() if v.is_floating_point()}  # fmt: skip
        state, leaves = {**ckpt.params, **params}, list(copies.values())
        g_train, g_test = (torch.stack([grads(state, leaves, rm.take(b, i, i + 1)) for i in range(rm.num_examples(b))])
                           for b in (train, test))  # fmt: skip
        scores = scores + ckpt.lr * g_test @ g_train.T
    return scores


# state-space models whose scan casts to float32 (`.float()`) whatever the model's dtype: checked in float32
FLOAT32_SCAN = {
    "mamba2": lambda: causal_lm(T.Mamba2Config, T.Mamba2ForCausalLM, torch.float32, state_size=8, conv_kernel=4,
                                num_heads=8, head_dim=8, n_groups=1, chunk_size=8, **MAMBA),  # fmt: skip
    "bamba": lambda: causal_lm(T.BambaConfig, T.BambaForCausalLM, torch.float32, mamba_d_state=8, mamba_d_conv=4,
                               mamba_expand=2, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_chunk_size=8,
                               attn_layer_indices=[1], **KV, **SMALL),  # fmt: skip
    "zamba2": lambda: causal_lm(T.Zamba2Config, T.Zamba2ForCausalLM, torch.float32, num_attention_heads=4,
                                num_key_value_heads=4, intermediate_size=64, mamba_d_state=8, mamba_d_conv=4,
                                mamba_expand=2, mamba_headdim=8, mamba_ngroups=1, n_mamba_heads=8, chunk_size=8,
                                layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1], use_mem_rope=False,
                                num_mem_blocks=1, **MAMBA),  # fmt: skip
}


@pytest.mark.parametrize("name", list(FLOAT32_SCAN))
def test_state_space_models_scanning_in_float32_are_batched_and_exact_in_float32(name):
    """Mamba2's mixer (and Bamba's and Zamba2's, Mamba2 layers beside attention) reads its parameters itself (a
    depthwise convolution's in ``F.conv1d``, ``A_log``, ``D``, ``dt_bias``): each followed to the batch, one batched
    pass, exact to float32 rounding against a float32 loop (its scan casts to float32 even in a float64 model, which
    leaves vmap(grad) 7e-8 from a float64 loop: no float64 check can be exact)."""
    model, data, loss = FLOAT32_SCAN[name]()
    ckpts, (train, test) = rm.make_checkpoints(model, 2), _split(data)
    assert tc.explain(model, ckpts, train, loss_fn=loss).batching == BATCHED
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), _float32_loop(model, ckpts, train, test, loss),
                 1e-5)  # fmt: skip


@pytest.mark.parametrize("name", list(MOE))
def test_mixture_of_experts_is_exact_in_float32(name):
    """Expert layers of no known kind (routed tokens of the whole batch): vmap(grad), exact to float32 rounding."""
    model, data, loss = MOE[name]()
    ckpts = rm.make_checkpoints(model, 2)
    train, test = _split(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = tc.influence(model, ckpts, train, test, loss_fn=loss)
    assert_close(got, _float32_loop(model, ckpts, train, test, loss), 1e-5)


class LoraLinear(torch.nn.Module):
    """peft's LoRA ``Linear`` in miniature (peft is no dependency here): the frozen base layer plus
    ``lora_B(lora_A(dropout(x))) * alpha / r``."""

    def __init__(self, base: torch.nn.Linear, r: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base_layer, self.lora_dropout, self.scaling = base, torch.nn.Dropout(0.1), alpha / r
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False, dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False, dtype=base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def test_lora_adapters_scored_alone_are_exact_and_batched():
    """A LoRA fine-tune's influence: adapters around Llama's query and value projections, scored alone (``params=``):
    the adapters' Linears are factor sites of their own and the frozen base layers no site, all in one batched pass."""
    model, data, loss = causal_lm(T.LlamaConfig, T.LlamaForCausalLM, **KV, **SMALL)
    for layer in model.model.layers:
        attention = layer.self_attn
        attention.q_proj, attention.v_proj = LoraLinear(attention.q_proj), LoraLinear(attention.v_proj)
    model.eval()
    ckpts, train, test = rm.make_checkpoints(model, 2), *_split(data)

    def lora(name: str) -> bool:
        return ".lora_" in name

    e = tc.explain(model, ckpts, train, loss_fn=loss, params=lora)
    assert e.batching == BATCHED and len(e.routes) == 8 and all(lora(r.parameter) for r in e.routes)
    ref = reference_scores(model, ckpts, train, test, loss_fn=tc.ExampleLoss(lambda p, b: loss.fn(p, b).sum()),
                           params=lora)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", tc.SlowPathWarning)
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss, params=lora), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=loss, params=lora), ref.self_influence)


def test_token_classification_loss_is_hugging_faces_and_batched():
    """BERT tagging: each example's loss is ``model(**example).loss`` (its tokens' mean cross-entropy, -100 ignored:
    padding and a word's later sub-tokens), the call runs batched and its scores are exact."""
    model = _model(T.BertForTokenClassification, T.BertConfig(num_labels=5, **SMALL), F64)
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(SEQ) < rm._lengths(N_TRAIN + 3, SEQ, g)[:, None]).long()
    labels = torch.randint(0, 5, (N_TRAIN + 3, SEQ), generator=g).masked_fill(mask == 0, -100)
    labels[0, 1::2] = -100  # later sub-tokens of words
    data = {"input_ids": torch.randint(3, 100, (N_TRAIN + 3, SEQ), generator=g) * mask, "attention_mask": mask,
            "labels": labels}  # fmt: skip
    loss = tc.token_classification_loss(model)
    ckpts, (train, test) = rm.make_checkpoints(model, 2), _split(data)
    got = loss.fn(dict(model.state_dict()), data)
    want = torch.stack([model(**rm.take(data, i, i + 1)).loss for i in range(N_TRAIN + 3)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert tc.explain(model, ckpts, train, loss_fn=loss).batching == BATCHED
    ref = reference_scores(model, ckpts, train, test, loss_fn=tc.ExampleLoss(lambda p, b: loss.fn(p, b).sum()))
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), ref.influence)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=loss), ref.self_influence)


def test_mamba_is_batched_without_a_cache():
    """Mamba's forward updates its convolution state in the cache in place, which vmap cannot batch: with the cache
    Hugging Face builds by default it took the per-example loop. The library's losses pass ``use_cache=False`` where
    a forward takes it (a score never reads a cache). Its mixer (transformers' PyTorch path) reads its parameters
    itself: the depthwise convolution's weight and bias in ``F.conv1d``, the time step projection's in a product and
    a sum, ``A_log`` and ``D`` elementwise; each is followed to the batch, and the call runs batched and exact (it took
    vmap(grad) while a followed weight meeting the batch in a convolution was refused)."""
    model, data, loss = causal_lm(T.MambaConfig, T.MambaForCausalLM, state_size=4, conv_kernel=4, **MAMBA)
    ckpts, (train, test) = rm.make_checkpoints(model, 2), _split(data)
    ref = reference_scores(model, ckpts, train, test, loss_fn=tc.ExampleLoss(lambda p, b: loss.fn(p, b).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tc.SlowPathWarning)
        warnings.filterwarnings("error", "torch.func.vmap failed on this model")
        assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), ref.influence)
        assert_close(tc.self_influence(model, ckpts, train, loss_fn=loss), ref.self_influence)
    e = tc.explain(model, ckpts, train, loss_fn=loss)
    assert e.batching == BATCHED, e.batching
    followed = {r.parameter for r in e.routes if r.reason.startswith("followed")}
    assert followed == {f"backbone.layers.{i}.mixer.{n}" for i in range(2) for n in
                        ("A_log", "D", "conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias")}, followed


def test_an_example_of_one_token_under_sdpa_is_not_taken_for_mixing():
    """With one key the attention weight is 1, so that example's gradient at the first query is zero but for
    rounding (about 1e-19 in float64), batched and alone alike; compared on its own scale it was refused as mixing
    (the call raised on a later batch, or took the per-example loop). Rows are compared within rounding of the
    largest row too."""
    model = _model(T.BertForSequenceClassification, T.BertConfig(num_labels=3, **SMALL), F64, attention="sdpa")
    g = torch.Generator().manual_seed(3)
    mask = (torch.arange(10) < torch.tensor([10, 3, 10, 7, 1, 5, 10, 9])[:, None]).long()
    data = {"input_ids": torch.randint(3, 100, (8, 10), generator=g) * mask, "attention_mask": mask,
            "labels": torch.randint(0, 3, (8,), generator=g)}  # fmt: skip
    loss, ckpts = tc.sequence_classification_loss(model), rm.make_checkpoints(model, 2)
    ref = reference_scores(model, ckpts, data, loss_fn=tc.ExampleLoss(lambda p, b: loss.fn(p, b).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tc.SlowPathWarning)
        assert_close(tc.self_influence(model, ckpts, data, loss_fn=loss, batch_size=4), ref.self_influence)


def test_cvt_is_exact_where_one_backward_per_example_is_not():
    """CvT's projections run an eval-mode BatchNorm on tokens viewed as a grid; for a lone example torch 2.13's CPU
    kernel permutes its input gradient (``tests/test_trust.py::_TokensConvNorm``), which the batching check saw as
    examples interacting. One backward per example (the zoo's reference) is wrong here; the call runs vmap(grad),
    names a batch of one's computation as the cause, and scores as the model with its BatchNorms written as their
    formula."""
    model, data, loss = image(T.CvtConfig, T.CvtForImageClassification, size=32, embed_dim=[16, 32, 32],
                              num_heads=[1, 2, 2], depth=[1, 2, 3])  # fmt: skip  (a class token in its last stage)
    ckpts = rm.make_checkpoints(model, 2)
    train, test = _split(data)
    explained = tc.explain(model, ckpts, train, loss_fn=loss)
    assert "where two copies of itself get theirs: a batch of one computes them otherwise" in explained.batching
    formula = with_formula_norms(model)
    by_formula = tc.sequence_classification_loss(formula)
    summed = tc.ExampleLoss(lambda p, b: by_formula.fn(p, b).sum())
    truth = reference_scores(formula, ckpts, train, test, loss_fn=summed)
    # (the premise: the loop's gradients of the convolutions before those norms are wrong, by 1e-7 of their scores
    # here, where the head reads the class token alone and the grid's tokens barely reach it; 55% in
    # `test_trust.py::_TokensConvNorm`, where they do)
    grid = [n for n, _ in model.named_parameters() if n.endswith("convolution_projection.convolution.weight")]
    looped = reference_scores(model, ckpts, train, test, loss_fn=tc.ExampleLoss(lambda p, b: loss.fn(p, b).sum()),
                              params=grid)  # fmt: skip
    on_grid = reference_scores(formula, ckpts, train, test, loss_fn=summed, params=grid)
    assert not torch.allclose(looped.self_influence, on_grid.self_influence, rtol=1e-10, atol=0)
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), truth.influence)
    assert_close(tc.self_influence(model, ckpts, train, loss_fn=loss), truth.self_influence)


def test_a_table_a_run_grows_for_later_ones_is_the_models_as_the_call_found_it_in_every_batch():
    """Llama's dynamic RoPE grows its rotary table on an input longer than any before and keeps it: training examples
    scored after longer test examples took their table (influence 40% off), and a batch after a longer one its
    (26%), silently (a review helper's). Every batch's pass starts from the model as the call found it, as its next
    forward would run: one call's scores are those of calls on each data alone."""
    config = T.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=32, vocab_size=50, max_position_embeddings=8, pad_token_id=0,
                           rope_scaling={"rope_type": "dynamic", "factor": 4.0})  # fmt: skip
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).double().eval()
    ckpts = [tc.Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr=0.1)]
    loss = tc.causal_lm_loss(model)
    g = torch.Generator().manual_seed(1)

    def batch(n, length):
        ids = torch.randint(3, 50, (n, length), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    train, test, late = batch(4, 12), batch(2, 32), batch(3, 12)
    apart = tc.embeddings(model, ckpts, test, loss_fn=loss) @ tc.embeddings(model, ckpts, train, loss_fn=loss).T
    assert_close(tc.influence(model, ckpts, train, test, loss_fn=loss), apart)
    scored = tc.self_influence(model, ckpts, [train, test, late], loss_fn=loss)
    assert_close(scored[-3:], tc.self_influence(model, ckpts, late, loss_fn=loss))
    assert int(model.model.rotary_emb.max_seq_len_cached) == 8
