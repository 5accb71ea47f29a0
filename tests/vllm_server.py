"""A real vLLM server (its CPU build, scripts/vllm_cpu_server.sh) for the served-teacher tests and benchmark.

The server runs in its own process group, so that it and its engine processes are killed together; ``kill`` sends
SIGKILL to the server's own PID, as a crash would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vllm_cpu_server.sh"
ROLLOUT_SCRIPT = SCRIPT.with_name("vllm_rollout_server.sh")
START_TIMEOUT_S = 900  # the first call makes the venv (a few minutes), then about a minute on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """``python``: an interpreter with vLLM installed (its GPU build), started directly; default the CPU script.
    ``lora_rank``: a rollout server of ``model`` (scripts/vllm_rollout_server.sh) taking adapters up to that rank.
    ``env``: variables set (a value) or removed (None) for the server."""

    def __init__(self, model: str, port: int | None = None, *args: str, log: Path | None = None,
                 python: str | None = None, lora_rank: int | None = None, env: dict | None = None):
        self.model, self.port, self.args, self.python = model, port or free_port(), args, python
        self.lora_rank, self.env = lora_rank, env or {}
        self.log = log or Path(f"/tmp/llmneo-vllm-{self.port}.log")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VllmServer:
        return self.launch().wait()

    def launch(self) -> VllmServer:
        """Start the server without waiting for it (several servers start side by side, then ``wait``)."""
        with open(self.log, "ab") as log:
            env = {key: value for key, value in {**os.environ, **self.env}.items() if value is not None}
            self.process = subprocess.Popen(self._command(), env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait(self) -> VllmServer:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}; its log: {self.log}\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as answer:
                    json.loads(answer.read())
                return self
            except OSError:
                time.sleep(2)
        self.stop()
        raise RuntimeError(f"vLLM did not answer within {START_TIMEOUT_S} s; its log: {self.log}")

    def _command(self) -> list[str]:
        if self.lora_rank is not None:
            return ["bash", str(ROLLOUT_SCRIPT), self.model, str(self.port), str(self.lora_rank), *self.args]
        if self.python is None:
            return ["bash", str(SCRIPT), "serve", self.model, str(self.port), *self.args]
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--served-model-name",
                "teacher", "--host", "127.0.0.1", "--port", str(self.port), "--max-logprobs", "64", *self.args]

    def kill(self) -> None:
        """SIGKILL the server by its PID (a crash), then clear what it leaves behind (its engine processes)."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._kill_group()

    def stop(self) -> None:
        if self.process is not None:
            self._kill_group()
            self.process.wait()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
