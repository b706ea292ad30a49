"""Real-weight checks: need the Hugging Face Hub (or its cache) and ideally a GPU; deselected by default.

Run them with `python -m pytest -m "network" tests/test_real_weights.py`.
"""

import pytest
import torch
from helpers import reference_image

from conceptrol import ConceptrolConfig, apply_conceptrol

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def sd15():
    from diffusers import StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=dtype)
    pipe.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter-plus_sd15.safetensors")
    return pipe.to(device)


def test_real_sd15_concept_mask_follows_the_subject_word(sd15):
    """The mask of 'dog' should differ clearly from the mask of 'wave' in the same image."""
    handle = apply_conceptrol(sd15, ConceptrolConfig(start=0.2, scale=1.5))
    prompt = "a dog surfing a wave"
    common = dict(ip_adapter_image=reference_image(), num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    handle(prompt, concepts=["dog"], **common)
    dog = handle.masks.final()[0, 0]
    handle(prompt, concepts=["wave"], **common)
    wave = handle.masks.final()[0, 0]
    handle.remove()
    assert (dog - wave).abs().mean() > 0.05


def test_real_flux_ominicontrol_mask_has_mean_one_and_differs_from_plain():
    from diffusers import FluxPipeline

    if not torch.cuda.is_available():
        pytest.skip("FLUX.1 needs a GPU")
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", torch_dtype=torch.bfloat16).to("cuda")
    pipe.load_lora_weights("Yuanshi/OminiControl", weight_name="omini/subject_512.safetensors", adapter_name="subject")
    common = dict(image=reference_image(size=(512, 512)), height=512, width=512, num_inference_steps=8,
                  generator=torch.Generator().manual_seed(0), output_type="latent")
    plain = apply_conceptrol(pipe, ConceptrolConfig(masking="none"))("a dog surfing a wave", concepts=["dog"], **common)
    handle = apply_conceptrol(pipe)
    ours = handle("a dog surfing a wave", concepts=["dog"], **common)
    assert (ours.images.float() - plain.images.float()).abs().mean() > 1e-3
    torch.testing.assert_close(handle.masks.masks.mean(dim=(-1, -2)), torch.ones(8, 1, 1), atol=1e-2, rtol=0)
