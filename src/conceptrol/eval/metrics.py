"""CLIP-T, CLIP-I and DINO scores: cosine similarities of embeddings, as in DreamBooth and DreamBench++.

Backbones load lazily (`MetricModels.load`); the defaults are the ones the literature uses:
CLIP ViT-B/32 for CLIP-T and CLIP-I, DINO ViT-S/16 (CLS token) for DINO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

CLIP_ID = "openai/clip-vit-base-patch32"
DINO_ID = "facebook/dino-vits16"


@dataclass
class MetricModels:
    """A CLIP model with its processor and a DINO ViT with its image processor."""

    clip: Any
    clip_processor: Any
    dino: Any
    dino_processor: Any
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(cls, clip: str = CLIP_ID, dino: str = DINO_ID, device: str = "cpu") -> MetricModels:
        from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

        return cls(CLIPModel.from_pretrained(clip).eval().to(device), CLIPProcessor.from_pretrained(clip),
                   ViTModel.from_pretrained(dino, add_pooling_layer=False).eval().to(device),
                   ViTImageProcessor.from_pretrained(dino), torch.device(device))

    @torch.no_grad()
    def clip_image_embeddings(self, images: list[Image.Image]) -> Tensor:
        pixels = self.clip_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return _features(self.clip.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def clip_text_embeddings(self, texts: list[str]) -> Tensor:
        tokens = self.clip_processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        return _features(self.clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))

    @torch.no_grad()
    def dino_embeddings(self, images: list[Image.Image]) -> Tensor:
        pixels = self.dino_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return self.dino(pixel_values=pixels).last_hidden_state[:, 0]  # the CLS token

    def clip_t(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """CLIP-T: cosine of each generated image with its prompt."""
        return cosine(self.clip_image_embeddings(images), self.clip_text_embeddings(prompts))

    def clip_i(self, images: list[Image.Image], references: list[Image.Image]) -> list[float]:
        """CLIP-I: cosine of each generated image with its reference image."""
        return cosine(self.clip_image_embeddings(images), self.clip_image_embeddings(references))

    def dino_score(self, images: list[Image.Image], references: list[Image.Image]) -> list[float]:
        """DINO: cosine of DINO CLS features of each generated image and its reference."""
        return cosine(self.dino_embeddings(images), self.dino_embeddings(references))


def cosine(a: Tensor, b: Tensor) -> list[float]:
    """Row-wise cosine similarity of two [n, d] embedding batches."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).tolist()


def _features(output: Any) -> Tensor:
    """Projected features: a tensor (transformers 4) or the pooled output of a model output (transformers 5)."""
    return output if isinstance(output, Tensor) else output.pooler_output
