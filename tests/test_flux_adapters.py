"""Conceptrol for XLabs' FLUX IP-Adapter, FLUX.1 Kontext and FLUX.1 Redux (ALGORITHM.md section 4).

On tiny FLUX.1 pipelines of the real block layout (19 + 38 blocks): with masking off the handles equal the stock
pipelines bit for bit; with it on they equal the naive transcription of section 4 in tests/flux_reference.py
(explicit attention, explicit bias table) up to round-off; batches equal single samples; the error paths.
"""

import pytest
import torch
from diffusers import FluxPriorReduxPipeline
from flux_reference import run_reference_ip, run_reference_kontext, run_reference_redux
from helpers import tiny_flux_with_two_xlabs_adapters

from conceptrol import ConceptrolConfig, ConceptrolError, apply_conceptrol
from conceptrol.tiny import tiny_flux, tiny_kontext, tiny_redux_prior, tiny_reference_image

PROMPT = "a dog on a beach"
ROUND_OFF = 1e-5  # explicit softmax (the reference) against SDPA, over 57 blocks


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dog(ip_pipe):
    """The T5 positions of 'dog' in PROMPT, found by spelling the tokens (the tiny T5 tokenizer spells letters)."""
    tokens = ip_pipe.tokenizer_2.convert_ids_to_tokens(ip_pipe.tokenizer_2(PROMPT).input_ids)
    assert "".join(tokens[1:4]).replace("▁", "") == "dog" and tokens[1].startswith("▁")
    return slice(1, 4)


