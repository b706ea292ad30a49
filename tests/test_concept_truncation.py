"""Prompts cut at the text encoder's token limit: the words dropped are named in one warning per prompt."""

import warnings

import pytest

from conceptrol import ConceptrolWarning
from conceptrol.core.concepts import resolve_concepts, truncated_text
from conceptrol.tiny import t5_tokenizer

# Words that CLIP's real BPE keeps whole: one token each, so word k of a prompt is token k + 1 (after BOS).
ONE_TOKEN_WORDS = "dog cat red hat sun moon tree car book cafe wave beach sofa grass photo".split()


def clip_words(clip_tok, count: int) -> list[str]:
    words = [ONE_TOKEN_WORDS[i % len(ONE_TOKEN_WORDS)] for i in range(count)]
    assert len(clip_tok(" ".join(words), verbose=False).input_ids) == count + 2  # BOS + one token a word + EOS
    return words


def concept_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ConceptrolWarning)]


def test_clip_prompt_past_77_tokens_warns_once_naming_the_dropped_words(clip_tok):
    words = clip_words(clip_tok, 90)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resolve_concepts(clip_tok, [" ".join(words)], ["dog"], num_samples=2)
    dropped = " ".join(words[75:])  # BOS + 75 words + EOS = 77
    assert concept_warnings(record) == [
        "prompt 'dog cat red hat sun moon tree car book cafe ...' is longer than the text encoder's 77-token limit; "
        f"these words are dropped: {dropped!r}"
    ]


@pytest.mark.parametrize(("count", "dropped_from"), [(74, None), (75, None), (76, 75), (77, 75)])
def test_clip_limit_counts_the_start_and_end_tokens(clip_tok, count, dropped_from):
    words = clip_words(clip_tok, count)
    expected = "" if dropped_from is None else " ".join(words[dropped_from:])
    assert truncated_text(clip_tok, " ".join(words)) == expected


def test_dropped_text_is_the_prompt_as_written(clip_tok):
    words = clip_words(clip_tok, 75)
    prompt = " ".join(words) + ",  Wearing a RED hat! "
    assert truncated_text(clip_tok, prompt) == ",  Wearing a RED hat!"


def test_a_word_cut_in_the_middle_is_reported_whole(clip_tok):
    words = clip_words(clip_tok, 74)
    prompt = " ".join(words) + " seahorse wearing a red hat"
    assert clip_tok.tokenize(prompt)[74:76] == ["sea", "horse</w>"]  # sea is token 75, the last one kept
    assert truncated_text(clip_tok, prompt) == "seahorse wearing a red hat"


def test_prompt_that_fits_warns_nothing(clip_tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConceptrolWarning)
        resolve_concepts(clip_tok, [" ".join(clip_words(clip_tok, 75))], ["dog"], num_samples=1)
    assert truncated_text(clip_tok, "a dog") == ""


def test_one_warning_per_truncated_prompt(clip_tok):
    words = clip_words(clip_tok, 80)
    long_dogs, long_cats = " ".join(words[:76]), " ".join(words[1:])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resolve_concepts(clip_tok, [long_dogs, "a dog", long_cats, long_dogs], ["dog"], num_samples=4)
    messages = concept_warnings(record)
    assert len(messages) == 2
    assert messages[0].endswith(f"these words are dropped: {words[75]!r}")
    assert messages[1].endswith(f"these words are dropped: {' '.join(words[76:])!r}")


def test_t5_limit_counts_only_the_end_token():
    tok = t5_tokenizer()  # spells words letter by letter: a one-letter word is one token ("▁e")
    prompt = "a b c d e f g h"
    assert len(tok(prompt).input_ids) == 9
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resolve_concepts(tok, [prompt], ["b"], num_samples=1, max_length=5)
    assert concept_warnings(record) == [
        "prompt 'a b c d e f g h' is longer than the text encoder's 5-token limit; these words are dropped: 'e f g h'"
    ]
    assert truncated_text(tok, prompt, max_length=9) == ""


def test_t5_sentencepiece_truncation_names_the_dropped_words(t5_tok):
    prompt = "a a a a a a a a the corgi wears a hat"
    assert t5_tok.tokenize(prompt)[:9] == ["▁a"] * 8 + ["▁t"]
    assert truncated_text(t5_tok, prompt, max_length=9) == "the corgi wears a hat"  # 8 tokens + EOS
    assert truncated_text(t5_tok, prompt, max_length=512) == ""
