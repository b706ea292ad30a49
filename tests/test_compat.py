"""Conceptrol next to what users load and switch on besides the adapter: LoRAs, and offloading.

LoRAs are written in diffusers' LoRA format with random weights and loaded with `pipe.load_lora_weights(folder,
adapter_name="style")`, as users load a style or character LoRA. Offloading runs on the CPU here: accelerate's hooks
(model offload; sequential offload on the denoiser, as enable_sequential_cpu_offload does per component) and
diffusers' group offloading to disk, which empties the weights of every group that is not onloaded, so a group
whose hook does not run computes garbage.
"""

import copy

import pytest
import torch
from accelerate import cpu_offload
from diffusers import FluxPriorReduxPipeline
from helpers import flux_adapter_kwargs, reference_image, tiny_flux_adapter
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from conceptrol import ConceptrolConfig, ConceptrolError, apply_conceptrol
from conceptrol.core.errors import ConceptrolWarning
from conceptrol.flux.ominicontrol.handle import carries_ominicontrol
from conceptrol.tiny import (
    FLUX_LORA_TARGETS,
    load_tiny_ip_adapter,
    load_tiny_xlabs_ip_adapter,
    tiny_flux,
    tiny_flux_pipeline,
    tiny_kontext,
    tiny_redux_prior,
    tiny_reference_image,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)

PROMPT = "a photo of a dog surfing a wave"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FLUX_TARGETS = [*FLUX_LORA_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.net.2"]
ROUND_OFF = dict(atol=1e-5, rtol=1e-5)  # offloaded runs differ by fp32 round-off (stock pipelines too), nothing more


pytestmark = pytest.mark.usefixtures("one_thread")


def save_lora(pipe, folder, component: str, targets: list[str], name: str = "style", seed: int = 7, alpha: int = 1):
    """Random LoRA weights for `pipe.<component>` in diffusers' format (`pytorch_lora_weights.safetensors`)."""
    model = copy.deepcopy(getattr(pipe, component))
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False, target_modules=targets), adapter_name=name)
    type(pipe).save_lora_weights(folder, **{f"{component}_lora_layers": get_peft_model_state_dict(model, adapter_name=name)})
    return folder


def lora_on(pipe, tmp_path, name, targets=("to_q", "to_v")):
    """`pipe` with a random LoRA on its transformer, loaded under `name`."""
    pipe.load_lora_weights(save_lora(pipe, tmp_path / name, "transformer", list(targets)), adapter_name=name)
    return pipe


# --- SD 1.5 and SDXL with an IP-Adapter and a LoRA ---------------------------------------------------------------

def sd_pipe(tmp_path, lora=True, make=tiny_sd15_pipeline):
    pipe = make()
    load_tiny_ip_adapter(pipe, "plus")
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(save_lora(pipe, tmp_path / "style", "unet", UNET_TARGETS), adapter_name="style")
    return pipe


def sd_kwargs(**over):
    return dict(num_inference_steps=3, height=32, width=48, output_type="latent", guidance_scale=7.5,
                ip_adapter_image=reference_image(), generator=torch.Generator().manual_seed(0)) | over


def conceptrol(pipe, masking="none", **kwargs):
    handle = apply_conceptrol(pipe, ConceptrolConfig(masking=masking))
    try:
        return handle(PROMPT, concepts=["dog"], **kwargs).images
    finally:
        handle.remove()


SD_LORA_SETTINGS = {  # how users switch a loaded LoRA: (what to do to the pipeline, keywords of the call)
    "as loaded": (lambda pipe: None, {}),
    "set_adapters weight": (lambda pipe: pipe.set_adapters(["style"], adapter_weights=[0.5]), {}),
    "fuse_lora": (lambda pipe: pipe.fuse_lora(lora_scale=0.5), {}),
    "cross_attention_kwargs scale": (lambda pipe: None, {"cross_attention_kwargs": {"scale": 0.5}}),
    "disable_lora": (lambda pipe: pipe.disable_lora(), {}),
}


