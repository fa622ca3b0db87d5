"""LLM: the offline API over LLMEngine.

    llm = LLM("path/to/checkpoint")                      # or a Hugging Face name when online
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32))
    outs = llm.chat([{"role": "user", "content": "Hi"}], enable_thinking=False)
    outs[0].outputs[0].content, .reasoning_content, .tool_calls
    for delta in llm.stream("Once upon a time", SamplingParams(max_tokens=50)):
        print(delta.text, end="")
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import RequestError
from .engine import LLMEngine
from .params import RequestOutput, SamplingParams


@dataclass
class StreamDelta:
    """What one completion of a streamed request added in one step."""

    index: int
    text: str  # raw text delta (stop strings never appear)
    token_ids: list[int]
    finish_reason: str | None = None
    # With messages= (chat), the text delta parsed (qwenlab.parsing.Delta objects, in order):
    parsed: list = field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join(d.content for d in self.parsed if d.content is not None)

    @property
    def reasoning_content(self) -> str:
        return "".join(d.reasoning_content for d in self.parsed if d.reasoning_content is not None)

    @property
    def tool_calls(self) -> list:
        return [d.tool_call for d in self.parsed if d.tool_call is not None]


class LLM:
    def __init__(self, model, dtype="bfloat16", max_model_len: int | None = None, kv_cache_memory=None,
                 max_num_seqs: int | None = None, device: str | None = None, **engine_kwargs):
        self.engine = LLMEngine(model, dtype=dtype, max_model_len=max_model_len, kv_cache_memory=kv_cache_memory,
                                max_num_seqs=max_num_seqs, device=device, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    # ---- plain generation --------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); outputs in the order of the prompts."""
        prompts = self._prompt_list(prompts)
        params_list = self._params_list(params, len(prompts))
        ids = self._submit(prompts, params_list)
        return self._run(ids, use_tqdm)

    def _prompt_list(self, prompts) -> list:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise RequestError("prompts must be a string, a list of token ids, or a non-empty list of those")
        return list(prompts)

    @staticmethod
    def _params_list(params, count: int) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * count
        params = list(params)
        if len(params) != count:
            raise RequestError(f"got {len(params)} SamplingParams for {count} prompts")
        return params

    def _encode(self, prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer.json; pass prompts as token ids")
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, (list, tuple)):
            return list(prompt), None
        raise RequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _submit(self, prompts: list, params_list: list[SamplingParams]) -> list[str]:
        """Add every request, or none: a bad one is refused before anything runs."""
        added: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                token_ids, text = self._encode(prompt)
                request_id = f"llm-{next(self._ids)}"
                self.engine.add_request(request_id, token_ids, params, prompt=text)
                added.append(request_id)
        except Exception:
            for request_id in added:
                self.engine.abort(request_id)
            raise
        return added

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req")
        try:
            while wanted - final.keys():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in wanted - final.keys():
                self.engine.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[i] for i in ids]

    # ---- chat ----------------------------------------------------------------------------------------------
    def chat(self, messages, params: SamplingParams | Sequence[SamplingParams] | None = None, tools=None,
             enable_thinking: bool | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Chat completions for one conversation or a list of them, with reasoning and tool calls parsed."""
        from ..parsing import parse_output, thinking_mode

        conversations = self._conversations(messages)
        texts = [self._render(c, tools, enable_thinking) for c in conversations]
        outputs = self.generate(texts, params, use_tqdm=use_tqdm)
        for text, out in zip(texts, outputs):
            for completion in out.outputs:
                parsed = parse_output(completion.text, thinking=thinking_mode(text), tools=bool(tools))
                completion.content = parsed.content
                completion.reasoning_content = parsed.reasoning_content
                completion.tool_calls = parsed.tool_calls
        return outputs

    @staticmethod
    def _conversations(messages) -> list:
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], Mapping):
            return [messages]
        if (isinstance(messages, (list, tuple)) and messages
                and all(isinstance(c, (list, tuple)) and c and isinstance(c[0], Mapping) for c in messages)):
            return list(messages)
        raise RequestError("messages must be a list of {'role', 'content'} dicts, or a list of such lists")

    def _render(self, conversation, tools, enable_thinking) -> str:
        if self.tokenizer is None:
            raise RequestError("chat needs a tokenizer; this checkpoint has no tokenizer.json")
        return self.tokenizer.apply_chat_template(conversation, tools=tools, enable_thinking=enable_thinking)

    # ---- streaming -------------------------------------------------------------------------------------
    def stream(self, prompt=None, params: SamplingParams | None = None, *, messages=None, tools=None,
               enable_thinking: bool | None = None) -> Iterator[StreamDelta]:
        """Yield what each step adds, for one prompt (text or ids) or one conversation (``messages=``)."""
        from ..parsing import StreamParser, thinking_mode

        if (prompt is None) == (messages is None):
            raise RequestError("stream takes either a prompt or messages")
        parsers = None
        if messages is not None:
            prompt = self._render(self._conversations(messages)[0], tools, enable_thinking)
            n = (params or SamplingParams()).n
            parsers = [StreamParser(thinking_mode(prompt), tools=bool(tools)) for _ in range(n)]
        [request_id] = self._submit([prompt], [params or SamplingParams()])
        ended: set[int] = set()
        try:
            done = False
            while not done:
                for out in self.engine.step():
                    if out.request_id != request_id:
                        continue
                    done = out.finished
                    for completion in out.outputs:
                        if completion.index in ended:
                            continue
                        if not (completion.delta_text or completion.delta_token_ids or completion.finish_reason):
                            continue
                        if completion.finish_reason:
                            ended.add(completion.index)
                        delta = StreamDelta(completion.index, completion.delta_text, completion.delta_token_ids,
                                            completion.finish_reason)
                        if parsers is not None:
                            parser = parsers[completion.index]
                            delta.parsed = parser.feed(delta.text) if delta.text else []
                            if completion.finish_reason:
                                delta.parsed += parser.finish()
                        yield delta
        finally:
            if self.engine.requests.get(request_id) is not None:
                self.engine.abort(request_id)
