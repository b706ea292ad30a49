"""The local web UI (`conceptrol ui`): `build_demo(generate_fn)` builds the page, `main()` launches it.

Models load lazily, on the first Generate that needs them, one at a time.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from .app import CSS, MAX_REFERENCES, build_demo, request_from_inputs
from .backend import DEMO_CHOICES, Comparison, CompareRequest, LocalBackend, ModelChoice, compare, model_choice

__all__ = ["CompareRequest", "Comparison", "LocalBackend", "MAX_REFERENCES", "ModelChoice", "UIOptions", "build_demo",
           "compare", "main", "model_choice", "request_from_inputs"]
logger = logging.getLogger(__name__)
DEMO_NOTE = ("**Offline demo:** the models are tiny and have random weights, so the pictures are noise-like; "
             "the page shows that the whole path runs. Start `conceptrol ui` without `--demo` for real models.")


@dataclass(frozen=True)
class UIOptions:
    """What `conceptrol ui` starts."""

    model: tuple[str, ...] = ("sd15", "sdxl", "flux")  # the model menu: presets, hub ids or local folders
    demo: bool = False  # offline tiny random models instead
    host: str = "127.0.0.1"  # only this machine can reach the page
    port: int | None = None  # None = the first free port from 7860
    max_file_size: str = "25mb"  # uploads above this are refused
    device: str = "auto"
    dtype: str = "auto"
    ip_adapter_repo: str | None = None  # hub id or local copy of h94/IP-Adapter
    ominicontrol_repo: str | None = None  # hub id or local copy of Yuanshi/OminiControl


def main(options: UIOptions) -> None:
    """Build the page and serve it until interrupted."""
    choices = list(DEMO_CHOICES) if options.demo else [model_choice(m) for m in dict.fromkeys(options.model)]
    repos = {"sd15": options.ip_adapter_repo, "sdxl": options.ip_adapter_repo, "flux": options.ominicontrol_repo}
    backend = LocalBackend(choices, options.device, options.dtype, {k: v for k, v in repos.items() if v})
    demo = build_demo(backend, choices, note=DEMO_NOTE if options.demo else "")
    demo.queue(default_concurrency_limit=1, max_size=20)
    if not _is_loopback(options.host):
        logger.warning("serving on %s: anyone who can reach this port can run models on this machine", options.host)
    _, url, _ = demo.launch(server_name=options.host, server_port=options.port, max_file_size=options.max_file_size,
                            ssr_mode=False, share=False, footer_links=[], quiet=True, prevent_thread_lock=True,
                            css=CSS)
    print(f"Conceptrol UI: {url} (Ctrl+C stops it)", flush=True)
    demo.block_thread()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
