"""FLUX joint attention under Conceptrol against a naive transcription of the reference (ALGORITHM.md section 2)."""

import math

import pytest
import torch

from conceptrol.flux.ominicontrol.attention import DEFAULT_MASK_BLOCKS, FluxCall, FluxConceptrolAttention
from conceptrol.flux.sequence import JointLayout

LAYOUT = JointLayout(num_text=7, num_latent=6, num_condition=6)
BLOCKS = [f"transformer_blocks.{i}" for i in range(19)] + [f"single_transformer_blocks.{i}" for i in range(38)]


class NaiveReference:
    """The released algorithm written out: full attention matrix, explicit softmax, one mask for all blocks."""

    def __init__(self, spans, c):
        self.spans, self.c, self.mask = spans, c, None

    def bias(self, b):
        t, n, nc = LAYOUT.num_text, LAYOUT.num_latent, LAYOUT.num_condition
        length, log_c = t + n + nc, math.log(self.c)
        bias = torch.zeros(length, length)
        if self.spans is None:
            bias[: t + n, t + n :] = log_c
            bias[t + n :, : t + n] = log_c
            return bias
        bias[t + n :, t : t + n] = log_c
        bias[t : t + n, t + n :] = log_c
        span = self.spans[b]
        bias[span, t + n :] = log_c
        bias[: span.start, t + n :] = -1e7
        bias[span.stop : t, t + n :] = -1e7
        if self.mask is not None:
            bias[t : t + n, t + n :] += self.mask[b].log()[:, None]
        return bias

    def attend(self, q, k, v, reads):
        outs, masks = [], []
        for b in range(q.shape[0]):
            probs = (q[b] @ k[b].transpose(-1, -2) / math.sqrt(q.shape[-1]) + self.bias(b)).softmax(-1)
            outs.append(probs @ v[b])
            if reads and self.spans is not None:
                t, latent = LAYOUT.num_text, LAYOUT.latent
                share = probs[:, latent, self.spans[b]] / probs[:, latent, :t].sum(-1, keepdim=True)
                r = share.mean(dim=(0, 2))
                masks.append(r / r.mean())
        if masks:
            self.mask = torch.stack(masks)
        return torch.stack(outs)


def random_qkv(g, batch=2, heads=2, d=8):
    length = LAYOUT.num_text + LAYOUT.num_latent + LAYOUT.num_condition
    return [torch.randn(batch, heads, length, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("spans", [None, [slice(2, 4), slice(5, 6)]], ids=["ominicontrol", "conceptrol"])
def test_two_denoising_steps_over_all_57_blocks_match_the_reference(spans):
    g = torch.Generator().manual_seed(0)
    call, reference = FluxCall(spans=spans), NaiveReference(spans, c=1.3)
    roles = {name: FluxConceptrolAttention(reads_mask=name in DEFAULT_MASK_BLOCKS) for name in BLOCKS}
    for _step in range(2):  # the mask of one step carries into the blocks before block 18 of the next
        for name in BLOCKS:
            q, k, v = random_qkv(g)
            ours = roles[name].attend(call, q, k, v, LAYOUT, condition_scale=1.3)
            torch.testing.assert_close(ours, reference.attend(q, k, v, name in DEFAULT_MASK_BLOCKS), atol=1e-5, rtol=1e-5)
            if spans is not None:
                torch.testing.assert_close(call.concept_mask, reference.mask, atol=1e-5, rtol=1e-5)
    assert len(call.records) == (6 if spans is not None else 0)


def test_mask_is_read_only_at_the_assigned_blocks_and_has_mean_one():
    g = torch.Generator().manual_seed(1)
    call = FluxCall(spans=[slice(1, 3)])
    plain = FluxConceptrolAttention(reads_mask=False)
    plain.attend(call, *random_qkv(g, batch=1), LAYOUT, 1.0)
    assert call.concept_mask is None
    FluxConceptrolAttention(reads_mask=True).attend(call, *random_qkv(g, batch=1), LAYOUT, 1.0)
    torch.testing.assert_close(call.concept_mask.mean(-1), torch.ones(1))


def test_a_new_call_starts_without_a_mask():
    g = torch.Generator().manual_seed(2)
    first = FluxCall(spans=[slice(1, 3)])
    FluxConceptrolAttention(reads_mask=True).attend(first, *random_qkv(g, batch=1), LAYOUT, 1.0)
    second = FluxCall(spans=[slice(1, 3)])
    q, k, v = random_qkv(g, batch=1)
    out = FluxConceptrolAttention(reads_mask=False).attend(second, q, k, v, LAYOUT, 1.0)
    torch.testing.assert_close(out, NaiveReference([slice(1, 3)], 1.0).attend(q, k, v, False), atol=1e-5, rtol=1e-5)


def test_condition_scale_is_half_outside_the_window():
    from conceptrol.flux.sequence import condition_scale_at

    assert [condition_scale_at(k, 10, 0.2, 1.0, 1.5) for k in range(4)] == [0.5, 0.5, 1.5, 1.5]
    assert condition_scale_at(9, 10, 0.0, 0.8, 2.0) == 0.5
