"""The inference engine: paged KV cache, continuous batching, prefix caching, chunked prefill, sampling.

``LLM`` is the offline API; ``LLMEngine`` the step-by-step engine a server drives. See docs/engine.md.
"""

from .engine import LLMEngine
from .llm import LLM, StreamDelta
from .params import CompletionOutput, Logprob, RequestOutput, SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "StreamDelta"]
