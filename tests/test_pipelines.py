"""Stock diffusers pipeline variants, users' own ip_adapter_masks, and dtypes."""

import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.image_processor import IPAdapterMaskProcessor
from helpers import DEVICE, reference_image
from PIL import Image
from test_numerics import PROMPT, kwargs

from conceptrol import ConceptrolConfig, apply_conceptrol
from conceptrol.tiny import load_tiny_ip_adapter, tiny_sd15_pipeline, tiny_sdxl_pipeline

INIT = reference_image((90, 160, 200), size=(48, 32))


def controlnet_pipeline(tokenizer=None):
    pipe = tiny_sd15_pipeline(tokenizer=tokenizer)
    torch.manual_seed(5)
    controlnet = ControlNetModel(
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8, conditioning_embedding_out_channels=(8, 16), in_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    ).eval()
    return StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)


VARIANTS = {
    "img2img": (lambda: tiny_sd15_pipeline(pipeline_class=StableDiffusionImg2ImgPipeline), dict(image=INIT, strength=0.5)),
    "inpaint": (
        lambda: tiny_sd15_pipeline(pipeline_class=StableDiffusionInpaintPipeline),
        dict(image=INIT, mask_image=Image.new("L", (48, 32), 255), strength=1.0),
    ),
    "controlnet": (controlnet_pipeline, dict(image=INIT)),
    "sdxl-img2img": (lambda: tiny_sdxl_pipeline(pipeline_class=StableDiffusionXLImg2ImgPipeline), dict(image=INIT, strength=0.5)),
}
STEPS_RUN = {"img2img": 2, "inpaint": 4, "controlnet": 4, "sdxl-img2img": 2}


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_variants_are_vanilla_with_masking_off_and_masked_with_it_on(variant):
    build, extra = VARIANTS[variant]
    pipe = build()
    load_tiny_ip_adapter(pipe, "plus")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(DEVICE)
    args = kwargs(**extra)
    args.pop("height"), args.pop("width")
    if variant != "controlnet":
        args["output_type"] = "np"  # img2img-like pipelines decode; compare images
    vanilla = pipe(PROMPT, **args).images
    off = apply_conceptrol(pipe, ConceptrolConfig(masking="none"))
    torch.testing.assert_close(torch.as_tensor(off(PROMPT, concepts=["dog"], **kwargs_like(args)).images),
                               torch.as_tensor(vanilla), atol=1e-5, rtol=1e-5)
    off.remove()
    handle = apply_conceptrol(pipe)
    masked = handle(PROMPT, concepts=["dog"], **kwargs_like(args)).images
    assert (torch.as_tensor(masked) - torch.as_tensor(vanilla)).abs().max() > 1e-3
    assert handle.masks.masks.shape[0] == STEPS_RUN[variant]


def kwargs_like(args):
    return args | dict(generator=torch.Generator().manual_seed(0))


def test_users_ip_adapter_masks_multiply_the_concept_mask():
    pipe = tiny_sd15_pipeline()
    load_tiny_ip_adapter(pipe, "plus")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(DEVICE)
    processor = IPAdapterMaskProcessor()
    zero = processor.preprocess([Image.new("L", (48, 32), 0)], height=32, width=48)
    ones = processor.preprocess([Image.new("L", (48, 32), 255)], height=32, width=48)
    pipe.set_ip_adapter_scale(0.0)
    text_only = pipe(PROMPT, **kwargs()).images
    pipe.set_ip_adapter_scale(1.0)
    handle = apply_conceptrol(pipe)
    plain = handle(PROMPT, concepts=["dog"], **kwargs()).images
    with_ones = handle(PROMPT, concepts=["dog"], cross_attention_kwargs={"ip_adapter_masks": [ones]}, **kwargs()).images
    with_zero = handle(PROMPT, concepts=["dog"], cross_attention_kwargs={"ip_adapter_masks": [zero]}, **kwargs()).images
    torch.testing.assert_close(with_ones, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_zero, text_only, atol=1e-5, rtol=1e-5)


def test_users_ip_adapter_masks_match_diffusers_with_masking_off():
    pipe = tiny_sd15_pipeline()
    load_tiny_ip_adapter(pipe, "plus")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(DEVICE)
    half = Image.new("L", (48, 32), 0)
    half.paste(255, (0, 0, 24, 32))
    mask = IPAdapterMaskProcessor().preprocess([half], height=32, width=48)
    extra = dict(cross_attention_kwargs={"ip_adapter_masks": [mask]})
    vanilla = pipe(PROMPT, **kwargs(**extra)).images
    handle = apply_conceptrol(pipe, ConceptrolConfig(masking="none"))
    torch.testing.assert_close(handle(PROMPT, concepts=["dog"], **kwargs(**extra)).images, vanilla, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_reads_the_fp32_masks_and_is_vanilla_with_masking_off(dtype):
    pipe = tiny_sd15_pipeline()
    load_tiny_ip_adapter(pipe, "plus")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(DEVICE)
    handle = apply_conceptrol(pipe)
    handle(PROMPT, concepts=["dog"], **kwargs())
    full_masks = handle.masks.masks
    handle.remove()
    pipe.to(dtype=dtype)
    vanilla = pipe(PROMPT, **kwargs()).images
    off = apply_conceptrol(pipe, ConceptrolConfig(masking="none"))
    torch.testing.assert_close(off(PROMPT, concepts=["dog"], **kwargs()).images, vanilla, atol=1e-3, rtol=1e-3)
    off.remove()
    handle = apply_conceptrol(pipe)
    half = handle(PROMPT, concepts=["dog"], **kwargs()).images
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert handle.masks.masks.dtype == torch.float32
    # the first step sees the same input: its masks agree with fp32 up to half-precision rounding
    # (bf16 keeps 8 bits of mantissa; unrelated masks differ by about 0.3 on average)
    assert (handle.masks.masks[0] - full_masks[0]).abs().mean() < 0.08
