"""Locating concepts with CLIP's real tokenizer."""

import warnings

import pytest
import torch

from conceptrol import Concept, ConceptNotFoundError, ConceptrolError, ConceptrolWarning, find_concept_span
from conceptrol.core.concepts import resolve_concepts


def tokens(tok, prompt, span):
    return tok.convert_ids_to_tokens(tok(prompt).input_ids[span])


def test_single_word_span_counts_the_start_token(clip_tok):
    span = find_concept_span(clip_tok, "a dog surfing a wave", "dog")
    assert span == slice(2, 3)
    assert tokens(clip_tok, "a dog surfing a wave", span) == ["dog</w>"]


def test_multi_token_concept(clip_tok):
    prompt = "a teddy bear reading a book"
    span = find_concept_span(clip_tok, prompt, "teddy bear")
    assert tokens(clip_tok, prompt, span) == ["teddy</w>", "bear</w>"]


def test_sub_word_concept_spans_all_its_pieces(clip_tok):
    prompt = "a photo of a corgipoo on the grass"
    span = find_concept_span(clip_tok, prompt, "corgipoo")
    assert span.stop - span.start > 1
    assert "".join(tokens(clip_tok, prompt, span)).replace("</w>", "") == "corgipoo"


def test_case_and_punctuation_do_not_matter(clip_tok):
    assert find_concept_span(clip_tok, "A DOG, surfing!", "Dog") == slice(2, 3)


def test_repeated_word_picks_the_requested_occurrence(clip_tok):
    prompt = "a dog next to another dog"
    assert find_concept_span(clip_tok, prompt, "dog") == slice(2, 3)
    assert find_concept_span(clip_tok, prompt, Concept("dog", occurrence=1)) == slice(6, 7)
    with pytest.raises(ConceptNotFoundError, match="occurs 2 time"):
        find_concept_span(clip_tok, prompt, Concept("dog", occurrence=2))


def test_concept_missing_from_prompt_says_so_and_suggests_the_closest_word(clip_tok):
    with pytest.raises(ConceptNotFoundError, match=r"'dgo' not found in prompt 'a dog on a beach'.*did you mean 'dog'"):
        find_concept_span(clip_tok, "a dog on a beach", "dgo")


def test_part_of_a_word_is_not_the_word(clip_tok):
    with pytest.raises(ConceptNotFoundError, match="did you mean 'dogs'"):
        find_concept_span(clip_tok, "two dogs on a beach", "dog")


def test_concept_past_the_77_token_limit_is_an_error(clip_tok):
    prompt = "a " * 80 + "dog"
    with pytest.raises(ConceptNotFoundError, match="past the text encoder's limit of 77 tokens"):
        find_concept_span(clip_tok, prompt, "dog")
    last_kept = "a " * 74 + "dog"  # BOS + 74 words + dog = position 75, the last one before EOS
    assert find_concept_span(clip_tok, last_kept, "dog") == slice(75, 76)


def test_empty_concept_is_rejected(clip_tok):
    with pytest.raises(ConceptrolError, match="has no word in it"):
        find_concept_span(clip_tok, "a dog", "  ")


@pytest.mark.parametrize("concept", [",", "🐶"])
def test_concept_of_punctuation_or_emoji_only_has_no_word_in_it(clip_tok, concept):  # audit D23
    with pytest.raises(ConceptrolError, match=f"concept '{concept}' has no word in it"):
        find_concept_span(clip_tok, "a dog, surfing 🐶", concept)


def test_one_concept_list_applies_to_every_prompt_and_repeats_per_image(clip_tok):
    resolved = resolve_concepts(clip_tok, ["a dog", "one big dog"], ["dog"], num_samples=4)
    assert resolved.spans == [[slice(2, 3)]] * 2 + [[slice(3, 4)]] * 2
    assert resolved.labels == [["dog"]] * 4


