"""Tiny text and image encoders and tokenizers with seeded random weights, shared by the tiny pipelines."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

try:  # transformers 5: the Pillow-based processor, which needs no torchvision
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor  # noqa: F401 (used by the tiny pipelines)

IMAGE_ENCODER_SIZE = 32


def byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    codes = {b: b for b in keep} | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(codes[b]) for b in range(256)]


def clip_tokenizer(merges: list[str] | None = None, folder: Path | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer from BPE merges; with no merges, one that spells every word letter by letter."""
    merges = merges or []
    alphabet = byte_level_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder or tempfile.mkdtemp(prefix="conceptrol-tok-"))
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def text_encoder(tokenizer: CLIPTokenizer, seed: int, with_projection: bool = False, hidden: int = 32):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def image_encoder(seed: int) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, projection_dim=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_ENCODER_SIZE, patch_size=8,
    )
    return CLIPVisionModelWithProjection(config).eval()


def t5_tokenizer(max_length: int = 512):
    """A T5-layout tokenizer (pad 0, eos 1, unk 2, no start token) that spells words letter by letter."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = list(string.ascii_lowercase + string.digits + ",.!?'-")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in alphabet] + [("▁" + c, -2.5) for c in alphabet]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=max_length)


CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>"]


def chat_tokenizer(chat_template: str, max_length: int = 1024, special_tokens: list[str] = CHAT_SPECIAL_TOKENS,
                   bos: str | None = None, eos: str = "<|im_end|>", pad: str = "<|endoftext|>"):
    """A byte-level tokenizer (every byte a token, as GPT-2's alphabet spells it) with the given special tokens
    (Qwen's by default) and chat template: a fast tokenizer, so it has offset mappings, as the real Qwen and Mistral
    ones do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = byte_level_alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(special_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=chat_template, model_max_length=max_length)
