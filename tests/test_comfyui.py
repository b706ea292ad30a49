"""The ComfyUI node pack against the real ComfyUI and ComfyUI_IPAdapter_plus (tiny random SD 1.5 and SDXL models).

Skipped unless CONCEPTROL_COMFYUI names a ComfyUI folder (see tests/comfyui_env.py); .ci/run sets it.
Expected masks are computed here by hand from the recorded queries and keys, not with the node's helpers.
"""

from __future__ import annotations

import asyncio
import math
import types

import comfyui_env as env
import pytest
import torch

from conceptrol.core.errors import ConceptNotFoundError, ConceptrolError

if env.comfy_root() is None:
    pytest.skip(env.SKIP_REASON, allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; two spinning threads slowed SDXL 50x under load

from conceptrol.comfyui import patch as conceptrol_patch  # noqa: E402
from conceptrol.comfyui.nodes import Conceptrol, ConceptrolMask  # noqa: E402

PROMPT = "a photo of a (dog:1.2) on a beach"
DOG = slice(5, 6)  # BOS, a, photo, of, a, dog


@pytest.fixture(scope="module")
def comfy():
    return env.load_comfyui()


@pytest.fixture(scope="module")
def base(comfy):
    return env.tiny_sd15_model()


@pytest.fixture(scope="module")
def clip(comfy):
    return env.tiny_clip()


@pytest.fixture(scope="module")
def conds(clip):
    return env.encode(clip, PROMPT), env.encode(clip, "")


@pytest.fixture(scope="module")
def adapted(base):
    return env.apply_ipadapter(base)


def conceptrol(model, clip, concepts="dog", prompt=PROMPT, masking="global"):
    return Conceptrol().apply(model, clip, prompt, concepts, masking)[0]


class Spy:
    """Stands in for the concept layer's patch of one model and records what ComfyUI hands it."""

    def __init__(self, model, key=("output", 3)):
        attn2 = model.model_options["transformer_options"]["patches_replace"]["attn2"]
        self.inner, self.calls = attn2[key], []
        attn2[key] = self

    def __call__(self, q, k, v, extra_options):
        self.calls.append((q.clone(), k.clone(), list(extra_options["cond_or_uncond"])))
        return self.inner(q, k, v, extra_options)


class BranchSpy(Spy):
    """A Spy that also records what the patch added to the text attention, and the adapter's own (unmasked) output.

    The patch returns text + branch * mask; with `added` = returned - text, `added` = branch * mask row by row.
    """

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        out = self.inner(q, k, v, extra_options)
        text = optimized_attention(q, k, v, extra_options["n_heads"])
        (callback,), (kwargs,) = self.inner.callbacks, self.inner.kwargs  # one IPAdapter
        branch = callback(text, q, k, v, extra_options, **kwargs)
        self.calls.append((q.clone(), k.clone(), list(extra_options["cond_or_uncond"]), out - text, branch))
        return out


def mask_by_hand(q, k, chunks, span, heads=2):
    """Section 1's M from the conditional chunk of one call: [S, N]."""
    rows = q.shape[0] // len(chunks)
    cond = chunks.index(0)
    q, k = q[cond * rows : (cond + 1) * rows], k[cond * rows : (cond + 1) * rows]
    d = q.shape[-1] // heads
    qh = q.reshape(rows, -1, heads, d).permute(0, 2, 1, 3)
    kh = k.reshape(rows, -1, heads, d).permute(0, 2, 1, 3)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [S, H, N, T]
    m = probs[..., span].mean(dim=-1).mean(dim=1)  # [S, N]
    return m / (m.max(dim=-1, keepdim=True).values + 1e-6)


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg-batch", "cond-only"])
def test_recorded_mask_equals_the_text_attention_by_hand(adapted, clip, conds, cfg):
    model = conceptrol(adapted, clip)
    spy = Spy(model)
    env.ksample(model, *conds, cfg=cfg, steps=2)
    run = model.attachments["conceptrol"]
    assert len(run.last_records) == len(spy.calls) == 2
    assert {tuple(chunks) for _, _, chunks in spy.calls} == ({(1, 0)} if cfg != 1.0 else {(0,)})
    for (q, k, chunks), record in zip(spy.calls, run.last_records):
        expected = mask_by_hand(q, k, chunks, DOG).reshape(1, 1, 4, 4)  # ("output", 3) runs at 1/4 of the 16x16 latent
        torch.testing.assert_close(record, expected, rtol=1e-5, atol=1e-6)
    assert run.last_records[0].std() > 0.05  # a real mask, not a flat one


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg-batch", "cond-only"])
def test_each_sample_of_a_batch_gets_its_own_mask_in_both_halves(adapted, clip, conds, cfg):
    """Two latents, one prompt: sample b's mask comes from its own cond row and acts on its uncond and cond rows."""
    model = conceptrol(adapted, clip)
    at_concept, after = BranchSpy(model), BranchSpy(model, ("output", 4))  # ("output", 4): same 4x4 grid, later
    samples = {"samples": env.ksample(model, *conds, steps=2, batch=2, cfg=cfg)}
    records = model.attachments["conceptrol"].last_records
    assert len(records) == len(at_concept.calls) == len(after.calls) == 2
    for record, (q, k, chunks, added, branch), (*_, added_after, branch_after) in zip(records, at_concept.calls,
                                                                                      after.calls):
        assert chunks == ([1, 0] if cfg != 1.0 else [0]) and q.shape[0] == 2 * len(chunks)  # uncond 0, 1, cond 0, 1
        by_hand = mask_by_hand(q, k, chunks, DOG)  # [2, 16]: each sample's own, from its cond row
        torch.testing.assert_close(record, by_hand.reshape(2, 1, 4, 4), rtol=1e-5, atol=1e-6)
        assert (by_hand[0] - by_hand[1]).abs().max() > 0.05  # the samples' masks differ
        per_row = by_hand.repeat(len(chunks), 1).unsqueeze(-1)  # [rows, 16, 1]: samples 0, 1 in each half
        assert branch.abs().min() > 0 and branch_after.abs().min() > 0
        torch.testing.assert_close(added, branch * per_row, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(added_after, branch_after * per_row, rtol=1e-4, atol=1e-5)  # the global mask
    mask, _ = ConceptrolMask().mask(model, samples, 0)
    assert mask.shape == (2, 128, 128) and torch.equal(mask[:, ::32, ::32], records[-1][:, 0])


def ones_or_zeros(value):
    def fake_concept_mask(probs, weights):
        return torch.full((probs.shape[0], weights.shape[1], probs.shape[2]), value)

    return fake_concept_mask


def test_mask_of_ones_gives_plain_ipadapter_plus_with_its_own_options(base, clip, conds, monkeypatch):
    user_mask = torch.zeros(1, 64, 64)
    user_mask[:, :, :40] = 1.0
    model = env.apply_ipadapter(base, weight=0.8, start_at=0.3, end_at=0.9, attn_mask=user_mask, weight_type="ease in")
    expected = env.ksample(model, *conds, steps=4)
    monkeypatch.setattr(conceptrol_patch, "concept_mask", ones_or_zeros(1.0))
    assert torch.equal(env.ksample(conceptrol(model, clip), *conds, steps=4), expected)


def test_mask_of_zeros_gives_the_model_without_ipadapter(base, adapted, clip, conds, monkeypatch):
    expected = env.ksample(base, *conds)
    monkeypatch.setattr(conceptrol_patch, "concept_mask", ones_or_zeros(0.0))
    assert torch.equal(env.ksample(conceptrol(adapted, clip), *conds), expected)
    assert not torch.equal(env.ksample(adapted, *conds), expected)


def test_conceptrol_changes_the_picture_and_a_rerun_repeats_it(adapted, clip, conds):
    model = conceptrol(adapted, clip)
    first = env.ksample(model, *conds)
    assert torch.equal(env.ksample(model, *conds), first)  # nothing carries over from the first run
    assert not torch.equal(env.ksample(adapted, *conds), first)


def test_local_masking_differs_from_global(adapted, clip, conds):
    local = env.ksample(conceptrol(adapted, clip, masking="local"), *conds)
    assert not torch.equal(env.ksample(conceptrol(adapted, clip), *conds), local)


def test_input_model_is_left_untouched(adapted, clip, conds):
    attn2 = adapted.model_options["transformer_options"]["patches_replace"]["attn2"]
    before = {key: (patch, list(patch.callback), [dict(k) for k in patch.kwargs]) for key, patch in attn2.items()}
    picture = env.ksample(adapted, *conds)
    env.ksample(conceptrol(adapted, clip), *conds)
    after = adapted.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert after is attn2 and set(after) == set(before)
    for key, (patch, callbacks, kwargs) in before.items():
        assert after[key] is patch and patch.callback == callbacks and len(patch.kwargs) == len(kwargs)
        assert all(a.keys() == b.keys() and all(a[n] is b[n] for n in a) for a, b in zip(patch.kwargs, kwargs))
    assert not adapted.get_all_wrappers("outer_sample") and "conceptrol" not in adapted.attachments
    assert torch.equal(env.ksample(adapted, *conds), picture)


def test_ipadapter_after_conceptrol_is_refused(adapted, clip):
    with pytest.raises(ConceptrolError, match="after every IPAdapter"):
        env.apply_ipadapter(conceptrol(adapted, clip), seed=5)


def test_mask_node_previews_the_last_read_at_image_size(adapted, clip, conds):
    model = conceptrol(adapted, clip)
    samples = {"samples": env.ksample(model, *conds, steps=2)}
    mask, image = ConceptrolMask().mask(model, samples, 0)
    assert mask.shape == (1, 128, 128) and image.shape == (1, 128, 128, 3)
    last = model.attachments["conceptrol"].last_records[-1][0, 0]  # [4, 4]
    assert torch.equal(mask[0, ::32, ::32], last) and torch.equal(image[..., 1], mask)
    with pytest.raises(ConceptrolError, match="1 concept"):
        ConceptrolMask().mask(model, samples, 1)


def test_mask_node_shows_the_run_that_made_its_latent_not_the_latest_run(adapted, clip, conds):
    """ComfyUI's cache can hand the mask node a LATENT from an earlier run of the same Conceptrol output (its concept
    index changed, --cache-lru, a second sampler node): the mask is that run's, not the last one's."""
    model = conceptrol(adapted, clip)
    first = {"samples": env.ksample(model, *conds, seed=0, steps=2)}
    first_read = model.attachments["conceptrol"].last_records[-1]
    second = {"samples": env.ksample(model, *conds, seed=1, steps=2)}
    second_read = model.attachments["conceptrol"].last_records[-1]
    assert not torch.equal(first_read, second_read)
    assert torch.equal(ConceptrolMask().mask(model, first, 0)[0][:, ::32, ::32], first_read[:, 0])
    assert torch.equal(ConceptrolMask().mask(model, second, 0)[0][:, ::32, ::32], second_read[:, 0])
    with pytest.raises(ConceptrolError, match="not made by sampling this Conceptrol node's MODEL"):
        ConceptrolMask().mask(model, {"samples": first["samples"] * 2}, 0)  # e.g. changed by another node
    with pytest.raises(ConceptrolError, match="no concept mask recorded yet"):
        ConceptrolMask().mask(conceptrol(adapted, clip), first, 0)


def test_split_batches_read_from_cond_and_reuse_it_for_uncond(adapted, clip, conds, comfy, monkeypatch):
    monkeypatch.setattr(adapted.model, "memory_required", lambda *args, **kwargs: math.inf)  # one chunk a batch
    model = conceptrol(adapted, clip)
    spy = Spy(model)
    env.ksample(model, *conds, steps=2)
    assert [chunks for _, _, chunks in spy.calls] == [[1], [0], [1], [0]]  # ComfyUI runs uncond first
    records = model.attachments["conceptrol"].last_records
    assert len(records) == 2  # read from the cond-only batches only
    for (q, k, chunks), record in zip(spy.calls[1::2], records):
        torch.testing.assert_close(record, mask_by_hand(q, k, chunks, DOG).reshape(1, 1, 4, 4), rtol=1e-5, atol=1e-6)


def call_patch(run, key, q, k, chunks, callback):
    """One attn2 call of a ConceptrolAttn2 holding a single adapter `callback` on an 8x8 latent."""
    source = type("Source", (), {"callback": [callback], "kwargs": [{"sigma_start": 1e9, "sigma_end": 0.0}]})()
    patch = conceptrol_patch.ConceptrolAttn2(source, run)
    options = {"block": key[:2], "block_index": key[2], "cond_or_uncond": chunks, "n_heads": 2,
               "original_shape": [q.shape[0], 4, 8, 8]}
    return patch(q, k, k, options)


def test_uncond_only_batch_uses_the_latest_cond_read(comfy):
    from comfy.ldm.modules.attention import optimized_attention

    run = conceptrol_patch.ConceptrolRun(spans=[DOG], labels=["dog"], concept_layer=("output", 3, 0))
    generator = torch.Generator().manual_seed(0)
    q16, q64 = torch.randn(1, 16, 8, generator=generator) * 3, torch.randn(1, 64, 8, generator=generator)
    k = torch.randn(1, 77, 8, generator=generator)

    def unit(out, q, k, v, extra_options, **kwargs):
        return torch.ones_like(out)

    before = call_patch(run, ("input", 1, 0), q64, k, [1], unit) - optimized_attention(q64, k, k, 2)
    torch.testing.assert_close(before, torch.ones_like(before), rtol=0, atol=1e-6)  # no read yet: unmasked
    call_patch(run, ("output", 3, 0), q16, k, [0], unit)  # the concept layer reads from the cond batch
    read = mask_by_hand(q16, k, [0], DOG).reshape(1, 1, 4, 4)
    torch.testing.assert_close(run.global_mask, read, rtol=1e-5, atol=1e-6)
    after = call_patch(run, ("input", 1, 0), q64, k, [1], unit) - optimized_attention(q64, k, k, 2)
    expected = torch.nn.functional.interpolate(run.global_mask, size=(8, 8), mode="nearest").reshape(1, 64, 1)
    torch.testing.assert_close(after, expected.expand(1, 64, 8), rtol=0, atol=1e-6)


def test_two_subjects_each_get_their_own_mask(base, clip, comfy, monkeypatch):
    prompt = "a dog and a cat"
    positive, negative = env.encode(clip, prompt), env.encode(clip, "")
    dog_only = env.apply_ipadapter(base, seed=3)
    both = env.apply_ipadapter(dog_only, seed=7)
    model = conceptrol(both, clip, "dog, cat", prompt)
    spy = Spy(model)
    env.ksample(model, positive, negative, steps=2)
    records = model.attachments["conceptrol"].last_records
    for (q, k, chunks), record in zip(spy.calls, records):
        by_hand = [mask_by_hand(q, k, chunks, span).reshape(1, 4, 4) for span in (slice(2, 3), slice(5, 6))]
        torch.testing.assert_close(record, torch.stack(by_hand, dim=1), rtol=1e-5, atol=1e-6)

    def first_on_second_off(probs, weights):  # concept 0 (dog) unmasked, concept 1 (cat) masked out
        mask = torch.zeros(probs.shape[0], weights.shape[1], probs.shape[2])
        mask[:, 0] = 1.0
        return mask

    monkeypatch.setattr(conceptrol_patch, "concept_mask", first_on_second_off)
    expected = env.ksample(dog_only, positive, negative)
    assert torch.equal(env.ksample(conceptrol(both, clip, "dog, cat", prompt), positive, negative), expected)


# SDXL: a tiny SDXL-layout model (SDXL's blocks and transformer depths, text width 2048, `y` from clip_g's pooled
# output), a tiny SDXL CLIP (SDXL's 'g' and 'l' tokenizations) and an adapter IPAdapter_plus takes for SDXL

@pytest.fixture(scope="module")
def sdxl(comfy):
    clip = env.tiny_sdxl_clip()
    base = env.tiny_sdxl_model()
    adapted = env.apply_ipadapter(base, sdxl=True)
    positive, negative = env.encode(clip, PROMPT), env.encode(clip, "")
    assert positive[0][0].shape == (1, 77, 2048) and positive[0][1]["pooled_output"].shape == (1, 1280)
    return types.SimpleNamespace(clip=clip, base=base, adapted=adapted, conds=(positive, negative))


def test_sdxl_clip_tokenizations_agree_and_the_node_finds_the_concept_in_them(sdxl):
    from conceptrol.comfyui.tokens import find_token_spans

    tokens = sdxl.clip.tokenize(PROMPT)
    assert set(tokens) == {"g", "l"}  # SDXL's text is both encoders' hidden states side by side, position by position
    (g,), (l,) = tokens["g"], tokens["l"]
    ids = [token for token, _ in l]
    assert len(g) == len(l) == 77 and ids[:10] == [49406, 320, 1125, 539, 320, 1929, 525, 320, 2117, 49407]
    assert g[:10] == l[:10] and l[5] == (1929, 1.2)  # 'dog' with its weight
    assert {token for token, _ in g[10:]} == {0} and set(ids[10:]) == {49407}  # only the padding differs
    assert find_token_spans(sdxl.clip, PROMPT, ["dog", "(dog:1.2)", "a beach"]) == [DOG, DOG, slice(7, 9)]
    long_prompt = "word " * 80 + "and a dog"  # the second 77-token chunk, in both tokenizations
    assert find_token_spans(sdxl.clip, long_prompt, ["dog"]) == [slice(77 + 1 + 5 + 2, 77 + 1 + 5 + 3)]
    assert env.encode(sdxl.clip, long_prompt)[0][0].shape == (1, 154, 2048)
    with pytest.raises(ConceptNotFoundError, match=r"concept 'cat' is not in the prompt .*its words are 'a', 'photo'"):
        conceptrol(sdxl.adapted, sdxl.clip, "cat")


@pytest.fixture(scope="module")
def sdxl_plain(sdxl):
    """The tiny SDXL model with IPAdapter_plus alone, sampled (3 steps)."""
    return env.ksample(sdxl.adapted, *sdxl.conds)


def test_sdxl_recorded_mask_equals_the_text_attention_by_hand(sdxl, sdxl_plain):
    attn2 = sdxl.adapted.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(attn2) == 70 and ("output", 1, 3) in attn2  # IPAdapter_plus patched it as an SDXL model
    model = conceptrol(sdxl.adapted, sdxl.clip)
    assert model.attachments["conceptrol"].concept_layer == ("output", 1, 3)
    spy = Spy(model, ("output", 1, 3))
    picture = env.ksample(model, *sdxl.conds)
    records = model.attachments["conceptrol"].last_records
    assert len(records) == len(spy.calls) == 3
    for (q, k, chunks), record in zip(spy.calls, records):
        assert chunks == [1, 0] and q.shape == (2, 16, 128) and k.shape == (2, 77, 128)  # 2 heads of 64
        expected = mask_by_hand(q, k, chunks, DOG, heads=2).reshape(1, 1, 4, 4)  # output block 1: 1/4 of 16x16
        torch.testing.assert_close(record, expected, rtol=1e-5, atol=1e-6)
    assert records[0].std() > 0.05  # a real mask, not a flat one
    assert not torch.equal(picture, sdxl_plain)


def test_sdxl_mask_of_ones_gives_plain_ipadapter_plus(sdxl, sdxl_plain, monkeypatch):
    monkeypatch.setattr(conceptrol_patch, "concept_mask", ones_or_zeros(1.0))
    assert torch.equal(env.ksample(conceptrol(sdxl.adapted, sdxl.clip), *sdxl.conds), sdxl_plain)
    assert not torch.equal(env.ksample(sdxl.base, *sdxl.conds), sdxl_plain)  # the adapter does act


def test_concepts_are_found_with_comfyui_tokenization(adapted, clip):
    from conceptrol.comfyui.tokens import find_token_spans

    assert find_token_spans(clip, PROMPT, ["dog", "(dog:1.2)", "a beach"]) == [DOG, DOG, slice(7, 9)]
    long_prompt = "word " * 80 + "and a dog"  # 75 words fill the first 77-token chunk
    assert find_token_spans(clip, long_prompt, ["dog"]) == [slice(77 + 1 + 5 + 2, 77 + 1 + 5 + 3)]
    assert env.encode(clip, long_prompt)[0][0].shape[1] == 154


def test_concept_not_in_prompt_says_so_with_the_prompts_words(adapted, clip):
    with pytest.raises(ConceptNotFoundError) as error:
        conceptrol(adapted, clip, "cat")
    assert "concept 'cat' is not in the prompt" in str(error.value) and "</w>" not in str(error.value)
    assert "its words are 'a', 'photo', 'of', 'dog', 'on', 'beach';" in str(error.value)  # each once, in order
    with pytest.raises(ConceptNotFoundError) as error:  # a word CLIP splits into pieces is shown whole
        conceptrol(adapted, clip, "cat", "a corgidoodle on a skateboard")
    assert "its words are 'a', 'corgidoodle', 'on', 'skateboard';" in str(error.value)
    with pytest.raises(ConceptNotFoundError, match=r"did you mean 'dog'"):
        conceptrol(adapted, clip, "dgo")
    with pytest.raises(ConceptrolError, match="2 concept.*1 IPAdapter"):
        conceptrol(adapted, clip, "dog, beach")
    with pytest.raises(ConceptrolError, match="no IPAdapter"):
        conceptrol(env.tiny_sd15_model(), clip)


@pytest.mark.parametrize("layout, diffusers_name, expected", [
    ("sd15", "up_blocks.1.attentions.0.transformer_blocks.0.attn2", conceptrol_patch.SD15_CONCEPT_LAYER),
    ("sdxl", "up_blocks.0.attentions.1.transformer_blocks.3.attn2", conceptrol_patch.SDXL_CONCEPT_LAYER),
])
def test_concept_layer_key_is_the_diffusers_layer(comfy, layout, diffusers_name, expected):
    """Zero the diffusers-named layer's to_q (found through ComfyUI's own name map); see which key gets q = 0."""
    config = dict(env.SD15_TINY_UNET) if layout == "sd15" else dict(env.SDXL_TINY_UNET)
    unet = comfy.comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
        **config, num_heads=2, num_head_channels=-1, operations=comfy.comfy.ops.disable_weight_init)
    env.fill_random(unet, 0)
    comfy_name = comfy.comfy.utils.unet_to_diffusers(config)[f"{diffusers_name}.to_q.weight"]
    unet.get_parameter(comfy_name).data.zero_()
    seen = {}

    def recorder(key):
        def replace(q, k, v, extra_options):
            seen[key] = (bool((q == 0).all()), extra_options["transformer_index"])
            return q
        return replace

    keys = [(block, number, index) for block in ("input", "middle", "output") for number in range(12) for index in range(10)]
    options = {"patches_replace": {"attn2": {key: recorder(key) for key in keys}}}
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), context=torch.randn(1, 77, env.CONTEXT_DIM),
             transformer_options=options)
    zeroed = [key for key, (is_zero, _) in seen.items() if is_zero]
    assert zeroed == [expected]
    print(f"{layout}: {diffusers_name} is ComfyUI's {expected}, transformer_index {seen[expected][1]}")


