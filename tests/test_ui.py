"""The web UI's logic and server: concept words, requests, the lazy backend, the API, errors, `conceptrol ui` flags."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import weakref
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from helpers import run_main
from PIL import Image

from conceptrol import Concept, ConceptrolError, find_concept_span
from conceptrol.app.generate import GenerateSettings, run_conceptrol
from conceptrol.app.offline_demo import reference_picture, tiny_pipeline
from conceptrol.demo import (
    CompareRequest,
    LocalBackend,
    UIOptions,
    build_demo,
    check_can_serve,
    parse_file_size,
    request_from_api,
    request_from_inputs,
)
from conceptrol.demo.backend import DEMO_CHOICES, Comparison, model_choice
from conceptrol.demo.concept_words import (
    concept_from_text,
    concept_from_words,
    keep_selection,
    preselect,
    prompt_words,
    word_choices,
)


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


@pytest.mark.parametrize("prompt,text,occurrence,expected", [
    ("a cat and a teddy bear in the snow", "teddy bear", 0, Concept("teddy bear", 0)),
    ("a cat and a cat toy", "Cat", 1, Concept("Cat", 1)),
    ("a teddy-bear's hat", " teddy-bear's, ", 0, Concept("teddy-bear's", 0)),
])
def test_a_typed_concept_names_a_phrase_of_any_prompt(prompt, text, occurrence, expected):
    assert concept_from_text(prompt, text, occurrence) == expected


@pytest.mark.parametrize("prompt,text,occurrence,message", [
    ("a dog on a beach", "dgo", 0, "the concept 'dgo' is not in the prompt 'a dog on a beach'; did you mean 'dog'?"),
    ("a cat and a cat toy", "cat", 2, "'cat' appears 2 time(s) in the prompt, so occurrence 2 does not exist"),
    ("a dog", "!!", 0, "the concept '!!' has no word in it"),
])
def test_a_typed_concept_missing_from_the_prompt_says_so(prompt, text, occurrence, message):
    with pytest.raises(ConceptrolError, match=re.escape(message)):
        concept_from_text(prompt, text, occurrence)


def slots(images=(), words=(), everywhere=()):
    images = list(images) + [None] * (3 - len(images))
    words = list(words) + [[]] * (3 - len(words))
    everywhere = list(everywhere) + [False] * (3 - len(everywhere))
    return [*images, *words, *everywhere]


def test_a_reference_marked_no_concept_is_global(tmp_path):
    request = request_from_inputs("tiny-flux2", "a dog on a beach", slots([tmp_path / "d.png", tmp_path / "b.png"],
                                  [positions(1), []], [False, True]), 1.0, 0.0, 4, 0, (64, 64))
    assert request.references == (tmp_path / "d.png", tmp_path / "b.png")
    assert request.concepts == (Concept("dog"), None)
    api = request_from_api("tiny-flux2", "a dog on a beach", [(tmp_path / "d.png", "dog", 0), (tmp_path / "b.png", "-", 0)],
                           1.0, 0.0, 4, 0, (64, 64))
    assert api.concepts == (Concept("dog"), None)


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
    ("a dog", slots(["r.png"], [positions(1)], [True]), "reference 1 is marked 'no concept' and has words picked"),
])
def test_page_mistakes_say_what_to_do(prompt, inputs, message):
    with pytest.raises(ConceptrolError, match=message):
        request_from_inputs("tiny-sd15", prompt, inputs, 1.0, 0.2, 5, 0, (128, 96))


def test_api_request_takes_each_concept_as_text_for_any_prompt(tmp_path):
    request = request_from_api("tiny-sd15", "a cat and a cat toy", [(tmp_path / "toy.png", "cat", 1), (None, "", 0),
                                                                    (tmp_path / "c.png", "cat toy", 0)],
                               1.0, 0.2, 5, 3, (128, 96))
    assert request.references == (tmp_path / "toy.png", tmp_path / "c.png")
    assert request.concepts == (Concept("cat", 1), Concept("cat toy"))


@pytest.mark.parametrize("references,message", [
    ([("r.png", "", 0)], "reference 1 has no concept: pass concept_1"),
    ([("r.png", "dog", 0), (None, "wave", 0)], "concept_2 'wave' has no image: pass reference_2"),
    ([("r.png", "cat", 0)], "reference 1: the concept 'cat' is not in the prompt"),
    ([("r.png", "dog", 1)], "reference 1: the concept 'dog' appears 1 time"),
])
def test_api_mistakes_say_what_to_do(references, message):
    with pytest.raises(ConceptrolError, match=re.escape(message)):
        request_from_api("tiny-sd15", "a dog surfing a wave", references, 1.0, 0.2, 5, 0, (128, 96))


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


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-flux", "tiny-flux-ip", "tiny-flux-kontext", "tiny-flux-redux"])
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
    with pytest.raises(ConceptrolError, match="take one reference image, got 2"):
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


def api_inputs(reference, concept="dog", prompt="a dog surfing a wave", **more):
    """Keyword arguments of the /generate endpoint: one reference and its concept, the rest left to their defaults."""
    from gradio_client import handle_file

    return dict(model="tiny-sd15", prompt=prompt, steps=3, reference_1=handle_file(str(reference)), concept_1=concept,
                api_name="/generate") | more


def fake_result():
    image = Image.new("RGB", (16, 16), "gray")
    return Comparison(image, image, [(image, "mask of 'dog'")], 0.1)


def test_generate_requests_run_one_at_a_time(served, reference_file):
    spans = []

    def slow(request, progress):
        began = time.perf_counter()
        time.sleep(0.5)
        spans.append((began, time.perf_counter()))
        return fake_result()

    _, client = served(slow)
    jobs = [client.submit(**api_inputs(reference_file)) for _ in range(3)]
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
        client.predict(**api_inputs(reference_file))
    assert "Traceback" not in str(raised.value)


def test_a_missing_concept_is_reported_without_generating(served, reference_file):
    calls = []
    _, client = served(lambda request, progress: calls.append(request) or fake_result())
    with pytest.raises(Exception, match="reference 1 has no concept: pass concept_1"):
        client.predict(**api_inputs(reference_file, concept=""))
    assert calls == []


@pytest.mark.parametrize("prompt,concept,occurrence,expected", [
    ("a cat and a teddy bear in the snow", "teddy bear", 0, Concept("teddy bear", 0)),  # no word of the page's prompt
    ("a cat and a cat toy", "cat", 1, Concept("cat", 1)),  # the second cat
])
def test_the_api_takes_a_concept_for_any_prompt(served, reference_file, prompt, concept, occurrence, expected):
    requests = []
    _, client = served(lambda request, progress: requests.append(request) or fake_result())
    client.predict(**api_inputs(reference_file, concept, prompt, occurrence_1=occurrence))
    assert [(r.prompt, r.concepts, len(r.references)) for r in requests] == [(prompt, (expected,), 1)]


def uploaded(url, path):
    """A file uploaded to the served page, as the page's image components hold it."""
    return {"path": httpx.post(url + "gradio_api/upload", files={"files": path.open("rb")}).json()[0],
            "meta": {"_type": "gradio.FileData"}}


