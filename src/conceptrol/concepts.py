"""Locate a concept's token span in a prompt (no model code)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Union

from .errors import ConceptNotFoundError, ConceptrolError


@dataclass(frozen=True)
class Concept:
    """A concept word or phrase; `occurrence` picks which repeat in the prompt (0 = first)."""

    text: str
    occurrence: int = 0


# What a user may pass per reference image: a word, a Concept, or an explicit [start, end) token span.
ConceptLike = Union[str, Concept, slice, tuple]


def find_concept_span(
    tokenizer: Any, prompt: str, concept: str | Concept, max_length: int | None = None
) -> slice:
    """Token positions [start, end) of `concept` in the tokenized `prompt`, counting special start tokens."""
    concept = Concept(concept) if isinstance(concept, str) else concept
    if not concept.text.strip():
        raise ConceptrolError("a concept must be a non-empty word or phrase from the prompt")
    prompt_ids = list(tokenizer(prompt, truncation=False).input_ids)
    concept_ids = list(tokenizer(concept.text, add_special_tokens=False).input_ids)
    starts = _subsequence_starts(prompt_ids, concept_ids)
    if len(starts) <= concept.occurrence:
        raise ConceptNotFoundError(_not_found_message(tokenizer, prompt, concept, prompt_ids, len(starts)))
    start = starts[concept.occurrence]
    span = slice(start, start + len(concept_ids))
    limit = (max_length or tokenizer.model_max_length) - 1  # the last kept position holds the end token
    if span.stop > limit:
        raise ConceptNotFoundError(
            f"concept {concept.text!r} sits at tokens {span.start}..{span.stop - 1} of prompt {prompt!r}, "
            f"past the text encoder's limit of {limit + 1} tokens, so the model never sees it; "
            "shorten the prompt or move the concept nearer its start"
        )
    return span


def as_span(value: slice | tuple, num_text_tokens: int | None = None) -> slice:
    """An explicit [start, end) span given as a slice or a (start, end) pair, checked."""
    start, stop = (value.start, value.stop) if isinstance(value, slice) else tuple(value)
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop):
        raise ConceptrolError(f"a token span must be (start, end) with 0 <= start < end, got {value!r}")
    if num_text_tokens is not None and stop > num_text_tokens:
        raise ConceptrolError(f"token span {start}..{stop} is past the {num_text_tokens} text tokens")
    return slice(start, stop)


def _subsequence_starts(sequence: list[int], pattern: list[int]) -> list[int]:
    n = len(pattern)
    return [i for i in range(len(sequence) - n + 1) if sequence[i : i + n] == pattern]


def _not_found_message(tokenizer: Any, prompt: str, concept: Concept, prompt_ids: list[int], found: int) -> str:
    if found:
        return (
            f"concept {concept.text!r} occurs {found} time(s) in prompt {prompt!r}, "
            f"so occurrence={concept.occurrence} does not exist; use an occurrence below {found}"
        )
    tokens = tokenizer.convert_ids_to_tokens(prompt_ids)
    message = f"concept {concept.text!r} not found in prompt {prompt!r}; its tokens are {tokens}"
    words = re.findall(r"[\w'-]+", prompt.lower())
    close = difflib.get_close_matches(concept.text.lower(), words, n=1, cutoff=0.5)
    if close:
        message += f"; did you mean {close[0]!r}?"
    else:
        message += "; pass a word or phrase that appears in the prompt"
    return message


@dataclass(frozen=True)
class ResolvedConcepts:
    """Token spans and display labels per sample (prompt × images per prompt) and concept."""

    spans: list[list[slice]]
    labels: list[list[str]]


def resolve_concepts(
    tokenizer: Any,
    prompts: list[str] | None,
    concepts: list,
    num_samples: int,
    max_length: int | None = None,
) -> ResolvedConcepts:
    """Spans of every sample: `concepts` is one list for all prompts, or one list per prompt.

    `prompts` is None when the caller passes embeddings; then every concept must be an explicit span.
    Samples are ordered as diffusers orders them: each prompt's images next to each other.
    """
    if not isinstance(concepts, (list, tuple)) or len(concepts) == 0:
        raise ConceptrolError("concepts must be a non-empty list, one concept per reference image")
    per_prompt = all(isinstance(c, (list, tuple)) and not _is_pair(c) for c in concepts)
    num_prompts = len(prompts) if prompts is not None else (len(concepts) if per_prompt else 1)
    lists = list(concepts) if per_prompt else [list(concepts)] * num_prompts
    if len(lists) != num_prompts:
        raise ConceptrolError(f"got concept lists for {len(lists)} prompts but {num_prompts} prompts")
    if num_samples % num_prompts:
        raise ConceptrolError(f"{num_samples} samples cannot be split evenly over {num_prompts} prompts")
    if len({len(c) for c in lists}) != 1:
        raise ConceptrolError("every prompt needs the same number of concepts (one per reference image)")
    spans, labels = [], []
    for index, concept_list in enumerate(lists):
        prompt = prompts[index] if prompts is not None else None
        resolved = [_resolve_one(tokenizer, prompt, c, max_length) for c in concept_list]
        repeats = num_samples // num_prompts
        spans += [[span for span, _ in resolved]] * repeats
        labels += [[label for _, label in resolved]] * repeats
    return ResolvedConcepts(spans=spans, labels=labels)


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)


def _resolve_one(tokenizer: Any, prompt: str | None, concept: Any, max_length: int | None) -> tuple[slice, str]:
    if isinstance(concept, slice) or _is_pair(concept):
        span = as_span(concept)
        if prompt is not None:
            num_tokens = len(tokenizer(prompt, truncation=False).input_ids)
            if span.stop > num_tokens:
                raise ConceptrolError(
                    f"token span {span.start}..{span.stop - 1} falls in the padding after the {num_tokens} tokens "
                    f"of prompt {prompt!r}; pick positions inside the prompt"
                )
        return span, f"tokens {span.start}..{span.stop - 1}"
    if not isinstance(concept, (str, Concept)):
        raise ConceptrolError(f"a concept must be a word, a Concept or a (start, end) token span, got {concept!r}")
    if prompt is None:
        raise ConceptrolError(
            "without a text prompt (prompt_embeds given), concepts must be explicit (start, end) token spans"
        )
    text = concept if isinstance(concept, str) else concept.text
    return find_concept_span(tokenizer, prompt, concept, max_length), text
