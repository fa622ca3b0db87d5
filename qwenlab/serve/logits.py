"""Per-request logit changes the engine's SamplingParams do not carry yet: ``logit_bias``, and test hooks.

``LogitsHook.install(engine)`` wraps ``engine.sampler`` (the engine calls ``self.sampler(logits, seqs,
end_token_ids)`` once per step). Before the real sampler runs, rows of requests with a ``logit_bias`` get
it added (OpenAI semantics: added to the logits, -100 bans, +100 all but forces), so the draw and the
reported logprobs both see it, as in OpenAI's API.

Test only (``qwenlab serve --test-hooks``; refused otherwise): a request may carry a forced output.
Random weights never write ``<think>`` or ``<tool_call>``, so to test reasoning and tool calls end to
end the hook makes the model emit a given token sequence through the real engine, detokenizer, parser
and streaming path: at output position ``i`` every logit but the forced token's is set to -inf, and
after the sequence the end token is forced. ``fail_after_tokens`` raises inside the engine step instead,
to test how the server survives an internal failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Forced:
    token_ids: list[int] | None = None  # the output, followed by end_token_id
    end_token_id: int | None = None
    fail_after_tokens: int | None = None


class InjectedFailure(RuntimeError):
    """Raised by the test hook inside the engine step."""


class LogitsHook:
    def __init__(self, sampler):
        self.inner = sampler
        self.bias: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.forced: dict[str, Forced] = {}

    @classmethod
    def install(cls, engine) -> "LogitsHook":
        hook = cls(engine.sampler)
        engine.sampler = hook
        return hook

    def register(self, request_id: str, logit_bias: dict[int, float] | None, forced: Forced | None) -> None:
        if logit_bias:
            ids = torch.tensor(list(logit_bias), dtype=torch.long)
            self.bias[request_id] = (ids, torch.tensor(list(logit_bias.values()), dtype=torch.float32))
        if forced is not None:
            self.forced[request_id] = forced

    def forget(self, request_id: str) -> None:
        self.bias.pop(request_id, None)
        self.forced.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, seqs, end_token_ids=()):
        rows = [i for i, s in enumerate(seqs) if s.request_id in self.bias or s.request_id in self.forced]
        if rows:
            logits = logits.float().clone()
            for i in rows:
                self._apply(logits[i], seqs[i])
        return self.inner(logits, seqs, end_token_ids)

    def _apply(self, row: torch.Tensor, seq) -> None:
        bias = self.bias.get(seq.request_id)
        if bias is not None:
            ids, values = bias
            row[ids.to(row.device)] += values.to(row.device)
        forced = self.forced.get(seq.request_id)
        if forced is None:
            return
        position = seq.num_output_tokens
        if forced.fail_after_tokens is not None and position >= forced.fail_after_tokens:
            raise InjectedFailure(f"test hook: failing the engine step after {position} tokens")
        if forced.token_ids is not None:
            token = forced.token_ids[position] if position < len(forced.token_ids) else forced.end_token_id
            if token is not None:
                row.fill_(float("-inf"))
                row[token] = 0.0
