"""The web UI's logic and server: concept words, requests, the lazy backend, serialisation, errors, upload limits."""

import threading
import time
import weakref

import httpx
import numpy as np
import pytest
from PIL import Image

from conceptrol import Concept, ConceptrolError, find_concept_span
from conceptrol.demo import CompareRequest, LocalBackend, build_demo, request_from_inputs
from conceptrol.demo.backend import DEMO_CHOICES, Comparison, model_choice
from conceptrol.demo.concept_words import concept_from_words, keep_selection, preselect, prompt_words, word_choices
from conceptrol.generate import GenerateSettings, run_conceptrol
from conceptrol.offline_demo import reference_picture, tiny_pipeline


def positions(*indices):
    return [str(i) for i in indices]


def test_prompt_words_split_on_spaces_and_punctuation():
    assert prompt_words("A dog, surfing a wave!") == ["A", "dog", "surfing", "a", "wave"]
    assert [label for label, _ in word_choices("a teddy-bear's hat")] == ["a", "teddy-bear's", "hat"]


def test_adjacent_words_make_a_phrase_and_repeats_get_their_occurrence():
    prompt = "a cat and a cat toy next to a teddy bear"
    assert concept_from_words(prompt, positions(1)) == Concept("cat", 0)
    assert concept_from_words(prompt, positions(4)) == Concept("cat", 1)
    assert concept_from_words(prompt, positions(10, 9)) == Concept("teddy bear", 0)


def test_the_second_cat_clicked_is_the_second_cat_in_tokens(clip_tok):
    prompt = "a cat and a cat toy"
    span = find_concept_span(clip_tok, prompt, concept_from_words(prompt, positions(4)))
    assert span == slice(5, 6)  # <start> a cat and a [cat] toy


def test_words_that_are_not_adjacent_are_refused():
    with pytest.raises(ConceptrolError, match="not next to each other"):
        concept_from_words("a red car under a tree", positions(1, 5))


@pytest.mark.parametrize("file_name,expected", [
    ("dog.jpg", positions(1)),
    ("photo_of_my_dog.png", positions(4)),  # 'photo' is filler even though the prompt has it
    ("Dogs.webp", positions(1)),
    ("12.jpg", []),
    (None, []),
])
def test_the_subject_named_by_the_file_is_preselected(file_name, expected):
    prompt = "a photo of a dog" if file_name == "photo_of_my_dog.png" else "a dog surfing a wave"
    assert preselect(prompt, f"/tmp/gradio/abc/{file_name}" if file_name else None) == expected


def test_a_selection_follows_its_phrase_when_the_prompt_is_edited():
    assert keep_selection("a teddy bear", "a cute teddy bear on the moon", positions(1, 2)) == positions(2, 3)
    assert keep_selection("a teddy bear", "a cat", positions(1, 2)) == []


def slots(images=(), words=()):
    images = list(images) + [None] * (3 - len(images))
    words = list(words) + [[]] * (3 - len(words))
    return [*images, *words]


def test_request_skips_empty_slots_and_keeps_reference_order(tmp_path):
    request = request_from_inputs("tiny-sd15", "a cat and a dog", slots([tmp_path / "c.png", None, tmp_path / "d.png"],
                                  [positions(1), [], positions(4)]), 1.0, 0.2, 5, 3, (128, 96))
    assert request.references == (tmp_path / "c.png", tmp_path / "d.png")
    assert request.concepts == (Concept("cat"), Concept("dog"))
    assert (request.steps, request.seed, request.size) == (5, 3, (128, 96))


@pytest.mark.parametrize("prompt,inputs,message", [
    ("a dog", slots(), "upload a reference image first"),
    ("a dog", slots(["r.png"], [[]]), "pick the concept of reference 1"),
    ("   ", slots(["r.png"], [positions(0)]), "type a prompt first"),
    ("a dog", slots(["r.png"], [positions(5)]), "reference 1: the selected words are no longer in the prompt"),
])
def test_page_mistakes_say_what_to_do(prompt, inputs, message):
    with pytest.raises(ConceptrolError, match=message):
        request_from_inputs("tiny-sd15", prompt, inputs, 1.0, 0.2, 5, 0, (128, 96))


