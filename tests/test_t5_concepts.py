"""Concept spans in T5 tokenization (FLUX's text encoder): no start token, 0-based positions, long limit."""

import pytest

from conceptrol import Concept, ConceptNotFoundError, ConceptrolError, find_concept_span
from conceptrol.core.concepts import resolve_concepts
from conceptrol.tiny import t5_tokenizer


@pytest.fixture(params=["sentencepiece", "letters"])
def any_t5(request):
    """Both T5-layout tokenizers: the trained sentencepiece one and the letter-by-letter fast one."""
    return request.getfixturevalue("t5_tok") if request.param == "sentencepiece" else t5_tokenizer()


def pieces(tok, prompt, span):
    return tok.convert_ids_to_tokens(tok(prompt).input_ids[span])


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


def test_t5_word_inside_a_longer_word_is_skipped(any_t5):
    prompt = "two dogs and a dog"
    span = find_concept_span(any_t5, prompt, "dog", max_length=512)
    assert "".join(pieces(any_t5, prompt, span)).replace("▁", "") == "dog"
    assert span.stop == len(any_t5(prompt).input_ids) - 1  # the last word, just before the end token


def test_t5_word_at_the_start_of_a_longer_word_is_not_the_word(any_t5):
    prompt = "a catdog and a cat"
    span = find_concept_span(any_t5, prompt, "cat", max_length=512)
    assert span.stop == len(any_t5(prompt).input_ids) - 1
    with pytest.raises(ConceptNotFoundError, match="occurs 1 time"):
        find_concept_span(any_t5, prompt, Concept("cat", occurrence=1), max_length=512)


def test_t5_concept_matches_a_capitalised_word_of_the_prompt(any_t5):
    prompt = "a Dog on a sofa"  # T5 keeps case, so the prompt's tokens for "Dog" are not those of "dog"
    word = any_t5.convert_ids_to_tokens(any_t5("Dog", add_special_tokens=False).input_ids)
    for concept in ["dog", "DOG", "Dog"]:
        span = find_concept_span(any_t5, prompt, concept, max_length=512)
        assert span.start == 1 and pieces(any_t5, prompt, span) == word


def test_t5_comma_after_the_concept_stays_out_of_the_span(any_t5):
    prompt = "a dog, surfing"
    for concept in ["dog", "dog,"]:
        span = find_concept_span(any_t5, prompt, concept, max_length=512)
        assert "".join(pieces(any_t5, prompt, span)).replace("▁", "") == "dog"


def test_t5_phrase_matches_across_extra_spaces(any_t5):
    prompt = "a teddy  bear on the\tmoon"
    span = find_concept_span(any_t5, prompt, "teddy bear", max_length=512)
    assert "".join(pieces(any_t5, prompt, span)).replace("▁", "") == "teddybear"
    assert span.start == 1


def test_t5_repeated_word_picks_the_requested_occurrence(any_t5):
    prompt = "the cat and the dog and the Cat"
    first = find_concept_span(any_t5, prompt, "cat", max_length=512)
    second = find_concept_span(any_t5, prompt, Concept("cat", occurrence=1), max_length=512)
    assert first.start < second.start and second.stop == len(any_t5(prompt).input_ids) - 1


def merging_tokenizer():
    """Letter-level T5 layout plus pieces that glue letters to punctuation ("og,", "(d"), as real vocabularies may."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = list(string.ascii_lowercase + ",()")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("og,", -1.0), ("(d", -1.0)]
    pieces += [(c, -3.0) for c in alphabet] + [("▁" + c, -2.5) for c in alphabet]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a dog, surfing", ["▁d", "og,"]),
    ("a (dog) surfing", ["▁", "(d", "o", "g"]),
    ("a (dog, surfing", ["▁", "(d", "og,"]),
])
def test_a_token_holding_part_of_the_concept_is_kept_whole(prompt, expected):
    tok = merging_tokenizer()
    assert pieces(tok, prompt, find_concept_span(tok, prompt, "dog", max_length=512)) == expected
