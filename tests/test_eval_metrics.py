"""CLIP-T, CLIP-I and DINO on tiny backbones built from configs, against the models' own outputs.

The expected values never go through the embedding functions under test: CLIP-T comes from
CLIPModel.forward's logits, CLIP-I from the vision tower and projection, DINO from the ViT's CLS token.
"""

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


def flat_images():
    """Solid colours: references far from the noise images in both feature spaces."""
    return [Image.new("RGB", (48, 40), colour) for colour in [(255, 0, 0), (0, 128, 255), (30, 30, 30)]]


def numpy_cosine(a, b):
    """Row-wise cosine of two [n, d] tensors, in float64 numpy."""
    a, b = a.detach().numpy().astype(np.float64), b.detach().numpy().astype(np.float64)
    return [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)]


@torch.no_grad()
def clip_cosines_from_logits(models, images, prompts):
    """CLIP-T straight from CLIPModel.forward: logits_per_image is logit_scale.exp() times the cosine."""
    tokens = models.clip_processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    pixels = models.clip_processor.image_processor(images, return_tensors="pt").pixel_values
    out = models.clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    cosines = out.logits_per_image / models.clip.logit_scale.exp()  # [images, prompts]
    return cosines.double().numpy()


@torch.no_grad()
def clip_vision_embeddings(models, images):
    """CLIP image embeddings from the vision tower's pooled output and the visual projection."""
    pixels = models.clip_processor.image_processor(images, return_tensors="pt").pixel_values
    return models.clip.visual_projection(models.clip.vision_model(pixel_values=pixels).pooler_output)


@torch.no_grad()
def dino_cls(models, images):
    """DINO features: the ViT's CLS token of the last hidden state."""
    pixels = models.dino_processor(images, return_tensors="pt").pixel_values
    return models.dino(pixel_values=pixels).last_hidden_state[:, 0]


def test_clip_i_is_the_cosine_of_the_projected_vision_embeddings(models):
    generated, references = images(1), flat_images()
    expected = numpy_cosine(clip_vision_embeddings(models, generated), clip_vision_embeddings(models, references))
    assert max(expected) < 0.99  # different images: a score of generated against itself would not pass
    np.testing.assert_allclose(models.clip_i(generated, references), expected, rtol=1e-5)
    np.testing.assert_allclose(models.clip_i(generated, generated), [1.0] * 3, rtol=1e-5)


def test_dino_is_the_cosine_of_the_cls_tokens(models):
    generated, references = images(1), flat_images()
    expected = numpy_cosine(dino_cls(models, generated), dino_cls(models, references))
    assert max(expected) < 0.99
    np.testing.assert_allclose(models.dino_score(generated, references), expected, rtol=1e-5)
    np.testing.assert_allclose(models.dino_score(generated, generated), [1.0] * 3, rtol=1e-5)


def test_clip_t_is_the_diagonal_of_clips_own_image_text_cosines(models):
    generated, prompts = images(3, 2), ["a dog on the moon", "a red car"]
    expected = np.diag(clip_cosines_from_logits(models, generated, prompts))
    np.testing.assert_allclose(models.clip_t(generated, prompts), expected, rtol=1e-5)


def test_clip_t_scores_each_image_against_its_own_prompt(models):
    image = images(5, 1)[0]
    prompts = ["a dog on the moon", "a red car parked under a tree at night"]
    cosines = clip_cosines_from_logits(models, [image], prompts)[0]  # the same image against both prompts
    assert abs(cosines[0] - cosines[1]) > 1e-2  # so a CLIP-T that ignored the prompt could not pass
    np.testing.assert_allclose(models.clip_t([image, image], prompts), cosines, rtol=1e-5)
    np.testing.assert_allclose(models.clip_t([image, image], prompts[::-1]), cosines[::-1], rtol=1e-5)
    empty = clip_cosines_from_logits(models, [image], [""])[0, 0]
    assert min(abs(cosines - empty)) > 1e-2  # nor one that scored the empty prompt


def test_clip_embeddings_are_the_projected_pooled_outputs(models):
    generated = images(4, 2)
    pixels = models.clip_processor(images=generated, return_tensors="pt").pixel_values
    with torch.no_grad():
        manual = models.clip.visual_projection(models.clip.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(models.clip_image_embeddings(generated), manual)
