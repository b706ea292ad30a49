"""Locate a concept's token span in a prompt (no model code)."""

from __future__ import annotations

import difflib
import re
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Union

from .errors import ConceptNotFoundError, ConceptrolError, ConceptrolWarning

GLOBAL_LABEL = "(global)"  # the label of a reference without a concept

# A word: letters/digits with inner apostrophes and dashes ("teddy-bear"); the same rule as demo/concept_words.py.
WORD = re.compile(r"[^\W_](?:[\w'-]*[^\W_])?")


# Words never suggested for a single-word concept that is not in the prompt.
STOP_WORDS = frozenset("a an the and or of in on at to with by for from into onto over under is are its his her their "
                       "this that these those some".split())


@dataclass(frozen=True)
class Concept:
    """A concept word or phrase of the prompt; `occurrence` picks which whole-word repeat (0 = first).

    Matching ignores case and the punctuation around the concept; "dog" is not found inside "dogs" or "hotdog".
    """

    text: str
    occurrence: int = 0


# What a user may pass per reference image: a word, a Concept, or an explicit [start, end) token span.
ConceptLike = Union[str, Concept, slice, tuple]


def find_concept_span(
    tokenizer: Any, prompt: str, concept: str | Concept, max_length: int | None = None
) -> slice:
    """Token positions [start, end) of `concept` in the tokenized `prompt`, counting special start tokens.

    The concept matches a run of whole words of the prompt (split as the demo's word picker splits them),
    case-insensitively; punctuation around the concept, and whitespace or punctuation between its words, is ignored.
    """
    concept = Concept(concept) if isinstance(concept, str) else concept
    phrase = _words(concept.text)
    if not phrase:
        raise ConceptrolError(f"concept {concept.text!r} has no word in it; pass the prompt's word or phrase for the subject")
    matches = _phrase_matches(prompt, phrase)
    if len(matches) <= concept.occurrence:
        raise ConceptNotFoundError(_not_found_message(tokenizer, prompt, concept, len(matches)))
    span = _token_span(tokenizer, prompt, *matches[concept.occurrence])
    limit = (max_length or tokenizer.model_max_length) - 1  # the last kept position holds the end token
    if span.stop > limit:
        raise ConceptNotFoundError(
            f"concept {concept.text!r} sits at tokens {span.start}..{span.stop - 1} of prompt {shorten_middle(prompt)!r}, "
            f"past the text encoder's limit of {limit + 1} tokens, so the model never sees it; "
            "shorten the prompt or move the concept nearer its start"
        )
    return span


@dataclass(frozen=True)
class TextSpan:
    """A concept's token positions in a text tokenized as a whole, and that text's tokens."""

    span: slice
    ids: tuple[int, ...]
    label: str  # the concept as the user wrote it


def find_concept_in_text(tokenizer: Any, text: str, prompt: str, concept: str | Concept) -> TextSpan:
    """The concept's tokens in `text` (a chat template holding the user's `prompt`): the concept is found in the prompt
    as find_concept_span finds it (whole words, case-insensitive, the chosen occurrence), and its characters are mapped
    to every token whose character range overlaps them, with the fast tokenizer's offset mapping (section 6).

    The prompt is looked up as the last occurrence of its text in `text` (the user's message follows the system's);
    `text` is tokenized without added special tokens (`place_span` aligns it with what the model sees).
    """
    concept = Concept(concept) if isinstance(concept, str) else concept
    phrase = _words(concept.text)
    if not phrase:
        raise ConceptrolError(f"concept {concept.text!r} has no word in it; pass the prompt's word or phrase for the subject")
    where = text.rfind(prompt)
    if where < 0:
        raise ConceptrolError("the prompt is not in the templated text the model reads; this pipeline rewrites "
                              "prompts, which Conceptrol cannot follow")
    matches = _phrase_matches(prompt, phrase)
    if len(matches) <= concept.occurrence:
        raise ConceptNotFoundError(_not_found_message(tokenizer, prompt, concept, len(matches)))
    start, end = (where + position for position in matches[concept.occurrence])
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False)
    inside = [i for i, (first, last) in enumerate(encoding["offset_mapping"]) if first < end and last > start
              and last > first]
    return TextSpan(slice(inside[0], inside[-1] + 1), tuple(encoding["input_ids"]), concept.text)


