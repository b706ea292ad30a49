"""Which of diffusers' attention backends can take the additive bias Conceptrol puts on a joint attention."""

from __future__ import annotations

from typing import Any

from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from .errors import ConceptrolError

# diffusers' attention backends (models/attention_dispatch.py) that apply a dense additive float mask [B, 1, L, L] as
# given. The others cannot take Conceptrol's bias: flash*, sage*, aiter_fa2_hub, _native_flash and _native_xla raise
# on any mask, the *varlen* ones accept only a boolean key-padding mask, and _native_npu turns a float mask into a
# boolean one (every nonzero entry masked out).
ADDITIVE_MASK_BACKENDS = ("native", "_native_math", "_native_efficient", "_native_cudnn", "flex", "xformers")


def attention_backend(processor: Any) -> str:
    """The diffusers attention backend a processor's attention runs on: its own, else the active one."""
    backend = getattr(processor, "_attention_backend", None)
    if backend is None:  # diffusers' default: DIFFUSERS_ATTN_BACKEND, `attention_backend(...)` or `set_attention_backend`
        backend = _AttentionBackendRegistry.get_active_backend()[0]
    return backend.value if isinstance(backend, AttentionBackendName) else str(backend)


def check_bias_backend(processors: list[Any], adapter: str) -> None:
    """Raise before generating when an attention that gets Conceptrol's additive bias runs on a backend without masks."""
    unable = sorted({b for b in map(attention_backend, processors) if b not in ADDITIVE_MASK_BACKENDS})
    if unable:
        raise ConceptrolError(
            f"attention backend {unable[0]!r} cannot take the additive bias Conceptrol adds for {adapter}; use one of "
            f"{list(ADDITIVE_MASK_BACKENDS)} (e.g. pipe.transformer.set_attention_backend('native')), or "
            "masking='none' with scale 1 and the full window, which adds no bias"
        )
