"""Conceptrol's processors stand in for the ones diffusers put on each layer and keep them as `wrapped` (not a
submodule: no duplicate state-dict keys); these mixins pass diffusers' own settings through to the wrapped one, and
ProcessorSwap installs them and puts the stock ones back."""

from __future__ import annotations

import warnings
from typing import Any, Callable


class ProcessorSwap:
    """Processors installed in place of `model`'s own (`make(key, stock)` gives each; it may return the stock one)
    and a forward pre-hook `on_forward(module, args, kwargs)`; `restore` or `undo` put back the exact objects."""

    def __init__(self, model: Any, make: Callable[[str, Any], Any], on_forward: Callable[..., None]) -> None:
        self.model = model
        self.saved = dict(model.attn_processors)
        self.installed = {key: make(key, processor) for key, processor in self.saved.items()}
        model.set_attn_processor(dict(self.installed))  # set_attn_processor pops entries: pass a copy
        self.hook = model.register_forward_pre_hook(on_forward, with_kwargs=True)

    def restore(self) -> None:
        """The saved processors back and the hook gone."""
        self.model.set_attn_processor(dict(self.saved))
        self.hook.remove()

    def undo(self, replaced: str) -> None:
        """As restore, unless the installed processors were replaced since: then they stay, and `replaced` is the
        warning that says so (raised at the caller of the caller, the user's `handle.remove()`)."""
        if all(self.model.attn_processors.get(k) is p for k, p in self.installed.items()):
            self.model.set_attn_processor(dict(self.saved))
        else:
            warnings.warn(replaced, stacklevel=3)
        self.hook.remove()


class DelegatesScale:
    """`scale` is the wrapped IP-Adapter processor's: `pipe.set_ip_adapter_scale` keeps working."""

    wrapped: Any

    @property
    def scale(self) -> list:
        return self.wrapped.scale

    @scale.setter
    def scale(self, value: list) -> None:
        self.wrapped.scale = value


class DelegatesBackend:
    """The attention backend and parallel config are the wrapped processor's: `set_attention_backend` reaches it."""

    wrapped: Any

    @property
    def _attention_backend(self) -> Any:
        return getattr(self.wrapped, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.wrapped._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.wrapped, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.wrapped._parallel_config = value
