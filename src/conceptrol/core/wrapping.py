"""Conceptrol's processors stand in for the ones diffusers put on each layer and keep them as `wrapped` (not a
submodule: no duplicate state-dict keys); these mixins pass diffusers' own settings through to the wrapped one."""

from __future__ import annotations

from typing import Any


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