def test_model_menu_guesses_the_architecture_of_a_local_folder(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert model_choice(str(tmp_path)).architecture == "sdxl"
    assert model_choice("flux").size == (512, 512) and model_choice("someone/flux-finetune").architecture == "flux"


class CountingLoader:
    def __init__(self):
        self.loaded = []

    def __call__(self, choice):
        self.loaded.append(choice.key)
        return tiny_pipeline(choice.architecture)


@pytest.fixture
def reference_file(tmp_path):
    path = tmp_path / "dog.png"
    reference_picture(64).save(path)
    return path


def demo_request(reference_file, model="tiny-sd15", **changes):
    fields = dict(model=model, prompt="a dog surfing a wave", references=(reference_file,),
                  concepts=(Concept("dog"),), scale=1.0, start=0.2, steps=3, seed=1, size=(64, 48))
    return CompareRequest(**fields | changes)


def test_nothing_loads_until_the_first_request_then_one_model_at_a_time(reference_file):
    loader = CountingLoader()
    backend = LocalBackend(DEMO_CHOICES, loader=loader)
    build_demo(backend, DEMO_CHOICES)
    assert loader.loaded == [] and backend.loaded is None
    backend(demo_request(reference_file), lambda *_: None)
    first = weakref.ref(backend.loaded[1])
    backend(demo_request(reference_file, seed=2), lambda *_: None)
    assert loader.loaded == ["tiny-sd15"]
    backend(demo_request(reference_file, model="tiny-flux"), lambda *_: None)
    assert loader.loaded == ["tiny-sd15", "tiny-flux"] and backend.loaded[0] == "tiny-flux"
    assert first() is None  # the SD pipeline was released, not kept beside FLUX


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-flux"])
def test_comparison_is_vanilla_and_conceptrol_with_the_same_seed(reference_file, model):
    backend = LocalBackend(DEMO_CHOICES)
    reports = []
    result = backend(demo_request(reference_file, model=model), lambda fraction, what: reports.append((fraction, what)))
    choice = backend.choices[model]
    settings = GenerateSettings(prompt="a dog surfing a wave", concept=(Concept("dog"),), image=(reference_file,),
                                scale=1.0, start=0.2, steps=3, seed=1, size=(64, 48),
                                concept_layer=choice.concept_layer, condition_size=choice.condition_size)
    pipe, ref = backend.loaded[1], [reference_picture(64)]
    expected = run_conceptrol(pipe, settings, ref)
    vanilla = run_conceptrol(pipe, GenerateSettings(**vars(settings) | dict(masking="none", start=0.0)), ref)
    assert np.array_equal(np.asarray(result.conceptrol), np.asarray(expected.images[0]))
    assert np.array_equal(np.asarray(result.vanilla), np.asarray(vanilla.images[0]))
    assert not np.array_equal(np.asarray(result.vanilla), np.asarray(result.conceptrol))
    assert [label for _, label in result.overlays] == ["mask of 'dog'"]
    assert result.overlays[0][0].size == result.conceptrol.size == (64, 48)
    fractions = [f for f, what in reports if what in ("vanilla adapter", "Conceptrol")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 6


def test_flux_with_two_references_is_refused_before_loading(reference_file):
    loader = CountingLoader()
    backend = LocalBackend(DEMO_CHOICES, loader=loader)
    request = demo_request(reference_file, model="tiny-flux", references=(reference_file, reference_file),
                           concepts=(Concept("dog"), Concept("wave")))
    with pytest.raises(ConceptrolError, match="takes one reference image, got 2"):
        backend(request, lambda *_: None)
    assert loader.loaded == []


def test_a_broken_upload_fails_before_any_model_loads(tmp_path):
    broken = tmp_path / "dog.png"
    broken.write_bytes(b"not an image")
    loader = CountingLoader()
    with pytest.raises(ConceptrolError, match="cannot read reference image"):
        LocalBackend(DEMO_CHOICES, loader=loader)(demo_request(broken), lambda *_: None)
    assert loader.loaded == []


def test_the_backend_runs_one_request_at_a_time(reference_file, monkeypatch):
    spans = []

    def slow_compare(pipe, choice, request, references, progress):
        began = time.perf_counter()
        time.sleep(0.3)
        spans.append((began, time.perf_counter()))
        return None

    monkeypatch.setattr("conceptrol.demo.backend.compare", slow_compare)
    backend = LocalBackend(DEMO_CHOICES, loader=lambda choice: object())
    threads = [threading.Thread(target=backend, args=(demo_request(reference_file), lambda *_: None)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans.sort()
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@pytest.fixture
def served():
    """Launch build_demo(fn) on a free local port; yields a function returning (url, client)."""
    demos = []

    def serve(generate_fn, **launch):
        from gradio_client import Client

        demo = build_demo(generate_fn, DEMO_CHOICES)
        demo.queue(default_concurrency_limit=1)
        _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, ssr_mode=False, **launch)
        demos.append(demo)
        return url, Client(url, verbose=False, download_files=False, analytics_enabled=False)

    yield serve
    for demo in demos:
        demo.close()


def page_inputs(reference, words):
    from gradio_client import handle_file

    return ["tiny-sd15", "a dog surfing a wave", 1.0, 0.2, 3, 0, 128, 96,
            handle_file(str(reference)), None, None, words, [], []]


def fake_result():
    image = Image.new("RGB", (16, 16), "gray")
    return Comparison(image, image, [(image, "mask of 'dog'")], 0.1)


def test_the_page_serves_generate_requests_one_at_a_time(served, reference_file):
    spans = []

    def slow(request, progress):
        began = time.perf_counter()
        time.sleep(0.5)
        spans.append((began, time.perf_counter()))
        return fake_result()

    _, client = served(slow)
    jobs = [client.submit(*page_inputs(reference_file, positions(1)), api_name="/generate") for _ in range(3)]
    outputs = [job.result(timeout=60) for job in jobs]
    spans.sort()
    assert len(outputs) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert "Done in 0.1 s" in outputs[0][3]


@pytest.mark.parametrize("failure,message", [
    (ConceptrolError("concept 'dgo' not found in prompt"), "concept 'dgo' not found in prompt"),
    (RuntimeError("boom"), "generation failed: RuntimeError: boom"),
])
def test_errors_reach_the_page_as_one_message(served, reference_file, failure, message):
    def failing(request, progress):
        raise failure

    _, client = served(failing)
    with pytest.raises(Exception, match=message) as raised:
        client.predict(*page_inputs(reference_file, positions(1)), api_name="/generate")
    assert "Traceback" not in str(raised.value)


def test_a_missing_concept_is_reported_in_the_page_without_generating(served, reference_file):
    calls = []
    _, client = served(lambda request, progress: calls.append(request) or fake_result())
    with pytest.raises(Exception, match="pick the concept of reference 1"):
        client.predict(*page_inputs(reference_file, []), api_name="/generate")
    assert calls == []


def test_uploads_over_the_size_limit_are_refused(served, tmp_path):
    url, _ = served(lambda request, progress: fake_result(), max_file_size="20kb")
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (8, 8)).save(small)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(large)
    assert large.stat().st_size > 20_000
    upload = url.rstrip("/") + "/gradio_api/upload"
    assert httpx.post(upload, files={"files": small.open("rb")}).status_code == 200
    assert httpx.post(upload, files={"files": large.open("rb")}).status_code == 413


def test_a_model_that_cannot_be_fetched_says_how_to_point_the_ui_at_a_local_copy(reference_file):
    backend = LocalBackend([model_choice("sd15")], device="cpu")  # HF_HUB_OFFLINE=1: nothing can be fetched
    progress = []
    with pytest.raises(ConceptrolError, match="could not load the model") as raised:
        backend(demo_request(reference_file, model="sd15"), lambda fraction, what: progress.append(what))
    assert "--model DIR" in str(raised.value) and backend.loaded is None
    assert progress and progress[0].startswith("loading Stable Diffusion 1.5")


def run_ui_cli(*args, code=""):
    import os
    import subprocess
    import sys

    script = f"import sys\n{code}\nfrom conceptrol.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})


def test_ui_cli_refuses_demo_with_a_model_in_one_line():
    result = run_ui_cli("ui", "--demo", "--model", "sd15")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "conceptrol: error: --demo uses its own tiny models; leave out --model"


def test_ui_cli_without_gradio_says_how_to_install_it():
    result = run_ui_cli("ui", "--demo", code="sys.modules['gradio'] = None")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pip install 'conceptrol[ui]'" in result.stderr.strip().splitlines()[-1]


def test_two_subjects_give_one_mask_each_in_reference_order(tmp_path):
    cat, dog = tmp_path / "cat.png", tmp_path / "dog.png"
    reference_picture(64).save(cat)
    reference_picture(64).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(dog)
    backend = LocalBackend(DEMO_CHOICES)
    prompt = "a cat and a dog on a sofa"
    request = request_from_inputs("tiny-sd15", prompt, slots([cat, dog], [positions(1), positions(4)]),
                                  1.0, 0.0, 2, 0, (64, 48))
    result = backend(request, lambda *_: None)
    assert [label for _, label in result.overlays] == ["mask of 'cat'", "mask of 'dog'"]
    masks = [np.asarray(image, dtype=np.float32) for image, _ in result.overlays]
    assert not np.array_equal(masks[0], masks[1])  # each subject its own mask
