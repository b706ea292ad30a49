"""Where a concept of the prompt sits in the text tokens FLUX.2's transformer sees (ALGORITHM.md section 6).

Flux2KleinPipeline wraps the prompt in Qwen3's chat template (a user turn, thinking off); Flux2Pipeline in Mistral's,
after its system message. The concept is found in the prompt, mapped to the templated text's tokens with the fast
tokenizer's offset mapping, and aligned with the ids the pipeline gives its text encoder (padding to
max_sequence_length, which every text key keeps: FLUX.2 passes no text mask).
"""

from __future__ import annotations

from typing import Any

from ..core.concepts import Concept, find_concept_in_text, place_span

MAX_TEXT_TOKENS = 512  # the pipelines' default max_sequence_length


def text_tokenizer(pipe: Any) -> Any:
    """The fast tokenizer (Flux2Pipeline's `tokenizer` is a processor around it)."""
    tokenizer = pipe.tokenizer
    return getattr(tokenizer, "tokenizer", tokenizer)


def locate_concept(pipe: Any, prompt: str, concept: str | Concept, length: int = MAX_TEXT_TOKENS) -> slice:
    """The concept's positions among the transformer's text keys for `prompt`."""
    return locate_in_template(pipe.tokenizer, prompt, concept, length, dev=type(pipe).__name__ == "Flux2Pipeline")


def locate_in_template(tokenizer: Any, prompt: str, concept: str | Concept, length: int = MAX_TEXT_TOKENS,
                       dev: bool = False) -> slice:
    """As locate_concept, from the pipeline's tokenizer alone (Flux2Pipeline's processor with `dev`, else Qwen3's
    tokenizer): what the command line checks before any weights load."""
    text, seen, mask = _dev_template(tokenizer, prompt, length) if dev else _klein_template(tokenizer, prompt, length)
    found = find_concept_in_text(getattr(tokenizer, "tokenizer", tokenizer), text, prompt, concept)
    kept = [i for i, keep in enumerate(mask) if keep]
    return place_span(found, seen, slice(kept[0], kept[-1] + 1), prompt=prompt)


def _klein_template(tokenizer: Any, prompt: str, length: int) -> tuple[str, list[int], list[int]]:
    """The text Flux2KleinPipeline renders for `prompt`, and the token ids and mask it gives Qwen3."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    inputs = tokenizer(text, padding="max_length", truncation=True, max_length=length)
    return text, list(inputs["input_ids"]), list(inputs["attention_mask"])


def _dev_template(tokenizer: Any, prompt: str, length: int) -> tuple[str, list[int], list[int]]:
    """The text Flux2Pipeline renders for `prompt` (its system message, then the prompt), and the token ids and
    mask it gives Mistral."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    messages = format_input(prompts=[prompt])
    text = tokenizer.apply_chat_template(messages[0], add_generation_prompt=False, tokenize=False)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                           padding="max_length", truncation=True, max_length=length)
    return text, [int(i) for i in inputs["input_ids"][0]], [int(m) for m in inputs["attention_mask"][0]]