def test_per_prompt_concept_lists(clip_tok):
    resolved = resolve_concepts(clip_tok, ["a dog", "a red car"], [["dog"], ["car"]], num_samples=2)
    assert resolved.spans == [[slice(2, 3)], [slice(3, 4)]]


def test_explicit_token_spans_work_without_a_prompt(clip_tok):
    resolved = resolve_concepts(clip_tok, None, [(2, 4)], num_samples=2)
    assert resolved.spans == [[slice(2, 4)], [slice(2, 4)]]
    with pytest.raises(ConceptrolError, match="explicit"):
        resolve_concepts(clip_tok, None, ["dog"], num_samples=1)


@pytest.mark.parametrize("bad", [(3, 3), (-1, 2), slice(None, 4)])
def test_bad_explicit_spans_are_rejected(clip_tok, bad):
    with pytest.raises(ConceptrolError, match="token span"):
        resolve_concepts(clip_tok, ["a dog"], [bad], num_samples=1)


def test_mismatched_concept_lists_are_rejected(clip_tok):
    with pytest.raises(ConceptrolError, match="2 prompts"):
        resolve_concepts(clip_tok, ["a dog", "a cat"], [["dog"], ["cat"], ["cat"]], num_samples=2)
    with pytest.raises(ConceptrolError, match="same number"):
        resolve_concepts(clip_tok, ["a dog", "a cat"], [["dog"], ["cat", "a"]], num_samples=2)
    with pytest.raises(ConceptrolError, match="non-empty list"):
        resolve_concepts(clip_tok, ["a dog"], "dog", num_samples=1)


@pytest.mark.parametrize(("prompt", "concept", "whole_word"), [
    ("a seahorse on a rock", "horse", "seahorse"),  # CLIP's BPE: sea + horse</w>
    ("a sheepdog on a farm", "dog", "sheepdog"),  # sheep + dog</w>
    ("a tomcat on a roof", "cat", "tomcat"),  # tom + cat</w>
])
def test_word_at_the_end_of_a_longer_word_is_not_the_word(clip_tok, prompt, concept, whole_word):
    assert f"{concept}</w>" in clip_tok.tokenize(prompt)  # a token search alone would match here
    with pytest.raises(ConceptNotFoundError, match=f"did you mean '{whole_word}'"):
        find_concept_span(clip_tok, prompt, concept)


def test_the_whole_word_is_found_after_a_longer_word_that_ends_like_it(clip_tok):
    prompt = "a seahorse next to a horse"
    span = find_concept_span(clip_tok, prompt, "horse")
    assert span == slice(7, 8)
    assert tokens(clip_tok, prompt, span) == ["horse</w>"]


@pytest.mark.parametrize("concept", ["dog,", " (dog) ", "dog!", "'dog'"])
def test_punctuation_around_the_concept_is_ignored(clip_tok, concept):
    prompt = "a dog, surfing"
    assert tokens(clip_tok, prompt, find_concept_span(clip_tok, prompt, concept)) == ["dog</w>"]
    assert resolve_concepts(clip_tok, [prompt], [concept], num_samples=1).labels == [["dog"]]


def test_punctuation_in_the_prompt_never_joins_the_span(clip_tok):
    prompt = "a (dog), surfing with a red hat."
    assert tokens(clip_tok, prompt, find_concept_span(clip_tok, prompt, "dog")) == ["dog</w>"]
    assert tokens(clip_tok, prompt, find_concept_span(clip_tok, prompt, "red hat.")) == ["red</w>", "hat</w>"]


def test_inner_punctuation_stays_and_a_dashed_word_is_one_word(clip_tok):
    prompt = "a teddy-bear on the moon"
    span = find_concept_span(clip_tok, prompt, "Teddy-Bear")
    assert tokens(clip_tok, prompt, span) == ["teddy</w>", "-</w>", "bear</w>"]
    with pytest.raises(ConceptNotFoundError, match="did you mean 'teddy-bear'"):
        find_concept_span(clip_tok, prompt, "bear")


