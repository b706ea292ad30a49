"""Tiny Qwen-Image-Edit pipelines (the real 60 dual-stream blocks at tiny width), seeded and offline.

A Qwen2.5-VL text encoder with a tiny vision tower behind a byte-level tokenizer that spells the pipeline's system
prompt as Qwen's tokenizer does (one token per word: the 64 tokens the pipeline drops are the system turn and the user
turn's header, as with the real one), a Qwen2-VL processor built from them, a Qwen-Image VAE that downsamples 64 times
(the pipeline resizes every reference to about 1024 x 1024 pixels: 8 x 8 packed tokens here) and a Qwen-Image
transformer of 60 blocks with 2 heads of 16 channels: a 2-step call with two references runs in one to two seconds
on one CPU core.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

from .text import CHAT_SPECIAL_TOKENS, byte_level_alphabet

try:  # transformers 5: the Pillow-based image processor, which needs no torchvision
    from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor
except ImportError:  # transformers 4
    from transformers import Qwen2VLImageProcessor

QWEN_TEMPLATE = (  # the shape of Qwen2.5-VL's chat template (the pipelines write their own; kept for completeness)
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The words of the pipelines' system turn, each one token as Qwen's tokenizer has them ("Ġ" is a leading space).
SYSTEM_WORDS = (
    "system Describe Ġthe Ġkey Ġfeatures Ġof Ġinput Ġimage Ġ( color Ġshape Ġsize Ġtexture Ġobjects Ġbackground ), "
    "Ġthen Ġexplain Ġhow Ġuser 's Ġtext Ġinstruction Ġshould Ġalter Ġor Ġmodify ĠGenerate Ġa Ġnew Ġthat Ġmeets "
    "Ġrequirements Ġwhile Ġmaintaining Ġconsistency Ġwith Ġoriginal Ġwhere Ġappropriate user assistant Ċ").split()
TEXT_WIDTH = 32  # the text encoder's hidden size: the transformer's joint_attention_dim
VISION_PATCH = 16  # pixels per vision patch; 2 x 2 patches merge into one text token
VISION_PIXELS = 128 * 128  # the largest image the vision tower sees: (128 / 32)^2 = 16 image tokens
LATENT_CHANNELS = 4


class TinyQwenVLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor (which needs torchvision); images and text as the real one."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def qwen_tokenizer() -> Any:
    """A byte-level BPE tokenizer with Qwen's special tokens whose merges spell each word of the system turn whole
    (a fast tokenizer, so it has offset mappings, as the real one does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(byte_level_alphabet())}
    merges: list[tuple[str, str]] = []
    for word in SYSTEM_WORDS:
        pieces = _bpe(word, merges)
        while len(pieces) > 1:  # merge the first two pieces (a new merge ranks last, so it applies after the others)
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _bpe(word, merges)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(CHAT_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=QWEN_TEMPLATE, model_max_length=4096)


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """`word` split by byte-pair merges, the lowest-ranked pair first (as the BPE model applies them)."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    pieces = list(word)
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def qwen_processor(tokenizer: Any) -> TinyQwenVLProcessor:
    image_processor = Qwen2VLImageProcessor(patch_size=VISION_PATCH, merge_size=2, temporal_patch_size=2,
                                            min_pixels=(2 * VISION_PATCH) ** 2, max_pixels=VISION_PIXELS)
    return TinyQwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def qwen_vl_encoder(tokenizer: Any, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: 2 text layers of width 32 (multimodal RoPE), a 2-layer vision tower."""
    ids = dict(zip(("image", "start", "end", "pad", "eos"), tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>"])))
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                         bos_token_id=ids["pad"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           patch_size=VISION_PATCH, window_size=4 * VISION_PATCH, fullatt_block_indexes=[1]),
        image_token_id=ids["image"], video_token_id=ids["image"], vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"])
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    """Six halvings (64x): the ~1024 x 1024 pixels the pipelines resize references to become 16 x 16 latents."""
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1] * 7, num_res_blocks=0,
                                  temperal_downsample=[False] * 6, latents_mean=[0.0] * LATENT_CHANNELS,
                                  latents_std=[1.0] * LATENT_CHANNELS).eval()


def qwen_transformer(seed: int = 0, layers: int = 60) -> QwenImageTransformer2DModel:
    """Qwen-Image's 60 dual-stream blocks with 2 heads of 16 channels."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                       num_layers=layers, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(8, 4, 4)).eval()


def qwen_edit_components(seed: int = 0, layers: int = 60) -> dict:
    """The components both Edit pipelines take (QwenImagePipeline takes them without the processor)."""
    tokenizer = qwen_tokenizer()
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=qwen_vae(seed + 1),
                text_encoder=qwen_vl_encoder(tokenizer, seed + 2), tokenizer=tokenizer,
                processor=qwen_processor(tokenizer), transformer=qwen_transformer(seed, layers))


def tiny_qwen_edit_plus(seed: int = 0, layers: int = 60) -> QwenImageEditPlusPipeline:
    """A tiny QwenImageEditPlusPipeline (Qwen-Image-Edit-2509's pipeline): several reference images."""
    pipe = QwenImageEditPlusPipeline(**qwen_edit_components(seed, layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwen_edit(seed: int = 0, layers: int = 60) -> QwenImageEditPipeline:
    """A tiny QwenImageEditPipeline (Qwen-Image-Edit's pipeline): one reference image."""
    pipe = QwenImageEditPipeline(**qwen_edit_components(seed, layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe
