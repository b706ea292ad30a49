"""Conceptrol on Qwen-Image-Edit (QwenImageEditPlusPipeline, QwenImageEditPipeline): ALGORITHM.md section 6.

The handle is checked against `NaiveQwen` below, a transcription of section 6 written from the spec alone: on a
second copy of the same tiny pipeline, every block's attention is an explicit softmax(q kᵀ/√d + bias)·v whose bias
table is filled cell by cell from section 6's table; the concept is found among the tokens the text encoder reads
(each token's characters overlapping the word's); Â is read at the concept block from an explicit softmax over the
text keys the model's text mask keeps, carried over to the next step, and a negative pass reads nothing. Tiny
pipelines with the real 60 blocks (the preset concept block 19 exists), fp32.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from diffusers import QwenImagePipeline
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0, apply_rotary_emb_qwen
from torch import Tensor

from conceptrol import ConceptrolConfig, ConceptrolError, apply_conceptrol
from conceptrol.core.errors import ConceptNotFoundError
from conceptrol.tiny import tiny_reference_image
from conceptrol.tiny.qwen import qwen_edit_components, tiny_qwen_edit, tiny_qwen_edit_plus

pytestmark = pytest.mark.usefixtures("one_thread")

CONCEPT_BLOCK = "transformer_blocks.19"  # the provisional preset of ALGORITHM.md section 6
DROP = 64  # the template tokens the pipelines drop from the front (prompt_template_encode_start_idx)
OUTSIDE_WINDOW_C = 0.5
ATOL = dict(atol=1e-5, rtol=1e-5)  # explicit softmax against SDPA, 60 blocks and 2 steps in fp32
PROMPT = "a dog wearing a hat"
LONG_PROMPT = "a photo of a small brown dog sitting on the grass in a park"


# ---------------------------------------------------------------------------------------------------------------
# The naive transcription of section 6


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(q kᵀ / √d + bias) v per sample: q, k, v [B, L, H, d], bias [B, L, L] -> [B, L, H*d]."""
    outs = []
    for b in range(q.shape[0]):
        qb, kb, vb = (x[b].transpose(0, 1).float() for x in (q, k, v))  # [H, L, d]
        logits = qb @ kb.transpose(-1, -2) / math.sqrt(qb.shape[-1]) + bias[b]
        outs.append((logits.softmax(dim=-1) @ vb).transpose(0, 1).flatten(1))
    return torch.stack(outs)


def concept_mask(q_latent: Tensor, k_text: Tensor, keep: list[bool], span: list[int]) -> Tensor:
    """Â: r[n] = mean over heads and t in S of P[h, n, t], P the softmax over the kept text keys only; r / mean r.
    q_latent [H, N, d], k_text [H, T, d]."""
    kept = [t for t in range(len(keep)) if keep[t]]
    logits = q_latent.float() @ k_text[:, kept].float().transpose(-1, -2) / math.sqrt(q_latent.shape[-1])
    probs = logits.softmax(dim=-1)  # [H, N, kept]
    r = torch.zeros(q_latent.shape[1])
    for h in range(probs.shape[0]):
        for t in span:
            r += probs[h, :, kept.index(t)]
    r = r / (probs.shape[0] * len(span))
    return r / r.mean()


