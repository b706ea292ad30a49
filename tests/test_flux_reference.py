"""The naive reference of ALGORITHM.md section 4 (tests/flux_reference.py) checked on its own.

With Conceptrol off it must be the stock diffusers pipelines; its bias table must hold the spec's value in every
region; its masks must be normalized as the spec says; and its bookkeeping (which block reads, which mask each
block uses, carry-over, the negative pass) must follow section 4. Tiny FLUX.1 pipelines with the real 19 + 38
block layout are built here from configs, in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
from flux_reference import (
    BLOCKED,
    CONCEPT_BLOCK,
    Layout,
    bias_table,
    bias_table_cell_by_cell,
    cell_bias,
    concept_share,
    gate_mask,
    kontext_layout,
    mean_one_mask,
    redux_layout,
    run_reference_ip,
    run_reference_kontext,
    run_reference_redux,
    text_share,
)
from helpers import reference_image

DOUBLE = [f"transformer_blocks.{i}" for i in range(19)]
SINGLE = [f"single_transformer_blocks.{i}" for i in range(38)]
PROMPT = "a dog on a beach"  # tiny T5 spells letters: ▁a(0) ▁d(1) o(2) g(3) ▁o(4) n(5) ...
DOG = slice(1, 4)
BEACH = slice(7, 12)
IMAGE_SIZE = 32
# explicit softmax vs torch's SDPA kernel over 57 blocks and 2 steps: ~1e-6 on latents of size ~1; every
# Conceptrol effect checked here is > 1e-4
ROUND_OFF = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Tiny pipelines


def _transformer(seed: int, guidance: bool = False):
    from diffusers import FluxTransformer2DModel

    from conceptrol.tiny import flux_transformer

    if not guidance:
        return flux_transformer(seed, with_lora=False, double=19, single=38)
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        guidance_embeds=True,
    ).eval()


def _flux_pipe(seed: int = 0):
    from conceptrol.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed, with_lora=False)
    pipe.register_modules(transformer=_transformer(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _xlabs_checkpoint(transformer, folder, seed: int = 0, clip_dim: int = 32) -> str:
    """Random XLabs FLUX IP-Adapter weights under XLabs' own key names, as a safetensors file."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    joint, inner = transformer.config.joint_attention_dim, transformer.inner_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    proj = {"proj.weight": rand(4 * joint, clip_dim), "proj.bias": rand(4 * joint),
            "norm.weight": torch.ones(joint), "norm.bias": torch.zeros(joint)}
    state = {f"ip_adapter_proj_model.{key}": value for key, value in proj.items()}
    for i in range(transformer.config.num_layers):
        for part in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{part}_proj"
            state[f"{prefix}.weight"] = rand(inner, joint)
            state[f"{prefix}.bias"] = rand(inner)
    save_file(state, str(folder / "ip_adapter.safetensors"))
    return "ip_adapter.safetensors"


@pytest.fixture(scope="module")
def flux_pipe():
    return _flux_pipe(0)


@pytest.fixture(scope="module")
def ip_pipe(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    pipe = _flux_pipe(1)
    torch.manual_seed(5)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8)).eval()
    pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    folder = tmp_path_factory.mktemp("xlabs")
    pipe.load_ip_adapter(str(folder), weight_name=_xlabs_checkpoint(pipe.transformer, folder), low_cpu_mem_usage=False)
    return pipe


