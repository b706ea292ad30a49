"""Users' own `ip_adapter_masks` on XLabs' FLUX IP-Adapter, which diffusers accepts and ignores (diffusers#13584).

Passed as diffusers passes them, `joint_attention_kwargs={"ip_adapter_masks": masks}`, in the layout of the U-Net
IP-Adapter: a list with one entry per loaded adapter (None for an adapter without a mask), each what
`IPAdapterMaskProcessor.preprocess` returns ([K, 1, H, W]), diffusers' per-adapter [1, K, H, W], [K, H, W] or
[H, W]; or the legacy tensor, one adapter's mask per index of its first dimension. Each adapter's branch output is
multiplied by its mask (and by the concept mask M when masking is on):
- K = 1: one mask for every sample; K = the number of samples: one per sample, in the pipeline's order (each
  prompt's `num_images_per_prompt` samples next to each other); anything else is refused.
- Both passes of true CFG use the same mask (the negative pass's branch is masked as the positive one).
- Values are weights: 0 switches the adapter off on a token, 1 leaves it as it is; negative values, NaN and
  infinities are refused before the first step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import ConceptrolError

HINT = ("build them with diffusers.image_processor.IPAdapterMaskProcessor().preprocess(masks, height=..., "
        "width=...)")


def check_user_masks(masks: Any, num_adapters: int, num_samples: int) -> list[Tensor | None] | None:
    """Validate users' `ip_adapter_masks` before the first step; returns one fp32 [K, H, W] CPU tensor (or None) per
    adapter, or None when no adapter has a mask."""
    if masks is None:
        return None
    legacy = isinstance(masks, Tensor)
    if legacy:  # diffusers' legacy layout: the adapters along the first dimension
        if not 3 <= masks.ndim <= 5:
            raise ConceptrolError(f"ip_adapter_masks is a {masks.ndim}-dimensional tensor; pass a list with one mask "
                                  "per loaded IP-Adapter, ip_adapter_masks=[mask] (a bare tensor is read as "
                                  "diffusers' legacy layout [adapters, 1, H, W])")
        masks = list(masks)
    if not isinstance(masks, (list, tuple)):
        raise ConceptrolError(f"ip_adapter_masks must be a list with one mask per loaded IP-Adapter, got "
                              f"{type(masks).__name__}; {HINT}")
    if len(masks) != num_adapters:
        wrap = (" (a bare tensor is read as diffusers' legacy layout, one adapter per index of its first dimension: "
                "wrap one adapter's masks in a list, ip_adapter_masks=[masks])") if legacy else ""
        raise ConceptrolError(f"ip_adapter_masks has {len(masks)} entries for {num_adapters} loaded IP-Adapter(s); "
                              f"pass a list with one mask per adapter, None for an adapter without one{wrap}")
    checked = [None if mask is None else _check_entry(index, mask, num_samples) for index, mask in enumerate(masks)]
    return checked if any(mask is not None for mask in checked) else None


def _check_entry(index: int, mask: Any, num_samples: int) -> Tensor:
    name = f"ip_adapter_masks[{index}]"
    if not isinstance(mask, Tensor):
        raise ConceptrolError(f"{name} is a {type(mask).__name__}, not a tensor; {HINT}")
    if not 2 <= mask.ndim <= 4:
        raise ConceptrolError(f"{name} has shape {tuple(mask.shape)}; a mask is [H, W], [K, H, W], [K, 1, H, W] (what "
                              "IPAdapterMaskProcessor.preprocess returns) or [1, K, H, W] (diffusers' per-adapter "
                              "layout), K = 1 or one per sample")
    if mask.ndim == 4 and 1 not in mask.shape[:2]:
        raise ConceptrolError(f"{name} has shape {tuple(mask.shape)}; a 4-dimensional mask is [K, 1, H, W] or "
                              "[1, K, H, W] (this IP-Adapter takes one reference image per adapter)")
    if mask.is_complex() or 0 in mask.shape:
        raise ConceptrolError(f"{name} has shape {tuple(mask.shape)} and dtype {mask.dtype}; pass a real, non-empty "
                              f"mask; {HINT}")
    mask = mask.detach().to("cpu", torch.float32).reshape(-1, *mask.shape[-2:])  # [K, H, W]
    if torch.isnan(mask).any() or torch.isinf(mask).any() or (mask < 0).any():
        raise ConceptrolError(f"{name} holds negative, NaN or infinite values; a mask holds weights >= 0 (0: the "
                              "adapter off, 1: as it is); " + HINT)
    if mask.shape[0] not in (1, num_samples):
        raise ConceptrolError(f"{name} holds {mask.shape[0]} masks for {num_samples} sample(s); pass one mask for "
                              "every sample or one per sample (prompts x num_images_per_prompt, in that order)")
    return mask


def resize_user_masks(masks: list[Tensor | None], grid: tuple[int, int], device: torch.device) -> list[Tensor | None]:
    """Each adapter's masks on the latent token grid, fp32 [K, rows·cols] in the tokens' row-major order.

    Bicubic straight to the grid (rows, cols), read from the latent tokens' position ids: the interpolation diffusers'
    `IPAdapterMaskProcessor.downsample` uses for the U-Net, but to the exact grid, where `downsample` has to guess
    it from the token count and the mask's aspect ratio (and pads or cuts with a warning when they disagree); a
    mask of another aspect ratio is stretched to the image. Where the aspect ratios agree this is `downsample`'s
    result, so a mask means the same here as on the U-Net. As there, no clamp: next to a sharp edge bicubic rings
    by up to ~10% (slightly below 0 or above 1).
    """
    resized = []
    for mask in masks:
        if mask is not None:  # [K, H, W] as K channels of one image; in fp32 on the CPU, the same on every device
            mask = F.interpolate(mask[None], size=grid, mode="bicubic", align_corners=False)[0].flatten(1).to(device)
        resized.append(mask)
    return resized
