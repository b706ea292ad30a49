"""The prompt's words as clickable concept choices, and the Concept a selection or a typed phrase names (no gradio)."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.concepts import Concept, closest_phrase
from ..core.errors import ConceptrolError

WORD = re.compile(r"[^\W_](?:[\w'-]*[^\W_])?")  # letters/digits, inner apostrophes and dashes kept ("teddy-bear")
# Words of a file name that say nothing about the subject ("photo_of_my_dog_2.jpg" names a dog).
FILLER = {"a", "an", "the", "my", "our", "of", "and", "in", "on", "with", "photo", "image", "img", "picture", "pic",
          "reference", "ref", "subject", "input", "crop", "cropped", "final", "copy", "new", "edit", "edited"}


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words in order, as they appear."""
    return WORD.findall(prompt)


def word_choices(prompt: str) -> list[tuple[str, str]]:
    """(label, value) pairs for a checkbox group: the word, and its position as a string (repeats stay distinct)."""
    return [(word, str(index)) for index, word in enumerate(prompt_words(prompt))]


def concept_from_words(prompt: str, selected: list[str] | tuple[str, ...]) -> Concept:
    """The concept the selected word positions name: one word or adjacent words, with the right occurrence."""
    words = prompt_words(prompt)
    positions = sorted({int(value) for value in selected})
    if not positions:
        raise ConceptrolError("no concept word selected")
    if positions[-1] >= len(words):
        raise ConceptrolError("the selected words are no longer in the prompt; pick the concept again")
    if positions != list(range(positions[0], positions[-1] + 1)):
        chosen = ", ".join(repr(words[p]) for p in positions)
        raise ConceptrolError(f"the words {chosen} are not next to each other in the prompt; "
                              "pick one word, or adjacent words of one phrase")
    start, length = positions[0], len(positions)
    phrase = [w.lower() for w in words[start : start + length]]
    earlier = sum(1 for i in range(start) if [w.lower() for w in words[i : i + length]] == phrase)
    return Concept(" ".join(words[start : start + length]), occurrence=earlier)


def concept_from_text(prompt: str, text: str, occurrence: int = 0) -> Concept:
    """The Concept a typed word or phrase names, checked to be in the prompt (occurrence 0 = its first appearance)."""
    typed = WORD.findall(text)
    if not typed:
        raise ConceptrolError(f"the concept {text!r} has no word in it; give the word(s) of the prompt that name "
                              "the subject")
    phrase, words = [w.lower() for w in typed], [w.lower() for w in prompt_words(prompt)]
    starts = [i for i in range(len(words) - len(phrase) + 1) if words[i : i + len(phrase)] == phrase]
    if not starts:
        close = closest_phrase(phrase, words)
        hint = f"did you mean {close!r}?" if close else "give a word or phrase of the prompt"
        raise ConceptrolError(f"the concept {text!r} is not in the prompt {prompt!r}; {hint}")
    if not 0 <= occurrence < len(starts):
        raise ConceptrolError(f"the concept {text!r} appears {len(starts)} time(s) in the prompt, so occurrence "
                              f"{occurrence} does not exist; use 0 (its first appearance) to {len(starts) - 1}")
    return Concept(" ".join(typed), occurrence=occurrence)


def preselect(prompt: str, reference: str | Path | None) -> list[str]:
    """The position of the first word of the reference's file name that the prompt contains (dog.jpg -> 'dog')."""
    if not reference:
        return []
    name_words = [w.lower() for w in WORD.findall(Path(reference).stem.replace("_", " "))]
    words = [w.lower() for w in prompt_words(prompt)]
    for name_word in name_words:
        if name_word in FILLER or name_word.isdigit():
            continue
        for candidate in (name_word, name_word + "s", name_word.rstrip("s")):
            if candidate in words:
                return [str(words.index(candidate))]
    return []


def keep_selection(old_prompt: str, new_prompt: str, selected: list[str]) -> list[str]:
    """The same phrase's positions in an edited prompt (its first occurrence), or nothing if it is gone."""
    try:
        concept = concept_from_words(old_prompt, selected)
    except ConceptrolError:
        return []
    phrase = concept.text.lower().split()
    words = [w.lower() for w in prompt_words(new_prompt)]
    for start in range(len(words) - len(phrase) + 1):
        if words[start : start + len(phrase)] == phrase:
            return [str(i) for i in range(start, start + len(phrase))]
    return []