@pytest.fixture(scope="module")
def kontext_pipe(flux_pipe):
    from diffusers import FluxKontextPipeline

    parts = dict(flux_pipe.components, transformer=_transformer(2, guidance=True))
    pipe = FluxKontextPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def prior(flux_pipe):
    """FluxPriorReduxPipeline with the FLUX pipeline's own text encoders and a tiny SigLIP (16 tokens per image)."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(7)
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=8)).eval()
    embedder = ReduxImageEncoder(redux_dim=24, txt_in_features=32).eval()
    prior = FluxPriorReduxPipeline(
        image_encoder=encoder, feature_extractor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
        image_embedder=embedder, text_encoder=flux_pipe.text_encoder, tokenizer=flux_pipe.tokenizer,
        text_encoder_2=flux_pipe.text_encoder_2, tokenizer_2=flux_pipe.tokenizer_2)
    prior.set_progress_bar_config(disable=True)
    return prior


def call_kwargs(steps: int = 2, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, **extra) -> dict:
    return dict(height=height, width=width, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **extra)


def ip_kwargs(**extra) -> dict:
    return call_kwargs(**{"prompt": PROMPT, "max_sequence_length": 32,
                          "ip_adapter_image": reference_image(size=(32, 32)), **extra})


def kontext_kwargs(**extra) -> dict:
    height, width = extra.get("height", IMAGE_SIZE), extra.get("width", IMAGE_SIZE)
    return call_kwargs(**{"prompt": PROMPT, "max_sequence_length": 32, "image": reference_image(size=(32, 32)),
                          "_auto_resize": False, "max_area": height * width, **extra})


def latents_of(result) -> torch.Tensor:
    return result.output.images if hasattr(result, "output") else result.images


def uses(trace, step, pass_name="positive"):
    """block -> the source of the mask it used, in one pass."""
    return {block: source for s, p, block, event, source in trace if (s, p, event) == (step, pass_name, "use")}


def reads(trace, step=None, pass_name="positive"):
    return [block for s, p, block, event, _ in trace if event == "read" and p == pass_name and step in (None, s)]


# ---------------------------------------------------------------------------------------------------------------
# The bias table

def _kinds(*runs):
    kinds = []
    for kind, count, index in runs:
        kinds += [(kind, i if index is None else index) for i in range(count)]
    return kinds


# [text 5 | latent 4 | reference 3] (Kontext) and [T5 5 | reference 3 | latent 4] (Redux), span [1, 3)
KONTEXT = Layout(_kinds(("text", 5, None), ("latent", 4, None), ("ref", 3, 0)), (2, 2))
REDUX = Layout(_kinds(("text", 5, None), ("ref", 3, 0), ("latent", 4, None)), (2, 2))
A_HAT = torch.tensor([0.5, 1.5, 0.25, 1.75])


def _positions(layout):
    text = layout.where("text")
    return text, layout.where("latent"), layout.where("ref")


@pytest.mark.parametrize("layout", [KONTEXT, REDUX], ids=["text-latent-ref", "t5-ref-latent"])
def test_conceptrol_table_has_the_spec_value_in_every_region(layout):
    text, latent, ref = _positions(layout)
    c = 2.0
    table = bias_table(layout, [slice(1, 3)], c, [A_HAT], conceptrol=True)
    log_c = math.log(c)
    for n, row in enumerate(latent):  # latent -> reference: log c + log Â[latent row]
        for col in ref:
            assert table[row, col].item() == pytest.approx(log_c + math.log(A_HAT[n].item()), abs=1e-6)
    for row in ref:  # reference -> latent: log c; reference -> text and reference -> reference: 0
        assert all(table[row, col].item() == pytest.approx(log_c) for col in latent)
        assert all(table[row, col].item() == 0 for col in text + ref)
    for t in (1, 2):  # concept text -> reference: log c
        assert all(table[text[t], col].item() == pytest.approx(log_c) for col in ref)
    for t in (0, 3, 4):  # every other text token -> reference: blocked
        assert all(table[text[t], col].item() == BLOCKED for col in ref)
    for row in text + latent:  # text/latent -> text/latent: 0
        assert all(table[row, col].item() == 0 for col in text + latent)


def test_before_the_first_read_latent_rows_get_log_c_only():
    text, latent, ref = _positions(KONTEXT)
    table = bias_table(KONTEXT, [slice(1, 3)], 3.0, [None], conceptrol=True)
    assert all(table[row, col].item() == pytest.approx(math.log(3.0)) for row in latent for col in ref)


@pytest.mark.parametrize("layout", [KONTEXT, REDUX], ids=["text-latent-ref", "t5-ref-latent"])
def test_plain_table_puts_log_c_on_every_text_or_latent_to_reference_entry_and_back(layout):
    text, latent, ref = _positions(layout)
    table = bias_table(layout, [slice(1, 3)], 0.5, [A_HAT], conceptrol=False)
    log_c = math.log(0.5)
    assert all(table[row, col].item() == pytest.approx(log_c) for row in text + latent for col in ref)
    assert all(table[row, col].item() == pytest.approx(log_c) for row in ref for col in text + latent)
    assert all(table[row, col].item() == 0 for row in ref for col in ref)
    assert all(table[row, col].item() == 0 for row in text + latent for col in text + latent)


def test_plain_table_with_c_one_is_all_zeros():
    assert torch.equal(bias_table(KONTEXT, [slice(1, 3)], 1.0, [None], conceptrol=False), torch.zeros(12, 12))


def test_two_references_each_open_only_to_their_own_concept_text():
    layout = Layout(_kinds(("text", 6, None), ("latent", 4, None), ("ref", 2, 0), ("ref", 2, 1)), (2, 2))
    masks = [A_HAT, A_HAT.flip(0)]
    table = bias_table(layout, [slice(0, 2), slice(3, 5)], 1.0, masks, conceptrol=True)
    first, second = [10, 11], [12, 13]
    assert all(table[t, col].item() == 0 for t in (0, 1) for col in first)
    assert all(table[t, col].item() == BLOCKED for t in (0, 1) for col in second)
    assert all(table[t, col].item() == 0 for t in (3, 4) for col in second)
    assert all(table[t, col].item() == BLOCKED for t in (2, 3, 4, 5) for col in first)
    assert table[6, 10].item() == pytest.approx(math.log(0.5)) and table[6, 12].item() == pytest.approx(math.log(1.75))


@pytest.mark.parametrize("conceptrol", [True, False])
@pytest.mark.parametrize("layout", [KONTEXT, REDUX], ids=["text-latent-ref", "t5-ref-latent"])
def test_region_filled_table_equals_the_cell_by_cell_table(layout, conceptrol):
    args = (layout, [slice(1, 3)], 1.7, [A_HAT])
    assert torch.equal(bias_table(*args, conceptrol), bias_table_cell_by_cell(*args, conceptrol))


def test_cell_bias_reads_the_mask_of_the_latent_row():
    row = KONTEXT.where("latent")[2]
    assert cell_bias(KONTEXT, row, KONTEXT.where("ref")[0], [slice(1, 3)], 1.0, [A_HAT], True) == \
        pytest.approx(math.log(0.25))


def test_kontext_layout_splits_latent_from_reference_by_the_first_img_id():
    ids = torch.zeros(6 + 4, 3)
    ids[:6, 1], ids[:6, 2] = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 2, 0, 1, 2])
    ids[6:, 0] = 1
    layout = kontext_layout(3, ids)
    assert layout.kinds[:3] == [("text", 0), ("text", 1), ("text", 2)]
    assert layout.kinds[3:9] == [("latent", n) for n in range(6)] and layout.kinds[9:] == [("ref", 0)] * 4
    assert layout.grid == (2, 3)


def test_redux_layout_puts_the_reference_after_the_t5_tokens_and_allows_a_pass_without_it():
    ids = torch.stack([torch.zeros(4), torch.tensor([0.0, 0, 1, 1]), torch.tensor([0.0, 1, 0, 1])], dim=1)
    layout = redux_layout(5 + 3, 5, [3], ids)
    assert [k for k, _ in layout.kinds] == ["text"] * 5 + ["ref"] * 3 + ["latent"] * 4
    assert redux_layout(5, 5, [3], ids).references == 0
    with pytest.raises(ValueError):
        redux_layout(5 + 2, 5, [3], ids)


# ---------------------------------------------------------------------------------------------------------------
# The concept mask


def test_concept_share_is_the_span_mean_of_a_softmax_over_text_keys_only():
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.5], [1.0, -1.0]]])  # [H=2, N=2, d=2]
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0], [-1.0, 1.0]]])  # [H, T=3, d]
    expected = []
    for n in range(2):
        total = 0.0
        for h in range(2):
            logits = [sum(q[h, n, i].item() * k[h, t, i].item() for i in range(2)) / math.sqrt(2) for t in range(3)]
            z = sum(math.exp(x) for x in logits)
            total += (math.exp(logits[1]) + math.exp(logits[2])) / z
        expected.append(total / 4)
    r = concept_share(text_share(q, k), slice(1, 3))
    assert r.tolist() == pytest.approx(expected, abs=1e-6)
    assert gate_mask(r).max().item() < 1 and mean_one_mask(r).mean().item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# XLabs IP-Adapter (section 4a)


@pytest.mark.parametrize("case", ["plain", "true-cfg-batch-scale"])
def test_ip_reference_with_masking_off_equals_the_stock_pipeline(ip_pipe, case):
    extra, spans = {}, [DOG]
    if case != "plain":
        extra = dict(prompt=[PROMPT, "a dog in a room"], negative_prompt="blurry", true_cfg_scale=2.0)
        spans = [DOG, DOG]
        ip_pipe.set_ip_adapter_scale(0.7)
    try:
        stock = ip_pipe(**ip_kwargs(**extra)).images
        ref = run_reference_ip(ip_pipe, spans, masking="none", **ip_kwargs(**extra))
    finally:
        ip_pipe.set_ip_adapter_scale(1.0)
    torch.testing.assert_close(latents_of(ref), stock, atol=ROUND_OFF, rtol=0)
    assert ref.masks is None and not reads(ref.trace)


def test_ip_conceptrol_changes_the_output_and_local_differs_from_global(ip_pipe):
    stock = ip_pipe(**ip_kwargs()).images
    glob = latents_of(run_reference_ip(ip_pipe, [DOG], **ip_kwargs()))
    local = latents_of(run_reference_ip(ip_pipe, [DOG], masking="local", **ip_kwargs()))
    assert (glob - stock).abs().max() > 1e-3
    assert (local - glob).abs().max() > 1e-4


def test_ip_scale_override_is_used(ip_pipe):
    ip_pipe.set_ip_adapter_scale(0.3)
    try:
        stock = ip_pipe(**ip_kwargs()).images
    finally:
        ip_pipe.set_ip_adapter_scale(1.0)
    torch.testing.assert_close(latents_of(run_reference_ip(ip_pipe, [DOG], masking="none", scale=0.3, **ip_kwargs())),
                               stock, atol=ROUND_OFF, rtol=0)


def test_ip_outside_the_window_the_adapter_scale_is_zero(ip_pipe):
    ip_pipe.set_ip_adapter_scale(0.0)
    try:
        no_adapter = ip_pipe(**ip_kwargs()).images
    finally:
        ip_pipe.set_ip_adapter_scale(1.0)
    never = run_reference_ip(ip_pipe, [DOG], start=0.99, **ip_kwargs())  # k/T < 0.99 at both steps
    torch.testing.assert_close(latents_of(never), no_adapter, atol=ROUND_OFF, rtol=0)
    assert len(reads(never.trace)) == 2 * 3  # masks are still read
    second_only = latents_of(run_reference_ip(ip_pipe, [DOG], start=0.5, **ip_kwargs()))
    assert (second_only - no_adapter).abs().max() > 1e-4


def test_ip_masks_are_gates_in_zero_one_on_the_latent_grid(ip_pipe):
    result = run_reference_ip(ip_pipe, [DOG], **ip_kwargs(steps=3, height=32, width=48))
    assert result.masks.shape == (3, 1, 8, 12)  # [steps, samples, H/4, W/4] for the tiny VAE (H/16 on FLUX.1)
    assert result.masks.max() < 1 and result.masks.min() >= 0
    assert (result.masks.amax(dim=(-1, -2)) > 1 - 1e-4).all()


def test_ip_global_masking_reads_at_the_three_blocks_and_carries_the_last_read_over(ip_pipe):
    trace = run_reference_ip(ip_pipe, [DOG], **ip_kwargs(steps=3)).trace
    for step in range(3):
        assert reads(trace, step) == [CONCEPT_BLOCK, SINGLE[18], SINGLE[37]]
    first, second = uses(trace, 0), uses(trace, 1)
    assert set(first) == set(DOUBLE)  # only double blocks have an IP branch
    assert all(first[b] == "local" for b in DOUBLE[:18])  # before the first read of the call: own local mask
    assert first[CONCEPT_BLOCK] == f"0:{CONCEPT_BLOCK}"  # the concept block uses what it reads
    assert all(second[b] == f"0:{SINGLE[37]}" for b in DOUBLE[:18])  # carried over from the previous step
    assert second[CONCEPT_BLOCK] == f"1:{CONCEPT_BLOCK}"


def test_ip_local_masking_reads_in_every_double_block(ip_pipe):
    result = run_reference_ip(ip_pipe, [DOG], masking="local", **ip_kwargs())
    assert reads(result.trace, 0) == DOUBLE
    assert uses(result.trace, 1) == {b: f"1:{b}" for b in DOUBLE}
    assert result.masks.shape[0] == 2


def test_ip_blocks_before_any_read_use_their_own_local_mask(ip_pipe):
    never_read = run_reference_ip(ip_pipe, [DOG], concept_block="nowhere", reread_blocks=(), **ip_kwargs())
    local = run_reference_ip(ip_pipe, [DOG], masking="local", **ip_kwargs())
    torch.testing.assert_close(latents_of(never_read), latents_of(local), atol=0, rtol=0)


@pytest.mark.parametrize("masking", ["global", "local"])
def test_ip_negative_pass_reads_no_mask_and_uses_the_positive_pass_mask(ip_pipe, masking):
    result = run_reference_ip(ip_pipe, [DOG], masking=masking,
                              **ip_kwargs(negative_prompt="blurry", true_cfg_scale=2.0))
    assert not reads(result.trace, pass_name="negative")
    for step in range(2):
        negative, positive = uses(result.trace, step, "negative"), uses(result.trace, step)
        assert set(negative) == set(DOUBLE)
        if masking == "global":
            assert all(source == f"{step}:{SINGLE[37]}" for source in negative.values())
        else:
            assert negative == positive
    assert result.masks.shape[0] == 2  # one read at the concept block per step, not per pass


def test_ip_each_sample_uses_its_own_span(ip_pipe):
    latents = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(3))
    prompts = [PROMPT, PROMPT]
    batch = run_reference_ip(ip_pipe, [DOG, BEACH], **ip_kwargs(prompt=prompts, latents=latents))
    assert (batch.masks[:, 0] - batch.masks[:, 1]).abs().max() > 1e-3
    for i, span in enumerate([DOG, BEACH]):
        alone = run_reference_ip(ip_pipe, [span], **ip_kwargs(latents=latents[i : i + 1]))
        torch.testing.assert_close(latents_of(batch)[i : i + 1], latents_of(alone), atol=1e-5, rtol=0)


def test_ip_driver_needs_an_adapter(flux_pipe):
    with pytest.raises(ValueError, match="load_ip_adapter"):
        run_reference_ip(flux_pipe, [DOG], **ip_kwargs())


# ---------------------------------------------------------------------------------------------------------------
# Kontext (section 4b)


@pytest.mark.parametrize("extra", [{}, {"negative_prompt": "blurry", "true_cfg_scale": 2.0}], ids=["plain", "true-cfg"])
def test_kontext_reference_with_masking_off_and_c_one_equals_the_stock_pipeline(kontext_pipe, extra):
    stock = kontext_pipe(**kontext_kwargs(**extra)).images
    ref = run_reference_kontext(kontext_pipe, [DOG], masking="none", **kontext_kwargs(**extra))
    torch.testing.assert_close(latents_of(ref), stock, atol=ROUND_OFF, rtol=0)


def test_kontext_conceptrol_and_c_each_change_the_output(kontext_pipe):
    stock = kontext_pipe(**kontext_kwargs()).images
    assert (latents_of(run_reference_kontext(kontext_pipe, [DOG], **kontext_kwargs())) - stock).abs().max() > 1e-3
    plain_c = run_reference_kontext(kontext_pipe, [DOG], c=2.0, masking="none", **kontext_kwargs())
    assert (latents_of(plain_c) - stock).abs().max() > 1e-3


def test_kontext_outside_the_window_c_is_one_half(kontext_pipe):
    never = run_reference_kontext(kontext_pipe, [DOG], c=3.0, start=0.99, **kontext_kwargs())
    half = run_reference_kontext(kontext_pipe, [DOG], c=0.5, **kontext_kwargs())
    torch.testing.assert_close(latents_of(never), latents_of(half), atol=ROUND_OFF, rtol=0)
    inside = run_reference_kontext(kontext_pipe, [DOG], c=3.0, **kontext_kwargs())
    assert (latents_of(inside) - latents_of(half)).abs().max() > 1e-4


def test_kontext_masks_have_mean_one_on_the_latent_grid(kontext_pipe):
    result = run_reference_kontext(kontext_pipe, [DOG], **kontext_kwargs(steps=3, height=32, width=48))
    assert result.masks.shape == (3, 1, 8, 12)
    torch.testing.assert_close(result.masks.mean(dim=(-1, -2)), torch.ones(3, 1))
    assert result.masks.min() > 0 and result.masks.std() > 1e-3


def test_kontext_reading_block_biases_with_the_mask_from_before_its_read(kontext_pipe):
    trace = run_reference_kontext(kontext_pipe, [DOG], **kontext_kwargs(steps=3)).trace
    first, second = uses(trace, 0), uses(trace, 1)
    blocks = DOUBLE + SINGLE
    assert all(first[b] is None for b in DOUBLE)  # block 18 included: it reads after computing its output
    assert all(first[b] == f"0:{CONCEPT_BLOCK}" for b in SINGLE[:19])
    assert all(first[b] == f"0:{SINGLE[18]}" for b in SINGLE[19:])
    assert all(second[b] == f"0:{SINGLE[37]}" for b in DOUBLE)  # carried over, block 18 included
    assert second[SINGLE[0]] == f"1:{CONCEPT_BLOCK}" and set(second) == set(blocks)
    assert reads(trace, 2) == [CONCEPT_BLOCK, SINGLE[18], SINGLE[37]]


def test_kontext_negative_pass_reads_no_mask_and_keeps_the_positive_pass_mask(kontext_pipe):
    result = run_reference_kontext(kontext_pipe, [DOG], **kontext_kwargs(negative_prompt="blurry", true_cfg_scale=2.0))
    assert not reads(result.trace, pass_name="negative") and reads(result.trace, pass_name="positive")
    for step in range(2):
        assert set(uses(result.trace, step, "negative").values()) == {f"{step}:{SINGLE[37]}"}
    assert result.masks.shape[0] == 2


def test_masks_reset_between_calls(kontext_pipe, ip_pipe):
    first = run_reference_kontext(kontext_pipe, [DOG], **kontext_kwargs())
    second = run_reference_kontext(kontext_pipe, [DOG], **kontext_kwargs())
    assert uses(second.trace, 0)[DOUBLE[0]] is None
    torch.testing.assert_close(latents_of(second), latents_of(first), atol=0, rtol=0)
    torch.testing.assert_close(second.masks, first.masks, atol=0, rtol=0)
    again = run_reference_ip(ip_pipe, [DOG], **ip_kwargs())
    assert uses(again.trace, 0)[DOUBLE[0]] == "local"


def test_kontext_each_sample_uses_its_own_span(kontext_pipe):
    latents = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(4))
    kwargs = kontext_kwargs(prompt=[PROMPT, PROMPT], latents=latents)
    batch = run_reference_kontext(kontext_pipe, [DOG, BEACH], **kwargs)
    assert (batch.masks[:, 0] - batch.masks[:, 1]).abs().max() > 1e-3
    for i, span in enumerate([DOG, BEACH]):
        alone = run_reference_kontext(kontext_pipe, [span], **kontext_kwargs(latents=latents[i : i + 1]))
        torch.testing.assert_close(latents_of(batch)[i : i + 1], latents_of(alone), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Redux (section 4b)


def test_redux_reference_with_masking_off_equals_the_stock_prior_then_pipeline(flux_pipe, prior):
    image = reference_image(size=(32, 32))
    embeds = prior(image=image, prompt=PROMPT)
    stock = flux_pipe(prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled_prompt_embeds,
                      **call_kwargs()).images
    ref = run_reference_redux(flux_pipe, prior, [DOG], masking="none", prompt=PROMPT, image=image, **call_kwargs())
    torch.testing.assert_close(latents_of(ref), stock, atol=ROUND_OFF, rtol=0)


def test_redux_conceptrol_changes_the_output_and_reads_mean_one_masks(flux_pipe, prior):
    image = reference_image(size=(32, 32))
    off = run_reference_redux(flux_pipe, prior, [DOG], masking="none", prompt=PROMPT, image=image, **call_kwargs())
    on = run_reference_redux(flux_pipe, prior, [DOG], prompt=PROMPT, image=image, **call_kwargs(height=32, width=48))
    assert on.masks.shape == (2, 1, 8, 12)
    torch.testing.assert_close(on.masks.mean(dim=(-1, -2)), torch.ones(2, 1))
    on_square = run_reference_redux(flux_pipe, prior, [DOG], prompt=PROMPT, image=image, **call_kwargs())
    assert (latents_of(on_square) - latents_of(off)).abs().max() > 1e-3


def test_redux_negative_prompt_pass_has_no_reference_and_reads_nothing(flux_pipe, prior):
    result = run_reference_redux(flux_pipe, prior, [DOG], prompt=PROMPT, image=reference_image(size=(32, 32)),
                                 negative_prompt="blurry", true_cfg_scale=2.0, **call_kwargs())
    assert not reads(result.trace, pass_name="negative")
    assert set(uses(result.trace, 1, "negative").values()) == {f"1:{SINGLE[37]}"}


# ---------------------------------------------------------------------------------------------------------------
# Drivers


def test_drivers_restore_the_same_processor_objects_even_on_error(kontext_pipe):
    saved = dict(kontext_pipe.transformer.attn_processors)
    run_reference_kontext(kontext_pipe, [DOG], **kontext_kwargs())
    with pytest.raises(ValueError, match="span"):
        run_reference_kontext(kontext_pipe, [slice(30, 40)], **kontext_kwargs())
    after = kontext_pipe.transformer.attn_processors
    assert after.keys() == saved.keys() and all(after[k] is saved[k] for k in saved)


def test_drivers_chain_the_users_callback(kontext_pipe):
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append((step, tuple(kwargs)))
        return {}

    run_reference_kontext(kontext_pipe, [DOG], callback_on_step_end=callback, **kontext_kwargs())
    assert seen == [(0, ("latents",)), (1, ("latents",))]
