"""The attention block analysis (ALGORITHM.md section 5) against a transcription of the spec written apart from it.

The transcription: maps by an explicit softmax per head in Python loops (U-Net: A_txt of the conditional rows over
every text token; FLUX: the softmax over the text keys only of q·k/√d, q and k as diffusers builds them), upsampled to
the image with F.interpolate(mode="nearest"), and the AUC by comparing every subject pixel with every background pixel
(ties half). The library's path (cell-weighted AUC, chunked heads, one recorder per family) must agree with it.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flux_reference import concept_share, joint_qkv, text_share
from PIL import Image

from conceptrol import AnalysisCase, ConceptrolError, analyze_blocks
from conceptrol.analysis.auc import map_auc
from conceptrol.tiny import tiny_flux, tiny_sd15_pipeline, tiny_sdxl_pipeline

PROMPT = "a photo of a dog surfing a wave"
SIZE = dict(height=32, width=48)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# The transcription of section 5


def reference_auc(concept_map: torch.Tensor, subject: torch.Tensor) -> float:
    """P(map at a subject pixel > map at a background pixel) + 1/2 P(equal), over every pair of pixels."""
    pixels = F.interpolate(concept_map[None, None].double(), size=tuple(subject.shape), mode="nearest")[0, 0]
    inside, outside = pixels[subject], pixels[~subject]
    greater = (inside[:, None] > outside[None, :]).sum().item()
    equal = (inside[:, None] == outside[None, :]).sum().item()
    return (greater + 0.5 * equal) / (len(inside) * len(outside))


class NaiveUNetRecorder:
    """Every attn2 of the U-Net: a[n] = mean over heads and t in S of softmax(QKᵀ/√d) over all T text tokens, from the
    conditional half of the CFG batch; the stock processor still computes the output."""

    def __init__(self, pipe, span: slice):
        self.pipe, self.span, self.maps, self.hw = pipe, span, {}, None
        self.saved = dict(pipe.unet.attn_processors)
        recorder = self

        class Recording:
            def __init__(self, name, original):
                self.name, self.original = name, original

            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
                if encoder_hidden_states is not None:
                    recorder.record(self.name, attn, hidden_states, encoder_hidden_states)
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)

        pipe.unet.set_attn_processor({key: Recording(key.removesuffix(".processor"), p) if "attn2" in key else p
                                      for key, p in self.saved.items()})
        self.hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: setattr(self, "hw", (a[0] if a else k["sample"]).shape[-2:]),
                                                        with_kwargs=True)

    def record(self, name, attn, hidden, text):
        row = hidden.shape[0] - 1  # one sample under CFG: [uncond | cond], the cond row is the last
        q = attn.to_q(hidden[row]).view(-1, attn.heads, attn.to_q.out_features // attn.heads).transpose(0, 1)
        k = attn.to_k(text[row]).view(-1, attn.heads, attn.to_k.out_features // attn.heads).transpose(0, 1)
        n = q.shape[1]
        total = torch.zeros(n, dtype=torch.float64)
        for h in range(attn.heads):
            probs = (q[h].double() @ k[h].double().T / math.sqrt(q.shape[-1])).softmax(-1)  # [N, T]
            for t in range(self.span.start, self.span.stop):
                total += probs[:, t]
        height, width = self.hw
        while height * width > n:
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        self.maps.setdefault(name, []).append((total / (attn.heads * (self.span.stop - self.span.start))).view(height, width))

    def remove(self):
        self.pipe.unet.set_attn_processor(dict(self.saved))
        self.hook.remove()


class NaiveFluxRecorder:
    """Every FLUX.1 block: r[n] of the latent queries over the T5 keys only, from the first transformer call of each
    step (the positive pass); joint_qkv builds q and k as diffusers does (norms, rotary)."""

    def __init__(self, pipe, span: slice):
        self.pipe, self.span, self.maps, self.passes = pipe, span, {}, 0
        self.saved = dict(pipe.transformer.attn_processors)
        recorder = self

        class Recording:
            def __init__(self, name, original):
                self.name, self.original = name, original

            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
                if recorder.passes == 1:
                    q, k, _, _ = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
                    recorder.record(self.name, q, k)
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        pipe.transformer.set_attn_processor({k: Recording(k.removesuffix(".attn.processor"), p) for k, p in self.saved.items()})
        self.hook = pipe.transformer.register_forward_pre_hook(self.pre_hook, with_kwargs=True)

    def pre_hook(self, module, args, kwargs):
        self.passes += 1
        self.text = kwargs["encoder_hidden_states"].shape[1]
        ids = kwargs["img_ids"]
        self.grid = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def step_end(self, pipe, step, timestep, tensors):
        self.passes = 0
        return {}

    def record(self, name, q, k):
        latent = slice(self.text, self.text + self.grid[0] * self.grid[1])
        probs = text_share(q[0, latent].transpose(0, 1), k[0, : self.text].transpose(0, 1))  # [H, N, T]
        self.maps.setdefault(name, []).append(concept_share(probs.double(), self.span).view(*self.grid))

    def remove(self):
        self.pipe.transformer.set_attn_processor(dict(self.saved))
        self.hook.remove()


# ---------------------------------------------------------------------------------------------------------------
# AUC


@pytest.mark.parametrize("grid,size", [((4, 6), (32, 48)), ((5, 7), (32, 48)), ((3, 3), (16, 16)), ((8, 12), (20, 30))])
def test_the_auc_of_a_map_is_the_pixel_mann_whitney_auc_with_ties_counted_half(grid, size):
    generator = torch.Generator().manual_seed(sum(grid))
    for levels in (3, 1000):  # few levels: many ties; many: almost none
        concept_map = torch.randint(0, levels, grid, generator=generator).float()
        subject = torch.rand(size, generator=generator) > 0.6
        assert map_auc(concept_map, subject) == pytest.approx(reference_auc(concept_map, subject), abs=1e-12)


def test_a_constant_map_scores_one_half_and_a_perfect_one_one():
    subject = torch.zeros(8, 8, dtype=torch.bool)
    subject[2:6, 2:6] = True
    assert map_auc(torch.ones(4, 4), subject) == 0.5
    assert map_auc(subject.float(), subject) == 1.0 and map_auc(1 - subject.float(), subject) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Maps and AUCs of whole pipelines


@pytest.fixture(scope="module")
def sd15():
    pipe = tiny_sd15_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def square_mask(height=32, width=48) -> np.ndarray:
    mask = np.zeros((height, width))
    mask[8:24, 12:36] = 1.0
    return mask


def test_sd_maps_and_aucs_equal_the_transcription_from_the_conditional_rows(sd15):
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, negative_prompt="blurry, low quality", **SIZE)
    naive = NaiveUNetRecorder(sd15, clip_span(sd15.tokenizer, "dog"))
    try:
        stock = sd15(PROMPT, generator=torch.Generator("cpu").manual_seed(3), output_type="np", **kwargs).images[0]
    finally:
        naive.remove()
    analysis = analyze_blocks(sd15, PROMPT, "dog", square_mask(), seed=3, **kwargs)
    assert np.array_equal(np.asarray(analysis.cases[0].image), (stock * 255).round().astype(np.uint8))  # unchanged
    assert analysis.layers == list(naive.maps)  # every attn2, in execution order: down, mid, up
    subject = torch.from_numpy(square_mask() >= 0.5)
    for layer in analysis.layers:
        ours = analysis.maps[layer][0]
        theirs = torch.stack(naive.maps[layer])
        torch.testing.assert_close(ours.double(), theirs, atol=1e-6, rtol=1e-5)
        expected = [reference_auc(step_map, subject) for step_map in theirs]
        assert analysis.auc[layer][0] == pytest.approx(expected, abs=1e-9)


def test_flux_maps_of_every_block_equal_the_transcription_from_the_positive_pass():
    pipe = tiny_flux(seed=4, guidance=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, guidance_scale=3.5, max_sequence_length=32, negative_prompt="a blurry photo",
                  true_cfg_scale=2.0, **SIZE)  # true CFG: a second, negative transformer call each step
    span = pipe_span(pipe, "dog")
    naive = NaiveFluxRecorder(pipe, span)
    try:
        stock = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(1), callback_on_step_end=naive.step_end,
                     output_type="np", **kwargs).images[0]
    finally:
        naive.remove()
    analysis = analyze_blocks(pipe, PROMPT, "dog", square_mask(), seed=1, **kwargs)
    assert np.array_equal(np.asarray(analysis.cases[0].image), (stock * 255).round().astype(np.uint8))
    assert analysis.layers == [f"transformer_blocks.{i}" for i in range(19)] + [
        f"single_transformer_blocks.{i}" for i in range(38)]
    subject = torch.from_numpy(square_mask() >= 0.5)
    for layer in analysis.layers:
        theirs = torch.stack(naive.maps[layer])  # [2 steps, 2, 3]: 32x48 pixels in 16 px patches
        torch.testing.assert_close(analysis.maps[layer][0].double(), theirs, atol=1e-6, rtol=1e-5)
        assert analysis.auc[layer][0] == pytest.approx([reference_auc(m, subject) for m in theirs], abs=1e-9)


def clip_span(tokenizer, concept: str) -> slice:
    """The concept's CLIP positions (counting the start token): its tokens' first run in the prompt's tokens."""
    ids, word = tokenizer(PROMPT).input_ids, tokenizer(concept, add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i : i + len(word)] == word)
    return slice(start, start + len(word))


