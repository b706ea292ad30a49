"""CLIP-T, CLIP-I and DINO on tiny backbones built from configs, against naive computations."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from conceptrol.eval.metrics import MetricModels
from conceptrol.tiny import clip_tokenizer


@pytest.fixture(scope="module")
def models():
    return tiny_metric_models()


def tiny_metric_models() -> MetricModels:
    """CLIP and DINO backbones of the real architectures, tiny and random."""
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8).to_dict(),
        projection_dim=16,
    )
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size=32, crop_size=32), tokenizer=tokenizer)
    dino = ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              image_size=32, patch_size=8), add_pooling_layer=False).eval()
    return MetricModels(CLIPModel(config).eval(), processor, dino, ViTImageProcessor(size={"height": 32, "width": 32}))


def images(seed, n=3):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def naive_cosine(a, b):
    a, b = a.detach().numpy().astype(np.float64), b.detach().numpy().astype(np.float64)
    return [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)]


def test_clip_i_and_dino_match_naive_cosines_and_are_one_for_identical_images(models):
    generated, references = images(1), images(2)
    clip_a, clip_b = models.clip_image_embeddings(generated), models.clip_image_embeddings(references)
    assert clip_a.shape == (3, 16)
    np.testing.assert_allclose(models.clip_i(generated, references), naive_cosine(clip_a, clip_b), rtol=1e-5)
    dino_a, dino_b = models.dino_embeddings(generated), models.dino_embeddings(references)
    assert dino_a.shape == (3, 24)
    np.testing.assert_allclose(models.dino_score(generated, references), naive_cosine(dino_a, dino_b), rtol=1e-5)
    np.testing.assert_allclose(models.dino_score(generated, generated), [1.0] * 3, rtol=1e-5)


def test_clip_t_matches_a_naive_cosine_with_the_text_embedding(models):
    generated, prompts = images(3, 2), ["a dog on the moon", "a red car"]
    text = models.clip_text_embeddings(prompts)
    assert text.shape == (2, 16)
    expected = naive_cosine(models.clip_image_embeddings(generated), text)
    np.testing.assert_allclose(models.clip_t(generated, prompts), expected, rtol=1e-5)


def test_clip_embeddings_are_the_projected_pooled_outputs(models):
    generated = images(4, 2)
    pixels = models.clip_processor(images=generated, return_tensors="pt").pixel_values
    with torch.no_grad():
        manual = models.clip.visual_projection(models.clip.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(models.clip_image_embeddings(generated), manual)
