"""A ComfyUI server on the CPU with this checkout loaded as a custom-node pack, for tests and tools.

    with ComfyServer(comfyui_path, workdir) as server:
        info = server.get("/object_info")
        prompt_id = server.queue(api_prompt)
        entry = server.wait(prompt_id)          # the /history entry once the prompt has finished

The pack is linked into `<workdir>/custom_nodes/ComfyUI-DUGE` and found through
--extra-model-paths-config, so ComfyUI's own custom_nodes folder is never touched. Output, user
and temp folders live under `workdir`. The server is stopped by the PID it was started with.

Environment: COMFYUI_FRONTEND_ROOT, when set, is served with --front-end-root (the test matrix's
"newest frontend" entry: `<folder>/comfyui_frontend_package/static`, made by hand: `pip install --target DIR comfyui-frontend-package`);
otherwise ComfyUI serves the frontend package it pins. The server runs with OMP_NUM_THREADS and
MKL_NUM_THREADS as this process has them, 1 when unset (a shared CPU).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-DUGE"  # the folder name users clone into custom_nodes/
FRONTEND_ROOT_VARIABLE = "COMFYUI_FRONTEND_ROOT"


def frontend_args() -> list[str]:
    """--front-end-root from COMFYUI_FRONTEND_ROOT (checked), or nothing: ComfyUI's pinned frontend."""
    root = os.environ.get(FRONTEND_ROOT_VARIABLE)
    if not root:
        return []
    if not (Path(root) / "index.html").is_file():
        raise ComfyServerError(f"{FRONTEND_ROOT_VARIABLE}={root}: expected a frontend's static folder with "
                               "index.html, e.g. <target>/comfyui_frontend_package/static")
    return ["--front-end-root", root]


def server_environment() -> dict[str, str]:
    """This process's environment with one thread per BLAS/OpenMP pool unless the caller set more."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1")}


def comfyui_path_or_skip() -> str:
    """COMFYUI_PATH when it names a ComfyUI checkout; otherwise skips the calling test module."""
    import pytest

    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfy").is_dir():
        pytest.skip("needs a ComfyUI checkout: set COMFYUI_PATH to its folder (and run with -m comfyui)",
                    allow_module_level=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServerError(RuntimeError):
    pass


class ComfyServer:
    """`main.py --cpu` of the ComfyUI in `comfyui_path`, serving on 127.0.0.1 with the pack loaded."""

    def __init__(self, comfyui_path: str | Path, workdir: str | Path, python: str = sys.executable,
                 extra_model_paths: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 settings: dict | None = None, start_timeout: float = 180.0):
        self.comfyui_path = Path(comfyui_path)
        self.workdir = Path(workdir)
        self.python = python
        self.extra_model_paths = extra_model_paths or {}  # e.g. {"checkpoints": "checkpoints"}, relative to workdir
        self.extra_args = list(extra_args or [])  # e.g. ["--cache-none"]
        self.settings = settings  # the frontend's user settings (comfy.settings.json), e.g. for a browser
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = self.workdir / "output"
        self.log_path = self.workdir / "server.log"
        self.process: subprocess.Popen | None = None

    # ------------------------------------------------------------ lifetime

    def start(self) -> "ComfyServer":
        custom_nodes = self.workdir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        for folder in ("output", "user", "temp", "input"):
            (self.workdir / folder).mkdir(exist_ok=True)
        if self.settings is not None:
            settings_file = self.workdir / "user" / "default" / "comfy.settings.json"
            settings_file.parent.mkdir(parents=True, exist_ok=True)
            settings_file.write_text(json.dumps(self.settings))
        link = custom_nodes / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        entries = {"custom_nodes": "custom_nodes", **self.extra_model_paths}
        extra = self.workdir / "extra_model_paths.yaml"
        extra.write_text(f"duge_test:\n  base_path: {self.workdir}\n"
                         + "".join(f"  {key}: {value}\n" for key, value in entries.items()))
        command = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--extra-model-paths-config", str(extra), "--output-directory", str(self.output_dir),
                   "--user-directory", str(self.workdir / "user"), "--temp-directory", str(self.workdir / "temp"),
                   "--input-directory", str(self.workdir / "input"), "--disable-api-nodes", "--dont-print-server",
                   "--preview-method", "none", *frontend_args(), *self.extra_args]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfyui_path, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=server_environment())
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info/DugeUnlearn", timeout=5)
                return self
            except (OSError, ComfyServerError):
                time.sleep(1)
        self.stop()
        raise ComfyServerError(f"ComfyUI did not answer within {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"

    # ------------------------------------------------------------ HTTP

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def post(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:  # validation errors come back as 400 with a JSON body
            raise ComfyServerError(f"POST {path}: HTTP {err.code}: {err.read().decode(errors='replace')[:4000]}")
        return json.loads(body) if body else None

    def queue(self, prompt: dict, workflow: dict | None = None, client_id: str = "duge-tests") -> str:
        """Queues an API-form prompt (as the frontend does, with the UI workflow as extra_pnginfo)."""
        payload = {"prompt": prompt, "client_id": client_id}
        if workflow is not None:
            payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        reply = self.post("/prompt", payload)
        if reply.get("node_errors"):
            raise ComfyServerError(f"node errors: {json.dumps(reply['node_errors'])[:4000]}")
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The /history entry of `prompt_id` once it has finished (success or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                history = self.get(f"/history/{prompt_id}")
            except (TimeoutError, urllib.error.URLError):  # a server starved by a big model answers late
                history = {}
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(2)
        raise ComfyServerError(f"prompt {prompt_id} not finished after {timeout:.0f} s:\n{self.log_tail()}")


def status_messages(entry: dict) -> str:
    """The status messages of a /history entry, readable in an assertion message."""
    return json.dumps(entry.get("status", {}), indent=1)[-4000:]
