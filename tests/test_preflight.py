"""Checks that need a model's configs and tokenizer but no weights: read from saved folders and loaded pipelines."""

from pathlib import Path

import pytest

from conceptrol import ConceptNotFoundError, ConceptrolError
from conceptrol.app.preflight import check_settings, info_from_pipeline, info_from_source
from conceptrol.app.settings import GenerateSettings
from conceptrol.tiny import load_tiny_ip_adapter, tiny_flux_pipeline, tiny_sd15_pipeline


def settings(**changes):
    fields = dict(prompt="a dog surfing a wave", concept=("dog",), image=(Path("ref.png"),))
    return GenerateSettings(**fields | changes)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "model"
    tiny_flux_pipeline(with_lora=False).save_pretrained(folder)
    return folder


def test_a_saved_flux_folder_gives_its_blocks_guidance_and_t5_tokenizer(flux_folder):
    info = info_from_source(str(flux_folder))
    assert info.architecture == "flux" and info.pixel_multiple == 16 and info.guidance_embeds is False
    assert info.layers == ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                           "single_transformer_blocks.1")
    check_settings(settings(concept_layer="transformer_blocks.1", condition_size=32), info)  # passes
    with pytest.raises(ConceptNotFoundError, match="concept 'cat' not found"):
        check_settings(settings(concept=("cat",)), info)


def test_a_saved_sd15_folder_lists_the_u_nets_cross_attention_layers_without_weights(tiny_folder):
    info = info_from_source(str(tiny_folder[0]), need_layers=True)
    pipe = tiny_sd15_pipeline()
    load_tiny_ip_adapter(pipe, "plus")
    assert info.architecture == "sd15" and info.max_length == 77
    assert set(info.layers) == set(info_from_pipeline(pipe).layers) and len(info.layers) == 10  # 3 down, 1 mid, 6 up


@pytest.mark.parametrize("changes,message", [
    (dict(negative_prompt="blurry"), "--negative-prompt applies to SD 1.5 / SDXL"),
    (dict(guidance=3.5), "--guidance applies to guidance-distilled models"),
    (dict(masking="local"), "OminiControl has no local masking"),
    (dict(concept=("dog", "wave"), image=(Path("a.png"), Path("b.png"))), "OminiControl (FLUX) takes one reference image"),
    (dict(size=(72, 64)), "multiples of 16"),
    (dict(adapter="plus"), "unknown adapter 'plus' for flux; choose one of subject, subject-1024"),
    (dict(concept_layer="transformer_blocks.18"), "not a block of this transformer"),
])
def test_flux_options_that_do_not_apply_are_refused(flux_folder, changes, message):
    with pytest.raises(ConceptrolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_settings(settings(**changes), info_from_source(str(flux_folder)))


def test_a_folder_that_is_not_a_pipeline_says_so(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ConceptrolError, match="is not a diffusers pipeline folder .*no model_index.json"):
        info_from_source(str(tmp_path))
