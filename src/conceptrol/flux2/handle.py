"""Conceptrol on diffusers' FLUX.2 pipelines: Flux2Pipeline (dev, Mistral text encoder), Flux2KleinPipeline and
Flux2KleinKVPipeline (Qwen3 text encoder); ALGORITHM.md section 6.

The references are `image=[...]`: their packed VAE tokens follow the latent tokens (the KV pipeline puts them
first, on its first step, and caches them); each image's tokens carry their own time coordinate (10, 20, ...),
which is how a transformer call's layout is read. The concept is found in the prompt and placed in the tokens of
the chat template the pipeline renders (text.py).
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from torch import Tensor

from ..core.config import ConceptrolConfig
from ..core.errors import ConceptrolError
from ..core.joint import ReferenceLayout
from ..core.reference_handle import ReferenceHandle
from .processors import Flux2DoubleProcessor, Flux2SingleProcessor
from .text import MAX_TEXT_TOKENS, locate_concept, text_tokenizer

PROCESSOR_SUFFIX = ".attn.processor"
MIN_REFERENCE_SIDE, MAX_REFERENCE_ASPECT = 64, 8  # Flux2ImageProcessor.check_image_input's limits


class Flux2Handle(ReferenceHandle):
    """`handle(prompt=..., concepts=["dog", "hat"], image=[dog, hat], ...)` on a FLUX.2 pipeline."""

    name = "FLUX.2"

    def __init__(self, pipe: Any, config: ConceptrolConfig) -> None:
        self._kv_references: tuple[int, ...] = ()  # the KV pipeline's cached reference token counts
        super().__init__(pipe, config)

    def _processor(self, key: str, stock: Any) -> Any:
        block = key.removesuffix(PROCESSOR_SUFFIX)
        kind = Flux2SingleProcessor if block.startswith("single_") else Flux2DoubleProcessor
        return kind(stock, self.state, block, block == self.config.concept_layer)

    def _tokenizer(self) -> Any:
        return text_tokenizer(self.pipe)

    def _check_call(self, prompt: Any, kwargs: dict) -> None:
        if kwargs.get("caption_upsample_temperature") is not None:
            raise ConceptrolError("caption_upsample_temperature rewrites the prompt with the text encoder, so the "
                                  "concepts cannot be found in what the model reads; leave it out with Conceptrol")
        for name in ("height", "width"):
            value = kwargs.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConceptrolError(f"{name} must be a positive number of pixels, got {value!r}")
        image = kwargs["image"]
        for number, reference in enumerate(image if isinstance(image, (list, tuple)) else [image], start=1):
            check_reference(number, reference)

    def _locate(self, kwargs: dict) -> Any:
        length = int(kwargs.get("max_sequence_length") or MAX_TEXT_TOKENS)
        return lambda prompt, concept: locate_concept(self.pipe, prompt, concept, length)

    def _layout(self, kwargs: dict) -> ReferenceLayout:
        """[text | latent | ref_1 ...] (the KV pipeline: [text | refs | latent]), from each image token's time
        coordinate: 0 for the latent, 10 (i + 1) for reference i."""
        num_text = kwargs["encoder_hidden_states"].shape[1]
        ids = kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        call = self.state.call
        if call.grid is None:
            call.grid = _latent_grid(ids)
        runs = _runs(ids[:, 0].tolist())  # one device sync per transformer call
        latent = next((start, count) for value, start, count in runs if value == 0)
        if kwargs.get("kv_cache_mode") == "cached":  # queries [text | latent]; keys [text | cached refs | latent]
            position, references = num_text, []
            for count in self._kv_references:
                references.append(slice(position, position + count))
                position += count
            return ReferenceLayout(position + latent[1], slice(0, num_text), slice(position, position + latent[1]),
                                   tuple(references))
        references = sorted((value, start, count) for value, start, count in runs if value != 0)
        if kwargs.get("kv_cache_mode") == "extract":
            self._kv_references = tuple(count for _, _, count in references)
        return ReferenceLayout(num_text + ids.shape[0], slice(0, num_text),
                               slice(num_text + latent[0], num_text + latent[0] + latent[1]),
                               tuple(slice(num_text + start, num_text + start + count) for _, start, count in references))


def check_reference(number: int, image: Any) -> None:
    """What FLUX.2's image processor accepts (Flux2ImageProcessor.check_image_input), said before any step."""
    if not isinstance(image, Image.Image):
        raise ConceptrolError(f"reference {number} must be a PIL image (FLUX.2 takes no tensors or paths here), got "
                              f"{type(image).__name__}; open files with PIL.Image.open(path).convert('RGB')")
    width, height = image.size
    if min(width, height) < MIN_REFERENCE_SIDE:
        raise ConceptrolError(f"reference {number} is {width}x{height} pixels; FLUX.2 needs both sides at least "
                              f"{MIN_REFERENCE_SIDE}: upscale it")
    if max(width / height, height / width) > MAX_REFERENCE_ASPECT:
        raise ConceptrolError(f"reference {number} is {width}x{height} pixels; FLUX.2 takes aspect ratios up to "
                              f"{MAX_REFERENCE_ASPECT}:1: crop it")


def _runs(values: list[float]) -> list[tuple[float, int, int]]:
    """(value, start, count) of each run of equal values."""
    runs: list[tuple[float, int, int]] = []
    for index, value in enumerate(values):
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((value, index, 1))
    return runs


def _latent_grid(ids: Tensor) -> tuple[int, int]:
    """(rows, cols) of the latent tokens (time coordinate 0), from their (t, h, w, l) position ids."""
    latent = ids[ids[:, 0] == 0]
    rows, cols = latent[:, 1:3].amax(dim=0).tolist()
    return int(rows) + 1, int(cols) + 1
