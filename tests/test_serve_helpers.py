"""The server under test: one real ``qwenlab serve`` subprocess per test session, on a random checkpoint.

The checkpoint has Qwen3's real tokenizer (vocab 151936, official chat template) and a tiny random
model (hidden 32, 2 layers), so every request goes through the real tokenizer, template, engine,
detokenizer and parsers while generating in milliseconds. The server is started with ``--test-hooks``:
a request may then carry ``"qwenlab_test": {"text": ...}`` to force its output through the real engine
(random weights never write ``<think>`` or ``<tool_call>``), or ``{"fail_after_tokens": k}`` to make the
engine step fail. Test modules import the fixtures below.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import qwenlab_checkpoint
from tests.tokenizer_fixtures import make_checkpoint

API_KEY = "test-key-123"
MODEL = "qwen-test"
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 4
MAX_QUEUE = 2
MAX_BODY = 1024 * 1024
TINY_QWEN3 = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048)


def build_model(directory: Path) -> Path:
    qwenlab_checkpoint(directory, preset="qwen3-0.6b", dtype="float32", **TINY_QWEN3)
    make_checkpoint(directory)  # the real Qwen3 tokenizer files and chat template
    return directory


class ServerProcess:
    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.handle = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "qwenlab", "serve", "--host", "127.0.0.1", "--port", "0",
                                      *args], stdout=self.handle, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.url = self._wait_for_port()

    def _wait_for_port(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", self.log.read_text(errors="replace"))
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.output()}")
            time.sleep(0.1)
        raise AssertionError(f"server did not start:\n{self.output()}")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.output()}")
            time.sleep(0.2)
        raise AssertionError(f"server not ready:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.handle.close()


# Several test modules import these fixtures, and pytest would then set a session fixture up once per
# module; the model and the server are therefore built once per process here and torn down at exit.
@functools.cache
def _shared_model_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="qwenlab-serve-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_model(root / "tiny-qwen3")


@functools.cache
def _shared_server() -> ServerProcess:
    directory = _shared_model_dir()
    proc = ServerProcess(["--model", str(directory), "--served-model-name", MODEL, "--api-key", API_KEY,
                          "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "8MiB",
                          "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE),
                          "--max-body-size", str(MAX_BODY), "--test-hooks"], directory.parent / "server.log")
    atexit.register(proc.stop)
    proc.wait_ready()
    return proc


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return _shared_model_dir()


@pytest.fixture(scope="session")
def server() -> ServerProcess:
    return _shared_server()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def metrics(http: httpx.Client) -> dict[str, float]:
    """The unlabelled-by-reason gauges and counters of /metrics, by name."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        out[name.split("{")[0] if "model_name" in name and "finished_reason" not in name else name] = float(value)
    return out


def wait_idle(http: httpx.Client, timeout: float = 30) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        idle = (m["qwenlab:num_requests_running"] == 0 and m["qwenlab:num_requests_waiting"] == 0
                and m["qwenlab:kv_cache_blocks_used"] == 0 and m["qwenlab:num_requests_admitted"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response, in order (the final '[DONE]' kept as a string)."""
    import json

    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def user(text: str = "Hello") -> list[dict]:
    return [{"role": "user", "content": text}]