def place_span(found: TextSpan, seen: list[int], valid: slice, *, anchor: str = "start", drop: int = 0,
               prompt: str = "") -> slice:
    """`found` in the text keys the transformer sees: `seen` are the token ids the pipeline gave its text encoder for
    this prompt (padding included), `valid` the part its attention mask keeps, `drop` the template tokens the pipeline
    removes from the front of the encoder's output.

    The templated text is aligned with `seen` at the start of `valid` (after any special tokens the tokenizer adds, a
    few at most) or, with anchor="end", at its end (for a text whose earlier part the processor expands, e.g. image
    placeholders); a concept the pipeline truncates away, or that falls in the dropped template, is refused.
    """
    ids, span = list(found.ids), found.span
    if anchor == "end":
        offset = valid.stop - len(ids)
        aligned = offset + span.start >= valid.start and seen[offset + span.start:valid.stop] == ids[span.start:]
    else:
        offset, aligned = valid.start, False
        for offset in range(valid.start, min(valid.start + 4, valid.stop)):  # special tokens in front (BOS and such)
            kept = min(len(ids), valid.stop - offset)
            if kept > 0 and seen[offset:offset + kept] == ids[:kept]:
                aligned = True
                break
    if not aligned:
        raise ConceptrolError("the pipeline's tokens of the prompt differ from the templated text Conceptrol reads, so "
                              "the concept cannot be placed; report this with the model and the prompt")
    start, stop = offset + span.start, offset + span.stop
    if stop > valid.stop:
        raise ConceptNotFoundError(
            f"concept {found.label!r} sits at tokens {span.start}..{span.stop - 1} of the templated prompt "
            f"{shorten_middle(prompt)!r}, past the text encoder's limit of {valid.stop - valid.start} tokens, so the "
            "model never sees it; shorten the prompt, move the concept nearer its start or raise max_sequence_length")
    if start < drop:
        raise ConceptrolError(f"concept {found.label!r} falls in the template part of the text the pipeline drops; "
                              "pass a word of your own prompt")
    return slice(start - drop, stop - drop)


def truncated_text(tokenizer: Any, prompt: str, max_length: int | None = None) -> str:
    """The end of `prompt` that the text encoder's token limit cuts off, as written ('' when it all fits).

    Special tokens count as the pipelines count them (CLIP: start + 75 + end = 77; T5: end token only).
    A word cut in the middle is reported whole.
    """
    limit = max_length or tokenizer.model_max_length
    body = _ids(tokenizer, prompt)
    kept = limit - (len(_ids(tokenizer, prompt, special=True)) - len(body))
    if len(body) <= kept:
        return ""
    cuts = _cut_points(prompt)
    low, high = 0, len(cuts) - 1  # invariant: tokens before cuts[low] <= kept < tokens before cuts[high]
    while high - low > 1:
        middle = (low + high) // 2
        if _common_prefix(_ids(tokenizer, prompt[: cuts[middle]]), body) <= kept:
            low = middle
        else:
            high = middle
    return prompt[cuts[low] :].strip()


def as_span(value: slice | tuple, num_text_tokens: int | None = None) -> slice:
    """An explicit [start, end) span given as a slice or a (start, end) pair, checked."""
    start, stop = (value.start, value.stop) if isinstance(value, slice) else tuple(value)
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop):
        raise ConceptrolError(f"a token span must be (start, end) with 0 <= start < end, got {value!r}")
    if num_text_tokens is not None and stop > num_text_tokens:
        raise ConceptrolError(f"token span {start}..{stop} is past the {num_text_tokens} text tokens")
    return slice(start, stop)


def shorten_middle(text: str, width: int = 80) -> str:
    """`text` for a one-line message: whole when short, else its first and last words around ' ... '."""
    if len(text) <= width:
        return text
    words = text.split()
    head, tail = [], []
    while words and len(" ".join(head + tail)) + len(words[0]) < width * 2 // 3:
        head.append(words.pop(0))
    while words and len(" ".join(head + tail)) + len(words[-1]) < width:
        tail.insert(0, words.pop())
    return " ".join(head) + " ... " + " ".join(tail)


