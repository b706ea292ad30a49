"""The tiny FLUX.1 builders: real block layout, XLabs IP-Adapter, Kontext, Redux, saved folders."""

from collections import Counter

import pytest
import torch
from diffusers import DiffusionPipeline, FluxKontextPipeline, FluxPipeline, FluxPriorReduxPipeline
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
from safetensors.torch import load_file

from conceptrol.tiny import (
    REAL_TEXT_DIMS,
    TEXT_DIMS,
    XLABS_WEIGHTS,
    flux1_transformer,
    flux_components,
    load_tiny_xlabs_ip_adapter,
    save_tiny_flux_folders,
    tiny_flux,
    tiny_kontext,
    tiny_redux_prior,
    tiny_reference_image,
    xlabs_ip_adapter_state_dict,
)

REDUX_TOKENS = 16  # (32 / 8)^2 SigLIP patches
SIZE = dict(height=32, width=32, num_inference_steps=2, output_type="latent")
KONTEXT_SIZE = dict(SIZE, max_area=32 * 32, _auto_resize=False)  # Kontext rescales height x width to max_area


def generate(pipe, **kwargs) -> torch.Tensor:
    """Packed latents [B, N_img, 16] of a seeded 2-step 32x32 generation."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


def weights(components: dict) -> dict[str, torch.Tensor]:
    """Every tensor of every module in `components`, keyed `component.parameter`."""
    return {f"{name}.{key}": value for name, module in components.items() if isinstance(module, torch.nn.Module)
            for key, value in module.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_flux_folders(tmp_path_factory.mktemp("tiny-flux"), seed=0)


@pytest.mark.parametrize("build", [lambda: flux_components()["transformer"], flux1_transformer])
def test_transformer_has_flux1_block_names_and_counts(build):
    model = build()
    names = {n.rsplit(".attn.processor", 1)[0] for n in model.attn_processors}
    double = {f"transformer_blocks.{i}" for i in range(19)}
    assert names == double | {f"single_transformer_blocks.{i}" for i in range(38)}
    assert (model.config.joint_attention_dim, model.config.pooled_projection_dim) == TEXT_DIMS
    assert not model.config.guidance_embeds and tiny_flux(guidance=True).transformer.config.guidance_embeds


@pytest.mark.parametrize("build", [
    lambda seed: weights(flux_components(seed)),
    lambda seed: flux1_transformer(seed, double=2, single=2).state_dict(),
    lambda seed: xlabs_ip_adapter_state_dict(flux_components(0)["transformer"], 32, seed),
    lambda seed: weights(tiny_redux_prior(seed).components),
], ids=["flux_components", "flux1_transformer", "xlabs_ip_adapter", "redux_prior"])
def test_same_seed_gives_the_same_weights_and_another_seed_others(build):
    first = build(0)
    torch.randn(100)  # a builder must seed itself, not rely on the global generator's state
    again, other = build(0), build(1)
    assert same_weights(first, again)
    random = [k for k in first if first[k].numel() > 1 and first[k].std() > 0]  # not the ones/zeros of norms
    assert first.keys() == other.keys() and not any(torch.equal(first[k], other[k]) for k in random)


def test_xlabs_checkpoint_has_xlabs_keys(tmp_path):
    pipe = tiny_flux()
    load_tiny_xlabs_ip_adapter(pipe, tmp_path)
    keys = set(load_file(tmp_path / XLABS_WEIGHTS))
    blocks = {f"double_blocks.{i}.processor.ip_adapter_double_stream_{p}_proj.{w}"
              for i in range(19) for p in "kv" for w in ("weight", "bias")}
    assert keys == blocks | {f"ip_adapter_proj_model.{m}.{w}" for m in ("proj", "norm") for w in ("weight", "bias")}
    assert (tmp_path / "image_encoder" / "config.json").exists()


def test_xlabs_adapter_loads_on_every_double_block():
    pipe = tiny_flux()
    load_tiny_xlabs_ip_adapter(pipe)
    kinds = Counter(type(p).__name__ for p in pipe.transformer.attn_processors.values())
    assert kinds == {FluxIPAdapterAttnProcessor.__name__: 19, "FluxAttnProcessor": 38}
    assert pipe.image_encoder.dtype == torch.float32 and pipe.feature_extractor.size["shortest_edge"] == 32


def test_xlabs_adapter_changes_the_output_and_scale_zero_removes_it():
    pipe = tiny_flux()
    plain = generate(pipe, prompt="a dog", **SIZE)
    load_tiny_xlabs_ip_adapter(pipe)
    with_ip = generate(pipe, prompt="a dog", ip_adapter_image=tiny_reference_image(), **SIZE)
    pipe.set_ip_adapter_scale(0.0)
    scale_zero = generate(pipe, prompt="a dog", ip_adapter_image=tiny_reference_image(), **SIZE)
    assert (with_ip - scale_zero).abs().max() > 1e-2
    assert torch.equal(scale_zero, plain)


def test_xlabs_adapter_needs_four_tokens_at_tiny_widths():
    with pytest.raises(ValueError, match="4 image tokens"):
        xlabs_ip_adapter_state_dict(tiny_flux().transformer, 32, num_tokens=16)


def test_kontext_appends_the_reference_tokens_and_they_change_the_output():
    pipe = tiny_kontext()
    lengths = []
    pipe.transformer.register_forward_pre_hook(lambda m, args, kw: lengths.append(kw["hidden_states"].shape[1]),
                                               with_kwargs=True)
    first = generate(pipe, image=tiny_reference_image(0), prompt="a dog", **KONTEXT_SIZE)
    second = generate(pipe, image=tiny_reference_image(1), prompt="a dog", **KONTEXT_SIZE)
    assert first.shape == (1, 64, 16) and lengths[0] == 64 + 64  # [latent | reference], 8x8 packed tokens each
    assert (first - second).abs().max() > 1e-4


def test_redux_with_the_flux_text_encoders_appends_its_tokens_after_512_t5_tokens():
    pipe = tiny_flux(text_dims=(48, 40))  # the prior's Redux width follows the pipeline's T5 width
    out = tiny_redux_prior(text_from=pipe)(tiny_reference_image(), prompt="a dog")
    assert out.prompt_embeds.shape == (1, 512 + REDUX_TOKENS, 48)
    with torch.no_grad():  # as the prior runs it (with autograd on, attention takes another kernel)
        text_only = pipe.encode_prompt("a dog", prompt_2=None)[0]
    assert torch.equal(out.prompt_embeds[:, :512], text_only)
    assert generate(pipe, **out, **SIZE).shape == (1, 64, 16)


def test_redux_without_text_encoders_needs_the_real_text_widths():
    image = tiny_reference_image()
    with pytest.raises(RuntimeError, match="4096"):  # the prior's zero text is hard-coded [B, 512, 4096]
        tiny_redux_prior()(image)
    out = tiny_redux_prior(txt_in_features=REAL_TEXT_DIMS[0])(image)
    assert out.prompt_embeds.shape == (1, 512 + REDUX_TOKENS, REAL_TEXT_DIMS[0])
    assert generate(tiny_flux(text_dims=REAL_TEXT_DIMS), **out, **SIZE).shape == (1, 64, 16)


def test_saved_folders_say_which_pipeline_they_are(folders):
    names = ("flux-dev", "flux-kontext", "flux-redux")
    loaded = {name: DiffusionPipeline.from_pretrained(folders[name]) for name in names}
    assert [type(p) for p in loaded.values()] == [FluxPipeline, FluxKontextPipeline, FluxPriorReduxPipeline]
    assert all(loaded[name].transformer.config.guidance_embeds for name in ("flux-dev", "flux-kontext"))
    assert loaded["flux-redux"].text_encoder is None


def test_saved_dev_folder_with_xlabs_adapter_matches_in_memory(folders):
    saved = FluxPipeline.from_pretrained(folders["flux-dev"])
    load_tiny_xlabs_ip_adapter(saved, folders["xlabs-ip-adapter"])
    memory = tiny_flux(guidance=True)
    load_tiny_xlabs_ip_adapter(memory)
    kwargs = dict(prompt="a dog", ip_adapter_image=tiny_reference_image(), **SIZE)
    assert torch.equal(generate(saved, **kwargs), generate(memory, **kwargs))


def test_saved_kontext_folder_matches_in_memory(folders):
    kwargs = dict(image=tiny_reference_image(), prompt="a dog", **KONTEXT_SIZE)
    saved = FluxKontextPipeline.from_pretrained(folders["flux-kontext"])
    assert torch.equal(generate(saved, **kwargs), generate(tiny_kontext(), **kwargs))


def test_saved_redux_folder_matches_in_memory(folders):
    pipe = FluxPipeline.from_pretrained(folders["flux-dev"])
    texts = {k: getattr(pipe, k) for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    saved = FluxPriorReduxPipeline.from_pretrained(folders["flux-redux"], **texts)
    image = tiny_reference_image()
    expected = tiny_redux_prior(text_from=pipe)(image, prompt="a dog").prompt_embeds
    assert torch.equal(saved(image, prompt="a dog").prompt_embeds, expected)
