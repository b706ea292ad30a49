"""Benchmark loaders, resumable records and sharding (evaluation harness groundwork)."""

import json
import multiprocessing
import time
from collections import Counter

import pytest
from PIL import Image

from conceptrol import ConceptrolError
from conceptrol.eval.benchmark import describe, load_benchmark
from conceptrol.eval.records import RecordStore, shard


def dreambench_plus(root, captions):
    """A DreamBench++ release in its real layout: images/<category>/<nn>.jpg and captions/<category>/<nn>.txt,
    the live subjects one level deeper (live_subject/animal, live_subject/human)."""
    for (category, index), text in captions.items():
        (root / "images" / category).mkdir(parents=True, exist_ok=True)
        (root / "captions" / category).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(category) * 9, int(index) * 20, 50)).save(root / "images" / category / f"{index}.jpg")
        (root / "captions" / category / f"{index}.txt").write_text(text)
    return root


RELEASE = {
    ("live_subject/animal", "00"): "kitten\na kitten in the snow\na kitten on a skateboard\n",
    ("live_subject/animal", "01"): "corgi dog\na dog on the moon\n",
    ("live_subject/human", "00"): "young woman\na woman reading in a cafe\n",
    ("object", "00"): "red backpack\na backpack on a rock\na backpack in the jungle\n",
    ("style", "00"): "ink painting\na painting of a castle\n",
}


def test_dreambench_plus_finds_live_subjects_one_level_deeper_and_keeps_their_category(tmp_path):
    cases = load_benchmark(dreambench_plus(tmp_path, RELEASE))
    assert [c.case_id for c in cases] == [
        "live_subject/animal/00/0", "live_subject/animal/00/1", "live_subject/animal/01/0",
        "live_subject/human/00/0", "object/00/0", "object/00/1", "style/00/0"]
    assert Counter(c.category for c in cases) == {"live_subject/animal": 3, "live_subject/human": 1, "object": 2,
                                                  "style": 1}
    dog = cases[2]
    assert (dog.concept, dog.subject, dog.prompt) == ("dog", "corgi dog", "a dog on the moon")
    assert dog.image == (tmp_path / "images" / "live_subject" / "animal" / "01.jpg").resolve()
    assert describe(cases) == "7 cases: live_subject/animal 3, live_subject/human 1, object 2, style 1"


def test_dreambench_plus_one_case_per_prompt_with_the_last_subject_word_as_concept(tmp_path):
    root = dreambench_plus(tmp_path, {("object", "03"): "red backpack\na backpack on a rock\n"})
    (case,) = load_benchmark(root)
    assert (case.case_id, case.concept, case.category, case.image.name) == ("object/03/0", "backpack", "object", "03.jpg")


def test_empty_captions_and_missing_images_are_clear_errors(tmp_path):
    root = dreambench_plus(tmp_path / "a", {("live_subject/animal", "00"): "dog\n"})
    with pytest.raises(ConceptrolError, match="at least one prompt"):
        load_benchmark(root)
    root = dreambench_plus(tmp_path / "b", {("live_subject/animal", "00"): "dog\na dog\n"})
    (root / "images" / "live_subject" / "animal" / "00.jpg").unlink()
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


def test_manifest_errors_name_the_line_of_the_row(tmp_path):
    manifest = tmp_path / "set.jsonl"
    manifest.write_text("\n" + json.dumps({"image": "nope.png", "prompt": "a cat", "concept": "cat"}))
    with pytest.raises(ConceptrolError, match="set.jsonl line 2: image .*nope.png does not exist"):
        load_benchmark(manifest)
    manifest.write_text(json.dumps({"image": "nope.png", "prompt": "a cat"}))
    with pytest.raises(ConceptrolError, match="set.jsonl line 1: the row lacks concept"):
        load_benchmark(manifest)
    csv_manifest = tmp_path / "set.csv"
    csv_manifest.write_text("image,prompt,concept\nnope.png,a cat,\n")
    with pytest.raises(ConceptrolError, match="set.csv line 2: the row lacks concept"):  # line 1 is the header
        load_benchmark(csv_manifest)
    with pytest.raises(ConceptrolError, match="neither a DreamBench"):
        load_benchmark(tmp_path)


def _write_forever(path):
    store = RecordStore(path)
    for i in range(10**9):
        store.append({"key": f"case{i}", "payload": "x" * 1000})


def test_records_survive_a_kill_and_resume_skips_finished_cases(tmp_path):
    path = tmp_path / "records.jsonl"
    process = multiprocessing.get_context("fork").Process(target=_write_forever, args=(path,))
    process.start()
    deadline = time.monotonic() + 60
    while (not path.exists() or path.stat().st_size < 200_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    process.join()
    assert path.stat().st_size >= 200_000, "the writer did not get going within a minute"
    store = RecordStore(path)
    done = {record["key"] for record in store.read()}
    assert done and done == {f"case{i}" for i in range(len(done))}  # every finished case kept, in order
    store.append({"key": "next"})
    assert {record["key"] for record in store.read()} == done | {"next"}  # a cut-off last line does not swallow the next record


def test_damaged_lines_are_counted_and_skipped(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"key": "a"}\nnot json\n[1, 2]\n{"no key": 1}\n\n{"key": "b"}\n{"key": "c", "cut')
    records, malformed = RecordStore(path).read_counting()
    assert [r["key"] for r in records] == ["a", "b"] and malformed == 4


def write_manifest(folder, rows):
    (folder / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "set.jsonl"


def test_manifest_rows_without_ids_are_keyed_by_their_content(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "dog.png")
    rows = [{"image": "dog.png", "prompt": "a dog on the moon", "concept": "dog"},
            {"image": "dog.png", "prompt": "a dog in a cafe", "concept": "dog"}]
    first = [c.case_id for c in load_benchmark(write_manifest(tmp_path, rows))]
    assert len(set(first)) == 2 and all(i.startswith("dog-") for i in first)
    assert [c.case_id for c in load_benchmark(write_manifest(tmp_path, rows[::-1]))] == first[::-1]  # order is no key
    edited = [rows[0] | {"prompt": "a dog on the sun"}, rows[1]]
    second = [c.case_id for c in load_benchmark(write_manifest(tmp_path, edited))]
    assert second[0] != first[0] and second[1] == first[1]  # an edited row is a new case; the other keeps its id
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "dog.png")  # a new picture under the same name
    assert not set(c.case_id for c in load_benchmark(write_manifest(tmp_path, rows))) & set(first)


def test_repeated_rows_and_empty_benchmarks_are_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "dog.png")
    row = {"image": "dog.png", "prompt": "a dog on the moon", "concept": "dog"}
    with pytest.raises(ConceptrolError, match="repeated rows or ids"):
        load_benchmark(write_manifest(tmp_path, [row, row]))
    with pytest.raises(ConceptrolError, match="has no cases"):
        load_benchmark(write_manifest(tmp_path, []))
    (tmp_path / "captions").mkdir()
    with pytest.raises(ConceptrolError, match="no caption files"):
        load_benchmark(tmp_path)
    with pytest.raises(ConceptrolError, match="does not exist"):
        load_benchmark(tmp_path / "nowhere")


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
