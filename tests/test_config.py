"""Config validation and the warm-up schedule."""

import math

import pytest

from conceptrol import ConceptrolConfig, ConceptrolError
from conceptrol.core.config import adapter_active


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(scale=-0.1), "scale must be a finite number >= 0"),
        (dict(scale=math.nan), "scale must be a finite number >= 0"),
        (dict(start=0.6, end=0.5), "must be smaller than end"),
        (dict(start=0.5, end=0.5), "must be smaller than end"),
        (dict(start=-0.1), "start must be a fraction"),
        (dict(end=1.5), "end must be a fraction"),
        (dict(end=math.nan), "end must be a fraction"),
        (dict(masking="soft"), "masking must be"),
        (dict(architecture="sd3"), "unknown architecture"),
    ],
)
def test_bad_settings_raise_one_clear_error(fields, message):
    with pytest.raises(ConceptrolError, match=message):
        ConceptrolConfig(**fields)


def test_layer_names_with_processor_suffix_are_normalised():
    config = ConceptrolConfig(concept_layer="up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor")
    assert config.concept_layer == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"


def test_presets_fill_in_the_concept_layer_unless_one_is_given():
    assert ConceptrolConfig().with_architecture("sdxl").concept_layer.startswith("up_blocks.0.attentions.1")
    custom = ConceptrolConfig(concept_layer="mid_block.attentions.0.transformer_blocks.0.attn2")
    assert custom.with_architecture("sd15").concept_layer.startswith("mid_block")


def test_schedule_follows_the_reference_formula():
    # 10 steps, start 0.2: steps 0 and 1 are off; end 0.8: steps whose (k+1)/T > 0.8 are off.
    active = [adapter_active(k, 10, 0.2, 0.8) for k in range(10)]
    assert active == [False, False, True, True, True, True, True, True, False, False]
    assert all(adapter_active(k, 7, 0.0, 1.0) for k in range(7))
