"""Where a concept of the prompt sits in the text tokens Qwen-Image-Edit's transformer sees (ALGORITHM.md section 6).

The pipelines wrap the prompt in their `prompt_template_encode` (a system turn, then the user turn: Edit-Plus puts
"Picture i: <|vision_start|><|image_pad|><|vision_end|>" before the prompt for each reference, Edit one vision block
in the template itself); the Qwen2-VL processor expands each image pad to as many tokens as the image has patches, the
text encoder reads the result, the first `prompt_template_encode_start_idx` tokens (the system turn) are dropped and
each sample keeps its valid tokens (the transformer's text mask hides the padding of a shorter prompt).

The concept is found in the prompt and mapped to the templated text's tokens with the fast tokenizer's offset
mapping. It is placed from the end of the valid tokens, without the images: they all come before the prompt, so they
move the start of the text and never the distance from the concept to its end (the template after the prompt is fixed
text, and these pipelines cut no prompt). How many tokens an image becomes depends on how the pipeline sizes it for
the processor (Edit-Plus resizes each to about 384 x 384 pixels; Edit resizes a single image and passes a list as
given), which is read from the transformer call instead: a sample's valid text length.
"""

from __future__ import annotations

from typing import Any

from ..core.concepts import Concept, find_concept_in_text
from ..core.errors import ConceptrolError

PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"  # Edit-Plus's prefix for reference i (1-based)


def text_tokenizer(pipe: Any) -> Any:
    """The tokenizer that reads the prompt: the processor's (a fast one, with offset mappings; the pipelines' own
    `tokenizer` is a slow Qwen2Tokenizer under transformers 4, and unused)."""
    return pipe.processor.tokenizer


def templated_prompt(pipe: Any, prompt: str) -> str:
    """The text the pipeline gives its processor for `prompt` with one reference, before the image pad is expanded."""
    picture = PICTURE.format(1) if type(pipe).__name__ == "QwenImageEditPlusPipeline" else ""
    return pipe.prompt_template_encode.format(picture + prompt)


def span_from_end(pipe: Any, prompt: str, concept: str | Concept) -> slice:
    """The concept's tokens counted from the end of the valid text, as a negative slice (`place_from_end` makes it
    absolute once the text's length is known)."""
    found = find_concept_in_text(text_tokenizer(pipe), templated_prompt(pipe, prompt), prompt, concept)
    return slice(found.span.start - len(found.ids), found.span.stop - len(found.ids))


locate_concept = span_from_end  # the name the front-ends use for every chat-templated family


def locate_in_template(processor: Any, prompt: str, concept: str | Concept,
                       pipeline: str = "QwenImageEditPlusPipeline") -> slice:
    """As span_from_end, from the pipeline's processor alone (what the command line checks before any weights load):
    the template is the one an empty pipeline of that class sets, never a copy of ours."""
    import diffusers

    empty = getattr(diffusers, pipeline)(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                         processor=processor, transformer=None)
    return span_from_end(empty, prompt, concept)


def place_from_end(span: slice, valid: int) -> slice:
    """A negative span among `valid` text keys (a sample's unmasked text length): its absolute positions."""
    if valid + span.start < 0:
        raise ConceptrolError(f"a concept sits {-span.start} tokens before the end of the prompt's text, but the model "
                              f"reads only its last {valid} (the pipeline drops the template before them); pass a word "
                              "of your own prompt")
    return slice(valid + span.start, valid + span.stop)


def valid_lengths(encoder_hidden_states: Any, encoder_hidden_states_mask: Any) -> list[int]:
    """Each sample's text keys that its text mask keeps (all of them without a mask); one device sync."""
    if encoder_hidden_states_mask is None:
        return [encoder_hidden_states.shape[1]] * encoder_hidden_states.shape[0]
    return [int(n) for n in encoder_hidden_states_mask.bool().sum(dim=1).tolist()]