@pytest.mark.parametrize("setting", SD_LORA_SETTINGS)
@pytest.mark.parametrize("make", [tiny_sd15_pipeline, tiny_sdxl_pipeline], ids=["sd15", "sdxl"])
def test_ip_adapter_with_a_lora_and_masking_off_is_the_stock_pipeline_bit_for_bit(tmp_path, make, setting):
    pipe = sd_pipe(tmp_path, make=make)
    as_loaded = pipe(PROMPT, **sd_kwargs()).images
    change, call = SD_LORA_SETTINGS[setting]
    change(pipe)
    stock = pipe(PROMPT, **sd_kwargs(**call)).images
    assert torch.equal(conceptrol(pipe, **sd_kwargs(**call)), stock)
    assert setting == "as loaded" or (stock - as_loaded).abs().max() > 1e-3  # the setting took effect


def test_sd15_conceptrol_sees_the_lora(tmp_path):
    with_lora = conceptrol(sd_pipe(tmp_path), masking="global", **sd_kwargs())
    without = conceptrol(sd_pipe(tmp_path, lora=False), masking="global", **sd_kwargs())
    assert torch.isfinite(with_lora).all() and (with_lora - without).abs().max() > 1e-3


# --- XLabs' FLUX IP-Adapter and a LoRA ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xlabs(tmp_path_factory):
    pipe = tiny_flux(seed=1)
    load_tiny_xlabs_ip_adapter(pipe, tmp_path_factory.mktemp("xlabs"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(save_lora(pipe, tmp_path_factory.mktemp("style"), "transformer", FLUX_TARGETS),
                           adapter_name="style")
    return pipe


def flux_kwargs(**over):
    return dict(num_inference_steps=2, height=32, width=48, output_type="latent", max_sequence_length=32,
                generator=torch.Generator().manual_seed(0)) | over


def xlabs_kwargs(**over):
    return flux_kwargs(ip_adapter_image=tiny_reference_image(), **over)


def test_a_style_lora_next_to_xlabs_is_no_ominicontrol_lora(xlabs):
    assert not carries_ominicontrol(xlabs)


@pytest.mark.parametrize("setting", ["as loaded", "set_adapters weight", "joint_attention_kwargs scale", "fuse_lora"])
def test_xlabs_with_a_lora_and_masking_off_is_the_stock_pipeline_bit_for_bit(xlabs, setting):
    call = {"joint_attention_kwargs": {"scale": 0.5}} if setting == "joint_attention_kwargs scale" else {}
    as_loaded = xlabs(prompt=PROMPT, **xlabs_kwargs()).images
    try:
        if setting == "set_adapters weight":
            xlabs.set_adapters(["style"], adapter_weights=[0.5])
        if setting == "fuse_lora":
            xlabs.fuse_lora(lora_scale=0.5)
        stock = xlabs(prompt=PROMPT, **xlabs_kwargs(**call)).images
        assert torch.equal(conceptrol(xlabs, **xlabs_kwargs(**call)), stock)
        assert setting == "as loaded" or (stock - as_loaded).abs().max() > 1e-3  # the setting took effect
    finally:
        if setting == "fuse_lora":
            xlabs.unfuse_lora()
        xlabs.set_adapters(["style"])


# --- Kontext and Redux with a LoRA ------------------------------------------------------------------------------

def test_kontext_with_a_lora_and_masking_off_is_the_stock_pipeline_bit_for_bit(tmp_path):
    pipe = lora_on(tiny_kontext(seed=2, double=2, single=2), tmp_path, "style", FLUX_TARGETS)
    pipe.set_progress_bar_config(disable=True)

    def kwargs():
        return flux_kwargs(image=tiny_reference_image(), _auto_resize=False, max_area=32 * 48)

    stock = pipe(prompt=PROMPT, **kwargs()).images
    handle = apply_conceptrol(pipe, ConceptrolConfig(masking="none", concept_layer="transformer_blocks.1"))
    assert torch.equal(handle(PROMPT, concepts=["dog"], **kwargs()).images, stock)


def test_redux_with_a_lora_and_masking_off_is_the_stock_prior_then_pipeline_bit_for_bit(tmp_path):
    pipe, prior = lora_on(tiny_flux(seed=3, double=2, single=2), tmp_path, "style", FLUX_TARGETS), tiny_redux_prior(seed=3)
    pipe.set_progress_bar_config(disable=True)
    with_text = FluxPriorReduxPipeline(image_encoder=prior.image_encoder, feature_extractor=prior.feature_extractor,
                                       image_embedder=prior.image_embedder, text_encoder=pipe.text_encoder,
                                       tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
                                       tokenizer_2=pipe.tokenizer_2)
    embeds = with_text(tiny_reference_image(), prompt=PROMPT)
    stock = pipe(prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled_prompt_embeds,
                 **flux_kwargs(max_sequence_length=512)).images
    handle = apply_conceptrol(pipe, ConceptrolConfig(masking="none", concept_layer="transformer_blocks.1"), redux=prior)
    ours = handle(PROMPT, concepts=["dog"], image=tiny_reference_image(), **flux_kwargs(max_sequence_length=512)).images
    assert torch.equal(ours, stock)


# --- OminiControl and a LoRA -------------------------------------------------------------------------------------

def ominicontrol(tmp_path, style=True, subject_name="subject"):
    """The tiny OminiControl pipeline, its subject LoRA loaded from disk under `subject_name`, and a style LoRA."""
    source = tiny_flux_pipeline()  # its random subject LoRA, saved as OminiControl's is published
    folder = tmp_path / "subject"
    state = get_peft_model_state_dict(source.transformer, adapter_name="subject")
    type(source).save_lora_weights(folder, transformer_lora_layers=state)
    pipe = tiny_flux_pipeline(with_lora=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder, adapter_name=subject_name)
    if style:
        pipe.load_lora_weights(save_lora(pipe, tmp_path / "style", "transformer", FLUX_TARGETS), adapter_name="style")
        pipe.set_adapters([subject_name, "style"])  # loading a LoRA leaves only that one active
    return pipe


def omini_call(pipe, masking="global", **over):
    handle = apply_conceptrol(pipe, ConceptrolConfig(concept_layer="transformer_blocks.1", masking=masking))
    args = dict(image=reference_image(), height=16, width=24, num_inference_steps=3, condition_size=16,
                max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="latent")
    return handle(PROMPT, concepts=["dog"], **(args | over)).images


@pytest.mark.parametrize("masking", ["global", "none"])
def test_ominicontrol_leaves_a_style_lora_on_for_every_token(tmp_path, masking):
    pipe = ominicontrol(tmp_path / "a")
    pipe.transformer.requires_grad_(False)
    ours = omini_call(pipe, masking)
    assert not any(p.requires_grad for p in pipe.transformer.parameters())  # switching LoRAs left them as they were
    baked = ominicontrol(tmp_path / "b", style=False)  # the style LoRA fused into the base weights, then the subject
    baked.load_lora_weights(tmp_path / "a" / "style", adapter_name="style")
    baked.fuse_lora(adapter_names=["style"])
    baked.unload_lora_weights()
    baked.load_lora_weights(tmp_path / "a" / "subject", adapter_name="subject")
    torch.testing.assert_close(ours, omini_call(baked, masking), atol=1e-5, rtol=1e-5)
    without_style = omini_call(ominicontrol(tmp_path / "c", style=False), masking)
    assert (ours - without_style).abs().max() > 1e-3


def test_a_style_lora_switched_off_with_set_adapters_leaves_plain_ominicontrol(tmp_path):
    pipe = ominicontrol(tmp_path / "a")
    pipe.set_adapters(["subject"])
    assert torch.equal(omini_call(pipe), omini_call(ominicontrol(tmp_path / "b", style=False)))


def test_a_single_lora_without_the_subject_name_is_taken_for_it_with_a_warning(tmp_path):
    pipe = ominicontrol(tmp_path / "a", style=False, subject_name="default_0")
    with pytest.warns(ConceptrolWarning, match="taking the LoRA adapter 'default_0'.*adapter_name='subject'"):
        unnamed = omini_call(pipe)
    assert torch.equal(unnamed, omini_call(ominicontrol(tmp_path / "b", style=False)))


def test_several_loras_and_none_named_subject_say_to_load_ominicontrol_as_subject(tmp_path):
    pipe = ominicontrol(tmp_path, subject_name="default_0")
    with pytest.raises(ConceptrolError, match="none is named 'subject'.*adapter_name='subject'"):
        omini_call(pipe)


def test_a_subject_lora_left_inactive_by_loading_another_says_to_set_adapters(tmp_path):
    pipe = ominicontrol(tmp_path)
    pipe.set_adapters(["style"])  # what load_lora_weights(..., adapter_name="style") leaves
    with pytest.raises(ConceptrolError, match=r"'subject' is not active.*pipe.set_adapters\(\['style', 'subject'\]\)"):
        omini_call(pipe)


def test_a_lora_fused_next_to_the_subject_lora_is_refused(tmp_path):
    pipe = ominicontrol(tmp_path)
    pipe.fuse_lora(adapter_names=["style"])
    with pytest.raises(ConceptrolError, match="fused into layers of OminiControl's subject LoRA.*unfuse_lora"):
        omini_call(pipe)


# --- Which FLUX adapter a LoRA belongs to -------------------------------------------------------------------------

def xlabs_pipe(tmp_path):
    pipe = tiny_flux(double=1, single=1)
    load_tiny_xlabs_ip_adapter(pipe, tmp_path / "xlabs")
    return pipe


@pytest.mark.parametrize("setup,redux,expected", [
    (lambda tmp: lora_on(tiny_flux(double=1, single=1), tmp, "subject"), False, True),
    (lambda tmp: lora_on(tiny_flux(double=1, single=1), tmp, "default_0"), False, True),  # OminiControl, unnamed
    (lambda tmp: tiny_flux(double=1, single=1), False, False),
    (lambda tmp: lora_on(xlabs_pipe(tmp), tmp, "style"), False, False),
    (lambda tmp: lora_on(xlabs_pipe(tmp), tmp, "subject"), False, True),  # then refused: two adapters
    (lambda tmp: lora_on(tiny_kontext(double=1, single=1), tmp, "style"), False, False),
    (lambda tmp: lora_on(tiny_flux(double=1, single=1), tmp, "style"), True, False),
])
def test_a_lora_is_ominicontrols_when_named_subject_or_alone(tmp_path, setup, redux, expected):
    pipe = setup(tmp_path)
    assert carries_ominicontrol(pipe, tiny_redux_prior() if redux else None) is expected


def test_kontext_with_a_style_lora_gets_the_kontext_handle(tmp_path):
    pipe = lora_on(tiny_kontext(double=1, single=1), tmp_path, "style")
    config = ConceptrolConfig(concept_layer="transformer_blocks.0")
    assert type(apply_conceptrol(pipe, config)).__name__ == "KontextHandle"


# --- Offloading --------------------------------------------------------------------------------------------------

def offload_model(pipe, tmp_path):
    pipe.enable_model_cpu_offload(device="cpu")  # on the CPU the hooks move nothing: they are counted below


def offload_denoiser_sequentially(pipe, tmp_path):
    # enable_sequential_cpu_offload(device="cpu") fails in the stock pipelines here (accelerate, in the text
    # encoders); this is what it does to each component: weights on "meta", loaded per submodule call
    cpu_offload(denoiser(pipe), execution_device=torch.device("cpu"))


def offload_groups_of_blocks(pipe, tmp_path):
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1,
                              offload_to_disk_path=str(tmp_path / "groups"))


def offload_denoiser_leaves(pipe, tmp_path):
    # leaf level on the denoiser only: stock FLUX already differs with T5 offloaded leaf by leaf to disk
    denoiser(pipe).enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level",
                                        offload_to_disk_path=str(tmp_path / "leaves"))


