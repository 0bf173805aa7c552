"""A tiny unCLIP pipeline in Karlo's diffusers layout, built by diffusers and transformers themselves
(random weights; nothing is downloaded): the reference the importer is checked against."""

from __future__ import annotations

import torch

PROMPT = "a red circle"
# The merges of the tiny BPE vocabulary: enough to make "red" and "circle" single tokens.
MERGES = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"), ("circl", "e</w>")]


def tokenizer():
    """A CLIPTokenizer over the 256 byte symbols (alone and word-final), the merges above and CLIP's two
    special tokens: real byte-level BPE, a vocabulary of 521 entries."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=MERGES, model_max_length=77)


def build_pipeline(*, decoder_size: int = 64, sr_size: int = 256, seed: int = 0, width: int = 32):
    """An UnCLIPPipeline as Karlo's, shrunk: CLIP text width ``width``, a 1-layer prior, a decoder with
    learned variance at ``decoder_size``², two upsamplers to ``sr_size``². Every parameter random (the
    zero-initialised ones included, so that none hides a wrong mapping)."""
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tokenizer()
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_size=width, projection_dim=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tok), max_position_embeddings=77))
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=width, num_layers=1)
    decoder = UNet2DConditionModel(
        sample_size=decoder_size, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=4, resnet_time_scale_shift="scale_shift", class_embed_type="identity")
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=width,
                                    time_embed_dim=decoder.time_embedding.linear_2.out_features, cross_attention_dim=16)

    def upsampler():
        return UNet2DModel(sample_size=sr_size, in_channels=6, out_channels=3, layers_per_block=1,
                           block_out_channels=(8, 16), norm_num_groups=4, add_attention=False,
                           down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
                           up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"))

    super_res_first, super_res_last = upsampler(), upsampler()
    with torch.no_grad():
        for module in (text_encoder, prior, decoder, text_proj, super_res_first, super_res_last):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
        prior.clip_std.abs_().add_(0.5)
    # Karlo's scheduler settings.
    return UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tok, text_proj=text_proj,
        super_res_first=super_res_first, super_res_last=super_res_last,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample=True, clip_sample_range=5.0, num_train_timesteps=1000),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                                          clip_sample=True, clip_sample_range=1.0, num_train_timesteps=1000),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                            clip_sample=True, clip_sample_range=1.0, num_train_timesteps=1000),
    )


def save_source(path, **kwargs) -> str:
    """The tiny pipeline written by diffusers' own ``save_pretrained`` (safetensors) under ``path``."""
    build_pipeline(**kwargs).save_pretrained(str(path), safe_serialization=True)
    return str(path)
