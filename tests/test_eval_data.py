"""Benchmark loaders, resumable records and sharding (evaluation harness groundwork)."""

import json
import multiprocessing

import pytest
from PIL import Image

from conceptrol import ConceptrolError
from conceptrol.eval.benchmark import load_benchmark
from conceptrol.eval.records import RecordStore, shard


def dreambench_plus(root, captions):
    for (category, index), text in captions.items():
        (root / "images" / category).mkdir(parents=True, exist_ok=True)
        (root / "captions" / category).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / "images" / category / f"{index}.jpg")
        (root / "captions" / category / f"{index}.txt").write_text(text)
    return root


def test_dreambench_plus_layout_gives_one_case_per_prompt(tmp_path):
    root = dreambench_plus(tmp_path, {("animal", "0"): "corgi dog\na dog on the moon\na dog in a cafe\n",
                                      ("object", "3"): "red backpack\na backpack on a rock\n"})
    cases = load_benchmark(root)
    assert [c.case_id for c in cases] == ["animal/0/0", "animal/0/1", "object/3/0"]
    assert cases[0].concept == "dog" and cases[0].subject == "corgi dog" and cases[0].category == "animal"
    assert cases[2].prompt == "a backpack on a rock" and cases[2].image.name == "3.jpg"


def test_empty_captions_and_missing_images_are_clear_errors(tmp_path):
    root = dreambench_plus(tmp_path / "a", {("animal", "0"): "dog\n"})
    with pytest.raises(ConceptrolError, match="at least one prompt"):
        load_benchmark(root)
    root = dreambench_plus(tmp_path / "b", {("animal", "0"): "dog\na dog\n"})
    (root / "images" / "animal" / "0.jpg").unlink()
    with pytest.raises(ConceptrolError, match="no reference image"):
        load_benchmark(root)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_manifest_rows_resolve_images_next_to_the_manifest(tmp_path, suffix):
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    rows = [{"id": "c1", "image": "cat.png", "prompt": "a cat on a sofa", "concept": "cat"}]
    manifest = tmp_path / f"set{suffix}"
    if suffix == ".jsonl":
        manifest.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        manifest.write_text("id,image,prompt,concept\nc1,cat.png,a cat on a sofa,cat\n")
    (case,) = load_benchmark(manifest)
    assert case.case_id == "c1" and case.image == (tmp_path / "cat.png").resolve() and case.concept == "cat"


def test_manifest_errors_name_the_row(tmp_path):
    manifest = tmp_path / "set.jsonl"
    manifest.write_text(json.dumps({"image": "nope.png", "prompt": "a cat", "concept": "cat"}))
    with pytest.raises(ConceptrolError, match="row 1: image .*nope.png does not exist"):
        load_benchmark(manifest)
    manifest.write_text(json.dumps({"image": "nope.png", "prompt": "a cat"}))
    with pytest.raises(ConceptrolError, match="row 1 lacks concept"):
        load_benchmark(manifest)
    with pytest.raises(ConceptrolError, match="neither a DreamBench"):
        load_benchmark(tmp_path)


def _write_forever(path):
    store = RecordStore(path)
    for i in range(10**9):
        store.append({"case_id": f"case{i}", "payload": "x" * 1000})


def test_records_survive_a_kill_and_resume_skips_finished_cases(tmp_path):
    path = tmp_path / "records.jsonl"
    process = multiprocessing.get_context("fork").Process(target=_write_forever, args=(path,))
    process.start()
    while not path.exists() or path.stat().st_size < 200_000:
        pass
    process.kill()
    process.join()
    store = RecordStore(path)
    done = {record["case_id"] for record in store.read()}
    assert done and done == {f"case{i}" for i in range(len(done))}  # every finished case kept, in order
    store.append({"case_id": "next"})
    assert {record["case_id"] for record in store.read()} == done | {"next"}  # a cut-off last line does not swallow the next record


def test_shards_are_disjoint_and_cover_every_case():
    items = list(range(11))
    parts = [shard(items, rank, 3) for rank in range(3)]
    assert sorted(sum(parts, [])) == items and sum(len(p) for p in parts) == 11
    with pytest.raises(ValueError):
        shard(items, 3, 3)


DREAMBENCH_PROMPTS = """Classes
subject_name,class
backpack,backpack
dog2,dog

Prompts
Object Prompts
prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on the beach'.format(unique_token, class_token),
]

Live Subject Prompts
prompt_list = [
'a {0} {1} in a police outfit'.format(unique_token, class_token),
]
"""


def test_original_dreambench_layout_uses_the_class_noun_as_concept(tmp_path):
    (tmp_path / "prompts_and_classes.txt").write_text(DREAMBENCH_PROMPTS)
    for subject in ("backpack", "dog2"):
        (tmp_path / subject).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / subject / "00.jpg")
    cases = load_benchmark(tmp_path)
    assert [(c.case_id, c.prompt, c.concept) for c in cases] == [
        ("backpack/0", "a backpack in the jungle", "backpack"),
        ("backpack/1", "a backpack on the beach", "backpack"),
        ("dog2/0", "a dog in a police outfit", "dog"),
    ]
    (tmp_path / "dog2" / "00.jpg").unlink()
    with pytest.raises(ConceptrolError, match="no images in"):
        load_benchmark(tmp_path)
