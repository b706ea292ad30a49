"""Locate concepts in a prompt with a ComfyUI CLIP's own tokenization (weights like `(dog:1.2)` and 77-token chunks).

ComfyUI encodes a long prompt as chunks of 77 tokens (start, up to 75 tokens, end, padding) and concatenates
them, so the text keys the attention sees are the chunks one after another: position = chunk * 77 + index.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from ..core.concepts import shorten_middle
from ..core.errors import ConceptNotFoundError, ConceptrolError

WORD_END = "</w>"  # CLIP's BPE marks the last piece of every word with it


def split_concepts(text: str) -> list[str]:
    """The node's concept field: one word or phrase per IPAdapter, separated by commas or new lines."""
    concepts = [part.strip() for part in re.split(r"[,\n]", text) if part.strip()]
    if not concepts:
        raise ConceptrolError("give one concept (a word of the prompt) per IPAdapter, separated by commas, e.g. 'dog, cat'")
    return concepts


def find_token_spans(clip: Any, prompt: str, concepts: list[str]) -> list[slice]:
    """[start, end) positions of each concept's tokens in the prompt's token sequence (first occurrence)."""
    chunks = _chunks(clip, prompt)
    sequence = [_token_id(token) for chunk in chunks for token in chunk]  # what the text attention sees, in order
    empty = [_token_id(token) for token in _chunks(clip, "")[0]]  # [start, end, padding...]
    return [_find(clip, prompt, concept, sequence, empty, chunks) for concept in concepts]


def _find(clip: Any, prompt: str, concept: str, sequence: list, empty: list, chunks: list) -> slice:
    wanted = _content(_chunks(clip, concept)[0], empty)
    if not wanted:
        raise ConceptrolError(f"concept {concept!r} has no tokens; use a word or phrase of the prompt")
    n = len(wanted)
    for start in range(len(sequence) - n + 1):
        if sequence[start : start + n] == wanted:
            return slice(start, start + n)
    raise ConceptNotFoundError(_not_found_message(clip, prompt, concept, chunks))


def _content(chunk: list, empty: list) -> list:
    """The concept's own tokens: between the start token and the end token that tokenizing '' gives."""
    ids = [_token_id(token) for token in chunk]
    start, end = empty[0], empty[1]
    body = ids[1:] if ids and ids[0] == start else ids
    return body[: body.index(end)] if end in body else body


def _chunks(clip: Any, text: str) -> list[list]:
    """One tokenization of `text` (SD 1.5's 'l'; SDXL's 'l' and 'g' put tokens at the same positions)."""
    tokenized = clip.tokenize(text)
    return tokenized["l"] if "l" in tokenized else next(iter(tokenized.values()))


def _token_id(token: Any) -> Any:
    token_id = token[0]  # (id, weight) or (id, weight, word id); an embedding is a tensor: never matched
    return token_id if isinstance(token_id, int) else object()


def _not_found_message(clip: Any, prompt: str, concept: str, chunks: list) -> str:
    message = f"Conceptrol: concept {concept!r} is not in the prompt {shorten_middle(prompt)!r}"
    words = _prompt_words(clip, chunks)
    if words:
        message += f"; its words are {', '.join(map(repr, words))}"
    close = difflib.get_close_matches(concept.lower(), words, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "use a word or phrase that appears in the prompt"
    return f"{message}; {hint} (a phrase split over two 77-token chunks is not found either)"


def _prompt_words(clip: Any, chunks: list) -> list[str]:
    """The prompt's words as CLIP's tokenizer split them (BPE pieces joined back into words: 'dog', not 'dog</w>'),
    each once, in order, without punctuation; [] if the tokenizer cannot say."""
    try:
        pairs = clip.tokenizer.untokenize([token for chunk in chunks for token in chunk])
    except Exception:  # a tokenizer without ComfyUI's untokenize: the message goes without the list
        return []
    words, piece = [], ""
    for _, text in pairs:
        if text.startswith("<|") and text.endswith("|>"):  # start, end and padding tokens
            continue
        piece += text
        if piece.endswith(WORD_END):
            words.append(piece.removesuffix(WORD_END))
            piece = ""
    words += [piece] if piece else []
    return list(dict.fromkeys(word for word in words if any(c.isalnum() for c in word)))  # no punctuation
