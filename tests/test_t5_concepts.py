"""Concept spans in T5 tokenization (FLUX's text encoder): no start token, 0-based positions, long limit."""

import pytest
from conceptrol import ConceptNotFoundError, ConceptrolError, find_concept_span
from conceptrol.concepts import resolve_concepts

def test_t5_positions_are_zero_based(t5_tok):
    span = find_concept_span(t5_tok, "dog on a sofa", "dog", max_length=512)
    assert span.start == 0
    pieces = t5_tok.convert_ids_to_tokens(t5_tok("dog on a sofa").input_ids[span])
    assert "".join(pieces).replace("▁", "") == "dog"


def test_t5_concept_later_in_the_prompt(t5_tok):
    prompt = "a photo of a dog surfing a wave"
    span = find_concept_span(t5_tok, prompt, "dog", max_length=512)
    pieces = t5_tok.convert_ids_to_tokens(t5_tok(prompt).input_ids)
    assert "".join(pieces[span]).replace("▁", "") == "dog" and span.start > 0


def test_t5_concept_past_max_sequence_length_is_an_error(t5_tok):
    prompt = "a " * 40 + "dog"
    with pytest.raises(ConceptNotFoundError, match="limit of 32 tokens"):
        find_concept_span(t5_tok, prompt, "dog", max_length=32)
    assert find_concept_span(t5_tok, prompt, "dog", max_length=512).start == 40


def test_t5_missing_concept_suggests_the_closest_word(t5_tok):
    with pytest.raises(ConceptNotFoundError, match="did you mean 'corgi'"):
        find_concept_span(t5_tok, "the corgi wears a hat", "corgy", max_length=512)


def test_explicit_span_in_the_padding_is_an_error(t5_tok):
    with pytest.raises(ConceptrolError, match="falls in the padding"):
        resolve_concepts(t5_tok, ["a dog"], [(3, 9)], num_samples=1)
    assert resolve_concepts(t5_tok, ["a dog"], [(1, 3)], num_samples=1).spans == [[slice(1, 3)]]
