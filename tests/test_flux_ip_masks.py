"""Users' own ip_adapter_masks on XLabs' FLUX IP-Adapter, which diffusers alone ignores (diffusers#13584).

Expected outputs come from outside the code under test: the stock pipeline (a mask of ones is no mask; a mask of
zeros is the adapter at scale 0), and tests/flux_reference.py's naive transcription (explicit softmax per sample,
each adapter's branch times the concept mask times the user's mask, on both passes of true CFG) with the mask put on
the latent grid by diffusers' own `IPAdapterMaskProcessor.downsample`, the U-Net IP-Adapter's resize.
"""

import pytest
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from flux_reference import run_reference_ip
from helpers import tiny_flux_with_two_xlabs_adapters
from PIL import Image, ImageDraw

from conceptrol import ConceptrolConfig, ConceptrolError, apply_conceptrol
from conceptrol.tiny import tiny_reference_image

PROMPT = "a dog on a beach"
OTHER = "a cat and a dog"
DOG = slice(1, 4)  # the T5 positions of 'dog' in both prompts (checked in test_flux_adapters.py's `dog` fixture)
HEIGHT, WIDTH = 32, 48  # 8 x 12 latent tokens on the tiny FLUX.1 (4 px a token)
GRID = (8, 12)
ROUND_OFF = 1e-5  # explicit softmax (the reference) against SDPA, over 57 blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def kwargs(steps=2, masks=None, **extra):
    """A call's keywords; a fresh generator and joint_attention_kwargs each time (the pipeline writes into the
    latter)."""
    out = dict(num_inference_steps=steps, height=HEIGHT, width=WIDTH, output_type="latent", max_sequence_length=32,
               generator=torch.Generator().manual_seed(0), ip_adapter_image=tiny_reference_image()) | extra
    if masks is not None:
        out["joint_attention_kwargs"] = {"ip_adapter_masks": masks}
    return out


def rectangle(box):
    """A user's mask as users build it: a PIL drawing through IPAdapterMaskProcessor.preprocess -> [1, 1, H, W]."""
    image = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(image).rectangle(box, fill=255)
    return IPAdapterMaskProcessor().preprocess(image, height=HEIGHT, width=WIDTH)


# Edges off the 4-px token boundaries: bicubic gives fractions and ringing there, not what nearest would give.
LEFT = rectangle((0, 0, 21, 12))  # columns 0-21, rows 0-12
RIGHT = rectangle((26, 9, 47, 31))


def on_grid(mask, batch):
    """The expected mask of each sample on the latent grid [B, N]: diffusers' U-Net resize, independent of ours."""
    return IPAdapterMaskProcessor.downsample(mask[:, 0], batch, GRID[0] * GRID[1], 1)[..., 0]


def run(pipe, config, prompt=PROMPT, concepts=("dog",), **call):
    handle = apply_conceptrol(pipe, config)
    try:
        return handle(prompt=prompt, concepts=list(concepts), **call).images
    finally:
        handle.remove()


def stock_at_scale_zero(pipe, **call):
    pipe.set_ip_adapter_scale(0.0)
    try:
        return pipe(prompt=PROMPT, **call).images
    finally:
        pipe.set_ip_adapter_scale(1.0)


def test_the_test_masks_are_not_what_nearest_or_a_transposed_grid_would_give():
    left = on_grid(LEFT, 1)
    assert ((left > 0) & (left < 1)).any() and (left < 0).any()  # fractions and ringing at the edges
    nearest = torch.nn.functional.interpolate(LEFT, size=GRID, mode="nearest").flatten(1)
    transposed = torch.nn.functional.interpolate(LEFT, size=GRID[::-1], mode="bicubic").flatten(1)
    assert (left - nearest).abs().max() > 0.1 and (left - transposed).abs().max() > 0.1


def test_stock_diffusers_ignores_the_masks(ip_pipe):
    """The premise (diffusers#13584); if this fails diffusers applies them now, and the handle should follow it."""
    zero = torch.zeros(1, 1, HEIGHT, WIDTH)
    assert torch.equal(ip_pipe(prompt=PROMPT, **kwargs(masks=[zero])).images, ip_pipe(prompt=PROMPT, **kwargs()).images)


