"""The web page: `build_demo(generate_fn)` lays out the controls and wires them; it loads no model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

try:
    import gradio as gr
except ImportError as error:  # an extra: the library core does not need it
    raise ImportError("the web UI needs gradio: pip install 'conceptrol[ui]'") from error

from ..core.concepts import Concept
from ..core.errors import ConceptrolError
from .backend import CompareRequest, Comparison, ModelChoice, Progress
from .concept_words import concept_from_text, concept_from_words, keep_selection, preselect, word_choices

logger = logging.getLogger(__name__)

MAX_REFERENCES = 3
OUTPUT_HEIGHT = 360
ERROR_SECONDS = 30  # how long an error message stays on the page
CACHE_CLEANUP = (3600, 86400)  # every hour, delete uploads and results older than a day from gradio's cache
# Show small outputs (the offline demo's) at the panel's width, like the mask gallery does.
CSS = "#vanilla img, #conceptrol img { width: 100%; height: 100%; object-fit: contain; }"
DEFAULT_PROMPT = "a dog surfing a wave"
INTRO = """# Conceptrol
Upload a reference photo of your subject, type a prompt that names it, and click the word that names the
subject under each reference. **Vanilla** is the adapter as is (same scale, no mask, no warm-up);
**Conceptrol** lets the reference act only where the model puts that word
([He & Yao, arXiv 2503.06568](https://arxiv.org/abs/2503.06568)); the **mask** shows where that was."""
GenerateFn = Callable[[CompareRequest, Progress], Comparison]


def build_demo(generate_fn: GenerateFn, choices: Sequence[ModelChoice], prompt: str = DEFAULT_PROMPT,
               note: str = "") -> gr.Blocks:
    """The Conceptrol page; `generate_fn(request, progress)` does the work, one request at a time."""
    first = choices[0]
    with gr.Blocks(title="Conceptrol", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(INTRO + (f"\n\n{note}" if note else ""))
        with gr.Row():
            with gr.Column(scale=2):
                controls = _controls(choices, first, prompt)
            with gr.Column(scale=3):
                with gr.Row(equal_height=True):
                    vanilla = gr.Image(label="Vanilla adapter", format="png", interactive=False, height=OUTPUT_HEIGHT,
                                       elem_id="vanilla")
                    ours = gr.Image(label="Conceptrol", format="png", interactive=False, height=OUTPUT_HEIGHT,
                                    elem_id="conceptrol")
                    masks = gr.Gallery(label="Concept mask", format="png", columns=1, interactive=False,
                                       height=OUTPUT_HEIGHT, object_fit="contain", elem_id="masks")
                status = gr.Markdown(label="Status", elem_id="status")
        _wire(demo, generate_fn, choices, controls, [vanilla, ours, masks, status])
    return demo


def _controls(choices: Sequence[ModelChoice], first: ModelChoice, prompt: str) -> dict[str, Any]:
    defaults = first.defaults()
    c: dict[str, Any] = {"model": gr.Dropdown([(m.label, m.key) for m in choices], value=first.key, label="Model",
                                              elem_id="model")}
    c["prompt"] = gr.Textbox(value=prompt, label="Prompt", placeholder=DEFAULT_PROMPT, elem_id="prompt")
    c["last_prompt"] = gr.State(prompt)
    c["images"], c["words"], c["globals"], c["concepts"], c["occurrences"] = [], [], [], [], []
    _reference_slot(c, 0, prompt)
    with gr.Accordion("More subjects (one reference and concept each)", open=False, elem_id="more-subjects"):
        for i in range(1, MAX_REFERENCES):
            _reference_slot(c, i, prompt)
    with gr.Row():
        c["scale"] = gr.Slider(0.0, 2.5, value=defaults["scale"], step=0.05, label="Adapter scale",
                               info="how strongly the reference acts", elem_id="scale")
        c["start"] = gr.Slider(0.0, 0.95, value=defaults["start"], step=0.05, label="Warm-up",
                               info="share of steps before the reference acts (Conceptrol)", elem_id="start")
    with gr.Row():
        c["steps"] = gr.Slider(1, 100, value=defaults["steps"], step=1, label="Steps", elem_id="steps")
        c["seed"] = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
    with gr.Accordion("Size", open=False):
        c["width"] = gr.Slider(64, 2048, value=first.size[0], step=16, label="Width", elem_id="width")
        c["height"] = gr.Slider(64, 2048, value=first.size[1], step=16, label="Height", elem_id="height")
    c["run"] = gr.Button("Generate", variant="primary", elem_id="generate")
    return c


def _reference_slot(c: dict[str, Any], i: int, prompt: str) -> None:
    """One reference upload and the prompt words to click for its concept, side by side."""
    with gr.Row(equal_height=True):
        c["images"].append(gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], height=200,
                                    label=f"Reference {i + 1}", elem_id=f"reference-{i}"))
        with gr.Column():
            c["words"].append(gr.CheckboxGroup(word_choices(prompt), label=f"Concept of reference {i + 1}",
                                               info="click the word(s) of the prompt that name this subject",
                                               elem_id=f"concept-{i}"))
            c["globals"].append(gr.Checkbox(False, label="No concept: this reference acts everywhere (a background "
                                            "or a style; FLUX.2 and Qwen-Image-Edit)", elem_id=f"global-{i}"))
    # The API's way to name the concept, for any prompt (the checkboxes only know the page's prompt); never shown.
    c["concepts"].append(gr.Textbox("", visible=False, label=f"Concept of reference {i + 1}: a word or phrase of "
                                    "the prompt"))
    c["occurrences"].append(gr.Number(0, visible=False, precision=0, minimum=0,
                                      label=f"Which appearance of concept {i + 1} in the prompt (0 = the first)"))


def _wire(demo: gr.Blocks, generate_fn: GenerateFn, choices: Sequence[ModelChoice], c: dict[str, Any],
          outputs: list[Any]) -> None:
    by_key = {m.key: m for m in choices}
    light = dict(queue=False, show_progress="hidden", api_visibility="private")  # instant, never behind a generation

    def on_model(key: str) -> list[Any]:
        choice = by_key[key]
        defaults = choice.defaults()
        return [defaults["scale"], defaults["start"], defaults["steps"], choice.size[0], choice.size[1]]

    c["model"].change(on_model, c["model"], [c["scale"], c["start"], c["steps"], c["width"], c["height"]], **light)

    def on_prompt(prompt: str, old: str, *slots: Any) -> list[Any]:
        images, selections = slots[:MAX_REFERENCES], slots[MAX_REFERENCES:]
        updates = [gr.CheckboxGroup(choices=word_choices(prompt),
                                    value=keep_selection(old, prompt, selected or []) or preselect(prompt, image))
                   for image, selected in zip(images, selections)]
        return [*updates, prompt]

    c["prompt"].change(on_prompt, [c["prompt"], c["last_prompt"], *c["images"], *c["words"]],
                       [*c["words"], c["last_prompt"]], trigger_mode="always_last", **light)

    def on_upload(path: str | None, prompt: str, selected: list[str]) -> Any:
        found = [] if selected else preselect(prompt, path)
        return found or gr.skip()  # never undo a click the user made meanwhile

    for image, words in zip(c["images"], c["words"]):
        image.change(on_upload, [image, c["prompt"], words], words, **light)

    run = _runner(generate_fn, {m.key: m.label for m in choices})
    settings = [c["model"], c["prompt"], c["scale"], c["start"], c["steps"], c["seed"], c["width"], c["height"]]
    queued = dict(concurrency_limit=1, concurrency_id="generate")  # the page and the API share one queue

    def on_generate(model: str, prompt: str, scale: float, start: float, steps: float, seed: float, width: float,
                    height: float, *slots: Any, progress: gr.Progress = gr.Progress()) -> list[Any]:
        return run(lambda: request_from_inputs(model, prompt, slots, scale, start, steps, seed, (width, height)),
                   progress)

    # The page's clicks name word positions of the prompt on the page; clients use /generate below instead.
    c["run"].click(on_generate, [*settings, *c["images"], *c["words"], *c["globals"]], outputs,
                   api_visibility="private", **queued)
    slots = [part for i in range(MAX_REFERENCES) for part in (c["images"][i], c["concepts"][i], c["occurrences"][i])]
    # The API's model is free text, checked by the backend (a dropdown would refuse an unknown one inside gradio)
    api_model = gr.Textbox(value=choices[0].key, visible=False, label="Model (API)")
    gr.on([], _api_handler(run), [api_model, *settings[1:], *slots], outputs, api_name="generate", **queued)  # API only


Runner = Callable[[Callable[[], CompareRequest], Any], list[Any]]  # (how to build the request, progress) -> outputs


def _runner(generate_fn: GenerateFn, labels: dict[str, str]) -> Runner:
    """One generation: a request in, three images and a status line out; errors become one page message."""

    def run(make_request: Callable[[], CompareRequest], progress: gr.Progress) -> list[Any]:
        try:
            request = make_request()
            result = generate_fn(request, lambda fraction, what: progress(fraction, desc=what))
        except ConceptrolError as error:
            raise gr.Error(str(error), duration=ERROR_SECONDS, print_exception=False) from None
        except Exception as error:  # shown in the page; the traceback goes to the terminal
            logger.exception("generation failed")
            raise gr.Error(f"generation failed: {type(error).__name__}: {error} (the terminal running "
                           "`conceptrol ui` has the traceback)", duration=ERROR_SECONDS, print_exception=False) from None
        return [result.vanilla, result.conceptrol, [(image, label) for image, label in result.overlays],
                f"Done in {result.seconds:.1f} s: {labels[request.model]}, seed {request.seed}, "
                f"{request.steps} steps each."]

    return run


def _api_handler(run: Runner) -> Callable[..., list[Any]]:
    """The /generate endpoint; its parameter names are the API's: a reference, concept and occurrence per slot (3)."""

    def generate(model: str, prompt: str, scale: float, start: float, steps: float, seed: float, width: float,
                 height: float, reference_1: str | None = None, concept_1: str = "", occurrence_1: int = 0,
                 reference_2: str | None = None, concept_2: str = "", occurrence_2: int = 0,
                 reference_3: str | None = None, concept_3: str = "", occurrence_3: int = 0,
                 progress: gr.Progress = gr.Progress()) -> list[Any]:
        """Vanilla adapter vs Conceptrol, same seed, for any prompt: each reference image's concept is a word or
        phrase of the prompt (concept_N), and occurrence_N picks which appearance when it repeats (0 = the first);
        concept_N "-" keeps reference N global, acting everywhere (FLUX.2 and Qwen-Image-Edit only).
        Returns the vanilla image, the Conceptrol image, one concept mask per reference, and a status line.
        """
        references = [(reference_1, concept_1, occurrence_1), (reference_2, concept_2, occurrence_2),
                      (reference_3, concept_3, occurrence_3)]
        return run(lambda: request_from_api(model, prompt, references, scale, start, steps, seed, (width, height)),
                   progress)

    return generate


def request_from_inputs(model: str, prompt: str, slots: Sequence[Any], scale: float, start: float, steps: float,
                        seed: float, size: tuple[float, float]) -> CompareRequest:
    """The page's values as a CompareRequest: images, the clicked word positions, then the 'no concept' boxes (none
    ticked when absent); empty slots are skipped."""
    if not prompt.strip():
        raise ConceptrolError("type a prompt first")
    images, selections = slots[:MAX_REFERENCES], slots[MAX_REFERENCES:2 * MAX_REFERENCES]
    globals_ = list(slots[2 * MAX_REFERENCES:]) or [False] * MAX_REFERENCES
    references, concepts = [], []
    for index, (image, selected, everywhere) in enumerate(zip(images, selections, globals_)):
        if not image:
            continue
        if everywhere:
            if selected:
                raise ConceptrolError(f"reference {index + 1} is marked 'no concept' and has words picked: untick "
                                      "one of them")
            concepts.append(None)
            references.append(Path(image))
            continue
        if not selected:
            raise ConceptrolError(f"pick the concept of reference {index + 1}: click the word(s) of the prompt "
                                  "naming its subject, under the image")
        try:
            concepts.append(concept_from_words(prompt, selected))
        except ConceptrolError as error:
            raise ConceptrolError(f"reference {index + 1}: {error}") from None
        references.append(Path(image))
    return _request(model, prompt, references, concepts, scale, start, steps, seed, size)


def request_from_api(model: str, prompt: str, slots: Sequence[tuple[Any, str, float]], scale: float, start: float,
                     steps: float, seed: float, size: tuple[float, float]) -> CompareRequest:
    """The API's values as a CompareRequest: per slot (image, concept text, occurrence); empty slots are skipped."""
    if not prompt.strip():
        raise ConceptrolError("type a prompt first")
    references, concepts = [], []
    for n, (image, text, occurrence) in enumerate(slots, start=1):
        text = (text or "").strip()
        if not image and text:
            raise ConceptrolError(f"concept_{n} {text!r} has no image: pass reference_{n} or leave concept_{n} empty")
        if not image:
            continue
        if not text:
            raise ConceptrolError(f"reference {n} has no concept: pass concept_{n}, the word or phrase of the prompt "
                                  "that names its subject")
        if text == "-":  # a global reference
            concepts.append(None)
            references.append(Path(image))
            continue
        try:
            concepts.append(concept_from_text(prompt, text, int(occurrence or 0)))
        except ConceptrolError as error:
            raise ConceptrolError(f"reference {n}: {error}") from None
        references.append(Path(image))
    return _request(model, prompt, references, concepts, scale, start, steps, seed, size)


def _request(model: str, prompt: str, references: list[Path], concepts: list[Concept], scale: float, start: float,
             steps: float, seed: float, size: tuple[float, float]) -> CompareRequest:
    return CompareRequest(model=model, prompt=prompt, references=tuple(references), concepts=tuple(concepts),
                          scale=float(scale), start=float(start), steps=int(steps), seed=int(seed or 0),
                          size=(int(size[0]), int(size[1])))