def _few(tokens: list[str], most: int = 24) -> str:
    """A token list for a message: all of them, or the first and last ones around '...' when there are many."""
    if len(tokens) <= most:
        return str(tokens)
    return str(tokens[: most * 2 // 3])[:-1] + ", ..., " + str(tokens[-most // 3 :])[1:]


def _words(text: str) -> list[str]:
    """The lowercased words of a concept or prompt, as the demo's word picker splits them ("teddy-bear" is one)."""
    return [word.lower() for word in WORD.findall(text)]


def _phrase_matches(prompt: str, phrase: list[str]) -> list[tuple[int, int]]:
    """Character ranges where the prompt's words are the phrase's words, in order."""
    words = list(WORD.finditer(prompt))
    lowered = [word.group().lower() for word in words]
    n = len(phrase)
    starts = [i for i in range(len(words) - n + 1) if lowered[i : i + n] == phrase]
    return [(words[i].start(), words[i + n - 1].end()) for i in starts]


def _token_span(tokenizer: Any, prompt: str, start: int, end: int) -> slice:
    """Positions of the tokens that spell prompt[start:end], found by tokenizing the prompt up to either end.

    Tokenizing the prompt's own text keeps its case (T5 is case-sensitive); a token that straddles an end is kept.
    """
    body = _ids(tokenizer, prompt)
    first = _common_prefix(_ids(tokenizer, prompt[:start].rstrip()), body)
    through_end = _ids(tokenizer, prompt[:end])
    last = _common_prefix(through_end, body)
    if last < len(through_end):
        last += 1
    offset = _leading_special_tokens(tokenizer, prompt, body)
    return slice(offset + first, offset + max(last, first + 1))


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    # verbose=False: no "sequence length is longer than" log; the caller warns about truncation itself
    return list(tokenizer(text, add_special_tokens=special, truncation=False, verbose=False).input_ids)


def _common_prefix(ids: list[int], body: list[int]) -> int:
    n = 0
    while n < min(len(ids), len(body)) and ids[n] == body[n]:
        n += 1
    return n


def _leading_special_tokens(tokenizer: Any, prompt: str, body: list[int]) -> int:
    """How many special tokens come before the prompt's own (CLIP's start token: 1; T5: 0)."""
    full = _ids(tokenizer, prompt, special=True)
    return next((i for i in range(len(full) - len(body) + 1) if full[i : i + len(body)] == body), 0)


def _cut_points(prompt: str) -> list[int]:
    """Where a token may end: the prompt's ends, each change between space, letters and other characters, each digit."""
    def kind(char: str) -> str:
        return "space" if char.isspace() else "letter" if char.isalpha() else "digit" if char.isdigit() else "other"

    kinds = [kind(char) for char in prompt]
    inner = [i for i in range(1, len(prompt)) if kinds[i - 1] != kinds[i] or kinds[i] == "digit"]
    return [0, *inner, len(prompt)]


def _not_found_message(tokenizer: Any, prompt: str, concept: Concept, found: int) -> str:
    shown = shorten_middle(prompt)
    if found:
        return (
            f"concept {concept.text!r} occurs {found} time(s) in prompt {shown!r}, "
            f"so occurrence={concept.occurrence} does not exist; use an occurrence below {found}"
        )
    tokens = tokenizer.convert_ids_to_tokens(_ids(tokenizer, prompt, special=True))
    message = f"concept {concept.text!r} not found in prompt {shown!r}; its tokens are {_few(tokens)}"
    close = closest_phrase(_words(concept.text), _words(prompt))
    return message + (f"; did you mean {close!r}?" if close else "; pass a word or phrase that appears in the prompt")


def closest_phrase(wanted: list[str], words: list[str]) -> str | None:
    """The prompt's phrase (as many words as `wanted`) to suggest for a concept it lacks: one containing it ('dog' ->
    'sheepdog', 'bear' -> 'teddy-bear'), else the closest spelling; never a stop word for a one-word concept."""
    n = len(wanted)
    words = [word for word in words if n > 1 or word not in STOP_WORDS]  # 'horse' is not 'the'
    phrases = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    text = " ".join(wanted)
    containing = [phrase for phrase in phrases if text in phrase]
    close = containing[:1] or difflib.get_close_matches(text, phrases, n=1, cutoff=0.6)
    return close[0] if close else None


@dataclass(frozen=True)
class ResolvedConcepts:
    """Token spans and display labels per sample (prompt × images per prompt) and concept."""

    spans: list[list[slice | None]]  # None: a reference without a concept (it stays global)
    labels: list[list[str]]


def resolve_concepts(
    tokenizer: Any,
    prompts: list[str] | None,
    concepts: list,
    num_samples: int,
    max_length: int | None = None,
    locate: Callable[[str, Concept], slice] | None = None,
    optional: bool = False,
) -> ResolvedConcepts:
    """Spans of every sample: `concepts` is one list for all prompts, or one list per prompt.

    `prompts` is None when the caller passes embeddings; then every concept must be an explicit span.
    Samples are ordered as diffusers orders them: each prompt's images next to each other.
    `locate(prompt, concept)` finds a word's span where the prompt is wrapped in a chat template (then the truncation
    check is its own); with `optional`, None stands for a reference without a concept (its span is None).
    """
    if not isinstance(concepts, (list, tuple)) or len(concepts) == 0:
        raise ConceptrolError("concepts must be a non-empty list, one concept per reference image")
    for concept in concepts:
        if isinstance(concept, list) and len(concept) == 2 and all(isinstance(v, int) for v in concept):
            raise ConceptrolError(f"a token span is written as a tuple (start, end) or a slice, got the list {concept!r}"
                                  " (a list holds one prompt's concepts)")
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
        resolved = [(None, GLOBAL_LABEL) if c is None and optional else _resolve_one(tokenizer, prompt, c, max_length, locate)
                    for c in concept_list]
        _warn_if_shared(resolved, prompt)
        repeats = num_samples // num_prompts
        spans += [[span for span, _ in resolved]] * repeats
        labels += [[label for _, label in resolved]] * repeats
    for prompt in dict.fromkeys((prompts or []) if locate is None else []):
        _warn_if_truncated(tokenizer, prompt, max_length)
    return ResolvedConcepts(spans=spans, labels=labels)


def _warn_if_truncated(tokenizer: Any, prompt: str, max_length: int | None) -> None:
    """One ConceptrolWarning naming the words the text encoder will never see (diffusers' own is hidden)."""
    dropped = truncated_text(tokenizer, prompt, max_length)
    if dropped:
        shown, dropped = textwrap.shorten(prompt, 50, placeholder=" ..."), shorten_middle(dropped)
        limit = max_length or tokenizer.model_max_length
        warnings.warn(
            f"prompt {shown!r} is longer than the text encoder's {limit}-token limit; "
            f"these words are dropped: {dropped!r}",
            ConceptrolWarning, stacklevel=3,
        )


def _warn_if_shared(resolved: list[tuple[slice, str]], prompt: str | None) -> None:
    """One ConceptrolWarning when two references are confined to the same words of a prompt (a repeated word)."""
    seen: dict[tuple[int, int], int] = {}
    for index, (span, label) in enumerate(resolved):
        if span is None:
            continue
        first = seen.setdefault((span.start, span.stop), index)
        if first != index:
            where = f" of prompt {shorten_middle(prompt)!r}" if prompt else ""
            warnings.warn(
                f"concepts {first + 1} and {index + 1} ({label!r}) pick the same words{where}, so both references are "
                f"confined to them; for a later repeat of the word pass Concept({label!r}, occurrence=1) "
                f"(on the command line: --concept {label}@2)", ConceptrolWarning, stacklevel=4)
            return


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)


def _resolve_one(tokenizer: Any, prompt: str | None, concept: Any, max_length: int | None,
                 locate: Callable[[str, Concept], slice] | None = None) -> tuple[slice, str]:
    if isinstance(concept, slice) or _is_pair(concept):
        span = as_span(concept)
        if prompt is not None:
            num_tokens = len(_ids(tokenizer, prompt, special=True))
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
    if locate is not None:
        return locate(prompt, Concept(concept) if isinstance(concept, str) else concept), re.sub(r"^[\W_]+|[\W_]+$", "", text)
    return find_concept_span(tokenizer, prompt, concept, max_length), re.sub(r"^[\W_]+|[\W_]+$", "", text)
