"""The mask algebra against naive loops."""

import pytest
import torch

from conceptrol.core.masking import concept_mask, layer_grid, resize_mask, span_weights, text_attention_probs


def test_concept_mask_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 12, 9, generator=g).softmax(-1)  # [S, H, N, T]
    spans = [[slice(1, 3), slice(5, 6)], [slice(4, 8), slice(2, 3)]]
    mask = concept_mask(probs, span_weights(spans, 9, probs.device))
    for s in range(2):
        for j, span in enumerate(spans[s]):
            naive = torch.stack([probs[s, h, :, span].mean(-1) for h in range(3)]).mean(0)
            naive = naive / (naive.max() + 1e-6)
            torch.testing.assert_close(mask[s, j], naive)
    assert mask.max() <= 1.0 and mask.min() >= 0.0


def test_a_span_past_the_text_tokens_is_an_error_not_a_shorter_span():
    assert span_weights([[slice(7, 9)]], 9, torch.device("cpu"))[0, 0, 7:].tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="concept span 7..10 is past the 9 text tokens"):
        span_weights([[slice(1, 2)], [slice(7, 10)]], 9, torch.device("cpu"))


def test_text_attention_probs_match_softmax_with_bias():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 7, 4, generator=g)
    bias = torch.zeros(1, 2, 1, 7)
    bias[..., -1] = -1e4
    probs = text_attention_probs(q, k, bias)
    naive = ((q @ k.transpose(-1, -2)) / 2.0 + bias).softmax(-1)
    torch.testing.assert_close(probs, naive)
    assert probs[..., -1].max() < 1e-6


@pytest.mark.parametrize(
    "latent,tokens,grid",
    [((64, 64), 256, (16, 16)), ((96, 64), 24 * 16, (24, 16)), ((100, 75), 13 * 10, (13, 10)), ((16, 24), 24, (4, 6))],
)
def test_layer_grid_follows_the_latent_aspect_ratio(latent, tokens, grid):
    assert layer_grid(latent, tokens) == grid


def test_layer_grid_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        layer_grid((64, 64), 300)


def test_resize_is_nearest_neighbour():
    mask = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])  # [S=1, J=1, 2, 2]
    resized = resize_mask(mask, (4, 4)).view(4, 4)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.25, 0.25]])
    torch.testing.assert_close(resized, expected)