@pytest.fixture(scope="module")
def kontext_pipe():
    pipe = tiny_kontext(seed=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def redux():
    pipe = tiny_flux(seed=3)
    pipe.set_progress_bar_config(disable=True)
    return pipe, tiny_redux_prior(seed=3)


def common(steps=2, height=32, width=48, **extra):
    """A call's keywords, with a fresh generator each time (a generator is consumed by the call it is given to)."""
    return dict(num_inference_steps=steps, height=height, width=width, output_type="latent",
                generator=torch.Generator().manual_seed(0)) | {"max_sequence_length": 32, **extra}


def ip_kwargs(**extra):
    return common(**{"ip_adapter_image": tiny_reference_image(), **extra})


def kontext_kwargs(**extra):
    merged = common(**extra)
    return merged | {"image": tiny_reference_image(), "_auto_resize": False, "max_area": merged["height"] * merged["width"]}


def run(pipe, config, **kwargs):
    handle = apply_conceptrol(pipe, config)
    try:
        return handle(concepts=["dog"], **kwargs).images, handle.masks
    finally:
        handle.remove()


def close(ours, reference):
    torch.testing.assert_close(ours, reference.output.images, atol=ROUND_OFF, rtol=0)


# --- XLabs IP-Adapter (section 4 (a)) --------------------------------------------------------------------------

def test_ip_adapter_with_masking_off_is_the_stock_pipeline_bit_for_bit(ip_pipe):
    stock = ip_pipe(prompt=PROMPT, **ip_kwargs()).images
    ours, masks = run(ip_pipe, ConceptrolConfig(masking="none"), prompt=PROMPT, **ip_kwargs())
    assert torch.equal(ours, stock) and masks is None


@pytest.mark.parametrize("masking", ["global", "local"])
def test_ip_adapter_equals_the_reference(ip_pipe, dog, masking):
    ours, masks = run(ip_pipe, ConceptrolConfig(masking=masking), prompt=PROMPT, **ip_kwargs(steps=3))
    reference = run_reference_ip(ip_pipe, [dog], masking=masking, prompt=PROMPT, **ip_kwargs(steps=3))
    close(ours, reference)
    torch.testing.assert_close(masks.masks[:, :, 0], reference.masks, atol=ROUND_OFF, rtol=0)
    assert masks.masks.shape == (3, 1, 1, 8, 12) and masks.masks.max() < 1  # M in [0, 1) on the 32x48 latent grid
    assert (ours - ip_pipe(prompt=PROMPT, **ip_kwargs(steps=3)).images).abs().max() > 1e-3


def test_ip_adapter_true_cfg_window_and_scale_equal_the_reference(ip_pipe, dog):
    extra = dict(negative_prompt="blurry", true_cfg_scale=2.0)
    config = ConceptrolConfig(start=0.25, end=0.75, scale=0.7)
    ours, _ = run(ip_pipe, config, prompt=PROMPT, **ip_kwargs(steps=4, **extra))
    reference = run_reference_ip(ip_pipe, [dog], scale=0.7, start=0.25, end=0.75, prompt=PROMPT,
                                 **ip_kwargs(steps=4, **extra))
    close(ours, reference)


def noise(batch):
    """Packed initial latents of a 32x48 tiny image (8x12 tokens of 16 channels), one row per sample."""
    return torch.randn(batch, 96, 16, generator=torch.Generator().manual_seed(1))


def test_ip_adapter_batch_uses_each_samples_own_mask_and_equals_single_runs(ip_pipe):
    prompts, latents = [PROMPT, "a cat and a dog"], noise(2)
    batch, masks = run(ip_pipe, ConceptrolConfig(), prompt=prompts, **ip_kwargs(latents=latents))
    for index, prompt in enumerate(prompts):
        single, single_masks = run(ip_pipe, ConceptrolConfig(), prompt=prompt,
                                   **ip_kwargs(latents=latents[index : index + 1]))
        torch.testing.assert_close(batch[index : index + 1], single, atol=ROUND_OFF, rtol=0)
        torch.testing.assert_close(masks.masks[:, index], single_masks.masks[:, 0], atol=ROUND_OFF, rtol=0)
    assert not torch.allclose(masks.masks[-1, 0], masks.masks[-1, 1])


def test_ip_adapter_scale_setters_state_dict_and_remove_keep_working(ip_pipe):
    saved = dict(ip_pipe.transformer.attn_processors)
    keys = set(ip_pipe.transformer.state_dict())
    handle = apply_conceptrol(ip_pipe)
    assert set(ip_pipe.transformer.state_dict()) == keys  # the IP weights are shared, not copied
    ip_pipe.set_ip_adapter_scale(0.0)  # reaches the wrapped processors
    try:
        zero = handle(prompt=PROMPT, concepts=["dog"], **ip_kwargs()).images
    finally:
        ip_pipe.set_ip_adapter_scale(1.0)
        handle.remove()
    no_adapter = run(ip_pipe, ConceptrolConfig(scale=0.0), prompt=PROMPT, **ip_kwargs())[0]
    torch.testing.assert_close(zero, no_adapter, atol=0, rtol=0)
    after = ip_pipe.transformer.attn_processors
    assert all(after[k] is saved[k] for k in saved)


# --- Kontext (section 4 (b)) -----------------------------------------------------------------------------------

def test_kontext_with_masking_off_and_c_one_is_the_stock_pipeline_bit_for_bit(kontext_pipe):
    stock = kontext_pipe(prompt=PROMPT, **kontext_kwargs()).images
    ours, _ = run(kontext_pipe, ConceptrolConfig(masking="none"), prompt=PROMPT, **kontext_kwargs())
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("config,extra", [
    (dict(), dict()),
    (dict(scale=2.0, start=0.5), dict(steps=4)),
    (dict(), dict(negative_prompt="blurry", true_cfg_scale=2.0)),
    (dict(masking="none", scale=2.0), dict()),
], ids=["conceptrol", "strength-and-window", "true-cfg", "plain-c"])
def test_kontext_equals_the_reference(kontext_pipe, dog, config, extra):
    ours, masks = run(kontext_pipe, ConceptrolConfig(**config), prompt=PROMPT, **kontext_kwargs(**extra))
    reference = run_reference_kontext(kontext_pipe, [dog], c=config.get("scale", 1.0), start=config.get("start", 0.0),
                                      masking=config.get("masking", "global"), prompt=PROMPT, **kontext_kwargs(**extra))
    close(ours, reference)
    if reference.masks is not None:
        torch.testing.assert_close(masks.masks[:, :, 0], reference.masks, atol=ROUND_OFF, rtol=0)
        torch.testing.assert_close(masks.masks.mean(dim=(-1, -2)), torch.ones(masks.masks.shape[:3]))


def test_kontext_batch_equals_single_runs(kontext_pipe):
    prompts, latents = [PROMPT, "a cat and a dog"], noise(2)
    batch, masks = run(kontext_pipe, ConceptrolConfig(), prompt=prompts, **kontext_kwargs(latents=latents))
    for index, prompt in enumerate(prompts):
        single, _ = run(kontext_pipe, ConceptrolConfig(), prompt=prompt, **kontext_kwargs(latents=latents[index : index + 1]))
        torch.testing.assert_close(batch[index : index + 1], single, atol=ROUND_OFF, rtol=0)
    assert not torch.allclose(masks.masks[-1, 0], masks.masks[-1, 1])


# --- Redux (section 4 (b)) -------------------------------------------------------------------------------------

def run_redux(pipe, prior, config, **kwargs):
    handle = apply_conceptrol(pipe, config, redux=prior)
    try:
        return handle(PROMPT, concepts=["dog"], image=tiny_reference_image(), **kwargs).images, handle.masks
    finally:
        handle.remove()


def test_redux_with_masking_off_is_the_stock_prior_then_pipeline_bit_for_bit(redux):
    pipe, prior = redux
    with_text = FluxPriorReduxPipeline(image_encoder=prior.image_encoder, feature_extractor=prior.feature_extractor,
                                       image_embedder=prior.image_embedder, text_encoder=pipe.text_encoder,
                                       tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
                                       tokenizer_2=pipe.tokenizer_2)
    embeds = with_text(tiny_reference_image(), prompt=PROMPT)  # the stock way, with the prompt read
    stock = pipe(prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled_prompt_embeds,
                 **common(max_sequence_length=512)).images
    ours, _ = run_redux(pipe, prior, ConceptrolConfig(masking="none"), **common(max_sequence_length=512))
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("extra", [dict(), dict(negative_prompt="blurry", true_cfg_scale=2.0)], ids=["plain", "true-cfg"])
def test_redux_equals_the_reference(redux, dog, extra):
    pipe, prior = redux
    ours, masks = run_redux(pipe, prior, ConceptrolConfig(), **common(**extra) | {"max_sequence_length": 512})
    kwargs = common(**extra)
    kwargs.pop("max_sequence_length")  # the reference encodes the prompt at 512 T5 tokens, as the prior does
    reference = run_reference_redux(pipe, prior, [dog], prompt=PROMPT, image=tiny_reference_image(), **kwargs)
    close(ours, reference)
    torch.testing.assert_close(masks.masks[:, :, 0], reference.masks, atol=ROUND_OFF, rtol=0)


# --- What is missing or ambiguous --------------------------------------------------------------------------------

def test_a_flux_pipeline_without_an_adapter_says_what_to_load():
    with pytest.raises(ConceptrolError, match="no reference adapter.*load_lora_weights.*load_ip_adapter.*Kontext.*redux="):
        apply_conceptrol(tiny_flux())


def test_two_adapters_at_once_are_refused(ip_pipe):
    prior = tiny_redux_prior()
    with pytest.raises(ConceptrolError, match="carries an IP-Adapter and a Redux prior"):
        apply_conceptrol(ip_pipe, redux=prior)


def test_redux_needs_the_pipelines_text_encoders():
    pipe = tiny_flux()
    pipe.text_encoder_2 = None
    with pytest.raises(ConceptrolError, match="needs its text encoders"):
        apply_conceptrol(pipe, redux=tiny_redux_prior())


@pytest.mark.parametrize("call,message", [
    (dict(concepts=["dog", "dog"]), "got 2 concept\\(s\\) for 1 reference image"),
    (dict(concepts=[(20, 24)], prompt=None, prompt_embeds=torch.zeros(1, 16, 32), pooled_prompt_embeds=torch.zeros(1, 32)),
     "past the 16 text tokens"),
    (dict(concepts=[(6, 9)]), "falls in the padding"),
    (dict(concepts=["dog"], height=30), "height must be a positive multiple of 4"),
    (dict(concepts=["dog"], ip_adapter_image=None), "pass ip_adapter_image="),
    (dict(concepts=["sun"]), "concept 'sun' not found"),
])
def test_mistakes_in_a_call_are_one_clear_error(ip_pipe, call, message):
    handle = apply_conceptrol(ip_pipe)
    kwargs = {"prompt": "a dog", **ip_kwargs(), **call}
    try:
        with pytest.raises(ConceptrolError, match=message):
            handle(**kwargs)
    finally:
        handle.remove()


def test_kontext_needs_its_reference_image(kontext_pipe):
    handle = apply_conceptrol(kontext_pipe)
    try:
        with pytest.raises(ConceptrolError, match="pass image=<the reference image> to FLUX.1 Kontext"):
            handle(prompt=PROMPT, concepts=["dog"], **common())
    finally:
        handle.remove()


def test_applying_twice_is_refused_until_removed(kontext_pipe):
    handle = apply_conceptrol(kontext_pipe)
    try:
        with pytest.raises(ConceptrolError, match="already applied"):
            apply_conceptrol(kontext_pipe)
    finally:
        handle.remove()
    apply_conceptrol(kontext_pipe).remove()


def test_two_xlabs_adapters_take_one_reference_and_concept_each_as_the_reference_does(tmp_path, dog):
    pipe = tiny_flux_with_two_xlabs_adapters(tmp_path)
    images = [tiny_reference_image(seed=1), tiny_reference_image(seed=2)]
    handle = apply_conceptrol(pipe)
    try:
        ours = handle(prompt=PROMPT, concepts=["dog", "beach"], **common(ip_adapter_image=images)).images
        masks = handle.masks.masks
    finally:
        handle.remove()
    beach = slice(7, 12)  # '▁b e a c h' after '▁a ▁d o g ▁o n ▁a'
    tokens = pipe.tokenizer_2.convert_ids_to_tokens(pipe.tokenizer_2(PROMPT).input_ids)
    assert "".join(tokens[beach]).replace("▁", "") == "beach"
    reference = run_reference_ip(pipe, [[dog, beach]], prompt=PROMPT, **common(ip_adapter_image=images))
    close(ours, reference)
    assert masks.shape[2] == 2 and not torch.allclose(masks[-1, 0, 0], masks[-1, 0, 1])
    torch.testing.assert_close(masks, reference.all_masks, atol=ROUND_OFF, rtol=0)
    with pytest.raises(ConceptrolError, match="got 1 reference image\\(s\\) for 2 loaded IP-Adapter"):
        apply_conceptrol(pipe)(prompt=PROMPT, concepts=["dog"], **common(ip_adapter_image=images[0]))


@pytest.mark.parametrize("kind", ["xlabs-ip", "kontext", "redux"])
def test_a_window_without_steps_is_refused_and_a_failed_call_leaves_no_masks(kind):  # audit D3, D23
    from helpers import flux_adapter_kwargs, tiny_flux_adapter

    pipe, extra = tiny_flux_adapter(kind)
    layer = dict(concept_layer="transformer_blocks.1")
    handle = apply_conceptrol(pipe, ConceptrolConfig(**layer), **extra)
    handle(prompt=PROMPT, concepts=["dog"], **flux_adapter_kwargs(kind, steps=2))
    assert handle.masks is not None

    def stop(pipe, step, timestep, tensors):
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        handle(prompt=PROMPT, concepts=["dog"], **flux_adapter_kwargs(kind, steps=2), callback_on_step_end=stop)
    assert handle.masks is None
    handle.remove()
    empty = apply_conceptrol(pipe, ConceptrolConfig(start=0.2, end=0.3, **layer), **extra)
    with pytest.raises(ConceptrolError, match="holds none of the 2 denoising steps"):
        empty(prompt=PROMPT, concepts=["dog"], **flux_adapter_kwargs(kind, steps=2))
    assert empty.state.call is None
