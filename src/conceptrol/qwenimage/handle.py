"""Conceptrol on diffusers' Qwen-Image-Edit pipelines: QwenImageEditPlusPipeline (Qwen-Image-Edit-2509, several
references) and QwenImageEditPipeline (one reference); ALGORITHM.md section 6.

Each transformer call joins [text | latent | ref_1 ... ref_R]: the text keys are the prompt's (the reference images'
vision tokens among them, never biased), the image tokens follow in the order of the call's `img_shapes` (the latent,
then each reference's (frames, rows, cols)). The call's `encoder_hidden_states_mask` hides padding: hidden keys count
in no concept read and stay hidden in the bias. The concept is placed in the tokens of the pipeline's template
(text.py).
"""

from __future__ import annotations

from math import prod
from typing import Any

from PIL import Image

from ..core.errors import ConceptrolError
from ..core.joint import ReferenceLayout
from ..core.reference_handle import ReferenceHandle
from .processors import QwenEditProcessor
from .text import place_from_end, span_from_end, text_tokenizer, valid_lengths

PROCESSOR_SUFFIX = ".attn.processor"


class QwenEditHandle(ReferenceHandle):
    """`handle(prompt=..., concepts=["dog", "hat"], image=[dog, hat], ...)` on a Qwen-Image-Edit pipeline."""

    name = "Qwen-Image-Edit"

    def _processor(self, key: str, stock: Any) -> Any:
        block = key.removesuffix(PROCESSOR_SUFFIX)
        return QwenEditProcessor(stock, self.state, block, block == self.config.concept_layer)

    def _tokenizer(self) -> Any:
        return text_tokenizer(self.pipe)

    def _references(self, kwargs: dict) -> int:
        """Edit-Plus: one reference per image; Edit: one (a list of images is one per prompt)."""
        references = super()._references(kwargs)
        return references if type(self.pipe).__name__ == "QwenImageEditPlusPipeline" else 1

    def _check_call(self, prompt: Any, kwargs: dict) -> None:
        images = self._images(kwargs)
        if not images or not all(isinstance(image, Image.Image) for image in images):
            raise ConceptrolError(f"pass the reference images of {self.name} as PIL images (image=[...]), as the "
                                  "pipeline sizes them from their width and height")
        for name in ("height", "width"):
            value = kwargs.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConceptrolError(f"{name} must be a positive number of pixels, got {value!r}")

    def _locate(self, kwargs: dict) -> Any:
        """Each concept counted from the end of its prompt's valid text (text.py), placed at the first call."""
        return lambda prompt, concept: span_from_end(self.pipe, prompt, concept)

    def _on_transformer_call(self, kwargs: dict) -> None:
        """The call's text mask; at the call's first positive pass, each sample's spans placed in its valid text (the
        negative pass keeps the positive prompt's positions)."""
        call = self.state.call
        mask = kwargs.get("encoder_hidden_states_mask")
        call.keep_text(mask)
        if call.spans is not None and not call.negative and any(s.start < 0 for s in call.spans[0] if s is not None):
            valid = valid_lengths(kwargs["encoder_hidden_states"], mask)
            call.spans = [[None if span is None else place_from_end(span, n) for span in sample]
                          for sample, n in zip(call.spans, valid)]

    def _layout(self, kwargs: dict) -> ReferenceLayout:
        """[text | latent | ref_1 ...] from the text length and the image shapes of the call (all samples alike)."""
        num_text = kwargs["encoder_hidden_states"].shape[1]
        shapes = kwargs["img_shapes"][0]
        counts = [prod(shape) for shape in shapes]
        num_image = kwargs["hidden_states"].shape[1]
        if sum(counts) != num_image:
            raise ConceptrolError(f"the transformer got {num_image} image tokens but img_shapes {shapes} hold "
                                  f"{sum(counts)}; Conceptrol cannot tell the latent from the references")
        call = self.state.call
        if call.grid is None:
            call.grid = tuple(shapes[0][1:])
        starts = [num_text + sum(counts[:i]) for i in range(len(counts))]
        parts = tuple(slice(start, start + count) for start, count in zip(starts, counts))
        return ReferenceLayout(num_text + num_image, slice(0, num_text), parts[0], parts[1:])

    @staticmethod
    def _images(kwargs: dict) -> list:
        image = kwargs.get("image")
        return list(image) if isinstance(image, (list, tuple)) else [image]
