"""Prometheus text exposition for ``GET /metrics``: engine gauges and counters, and latency histograms.

Names follow vLLM's (with the ``qwenlab:`` prefix) so existing dashboards need only the prefix changed.
"""

from __future__ import annotations

import bisect

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """Server-side counters (touched only on the event loop) plus the engine's last stats snapshot."""

    def __init__(self):
        self.ttft = Histogram("qwenlab:time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl = Histogram("qwenlab:inter_token_latency_seconds", "Time between two tokens of one completion.")
        self.e2e = Histogram("qwenlab:e2e_request_latency_seconds", "Time from request arrival to its end.")
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.http: dict[tuple[str, int], int] = {}  # (route, status) -> responses
        self.rejected_queue_full = 0
        self.aborted_disconnect = 0

    def count_response(self, route: str, status: int) -> None:
        key = (route, status)
        self.http[key] = self.http.get(key, 0) + 1

    def render(self, stats: dict, model_name: str, queued: int) -> str:
        used, total = stats.get("kv_blocks_used", 0), stats.get("kv_blocks_total", 0)
        hits, queries = stats.get("prefix_cache_hits", 0), stats.get("prefix_cache_queries", 0)
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, value, labels: str = "") -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"])

        label = f'{{model_name="{model_name}"}}'
        metric("qwenlab:num_requests_running", "gauge", "Sequences in the running batch.", stats.get("running", 0), label)
        metric("qwenlab:num_requests_waiting", "gauge", "Sequences waiting for a slot or KV blocks.",
               stats.get("waiting", 0), label)
        metric("qwenlab:num_requests_admitted", "gauge", "Sequences admitted by the server and not finished.", queued,
               label)
        metric("qwenlab:kv_cache_blocks_used", "gauge", "KV-cache blocks held by sequences.", used, label)
        metric("qwenlab:kv_cache_blocks_total", "gauge", "KV-cache blocks in all.", total, label)
        metric("qwenlab:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use.",
               used / total if total else 0.0, label)
        metric("qwenlab:prompt_tokens_total", "counter", "Prompt tokens admitted.", stats.get("prompt_tokens", 0), label)
        metric("qwenlab:generation_tokens_total", "counter", "Tokens generated.", stats.get("generation_tokens", 0),
               label)
        metric("qwenlab:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", queries,
               label)
        metric("qwenlab:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", hits, label)
        metric("qwenlab:prefix_cache_hit_rate", "gauge", "Prefix-cache hits over queries since start.",
               hits / queries if queries else 0.0, label)
        metric("qwenlab:num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
               stats.get("preemptions", 0), label)
        metric("qwenlab:request_rejected_queue_full_total", "counter", "Requests answered 429 (queue full).",
               self.rejected_queue_full, label)
        metric("qwenlab:request_aborted_disconnect_total", "counter", "Requests aborted because the client left.",
               self.aborted_disconnect, label)
        lines += ["# HELP qwenlab:request_success_total Finished requests by finish reason.",
                  "# TYPE qwenlab:request_success_total counter"]
        for reason, count in sorted(self.finished.items()):
            lines.append(f'qwenlab:request_success_total{{model_name="{model_name}",finished_reason="{reason}"}} {count}')
        lines += ["# HELP qwenlab:http_responses_total HTTP responses by route and status.",
                  "# TYPE qwenlab:http_responses_total counter"]
        for (route, status), count in sorted(self.http.items()):
            lines.append(f'qwenlab:http_responses_total{{route="{route}",status="{status}"}} {count}')
        for hist in (self.ttft, self.itl, self.e2e):
            lines += hist.render()
        return "\n".join(lines) + "\n"
