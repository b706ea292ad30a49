"""Conceptrol on FLUX.2 (ALGORITHM.md section 6): the handle against a transcription of the spec written from the
spec alone (tests/flux2_reference.py), the stock pipeline bit for bit with masking off, batches equal to singles,
concepts in the chat template, and every bad input refused before the first step.

The tiny pipelines have FLUX.2's real block layout (8 double-stream, 48 single-stream blocks) at tiny width; their
tokenizer spells every byte as a token, so a concept's position in the templated text is counted here by
tokenizing the text before it.
"""

import numpy as np
import pytest
import torch
from flux2_reference import Section6
from PIL import Image

from conceptrol import ConceptrolConfig, ConceptrolError, apply_conceptrol
from conceptrol.tiny.flux2 import tiny_flux2_dev, tiny_flux2_klein

PROMPT = "a dog wearing a red hat"
SIZE = 32  # output pixels: 8 x 8 latent tokens
REF = 64  # reference pixels (FLUX.2's smallest): 16 x 16 tokens each
TEXT = 80  # max_sequence_length of the tiny Klein calls
SPEC = dict(atol=2e-5, rtol=1e-4)  # fp32 attention against the float64 transcription, through 56 blocks and 2 steps


def reference(seed, size=REF):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def klein():
    pipe = tiny_flux2_klein()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fresh_klein(kv=False):
    pipe = tiny_flux2_klein(kv=kv)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(references=2, steps=2, guidance=2.0, prompt=PROMPT, seed=0, **extra):
    kwargs = dict(prompt=prompt, image=[reference(i + 1) for i in range(references)], height=SIZE, width=SIZE,
                  num_inference_steps=steps, max_sequence_length=TEXT, output_type="latent",
                  generator=torch.Generator().manual_seed(seed))
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    kwargs.update(extra)
    return kwargs


def klein_span(pipe, prompt, word, occurrence=0):
    """The word's token positions in Klein's templated prompt, counted by tokenizing the text before it."""
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    at = text.rfind(prompt)
    for _ in range(occurrence + 1):
        at = text.index(word, at + (1 if _ else 0))
    count = lambda part: len(pipe.tokenizer(part, add_special_tokens=False)["input_ids"])  # noqa: E731
    return count(text[:at]), count(text[:at + len(word)])


