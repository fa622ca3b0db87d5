"""Sampler: logits of a batch -> next tokens, each row with its own parameters.

Order as in transformers/vLLM: penalties (repetition over prompt and output, presence and frequency
over the output), min_tokens (end tokens masked), temperature, then top-k / top-p / min-p truncation
and a draw. Temperature 0 is greedy (argmax).

Seeded requests are reproducible whatever else is in the batch: each row's truncation depends only on
its own parameters, and its draw is one uniform number from the sequence's own generator, turned into a
token by inverse-CDF over the row's candidates in a fixed order (best first after top-k / top-p, else
vocabulary order). Logprobs are the model's own (log-softmax of the raw logits, before penalties).
"""

from __future__ import annotations

import torch

from ..model.layers import one_cpu_thread
from . import kernels
from .params import Logprob
from .sequence import Sequence

GREEDY_EPS = 1e-5


class Sampler:
    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 end_token_ids: tuple[int, ...] = ()) -> tuple[list[int], list[Logprob | None]]:
        with one_cpu_thread(logits.device):  # its vocabulary-wide ops would fork an OpenMP team
            return self._choose(logits, seqs, end_token_ids)

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence],
                end_token_ids: tuple[int, ...]) -> tuple[list[int], list[Logprob | None]]:
        temps = [s.params.temperature for s in seqs]
        greedy = [i for i, t in enumerate(temps) if t < GREEDY_EPS]
        if len(greedy) == len(seqs) and not any(_adjusts(s) for s in seqs):
            tokens = _argmax(logits)  # plain greedy: argmax is the same in the logits' own dtype
            return tokens, self._logprobs(logits, seqs, tokens)
        logits = logits.float()
        raw = logits
        if any(_adjusts(s) for s in seqs):
            logits = self._apply_penalties(logits.clone(), seqs, end_token_ids)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if greedy:
            rows = torch.tensor(greedy, device=logits.device)
            tokens[rows] = logits[rows].argmax(-1)
        by_path: dict[str, list[int]] = {"top_k": [], "sort": [], "plain": []}
        for i, seq in enumerate(seqs):
            if temps[i] >= GREEDY_EPS:
                p = seq.params
                by_path["top_k" if p.top_k > 0 else "sort" if p.top_p < 1 else "plain"].append(i)
        if len(greedy) < len(seqs):
            u = self._uniforms(seqs, logits.device)
            for path, rows in by_path.items():
                if rows:
                    tokens[torch.tensor(rows, device=logits.device)] = self._sample(path, logits, rows, seqs, u)
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, seqs, token_list)

    # ---- steps -----------------------------------------------------------------------------------------
    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence], end_ids: tuple[int, ...]) -> torch.Tensor:
        vocab = logits.shape[-1]
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.repetition_penalty != 1.0:  # transformers: over prompt and output, divide positives
                seen = torch.tensor(seq.token_ids, device=logits.device).unique()
                scores = logits[i, seen]
                logits[i, seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:  # OpenAI: output only
                counts = torch.bincount(torch.tensor(seq.output_token_ids, device=logits.device), minlength=vocab)
                counts = counts[:vocab].to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
            if seq.num_output_tokens < p.min_tokens:
                banned = [t for t in (() if p.ignore_eos else end_ids) + tuple(p.stop_token_ids) if t < vocab]
                if banned:
                    logits[i, banned] = float("-inf")
        return logits

    def _uniforms(self, seqs: list[Sequence], device) -> torch.Tensor:
        u = torch.rand(len(seqs), generator=self.generator, dtype=torch.float64)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                u[i] = torch.rand(1, generator=seq.generator, dtype=torch.float64)
        return u.clamp_(min=1e-12).to(device)

    @staticmethod
    def _sample(path: str, logits: torch.Tensor, rows: list[int], seqs: list[Sequence], u: torch.Tensor):
        device = logits.device
        params = [seqs[i].params for i in rows]
        index = torch.tensor(rows, device=device)
        temperature = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
        scaled = logits[index] / temperature[:, None]
        if path == "top_k":
            kmax = min(max(p.top_k for p in params), scaled.shape[-1])
            values, ids = scaled.topk(kmax, dim=-1)
            ks = torch.tensor([min(p.top_k, kmax) for p in params], device=device)
            values = values.masked_fill(torch.arange(kmax, device=device)[None, :] >= ks[:, None], float("-inf"))
        elif path == "sort":
            values, ids = scaled.sort(dim=-1, descending=True)
        else:
            values, ids = scaled, None
        probs = torch.softmax(values, dim=-1, dtype=torch.float64)
        if path != "plain":
            top_p = torch.tensor([p.top_p for p in params], device=device, dtype=probs.dtype)
            before = probs.cumsum(-1) - probs  # mass of better candidates; the best one is always kept
            probs = probs.masked_fill(before > top_p[:, None], 0.0)
        min_p = torch.tensor([p.min_p for p in params], device=device, dtype=probs.dtype)
        if bool((min_p > 0).any()):
            best = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < min_p[:, None] * best, 0.0)
        cdf = probs.cumsum(-1)
        target = u[index].to(cdf.dtype) * cdf[:, -1]
        choice = (cdf < target[:, None]).sum(-1).clamp_(max=cdf.shape[-1] - 1)
        # never land on a zero-probability candidate (target at the very top of the cdf)
        choice = torch.minimum(choice, (probs > 0).long().cumsum(-1).argmax(-1))
        return choice if ids is None else ids.gather(1, choice[:, None]).squeeze(1)

    @staticmethod
    def _logprobs(raw: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[Logprob | None]:
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        out: list[Logprob | None] = [None] * len(seqs)
        if not wanted:
            return out
        index = torch.tensor(wanted, device=raw.device)
        logprobs = torch.log_softmax(raw[index].float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor([tokens[i] for i in wanted], device=raw.device)[:, None])[:, 0].tolist()
        kmax = max(seqs[i].params.logprobs for i in wanted)
        top_values, top_ids = (logprobs.topk(kmax, dim=-1) if kmax else (None, None))
        for j, i in enumerate(wanted):
            k = seqs[i].params.logprobs
            top = list(zip(top_ids[j, :k].tolist(), top_values[j, :k].tolist())) if k else []
            out[i] = Logprob(tokens[i], chosen[j], top)
        return out


def _adjusts(seq: Sequence) -> bool:
    """Whether the sequence's logits need penalties or end-token masking before sampling."""
    p = seq.params
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
            or seq.num_output_tokens < p.min_tokens)


def _argmax(logits: torch.Tensor) -> list[int]:
    """Row-wise argmax as a list; bf16 CPU logits through the kernels (torch's bf16 argmax is ~0.7 ms per
    151936-wide row on AVX2, about 1% of a decode step)."""
    module = kernels._module
    if module is not None and logits.dtype == torch.bfloat16 and logits.device.type == "cpu" and logits.dim() == 2:
        return module.argmax_bf16(logits).tolist()
    return logits.argmax(-1).tolist()
