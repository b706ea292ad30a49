"""OminiControl's condition stream on a tiny FLUX transformer (random weights, random LoRA)."""

import pytest
import torch

from conceptrol.flux.ominicontrol.attention import FluxCall
from conceptrol.flux.ominicontrol.transformer import ConditionTokens, OminiControlTransformer, StepInputs, lora_layers
from conceptrol.tiny import flux_transformer

TEXT, SIDE = 5, 4  # text tokens; latent and condition grids are SIDE x SIDE


def tiny_transformer(with_lora: bool):
    return flux_transformer(seed=0, with_lora=with_lora)


def grid_ids(side: int, col_shift: int = 0) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols + col_shift], dim=-1).view(-1, 3).float()


def inputs(batch=1):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, SIDE * SIDE, 16, generator=g)
    step = StepInputs(text=torch.randn(batch, TEXT, 32, generator=g), pooled=torch.randn(batch, 32, generator=g),
                      timestep=torch.full((batch,), 0.7), img_ids=grid_ids(SIDE), txt_ids=torch.zeros(TEXT, 3))
    condition = ConditionTokens(tokens=torch.randn(batch, SIDE * SIDE, 16, generator=g), ids=grid_ids(SIDE, SIDE))
    return latents, step, condition


def test_without_a_condition_the_forward_equals_diffusers():
    model = tiny_transformer(with_lora=False)
    latents, step, _ = inputs(batch=2)
    expected = model(hidden_states=latents, encoder_hidden_states=step.text, pooled_projections=step.pooled,
                     timestep=step.timestep, img_ids=step.img_ids, txt_ids=step.txt_ids).sample
    ours = OminiControlTransformer(model)(latents, step, None, FluxCall(spans=None), condition_scale=1.0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_with_the_condition_cut_off_the_latent_sees_no_lora_and_no_condition():
    base = tiny_transformer(with_lora=False)
    latents, step, condition = inputs()
    plain = OminiControlTransformer(base)(latents, step, None, FluxCall(spans=None), 1.0)
    model = tiny_transformer(with_lora=True)
    assert lora_layers(model)
    runner = OminiControlTransformer(model)
    cut = runner(latents, step, condition, FluxCall(spans=None), condition_scale=0.0)  # log 0 blocks both ways
    torch.testing.assert_close(cut, plain, atol=1e-5, rtol=1e-5)
    joined = runner(latents, step, condition, FluxCall(spans=None), condition_scale=1.0)
    assert (joined - plain).abs().max() > 1e-3
    assert all(not layer.disable_adapters for layer in lora_layers(model))  # LoRA state restored


def test_conceptrol_reads_the_mask_at_the_named_block_each_evaluation():
    model = tiny_transformer(with_lora=True)
    latents, step, condition = inputs(batch=2)
    runner = OminiControlTransformer(model, mask_blocks=("transformer_blocks.1",))
    call = FluxCall(spans=[slice(1, 2), slice(2, 4)])
    out = runner(latents, step, condition, call, 1.0)
    runner(latents, step, condition, call, 1.0)
    assert len(call.records) == 2 and call.concept_mask.shape == (2, SIDE * SIDE)
    torch.testing.assert_close(call.concept_mask.mean(-1), torch.ones(2))
    plain = runner(latents, step, condition, FluxCall(spans=None), 1.0)
    assert (out - plain).abs().max() > 1e-4


@pytest.mark.parametrize("sample", [0, 1])
def test_each_sample_of_a_batch_matches_its_own_run(sample):
    model = tiny_transformer(with_lora=True)
    latents, step, condition = inputs(batch=2)
    spans = [slice(1, 2), slice(2, 4)]
    runner = OminiControlTransformer(model, mask_blocks=("transformer_blocks.0",))
    batch = runner(latents, step, condition, FluxCall(spans=spans), 1.0)
    one = StepInputs(text=step.text[sample : sample + 1], pooled=step.pooled[sample : sample + 1],
                     timestep=step.timestep[:1], img_ids=step.img_ids, txt_ids=step.txt_ids)
    cond = ConditionTokens(tokens=condition.tokens[sample : sample + 1], ids=condition.ids)
    single = runner(latents[sample : sample + 1], one, cond, FluxCall(spans=[spans[sample]]), 1.0)
    torch.testing.assert_close(batch[sample : sample + 1], single, atol=1e-5, rtol=1e-5)


def test_condition_tokens_get_the_timestep_embedding_of_t_zero():
    model = tiny_transformer(with_lora=False)
    latents, step, condition = inputs()
    seen = []
    hook = model.transformer_blocks[0].norm1.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["emb"]), with_kwargs=True)
    OminiControlTransformer(model)(latents, step, condition, FluxCall(spans=None), 1.0)
    hook.remove()
    latent_emb, cond_emb = seen
    torch.testing.assert_close(latent_emb, model.time_text_embed(step.timestep * 1000, step.pooled))
    torch.testing.assert_close(cond_emb, model.time_text_embed(torch.zeros(1), step.pooled))
