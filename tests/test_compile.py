"""Conceptrol under torch.compile, compiled as users compile: `pipe.unet.compile()` / `pipe.transformer.compile()`
after `apply_conceptrol`.

Two things are checked. The graphs: with `fullgraph=True` any graph break is an error, and a counting backend
tells how many graphs dynamo made. Vanilla IP-Adapter makes one; Conceptrol makes one more, for the first
denoising step, where the layers before the concept layer have no stored mask yet and read their own
(ALGORITHM.md section 1): that is a different computation, compiled once and reused by every later call. A new
prompt, a concept elsewhere in it, or another number of steps must compile nothing new. The numbers: inductor's
output equals eager's within fp32 round-off.
"""

import warnings

import pytest
import torch
from helpers import flux_adapter_kwargs, reference_image, tiny_flux_adapter
from torch._dynamo.testing import CompileCounter

from conceptrol import ConceptrolConfig, apply_conceptrol
from conceptrol.tiny import load_tiny_ip_adapter, tiny_flux_pipeline, tiny_sd15_pipeline

PROMPT = "a photo of a dog surfing a wave"
ROUND_OFF = dict(atol=1e-4, rtol=1e-4)  # inductor reorders fp32 sums; the differences seen are 2e-6 to 3e-5
FLUX_CONCEPT = ConceptrolConfig(concept_layer="transformer_blocks.1")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- The pipelines and their calls ------------------------------------------------------------------------------

def sd_pipe(make):
    pipe = make()
    load_tiny_ip_adapter(pipe, "plus")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_call(handle, prompt=PROMPT, concept="dog", steps=3, **extra):
    return handle(prompt, concepts=[concept], ip_adapter_image=reference_image(), height=32, width=48,
                  num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                  **extra).images


def flux_call(handle, kind, prompt=PROMPT, concept="dog", steps=3):
    return handle(prompt, concepts=[concept], **flux_adapter_kwargs(kind, steps)).images


class Stock:
    """The pipeline without Conceptrol, called like a handle (the concept is ignored)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, prompt, concepts, **kwargs):
        return self.pipe(prompt=prompt, **kwargs)


# --- Graphs: no break, one extra graph for the first step, nothing recompiled afterwards -------------------------

def test_compiled_unet_has_no_graph_break_and_one_graph_per_kind_of_step():
    # one compile test per family: SDXL's U-Net runs the same processors (its eager numbers: test_numerics)
    graphs = {}
    for method in ("vanilla", "conceptrol"):
        torch._dynamo.reset()
        pipe = sd_pipe(tiny_sd15_pipeline)
        handle = apply_conceptrol(pipe) if method == "conceptrol" else Stock(pipe)
        counter = CompileCounter()
        pipe.unet.compile(backend=counter, fullgraph=True)  # a graph break raises
        sd_call(handle)
        first = counter.frame_count
        sd_call(handle, prompt="a dog and a cat on the grass at dawn", concept="cat", steps=5)  # span moved
        sd_call(handle, prompt="dog", concept="dog", steps=2)
        graphs[method] = (first, counter.frame_count)
    assert graphs == {"vanilla": (1, 1), "conceptrol": (2, 2)}


def test_a_unet_compiled_before_apply_conceptrol_compiles_conceptrols_graphs_once_and_keeps_its_own():
    pipe = sd_pipe(tiny_sd15_pipeline)
    counter = CompileCounter()
    pipe.unet = torch.compile(pipe.unet, backend=counter, fullgraph=True)
    stock = Stock(pipe)
    sd_call(stock)
    handle = apply_conceptrol(pipe)
    sd_call(handle)
    sd_call(handle, prompt="a cat and a dog", steps=4)
    handle.remove()
    sd_call(stock)
    assert counter.frame_count == 1 + 2


def test_compiled_unet_with_a_window_compiles_each_kind_of_step_once():
    pipe = sd_pipe(tiny_sd15_pipeline)
    handle = apply_conceptrol(pipe, ConceptrolConfig(start=0.5))
    counter = CompileCounter()
    pipe.unet.compile(backend=counter, fullgraph=True)
    sd_call(handle, steps=4)
    first = counter.frame_count
    sd_call(handle, prompt="a cat next to a dog", steps=6)
    # adapter off: the first step, the later ones (the concept layer still reads); adapter on: the rest
    assert (first, counter.frame_count) == (3, 3)


@pytest.mark.parametrize("kind", ["xlabs-ip", "kontext"])  # the gate path and the bias path (Redux: Kontext's)
def test_compiled_flux_transformer_has_no_graph_break_and_one_graph_per_kind_of_step(kind):
    graphs = {}
    for method in ("vanilla", "conceptrol"):
        torch._dynamo.reset()
        pipe, extra = tiny_flux_adapter(kind)
        handle = apply_conceptrol(pipe, FLUX_CONCEPT, **extra) if method == "conceptrol" else Stock(pipe)
        counter = CompileCounter()
        pipe.transformer.compile(backend=counter, fullgraph=True)
        flux_call(handle, kind)
        first = counter.frame_count
        flux_call(handle, kind, prompt="a wave under a big dog", concept="wave", steps=4)
        graphs[method] = (first, counter.frame_count)
    assert graphs == {"vanilla": (1, 1), "conceptrol": (2, 2)}


# --- Numbers: inductor equals eager -------------------------------------------------------------------------------

def test_inductor_compiled_sd15_equals_eager():
    pipe = sd_pipe(tiny_sd15_pipeline)
    handle = apply_conceptrol(pipe)
    eager = sd_call(handle)
    eager_masks = handle.masks.masks
    pipe.unet.compile(fullgraph=True)
    compiled = sd_call(handle)
    torch.testing.assert_close(compiled, eager, **ROUND_OFF)
    torch.testing.assert_close(handle.masks.masks, eager_masks, **ROUND_OFF)
    assert (eager - sd_call(apply_conceptrol_off(pipe, handle))).abs().max() > 1e-3  # the masks did act


def apply_conceptrol_off(pipe, handle):
    handle.remove()
    return apply_conceptrol(pipe, ConceptrolConfig(masking="none"))


def test_compiled_flux_adapter_equals_eager():
    kind = "kontext"  # inductor on the bias path: the additive bias goes into SDPA
    pipe, extra = tiny_flux_adapter(kind)
    handle = apply_conceptrol(pipe, FLUX_CONCEPT, **extra)
    eager = flux_call(handle, kind)
    eager_masks = handle.masks.masks
    pipe.transformer.compile(fullgraph=True)
    compiled = flux_call(handle, kind)
    torch.testing.assert_close(compiled, eager, **ROUND_OFF)
    torch.testing.assert_close(handle.masks.masks, eager_masks, **ROUND_OFF)


# --- OminiControl runs its own forward -----------------------------------------------------------------------------

def test_ominicontrol_with_a_compiled_transformer_says_it_runs_eager(t5_tok):
    pipe = tiny_flux_pipeline(t5_tok=t5_tok)
    pipe.set_progress_bar_config(disable=True)
    handle = apply_conceptrol(pipe, FLUX_CONCEPT)
    pipe.transformer.compile()
    with pytest.warns(UserWarning, match="runs its own transformer forward.*eager"):
        handle(PROMPT, concepts=["dog"], image=reference_image(), height=16, width=16, num_inference_steps=1,
               condition_size=16, max_sequence_length=32, output_type="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and only once per handle
        handle(PROMPT, concepts=["dog"], image=reference_image(), height=16, width=16, num_inference_steps=1,
               condition_size=16, max_sequence_length=32, output_type="latent")
