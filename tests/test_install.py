"""Installing, removing and calling a handle; bad input; per-call state."""

import pytest
import torch
from helpers import SD15_LAYER, reference_image
from test_numerics import PROMPT, kwargs, make_pipe

from conceptrol import ConceptrolConfig, ConceptrolError, apply_conceptrol, find_concept_span
from conceptrol.tiny import tiny_sd15_pipeline
from conceptrol.unet.processor import ConceptrolIPAdapterProcessor


def test_remove_restores_the_same_processor_objects_and_outputs():
    pipe = make_pipe("sd15")
    before = dict(pipe.unet.attn_processors)
    vanilla = pipe(PROMPT, **kwargs()).images
    handle = apply_conceptrol(pipe)
    handle(PROMPT, concepts=["dog"], **kwargs())
    handle.remove()
    after = pipe.unet.attn_processors
    assert all(after[k] is v for k, v in before.items())
    assert torch.equal(pipe(PROMPT, **kwargs()).images, vanilla)
    handle.remove()  # idempotent


def test_plain_pipeline_call_while_applied_is_vanilla():
    pipe = make_pipe("sd15")
    vanilla = pipe(PROMPT, **kwargs()).images
    apply_conceptrol(pipe)
    assert torch.equal(pipe(PROMPT, **kwargs()).images, vanilla)


def test_state_dict_keys_and_weights_are_shared_not_copied():
    pipe = make_pipe("sd15")
    keys = set(pipe.unet.state_dict())
    apply_conceptrol(pipe)
    assert set(pipe.unet.state_dict()) == keys
    proc = pipe.unet.attn_processors[SD15_LAYER + ".processor"]
    assert isinstance(proc, ConceptrolIPAdapterProcessor) and proc.to_k_ip is proc.wrapped.to_k_ip


def test_set_ip_adapter_scale_keeps_working_after_apply():
    pipe = make_pipe("sd15")
    handle = apply_conceptrol(pipe)
    pipe.set_ip_adapter_scale(0.0)
    zero = handle(PROMPT, concepts=["dog"], **kwargs()).images
    text_only = pipe(PROMPT, **kwargs()).images  # scale 0: the adapter branch is skipped
    torch.testing.assert_close(zero, text_only, atol=1e-6, rtol=1e-6)
    pipe.set_ip_adapter_scale(1.0)
    assert (handle(PROMPT, concepts=["dog"], **kwargs()).images - zero).abs().max() > 1e-2


def test_pipeline_without_ip_adapter_says_to_load_one():
    pipe = tiny_sd15_pipeline()
    with pytest.raises(ConceptrolError, match=r"call pipe.load_ip_adapter\(...\) first"):
        apply_conceptrol(pipe)


def test_applying_twice_raises():
    pipe = make_pipe("sd15")
    apply_conceptrol(pipe)
    with pytest.raises(ConceptrolError, match="already applied"):
        apply_conceptrol(pipe)


def test_unknown_layer_name_suggests_real_ones():
    pipe = make_pipe("sd15")
    with pytest.raises(ConceptrolError, match=r"did you mean.*up_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2"):
        apply_conceptrol(pipe, ConceptrolConfig(concept_layer="up_blocks.1.attentions.0.transformer_blocks.0.attn1"))
    with pytest.raises(ConceptrolError, match="not a cross-attention layer"):
        apply_conceptrol(pipe, ConceptrolConfig(concept_layer="nonsense"))
    assert not any(isinstance(p, ConceptrolIPAdapterProcessor) for p in pipe.unet.attn_processors.values())


def test_concept_layer_can_be_overridden_by_name():
    pipe = make_pipe("sd15")
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2"
    handle = apply_conceptrol(pipe, ConceptrolConfig(concept_layer=layer))
    handle(PROMPT, concepts=["dog"], **kwargs())
    assert handle.masks.layer == layer and handle.masks.masks.shape[-2:] == (2, 3)


@pytest.mark.parametrize(
    "call,message",
    [
        (dict(concepts=["dog", "wave"]), "2 concept\\(s\\) for 1 reference image"),
        (dict(concepts=["cat"]), "'cat' not found"),
        (dict(concepts=None), "pass concepts="),
        (dict(concepts=["dog"], ip_adapter_image=None), "pass ip_adapter_image"),
        (dict(concepts=["dog", "wave"], ip_adapter_image=[reference_image(), reference_image()]), "nested list"),
    ],
)
def test_bad_calls_raise_before_generating(call, message):
    pipe = make_pipe("sd15")
    handle = apply_conceptrol(pipe)
    args = kwargs() | call
    with pytest.raises(ConceptrolError, match=message):
        handle(PROMPT, **args)
    assert handle.state.call is None