def test_occurrence_counts_whole_words_only(clip_tok):
    prompt = "a corndog for the dog and the other Dog"  # corn + dog</w> is not a dog
    assert tokens(clip_tok, prompt, slice(2, 4)) == ["corn", "dog</w>"]
    assert find_concept_span(clip_tok, prompt, "dog") == slice(6, 7)
    assert find_concept_span(clip_tok, prompt, Concept("dog", occurrence=1)) == slice(10, 11)
    with pytest.raises(ConceptNotFoundError, match="occurs 2 time"):
        find_concept_span(clip_tok, prompt, Concept("dog", occurrence=2))


def test_a_word_picked_in_the_demo_gives_the_span_of_that_very_word(clip_tok):
    from conceptrol.demo.concept_words import concept_from_words, prompt_words

    prompt = "a corndog, a dog and a Dog; a dog-sled, a dog"
    # tokens: BOS a corn dog , a [dog] and a [Dog] ; a dog - sled , a [dog] EOS
    picked = [str(i) for i, word in enumerate(prompt_words(prompt)) if word.lower() == "dog"]
    spans = [find_concept_span(clip_tok, prompt, concept_from_words(prompt, [i])) for i in picked]
    assert spans == [slice(6, 7), slice(9, 10), slice(17, 18)]
    assert all(tokens(clip_tok, prompt, span) == ["dog</w>"] for span in spans)


def test_an_unrelated_concept_gets_no_far_fetched_suggestion(clip_tok):
    with pytest.raises(ConceptNotFoundError) as raised:
        find_concept_span(clip_tok, "a dog on the moon", "cat")
    assert "did you mean" not in str(raised.value) and "pass a word or phrase that appears in the prompt" in str(raised.value)


def test_a_span_written_as_a_list_says_how_to_write_a_span(clip_tok):  # audit D23
    with pytest.raises(ConceptrolError, match=r"a token span is written as a tuple \(start, end\) or a slice, got the "
                                              r"list \[1, 2\]"):
        resolve_concepts(clip_tok, ["a dog"], [[1, 2]], 1)


def test_a_span_past_the_text_tokens_is_a_conceptrol_error():  # audit D23
    from conceptrol.core.masking import span_weights

    with pytest.raises(ConceptrolError, match="is past the 77 text tokens"):
        span_weights([[slice(76, 80)]], 77, torch.device("cpu"))


def test_two_concepts_on_the_same_words_warn_once(clip_tok):  # audit D14
    with pytest.warns(ConceptrolWarning, match=r"concepts 1 and 2 \('dog'\) pick the same words") as caught:
        resolve_concepts(clip_tok, ["a dog and a dog"], ["dog", "dog"], 1)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_concepts(clip_tok, ["a dog and a dog"], ["dog", Concept("dog", occurrence=1)], 1)


def test_a_concept_missing_from_a_long_prompt_is_one_short_line(clip_tok):  # audit D33
    prompt = " ".join(["a very long description of a sunny seaside town"] * 12) + " with a cat"
    with pytest.raises(ConceptNotFoundError) as raised:
        find_concept_span(clip_tok, prompt, "horse", max_length=10_000)
    message = str(raised.value)
    assert len(message) < 700 and "..." in message and message.count("seaside") < 6


@pytest.mark.parametrize("concept", ["horse", "then", "andy"])
def test_a_stop_word_is_never_suggested_for_a_missing_concept(clip_tok, concept):  # audit D25
    from conceptrol.demo.concept_words import concept_from_text

    prompt = "a cat and a teddy bear in the snow"
    for find in (lambda: find_concept_span(clip_tok, prompt, concept), lambda: concept_from_text(prompt, concept)):
        with pytest.raises(ConceptrolError) as raised:
            find()
        assert "did you mean 'the'" not in str(raised.value) and "did you mean 'and'" not in str(raised.value)