def transcription(kv=False, spans=None, references=2, steps=2, **config):
    """A fresh tiny pipeline (the same weights) under the transcription of section 6."""
    pipe = fresh_klein(kv)
    tokens = (SIZE // 4) ** 2
    run = Section6(pipe, spans, TEXT, tokens, [(REF // 4) ** 2] * references, "transformer_blocks.7", steps, kv=kv,
                   **config)
    return pipe, run


# --- The handle against the transcription ------------------------------------------------------------------------

CASES = {
    "two references": dict(concepts=["dog", "hat"]),
    "one reference": dict(concepts=["hat"], references=1),
    "a global reference": dict(concepts=[None, "dog"]),
    "strength and window": dict(concepts=["dog", "hat"], steps=3, config=dict(scale=0.8, start=0.0, end=0.5)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_klein_with_cfg_follows_section_6(klein, case):
    references, steps, config = case.get("references", 2), case.get("steps", 2), case.get("config", {})
    spans = [[klein_span(klein, PROMPT, word) if word else None for word in case["concepts"]]]
    handle = apply_conceptrol(klein, ConceptrolConfig(**config))
    try:
        got = handle(concepts=case["concepts"], **call_kwargs(references, steps)).images
    finally:
        handle.remove()
    pipe, run = transcription(spans=spans, references=references, steps=steps, **config)
    expected = pipe(callback_on_step_end=run.on_step_end, **call_kwargs(references, steps)).images
    torch.testing.assert_close(got, expected, **SPEC)
    assert not torch.allclose(got, klein(**call_kwargs(references, steps)).images, atol=1e-4)  # Conceptrol acts


def test_the_masks_of_a_call_are_each_references_own(klein):
    handle = apply_conceptrol(klein)
    try:
        handle(concepts=["dog", None], **call_kwargs(steps=2))
    finally:
        handle.remove()
    masks = handle.masks.masks  # [steps, samples, references, rows, cols]
    assert masks.shape == (2, 1, 2, SIZE // 4, SIZE // 4)
    torch.testing.assert_close(masks[:, :, 0].mean(dim=(-1, -2)), torch.ones(2, 1))  # Â has mean 1
    assert torch.equal(masks[:, :, 1], torch.ones_like(masks[:, :, 1]))  # the global reference is never masked
    assert handle.masks.concepts == [["dog", "(global)"]]


def test_the_kv_cache_pipeline_follows_section_6():
    pipe = fresh_klein(kv=True)
    spans = [[klein_span(pipe, PROMPT, "dog"), klein_span(pipe, PROMPT, "hat")]]
    handle = apply_conceptrol(pipe)
    got = handle(concepts=["dog", "hat"], **call_kwargs(steps=3, guidance=None)).images
    naive, run = transcription(kv=True, spans=spans, steps=3)
    expected = naive(callback_on_step_end=run.on_step_end, **call_kwargs(steps=3, guidance=None)).images
    torch.testing.assert_close(got, expected, **SPEC)


def test_flux2_dev_follows_section_6():
    pipe = tiny_flux2_dev(double=2, single=2)
    pipe.set_progress_bar_config(disable=True)
    length = 256  # the system message takes most of it
    prompt_text = pipe.tokenizer.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": _system_message()}]},
         {"role": "user", "content": [{"type": "text", "text": PROMPT}]}], tokenize=False)
    count = lambda part: len(pipe.tokenizer(part, add_special_tokens=False)["input_ids"])  # noqa: E731
    at = prompt_text.rfind(PROMPT) + PROMPT.index("hat")
    spans = [[(count(prompt_text[:at]), count(prompt_text[:at + 3]))]]
    kwargs = lambda: call_kwargs(references=1, guidance=4.0, max_sequence_length=length)  # noqa: E731
    handle = apply_conceptrol(pipe, ConceptrolConfig(concept_layer="transformer_blocks.1"))
    got = handle(concepts=["hat"], **kwargs()).images
    handle.remove()
    naive = tiny_flux2_dev(double=2, single=2)
    naive.set_progress_bar_config(disable=True)
    run = Section6(naive, spans, length, (SIZE // 4) ** 2, [(REF // 4) ** 2], "transformer_blocks.1", 2)
    expected = naive(callback_on_step_end=run.on_step_end, **kwargs()).images
    torch.testing.assert_close(got, expected, **SPEC)


def _system_message():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return SYSTEM_MESSAGE


# --- Masking off is the stock pipeline; batches are their samples ------------------------------------------------

@pytest.mark.parametrize("kv", [False, True], ids=["klein", "klein-kv"])
def test_masking_none_is_the_stock_pipeline_bit_for_bit(kv):
    pipe = fresh_klein(kv)
    guidance = None if kv else 2.0
    stock = pipe(**call_kwargs(guidance=guidance)).images
    handle = apply_conceptrol(pipe, ConceptrolConfig(masking="none"))
    got = handle(concepts=["dog", "hat"], **call_kwargs(guidance=guidance)).images
    assert torch.equal(got, stock)
    handle.remove()
    assert torch.equal(pipe(**call_kwargs(guidance=guidance)).images, stock)  # and nothing is left behind


def test_a_batch_equals_its_samples_each_with_its_own_mask(klein):
    prompts = [PROMPT, "a red hat on a sleepy dog"]
    latents = torch.randn(2, 16, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(3))
    handle = apply_conceptrol(klein)
    try:
        batch = handle(concepts=["dog", "hat"], **call_kwargs(prompt=prompts, latents=latents)).images
        singles = [handle(concepts=["dog", "hat"], **call_kwargs(prompt=p, latents=latents[i:i + 1])).images
                   for i, p in enumerate(prompts)]
    finally:
        handle.remove()
    torch.testing.assert_close(batch, torch.cat(singles), atol=1e-5, rtol=1e-5)


# --- Concepts in the chat template ------------------------------------------------------------------------------

def test_a_concept_is_placed_in_the_templated_prompt(klein):
    from conceptrol.flux2.text import locate_concept

    prompt = "a dog and a dog with a red hat"
    assert locate_concept(klein, prompt, "red hat", TEXT) == slice(*klein_span(klein, prompt, "red hat"))
    from conceptrol import Concept

    assert locate_concept(klein, prompt, Concept("dog", 1), TEXT) == slice(*klein_span(klein, prompt, "dog", 1))


def test_the_chat_template_path_agrees_with_clip_and_t5_spans():
    """The general path (offset mapping aligned with the ids the encoder gets) finds what the CLIP and T5 code finds."""
    from conceptrol import Concept
    from conceptrol.core.concepts import find_concept_in_text, find_concept_span, place_span
    from conceptrol.tiny.text import clip_tokenizer, t5_tokenizer

    for tokenizer in (clip_tokenizer(), t5_tokenizer()):
        # (the tiny T5 has no capitals: an unknown letter splits off a lone word-start token that section 1's search
        # counts with the word and section 6's overlap rule does not; real T5 pieces carry the word-start mark)
        for prompt, concept in [("a photo of a dog surfing a wave", "dog"), ("a teddy-bear, on the beach!", "Teddy-Bear"),
                                ("two cats and a cat", "cats and"), ("a dog, then a dog", Concept("dog", 1))]:
            encoded = tokenizer(prompt, padding="max_length", max_length=77, truncation=True)
            kept = [i for i, keep in enumerate(encoded["attention_mask"]) if keep]
            found = find_concept_in_text(tokenizer, prompt, prompt, concept)
            placed = place_span(found, list(encoded["input_ids"]), slice(kept[0], kept[-1] + 1), prompt=prompt)
            assert placed == find_concept_span(tokenizer, prompt, concept, 77), (tokenizer, prompt)


# --- Bad input: one clear error before the first step -------------------------------------------------------------

def refused(pipe, match, config=None, **call):
    steps = []
    handle = apply_conceptrol(pipe, config or ConceptrolConfig())
    kwargs = call_kwargs(callback_on_step_end=lambda p, i, t, k: steps.append(i) or {})
    concepts = call.pop("concepts", ["dog", "hat"])
    kwargs.update(call)
    try:
        with pytest.raises(ConceptrolError, match=match):
            handle(concepts=concepts, **kwargs)
    finally:
        handle.remove()
    assert steps == []


@pytest.mark.parametrize("concepts, match", [
    (["dog"], r"got 1 concept\(s\) for 2 reference image\(s\)"),
    (["dog", "hat", "red"], r"got 3 concept\(s\) for 2 reference image\(s\)"),
    (["cat", "hat"], r"concept 'cat' not found in prompt 'a dog wearing a red hat'"),
    (["assistant", "hat"], r"concept 'assistant' not found in prompt"),  # a word of the template only
    ([(3, 5), "hat"], r"takes concepts as words of the prompt"),
    ("dog", r"concepts must be a list"),
])
def test_concepts_that_do_not_fit_are_refused(klein, concepts, match):
    refused(klein, match, concepts=concepts)


def test_a_concept_past_the_text_limit_is_refused(klein):
    refused(klein, r"concept 'hat' sits at tokens .* past the text encoder's limit of 24 tokens",
            max_sequence_length=24)


@pytest.mark.parametrize("image, match", [
    (["not an image", None], r"reference 1 .*PIL image"),
    ([reference(1, size=32), reference(2)], r"reference 1 is 32x32 pixels.*at least 64"),
])
def test_references_the_pipeline_cannot_take_are_refused(klein, image, match):
    refused(klein, match, image=image)


def test_what_conceptrol_cannot_follow_is_refused(klein):
    refused(klein, "pass prompt=", prompt=None, prompt_embeds=torch.zeros(1, TEXT, 96))
    refused(klein, r"pass image=\[...\]", image=None)
    refused(klein, r"height must be a positive number of pixels", height=0)


def test_caption_upsampling_is_refused():
    pipe = tiny_flux2_dev(double=1, single=1)
    handle = apply_conceptrol(pipe, ConceptrolConfig(concept_layer="transformer_blocks.0"))
    with pytest.raises(ConceptrolError, match="caption_upsample_temperature rewrites the prompt"):
        handle(concepts=["dog"], **call_kwargs(references=1, caption_upsample_temperature=0.2))


def test_an_attention_backend_without_masks_is_refused(klein):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    klein.transformer.set_attention_backend("_native_flash")
    try:
        refused(klein, r"attention backend '_native_flash' cannot take the additive bias Conceptrol adds for FLUX.2")
        handle = apply_conceptrol(klein, ConceptrolConfig(masking="none"))  # no bias: any backend
        handle(concepts=["dog", "hat"], **call_kwargs(steps=1))
        handle.remove()
    finally:
        klein.transformer.set_attention_backend("native")
        _AttentionBackendRegistry.set_active_backend(active or AttentionBackendName.NATIVE)


def test_settings_that_do_not_fit_flux2_are_refused_at_apply(klein):
    with pytest.raises(ConceptrolError, match=r"concept block 'transformer_blocks.9' is not a block.*did you mean"):
        apply_conceptrol(klein, ConceptrolConfig(concept_layer="transformer_blocks.9"))
    with pytest.raises(ConceptrolError, match="FLUX.2 has no local masking"):
        apply_conceptrol(klein, ConceptrolConfig(masking="local"))
    handle = apply_conceptrol(klein)
    with pytest.raises(ConceptrolError, match="already applied"):
        apply_conceptrol(klein)
    handle.remove()
    with pytest.raises(ConceptrolError, match="this handle was removed"):
        handle(concepts=["dog", "hat"], **call_kwargs())


# --- torch.compile ------------------------------------------------------------------------------------------------

def test_compiled_transformer_has_no_graph_break():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    pipe = tiny_flux2_klein(double=2, single=2)
    pipe.set_progress_bar_config(disable=True)
    eager = apply_conceptrol(pipe, ConceptrolConfig(concept_layer="transformer_blocks.1"))
    expected = eager(concepts=["dog", "hat"], **call_kwargs(steps=3)).images
    counter = CompileCounter()
    pipe.transformer.compile(backend=counter, fullgraph=True)  # a graph break raises
    got = eager(concepts=["dog", "hat"], **call_kwargs(steps=3)).images
    first = counter.frame_count
    eager(concepts=["hat", "dog"], **call_kwargs(steps=4, prompt="a red hat on a small dog")).images
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert first <= 3 and counter.frame_count == first  # a new prompt, concepts or steps compile nothing new


def test_a_flux2_pipeline_conceptrol_does_not_follow_is_refused_and_flux1_is_not_taken_for_flux2(klein):
    from conceptrol.tiny import tiny_flux

    class Flux2KleinInpaintPipeline:  # the transformer is FLUX.2's, but `image` is the picture to inpaint
        transformer = klein.transformer

    with pytest.raises(ConceptrolError, match="Flux2KleinInpaintPipeline is not supported; Conceptrol follows FLUX.2"):
        apply_conceptrol(Flux2KleinInpaintPipeline())
    with pytest.raises(ConceptrolError, match="this FLUX pipeline has no reference adapter"):  # FLUX.1's own message
        apply_conceptrol(tiny_flux())
