"""Following a diffusers pipeline's denoising steps without taking `callback_on_step_end` away from the user."""

from __future__ import annotations

from typing import Any, Callable

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback


def chain_step_callback(kwargs: dict, on_step_end: Callable[[int], None]) -> dict:
    """`kwargs` with a `callback_on_step_end` that reports each finished step, then runs the user's own (if any).

    The user's callback keeps working as before, its returned tensors included; PipelineCallback objects
    keep their `tensor_inputs`.
    """
    user = kwargs.get("callback_on_step_end")
    kwargs = dict(kwargs)
    if isinstance(user, (PipelineCallback, MultiPipelineCallbacks)):
        kwargs["callback_on_step_end_tensor_inputs"] = user.tensor_inputs

    def step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        on_step_end(step)
        return user(pipe, step, timestep, callback_kwargs) if user is not None else {}

    kwargs["callback_on_step_end"] = step_end
    return kwargs
