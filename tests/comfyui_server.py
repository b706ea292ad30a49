"""A real ComfyUI server for tests: `python main.py` in a temporary copy of the ComfyUI tree, on 127.0.0.1, CPU only.

The copy holds ComfyUI's code (the tree under CONCEPTROL_COMFYUI is read-only; its tests and sample folders stay
behind) with custom_nodes/ComfyUI_IPAdapter_plus; the test installs the node pack into it with `conceptrol comfyui
install` and writes the tiny model files (tests/comfyui_files.py). The server starts through tests/comfyui_launch.py
(the torchvision placeholder where torchvision does not import), in a process group of its own that `stop()` ends
(SIGTERM, then SIGKILL) and that also ends if the test process dies. Every request has a timeout.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

LAUNCHER = Path(__file__).with_name("comfyui_launch.py")
LEFT_BEHIND = {"tests", "tests-unit", ".ci", "script_examples", "input", "output", "user", "temp"}
REQUEST_TIMEOUT = 30  # seconds for one HTTP request
START_TIMEOUT = 240  # seconds for the server to answer (2 busy cores: imports alone take ~10 s)
PROMPT_TIMEOUT = 300  # seconds for one queued prompt to finish


def copy_comfyui(source: Path, target: Path) -> Path:
    """A writable copy of ComfyUI's code (about 16 MB of files: the model folders hold no weights)."""
    for folder, subfolders, files in os.walk(source):
        relative = Path(folder).relative_to(source)
        if relative == Path("."):
            subfolders[:] = [name for name in subfolders if name not in LEFT_BEHIND]
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(Path(folder) / name, target / relative / name)  # contents only: the copy is writable
    for name in ("input", "output", "user", "temp"):
        (target / name).mkdir(exist_ok=True)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Finished:
    """A prompt's /history entry: its status and what its output nodes returned."""

    prompt_id: str
    entry: dict

    @property
    def ok(self) -> bool:
        return self.entry["status"]["status_str"] == "success"

    def messages(self, kind: str) -> list[dict]:
        return [data for name, data in self.entry["status"]["messages"] if name == kind]

    @property
    def cached(self) -> set[str]:
        """Ids of the nodes whose outputs came from ComfyUI's cache instead of running."""
        return {node for data in self.messages("execution_cached") for node in data["nodes"]}

    def image_refs(self, node_id: str) -> list[dict]:
        return self.entry["outputs"][node_id]["images"]


class ComfyServer:
    """`with ComfyServer(root, log) as server:` a started ComfyUI server, stopped on exit whatever happens."""

    def __init__(self, root: Path, log: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.root, self.log, self.port = root, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, str(LAUNCHER), str(root), "--cpu", "--listen", "127.0.0.1", "--port",
                        str(self.port), *extra_args]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ComfyServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
                            "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(self.command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {START_TIMEOUT} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """End the server's process group: SIGTERM, then SIGKILL after 20 s."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str, **query) -> bytes:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT) as response:
            return response.read()

    def get_json(self, path: str, **query):
        return json.loads(self.get(path, **query))

    def post_json(self, path: str, body) -> bytes:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            return response.read()

    def queue(self, prompt: dict) -> str:
        """POST /prompt; a prompt ComfyUI refuses (validation) raises with its node errors."""
        try:
            return json.loads(self.post_json("/prompt", {"prompt": prompt}))["prompt_id"]
        except urllib.error.HTTPError as error:
            raise AssertionError(f"ComfyUI refused the prompt: {error.read().decode(errors='replace')}") from None

    def run(self, prompt: dict) -> Finished:
        """Queue `prompt` and wait for its /history entry."""
        prompt_id = self.queue(prompt)
        deadline = time.monotonic() + PROMPT_TIMEOUT
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:  # ComfyUI writes the entry once the prompt is done
                return Finished(prompt_id, history[prompt_id])
            if not self.running:
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {PROMPT_TIMEOUT} s:\n{self.log_tail()}")

    def image(self, ref: dict) -> np.ndarray:
        """An output image, fetched from /view as the page shows it: [H, W, 3] uint8."""
        data = self.get("/view", filename=ref["filename"], subfolder=ref["subfolder"], type=ref["type"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _die_with_parent() -> None:
    """In the server's process: get SIGTERM when the test process dies (Linux), so no server outlives a killed run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
