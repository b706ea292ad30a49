"""The FLUX handle takes FluxPipeline.__call__'s keywords, with FluxPipeline's meaning (tiny FLUX, random LoRA)."""

import numpy as np
import pytest
import torch
from helpers import reference_image

from conceptrol import ConceptrolConfig, ConceptrolError, apply_conceptrol
from conceptrol.flux.ominicontrol.transformer import OminiControlTransformer
from conceptrol.tiny import tiny_flux_pipeline

PROMPT = "a photo of a dog surfing a wave"
NEGATIVE = "a red car under a tree"
SIZE = dict(height=16, width=24, condition_size=16, max_sequence_length=32)


def tiny_flux(t5_tok):
    pipe = tiny_flux_pipeline(t5_tok=t5_tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def handle_for(pipe):
    return apply_conceptrol(pipe, ConceptrolConfig(concept_layer="transformer_blocks.1"))


def run(handle, prompt=PROMPT, seed=0, **over):
    args = dict(concepts=["dog"], image=reference_image(), num_inference_steps=3, output_type="latent", **SIZE)
    if seed is not None:
        args["generator"] = torch.Generator().manual_seed(seed)
    return handle(prompt, **(args | over)).images


def t5_span(tokenizer, prompt, word):
    """The word's [start, end) in the T5 tokens, found here by hand."""
    ids, word_ids = tokenizer(prompt).input_ids, tokenizer(word, add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i : i + len(word_ids)] == word_ids)
    return start, start + len(word_ids)


@torch.no_grad()  # as FluxPipeline.__call__ encodes (grad mode changes the T5 numerics slightly)
def encode(pipe, prompt, prompt_2=None):
    return pipe.encode_prompt(prompt, prompt_2=prompt_2, max_sequence_length=SIZE["max_sequence_length"])


def spy_on_passes(monkeypatch):
    """Record every transformer pass: whether it reads masks, its text, condition, output and the call's mask state."""
    passes, original = [], OminiControlTransformer.__call__

    def spy(self, latents, inputs, condition, call, scale, read_masks=True):
        mask_before, reads_before = call.concept_mask, len(call.records)
        out = original(self, latents, inputs, condition, call, scale, read_masks=read_masks)
        passes.append(dict(read_masks=read_masks, text=inputs.text, condition=condition, out=out,
                           mask_before=mask_before, mask_after=call.concept_mask, reads=len(call.records) - reads_before))
        return out

    monkeypatch.setattr(OminiControlTransformer, "__call__", spy)
    return passes


def spy_on_velocities(pipe, monkeypatch):
    velocities, step = [], pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, "step", lambda v, *a, **k: (velocities.append(v), step(v, *a, **k))[1])
    return velocities