def pipe_span(pipe, concept: str) -> slice:
    """The concept's T5 positions, found by spelling the tokens (the tiny T5 tokenizer spells letter by letter)."""
    tokens = pipe.tokenizer_2.convert_ids_to_tokens(pipe.tokenizer_2(PROMPT).input_ids)
    text = [token.replace("▁", " ") for token in tokens]
    start = next(i for i in range(len(text)) if "".join(text[i:]).startswith(" " + concept))
    stop = next(i for i in range(start + 1, len(text) + 1) if "".join(text[start:i]).strip() == concept)
    return slice(start, stop)


def test_several_cases_are_ranked_on_the_mean_over_cases_and_the_chosen_steps(sd15):
    cases = [AnalysisCase(PROMPT, "dog", square_mask(), seed=0), AnalysisCase("a cat on a sofa", "cat", square_mask(), 1)]
    analysis = analyze_blocks(sd15, cases=cases, steps=slice(1, 3), num_inference_steps=3, **SIZE)
    assert len(analysis.cases) == 2 and all(len(per_case) == 2 for per_case in analysis.auc.values())
    for layer, per_case in analysis.auc.items():
        assert analysis.mean_auc[layer] == pytest.approx(sum(c[k] for c in per_case for k in (1, 2)) / 4)
    means = analysis.mean_auc
    assert analysis.ranking == sorted(analysis.layers, key=lambda layer: -means[layer])
    assert analysis.best == analysis.ranking[0] and analysis.preset == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"