def test_calling_a_removed_handle_raises():
    pipe = make_pipe("sd15")
    handle = apply_conceptrol(pipe)
    handle.remove()
    with pytest.raises(ConceptrolError, match="removed"):
        handle(PROMPT, concepts=["dog"], **kwargs())


def test_only_the_concept_layer_stores_the_global_mask(monkeypatch):
    writers = []
    original = ConceptrolIPAdapterProcessor._store
    monkeypatch.setattr(ConceptrolIPAdapterProcessor, "_store", lambda self, *a: (writers.append(self.name), original(self, *a)))
    pipe = make_pipe("sd15")
    apply_conceptrol(pipe)(PROMPT, concepts=["dog"], **kwargs())
    assert writers == [SD15_LAYER] * 4


# The SD 1.5 layers that run before the concept layer (grid 4x6) and their grids for a 16x24 latent.
EARLY_LAYER_GRIDS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2": (16, 24),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2": (8, 12),
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2": (4, 6),
    "mid_block.attentions.0.transformer_blocks.0.attn2": (2, 3),
}


def naive_local_mask(query, key, span):
    """ALGORITHM.md section 1 for one sample and concept: [1, 1, N], from the conditional (last) row."""
    q, k = query[-1].double(), key[-1].double()  # [H, N, d], [H, T, d]
    probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)  # [H, N, T]
    m = probs[..., span].mean(dim=-1).mean(dim=0)  # [N]
    return (m / (m.max() + 1e-6)).view(1, 1, -1)


def test_layers_before_the_concept_layer_use_the_previous_steps_mask(monkeypatch):
    pipe = make_pipe("sd15")
    span = find_concept_span(pipe.tokenizer, PROMPT, "dog")
    applied, local = {}, {}  # (step, layer) -> concept weights the layer applied / its own local mask
    original = ConceptrolIPAdapterProcessor._concept_weights

    def spy(self, call, query, key, attention_mask, active):
        weights = original(self, call, query, key, attention_mask, active)
        if self.name in EARLY_LAYER_GRIDS:
            assert attention_mask is None
            applied[call.step, self.name] = weights.detach().cpu()  # [S, J, N, 1]
            local[call.step, self.name] = naive_local_mask(query.detach().cpu(), key.detach().cpu(), span)
        return weights

    monkeypatch.setattr(ConceptrolIPAdapterProcessor, "_concept_weights", spy)
    handle = apply_conceptrol(pipe)
    handle(PROMPT, concepts=["dog"], **kwargs())
    stored = handle.masks.masks  # [steps, S, J, h, w] at the concept layer
    assert stored.shape == (4, 1, 1, 4, 6)
    assert set(applied) == {(k, name) for k in range(4) for name in EARLY_LAYER_GRIDS}
    assert all((stored[k] - stored[k - 1]).abs().max() > 1e-3 for k in range(1, 4))  # a stale mask would show
    for name, grid in EARLY_LAYER_GRIDS.items():
        # step 0: nothing is stored yet, so each layer uses its own local mask
        torch.testing.assert_close(applied[0, name].squeeze(-1), local[0, name].float(), atol=1e-5, rtol=1e-5)
        for step in range(1, 4):  # then the concept layer's mask of the previous step, nearest-resized
            previous = torch.nn.functional.interpolate(stored[step - 1], size=grid, mode="nearest")  # [S, J, h', w']
            torch.testing.assert_close(applied[step, name], previous.flatten(2).unsqueeze(-1), atol=0, rtol=0)
            assert (applied[step, name].squeeze(-1) - local[step, name].float()).abs().max() > 1e-3  # not its own


def test_state_resets_between_calls_and_after_errors():
    pipe = make_pipe("sd15")
    handle = apply_conceptrol(pipe)
    first = handle(PROMPT, concepts=["dog"], **kwargs()).images
    handle("a cat sleeping on a sofa", concepts=["cat"], **kwargs())
    torch.testing.assert_close(handle(PROMPT, concepts=["dog"], **kwargs()).images, first, atol=0, rtol=0)

    def boom(*args):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        handle(PROMPT, concepts=["dog"], **kwargs(callback_on_step_end=boom))
    assert handle.state.call is None
    torch.testing.assert_close(handle(PROMPT, concepts=["dog"], **kwargs()).images, first, atol=0, rtol=0)