def denoiser(pipe):
    return getattr(pipe, "transformer", None) or pipe.unet


OFFLOADS = {"model": offload_model, "sequential": offload_denoiser_sequentially, "group blocks": offload_groups_of_blocks,
            "group leaves": offload_denoiser_leaves}


def run_sd15(tmp_path, offload):
    pipe = sd_pipe(tmp_path, lora=False)
    offload(pipe, tmp_path)
    return pipe, lambda: conceptrol(pipe, masking="global", **sd_kwargs())


def run_ominicontrol(tmp_path, offload):
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    offload(pipe, tmp_path)
    return pipe, lambda: omini_call(pipe)


def run_xlabs(tmp_path, offload):
    pipe = tiny_flux(seed=1, double=2, single=2)
    load_tiny_xlabs_ip_adapter(pipe, tmp_path / "xlabs")
    pipe.set_progress_bar_config(disable=True)
    offload(pipe, tmp_path)
    config = ConceptrolConfig(concept_layer="transformer_blocks.1")
    return pipe, lambda: apply_conceptrol(pipe, config)(PROMPT, concepts=["dog"], **xlabs_kwargs()).images


@pytest.mark.parametrize("offload", OFFLOADS)
@pytest.mark.parametrize("run", [run_sd15, run_ominicontrol, run_xlabs], ids=["sd15", "ominicontrol", "xlabs"])
def test_conceptrol_with_offloading_equals_the_run_without(tmp_path, run, offload):
    expected = run(tmp_path / "plain", lambda pipe, tmp: None)[1]()
    pipe, generate = run(tmp_path / "offloaded", OFFLOADS[offload])
    onloads = []
    if offload == "model":  # the denoiser's hook must run, as it would on an accelerator
        hook = denoiser(pipe)._hf_hook
        onload = hook.pre_forward

        def counted(module, *args, **kwargs):
            onloads.append(module)
            return onload(module, *args, **kwargs)

        hook.pre_forward = counted
    images = generate()
    assert offload != "model" or onloads
    torch.testing.assert_close(images, expected, **ROUND_OFF)


