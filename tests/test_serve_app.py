"""The server in-process (Starlette's TestClient): loading states, test hooks off by default, the CLI's errors."""

from __future__ import annotations

import threading
import time

from starlette.testclient import TestClient

from qwenlab.errors import ConfigError
from qwenlab.serve import ServerConfig, create_app
from tests.conftest import run_cli
from tests.test_serve_helpers import model_dir  # noqa: F401 - fixture

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


def engine_for(directory):
    from qwenlab.engine import LLMEngine

    return LLMEngine(directory, dtype="float32", kv_cache_memory="4MiB", max_model_len=256, max_num_seqs=2,
                     log_stats=False)


def wait_for(check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_health_is_503_while_loading_then_serves(model_dir):
    gate = threading.Event()

    def factory():
        gate.wait(60)
        return engine_for(model_dir)

    app = create_app(ServerConfig(model=str(model_dir), served_model_name="m"), engine_factory=factory)
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 503
        assert client.get("/metrics").status_code == 200  # metrics answer while loading
        gate.set()
        wait_for(lambda: client.get("/health").status_code == 200)
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        # the test hook is refused unless the server was started with it
        r = client.post("/v1/chat/completions", json={**CHAT, "qwenlab_test": {"text": "x"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "qwenlab_test"


def test_load_failure_is_reported_on_health(model_dir):
    def factory():
        raise ConfigError("max_model_len 99999 does not fit")

    failures = []
    app = create_app(ServerConfig(model=str(model_dir)), engine_factory=factory)
    app.state.server.on_load_failure = failures.append
    with TestClient(app) as client:
        wait_for(lambda: failures)
        r = client.get("/health")
        assert r.status_code == 503 and "does not fit" in r.json()["error"]["message"]
    assert failures == ["max_model_len 99999 does not fit"]


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("serve", "--model", str(tmp_path / "missing"), timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr
    proc = run_cli("serve", "--model", str(tmp_path), "--port", "70000", timeout=120)
    assert proc.returncode == 2 and "--port" in proc.stderr


def test_cli_load_failure_exits_2(model_dir):
    proc = run_cli("serve", "--model", str(model_dir), "--port", "0", "--max-model-len", "99999", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot serve" in proc.stderr.splitlines()[-1] and "99999" in proc.stderr.splitlines()[-1]
