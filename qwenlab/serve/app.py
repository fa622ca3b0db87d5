"""The OpenAI-compatible HTTP server: a Starlette app over one LLMEngine.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``,
``GET /metrics``, ``POST /tokenize``, ``POST /detokenize``. See docs/server.md.

A request goes: body read under the size cap -> JSON object -> strict pydantic model (400 naming the
field) -> model name (404) -> prompt rendered and tokenized in a worker thread -> context and vocabulary
checks (400 with the numbers) -> admission against the bounded queue (429 + Retry-After) -> the engine
thread (``EngineLoop``). Its outputs stream back as SSE or are gathered into one response. Whatever
happens after admission (the client leaving, an engine failure, a bug) ends in ``Job.close()``, which
aborts what is still running so its KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import QwenlabError
from .logits import Forced
from ..parsing import thinking_mode
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    NamedToolChoice,
    TokenizeRequest,
    error_body,
    finite_logprob,
    parse_body,
    validate,
)
from .worker import EngineFailure, EngineLoop

logger = logging.getLogger("qwenlab.serve")

MiB = 2**20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerConfig:
    model: str
    served_model_name: str | None = None
    api_key: str | None = None
    max_model_len: int | None = None
    kv_cache_memory: str | int | None = None
    max_num_seqs: int | None = None
    max_queue: int = 64  # sequences admitted beyond max_num_seqs before 429
    max_body_bytes: int = 8 * MiB
    dtype: str | None = None
    test_hooks: bool = False  # accept the test-only ``qwenlab_test`` field (forced outputs, injected failures)
    engine_kwargs: dict = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


# ---- the server's state -----------------------------------------------------------------------------------
class Server:
    def __init__(self, config: ServerConfig, engine_factory: Callable[[], object] | None = None):
        self.config = config
        self.engine_factory = engine_factory or self._load_engine
        self.engine = None
        self.loop_: EngineLoop | None = None
        self.load_error: str | None = None
        self.metrics = Metrics()
        self.admitted = 0  # sequences admitted and not finished (event loop only)
        self.created = int(time.time())
        self.on_load_failure: Callable[[str], None] | None = None

    def _load_engine(self):
        from ..engine import LLMEngine

        c = self.config
        kwargs = dict(max_model_len=c.max_model_len, kv_cache_memory=c.kv_cache_memory, max_num_seqs=c.max_num_seqs,
                      **c.engine_kwargs)
        if c.dtype is not None:
            kwargs["dtype"] = c.dtype
        return LLMEngine(c.model, **kwargs)

    # ---- lifecycle --------------------------------------------------------------------------------------
    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, args=(loop,), name="qwenlab-load", daemon=True).start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            engine = self.engine_factory()
            if engine.tokenizer is None:
                raise QwenlabError(f"{self.config.model}: the server needs a tokenizer (tokenizer.json)")
            worker = EngineLoop(engine, loop)
            worker.start()
        except Exception as exc:  # noqa: BLE001 - reported on /health and by the CLI
            message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, QwenlabError) else str(exc)
            logger.error("loading the model failed: %s", message)
            self.load_error = message
            if self.on_load_failure is not None:
                loop.call_soon_threadsafe(self.on_load_failure, message)
            return
        self.engine, self.loop_ = engine, worker
        logger.info("model %s ready (max_model_len %d)", self.config.model_name, engine.max_model_len)

    async def shutdown(self) -> None:
        if self.loop_ is not None:
            await asyncio.to_thread(self.loop_.shutdown)

    @property
    def ready(self) -> bool:
        return self.loop_ is not None

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}")
        if not self.ready:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})

    # ---- checks ---------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def check_token_ids(self, ids, param: str) -> None:
        vocab = self.vocab_size
        for token in ids:
            if not 0 <= token < vocab:
                raise APIError(400, f"token id {token} is outside the vocabulary (0..{vocab - 1})", param=param)

    def check_context(self, num_prompt: int, max_tokens: int | None, param: str) -> None:
        limit = self.engine.max_model_len
        if num_prompt >= limit:
            raise APIError(400, f"request ({num_prompt} tokens) exceeds the available context size ({limit} tokens); "
                                f"at least one token must be left to generate", param=param,
                           code="context_length_exceeded")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise APIError(400, f"request ({num_prompt} prompt tokens + {max_tokens} max_tokens = "
                                f"{num_prompt + max_tokens} tokens) exceeds the available context size ({limit} "
                                f"tokens)", param="max_tokens", code="context_length_exceeded")

    @property
    def capacity(self) -> int:
        return self.engine.max_num_seqs + self.config.max_queue

    def admit(self, num_seqs: int) -> None:
        if num_seqs > self.capacity:
            raise APIError(400, f"the request needs {num_seqs} sequences; this server holds at most {self.capacity} "
                                f"(max_num_seqs {self.engine.max_num_seqs} + max_queue {self.config.max_queue})",
                           param="n")
        if self.admitted + num_seqs > self.capacity:
            self.metrics.rejected_queue_full += 1
            raise APIError(429, f"the server is busy: {self.admitted} sequences running or queued, at most "
                                f"{self.capacity}; retry later", code="queue_full", headers={"Retry-After": "1"})
        self.admitted += num_seqs


# ---- one HTTP request's engine requests ------------------------------------------------------------------
@dataclass
class ChoiceState:
    index: int
    token_count: int = 0
    logprob_count: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished: bool = False


class Job:
    """The engine requests (one per prompt) behind one HTTP request, and their cleanup."""

    def __init__(self, server: Server, base_id: str, n: int, arrival: float):
        self.server, self.base_id, self.n, self.arrival = server, base_id, n, arrival
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished: set[str] = set()
        self.admitted = 0
        self.first_token_seen = False
        self.closed = False

    def reserve(self, num_prompts: int) -> None:
        """Admission against the bounded queue (429 when full); given back by close()."""
        self.server.admit(num_prompts * self.n)
        self.admitted = num_prompts * self.n

    async def start(self, prompts: list[list[int]], params, logit_bias, forced) -> None:
        for i, ids in enumerate(prompts):
            request_id = f"{self.base_id}-{i}"
            self.unfinished.add(request_id)
            try:
                await self.server.loop_.add(request_id, ids, params, self.queue, i, logit_bias, forced)
            except QwenlabError as exc:  # RequestError: the engine's own checks
                raise APIError(400, str(exc)) from None

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        """(prompt index, RequestOutput) until every prompt finished; raises APIError(500) on engine failure."""
        while self.unfinished:
            prompt_index, item = await self.queue.get()
            if isinstance(item, EngineFailure):
                self.unfinished.clear()
                raise APIError(500, item.message, code="engine_error")
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield prompt_index, item

    def observe(self, choice: ChoiceState, completion) -> None:
        """Token timing for /metrics."""
        new = len(completion.token_ids) - choice.token_count
        if new <= 0:
            return
        now = time.monotonic()
        m = self.server.metrics
        if not self.first_token_seen:
            self.first_token_seen = True
            m.ttft.observe(now - self.arrival)
        if choice.last_token_at is not None:
            m.itl.observe((now - choice.last_token_at) / new)
        choice.last_token_at = now
        choice.token_count = len(completion.token_ids)

    def close(self) -> bool:
        """Abort what is unfinished and give back the admission; True if something had to be aborted."""
        if self.closed:
            return False
        self.closed = True
        self.server.admitted -= self.admitted
        aborted = bool(self.unfinished)
        for request_id in self.unfinished:
            self.server.loop_.abort(request_id)
        self.unfinished.clear()
        if self.admitted:
            self.server.metrics.e2e.observe(time.monotonic() - self.arrival)
        return aborted


# ---- helpers -----------------------------------------------------------------------------------------------
def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(exc: APIError) -> Response:
    return json_response(exc.body(), exc.status, exc.headers)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def read_json(request: Request, cap: int) -> dict:
    """The body as a JSON object, refusing bodies over ``cap`` bytes with 413."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(length) > cap:
            await _drain(request, int(length))
            raise APIError(413, f"the request body ({int(length)} bytes) is over this server's limit ({cap} bytes)",
                           code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            await _drain(request, 64 * cap)
            raise APIError(413, f"the request body is over this server's limit ({cap} bytes)", code="body_too_large")
        chunks.append(chunk)
    return parse_body(b"".join(chunks))


async def _drain(request: Request, limit: int) -> None:
    """Read (and drop) a refused body so the client, still sending it, receives the answer cleanly."""
    if limit > 256 * MiB:
        return
    try:
        async for _ in request.stream():
            pass
    except Exception:  # noqa: BLE001 - the client may give up first
        pass


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    try:
        raw = tokenizer.token_bytes(token_id)
    except Exception:  # noqa: BLE001 - ids past the tokenizer's table (embedding padding)
        raw = b""
    return raw.decode("utf-8", errors="replace"), list(raw)


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- the app ---------------------------------------------------------------------------------------------
def create_app(config: ServerConfig, engine_factory: Callable[[], object] | None = None) -> Starlette:
    server = Server(config, engine_factory)
    routes = Routes(server)
    app = Starlette(
        routes=[
            Route("/health", routes.handler("health", routes.health, auth=False, ready=False), methods=["GET"]),
            Route("/metrics", routes.handler("metrics", routes.metrics, auth=False, ready=False), methods=["GET"]),
            Route("/v1/models", routes.handler("models", routes.models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", routes.handler("model", routes.model), methods=["GET"]),
            Route("/v1/chat/completions", routes.handler("chat", routes.chat), methods=["POST"]),
            Route("/v1/completions", routes.handler("completions", routes.completions), methods=["POST"]),
            Route("/tokenize", routes.handler("tokenize", routes.tokenize), methods=["POST"]),
            Route("/detokenize", routes.handler("detokenize", routes.detokenize), methods=["POST"]),
        ],
        exception_handlers={HTTPException: _http_exception, Exception: _internal_error},
        lifespan=_lifespan(server),
    )
    app.state.server = server
    return app


def _lifespan(server: Server):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    return lifespan


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        message = f"no route {request.url.path!r}; see /v1/models, /v1/chat/completions, /v1/completions"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = exc.detail or "error"
    return json_response(error_body(exc.status_code, message), exc.status_code, getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("internal error on %s", request.url.path, exc_info=exc)
    return json_response(error_body(500, f"internal error: {type(exc).__name__}"), 500)


class Routes:
    def __init__(self, server: Server):
        self.server = server

    def handler(self, name: str, func, auth: bool = True, ready: bool = True):
        server = self.server

        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    server.authorize(request)
                if ready:
                    server.require_ready()
                response = await func(request)
            except APIError as exc:
                response = error_response(exc)
            except Exception as exc:  # noqa: BLE001 - one request's bug must not look like a dead server
                logger.exception("internal error in %s", name)
                response = json_response(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), 500)
            server.metrics.count_response(name, response.status_code)
            return response

        return endpoint

    # ---- plain routes --------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        self.server.require_ready()
        return json_response({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        s = self.server
        text = s.metrics.render(s.loop_.stats if s.loop_ else {}, _label(s.config.model_name), s.admitted)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card(self) -> dict:
        s = self.server
        return {"id": s.config.model_name, "object": "model", "created": s.created, "owned_by": "qwenlab",
                "root": s.config.model, "max_model_len": s.engine.max_model_len}

    async def models(self, request: Request) -> Response:
        return json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self.server.check_model(request.path_params["model_id"])
        return json_response(self._model_card())

    async def tokenize(self, request: Request) -> Response:
        s = self.server
        req = validate(TokenizeRequest, await read_json(request, s.config.max_body_bytes))
        s.check_model(req.model)
        tok = s.engine.tokenizer
        if req.prompt is not None:
            ids = await asyncio.to_thread(tok.encode, req.prompt)
        else:
            text = await asyncio.to_thread(render_chat, tok, req.messages, req.tools, req.chat_template_kwargs,
                                           req.add_generation_prompt)
            ids = await asyncio.to_thread(tok.encode, text)
        body = {"count": len(ids), "max_model_len": s.engine.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = tok.convert_ids_to_tokens(ids)
        return json_response(body)

    async def detokenize(self, request: Request) -> Response:
        s = self.server
        req = validate(DetokenizeRequest, await read_json(request, s.config.max_body_bytes))
        s.check_model(req.model)
        s.check_token_ids(req.tokens, "tokens")
        return json_response({"prompt": s.engine.tokenizer.decode(req.tokens)})

    # ---- generation ----------------------------------------------------------------------------------
    def _common(self, req) -> tuple[dict | None, Forced | None]:
        """logit_bias as {id: value}, the test hook, and vocabulary checks shared by both endpoints."""
        s = self.server
        bias = None
        if req.logit_bias:
            bias = {int(k): v for k, v in req.logit_bias.items()}
            s.check_token_ids(bias, "logit_bias")
        if req.stop_token_ids:
            s.check_token_ids(req.stop_token_ids, "stop_token_ids")
        forced = None
        if req.qwenlab_test is not None:
            if not s.config.test_hooks:
                raise APIError(400, "qwenlab_test: unknown field (not supported by this server)", param="qwenlab_test")
            t = req.qwenlab_test
            ids = s.engine.tokenizer.encode(t.text) if t.text is not None else None
            forced = Forced(ids, s.engine.end_token_ids[0] if s.engine.end_token_ids else None, t.fail_after_tokens)
        return bias, forced

    async def chat(self, request: Request) -> Response:
        s = self.server
        arrival = time.monotonic()
        req = validate(ChatCompletionRequest, await read_json(request, s.config.max_body_bytes))
        s.check_model(req.model)
        bias, forced = self._common(req)
        job = Job(s, new_id("chatcmpl"), req.n, arrival)
        job.reserve(1)  # before any work: a full server answers 429 cheaply
        try:
            choice = req.effective_tool_choice()
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and choice != "none" else None
            prompt_text = await asyncio.to_thread(render_chat, s.engine.tokenizer, req.messages, tools,
                                                  req.chat_template_kwargs, True)
            thinking = thinking_mode(prompt_text)
            prefill = tool_prefill(choice, thinking)
            ids = await asyncio.to_thread(s.engine.tokenizer.encode, prompt_text + prefill)
            max_tokens = req.max_new_tokens()
            s.check_context(len(ids), max_tokens, "messages")
            params = sampling_params(req, max_tokens, req.num_logprobs(), thinking_budget=req.thinking_budget)
            run = ChatRun(s, job, req, thinking, tools is not None, prefill, len(ids))
            await job.start([ids], params, bias, forced)
        except BaseException:
            job.close()
            raise
        if req.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream", headers=SSE_HEADERS)
        return await gather_or_abort(request, job, run.collect())

    async def completions(self, request: Request) -> Response:
        s = self.server
        arrival = time.monotonic()
        req = validate(CompletionRequest, await read_json(request, s.config.max_body_bytes))
        s.check_model(req.model)
        bias, forced = self._common(req)
        prompts = req.prompts()
        job = Job(s, new_id("cmpl"), req.n, arrival)
        job.reserve(len(prompts))
        try:
            tok = s.engine.tokenizer
            ids_list, texts = [], []
            for p in prompts:
                if isinstance(p, str):
                    ids_list.append(await asyncio.to_thread(tok.encode, p))
                    texts.append(p)
                else:
                    s.check_token_ids(p, "prompt")
                    ids_list.append(list(p))
                    texts.append(tok.decode(p) if req.echo else "")
            for ids in ids_list:
                if not ids:
                    raise APIError(400, "prompt must not be empty", param="prompt")
                s.check_context(len(ids), req.max_tokens, "prompt")
            params = sampling_params(req, req.max_tokens, req.logprobs)
            run = CompletionRun(s, job, req, ids_list, texts)
            await job.start(ids_list, params, bias, forced)
        except BaseException:
            job.close()
            raise
        if req.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream", headers=SSE_HEADERS)
        return await gather_or_abort(request, job, run.collect())


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


async def gather_or_abort(request: Request, job: Job, work) -> Response:
    """Run a non-streamed request to its end, aborting it (and freeing its blocks) if the client leaves."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        job.server.metrics.aborted_disconnect += 1
        return Response(status_code=499)  # nobody is listening
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        job.close()


# ---- prompts and parameters --------------------------------------------------------------------------------
def render_chat(tokenizer, messages, tools, template_kwargs, add_generation_prompt: bool) -> str:
    dicts = [m.model_dump(exclude_none=True) for m in messages]
    for m in dicts:
        if m["role"] == "developer":  # OpenAI's newer name for the system role; Qwen templates know "system"
            m["role"] = "system"
    if tools and not isinstance(tools[0], dict):
        tools = [t.model_dump(exclude_none=True) for t in tools]
    try:
        return tokenizer.apply_chat_template(dicts, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                             parse_tool_arguments=True, **(template_kwargs or {}))
    except QwenlabError as exc:
        raise APIError(400, f"messages: {exc}", param="messages") from None


def tool_prefill(choice, thinking: str) -> str:
    """Text appended to the prompt so the model must answer with a tool call (tool_choice required / named).

    There is no grammar engine yet, so the opening of the Hermes block is written for the model: with
    "required" up to the function name's opening quote, with a named function up to its arguments. The
    prefill is parsed as the start of the output. A prompt left inside <think> is closed first.
    """
    if choice in ("none", "auto"):
        return ""
    close = "</think>\n\n" if thinking == "started" else ""
    if isinstance(choice, NamedToolChoice):
        return f'{close}<tool_call>\n{{"name": {json.dumps(choice.function.name)}, "arguments": '
    return f'{close}<tool_call>\n{{"name": "'


def sampling_params(req, max_tokens: int | None, logprobs: int | None, thinking_budget: int | None = None):
    from ..engine import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop_list() or None,
        stop_token_ids=list(req.stop_token_ids or []) or None, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        n=req.n, logprobs=logprobs, thinking_budget=thinking_budget, skip_special_tokens=req.skip_special_tokens)


def finish_reason(engine_reason: str | None, has_tool_calls: bool) -> str | None:
    if engine_reason == "stop" and has_tool_calls:
        return "tool_calls"
    return engine_reason


# ---- chat completions ----------------------------------------------------------------------------------------
class ChatRun:
    def __init__(self, server: Server, job: Job, req: ChatCompletionRequest, thinking: str, tools: bool,
                 prefill: str, num_prompt: int):
        self.server, self.job, self.req = server, job, req
        self.thinking, self.tools, self.prefill, self.num_prompt = thinking, tools, prefill, num_prompt
        self.created = int(time.time())
        self.model = server.config.model_name
        self.choices = [ChoiceState(i) for i in range(req.n)]

    def _logprob_entries(self, logprobs) -> list[dict]:
        tok = self.server.engine.tokenizer
        entries = []
        for lp in logprobs:
            if lp is None:  # a token the engine inserted itself (thinking budget)
                continue
            text, raw = token_text(tok, lp.token_id)
            top = []
            for token_id, value in lp.top_logprobs:
                t, b = token_text(tok, token_id)
                top.append({"token": t, "logprob": finite_logprob(value), "bytes": b})
            entries.append({"token": text, "logprob": finite_logprob(lp.logprob), "bytes": raw, "top_logprobs": top})
        return entries

    def _limit_calls(self, calls: list) -> list:
        return calls[:1] if not self.req.parallel_tool_calls else calls

    async def collect(self) -> Response:
        from ..parsing import parse_output

        finals: dict[int, object] = {}
        cached = 0
        async for _, out in self.job.events():
            cached = out.num_cached_tokens
            for completion in out.outputs:
                self.job.observe(self.choices[completion.index], completion)
                if completion.finish_reason is not None:
                    finals[completion.index] = completion
        choices, completion_tokens = [], 0
        for index in range(self.req.n):
            c = finals[index]
            parsed = parse_output(self.prefill + c.text, thinking=self.thinking, tools=self.tools)
            calls = self._limit_calls(parsed.tool_calls)
            content = parsed.content
            if content is None and parsed.reasoning_content is None and not calls:
                content = ""  # nothing was generated (e.g. a stop string at once): OpenAI answers ""
            message = {"role": "assistant", "content": content, "reasoning_content": parsed.reasoning_content}
            if calls:
                message["tool_calls"] = [call.to_openai() for call in calls]
            reason = finish_reason(c.finish_reason, bool(calls))
            self.server.metrics.finished[reason] = self.server.metrics.finished.get(reason, 0) + 1
            logprobs = {"content": self._logprob_entries(c.logprobs)} if c.logprobs is not None else None
            choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason,
                            "stop_reason": c.stop_reason})
            completion_tokens += len(c.token_ids)
        return json_response({"id": self.job.base_id, "object": "chat.completion", "created": self.created,
                              "model": self.model, "choices": choices,
                              "usage": usage(self.num_prompt, completion_tokens, cached)})

    def _chunk(self, choices: list[dict], usage_: dict | None = None, with_usage: bool = False) -> str:
        body = {"id": self.job.base_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices}
        if with_usage:
            body["usage"] = usage_
        return sse(body)

    async def stream(self) -> AsyncIterator[str]:
        from ..parsing import StreamParser

        opts = self.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        parsers = [StreamParser(self.thinking, tools=self.tools) for _ in range(self.req.n)]
        pending_logprobs: list[list] = [[] for _ in range(self.req.n)]
        calls_seen: list[set] = [set() for _ in range(self.req.n)]
        has_calls = [False] * self.req.n
        completion_tokens = [0] * self.req.n
        want_logprobs = self.req.logprobs
        finished_ok = False

        def running_usage():
            return usage(self.num_prompt, sum(completion_tokens)) if continuous else None

        try:
            for i in range(self.req.n):
                first = {"role": "assistant", "content": ""}
                yield self._chunk([{"index": i, "delta": first, "logprobs": None, "finish_reason": None}],
                                  None, include_usage)
            for i, parser in enumerate(parsers):  # the prefill belongs to the output
                if self.prefill:
                    for delta in parser.feed(self.prefill):
                        self._note_call(delta, calls_seen[i], has_calls, i)
            async for _, out in self.job.events():
                for c in out.outputs:
                    state = self.choices[c.index]
                    if state.finished:
                        continue
                    self.job.observe(state, c)
                    completion_tokens[c.index] = len(c.token_ids)
                    if want_logprobs and c.logprobs is not None:
                        pending_logprobs[c.index] += c.logprobs[state.logprob_count:]
                        state.logprob_count = len(c.logprobs)
                    parser = parsers[c.index]
                    deltas = parser.feed(c.delta_text) if c.delta_text else []
                    if c.finish_reason is not None:
                        deltas += parser.finish()
                    for delta in deltas:
                        payload = self._delta_payload(delta, calls_seen[c.index], has_calls, c.index)
                        if payload is None:
                            continue
                        lp = self._take_logprobs(pending_logprobs, c.index)
                        yield self._chunk([{"index": c.index, "delta": payload, "logprobs": lp,
                                            "finish_reason": None}], running_usage(), include_usage)
                    if c.finish_reason is not None:
                        state.finished = True
                        reason = finish_reason(c.finish_reason, has_calls[c.index])
                        self.server.metrics.finished[reason] = self.server.metrics.finished.get(reason, 0) + 1
                        lp = self._take_logprobs(pending_logprobs, c.index)
                        yield self._chunk([{"index": c.index, "delta": {}, "logprobs": lp, "finish_reason": reason,
                                            "stop_reason": c.stop_reason}], running_usage(), include_usage)
                    elif pending_logprobs[c.index] and len(pending_logprobs[c.index]) > 16:
                        lp = self._take_logprobs(pending_logprobs, c.index)  # text held back: do not hoard
                        yield self._chunk([{"index": c.index, "delta": {}, "logprobs": lp, "finish_reason": None}],
                                          running_usage(), include_usage)
            if include_usage:
                yield self._chunk([], usage(self.num_prompt, sum(completion_tokens), 0), True)
            finished_ok = True
        except APIError as exc:
            yield sse(exc.body())
        finally:
            if not finished_ok and not self.job.closed and self.job.unfinished:
                self.server.metrics.aborted_disconnect += 1
            self.job.close()
        yield "data: [DONE]\n\n"

    def _note_call(self, delta, seen: set, has_calls: list, index: int) -> None:
        if delta.tool_call is not None:
            seen.add(delta.tool_call.index)
            has_calls[index] = True

    def _delta_payload(self, delta, seen: set, has_calls: list, index: int) -> dict | None:
        if delta.tool_call is not None:
            if not self.req.parallel_tool_calls and delta.tool_call.index > 0:
                return None
            self._note_call(delta, seen, has_calls, index)
        return delta.to_openai()

    def _take_logprobs(self, pending: list[list], index: int) -> dict | None:
        if not self.req.logprobs:
            return None
        entries = self._logprob_entries(pending[index])
        pending[index] = []
        return {"content": entries}


# ---- completions ---------------------------------------------------------------------------------------------
class CompletionRun:
    def __init__(self, server: Server, job: Job, req: CompletionRequest, prompts: list[list[int]], texts: list[str]):
        self.server, self.job, self.req = server, job, req
        self.prompts, self.texts = prompts, texts
        self.created = int(time.time())
        self.model = server.config.model_name
        n = req.n
        self.choices = [ChoiceState(p * n + i) for p in range(len(prompts)) for i in range(n)]

    def _logprobs(self, logprobs: list, offset: int) -> dict:
        tok = self.server.engine.tokenizer
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in logprobs:
            if lp is None:
                continue
            text, _ = token_text(tok, lp.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(finite_logprob(lp.logprob))
            out["top_logprobs"].append({token_text(tok, t)[0]: finite_logprob(v) for t, v in lp.top_logprobs})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def _echo(self, prompt_index: int) -> str:
        return self.texts[prompt_index] if self.req.echo else ""

    async def collect(self) -> Response:
        n = self.req.n
        finals: dict[int, object] = {}
        cached = 0
        async for p, out in self.job.events():
            cached += out.num_cached_tokens if out.finished else 0
            for c in out.outputs:
                self.job.observe(self.choices[p * n + c.index], c)
                if c.finish_reason is not None:
                    finals[p * n + c.index] = c
        choices, completion_tokens = [], 0
        for index in range(len(self.prompts) * n):
            c = finals[index]
            prefix = self._echo(index // n)
            self.server.metrics.finished[c.finish_reason] = self.server.metrics.finished.get(c.finish_reason, 0) + 1
            logprobs = self._logprobs(c.logprobs, len(prefix)) if c.logprobs is not None else None
            choices.append({"index": index, "text": prefix + c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            completion_tokens += len(c.token_ids)
        prompt_tokens = sum(len(p) for p in self.prompts)
        return json_response({"id": self.job.base_id, "object": "text_completion", "created": self.created,
                              "model": self.model, "choices": choices,
                              "usage": usage(prompt_tokens, completion_tokens, cached)})

    def _chunk(self, choices: list[dict], usage_: dict | None, with_usage: bool) -> str:
        body = {"id": self.job.base_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}
        if with_usage:
            body["usage"] = usage_
        return sse(body)

    async def stream(self) -> AsyncIterator[str]:
        n = self.req.n
        opts = self.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = [0] * len(self.choices)
        offsets = [len(self._echo(i // n)) for i in range(len(self.choices))]
        finished_ok = False

        def running_usage():
            return usage(prompt_tokens, sum(completion_tokens)) if continuous else None

        try:
            if self.req.echo:
                for i in range(len(self.choices)):
                    yield self._chunk([{"index": i, "text": self._echo(i // n), "logprobs": None,
                                        "finish_reason": None}], running_usage(), include_usage)
            async for p, out in self.job.events():
                for c in out.outputs:
                    index = p * n + c.index
                    state = self.choices[index]
                    if state.finished:
                        continue
                    self.job.observe(state, c)
                    completion_tokens[index] = len(c.token_ids)
                    logprobs = None
                    if c.logprobs is not None:
                        new = c.logprobs[state.logprob_count:]
                        state.logprob_count = len(c.logprobs)
                        logprobs = self._logprobs(new, offsets[index])
                    if not (c.delta_text or c.finish_reason or (logprobs and logprobs["tokens"])):
                        continue
                    offsets[index] += len(c.delta_text)
                    if c.finish_reason is not None:
                        state.finished = True
                        self.server.metrics.finished[c.finish_reason] = (
                            self.server.metrics.finished.get(c.finish_reason, 0) + 1)
                    choice = {"index": index, "text": c.delta_text, "logprobs": logprobs,
                              "finish_reason": c.finish_reason}
                    if c.finish_reason is not None:
                        choice["stop_reason"] = c.stop_reason
                    yield self._chunk([choice], running_usage(), include_usage)
            if include_usage:
                yield self._chunk([], usage(prompt_tokens, sum(completion_tokens)), True)
            finished_ok = True
        except APIError as exc:
            yield sse(exc.body())
        finally:
            if not finished_ok and not self.job.closed and self.job.unfinished:
                self.server.metrics.aborted_disconnect += 1
            self.job.close()
        yield "data: [DONE]\n\n"