# --- Quantized transformers (torchao, through diffusers' TorchAoConfig) --------------------------------------------

def quantized_flux(kind, tmp_path):
    """`tiny_flux_adapter(kind)` whose transformer is reloaded int8 weight-only, as users load FLUX with
    `quantization_config=TorchAoConfig(...)` (bf16: torchao's int8 path takes no other dtype); the rest in bf16."""
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    pipe, extra = tiny_flux_adapter(kind)
    if kind == "xlabs-ip":
        pipe.unload_ip_adapter()  # loaded again onto the quantized transformer, as the adapter comes after the model
    pipe.transformer.save_pretrained(tmp_path / "transformer")
    pipe.transformer = FluxTransformer2DModel.from_pretrained(
        tmp_path / "transformer", quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.bfloat16)
    if kind == "xlabs-ip":
        load_tiny_xlabs_ip_adapter(pipe, tmp_path / "xlabs")
    for name, component in [*pipe.components.items(), *extra.items()]:
        if isinstance(component, (torch.nn.Module, FluxPriorReduxPipeline)) and name != "transformer":
            component.to(torch.bfloat16)
    return pipe, extra


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["xlabs-ip", "kontext", "redux"])
def test_conceptrol_on_a_torchao_quantized_transformer(kind, tmp_path):
    pipe, extra = quantized_flux(kind, tmp_path)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    layer = dict(concept_layer="transformer_blocks.1")
    plain = apply_conceptrol(pipe, ConceptrolConfig(masking="none", **layer), **extra)
    off = plain(PROMPT, concepts=["dog"], **flux_adapter_kwargs(kind, steps=2)).images
    plain.remove()
    if kind != "redux":  # Redux's stock way (the prior with the text encoders) is compared in test_flux_adapters
        assert torch.equal(off, pipe(prompt=PROMPT, **flux_adapter_kwargs(kind, steps=2)).images)
    handle = apply_conceptrol(pipe, ConceptrolConfig(**layer), **extra)
    on = handle(PROMPT, concepts=["dog"], **flux_adapter_kwargs(kind, steps=2)).images
    masks = handle.masks.masks
    assert on.dtype == torch.bfloat16 and torch.isfinite(on.float()).all()
    assert (on.float() - off.float()).abs().max() > 1e-3  # the masks acted
    assert masks.shape[0] == 2 and masks.std() > 0.1  # a real mask in each step, not a flat one
