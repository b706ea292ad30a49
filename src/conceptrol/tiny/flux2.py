"""Tiny FLUX.2 pipelines, [klein] and [dev] (the real 8 + 48 block layout at tiny width), seeded and offline.

A Qwen3 text encoder of 28 tiny layers (the pipeline stacks hidden states 9, 18 and 27) behind a byte-level
tokenizer with a Qwen-style chat template, a small FLUX.2 VAE and transformer: enough for every code path of
Flux2KleinPipeline and Flux2KleinKVPipeline to run on the CPU in a second.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from transformers import Qwen3Config, Qwen3ForCausalLM

from .text import chat_tokenizer

QWEN3_TEMPLATE = (  # the shape of Qwen3's chat template: system/user/assistant turns, optional empty thinking
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
TEXT_WIDTH = 32  # Qwen3's hidden size here; the transformer reads 3 stacked layers: 96


def qwen3_encoder(vocab_size: int, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=28,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)
    return Qwen3ForCausalLM(config).eval()


def flux2_transformer(seed: int = 0, double: int = 8, single: int = 48, guidance: bool = False) -> Flux2Transformer2DModel:
    """FLUX.2's block layout (8 double, 48 single by default) with 2 heads of 16 channels."""
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance).eval()


def flux2_vae(seed: int = 0) -> AutoencoderKLFlux2:
    torch.manual_seed(seed)
    return AutoencoderKLFlux2(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, layers_per_block=1,
                              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                              mid_block_add_attention=False).eval()


def tiny_flux2_klein(seed: int = 0, double: int = 8, single: int = 48, kv: bool = False,
                     distilled: bool = False) -> Flux2KleinPipeline:
    """A tiny Flux2KleinPipeline (Flux2KleinKVPipeline with `kv`), CFG with an empty negative prompt unless
    `distilled` (as FLUX.2 [klein] 4B, and the KV pipeline, are: no CFG)."""
    tokenizer = chat_tokenizer(QWEN3_TEMPLATE)
    pipeline = Flux2KleinKVPipeline if kv else Flux2KleinPipeline
    return pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(seed + 1),
                    text_encoder=qwen3_encoder(len(tokenizer), seed + 2), tokenizer=tokenizer,
                    transformer=flux2_transformer(seed, double, single), is_distilled=kv or distilled)


MISTRAL_TEMPLATE = (  # the shape of Mistral Small 3's template: BOS, a system prompt, then instruction turns
    "<s>{% for message in messages %}{% set text = message['content'] if message['content'] is string else "
    "message['content'][0]['text'] %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}</s>{% endif %}{% endfor %}")
MISTRAL_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]


def mistral3_encoder(vocab_size: int, seed: int = 0):
    """A tiny Mistral 3 (the text model FLUX.2 [dev] reads: hidden states 10, 20 and 30 of 31 layers)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    text = MistralConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=31,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=32, patch_size=16)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=vocab_size - 1,
                            spatial_merge_size=1, multimodal_projector_bias=False)
    return Mistral3ForConditionalGeneration(config).eval()


def tiny_flux2_dev(seed: int = 0, double: int = 8, single: int = 48) -> Flux2Pipeline:
    """A tiny Flux2Pipeline (guidance-distilled: no CFG; a guidance embedding). Its tokenizer is a fast tokenizer with a
    Mistral-shaped template where the real pipeline has a PixtralProcessor around one (text prompts only here)."""
    tokenizer = chat_tokenizer(MISTRAL_TEMPLATE, special_tokens=MISTRAL_SPECIAL_TOKENS, bos="<s>", eos="</s>",
                               pad="<pad>")
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(seed + 1),
                         text_encoder=mistral3_encoder(len(tokenizer), seed + 2), tokenizer=tokenizer,
                         transformer=flux2_transformer(seed, double, single, guidance=True))