def test_user_step_callback_still_runs_and_can_change_latents():
    pipe = make_pipe("sd15")
    handle = apply_conceptrol(pipe)
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append(step)
        return {"latents": tensors["latents"] * 0} if step == 3 else {}

    out = handle(PROMPT, concepts=["dog"], **kwargs(callback_on_step_end=callback)).images
    assert seen == [0, 1, 2, 3] and torch.count_nonzero(out) == 0


def test_two_handles_do_not_share_state():
    pipe_a, pipe_b = make_pipe("sd15"), make_pipe("sd15")
    handle_a, handle_b = apply_conceptrol(pipe_a), apply_conceptrol(pipe_b)
    alone = handle_a(PROMPT, concepts=["dog"], **kwargs()).images

    def run_b_in_the_middle(p, step, timestep, tensors):
        if step == 1:
            handle_b("a wave and a dog", concepts=["wave"], **kwargs())
        return {}

    interleaved = handle_a(PROMPT, concepts=["dog"], **kwargs(callback_on_step_end=run_b_in_the_middle)).images
    torch.testing.assert_close(interleaved, alone, atol=0, rtol=0)
    assert handle_a.masks.concepts == [["dog"]] and handle_b.masks.concepts == [["wave"]]


def test_recorded_masks_have_one_entry_per_step_in_unit_range():
    pipe = make_pipe("sd15")
    handle = apply_conceptrol(pipe)
    handle(PROMPT, concepts=["dog"], **kwargs())
    masks = handle.masks.masks
    assert masks.shape == (4, 1, 1, 4, 6) and masks.device.type == "cpu"
    assert masks.min() >= 0 and masks.amax(dim=(-1, -2)).sub(1).abs().max() < 1e-4


def test_explicit_spans_with_prompt_embeds_equal_the_word_with_the_prompt():
    pipe = make_pipe("sd15")
    handle = apply_conceptrol(pipe)
    by_word = handle(PROMPT, concepts=["dog"], **kwargs()).images
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    span = find_concept_span(pipe.tokenizer, PROMPT, "dog")
    by_span = handle(prompt_embeds=embeds, negative_prompt_embeds=negative, concepts=[(span.start, span.stop)],
                     **kwargs()).images
    torch.testing.assert_close(by_span, by_word, atol=0, rtol=0)
    with pytest.raises(ConceptrolError, match="explicit"):
        handle(prompt_embeds=embeds, negative_prompt_embeds=negative, concepts=["dog"], **kwargs())


def test_a_different_prompt_2_is_flagged():
    pipe = make_pipe("sdxl")
    handle = apply_conceptrol(pipe)
    with pytest.warns(UserWarning, match="prompt_2"):
        handle(PROMPT, prompt_2="a cat", concepts=["dog"], **kwargs(num_inference_steps=1))


def test_remove_after_unload_ip_adapter_warns_and_leaves_the_new_processors():
    pipe = make_pipe("sd15")
    handle = apply_conceptrol(pipe)
    pipe.unload_ip_adapter()
    after_unload = dict(pipe.unet.attn_processors)
    with pytest.warns(UserWarning, match="replaced after apply_conceptrol"):
        handle.remove()
    assert all(pipe.unet.attn_processors[k] is v for k, v in after_unload.items())


def test_a_window_that_holds_no_step_is_refused_before_the_first_step():  # audit D3
    pipe = make_pipe("sd15")
    handle = apply_conceptrol(pipe, ConceptrolConfig(start=0.2, end=0.3))  # no k with 0.2 <= k/2 and (k+1)/2 <= 0.3
    steps = []

    def count(pipe, step, timestep, tensors):
        steps.append(step)
        return {}

    with pytest.raises(ConceptrolError, match="holds none of the 2 denoising steps"):
        handle(PROMPT, concepts=["dog"], **kwargs(num_inference_steps=2, callback_on_step_end=count))
    assert steps == [] and handle.state.call is None
    handle(PROMPT, concepts=["dog"], **kwargs(num_inference_steps=10))  # step 2 of 10 lies in [0.2, 0.3]


def test_masks_of_an_earlier_call_are_gone_after_a_call_that_failed():  # audit D23
    pipe = make_pipe("sd15")
    handle = apply_conceptrol(pipe)
    handle(PROMPT, concepts=["dog"], **kwargs(num_inference_steps=3))
    assert handle.masks is not None and handle.masks.masks.shape[0] == 3

    def fail_at_step_one(pipe, step, timestep, tensors):
        if step == 1:
            raise RuntimeError("stopped")
        return {}

    with pytest.raises(RuntimeError, match="stopped"):
        handle(PROMPT, concepts=["dog"], **kwargs(num_inference_steps=3, callback_on_step_end=fail_at_step_one))
    assert handle.masks is None
