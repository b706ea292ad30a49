"""Tiny random segmentation models (OWLv2, SAM, CLIPSeg) built from configs, with their processors: offline stand-ins
for the block analysis's segmenters (conceptrol.analysis.segment)."""

from __future__ import annotations

from typing import Any

import torch
import transformers

from .text import clip_tokenizer


def _text_config(tokenizer: Any) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def tiny_owlv2(seed: int = 0) -> tuple[Any, Any]:
    """(Owlv2ForObjectDetection, Owlv2Processor): 32 px images, CLIP's tokenizer layout."""
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    model = transformers.Owlv2ForObjectDetection(transformers.Owlv2Config(
        text_config=_text_config(tokenizer), vision_config=VISION, projection_dim=32)).eval()
    processor = transformers.Owlv2Processor(
        image_processor=transformers.Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    return model, processor


def tiny_sam(seed: int = 0) -> tuple[Any, Any]:
    """(SamModel, SamProcessor): 64 px inputs, a 16-channel prompt encoder and mask decoder."""
    torch.manual_seed(seed)
    config = transformers.SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
                           output_channels=16, global_attn_indexes=[1], mlp_dim=37, window_size=0, num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16, iou_head_depth=2))
    processor = transformers.SamProcessor(image_processor=transformers.SamImageProcessorPil(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}))
    return transformers.SamModel(config).eval(), processor


def tiny_clipseg(seed: int = 0) -> tuple[Any, Any]:
    """(CLIPSegForImageSegmentation, CLIPSegProcessor): 32 px images."""
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    config = transformers.CLIPSegConfig(text_config=_text_config(tokenizer), vision_config=VISION, projection_dim=32,
                                        extract_layers=[0, 1], reduce_dim=16, decoder_num_attention_heads=2,
                                        decoder_intermediate_size=37)
    processor = transformers.CLIPSegProcessor(
        image_processor=transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    return transformers.CLIPSegForImageSegmentation(config).eval(), processor