def click_generate_as_the_page_does(url, values, session):
    """The page's Generate click sent as the browser sends it, through the queue: `values` by elem_id (the other
    inputs their defaults). Returns the click's dependency, the join response and the completion message."""
    config = httpx.get(url + "config").json()
    components = {c["id"]: c["props"] for c in config["components"]}
    click = next(d for d in config["dependencies"]
                 if d["targets"] and components[d["targets"][0][0]].get("elem_id") == "generate")
    data = [values.get(components[i].get("elem_id"), components[i].get("value")) for i in click["inputs"]]
    joined = httpx.post(url + "gradio_api/queue/join", json=dict(data=data, fn_index=click["id"], session_hash=session,
                                                                  trigger_id=click["targets"][0][0], event_data=None))
    with httpx.stream("GET", url + f"gradio_api/queue/data?session_hash={session}", timeout=30) as events:
        done = next(m for line in events.iter_lines() if line.startswith("data:")
                    and (m := json.loads(line[5:]))["msg"] == "process_completed")
    return click, joined, done


def test_the_pages_own_generate_click_still_names_the_clicked_word(served, reference_file):
    """The page's click (private: word positions of the page's prompt) sent as the browser sends it, via the queue."""
    requests = []
    url, _ = served(lambda request, progress: requests.append(request) or fake_result())
    click, joined, done = click_generate_as_the_page_does(
        url, {"reference-0": uploaded(url, reference_file), "concept-0": ["1"]}, "page-click")
    assert joined.status_code == 200 and click["api_visibility"] == "private"
    assert done["success"] and [r.concepts for r in requests] == [(Concept("dog"),)]


