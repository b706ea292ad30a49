"""FLUX/OminiControl math of ALGORITHM.md section 2: the bias table and the concept mask, tested directly."""

import math

import torch

from conceptrol.core.masking import flux_concept_mask, flux_condition_bias

T, N, NC = 6, 4, 3  # text, latent, condition tokens
TEXT, LATENT, COND = slice(0, T), slice(T, T + N), slice(T + N, T + N + NC)


def test_plain_ominicontrol_bias_is_log_c_between_condition_and_the_rest():
    bias = flux_condition_bias(T, N, NC, None, condition_scale=2.0)[0, 0]
    log_c = math.log(2.0)
    assert torch.all(bias[TEXT, COND] == log_c) and torch.all(bias[LATENT, COND] == log_c)
    assert torch.all(bias[COND, TEXT] == log_c) and torch.all(bias[COND, LATENT] == log_c)
    assert torch.all(bias[COND, COND] == 0) and torch.all(bias[: T + N, : T + N] == 0)


def test_conceptrol_bias_table_cell_by_cell():
    mask = torch.tensor([[0.5, 1.0, 1.5, 1.0]])
    bias = flux_condition_bias(T, N, NC, [slice(2, 4)], condition_scale=3.0, concept_mask=mask)[0, 0]
    log_c = math.log(3.0)
    for n in range(N):
        torch.testing.assert_close(bias[T + n, COND], torch.full((NC,), log_c + math.log(mask[0, n])))
    assert torch.all(bias[COND, LATENT] == log_c)
    assert torch.all(bias[2:4, COND] == log_c)
    assert torch.all(bias[:2, COND] == -math.inf) and torch.all(bias[4:T, COND] == -math.inf)
    assert torch.all(bias[COND, TEXT] == 0)  # the one cell that differs from plain OminiControl
    assert torch.all(bias[COND, COND] == 0) and torch.all(bias[: T + N, : T + N] == 0)


def test_conceptrol_bias_without_a_mask_yet_has_no_log_a_term():
    bias = flux_condition_bias(T, N, NC, [slice(1, 2)], condition_scale=1.0)[0, 0]
    assert torch.all(bias[LATENT, COND] == 0)


def test_each_sample_gets_its_own_span_and_mask():
    masks = torch.tensor([[1.0, 2.0, 0.5, 0.5], [2.0, 1.0, 0.5, 0.5]])
    bias = flux_condition_bias(T, N, NC, [slice(0, 1), slice(3, 5)], 1.0, masks)
    assert torch.all(bias[0, 0, 0, COND] == 0) and torch.all(bias[0, 0, 3, COND] == -math.inf)
    assert torch.all(bias[1, 0, 0, COND] == -math.inf) and torch.all(bias[1, 0, 3:5, COND] == 0)
    torch.testing.assert_close(bias[1, 0, T, COND], torch.full((NC,), math.log(2.0)))


def test_flux_concept_mask_matches_the_reference_formula_and_has_mean_one():
    g = torch.Generator().manual_seed(0)
    B, H, d = 2, 3, 8
    q = torch.randn(B, H, T + N + NC, d, generator=g)
    k = torch.randn(B, H, T + N + NC, d, generator=g)
    spans = [slice(1, 3), slice(4, 5)]
    bias = flux_condition_bias(T, N, NC, spans, 1.0)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(d) + bias).softmax(-1)  # the full attention, biases applied
    weights = torch.zeros(B, T)
    for b, span in enumerate(spans):
        weights[b, span] = 1 / (span.stop - span.start)
    mask = flux_concept_mask(q[:, :, LATENT], k[:, :, TEXT], weights)
    for b, span in enumerate(spans):
        latent_rows = probs[b, :, LATENT]  # [H, N, L]
        share = latent_rows[:, :, span] / latent_rows[:, :, TEXT].sum(-1, keepdim=True)
        r = share.mean(dim=(0, 2))
        torch.testing.assert_close(mask[b], r / r.mean())
    torch.testing.assert_close(mask.mean(-1), torch.ones(B))