class NaiveQwen:
    """Section 6 on a stock pipeline: explicit attention on every block, the state of one pipeline call."""

    def __init__(self, pipe, concepts: list, *, masking: bool = True, scale: float = 1.0, start: float = 0.0,
                 end: float = 1.0, steps: int = 2, block: str = CONCEPT_BLOCK, per_prompt: int = 1) -> None:
        self.pipe, self.concepts, self.masking, self.scale = pipe, concepts, masking, scale
        self.start, self.end, self.steps, self.block, self.per_prompt = start, end, steps, block, per_prompt

    def __call__(self, **kwargs) -> Tensor:
        self.spans = None  # [sample][reference]: text-key positions, or None for a global reference
        self.masks = {}  # (sample, reference) -> Â [N], the latest read
        self.step, self.timestep, self.negative = -1, None, False
        transformer, saved = self.pipe.transformer, dict(self.pipe.transformer.attn_processors)
        transformer.set_attn_processor({key: NaiveProcessor(self, key.removesuffix(".attn.processor"))
                                        for key in saved})
        hooks = [self.pipe.text_encoder.register_forward_pre_hook(self._on_text, with_kwargs=True),
                 transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True)]
        try:
            return self.pipe(**kwargs, output_type="latent").images
        finally:
            transformer.set_attn_processor(dict(saved))
            for hook in hooks:
                hook.remove()

    def _on_text(self, module, args, kwargs) -> None:
        """The first text encoding is the prompt's: find each concept among the tokens the model reads."""
        if self.spans is not None:
            return
        self.spans = []
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
            valid = [int(i) for i, m in zip(ids, mask) if m]
            located = [None if c is None else self._locate(valid, c) for c in self._concepts(len(self.spans))]
            self.spans += [located] * self.per_prompt

    def _concepts(self, sample: int) -> list:
        return self.concepts[sample // self.per_prompt] if isinstance(self.concepts[0], list) else self.concepts

    def _locate(self, ids: list[int], concept: str) -> list[int]:
        """Every token (after the dropped template) whose characters overlap the concept's whole word in the user's
        prompt (the text after the last vision block)."""
        pieces = [self.pipe.tokenizer.decode([i]) for i in ids]
        text = "".join(pieces)
        prompt_start = text.rindex("<|vision_end|>")
        match = re.compile(r"(?<![a-z0-9])" + re.escape(concept) + r"(?![a-z0-9])", re.I).search(text, prompt_start)
        tokens, position = [], 0
        for index, piece in enumerate(pieces):
            if piece and position < match.end() and position + len(piece) > match.start():
                tokens.append(index - DROP)
            position += len(piece)
        return tokens

    def _on_transformer(self, module, args, kwargs) -> None:
        """Which step and pass this is (a second call at the same timestep is the negative pass), and the layout."""
        timestep = float(kwargs["timestep"][0])
        self.negative = timestep == self.timestep
        if not self.negative:
            self.step, self.timestep = self.step + 1, timestep
        shapes = kwargs["img_shapes"][0]
        self.num_text = kwargs["encoder_hidden_states"].shape[1]
        sizes = [f * h * w for f, h, w in shapes]
        self.latent = list(range(self.num_text, self.num_text + sizes[0]))
        self.references, start = [], self.num_text + sizes[0]
        for size in sizes[1:]:
            self.references.append(list(range(start, start + size)))
            start += size
        mask = kwargs.get("encoder_hidden_states_mask")
        batch = kwargs["hidden_states"].shape[0]
        self.keep = [[True] * self.num_text if mask is None else [bool(m) for m in mask[b]] for b in range(batch)]
        self.bias_cache = None

    def c(self) -> float:
        outside = self.step / self.steps < self.start or (self.step + 1) / self.steps > self.end
        return OUTSIDE_WINDOW_C if outside else self.scale

    def bias(self, batch: int) -> Tensor:
        """Section 6's table for each sample, cell by cell; hidden text keys are blocked for every row."""
        if self.bias_cache is not None:
            return self.bias_cache
        length, log_c = self.num_text + len(self.latent) + sum(map(len, self.references)), math.log(self.c())
        tables = []
        for b in range(batch):
            table = [[0.0] * length for _ in range(length)]
            for i, reference in enumerate(self.references):
                span = self.spans[b][i] if self.masking else []
                if self.masking and span is None:
                    continue  # a global reference: nothing changed
                mask = self.masks.get((b, i))
                for n, row in enumerate(self.latent):
                    for col in reference:
                        table[row][col] = log_c + (math.log(mask[n]) if mask is not None else 0.0)
                for row in reference:
                    for col in self.latent + ([] if self.masking else list(range(self.num_text))):
                        table[row][col] = log_c
                for row in range(self.num_text):
                    for col in reference:
                        table[row][col] = log_c if (row in span or not self.masking) else -math.inf
            for col in range(self.num_text):
                if not self.keep[b][col]:
                    for row in range(length):
                        table[row][col] = -math.inf
            tables.append(table)
        self.bias_cache = torch.tensor(tables, dtype=torch.float64).float()[:, None]  # [B, 1, L, L]
        return self.bias_cache

    def read(self, query: Tensor, key: Tensor) -> None:
        """At the concept block of a positive pass: Â of every reference with a concept, per sample."""
        for b in range(query.shape[0]):
            for i, span in enumerate(self.spans[b]):
                if span is not None:
                    q = query[b, self.latent].transpose(0, 1)  # [H, N, d]
                    k = key[b, : self.num_text].transpose(0, 1)  # [H, T, d]
                    self.masks[(b, i)] = concept_mask(q, k, self.keep[b], span)
        self.bias_cache = None


class NaiveProcessor:
    """One block: the stock projections, norms and RoPE, then explicit attention with the naive bias."""

    def __init__(self, naive: NaiveQwen, name: str) -> None:
        self.naive, self.name = naive, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        head_dim = attn.inner_dim // attn.heads
        image = [p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v)]
        text = [p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        image[0], image[1] = attn.norm_q(image[0]), attn.norm_k(image[1])
        text[0], text[1] = attn.norm_added_q(text[0]), attn.norm_added_k(text[1])
        image_freqs, text_freqs = image_rotary_emb
        image[:2] = [apply_rotary_emb_qwen(x, image_freqs, use_real=False) for x in image[:2]]
        text[:2] = [apply_rotary_emb_qwen(x, text_freqs, use_real=False) for x in text[:2]]
        q, k, v = (torch.cat([t, i], dim=1) for t, i in zip(text, image))  # [text | latent | references]
        naive = self.naive
        out = explicit_attention(q, k, v, naive.bias(q.shape[0])[:, 0])
        if self.name == naive.block and naive.masking and not naive.negative:
            naive.read(q, k)  # after attending with the mask from before the read
        num_text = encoder_hidden_states.shape[1]
        return attn.to_out[0](out[:, num_text:]), attn.to_add_out(out[:, :num_text])


# ---------------------------------------------------------------------------------------------------------------
# Pipelines and calls


@pytest.fixture(scope="module")
def plus():
    return tiny_qwen_edit_plus()


@pytest.fixture(scope="module")
def plus_copy():
    return tiny_qwen_edit_plus()


@pytest.fixture(scope="module")
def edit():
    return tiny_qwen_edit()


@pytest.fixture(scope="module")
def edit_copy():
    return tiny_qwen_edit()


def references(count: int = 2) -> list:
    """A square reference and a portrait one (their token grids differ: 8 x 8 and 9 x 7)."""
    return [tiny_reference_image(0, 64), tiny_reference_image(1, 48).resize((48, 64))][:count]


def latents(batch: int = 1) -> Tensor:
    """Packed starting latents of a 768 x 512 image: 6 x 4 tokens of 16 channels."""
    return torch.randn(batch, 24, 16, generator=torch.Generator().manual_seed(0))


def plus_kwargs(**extra) -> dict:
    kwargs = dict(image=references(2), height=768, width=512, num_inference_steps=2, latents=latents())
    return kwargs | extra


def edit_kwargs(**extra) -> dict:
    kwargs = dict(image=references(1), height=768, width=512, num_inference_steps=2, latents=latents())
    return kwargs | extra


def run(pipe, config: ConceptrolConfig, concepts: list, **kwargs) -> tuple[Tensor, object]:
    handle = apply_conceptrol(pipe, config)
    try:
        return handle(concepts=concepts, output_type="latent", **kwargs).images, handle.masks
    finally:
        handle.remove()


@pytest.fixture
def transformer_calls(plus):
    """How often the Edit-Plus transformer ran (0: a call refused before its first step)."""
    calls = []
    hook = plus.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    yield calls
    hook.remove()


# ---------------------------------------------------------------------------------------------------------------
# The handle against the naive transcription


NAIVE_CASES = {  # id: (pipeline, config keywords, concepts, call keywords, naive keywords)
    "two-references": ("plus", {}, ["dog", "hat"], {}, {}),
    "one-reference": ("plus", {}, ["hat"], dict(image=references(1)), {}),
    "a-global-reference": ("plus", {}, [None, "hat"], {}, {}),
    # "park" lies past the negative prompt's text and latent tokens: its rows there are no text rows
    "true-cfg": ("plus", dict(scale=0.5), ["photo", "park"],
                 dict(prompt=LONG_PROMPT, negative_prompt="blurry", true_cfg_scale=3.0), dict(scale=0.5)),
    "two-images-per-prompt": ("plus", {}, ["dog", "hat"], dict(num_images_per_prompt=2, latents=latents(2)),
                              dict(per_prompt=2)),
    "strength": ("plus", dict(scale=0.5), ["dog"], dict(image=references(1)), dict(scale=0.5)),
    "window": ("plus", dict(start=0.5), ["dog"], dict(image=references(1)), dict(start=0.5)),
    "plain-strength": ("plus", dict(masking="none", scale=0.5), ["dog"], dict(image=references(1)),
                       dict(masking=False, scale=0.5)),
    # the text mask hides the shorter prompt's padding; the negative prompts' masks are the positives' swapped
    "edit-batch-true-cfg": (
        "edit", {}, [["dog"], ["cat"]],
        dict(prompt=["a dog", "a small cat on a sofa"], negative_prompt=["a small cat on a sofa", "a dog"],
             true_cfg_scale=2.0, image=references(1) * 2, latents=latents(2)), {}),
}


@pytest.mark.parametrize("case", list(NAIVE_CASES))
def test_final_latents_match_the_naive_transcription_of_section_6(case, request):
    kind, config, concepts, call, naive_kwargs = NAIVE_CASES[case]
    pipe, copy = request.getfixturevalue(kind), request.getfixturevalue(f"{kind}_copy")
    kwargs = (plus_kwargs if kind == "plus" else edit_kwargs)(**{"prompt": PROMPT} | call)
    ours, _ = run(pipe, ConceptrolConfig(**config), concepts, **kwargs)
    naive = NaiveQwen(copy, concepts, **naive_kwargs)(**kwargs)
    torch.testing.assert_close(ours, naive, **ATOL)


@pytest.mark.parametrize("kind", ["plus", "edit"])
def test_masking_none_is_the_stock_pipeline_bit_for_bit(kind, request, monkeypatch):
    """Nothing changes: the wrapped stock processor runs on every block of every pass."""
    pipe = request.getfixturevalue(kind)
    kwargs = (plus_kwargs if kind == "plus" else edit_kwargs)(prompt=PROMPT, negative_prompt="blurry",
                                                               true_cfg_scale=2.0)
    stock = pipe(**kwargs, output_type="latent").images
    stock_calls, call_stock = [], QwenDoubleStreamAttnProcessor2_0.__call__
    monkeypatch.setattr(QwenDoubleStreamAttnProcessor2_0, "__call__",
                        lambda *args, **kw: stock_calls.append(1) or call_stock(*args, **kw))
    ours, _ = run(pipe, ConceptrolConfig(masking="none"), ["dog", "hat"] if kind == "plus" else ["dog"], **kwargs)
    assert torch.equal(ours, stock)
    assert len(stock_calls) == 60 * 2 * 2  # blocks, steps, positive and negative passes


def test_a_user_callback_and_generator_pass_through_as_on_the_stock_pipeline(plus):
    """The handle follows the steps through callback_on_step_end without taking it from the user."""
    def halve_at_first_step(pipe, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        return {"latents": tensors["latents"] * 0.5} if step == 0 else {}

    kwargs = plus_kwargs(prompt=PROMPT, latents=None, callback_on_step_end=halve_at_first_step,
                         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    seen = []
    stock = plus(**kwargs, generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours, _ = run(plus, ConceptrolConfig(masking="none"), ["dog", "hat"], generator=torch.Generator().manual_seed(3),
                  **kwargs)
    assert torch.equal(ours, stock)
    assert seen == [(0, ["latents", "prompt_embeds"]), (1, ["latents", "prompt_embeds"])] * 2


def test_a_batch_with_padded_prompts_equals_the_prompts_one_by_one(edit):
    """QwenImageEditPipeline pads the shorter prompt and hides the padding with its text mask: the mask read and the
    bias must leave the padding out, so each sample is what its prompt gives alone."""
    prompts, concepts, starts = ["a dog", "a small cat on a sofa"], [["dog"], ["cat"]], latents(2)
    batch, _ = run(edit, ConceptrolConfig(), concepts, **edit_kwargs(prompt=prompts, image=references(1) * 2,
                                                                   latents=starts))
    for index in range(2):
        single, _ = run(edit, ConceptrolConfig(), concepts[index],
                        **edit_kwargs(prompt=prompts[index], latents=starts[index:index + 1]))
        torch.testing.assert_close(batch[index:index + 1], single, **ATOL)


def test_masks_hold_every_step_sample_and_reference_on_the_latent_grid(plus):
    kwargs = plus_kwargs(prompt=PROMPT, num_images_per_prompt=2, latents=latents(2))
    ours, masks = run(plus, ConceptrolConfig(), ["dog", None], **kwargs)
    assert not torch.allclose(ours, plus(**kwargs, output_type="latent").images, atol=1e-3)  # the masks acted
    assert masks.masks.shape == (2, 2, 2, 6, 4)  # [steps, samples, references, rows, cols] of a 768 x 512 image
    assert masks.layer == CONCEPT_BLOCK and masks.concepts[0][0] == "dog"
    torch.testing.assert_close(masks.masks[:, :, 0].mean(dim=(-1, -2)), torch.ones(2, 2))  # Â has mean 1
    assert torch.equal(masks.masks[:, :, 1], torch.ones(2, 2, 6, 4))  # a global reference reads nothing
    assert not torch.allclose(masks.masks[:, 0, 0], masks.masks[:, 1, 0])  # each sample its own mask


def placed_spans(pipe, concepts: list, **kwargs) -> tuple[list, list]:
    """The spans a handle places at its first transformer call, and the token ids the text encoder got (1 step)."""
    handle, spans, ids = apply_conceptrol(pipe), [], []
    hooks = [pipe.transformer.register_forward_pre_hook(lambda *a: spans.append(handle.state.call.spans)),  # after the
             pipe.text_encoder.register_forward_pre_hook(  # handle's own hook, which places them
                 lambda m, a, k: ids.append(k["input_ids"]), with_kwargs=True)]
    try:
        handle(concepts=concepts, output_type="latent", **kwargs | dict(num_inference_steps=1))
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()
    return spans[0], ids[0]


@pytest.mark.parametrize("kind", ["plus", "edit-batch"])
def test_each_concept_is_placed_where_the_text_encoder_reads_its_word(kind, request):
    if kind == "plus":
        pipe, prompts, concepts = request.getfixturevalue("plus"), [PROMPT], ["dog", "hat"]
        kwargs = plus_kwargs(prompt=PROMPT)
    else:  # the Edit pipeline with a list of images: unresized for the text encoder, one per padded prompt
        pipe, prompts, concepts = request.getfixturevalue("edit"), ["a dog", "the cat wears a hat"], [["dog"], ["hat"]]
        kwargs = edit_kwargs(prompt=prompts, image=references(1) * 2, latents=latents(2))
    spans, ids = placed_spans(pipe, concepts, **kwargs)
    for sample, prompt_concepts in enumerate(concepts if kind != "plus" else [concepts]):
        for span, word in zip(spans[sample], prompt_concepts):
            assert pipe.tokenizer.decode(ids[sample][DROP + span.start: DROP + span.stop]).strip() == word


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one ConceptrolError each, before the first step


BAD_CALLS = {
    "more concepts than references": (dict(concepts=["dog", "hat", None]), "3 concept\\(s\\) for 2 reference"),
    "fewer concepts than references": (dict(concepts=["dog"]), "1 concept\\(s\\) for 2 reference"),
    "a concept not in the prompt": (dict(concepts=["dog", "cat"]), "concept 'cat' not found in prompt"),
    "a word of the template only": (dict(concepts=["dog", "image"]), "concept 'image' not found in prompt"),
    "prompt_embeds without a prompt": (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 32)), "not prompt_embeds"),
    "no images": (dict(image=None), "pass image=\\[...\\]"),
    "images that are no PIL images": (dict(image=[torch.zeros(3, 64, 64)] * 2), "as PIL images"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_one_clear_error_before_the_first_step(case, plus, transformer_calls):
    change, message = BAD_CALLS[case]
    kwargs = plus_kwargs(prompt=PROMPT) | {"concepts": ["dog", "hat"]} | change
    handle = apply_conceptrol(plus)
    try:
        with pytest.raises(ConceptrolError, match=message):
            handle(**kwargs)
    finally:
        handle.remove()
    assert transformer_calls == []


def test_a_concept_not_in_the_prompt_suggests_the_closest_word(plus):
    handle = apply_conceptrol(plus)
    try:
        with pytest.raises(ConceptNotFoundError, match="did you mean 'dog'"):
            handle(concepts=["dgo", "hat"], **plus_kwargs(prompt=PROMPT))
    finally:
        handle.remove()


def test_an_unknown_concept_block_is_refused_at_apply(plus):
    with pytest.raises(ConceptrolError, match="'transformer_blocks.99' is not a block.*transformer_blocks.59"):
        apply_conceptrol(plus, ConceptrolConfig(concept_layer="transformer_blocks.99"))
    assert not any(getattr(p, "conceptrol", False) for p in plus.transformer.attn_processors.values())


def test_a_backend_without_an_additive_bias_is_refused_before_the_first_step(plus, transformer_calls):
    handle = apply_conceptrol(plus)
    try:
        for processor in plus.transformer.attn_processors.values():
            processor._attention_backend = "_native_flash"  # reaches the wrapped stock processor
        with pytest.raises(ConceptrolError, match="'_native_flash' cannot take the additive bias"):
            handle(concepts=["dog", "hat"], **plus_kwargs(prompt=PROMPT))
        assert transformer_calls == []
    finally:
        for processor in plus.transformer.attn_processors.values():
            processor._attention_backend = None
        handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# Install, remove, families


def test_apply_takes_both_edit_pipelines_and_remove_restores_the_same_processors(plus, edit):
    from conceptrol.qwenimage.handle import QwenEditHandle

    for pipe in (plus, edit):
        before = dict(pipe.transformer.attn_processors)
        handle = apply_conceptrol(pipe)
        assert isinstance(handle, QwenEditHandle) and handle.config.concept_layer == CONCEPT_BLOCK
        with pytest.raises(ConceptrolError, match="already applied"):
            apply_conceptrol(pipe)
        handle.remove()
        assert all(pipe.transformer.attn_processors[k] is p for k, p in before.items())


def test_no_other_family_takes_a_qwen_pipeline_and_qwen_takes_no_other(plus):
    import importlib

    from conceptrol.apply import FAMILIES
    from conceptrol.tiny.flux2 import tiny_flux2_klein

    families = {f.package: importlib.import_module(f"conceptrol.{f.package}") for f in FAMILIES}
    assert [name for name, family in families.items() if family.recognises(plus)] == ["qwenimage"]
    klein = tiny_flux2_klein(double=1, single=1)
    assert not families["qwenimage"].recognises(klein)


def test_a_qwen_pipeline_without_references_is_refused():
    components = qwen_edit_components(layers=2)
    components.pop("processor")
    with pytest.raises(ConceptrolError, match="QwenImagePipeline is not supported.*QwenImageEditPlusPipeline"):
        apply_conceptrol(QwenImagePipeline(**components))


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


def test_the_transformer_compiles_without_graph_breaks_under_the_handle():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    try:
        pipe = tiny_qwen_edit_plus(layers=3)
        config = ConceptrolConfig(concept_layer="transformer_blocks.1")
        eager, _ = run(pipe, config, ["dog", "hat"], **plus_kwargs(prompt=PROMPT))
        handle = apply_conceptrol(pipe, config)
        counter = CompileCounter()
        pipe.transformer.compile(backend=counter, fullgraph=True)  # a graph break raises
        compiled = handle(concepts=["dog", "hat"], output_type="latent", **plus_kwargs(prompt=PROMPT)).images
        torch.testing.assert_close(compiled, eager, **ATOL)
        assert counter.frame_count == 2  # the first step (no mask before the read) and the later ones
        handle(concepts=["hat", "dog"], output_type="latent", **plus_kwargs(prompt=PROMPT))
        assert counter.frame_count == 2  # other concepts: the spans and masks are tensors, nothing recompiles
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------
# The block analysis


def test_the_analysis_image_is_the_stock_image_and_every_block_has_a_map(plus):
    import numpy as np

    from conceptrol.analysis import analyze_blocks

    kwargs = dict(image=references(2), height=512, width=512, num_inference_steps=2)
    stock = plus(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    subject = np.zeros((512, 512))
    subject[:256] = 1.0
    analysis = analyze_blocks(plus, PROMPT, "dog", subject, seed=0, **kwargs)
    assert np.array_equal(np.asarray(analysis.cases[0].image), np.asarray(stock))
    assert analysis.architecture == "qwenimage" and analysis.preset == CONCEPT_BLOCK
    assert analysis.layers == [f"transformer_blocks.{i}" for i in range(60)]
    assert all(analysis.maps[block][0].shape == (2, 4, 4) for block in analysis.layers)  # [steps, rows, cols]
    assert not any(getattr(p, "conceptrol", False) or "Recording" in type(p).__name__
                   for p in plus.transformer.attn_processors.values())


@pytest.mark.parametrize("kind", ["plus", "edit"])
def test_the_recorder_places_the_concept_where_the_handle_does(kind, request):
    from conceptrol.qwenimage import map_recorder

    pipe = request.getfixturevalue(kind)
    kwargs = (plus_kwargs if kind == "plus" else edit_kwargs)(prompt=PROMPT)
    recorder = map_recorder(pipe)
    try:
        recorder.begin(recorder.spans_for(PROMPT, "hat"))
        pipe(**kwargs | dict(num_inference_steps=1), output_type="latent")
        recorded = recorder.call.spans
        recorder.end()
    finally:
        recorder.remove()
    handles, _ = placed_spans(pipe, ["hat"] if kind == "edit" else ["dog", "hat"], **kwargs)
    assert recorded == [handles[0][-1]]
