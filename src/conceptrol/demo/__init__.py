"""The local web UI (`conceptrol ui`): `build_demo(generate_fn)` builds the page, `main()` launches it.

Models load lazily, on the first Generate that needs them, one at a time.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import warnings
from dataclasses import dataclass

from ..app.settings import check_device_name, check_dtype
from ..core.errors import ConceptrolError, ConceptrolWarning
from .app import CSS, MAX_REFERENCES, build_demo, request_from_api, request_from_inputs
from .backend import (
    DEMO_CHOICES,
    CompareRequest,
    Comparison,
    LocalBackend,
    ModelChoice,
    compare,
    model_choice,
    with_adapter_repos,
)

__all__ = ["CompareRequest", "Comparison", "LocalBackend", "MAX_REFERENCES", "ModelChoice", "UIOptions", "build_demo",
           "check_can_serve", "compare", "main", "model_choice", "parse_file_size", "request_from_api",
           "request_from_inputs"]
DEMO_NOTE = ("**Offline demo:** the models are tiny and have random weights, so the pictures are noise-like; "
             "the page shows that the whole path runs. Start `conceptrol ui` without `--demo` for real models.")
FILE_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?b)?", re.IGNORECASE)  # 25mb, 1.5 GB, 20000 (bytes)
FILE_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}  # as gradio counts (1 kb = 1024 b)
SERVE_HINT = "pass 127.0.0.1 (this machine only), 0.0.0.0 (every network interface) or one of this machine's addresses"


@dataclass(frozen=True)
class UIOptions:
    """What `conceptrol ui` starts; the syntax of every field is checked here, before anything loads."""

    model: tuple[str, ...] = ("sd15", "sdxl", "flux")  # the model menu: presets, hub ids or local folders
    demo: bool = False  # offline tiny random models instead
    host: str = "127.0.0.1"  # only this machine can reach the page
    port: int | None = None  # None = the first free port from 7860
    max_file_size: str = "25mb"  # uploads above this are refused: 25mb, 500kb, 1.5gb, or a number of bytes
    device: str = "auto"
    dtype: str = "auto"
    adapter: str | None = None  # the adapter of every model in the menu (None: each model's default)
    adapter_repo: tuple[str, ...] = ()  # local copies (or hub ids) of adapter repositories; each model takes its own
    ip_adapter_repo: str | None = None  # deprecated: an --adapter-repo (h94/IP-Adapter)
    ominicontrol_repo: str | None = None  # deprecated: an --adapter-repo (Yuanshi/OminiControl)

    def __post_init__(self) -> None:
        if not self.host.strip():
            raise ConceptrolError(f"--host is empty; {SERVE_HINT}")
        if self.port is not None and (isinstance(self.port, bool) or not isinstance(self.port, int)
                                      or not 1 <= self.port <= 65535):
            raise ConceptrolError(f"--port must be from 1 to 65535, got {self.port}; "
                                  "or leave it out to take the first free one from 7860")
        parse_file_size(self.max_file_size)
        check_device_name(self.device, "--device")
        check_dtype(self.dtype, "--dtype")
        chosen = [flag for flag, value in (("--model", self.model != UIOptions.model), ("--adapter", self.adapter),
                                           ("--adapter-repo", self.adapter_repo), ("--ip-adapter-repo", self.ip_adapter_repo),
                                           ("--ominicontrol-repo", self.ominicontrol_repo)) if value]
        if self.demo and chosen:
            raise ConceptrolError(f"--demo uses its own tiny models; leave out {chosen[0]}")

    @property
    def repos(self) -> tuple[str, ...]:
        """Every adapter repository given, the deprecated flags' included."""
        return (*self.adapter_repo, *(r for r in (self.ip_adapter_repo, self.ominicontrol_repo) if r))

    def menu(self) -> list[ModelChoice]:
        """The model menu, every model, adapter and repository checked (no weights, no hub)."""
        if self.demo:
            return list(DEMO_CHOICES)
        choices = [model_choice(model, self.adapter) for model in dict.fromkeys(self.model)]
        return with_adapter_repos(choices, self.repos)


def parse_file_size(size: str | int) -> int:
    """Bytes in an upload limit written as gradio writes it ('25mb', '500 KB'; 1 kb = 1024 bytes) or in bytes."""
    match = FILE_SIZE.fullmatch(str(size).strip())
    limit = int(float(match[1]) * FILE_SIZE_UNITS[(match[2] or "b").lower()]) if match else 0
    if isinstance(size, bool) or limit < 1:
        raise ConceptrolError(f"--max-file-size must be a size above zero such as 25mb, 500kb or 1gb "
                              f"(or a number of bytes), got {size!r}")
    return limit


def check_can_serve(host: str, port: int | None) -> None:
    """Bind (host, port) once and let go, so a bad --host or a taken --port is one clear error, not a traceback.

    port None checks only the host: gradio then takes the first free port from 7860 itself.
    """
    address = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1], as in a URL
    try:
        family, kind, _, _, sockaddr = socket.getaddrinfo(address, port or 0, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConceptrolError(f"--host {host} is not an address this machine can serve on ({reason}); {SERVE_HINT}") \
            from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as error:
            raise ConceptrolError(_bind_problem(host, port, error)) from None


def _bind_problem(host: str, port: int | None, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return _port_in_use(port)
    if error.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine; {SERVE_HINT}"
    if error.errno == errno.EACCES:
        return f"--port {port} needs administrator rights on this machine; pass a port from 1024 to 65535"
    return f"cannot serve on --host {host} --port {port}: {error.strerror or error}"


def _port_in_use(port: int | None) -> str:
    return f"--port {port} is in use; pass another --port or leave it out to take the first free one"


def _check_device(device: str) -> None:
    """The device exists here (the syntax was checked by UIOptions); says so in terms of --device."""
    from ..app.loading import pick_device

    try:
        pick_device(device)
    except ConceptrolError as error:
        message = str(error)
        raise ConceptrolError(f"--{message}" if message.startswith("device ") else f"--device {device}: {message}") \
            from None


def main(options: UIOptions) -> None:
    """Build the page and serve it until interrupted; a flag that cannot work fails here, before anything starts."""
    _check_device(options.device)
    choices = options.menu()
    check_can_serve(options.host, options.port)
    for flag in ("ip_adapter_repo", "ominicontrol_repo"):
        if getattr(options, flag):
            warnings.warn(f"--{flag.replace('_', '-')} is deprecated; pass the same folder as --adapter-repo (each "
                          "model of the menu takes the repository that holds its adapter)", ConceptrolWarning, stacklevel=2)
    backend = LocalBackend(choices, options.device, options.dtype)
    demo = build_demo(backend, choices, note=DEMO_NOTE if options.demo else "")
    demo.queue(default_concurrency_limit=1, max_size=20)
    if not _is_loopback(options.host):
        warnings.warn(f"serving on {options.host}: anyone who can reach this port can run models on this machine",
                      ConceptrolWarning, stacklevel=2)
    try:
        _, url, _ = demo.launch(server_name=options.host, server_port=options.port,
                                max_file_size=parse_file_size(options.max_file_size), ssr_mode=False, share=False,
                                footer_links=[], quiet=True, prevent_thread_lock=True, css=CSS)
    except OSError as error:  # taken between the check above and the launch, or no free port from 7860
        if "port" not in str(error):
            raise
        raise ConceptrolError(_port_in_use(options.port) if options.port else
                              "no free port from 7860 on; pass a free --port") from None
    print(f"Conceptrol UI: {url} (Ctrl+C stops it)", flush=True)
    demo.block_thread()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