def test_installed_loader_makes_comfyui_load_the_nodes(comfy, tmp_path):
    from conceptrol.comfyui.install import install_comfyui_loader

    for folder in ("comfy", "custom_nodes"):
        (tmp_path / folder).mkdir()
    (tmp_path / "main.py").write_text("")
    loader = install_comfyui_loader(tmp_path).path
    mappings = comfy.nodes.NODE_CLASS_MAPPINGS
    saved = dict(mappings), dict(comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS)
    try:
        assert asyncio.run(comfy.nodes.load_custom_node(str(loader.parent)))
        assert mappings["Conceptrol"] is Conceptrol and mappings["ConceptrolMask"] is ConceptrolMask
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["ConceptrolMask"] == "Conceptrol Mask"
    finally:
        mappings.clear(), mappings.update(saved[0])
        comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS.clear(), comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS.update(saved[1])


def test_models_without_the_concept_layer_are_refused(comfy, clip):
    class Other:  # e.g. a FLUX or SD3 model config
        pass

    model = env.tiny_sd15_model()
    model.model.model_config = Other()
    with pytest.raises(ConceptrolError, match="supports SD 1.5 and SDXL.*Other"):
        conceptrol(model, clip)
    model = env.tiny_sd15_model()
    model.model.diffusion_model.output_blocks[3] = model.model.diffusion_model.output_blocks[3][:1]  # no attention
    with pytest.raises(ConceptrolError, match=r"without the layer \('output', 3, 0\)"):
        conceptrol(model, clip)
