"""The HTTP boundary: OpenAI request bodies as strict pydantic models, and errors in OpenAI's shape.

Every field is type-checked without coercion (``"5"`` is not an integer, ``true`` is not a number), every
number is finite and in range, unknown fields are refused (a typo is an error, not a silent default), and
each failure becomes an ``APIError`` whose ``param`` names the field. Nothing a client sends reaches the
engine before it passes here; the engine's own ``SamplingParams.validate`` is a second line.

A request can never carry a chat template: there is no field for one, and ``chat_template_kwargs`` may
not name one.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_N = 16  # completions per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
MAX_STOP = 16
MAX_STOP_LENGTH = 1024
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128
MAX_MESSAGES = 4096
INT64 = 2**63

# ---- errors -------------------------------------------------------------------------------------------
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else status}}


def validation_error(exc: ValidationError) -> APIError:
    """The most specific pydantic error as one readable 400 naming its field."""
    errors = exc.errors(include_url=False)
    first = max(errors, key=lambda e: (len(e["loc"]), e["type"] != "missing"))  # deepest: the branch that fit
    loc = _field_path(first["loc"])
    param = ".".join(loc) or None
    message = first["msg"].removeprefix("Value error, ")
    ctx = first.get("ctx", {})
    if first["type"] == "extra_forbidden":
        message = "unknown field (not supported by this server)"
    elif first["type"] == "union_tag_invalid":
        message = (f"unknown {ctx.get('discriminator', 'tag').strip(chr(39))} {ctx.get('tag')!r}; "
                   f"expected one of {ctx.get('expected_tags')}")
    elif first["type"] == "union_tag_not_found":
        message = f"missing {ctx.get('discriminator', 'tag').strip(chr(39))}"
    value = first.get("input")
    if first["type"] not in ("missing", "extra_forbidden", "union_tag_not_found") and _short(value):
        message += f" (got {json.dumps(value)[:80]})"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def _field_path(loc) -> list[str]:
    """pydantic's location without the union-member labels it inserts (``list[int]``, ``user`` after an index)."""
    out: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "float", "bool")):
            continue
        if isinstance(part, str) and part in ROLES and i > 0 and isinstance(loc[i - 1], int):
            continue
        out.append(str(part))
    return out


def _short(value) -> bool:
    try:
        return len(json.dumps(value)) <= 80 and not isinstance(value, dict)
    except (TypeError, ValueError):
        return False


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object (400 otherwise). NaN/Infinity literals parse; fields reject them."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def validate(model: type[BaseModel], data: dict) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


# ---- field types --------------------------------------------------------------------------------------
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Finite = Annotated[float, Field(allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-INT64, lt=INT64)]
TokenId = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]],
                     Field(min_length=1, max_length=MAX_STOP)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)] | StopList


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk


class TestForce(Strict):
    """Test-only (``qwenlab serve --test-hooks``): force the output, or fail the engine step, for this request."""

    text: str | None = None  # the completion is these tokens, then the end token
    fail_after_tokens: Annotated[int, Field(ge=0)] | None = None  # raise inside the engine step after k tokens


class SamplingFields(Strict):
    """Sampling fields shared by chat and completions (OpenAI's, then vLLM's extras for Qwen)."""

    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: Stop | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    skip_special_tokens: bool = True
    qwenlab_test: TestForce | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value):
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key in value:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids written as non-negative integers, got {key!r}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# ---- chat messages --------------------------------------------------------------------------------------
ROLES = ("system", "developer", "user", "assistant", "tool")


class TextPart(Strict):
    type: Literal["text"]
    text: str


Content = Annotated[str, Field(max_length=2**24)] | Annotated[list[TextPart], Field(min_length=1)]


class FunctionCall(Strict):
    name: Name
    arguments: str


class ToolCallIn(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(Strict):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    reasoning_content: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _something_said(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionDef(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(Strict):
    type: Literal["text"]


FORBIDDEN_TEMPLATE_KWARGS = ("chat_template", "messages", "tools", "add_generation_prompt", "documents")


def _check_template_kwargs(value: dict | None) -> dict | None:
    if value is None:
        return value
    for key in value:
        if key in FORBIDDEN_TEMPLATE_KWARGS:
            raise ValueError(f"{key!r} may not be set (a request cannot supply its own template or "
                             f"override its messages)")
    if "enable_thinking" in value and not isinstance(value["enable_thinking"], bool):
        raise ValueError("enable_thinking must be true or false")
    return value


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: Annotated[int, Field(ge=0)] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value):
        return _check_template_kwargs(value)

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice 'required' or a named function needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, "
                                 f"which is not among the tools {names}")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def effective_tool_choice(self) -> str | NamedToolChoice:
        if not self.tools:
            return "none"
        return self.tool_choice if self.tool_choice is not None else "auto"


# ---- completions ------------------------------------------------------------------------------------------
class CompletionRequest(SamplingFields):
    prompt: Any  # str | list[str] | list[int] | list[list[int]]; checked by prompts()
    max_tokens: PositiveInt | None = 16  # OpenAI's default for /v1/completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveInt | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs needs prompt logprobs, which this server does not compute")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as texts and token-id lists (raises APIError for any other shape)."""
        p = self.prompt
        if isinstance(p, str):
            out = [p]
        elif isinstance(p, list) and p and all(_is_int(x) for x in p):
            out = [p]
        elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            out = list(p)
        elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            out = list(p)
        else:
            raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                                "lists of token ids (none empty)", param="prompt")
        if len(out) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(out)}", param="prompt")
        for item in out:
            if isinstance(item, str) and not item:
                raise APIError(400, "prompt must not be empty", param="prompt")
        return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- tokenize / detokenize ------------------------------------------------------------------------------
class TokenizeRequest(Strict):
    model: str | None = None
    prompt: Annotated[str, Field(max_length=2**24)] | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = True  # accepted for vLLM compatibility; Qwen adds none
    return_token_strs: bool = False

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value):
        return _check_template_kwargs(value)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: Annotated[list[TokenId], Field(max_length=2**20)]


def finite_logprob(value: float) -> float:
    """JSON has no -Infinity; OpenAI-compatible servers report impossible tokens as -9999.0."""
    return value if math.isfinite(value) else -9999.0
