"""Conceptrol for FLUX with OminiControl end to end, on a tiny FLUX pipeline with a random subject LoRA."""

import pytest
import torch
from helpers import reference_image

from conceptrol import ConceptrolConfig, ConceptrolError, apply_conceptrol
from conceptrol.tiny import tiny_flux_pipeline

PROMPT = "a photo of a dog surfing a wave"


def tiny_flux(t5_tok, with_lora=True):
    pipe = tiny_flux_pipeline(t5_tok=t5_tok, with_lora=with_lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(handle, **over):
    args = dict(image=reference_image(), height=16, width=24, num_inference_steps=3, condition_size=16,
                max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="latent")
    return handle(PROMPT, **(args | over)).images


def test_conceptrol_and_plain_ominicontrol_run_and_differ(t5_tok):
    pipe = tiny_flux(t5_tok)
    config = dict(concept_layer="transformer_blocks.1")
    plain = call(apply_conceptrol(pipe, ConceptrolConfig(masking="none", **config)), concepts=["dog"])
    handle = apply_conceptrol(pipe, ConceptrolConfig(**config))
    ours = call(handle, concepts=["dog"])
    assert ours.shape == plain.shape == (1, 4 * 6, 16) and (ours - plain).abs().max() > 1e-4
    masks = handle.masks.masks
    assert masks.shape == (3, 1, 1, 4, 6)  # steps, samples, concepts, packed grid of a 16x24 image
    torch.testing.assert_close(masks.mean(dim=(-1, -2)), torch.ones(3, 1, 1))


def test_outside_the_window_the_condition_scale_is_half(t5_tok, monkeypatch):
    pipe = tiny_flux(t5_tok)
    seen = []
    handle = apply_conceptrol(pipe, ConceptrolConfig(concept_layer="transformer_blocks.1", start=0.5, scale=2.0))
    original = handle.runner.__class__.__call__
    monkeypatch.setattr(handle.runner.__class__, "__call__",
                        lambda self, latents, inputs, cond, c, scale: (seen.append(scale), original(self, latents, inputs, cond, c, scale))[1])
    call(handle, concepts=["dog"], num_inference_steps=4)
    assert seen == [0.5, 0.5, 2.0, 2.0]


def test_a_batch_of_prompts_locates_the_concept_in_each(t5_tok):
    pipe = tiny_flux(t5_tok)
    handle = apply_conceptrol(pipe, ConceptrolConfig(concept_layer="transformer_blocks.1"))
    images = handle(["a dog surfing a wave", "a cat and a dog on a sofa"], concepts=["dog"], image=reference_image(),
                    height=16, width=16, num_inference_steps=2, condition_size=16, max_sequence_length=32,
                    output_type="latent").images
    assert images.shape[0] == 2 and handle.masks.masks.shape[1] == 2
    assert not torch.allclose(handle.masks.masks[-1, 0], handle.masks.masks[-1, 1])


def test_flux_without_the_lora_says_how_to_load_it(t5_tok):
    with pytest.raises(ConceptrolError, match="load_lora_weights"):
        apply_conceptrol(tiny_flux(t5_tok, with_lora=False))


@pytest.mark.parametrize(
    "config,over,message",
    [
        (dict(concept_layer="transformer_blocks.7"), {}, "not a block of this transformer"),
        (dict(concept_layer="transformer_blocks.1", masking="local"), {}, "no local masking"),
        (dict(concept_layer="transformer_blocks.1"), dict(height=10), "multiple of 4"),
        (dict(concept_layer="transformer_blocks.1"), dict(condition_size=6), "condition_size must be"),
        (dict(concept_layer="transformer_blocks.1"), dict(concepts=["wolf"]), "'wolf' not found"),
        (dict(concept_layer="transformer_blocks.1"), dict(concepts=["dog", "wave"]), "exactly one"),
        (dict(concept_layer="transformer_blocks.1"), dict(image=None), "pass image="),
    ],
)
def test_bad_flux_input_raises_clear_errors(t5_tok, config, over, message):
    pipe = tiny_flux(t5_tok)
    with pytest.raises(ConceptrolError, match=message):
        handle = apply_conceptrol(pipe, ConceptrolConfig(**config))
        call(handle, **({"concepts": ["dog"]} | over))


def test_bf16_runs_and_reads_masks_in_fp32(t5_tok):
    pipe = tiny_flux(t5_tok).to(dtype=torch.bfloat16)
    handle = apply_conceptrol(pipe, ConceptrolConfig(concept_layer="transformer_blocks.1"))
    out = call(handle, concepts=["dog"])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert handle.masks.masks.dtype == torch.float32
    torch.testing.assert_close(handle.masks.masks.mean(dim=(-1, -2)), torch.ones(3, 1, 1), atol=2e-2, rtol=0)


def test_step_callback_sees_every_step_and_may_replace_the_latents(t5_tok):
    handle = apply_conceptrol(tiny_flux(t5_tok), ConceptrolConfig(concept_layer="transformer_blocks.1"))
    seen = []

    def record(pipe, step, timestep, callback_kwargs):
        seen.append((step, tuple(callback_kwargs["latents"].shape)))
        return {}

    plain = call(handle, concepts=["dog"], callback_on_step_end=record)
    assert seen == [(0, (1, 24, 16)), (1, (1, 24, 16)), (2, (1, 24, 16))]
    torch.testing.assert_close(plain, call(handle, concepts=["dog"]))  # a callback that returns {} changes nothing
    zeroed = call(handle, concepts=["dog"], callback_on_step_end=lambda p, s, t, kw: {"latents": kw["latents"] * 0})
    assert zeroed.abs().max() == 0


def test_a_window_that_holds_no_step_is_refused_and_a_failed_call_leaves_no_masks(t5_tok):  # audit D3, D23
    handle = apply_conceptrol(tiny_flux(t5_tok), ConceptrolConfig(concept_layer="transformer_blocks.1"))
    call(handle, concepts=["dog"])
    assert handle.masks is not None
    empty = apply_conceptrol(handle.pipe, ConceptrolConfig(concept_layer="transformer_blocks.1", start=0.2, end=0.3))
    with pytest.raises(ConceptrolError, match="holds none of the 2 denoising steps"):
        call(empty, concepts=["dog"], num_inference_steps=2)

    def stop(pipe, step, timestep, tensors):
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        call(handle, concepts=["dog"], callback_on_step_end=stop)
    assert handle.masks is None
