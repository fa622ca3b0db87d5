"""LLMEngine: requests in, RequestOutputs out, one scheduling step at a time.

    engine = LLMEngine("path/to/checkpoint", dtype="bfloat16")
    engine.add_request("r1", prompt_token_ids, SamplingParams(max_tokens=64))
    while engine.has_unfinished_requests():
        for out in engine.step():
            ...

Each step: the scheduler picks sequences and token counts, the runner computes them in one forward, the
sampler draws the next token of each sequence that is up to date, and the output processing appends it,
tracks the thinking budget, detokenizes, checks stop conditions and frees finished sequences' blocks.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import ConfigError, RequestError
from .block_manager import BlockManager
from .params import CompletionOutput, Logprob, RequestOutput, SamplingParams, check_token_id
from .runner import ModelRunner, kv_bytes_per_token
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

logger = logging.getLogger("qwenlab.engine")

THINK_START, THINK_END, IM_START = "<think>", "</think>", "<|im_start|>"
# Qwen3 technical report, thinking budget: the thought is closed with this instruction.
THINKING_BUDGET_CLOSE = ("\n\nConsidering the limited time by the user, I have to give the solution based on the "
                         "thinking directly now.\n</think>\n\n")
CPU_AUTO_KV_BYTES = 4 * 2**30


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    prompt: str | None = None
    arrival: float = field(default_factory=time.monotonic)


class LLMEngine:
    """The serving engine. ``model`` is a checkpoint directory, a Hugging Face name, or a loaded model."""

    def __init__(self, model, *, dtype: str | torch.dtype | None = "bfloat16", device: str | None = None,
                 max_model_len: int | None = None, kv_cache_memory: str | int | None = None,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, seed: int | None = None, use_kernels: bool | None = None,
                 cuda_graphs: bool | None = None, log_stats: bool = True, tokenizer=None,
                 generation_config: dict | None = None, quantization: str | None = None):
        from ..checkpoint import load_model, parse_size, resolve_model_dir

        self.log_stats = log_stats
        directory = None
        if isinstance(model, torch.nn.Module):
            self.model = model.eval()
        else:
            directory = resolve_model_dir(model)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = load_model(directory, dtype=dtype, device=device, quantization=quantization)
        self.model_config = self.model.config
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(directory)
        self.generation_config = generation_config if generation_config is not None else _read_generation_config(directory)
        self.end_token_ids = self._end_token_ids()
        self.kernels = self._setup_kernels(use_kernels)

        is_cuda = self.device.type == "cuda"
        self.max_num_seqs = max_num_seqs or (256 if is_cuda else 32)
        self.max_num_batched_tokens = max_num_batched_tokens or (8192 if is_cuda else 2048)
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or block_size < 1:
            raise ConfigError("max_num_seqs, max_num_batched_tokens and block_size must be positive")
        self.block_size = block_size
        limit = self.model_config.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise ConfigError(f"max_model_len {max_model_len} must be between 1 and the model's "
                              f"max_position_embeddings ({limit})")
        per_token = kv_bytes_per_token(self.model_config, self.dtype)
        budget = parse_size(kv_cache_memory) if kv_cache_memory is not None else self._auto_kv_budget(
            per_token, max_model_len or limit)
        num_blocks = int(budget // (per_token * block_size))
        capacity = num_blocks * block_size
        if num_blocks < 1:
            raise ConfigError(f"the KV cache budget ({budget / 2**20:.1f} MiB) holds no block of {block_size} tokens "
                              f"({per_token * block_size / 2**20:.2f} MiB each); give more kv_cache_memory")
        if max_model_len is None:
            max_model_len = min(limit, capacity)
        elif max_model_len > capacity:
            raise ConfigError(f"max_model_len {max_model_len} tokens does not fit in the KV cache: the budget "
                              f"{budget / 2**30:.2f} GiB holds {capacity} tokens ({per_token} bytes per token); "
                              f"raise kv_cache_memory to at least {max_model_len * per_token / 2**30:.2f} GiB "
                              f"or lower max_model_len")
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_num_seqs, self.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, num_blocks, block_size, kernels=self.kernels,
                                  cuda_graphs=is_cuda if cuda_graphs is None else cuda_graphs,
                                  max_num_seqs=self.max_num_seqs, max_model_len=max_model_len)
        self.sampler = Sampler(seed)
        self.requests: dict[str, _Request] = {}
        self._think_ids = self._thinking_token_ids()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "max_step_tokens": 0}
        self._announce(num_blocks, per_token, budget)

    # ---- set-up helpers --------------------------------------------------------------------------------
    def _end_token_ids(self) -> tuple[int, ...]:
        ids: list = []
        if self.tokenizer is not None:
            ids.extend(self.tokenizer.eos_token_ids)
        eos = self.generation_config.get("eos_token_id", self.model_config.eos_token_id)
        ids.extend(eos if isinstance(eos, list) else [eos])
        vocab = self.model_config.vocab_size
        return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and 0 <= i < vocab))

    def _setup_kernels(self, use_kernels: bool | None):
        if self.device.type != "cpu" or use_kernels is False:
            return None
        from . import kernels

        module = kernels.load(required=bool(use_kernels))
        if module is not None and self.dtype == torch.bfloat16:
            kernels.use_bf16_kernels(self.model)
        if module is not None and getattr(self.model, "quantization", None) is not None:
            from ..quant.fused import use_quant_kernels  # int8/int4 layers: the same fused structure

            use_quant_kernels(self.model)
        return module

    def _auto_kv_budget(self, per_token: int, want_len: int) -> int:
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            activations = 64 * 2**20 + 2 * self.max_num_batched_tokens * (
                self.model_config.intermediate_size * 4 + self.model_config.vocab_size // 8)
            return max(int(free * 0.9) - activations, 0)
        import psutil

        # At least one full-length sequence; up to 4 GiB when that serves more; never over half the free RAM.
        one = per_token * want_len
        wanted = max(one, min(CPU_AUTO_KV_BYTES, one * self.max_num_seqs))
        return int(min(wanted, 0.5 * psutil.virtual_memory().available))

    def _thinking_token_ids(self) -> dict | None:
        if self.tokenizer is None:
            return None
        start, end = self.tokenizer.token_to_id(THINK_START), self.tokenizer.token_to_id(THINK_END)
        if start is None or end is None:
            return None
        return {"start": start, "end": end, "im_start": self.tokenizer.token_to_id(IM_START),
                "close": self.tokenizer.encode(THINKING_BUDGET_CLOSE)}

    def _announce(self, num_blocks: int, per_token: int, budget: int) -> None:
        tokens = num_blocks * self.block_size
        message = (f"qwenlab engine: {self.model_config.model_type} on {self.device} ({str(self.dtype)[6:]}); "
                   f"KV cache {self.runner.kv_cache_bytes / 2**30:.2f} GiB = {num_blocks} blocks x {self.block_size} "
                   f"tokens = {tokens} tokens ({per_token / 1024:.1f} KiB/token); max_model_len {self.max_model_len} "
                   f"-> {tokens / self.max_model_len:.1f} sequences at full length; max_num_seqs {self.max_num_seqs}, "
                   f"{self.max_num_batched_tokens} tokens per step"
                   + ("; CPU kernels on" if self.kernels is not None else ""))
        logger.info(message)
        if self.log_stats:
            print(message, file=sys.stderr)

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    prompt: str | None = None) -> None:
        """Queue a request; raises RequestError at once for anything invalid or impossible."""
        if not isinstance(request_id, str) or not request_id:
            raise RequestError("request_id must be a non-empty string")
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        prompt_token_ids = self._check_prompt(prompt_token_ids)
        params = (params or SamplingParams()).validate(self.model_config.vocab_size).resolve(self.generation_config)
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this checkpoint has none (use stop_token_ids)")
        if params.thinking_budget is not None and self._think_ids is None:
            raise RequestError("thinking_budget needs a tokenizer with <think> and </think> tokens")
        num_prompt = len(prompt_token_ids)
        if num_prompt >= self.max_model_len:
            raise RequestError(f"request ({num_prompt} prompt tokens) exceeds the available context size "
                               f"({self.max_model_len} tokens, and at least one token must be generated)")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - num_prompt
        if num_prompt + max_tokens > self.max_model_len:
            raise RequestError(f"request ({num_prompt} prompt tokens + {max_tokens} max_tokens = "
                               f"{num_prompt + max_tokens} tokens) exceeds the available context size "
                               f"({self.max_model_len} tokens)")
        if params.min_tokens > max_tokens:
            raise RequestError(f"min_tokens ({params.min_tokens}) exceeds max_tokens ({max_tokens})")
        params = replace(params, max_tokens=max_tokens)
        seqs: list[Sequence] = []
        for index in range(params.n):
            parent = seqs[0] if seqs and self.block_manager.enable_prefix_caching else None
            seq = Sequence(request_id, index, prompt_token_ids, params, parent=parent)
            self._init_text_state(seq)
            seqs.append(seq)
        self.requests[request_id] = _Request(request_id, prompt_token_ids, seqs, prompt)
        for seq in seqs:
            self.scheduler.add(seq)
        self.counters["prompt_tokens"] += num_prompt

    def _check_prompt(self, prompt_token_ids) -> list[int]:
        if isinstance(prompt_token_ids, torch.Tensor):
            prompt_token_ids = prompt_token_ids.reshape(-1).tolist()
        if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
            raise RequestError("prompt_token_ids must be a non-empty list of token ids")
        vocab = self.model_config.vocab_size
        ids = list(prompt_token_ids)
        for token in ids:
            check_token_id(token, vocab, "prompt")
        return ids

    def _init_text_state(self, seq: Sequence) -> None:
        if self.tokenizer is not None:
            seq.detokenizer = self.tokenizer.incremental_detokenizer(skip_special_tokens=seq.params.skip_special_tokens)
        if seq.params.thinking_budget is not None:
            seq.in_thinking = self._prompt_opens_thinking(seq.token_ids)

    def _prompt_opens_thinking(self, ids: list[int]) -> bool:
        """Whether the prompt's last turn leaves a <think> open (Qwen3-Thinking-2507 style templates)."""
        t = self._think_ids
        last_turn = max((i for i, x in enumerate(ids) if x == t["im_start"]), default=-1)
        opened = max((i for i, x in enumerate(ids) if x == t["start"] and i > last_turn), default=-1)
        closed = max((i for i, x in enumerate(ids) if x == t["end"] and i > last_turn), default=-1)
        return opened > closed

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (unknown or finished ids are ignored)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        logits, sample_seqs = self.runner.execute(batch)
        self.scheduler.update(batch)
        self.counters["steps"] += 1
        self.counters["max_step_tokens"] = max(self.counters["max_step_tokens"], batch.num_tokens)
        touched: dict[str, None] = {}
        if sample_seqs:
            tokens, logprobs = self.sampler(logits, sample_seqs, self.end_token_ids)
            for seq, token, logprob in zip(sample_seqs, tokens, logprobs):
                self._accept(seq, token, logprob)
                touched[seq.request_id] = None
        return [self._request_output(self.requests[rid]) for rid in touched if rid in self.requests] + \
            self._pop_finished(touched)

    def _accept(self, seq: Sequence, token: int, logprob: Logprob | None) -> None:
        """Append a sampled token, apply the thinking budget, check the stop conditions."""
        self.counters["generation_tokens"] += 1
        forced = self._thinking_step(seq, token)
        for i, t in enumerate([token] + forced):
            seq.append_token(t, logprob if i == 0 else None)
            if self._check_stop(seq, t):
                return
        if forced:
            self.counters["generation_tokens"] += len(forced)

    def _thinking_step(self, seq: Sequence, token: int) -> list[int]:
        if seq.params.thinking_budget is None:
            return []
        t = self._think_ids
        if token == t["start"]:
            seq.in_thinking, seq.thinking_tokens = True, 0
        elif token == t["end"]:
            seq.in_thinking = False
        elif seq.in_thinking:
            seq.thinking_tokens += 1
        if seq.in_thinking and seq.thinking_tokens >= seq.params.thinking_budget:
            seq.in_thinking = False
            return list(t["close"])
        return []

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                self._finish(seq, "stop", token)
                return True
            if not p.ignore_eos and token in self.end_token_ids:
                self._finish(seq, "stop", None)
                return True
        if seq.detokenizer is not None:
            seq.detokenizer.add(token)
            seq.text = seq.detokenizer.text
            if p.stop and seq.num_output_tokens >= p.min_tokens and self._find_stop_string(seq):
                return True
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            self._finish(seq, "length", None)
            return True
        return False

    def _find_stop_string(self, seq: Sequence) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, seq.released_chars - longest)  # a stop string may straddle text already seen
        best = None
        for stop in seq.params.stop:
            at = seq.text.find(stop, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        seq.text = seq.text[: best[0]]
        seq.released_chars = min(seq.released_chars, len(seq.text))
        self._finish(seq, "stop", best[1], flush=False)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason, flush: bool = True) -> None:
        if flush and seq.detokenizer is not None:
            seq.detokenizer.finish()
            seq.text = seq.detokenizer.text
        self.scheduler.finish(seq, reason, stop_reason)

    # ---- outputs -----------------------------------------------------------------------------------------
    def _completion(self, seq: Sequence) -> CompletionOutput:
        if seq.is_finished or not seq.params.stop:
            releasable = len(seq.text)
        else:  # hold back what could still become a stop string
            releasable = max(seq.released_chars, len(seq.text) - (max(len(s) for s in seq.params.stop) - 1))
        delta_text = seq.text[seq.released_chars:releasable]
        seq.released_chars = releasable
        output_ids = seq.output_token_ids
        delta_ids = output_ids[seq.released_tokens:]
        seq.released_tokens = len(output_ids)
        return CompletionOutput(index=seq.index, text=seq.text[:releasable], token_ids=list(output_ids),
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                                delta_text=delta_text, delta_token_ids=delta_ids)

    def _request_output(self, request: _Request) -> RequestOutput:
        return RequestOutput(request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                             outputs=[self._completion(s) for s in request.seqs],
                             finished=all(s.is_finished for s in request.seqs), prompt=request.prompt,
                             num_cached_tokens=request.seqs[0].num_cached_tokens)

    def _pop_finished(self, touched) -> list[RequestOutput]:
        for rid in touched:
            request = self.requests.get(rid)
            if request is not None and all(s.is_finished for s in request.seqs):
                del self.requests[rid]
        return []

    # ---- introspection -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "requests": len(self.requests),
            "kv_blocks_used": bm.num_used_blocks, "kv_blocks_total": bm.num_blocks, "kv_block_size": bm.block_size,
            "kv_tokens_total": bm.num_blocks * bm.block_size,
            "prefix_cache_hits": bm.prefix_hits, "prefix_cache_queries": bm.prefix_queries,
            "preemptions": self.scheduler.num_preemptions, **self.counters,
        }


def _load_tokenizer(directory: Path | None):
    if directory is None or not (directory / "tokenizer.json").is_file():
        return None
    from ..tokenizer import Tokenizer

    return Tokenizer.from_pretrained(directory)


def _read_generation_config(directory: Path | None) -> dict:
    if directory is None or not (directory / "generation_config.json").is_file():
        return {}
    try:
        data = json.loads((directory / "generation_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{directory / 'generation_config.json'}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
