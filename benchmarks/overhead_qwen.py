"""Time and peak memory of one Qwen-Image-Edit-Plus transformer evaluation with two references, stock vs Conceptrol.

A transformer of Qwen-Image's real width (diffusers' QwenImageTransformer2DModel defaults: 24 heads x 128 = 3072,
text width 3584, 64 latent channels) with random weights; nothing is downloaded. Only `pipe.transformer(...)` is
timed, with the keywords QwenImageEditPlusPipeline passes at one step (the text mask, `img_shapes` of the latent and
both references): the text encoder and the VAE are the same for both and would dominate. Tokens per evaluation
(batch 1): 450 text tokens (the prompt and its two images as Qwen2.5-VL reads them; the last 20 padding, hidden by
the text mask), (size / 16)^2 latent tokens and two references of the same size, each with its own concept.

As overhead_flux2.py: Conceptrol at step 1 with step 0's masks carried in, the two runs alternated, medians.
Qwen-Image's 20B parameters do not fit a 24 GiB CPU machine, so on CPU pass fewer blocks (the per-block cost is what
the ratio measures); the concept block is the last one run:

    python benchmarks/overhead_qwen.py --layers 2 --size 256 --repeats 5 --json benchmarks/results-qwen-cpu.json
    python benchmarks/overhead_qwen.py --device cuda --dtype bf16 --size 1024       # real depth (60 blocks)
"""

from __future__ import annotations

import torch
from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel
from overhead_flux2 import arguments, measure, report

from conceptrol import ConceptrolConfig
from conceptrol.tiny.qwen import qwen_edit_components

TEXT_TOKENS, PADDING, STEPS = 450, 20, 40  # Edit-2509's 40 steps
SPANS = [[slice(400, 402), slice(405, 406)]]  # each reference's concept among the valid text keys


def build_transformer(layers: int, device: str, dtype: torch.dtype) -> QwenImageTransformer2DModel:
    """Qwen-Image's transformer at its real width with `layers` blocks and random weights."""
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(num_layers=layers)
    model = model.to(dtype).to_empty(device=device)  # allocated where it runs
    rope = model.pos_embed  # its frequency tables are computed at construction, not parameters: compute them anew
    model.pos_embed = type(rope)(theta=10000, axes_dim=list(rope.axes_dim), scale_rope=rope.scale_rope).to(device)
    torch.manual_seed(0)
    for param in model.parameters():  # the values do not affect the cost
        torch.nn.init.normal_(param, std=0.02)
    return model.eval()


def inputs(model: QwenImageTransformer2DModel, side: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
    mask[:, TEXT_TOKENS - PADDING:] = 0
    return dict(hidden_states=torch.randn(1, 3 * side * side, model.config.in_channels, generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, TEXT_TOKENS, model.config.joint_attention_dim,
                                                  generator=g).to(device, dtype),
                encoder_hidden_states_mask=mask.to(device), timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                img_shapes=[[(1, side, side)] * 3], return_dict=False)


def main() -> None:
    args, dtype = arguments(__doc__, {"layers": 60})
    model = build_transformer(args.layers, args.device, dtype)
    pipe = QwenImageEditPlusPipeline(**qwen_edit_components(layers=1) | {"transformer": model})  # only it runs
    side = args.size // 16
    kwargs = inputs(model, side, args.device, dtype)
    config = ConceptrolConfig(concept_layer=f"transformer_blocks.{args.layers - 1}")
    result = measure(pipe, config, kwargs, SPANS, STEPS, args.device, args.repeats)
    result["tokens"] = {"text": TEXT_TOKENS, "text_valid": TEXT_TOKENS - PADDING, "latent": side * side,
                        "references": [side * side, side * side]}
    report(result, args, model.inner_dim, config.concept_layer)


if __name__ == "__main__":
    main()