def test_sdxl_records_its_deeper_layers_and_marks_its_preset():
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    analysis = analyze_blocks(pipe, PROMPT, "dog", square_mask(), num_inference_steps=2, **SIZE)
    assert analysis.architecture == "sdxl" and analysis.preset in analysis.layers
    assert "up_blocks.0.attentions.1.transformer_blocks.3.attn2" in analysis.layers  # SDXL's preset, in the tiny layout


@pytest.mark.parametrize("mask,message", [
    (np.zeros((32, 48)), "has no subject pixel"),
    (np.ones((32, 48)), "has no background pixel"),
    (np.ones((32, 32)), "another aspect ratio than the 48x32 image"),
])
def test_a_mask_that_cannot_score_is_one_clear_error(sd15, mask, message):
    with pytest.raises(ConceptrolError, match=message):
        analyze_blocks(sd15, PROMPT, "dog", mask, num_inference_steps=1, **SIZE)


def test_a_concept_missing_from_the_prompt_is_refused_before_any_step(sd15):
    steps = []
    with pytest.raises(ConceptrolError, match="concept 'horse' not found"):
        analyze_blocks(sd15, PROMPT, "horse", square_mask(), num_inference_steps=2,
                       callback_on_step_end=lambda *a: steps.append(1) or {}, **SIZE)
    assert steps == [] and not any("Recording" in type(p).__name__ for p in sd15.unet.attn_processors.values())