def test_the_pages_no_concept_box_reaches_the_request_as_a_global_reference(served, reference_file):
    requests = []
    url, _ = served(lambda request, progress: requests.append(request) or fake_result())
    _, _, done = click_generate_as_the_page_does(
        url, {"reference-0": uploaded(url, reference_file), "concept-0": ["1"],
              "reference-1": uploaded(url, reference_file), "global-1": True}, "page-global")
    assert done["success"] and [r.concepts for r in requests] == [(Concept("dog"), None)]


def test_the_api_documents_one_generate_endpoint_with_a_concept_per_reference(served):
    _, client = served(lambda request, progress: fake_result())
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/generate"]  # the page's own click (word positions) is not part of the API
    names = [parameter["parameter_name"] for parameter in endpoints["/generate"]["parameters"]]
    assert names[:2] == ["model", "prompt"] and names[-3:] == ["reference_3", "concept_3", "occurrence_3"]
    assert "word or phrase of the prompt" in endpoints["/generate"]["description"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ui_server(*flags, cwd, timeout=120):
    """`conceptrol ui --demo FLAGS` in a subprocess, as a user starts it; yields its URL and stops it afterwards."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = cwd / "ui.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "conceptrol.cli", "ui", "--demo", *flags], stdout=output,
                                   stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not (url := next((line.split()[2] for line in log.read_text().splitlines()
                                if line.startswith("Conceptrol UI: ")), None)):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"conceptrol ui did not start (exit status {process.poll()}):\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_uploads_over_the_size_limit_are_refused(tmp_path):
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (8, 8)).save(small)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(large)
    assert 20 * 1024 < large.stat().st_size
    with ui_server("--max-file-size", "20kb", "--port", str(free_port()), cwd=tmp_path) as url:
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
    script = f"import sys\n{code}\nfrom conceptrol.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})


def test_ui_cli_refuses_demo_with_a_model_in_one_line():
    result = run_ui_cli("ui", "--demo", "--model", "sd15")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["conceptrol: error: --demo uses its own tiny models; leave out --model"]


def test_ui_cli_without_gradio_says_how_to_install_it_in_one_line():
    result = run_ui_cli("ui", "--demo", code="sys.modules['gradio'] = None")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("conceptrol: error: ") and "pip install 'conceptrol[ui]'" in line


@pytest.mark.parametrize("options,message", [
    (dict(port=0), "--port must be from 1 to 65535, got 0"),
    (dict(port=70000), "--port must be from 1 to 65535, got 70000"),
    (dict(max_file_size="lots"), "--max-file-size must be a size above zero such as 25mb"),
    (dict(max_file_size="0kb"), "--max-file-size must be a size above zero"),
    (dict(host=" "), "--host is empty"),
    (dict(device="gpu"), "--device must be auto, cpu, cuda, cuda:N, mps or xpu, got 'gpu'; did you mean 'cuda'?"),
    (dict(dtype="float16"), "--dtype must be one of auto, fp32, fp16, bf16, got 'float16'; did you mean 'fp16'?"),
])
def test_ui_options_check_their_syntax_and_name_the_flag(options, message):
    with pytest.raises(ConceptrolError, match=re.escape(message)):
        UIOptions(**options)


@pytest.mark.parametrize("size,limit", [("20kb", 20 * 1024), ("25 MB", 25 * 1024**2), ("1.5gb", int(1.5 * 1024**3)),
                                        ("20000", 20_000), (512, 512)])
def test_upload_limits_are_read_as_gradio_counts_them(size, limit):
    assert parse_file_size(size) == limit


def test_a_taken_port_or_foreign_host_is_found_before_serving():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConceptrolError, match=f"--port {port} is in use; pass another --port"):
            check_can_serve("127.0.0.1", port)
    check_can_serve("127.0.0.1", port)  # free again
    with pytest.raises(ConceptrolError, match="--host 8.8.8.8 is not an address of this machine"):
        check_can_serve("8.8.8.8", None)


# Each mistake runs `conceptrol ui --demo ...` through the CLI's main(), in one subprocess for all of them (a
# process each would cost seconds of imports apiece); each call's stdout and stderr are its own, and a call that
# reaches gradio's launch is recorded and stopped there.
MISTAKES_SCRIPT = """
import json, os, sys, tempfile, time
import gradio
import conceptrol.demo, conceptrol.app.loading  # imported once here, so each call below times only its own work
from conceptrol.cli import main

launches = []


def launch(self, *args, **kwargs):  # reaching gradio's launch at all is the failure: record it, serve nothing
    launches.append(1)
    raise SystemExit("gradio launched")


gradio.Blocks.launch = launch
results = []
for argv in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        began, launches[:] = time.monotonic(), []
        try:
            status = main(argv)
        except BaseException as error:
            status = repr(error)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        out.seek(0), err.seek(0)
        results.append(dict(status=status, stdout=out.read(), stderr=err.read(), launched=bool(launches),
                            seconds=time.monotonic() - began))
print(json.dumps(results))
"""
MISTAKES = {  # flags after `conceptrol ui --demo` -> the start of the one line the user reads
    "port in use": (["--port", "{taken}"], "--port {taken} is in use; pass another --port or leave it out"),
    "port 0": (["--port", "0"], "--port must be from 1 to 65535, got 0"),
    "port 70000": (["--port", "70000"], "--port must be from 1 to 65535, got 70000"),
    "negative port": (["--port", "-5"], "--port must be from 1 to 65535, got -5"),
    "size lots": (["--max-file-size", "lots"], "--max-file-size must be a size above zero such as 25mb"),
    "negative size": (["--max-file-size=-5mb"], "--max-file-size must be a size above zero such as 25mb"),
    "size 0": (["--max-file-size", "0"], "--max-file-size must be a size above zero such as 25mb"),
    "bad address": (["--host", "999.1.1.1"], "--host 999.1.1.1 is not an address this machine can serve on"),
    "unknown host": (["--host", "no-such-host.invalid"], "--host no-such-host.invalid is not an address this machine"),
    "device gpu": (["--device", "gpu"], "--device must be auto, cpu, cuda, cuda:N, mps or xpu, got 'gpu'"),
    "bad dtype": (["--dtype", "fp8"], "--dtype must be one of auto, fp32, fp16, bf16, got 'fp8'"),
}


@pytest.fixture(scope="module")
def ui_mistakes():
    """What `conceptrol ui --demo` answers to each of MISTAKES (and to --device cuda), with one port held taken."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = {name: [arg.replace("{taken}", port) for arg in flags] for name, (flags, _) in MISTAKES.items()}
        cases["device cuda"] = ["--device", "cuda"]
        result = subprocess.run([sys.executable, "-c", MISTAKES_SCRIPT,
                                 json.dumps([["ui", "--demo", *flags] for flags in cases.values()])],
                                capture_output=True, text=True, timeout=120, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return port, dict(zip(cases, json.loads(result.stdout.splitlines()[-1])))


@pytest.mark.parametrize("mistake", [*MISTAKES, "device cuda"])
def test_a_ui_flag_that_cannot_work_is_one_line_naming_it_before_anything_launches(ui_mistakes, mistake):
    port, results = ui_mistakes
    result = results[mistake]
    if mistake == "device cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        message = "--device 'cuda' is not available here"
    else:
        message = MISTAKES[mistake][1].replace("{taken}", port)
    assert result["status"] == 2 and not result["launched"], result
    assert result["stderr"].splitlines() == [result["stderr"].strip()] and "Traceback" not in result["stderr"]
    assert result["stderr"].startswith(f"conceptrol: error: {message}"), result["stderr"]
    assert result["stdout"] == "" and result["seconds"] < 5, result


def test_ui_cli_with_a_port_in_use_says_so_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_ui_cli("ui", "--demo", "--port", str(port))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"conceptrol: error: --port {port} is in use; pass another --port or leave "
                                          "it out to take the first free one"]


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


@pytest.mark.parametrize("args,message", [
    (["--model", "./nonexistent"], "--model ./nonexistent: no such folder"),
    (["--model", "sd1.5"], "did you mean sd15?"),
    (["--model", "sdxl", "--model", "/models/my-sd15-folder", "--ip-adapter-repo", "/models/ip-adapter"],
     "--model /models/my-sd15-folder: no such folder"),
    (["--model", "sd15", "--adapter", "xlabs-ip"], "--adapter xlabs-ip does not fit --model sd15"),
    (["--demo", "--ip-adapter-repo", "/nonexistent"], "--demo uses its own tiny models; leave out --ip-adapter-repo"),
    (["--demo", "--adapter-repo", "x"], "--demo uses its own tiny models; leave out --adapter-repo"),
])
def test_ui_checks_every_model_and_adapter_flag_before_serving(args, message, capsys):  # audit D10
    code, out, err = run_main(capsys, "ui", *args)
    assert code == 2 and out == []
    assert len(err) == 1 and err[0].startswith("conceptrol: error: ") and message in err[0], err


def test_a_ui_flag_mistake_is_one_line_from_the_command_as_users_run_it():  # audit D10, in its own process
    result = subprocess.run([sys.executable, "-m", "conceptrol.cli", "ui", "--model", "sd15", "--adapter", "xlabs-ip"],
                            capture_output=True, text=True, timeout=60, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("conceptrol: error: --adapter xlabs-ip does not fit --model sd15")


def test_each_model_of_the_menu_takes_the_adapter_folder_that_holds_its_adapter(tiny_folder):  # audit D10, D17
    from conceptrol.demo import UIOptions

    model, adapters = tiny_folder
    [choice] = UIOptions(model=(str(model),), adapter_repo=(str(adapters),)).menu()
    assert choice.adapter_repo == str(adapters) and choice.architecture == "sd15"
    [old] = UIOptions(model=(str(model),), ip_adapter_repo=str(adapters)).menu()  # the deprecated flag still works
    assert old.adapter_repo == str(adapters)
    with pytest.raises(ConceptrolError, match="holds the adapter of no model in the menu"):
        UIOptions(model=("flux",), adapter_repo=(str(adapters),)).menu()
    xlabs, redux = UIOptions(model=("flux-dev",), adapter="xlabs-ip").menu() + UIOptions(model=("flux-dev",),
                                                                                          adapter="redux").menu()
    assert (xlabs.architecture, xlabs.adapter, redux.architecture) == ("flux-ip", "xlabs-ip", "flux-redux")
    assert "xlabs-ip" in xlabs.label


def test_a_ui_on_every_interface_warns_in_one_line_and_an_unknown_api_model_leaves_no_traceback(tmp_path):  # D25
    from gradio_client import Client, handle_file

    reference = tmp_path / "dog.png"
    reference_picture(32).save(reference)
    with ui_server("--host", "0.0.0.0", "--port", str(port := free_port()), cwd=tmp_path):
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(Exception, match="unknown model 'sd15'; choose one of tiny-sd15"):
            client.predict(model="sd15", prompt="a dog", scale=1.0, start=0.2, steps=2, seed=0, width=64, height=64,
                           reference_1=handle_file(str(reference)), concept_1="dog", api_name="/generate")
        log = (tmp_path / "ui.log").read_text()
    assert "conceptrol: warning: serving on 0.0.0.0: anyone who can reach this port" in log
