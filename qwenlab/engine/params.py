"""Request-level data: SamplingParams in, RequestOutput out.

``SamplingParams`` fields left as ``None`` take the checkpoint's ``generation_config.json`` values
(Qwen3: temperature 0.6, top_p 0.95, top_k 20) through ``resolve``; ``validate`` raises ``RequestError``
with a clear message for anything a request may not ask for, before anything runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import RequestError

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
MAX_N = 64
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0,
           "frequency_penalty": 0.0, "repetition_penalty": 1.0}
SAMPLING_KNOBS = ("temperature", "top_p", "top_k", "min_p")


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: up to the context length
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1 = off
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's and the k most likely
    thinking_budget: int | None = None
    skip_special_tokens: bool = True

    # ---- defaults ----------------------------------------------------------------------------------
    def resolve(self, generation_config: dict | None = None) -> "SamplingParams":
        """A copy with unset fields taken from generation_config.json, else neutral values.

        As vLLM: temperature, top_p, top_k, min_p and the penalties come from the file; an explicit
        ``"do_sample": false`` there makes greedy decoding the default.
        """
        gen = generation_config or {}
        greedy = gen.get("do_sample") is False
        values: dict[str, Any] = {}
        for name, neutral in NEUTRAL.items():
            value = getattr(self, name)
            if value is None:
                value = None if greedy and name in SAMPLING_KNOBS else gen.get(name)
                if value is None:
                    value = 0.0 if greedy and name == "temperature" else neutral
            values[name] = value
        if values["top_k"] < 0:
            values["top_k"] = 0
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return replace(self, **values, stop=stop, stop_token_ids=list(self.stop_token_ids or []))

    # ---- validation --------------------------------------------------------------------------------
    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise RequestError for any value a request may not ask for; returns self."""
        _int("n", self.n, 1, MAX_N)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1)
        _int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.temperature is not None:
            _float("temperature", self.temperature)
            if self.temperature < 0:
                raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None:
            _float("top_p", self.top_p)
            if not 0 < self.top_p <= 1:
                raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None:
            _int("top_k", self.top_k, -1)
        if self.min_p is not None:
            _float("min_p", self.min_p)
            if not 0 <= self.min_p <= 1:
                raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                _float(name, value)
                if not -2 <= value <= 2:
                    raise RequestError(f"{name} must be in [-2, 2], got {value}")
        if self.repetition_penalty is not None:
            _float("repetition_penalty", self.repetition_penalty)
            if not 0 < self.repetition_penalty <= 10:
                raise RequestError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if self.seed is not None:
            _int("seed", self.seed, -(2**63), 2**63 - 1)
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.thinking_budget is not None:
            _int("thinking_budget", self.thinking_budget, 0)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"{name} must be true or false, got {getattr(self, name)!r}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None:
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
                raise RequestError("stop must be a non-empty string or a list of non-empty strings")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise RequestError("stop_token_ids must be a list of token ids")
            for token in self.stop_token_ids:
                check_token_id(token, vocab_size, "stop_token_ids")
        return self


def check_token_id(token: Any, vocab_size: int | None, what: str) -> None:
    if not isinstance(token, int) or isinstance(token, bool):
        raise RequestError(f"{what}: token ids must be integers, got {token!r}")
    if token < 0 or (vocab_size is not None and token >= vocab_size):
        top = f"0..{vocab_size - 1}" if vocab_size is not None else ">= 0"
        raise RequestError(f"{what}: token id {token} is outside the vocabulary ({top})")


def _int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"{name} must be {bounds}, got {value}")


def _float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}")


# ---- outputs -------------------------------------------------------------------------------------------
@dataclass
class Logprob:
    """Log-probability of one generated token under the model (before penalties and temperature)."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    logprobs: list[Logprob | None] | None = None  # None entries: tokens the engine inserted (thinking budget)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    delta_text: str = ""  # text released since the previous RequestOutput of this request
    delta_token_ids: list[int] = field(default_factory=list)
    # Filled by LLM.chat / LLM.stream from qwenlab.parsing:
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def text(self) -> str:
        """The first completion's text (shortcut for ``outputs[0].text``)."""
        return self.outputs[0].text


def sampling_fields() -> list[str]:
    return [f.name for f in fields(SamplingParams)]