def test_a_mask_file_of_another_size_is_resized_with_nearest_neighbour(sd15, tmp_path):
    big = np.zeros((64, 96), dtype=np.uint8)
    big[17:47, 25:71] = 200  # >= half of full scale: subject; odd edges make nearest and bilinear differ
    Image.fromarray(big).save(tmp_path / "mask.png")
    analysis = analyze_blocks(sd15, PROMPT, "dog", tmp_path / "mask.png", num_inference_steps=1, **SIZE)
    expected = F.interpolate(torch.from_numpy(big / 255.0)[None, None], size=(32, 48), mode="nearest")[0, 0] >= 0.5
    assert torch.equal(analysis.cases[0].subject, expected)


def test_a_case_without_a_mask_is_segmented_from_the_concept_word(sd15):
    seen = []

    def segmenter(image, concept):
        seen.append((image.size, concept))
        return torch.from_numpy(square_mask(image.size[1], image.size[0]) >= 0.5)

    segmenter.name = "fake"
    analysis = analyze_blocks(sd15, PROMPT, "dog", None, segmenter=segmenter, num_inference_steps=1, **SIZE)
    assert seen == [((48, 32), "dog")] and analysis.cases[0].mask_source == "fake"
    with pytest.raises(ConceptrolError, match="needs a segmenter"):
        analyze_blocks(sd15, PROMPT, "dog", None, num_inference_steps=1, **SIZE)


def test_the_segmenters_give_a_mask_of_the_image_from_the_concept_word():
    from conceptrol.analysis.segment import BoxThenSam, ClipSeg
    from conceptrol.tiny.segment import tiny_clipseg, tiny_owlv2, tiny_sam

    image = Image.new("RGB", (48, 32), "red")
    box_then_sam = BoxThenSam("owlv2-sam", *tiny_owlv2(), *tiny_sam())
    x0, y0, x1, y1 = box_then_sam.best_box(image, "dog")
    assert 0 <= x0 <= x1 <= 48 and 0 <= y0 <= y1 <= 32
    for segmenter in (box_then_sam, ClipSeg(*tiny_clipseg())):
        mask = segmenter(image, "dog")
        assert mask.dtype == torch.bool and tuple(mask.shape) == (32, 48)


def test_a_segmenter_that_cannot_be_loaded_says_to_pass_a_mask():
    from conceptrol.analysis import load_segmenter

    with pytest.raises(ConceptrolError, match="could not load the clipseg segmenter .*; pass --mask FILE"):
        load_segmenter("clipseg")  # HF_HUB_OFFLINE=1 and nothing in the cache


def test_a_pipeline_with_an_adapter_loaded_is_refused_with_the_fix():
    from conceptrol.tiny import load_tiny_ip_adapter

    pipe = tiny_sd15_pipeline(seed=0)
    load_tiny_ip_adapter(pipe)
    with pytest.raises(ConceptrolError, match=r"unload the IP-Adapter first \(pipe.unload_ip_adapter\(\)\)"):
        analyze_blocks(pipe, PROMPT, "dog", square_mask(), num_inference_steps=1, **SIZE)