def pack(latents):
    """[B, C, h, w] -> [B, (h/2)*(w/2), 4C]: each 2x2 patch becomes one token, channel-major (FluxPipeline's packing)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def test_given_latents_equal_a_run_whose_generator_made_them(t5_tok):
    pipe = tiny_flux(t5_tok)
    handle = handle_for(pipe)
    noise = torch.randn((1, 4, 16 // pipe.vae_scale_factor, 24 // pipe.vae_scale_factor),
                        generator=torch.Generator().manual_seed(7))  # [B, C, h, w] as randn_tensor draws it
    seeded = run(handle, seed=7)
    torch.testing.assert_close(run(handle, seed=None, latents=pack(noise)), seeded, rtol=0, atol=0)
    assert (run(handle, seed=None, latents=pack(noise) * 0.5) - seeded).abs().max() > 1e-3


def test_latents_of_the_wrong_shape_say_what_is_expected(t5_tok):
    handle = handle_for(tiny_flux(t5_tok))
    with pytest.raises(ConceptrolError, match=r"latents must be packed .*\[1, 24, 16\]"):
        run(handle, latents=torch.zeros(1, 12, 16))


def test_prompt_embeds_with_a_token_span_equal_the_prompt_with_its_concept(t5_tok):
    pipe = tiny_flux(t5_tok)
    handle = handle_for(pipe)
    expected = run(handle)
    expected_masks = handle.masks.masks
    embeds, pooled, _ = encode(pipe, PROMPT)
    span = t5_span(pipe.tokenizer_2, PROMPT, "dog")
    ours = run(handle, prompt=None, concepts=[span], prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(handle.masks.masks, expected_masks, rtol=0, atol=0)
    elsewhere = run(handle, prompt=None, concepts=[(span[0] + 2, span[1] + 2)], prompt_embeds=embeds,
                    pooled_prompt_embeds=pooled)
    assert (elsewhere - expected).abs().max() > 1e-4  # the span given is the one used


def test_the_concept_is_looked_up_in_prompt_2_which_t5_reads(t5_tok):
    pipe = tiny_flux(t5_tok)
    handle = handle_for(pipe)
    clip_prompt = "a teddy bear on the moon"
    ours = run(handle, prompt=clip_prompt, prompt_2=PROMPT)  # 'dog' is only in prompt_2
    embeds, pooled, _ = encode(pipe, clip_prompt, PROMPT)
    expected = run(handle, prompt=None, concepts=[t5_span(pipe.tokenizer_2, PROMPT, "dog")], prompt_embeds=embeds,
                   pooled_prompt_embeds=pooled)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert (run(handle) - ours).abs().max() > 1e-4  # the CLIP prompt counts too


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0])
def test_true_cfg_runs_a_negative_pass_after_the_positive_one_reading_no_mask(t5_tok, monkeypatch, true_cfg_scale):
    pipe = tiny_flux(t5_tok)
    handle = handle_for(pipe)
    passes, velocities = spy_on_passes(monkeypatch), spy_on_velocities(pipe, monkeypatch)
    run(handle, negative_prompt=NEGATIVE, true_cfg_scale=true_cfg_scale)
    positive_text = encode(pipe, PROMPT)[0]
    negative_text = encode(pipe, NEGATIVE)[0]
    if true_cfg_scale == 1.0:  # FluxPipeline: true CFG only when true_cfg_scale > 1
        assert len(passes) == 3 and all(p["reads"] == 1 for p in passes)
        return
    assert len(passes) == 6 and handle.masks.masks.shape[0] == 3
    for step in range(3):
        pos, neg = passes[2 * step], passes[2 * step + 1]
        torch.testing.assert_close(pos["text"], positive_text, rtol=0, atol=0)
        torch.testing.assert_close(neg["text"], negative_text, rtol=0, atol=0)
        assert (pos["reads"], neg["reads"]) == (1, 0)  # one mask read per step, in the positive pass
        assert neg["mask_before"] is pos["mask_after"] and neg["mask_after"] is pos["mask_after"]
        assert neg["condition"] is pos["condition"] is not None  # the negative pass sees the condition tokens
        expected = neg["out"] + true_cfg_scale * (pos["out"] - neg["out"])
        torch.testing.assert_close(velocities[step], expected, rtol=0, atol=0)


def test_true_cfg_takes_negative_embeddings_like_a_negative_prompt(t5_tok):
    pipe = tiny_flux(t5_tok)
    handle = handle_for(pipe)
    with_prompt = run(handle, negative_prompt=NEGATIVE, true_cfg_scale=2.0)
    embeds, pooled, _ = encode(pipe, NEGATIVE)
    with_embeds = run(handle, negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled, true_cfg_scale=2.0)
    torch.testing.assert_close(with_embeds, with_prompt, rtol=0, atol=0)
    assert (run(handle) - with_prompt).abs().max() > 1e-4
    other = run(handle, negative_prompt=NEGATIVE, negative_prompt_2="a cat and a dog on a sofa", true_cfg_scale=2.0)
    assert (other - with_prompt).abs().max() > 1e-4  # negative_prompt_2 goes to T5


def test_true_cfg_without_a_negative_prompt_is_off(t5_tok, monkeypatch):
    handle = handle_for(tiny_flux(t5_tok))
    passes = spy_on_passes(monkeypatch)
    run(handle, true_cfg_scale=4.0)
    assert len(passes) == 3


def test_lora_scale_zero_equals_the_condition_without_its_lora(t5_tok):
    pipe = tiny_flux(t5_tok)
    handle = handle_for(pipe)
    plain = run(handle)
    zero = run(handle, joint_attention_kwargs={"scale": 0.0})
    pipe.transformer.disable_adapters()
    without_lora = run(handle)
    pipe.transformer.enable_adapters()
    torch.testing.assert_close(zero, without_lora, rtol=0, atol=1e-6)
    assert (zero - plain).abs().max() > 1e-4
    torch.testing.assert_close(run(handle, joint_attention_kwargs={"scale": 1.0}), plain, rtol=0, atol=0)
    half = run(handle, joint_attention_kwargs={"scale": 0.5})
    assert min((half - plain).abs().max(), (half - zero).abs().max()) > 1e-5
    torch.testing.assert_close(run(handle), plain, rtol=0, atol=0)  # the LoRA's scale is restored after the call


def test_the_lora_scale_is_restored_when_a_call_fails(t5_tok):
    handle = handle_for(tiny_flux(t5_tok))
    plain = run(handle)

    def fail(pipe, step, timestep, tensors):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run(handle, joint_attention_kwargs={"scale": 0.3}, callback_on_step_end=fail)
    torch.testing.assert_close(run(handle), plain, rtol=0, atol=0)


def test_the_default_sigmas_given_explicitly_change_nothing_and_others_set_the_schedule(t5_tok):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    handle = handle_for(tiny_flux(t5_tok))
    default = run(handle)
    torch.testing.assert_close(run(handle, sigmas=list(np.linspace(1.0, 1 / 3, 3))), default, rtol=0, atol=0)
    seen = []
    other = run(handle, sigmas=[1.0, 0.5], callback_on_step_end=lambda p, s, t, kw: seen.append(t) or {})
    assert other.shape == default.shape and (other - default).abs().max() > 1e-3
    stock = FlowMatchEulerDiscreteScheduler()
    stock.set_timesteps(sigmas=[1.0, 0.5], mu=calculate_shift(4 * 6))  # 24 latent tokens
    torch.testing.assert_close(torch.stack(seen), stock.timesteps)


def test_return_dict_false_gives_a_tuple_of_the_images(t5_tok):
    handle = handle_for(tiny_flux(t5_tok))
    out = handle(PROMPT, ["dog"], reference_image(), num_inference_steps=3, output_type="latent", return_dict=False,
                 generator=torch.Generator().manual_seed(0), **SIZE)
    assert isinstance(out, tuple) and len(out) == 1
    torch.testing.assert_close(out[0], run(handle), rtol=0, atol=0)


def test_the_step_callback_gets_the_named_tensors_and_may_replace_the_prompt_embeds(t5_tok):
    pipe = tiny_flux(t5_tok)
    handle = handle_for(pipe)
    seen, other = [], encode(pipe, NEGATIVE)[0]

    def swap(p, step, timestep, tensors):
        seen.append(dict(tensors))
        return {"prompt_embeds": other} if step == 0 else {}

    swapped = run(handle, callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [sorted(t) for t in seen] == [["latents", "prompt_embeds"]] * 3
    torch.testing.assert_close(seen[0]["prompt_embeds"], encode(pipe, PROMPT)[0], rtol=0, atol=0)
    assert seen[1]["prompt_embeds"] is other and seen[0]["latents"].shape == (1, 24, 16)
    assert (swapped - run(handle)).abs().max() > 1e-4
    keys = []
    run(handle, callback_on_step_end=lambda p, s, t, kw: keys.append(sorted(kw)) or {})
    assert keys == [["latents"]] * 3  # FluxPipeline's default


def test_a_step_callback_reads_the_call_state_and_may_interrupt(t5_tok):
    handle = handle_for(tiny_flux(t5_tok))
    seen = []

    def stop(pipe, step, timestep, tensors):
        seen.append((step, pipe.num_timesteps, pipe.current_timestep, tensors["latents"]))
        pipe._interrupt = True
        return {}

    out = run(handle, callback_on_step_end=stop)
    assert [s[:3] for s in seen] == [(0, 3, seen[0][2])] and seen[0][2] is not None
    torch.testing.assert_close(out, seen[0][3], rtol=0, atol=0)  # the later steps were skipped


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda pipe: dict(ip_adapter_image=reference_image()), "'ip_adapter_image' is not supported with OminiControl"),
        (lambda pipe: dict(ip_adapter_image_embeds=[torch.zeros(1, 8)]), "'ip_adapter_image_embeds' is not supported"),
        (lambda pipe: dict(negative_ip_adapter_image=reference_image()), "'negative_ip_adapter_image' is not supported"),
        (lambda pipe: dict(joint_attention_kwargs={"scale": 1.0, "ip_adapter_image_embeds": 1}),
         r"key\(s\) \['ip_adapter_image_embeds'\] are not supported with OminiControl"),
        (lambda pipe: dict(callback_on_step_end_tensor_inputs=["latents", "noise_pred"]), r"has to be in .*'noise_pred'"),
        (lambda pipe: dict(prompt_embeds=encode(pipe, PROMPT)[0]), "pass prompt or prompt_embeds, not both"),
        (lambda pipe: dict(prompt=None, prompt_embeds=encode(pipe, PROMPT)[0]), "pass pooled_prompt_embeds too"),
        (lambda pipe: dict(prompt=None), "pass prompt, or prompt_embeds"),
        (lambda pipe: dict(prompt=None, prompt_embeds=encode(pipe, PROMPT)[0], pooled_prompt_embeds=encode(pipe, PROMPT)[1]),
         r"concepts must be explicit \(start, end\) token spans"),
        (lambda pipe: dict(prompt=None, prompt_embeds=encode(pipe, PROMPT)[0], pooled_prompt_embeds=encode(pipe, PROMPT)[1],
                           concepts=[(30, 34)]), "past the 32 text tokens"),
        (lambda pipe: dict(prompt=None, prompt_embeds=encode(pipe, PROMPT)[0], pooled_prompt_embeds=encode(pipe, PROMPT)[1],
                           concepts=[(3, 4)], num_images_per_prompt=2), "num_images_per_prompt must be 1"),
        (lambda pipe: dict(prompt=None, prompt_embeds=encode(pipe, PROMPT)[0], pooled_prompt_embeds=encode(pipe, PROMPT)[1],
                           concepts=[(3, 4)], negative_prompt_embeds=torch.zeros(1, 8, 32),
                           negative_pooled_prompt_embeds=torch.zeros(1, 32), true_cfg_scale=2.0), "same shape"),
        (lambda pipe: dict(negative_prompt=[NEGATIVE, NEGATIVE], true_cfg_scale=2.0), "one negative prompt per prompt"),
        (lambda pipe: dict(prompt_2=[PROMPT, PROMPT]), "prompt_2 has 2 prompt"),
        (lambda pipe: dict(max_sequence_length=600), "cannot be greater than 512"),
    ],
)
def test_keywords_that_cannot_be_honoured_raise_clear_errors(t5_tok, make, message):
    pipe = tiny_flux(t5_tok)
    over = make(pipe)
    with pytest.raises(ConceptrolError, match=message):
        run(handle_for(pipe), **({"prompt": PROMPT} | over))


def test_an_unknown_keyword_is_a_type_error_with_a_suggestion(t5_tok):
    with pytest.raises(TypeError, match="unexpected keyword argument 'latent'; did you mean 'latents'"):
        run(handle_for(tiny_flux(t5_tok)), latent=torch.zeros(1, 24, 16))


def with_embeds(pipe):
    embeds, pooled, _ = encode(pipe, PROMPT)
    return dict(prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled)


def packed_noise(pipe):
    return dict(latents=pack(torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))))


@pytest.mark.parametrize(
    "make",
    [
        lambda pipe: {},
        packed_noise,
        with_embeds,
        lambda pipe: dict(prompt_2="a cat and a dog on a sofa"),
        lambda pipe: dict(negative_prompt=NEGATIVE, true_cfg_scale=2.5),
        lambda pipe: dict(negative_prompt=NEGATIVE, negative_prompt_2="a statue reading", true_cfg_scale=1.5),
        lambda pipe: dict(sigmas=[1.0, 1.0, 0.4]),  # a repeated first sigma: FluxPipeline starts at index 0 all the same
        lambda pipe: dict(num_images_per_prompt=2, return_dict=False),
    ],
)
def test_with_the_condition_cut_off_the_handle_equals_a_stock_flux_pipeline(t5_tok, make):
    """c = 0 blocks the condition both ways; the LoRA only acts on the condition, so this is FLUX without it."""
    pipe = tiny_flux(t5_tok)
    handle = apply_conceptrol(pipe, ConceptrolConfig(concept_layer="transformer_blocks.1", masking="none", scale=0.0))
    over = make(pipe)
    concepts = [t5_span(pipe.tokenizer_2, PROMPT, "dog")] if "prompt_embeds" in over else ["dog"]
    seen = {"ours": [], "stock": []}
    args = dict(prompt=PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent",
                height=16, width=24, max_sequence_length=32, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    ours = handle(concepts=concepts, image=reference_image(), condition_size=16,
                  callback_on_step_end=lambda p, s, t, kw: seen["ours"].append((t, kw)) or {}, **(args | over))
    pipe.transformer.disable_adapters()
    args["generator"] = torch.Generator().manual_seed(0)
    stock = pipe(callback_on_step_end=lambda p, s, t, kw: seen["stock"].append((t, kw)) or {}, **(args | over))
    images = (ours[0], stock[0]) if over.get("return_dict") is False else (ours.images, stock.images)
    torch.testing.assert_close(*images, rtol=1e-4, atol=1e-5)
    assert len(seen["ours"]) == len(seen["stock"]) == 3
    for (t, ours_step), (stock_t, stock_step) in zip(seen["ours"], seen["stock"]):
        assert t == stock_t and sorted(ours_step) == sorted(stock_step)
        torch.testing.assert_close(ours_step["prompt_embeds"], stock_step["prompt_embeds"], rtol=0, atol=0)
