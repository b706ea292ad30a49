"""Outputs against diffusers' own IP-Adapter (masking off) and the naive reference of ALGORITHM.md (masking on)."""

import pytest
import torch
from helpers import DEVICE, SD15_LAYER, SDXL_LAYER, ReferenceRun, reference_image, run_reference

from conceptrol import ConceptrolConfig, apply_conceptrol, find_concept_span
from conceptrol.tiny import load_tiny_ip_adapter, tiny_sd15_pipeline, tiny_sdxl_pipeline

ARCHS = {"sd15": (tiny_sd15_pipeline, SD15_LAYER), "sdxl": (tiny_sdxl_pipeline, SDXL_LAYER)}
PROMPT = "a photo of a dog surfing a wave"
TOL = dict(atol=1e-4, rtol=1e-4)


def make_pipe(arch, kinds="plus", tokenizer=None):
    pipe = ARCHS[arch][0](tokenizer=tokenizer)
    load_tiny_ip_adapter(pipe, kinds)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(DEVICE)


def kwargs(**over):
    base = dict(num_inference_steps=4, height=32, width=48, output_type="latent", guidance_scale=7.5,
                ip_adapter_image=reference_image(), generator=torch.Generator().manual_seed(0))
    return base | over


def spans_of(pipe, prompts, concepts, repeats=1):
    return [[find_concept_span(pipe.tokenizer, p, c) for c in concepts] for p in prompts for _ in range(repeats)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["base", "plus", "full-face"])
def test_masking_off_matches_vanilla_ip_adapter(arch, kind):
    pipe = make_pipe(arch, kind)
    vanilla = pipe(PROMPT, **kwargs()).images
    handle = apply_conceptrol(pipe, ConceptrolConfig(masking="none"))
    ours = handle(PROMPT, concepts=["dog"], **kwargs()).images
    torch.testing.assert_close(ours, vanilla, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("masking", ["global", "local"])
def test_masking_matches_reference_algorithm(arch, masking):
    pipe = make_pipe(arch)
    run = ReferenceRun(spans_of(pipe, [PROMPT], ["dog"]), masking=masking, concept_layer=ARCHS[arch][1])
    expected = run_reference(pipe, run, prompt=PROMPT, **kwargs()).images
    handle = apply_conceptrol(pipe, ConceptrolConfig(masking=masking))
    ours = handle(PROMPT, concepts=["dog"], **kwargs()).images
    vanilla = pipe(PROMPT, **kwargs()).images
    assert (ours - vanilla).abs().max() > 1e-2  # the masks change the result ...
    torch.testing.assert_close(ours, expected, **TOL)  # ... exactly as the reference does


@pytest.mark.parametrize("start,end", [(0.5, 1.0), (0.0, 0.5), (0.25, 0.75)])
def test_warm_up_window_matches_reference(start, end):
    pipe = make_pipe("sd15")
    run = ReferenceRun(spans_of(pipe, [PROMPT], ["dog"]), start=start, end=end)
    expected = run_reference(pipe, run, prompt=PROMPT, **kwargs()).images
    handle = apply_conceptrol(pipe, ConceptrolConfig(start=start, end=end))
    torch.testing.assert_close(handle(PROMPT, concepts=["dog"], **kwargs()).images, expected, **TOL)


def test_two_subjects_of_one_adapter_each_get_their_own_mask_and_softmax():
    pipe = make_pipe("sd15")
    prompt = "a dog and a cat on a sofa"
    images = [[reference_image(), reference_image((30, 200, 30))]]
    run = ReferenceRun(spans_of(pipe, [prompt], ["dog", "cat"]))
    expected = run_reference(pipe, run, prompt=prompt, **kwargs(ip_adapter_image=images)).images
    handle = apply_conceptrol(pipe)
    ours = handle(prompt, concepts=["dog", "cat"], **kwargs(ip_adapter_image=images)).images
    torch.testing.assert_close(ours, expected, **TOL)
    assert handle.masks.masks.shape[2] == 2


def test_two_adapters_map_concepts_in_order():
    pipe = make_pipe("sd15", ["plus", "base"])
    prompt = "a dog and a cat on a sofa"
    images = [reference_image(), reference_image((30, 200, 30))]
    run = ReferenceRun(spans_of(pipe, [prompt], ["dog", "cat"]))
    expected = run_reference(pipe, run, prompt=prompt, **kwargs(ip_adapter_image=images)).images
    handle = apply_conceptrol(pipe)
    ours = handle(prompt, concepts=["dog", "cat"], **kwargs(ip_adapter_image=images)).images
    torch.testing.assert_close(ours, expected, **TOL)


def test_without_cfg_each_sample_uses_its_own_rows():
    pipe = make_pipe("sd15")
    run = ReferenceRun(spans_of(pipe, [PROMPT], ["dog"]))
    expected = run_reference(pipe, run, prompt=PROMPT, **kwargs(guidance_scale=1.0)).images
    handle = apply_conceptrol(pipe)
    torch.testing.assert_close(handle(PROMPT, concepts=["dog"], **kwargs(guidance_scale=1.0)).images, expected, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_prompts_uses_each_samples_own_mask(arch):
    pipe = make_pipe(arch)
    prompts = ["a dog surfing a wave", "a small red car parked under a big tree with a dog"]
    concepts = [["dog"], ["dog"]]  # the same word sits at different token positions
    latents = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(1))
    handle = apply_conceptrol(pipe)
    batch = handle(prompts, concepts=concepts, **kwargs(latents=latents)).images
    batch_masks = handle.masks.final()
    for i, prompt in enumerate(prompts):
        single = handle(prompt, concepts=concepts[i], **kwargs(latents=latents[i : i + 1])).images
        torch.testing.assert_close(batch[i : i + 1], single, **TOL)
        torch.testing.assert_close(batch_masks[i : i + 1], handle.masks.final(), **TOL)
    assert not torch.allclose(batch_masks[0], batch_masks[1], atol=1e-3)


def test_images_per_prompt_match_the_reference_run_sample_by_sample():
    pipe = make_pipe("sd15")
    latents = torch.randn(3, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    run = ReferenceRun(spans_of(pipe, [PROMPT], ["dog"], repeats=3))
    expected = run_reference(pipe, run, prompt=PROMPT, **kwargs(latents=latents, num_images_per_prompt=3)).images
    handle = apply_conceptrol(pipe)
    ours = handle(PROMPT, concepts=["dog"], **kwargs(latents=latents, num_images_per_prompt=3)).images
    torch.testing.assert_close(ours, expected, **TOL)
    masks = handle.masks.final()
    assert masks.shape[:2] == (3, 1) and not torch.allclose(masks[0], masks[1], atol=1e-3)


def test_scale_override_matches_reference_with_that_scale():
    pipe = make_pipe("sd15")
    run = ReferenceRun(spans_of(pipe, [PROMPT], ["dog"]), scales=1.5)
    expected = run_reference(pipe, run, prompt=PROMPT, **kwargs()).images
    handle = apply_conceptrol(pipe, ConceptrolConfig(scale=1.5))
    torch.testing.assert_close(handle(PROMPT, concepts=["dog"], **kwargs()).images, expected, **TOL)