def test_a_mask_of_ones_is_no_mask(ip_pipe):
    ones = torch.ones(1, 1, HEIGHT, WIDTH)
    stock = ip_pipe(prompt=PROMPT, **kwargs()).images
    assert torch.equal(run(ip_pipe, ConceptrolConfig(masking="none"), **kwargs(masks=[ones])), stock)
    reference = run_reference_ip(ip_pipe, [DOG], prompt=PROMPT, **kwargs()).output.images  # Conceptrol, no user mask
    ours = run(ip_pipe, ConceptrolConfig(), **kwargs(masks=[ones]))
    torch.testing.assert_close(ours, reference, atol=ROUND_OFF, rtol=0)


@pytest.mark.parametrize("masking", ["none", "global"])
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "true-cfg"])
def test_a_mask_of_zeros_is_the_stock_adapter_at_scale_zero(ip_pipe, masking, cfg):
    """Exact: every branch times 0 adds nothing, on both passes of true CFG."""
    extra = dict(negative_prompt="blurry", true_cfg_scale=2.0) if cfg else {}
    zero = torch.zeros(1, 1, HEIGHT, WIDTH)
    ours = run(ip_pipe, ConceptrolConfig(masking=masking), **kwargs(masks=[zero], **extra))
    assert torch.equal(ours, stock_at_scale_zero(ip_pipe, **kwargs(**extra)))


@pytest.mark.parametrize("config,extra", [
    (dict(masking="none"), dict()),  # the stock processor would run here, and ignore the mask
    (dict(masking="none"), dict(negative_prompt="blurry", true_cfg_scale=2.0)),
    (dict(), dict()),  # the product of the concept mask and the user's
    (dict(masking="local"), dict()),
    (dict(), dict(negative_prompt="blurry", true_cfg_scale=2.0)),
    (dict(scale=0.7, start=0.25, end=0.75), dict(steps=4)),  # scale 0 outside the window, mask or not
], ids=["none", "none-true-cfg", "global", "local", "global-true-cfg", "window-and-scale"])
def test_a_partial_mask_equals_the_naive_reference(ip_pipe, config, extra):
    masking = config.get("masking", "global")
    window = {k: config[k] for k in ("scale", "start", "end") if k in config}
    ours = run(ip_pipe, ConceptrolConfig(**config), **kwargs(masks=[LEFT], **extra))
    reference = run_reference_ip(ip_pipe, [DOG], masking=masking, user_masks=[on_grid(LEFT, 1)], prompt=PROMPT,
                                 **window, **kwargs(**extra)).output.images
    torch.testing.assert_close(ours, reference, atol=ROUND_OFF, rtol=0)
    unmasked = run(ip_pipe, ConceptrolConfig(**config), **kwargs(**extra))
    assert (ours - unmasked).abs().max() > 1e-3  # the mask acts


