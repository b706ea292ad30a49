"""Conceptrol under diffusers' attention backends (`transformer.set_attention_backend(...)`).

Every attention Conceptrol does not read keeps the backend the user set, and so do the ones it changes; an
adapter that puts an additive bias on the attention (Kontext, Redux) refuses a backend that cannot take one,
before anything runs. Backends are told apart by counting the calls of each backend's function in diffusers'
registry. `_native_flash` (PyTorch's flash SDPA, which has a CPU kernel) stands for the backends without masks
(flash-attn, sage), which cannot be installed here.
"""

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from helpers import flux_adapter_kwargs, tiny_flux_adapter

from conceptrol import ConceptrolConfig, ConceptrolError, apply_conceptrol

PROMPT = "a photo of a dog surfing a wave"
CONFIG = ConceptrolConfig(concept_layer="transformer_blocks.1")
ROUND_OFF = dict(atol=1e-5, rtol=1e-5)  # the math and efficient SDPA kernels sum in different orders


@pytest.fixture(autouse=True)
def restore_active_backend():
    """set_attention_backend also sets the process-wide active backend: put it back after each test."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture
def backend_calls(monkeypatch):
    """How often each backend's attention function ran."""
    calls = {}
    for name, fn in list(_AttentionBackendRegistry._backends.items()):
        def counted(*args, _fn=fn, _name=name.value, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setitem(_AttentionBackendRegistry._backends, name, counted)
    return calls


def set_processor_backend(pipe, backend):
    """The transformer's processors on `backend`; the process-wide active backend stays the default, as after
    another model's `set_attention_backend`: the processors' own must win."""
    pipe.transformer.set_attention_backend(backend)
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def make(kind):
    return tiny_flux_adapter(kind)  # 2 double and 2 single blocks


def call(handle, kind):
    return handle(PROMPT, concepts=["dog"], **flux_adapter_kwargs(kind, steps=2)).images


# (adapter, backend): the dense float-mask path, flex (the bias as a score_mod), and the gate path of XLabs, which
# adds no bias, on a flash-style backend without masks
BACKENDS = [("xlabs-ip", "_native_math"), ("kontext", "_native_math"), ("redux", "_native_math"),
            ("kontext", "flex"), ("xlabs-ip", "_native_flash")]


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex attention run eagerly warns that it is slow
@pytest.mark.parametrize("kind, backend", BACKENDS)
def test_every_attention_runs_on_the_backend_the_user_set(kind, backend, backend_calls):
    pipe, extra = make(kind)
    handle = apply_conceptrol(pipe, CONFIG, **extra)
    default = call(handle, kind)
    assert set(backend_calls) == {"native"}
    backend_calls.clear()
    set_processor_backend(pipe, backend)
    ours = call(handle, kind)
    attentions = 2 + 2  # double and single blocks, one attention each per transformer call
    extra_ip = 2 if kind == "xlabs-ip" else 0  # the IP-Adapter branch of each double block
    assert backend_calls == {backend: 2 * (attentions + extra_ip)}  # two steps
    torch.testing.assert_close(ours, default, **ROUND_OFF)
    assert handle.masks is not None and handle.masks.masks.shape[0] == 2


@pytest.mark.parametrize("kind", ["kontext", "redux"])
def test_a_backend_that_cannot_take_the_bias_is_refused_before_anything_runs(kind, backend_calls):
    pipe, extra = make(kind)
    handle = apply_conceptrol(pipe, CONFIG, **extra)
    pipe.transformer.set_attention_backend("_native_flash")
    backend_calls.clear()
    with pytest.raises(ConceptrolError, match="attention backend '_native_flash' cannot take the additive bias.*"
                                               r"set_attention_backend\('native'\)"):
        call(handle, kind)
    assert backend_calls == {}  # refused before the first attention


def test_the_active_backend_counts_when_the_processors_have_none(backend_calls):
    """`attention_backend(...)` and DIFFUSERS_ATTN_BACKEND set the active backend, not the processors' own."""
    pipe, extra = make("kontext")
    handle = apply_conceptrol(pipe, CONFIG)
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName("_native_flash"))
    with pytest.raises(ConceptrolError, match="'_native_flash' cannot take the additive bias"):
        call(handle, "kontext")
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName("_native_math"))
    call(handle, "kontext")
    assert set(backend_calls) == {"_native_math"}


def test_kontext_without_a_bias_takes_any_backend(backend_calls):
    """Masking off at scale 1 over the whole window adds no bias: the stock attention runs, on flash too."""
    pipe, extra = make("kontext")
    handle = apply_conceptrol(pipe, ConceptrolConfig(masking="none", concept_layer=CONFIG.concept_layer))
    pipe.transformer.set_attention_backend("_native_flash")
    call(handle, "kontext")
    assert set(backend_calls) == {"_native_flash"}