def noise(batch):
    """Packed initial latents (8x12 tokens of 16 channels), one row per sample."""
    return torch.randn(batch, GRID[0] * GRID[1], 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("masking", ["none", "global"])
def test_per_sample_masks_in_a_batch_equal_single_runs_and_one_mask_broadcasts(ip_pipe, masking):
    config, prompts, latents = ConceptrolConfig(masking=masking), [PROMPT, OTHER], noise(2)
    both = torch.cat([LEFT, RIGHT])  # [2, 1, H, W]: what preprocess returns for two masks
    batch = run(ip_pipe, config, prompt=prompts, **kwargs(masks=[both], latents=latents))
    shared = run(ip_pipe, config, prompt=prompts, **kwargs(masks=[RIGHT], latents=latents))
    for index, prompt in enumerate(prompts):
        single = dict(prompt=prompt, latents=latents[index : index + 1])
        own = run(ip_pipe, config, **kwargs(masks=[both[index : index + 1]], **single))
        torch.testing.assert_close(batch[index : index + 1], own, atol=ROUND_OFF, rtol=0)
        torch.testing.assert_close(shared[index : index + 1], run(ip_pipe, config, **kwargs(masks=[RIGHT], **single)),
                                   atol=ROUND_OFF, rtol=0)
    assert (batch[:1] - shared[:1]).abs().max() > 1e-3  # sample 0 got LEFT, not RIGHT


def test_per_sample_masks_equal_the_reference_with_num_images_per_prompt(ip_pipe):
    both = torch.cat([LEFT, RIGHT])
    call = dict(num_images_per_prompt=2, latents=noise(2))
    ours = run(ip_pipe, ConceptrolConfig(), **kwargs(masks=[both], **call))
    reference = run_reference_ip(ip_pipe, [DOG, DOG], user_masks=[torch.cat([on_grid(LEFT, 1), on_grid(RIGHT, 1)])],
                                 prompt=PROMPT, **kwargs(**call)).output.images
    torch.testing.assert_close(ours, reference, atol=ROUND_OFF, rtol=0)


@pytest.mark.parametrize("layout", ["list-4d", "list-1k-4d", "list-3d", "list-2d", "legacy-tensor"])
def test_every_mask_layout_means_the_same(ip_pipe, layout):
    masks = {"list-4d": [LEFT], "list-1k-4d": [LEFT.transpose(0, 1)], "list-3d": [LEFT[0]], "list-2d": [LEFT[0, 0]],
             "legacy-tensor": LEFT}[layout]
    expected = run(ip_pipe, ConceptrolConfig(masking="none"), **kwargs(masks=[LEFT]))
    assert torch.equal(run(ip_pipe, ConceptrolConfig(masking="none"), **kwargs(masks=masks)), expected)


def test_two_adapters_each_take_their_own_mask_or_none(tmp_path):
    pipe = tiny_flux_with_two_xlabs_adapters(tmp_path)
    images = [tiny_reference_image(seed=1), tiny_reference_image(seed=2)]
    beach = slice(7, 12)
    for masks in ([None, RIGHT], [LEFT, RIGHT]):
        ours = run(pipe, ConceptrolConfig(), concepts=("dog", "beach"), **kwargs(masks=masks, ip_adapter_image=images))
        users = [None if m is None else on_grid(m, 1) for m in masks]
        reference = run_reference_ip(pipe, [[DOG, beach]], user_masks=users, prompt=PROMPT,
                                     **kwargs(ip_adapter_image=images)).output.images
        torch.testing.assert_close(ours, reference, atol=ROUND_OFF, rtol=0)
    with pytest.raises(ConceptrolError, match="ip_adapter_masks has 1 entries for 2 loaded IP-Adapter"):
        run(pipe, ConceptrolConfig(), concepts=("dog", "beach"), **kwargs(masks=[LEFT], ip_adapter_image=images))


BAD = {
    "too-many-entries": ([LEFT, LEFT], "has 2 entries for 1 loaded IP-Adapter.*one mask per adapter"),
    "legacy-tensor-of-two": (torch.cat([LEFT, RIGHT]), "has 2 entries for 1 loaded.*wrap one adapter's masks in a list"),
    "1d": ([torch.ones(WIDTH)], "shape \\(48,\\); a mask is \\[H, W\\]"),
    "5d": ([torch.ones(1, 1, 1, HEIGHT, WIDTH)], "shape \\(1, 1, 1, 32, 48\\); a mask is"),
    "4d-without-a-1": ([torch.ones(2, 2, HEIGHT, WIDTH)], "\\[K, 1, H, W\\] or \\[1, K, H, W\\]"),
    "negative": ([LEFT - 0.5], "negative, NaN or infinite"),
    "nan": ([LEFT.masked_fill(LEFT == 0, float("nan"))], "negative, NaN or infinite"),
    "inf": ([LEFT * float("inf")], "negative, NaN or infinite"),
    "three-for-one-sample": ([torch.ones(3, 1, HEIGHT, WIDTH)], "holds 3 masks for 1 sample"),
    "pil": ([Image.new("L", (WIDTH, HEIGHT))], "is a Image, not a tensor.*IPAdapterMaskProcessor"),
    "not-a-list": ("mask.png", "must be a list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_masks_are_one_clear_error_before_the_first_step(ip_pipe, case):
    masks, message = BAD[case]
    handle = apply_conceptrol(ip_pipe, ConceptrolConfig(masking="none"))
    calls = []
    hook = ip_pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ConceptrolError, match=message):
            handle(prompt=PROMPT, concepts=["dog"], **kwargs(masks=masks))
    finally:
        hook.remove()
        handle.remove()
    assert not calls and handle.state.call is None
