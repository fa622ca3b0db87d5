"""Parse what a Qwen model generates into OpenAI's reasoning_content / content / tool_calls.

Qwen writes its thinking as ``<think>\\n…\\n</think>\\n\\n`` before the answer, and tool calls Hermes-style::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Finished text::

    out = parse_output(text, thinking="auto", tools=True)
    out.reasoning_content, out.content, out.tool_calls   # str | None, str | None, list[ToolCall]
    out.to_message()                                     # an OpenAI assistant message dict

Streaming (feed text deltas, e.g. from ``IncrementalDetokenizer``)::

    parser = StreamParser(thinking="auto", tools=True)
    for piece in pieces:
        for delta in parser.feed(piece):                 # list[Delta]
            send(delta.to_openai())                      # {"content": …} / {"reasoning_content": …} / {"tool_calls": […]}
    deltas = parser.finish()                             # flushes what was held back
    parser.result()                                      # ParsedOutput of everything streamed

Each ``Delta`` carries exactly one of ``reasoning_content``, ``content`` or ``tool_call``. A tool call
streams as OpenAI streams it: first a ``ToolCallDelta`` with ``index``, ``id`` ("call_<hex>") and
``name`` (and ``arguments=""``), then deltas of the same ``index`` with argument text only.

Typical use in an engine or server: render the prompt, derive the thinking state from it, and feed the
parser the detokenizer's deltas (``skip_special_tokens=True`` is fine: <think> and <tool_call> are not
special tokens; the stop token itself should not be fed)::

    prompt = tokenizer.apply_chat_template(messages, tools=tools, enable_thinking=enable_thinking)
    parser = StreamParser(thinking_mode(prompt), tools=bool(tools) and tool_choice != "none")
    detok = tokenizer.incremental_detokenizer(skip_special_tokens=True)
    for token_id in generated:                            # without the final eos id
        deltas = parser.feed(detok.add(token_id))
    deltas = parser.feed(detok.finish()) + parser.finish()

The parser must know the request's thinking state (``thinking``); ``thinking_mode(prompt)`` reads it from
the rendered prompt:

* ``"auto"``: the model may open ``<think>`` itself (Qwen3's default prompt). Output that does not start
  with ``<think>`` (after optional whitespace) is all content.
* ``"started"``: the prompt already opened ``<think>`` (e.g. Qwen3-Thinking-2507), so the output is
  reasoning until ``</think>``.
* ``"off"``: thinking disabled (``enable_thinking=False``, whose prompt ends with an empty think
  block, or Qwen2.5): everything is content.

Rules (identical for finished text and streams):

* reasoning_content is the text between the think tags without its leading/trailing newlines; if the
  output ends before ``</think>`` (truncated), everything is reasoning and content is None. Content after
  ``</think>`` loses its leading newlines. A field with no text is None.
* With ``tools=True``, each ``<tool_call>…</tool_call>`` block whose body is a JSON object with a
  non-empty string ``name`` becomes a tool call; ``arguments`` is the model's own text of the
  arguments object (re-serialised only if it came before the name; the string itself if the model gave a
  string; "{}" if none). Missing or extra closing braces after the
  arguments are forgiven; a block that is not JSON stays in the text, verbatim, and nothing raises.
  A second ``<tool_call>`` before ``</tool_call>`` closes the first. An unclosed block at the very end
  counts if its JSON is complete.
* A tool call inside the thinking (before ``</think>``) is still a tool call; the text around it stays
  reasoning. Whitespace around tool calls is dropped (the run before a call is kept as a separator
  when text continues after the call).
* With ``tools=False``, tool-call markup is ordinary text.

``parse_output`` and ``StreamParser`` share one state machine, so their results agree however the text
is split. One exception, inherent to streaming: by default a stream announces a tool call as soon as
``{"name": "…", "arguments": {`` is complete and then streams the arguments, so if the rest of that
block turns out not to be JSON (or the output is cut off inside it) the stream keeps the call with the
argument text it sent, while ``parse_output`` leaves the block in content. ``StreamParser(...,
stream_tool_arguments=False)`` holds each tool call until its block closes and then agrees always.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

THINK_START, THINK_END = "<think>", "</think>"
TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
ThinkingMode = Literal["auto", "started", "off"]
THINKING_MODES = ("auto", "started", "off")
_JSON_WS = " \t\n\r"
_JSON_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"')
_JSON_STRING_PREFIX = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*\\?')
_DECODER = json.JSONDecoder()


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id: 'call_' and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


def thinking_mode(prompt: str) -> ThinkingMode:
    """The thinking state a rendered prompt leaves the model in, from its last turn (the generation prompt)."""
    tail = prompt[max(prompt.rfind("<|im_start|>"), 0):]  # a prompt without ChatML turns counts as one turn
    opened = tail.rfind(THINK_START)
    if opened < 0:
        return "auto"
    return "off" if tail.rfind(THINK_END) > opened else "started"


# ---- results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str | None = None  # set on the first delta of a call, with name
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        out: dict = {"index": self.index}
        if self.id is not None:
            out.update(id=self.id, type="function", function={"name": self.name, "arguments": self.arguments})
        else:
            out["function"] = {"arguments": self.arguments}
        return out


@dataclass(frozen=True)
class Delta:
    reasoning_content: str | None = None
    content: str | None = None
    tool_call: ToolCallDelta | None = None

    def to_openai(self) -> dict:
        """The ``delta`` object of an OpenAI chat.completion.chunk choice."""
        if self.tool_call is not None:
            return {"tool_calls": [self.tool_call.to_openai()]}
        if self.reasoning_content is not None:
            return {"reasoning_content": self.reasoning_content}
        return {"content": self.content}


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_message(self) -> dict:
        """An OpenAI assistant message (``reasoning_content`` and ``tool_calls`` only when present)."""
        message: dict = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return message


def collect(deltas: Iterable[Delta]) -> ParsedOutput:
    """Join streamed deltas into the message they add up to."""
    content, reasoning, calls = [], [], {}
    for delta in deltas:
        if delta.tool_call is not None:
            call = delta.tool_call
            entry = calls.setdefault(call.index, {"id": call.id, "name": call.name, "arguments": []})
            entry["arguments"].append(call.arguments)
        elif delta.reasoning_content is not None:
            reasoning.append(delta.reasoning_content)
        elif delta.content is not None:
            content.append(delta.content)
    tool_calls = [ToolCall(c["id"], c["name"], "".join(c["arguments"])) for _, c in sorted(calls.items())]
    return ParsedOutput("".join(content) or None, "".join(reasoning) or None, tool_calls)


def parse_output(text: str, thinking: ThinkingMode = "auto", tools: bool = False,
                 new_id: Callable[[], str] = new_tool_call_id) -> ParsedOutput:
    """Parse finished model output (see the module docstring for the rules)."""
    parser = StreamParser(thinking, tools, stream_tool_arguments=False, new_id=new_id)
    parser.feed(text)
    parser.finish()
    return parser.result()


# ---- tool-call JSON -------------------------------------------------------------------------------
_HEADER = ("{", '"name"', ":", None, ",", '"arguments"', ":", "{")  # None: the name string
_PARTIAL, _FAIL = "partial", "fail"


def _match_header(body: str) -> tuple[str, str | None, int]:
    """Match ``{"name": "<name>", "arguments": {`` at the start of ``body``.

    Returns ("match", name, index of the arguments' "{"), or ("partial", None, 0) while more text could
    still complete it, or ("fail", None, 0).
    """
    i, n, name = 0, len(body), None
    for expected in _HEADER:
        while i < n and body[i] in _JSON_WS:
            i += 1
        if i == n:
            return _PARTIAL, None, 0
        if expected is None:
            string = _JSON_STRING.match(body, i)
            if string is None:
                return (_PARTIAL, None, 0) if _JSON_STRING_PREFIX.fullmatch(body, i) else (_FAIL, None, 0)
            try:
                name = json.loads(string.group())
            except json.JSONDecodeError:
                return _FAIL, None, 0
            if not name:
                return _FAIL, None, 0
            i = string.end()
            continue
        piece = body[i:i + len(expected)]
        if not expected.startswith(piece):
            return _FAIL, None, 0
        if len(piece) < len(expected):
            return _PARTIAL, None, 0
        i += len(expected)
    return "match", name, i - 1


def parse_tool_block(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of the text between <tool_call> and </tool_call>, or None if malformed."""
    status, name, start = _match_header(body)
    if status == "match":
        try:
            _, end = _DECODER.raw_decode(body, start)
        except json.JSONDecodeError:
            end = None
        # The model's own arguments text, when the rest is only closing braces (one, none or too many)
        # or the whole block is valid JSON with more keys after the arguments.
        if end is not None and (not body[end:].strip(_JSON_WS + "}") or _loads_object(body) is not None):
            return name, body[start:end]
    obj = _loads_object(body)
    if obj is None or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", obj.get("parameters"))
    if arguments is None:
        arguments = {}
    return obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _loads_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class _ObjectEnd:
    """Finds where a JSON object ends as its text streams in (brace depth outside strings)."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, text: str) -> int:
        """Index just past the closing brace in ``text``, or -1 if the object continues."""
        for i, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return -1


def _held_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could be the start of one of ``tags``."""
    longest = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:size]):
                longest = size
                break
    return longest


def _find_first(text: str, tags: tuple[str, ...], start: int = 0) -> tuple[int, str | None]:
    found = [(i, tag) for tag in tags if (i := text.find(tag, start)) >= 0]
    return min(found) if found else (-1, None)


# ---- the state machine ----------------------------------------------------------------------------
_NEWLINES = "\n"
_WHITESPACE = None  # str.strip(None): any whitespace


class StreamParser:
    """Incremental parser: ``feed(text) -> list[Delta]``, ``finish() -> list[Delta]``, ``result()``.

    States: "start" (waiting to see whether the output opens <think>), "reasoning", "content" and
    "tool" (inside <tool_call>; ``_origin`` is the state to return to). Text that might still turn out
    to be a tag, or whitespace that a following tag would drop, is held in ``_buf`` until decided.
    """

    def __init__(self, thinking: ThinkingMode = "auto", tools: bool = False, *, stream_tool_arguments: bool = True,
                 new_id: Callable[[], str] = new_tool_call_id):
        if thinking not in THINKING_MODES:
            raise ValueError(f"thinking must be one of {THINKING_MODES}, got {thinking!r}")
        self.tools = tools
        self.stream_tool_arguments = stream_tool_arguments
        self._new_id = new_id
        self._state = {"auto": "start", "started": "reasoning", "off": "content"}[thinking]
        self._buf = ""
        self._lstrip: str | None | bool = _NEWLINES if thinking == "started" else False  # False: keep
        self._separator = ""  # whitespace dropped before a tool call, restored if text follows it
        self._pending_space = ""  # the whitespace before the tool call being read
        self._origin = "content"  # the state a tool call returns to
        self._out: list[Delta] = []
        self._all: list[Delta] = []
        self._wrote = {"reasoning": False, "content": False}
        self._tool_count = 0
        self._finished = False

    # ---- public -------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Delta]:
        if self._finished:
            raise RuntimeError("StreamParser.feed after finish")
        self._buf += text
        while self._step(final=False):
            pass
        return self._flush()

    def finish(self) -> list[Delta]:
        """End of output: decide everything still held."""
        if not self._finished:
            while self._step(final=True):
                pass
            self._finished = True
        return self._flush()

    def result(self) -> ParsedOutput:
        return collect(self._all)

    # ---- output -------------------------------------------------------------------------------
    def _flush(self) -> list[Delta]:
        merged: list[Delta] = []
        for delta in self._out:
            last = merged[-1] if merged else None
            if last is not None and _mergeable(last, delta):
                merged[-1] = _merge(last, delta)
            else:
                merged.append(delta)
        self._all.extend(self._out)
        self._out = []
        return merged

    def _emit_text(self, text: str, state: str) -> None:
        """Reasoning or content text, after the pending left-strip and separator of this section."""
        if self._lstrip is not False:
            text = text.lstrip(self._lstrip)
            if not text:
                return
            self._lstrip = False
        if not text:
            return
        text, self._separator = self._separator + text, ""
        self._wrote[state] = True
        self._out.append(Delta(reasoning_content=text) if state == "reasoning" else Delta(content=text))

    def _enter(self, state: str, lstrip: str | None | bool) -> None:
        self._state, self._lstrip, self._separator = state, lstrip, ""

    # ---- steps --------------------------------------------------------------------------------
    def _step(self, final: bool) -> bool:
        """Advance as far as the buffer allows; True if the state changed and another step may help."""
        if self._state == "start":
            return self._step_start(final)
        if self._state == "tool":
            return self._step_tool(final)
        return self._step_text(final)

    def _step_start(self, final: bool) -> bool:
        head = self._buf.lstrip()
        if head.startswith(THINK_START):
            self._buf = head[len(THINK_START):]
            self._enter("reasoning", _NEWLINES)
            return True
        if THINK_START.startswith(head) and not final:
            return False  # still possibly "<think>"
        self._enter("content", False)
        return True

    def _tags(self) -> tuple[str, ...]:
        tool = (TOOL_START,) if self.tools else ()
        return (THINK_END, *tool) if self._state == "reasoning" else tool

    def _step_text(self, final: bool) -> bool:
        state, tags = self._state, self._tags()
        at, tag = _find_first(self._buf, tags)
        if tag is None:
            self._emit_safe_text(state, tags, final)
            return False
        before, self._buf = self._buf[:at], self._buf[at + len(tag):]
        if tag == THINK_END:
            self._emit_text(before.rstrip(_NEWLINES), state)
            self._enter("content", _NEWLINES)
        else:
            text = before.rstrip()
            # Whitespace before the call is dropped, but kept in case text follows the call. Whitespace
            # right after a previous call (or a section start) was already dropped: keep that call's.
            space = self._separator if not text and self._lstrip is not False else before[len(text):]
            self._emit_text(text, state)
            self._pending_space, self._separator = space, ""
            self._start_tool(state)
        return True

    def _emit_safe_text(self, state: str, tags: tuple[str, ...], final: bool) -> None:
        buf = self._buf
        if final:
            # At the end a reasoning loses its trailing newlines; whitespace after a tool call is dropped.
            self._buf = ""
            self._emit_text(buf.rstrip(_NEWLINES) if state == "reasoning" else buf, state)
            return
        keep = len(buf) - _held_suffix(buf, tags)
        if tags:  # whitespace could precede a tag that drops it
            while keep > 0 and buf[keep - 1].isspace():
                keep -= 1
        self._emit_text(buf[:keep], state)
        self._buf = buf[keep:]

    # ---- tool calls ---------------------------------------------------------------------------
    def _start_tool(self, origin: str) -> None:
        self._state, self._origin = "tool", origin
        self._header = _PARTIAL if self.stream_tool_arguments else _FAIL  # _FAIL: hold the whole block
        self._scan_from = 0  # where to look for the block's end next time
        self._args_at = -1  # committed calls: next argument character to stream
        self._object_end: _ObjectEnd | None = None

    def _step_tool(self, final: bool) -> bool:
        at, tag = _find_first(self._buf, (TOOL_END, TOOL_START), self._scan_from)
        limit = at if tag else len(self._buf) - (0 if final else _held_suffix(self._buf, (TOOL_END, TOOL_START)))
        self._scan_from = max(0, len(self._buf) - len(TOOL_END) + 1)
        if self._header == _PARTIAL:
            self._try_commit(self._buf[:limit], closed=tag is not None or final)
        if self._header == "match":
            self._stream_arguments(limit)
        if tag is None and not final:
            return False
        body = self._buf[:at] if tag else self._buf
        self._buf = self._buf[at + len(TOOL_END):] if tag == TOOL_END else (self._buf[at:] if tag else "")
        self._end_tool(body, closed=tag == TOOL_END)
        return True

    def _try_commit(self, body: str, closed: bool) -> None:
        status, name, start = _match_header(body)
        if status == _PARTIAL and closed:
            status = _FAIL
        self._header = status
        if status == "match":
            self._out.append(Delta(tool_call=ToolCallDelta(self._tool_count, self._new_id(), name)))
            self._args_at = start
            self._object_end = _ObjectEnd()

    def _stream_arguments(self, limit: int) -> None:
        if self._object_end is None or self._args_at >= limit:
            return
        piece = self._buf[self._args_at:limit]
        end = self._object_end.scan(piece)
        if end >= 0:
            piece = piece[:end]
            self._object_end = None  # the arguments are complete: the rest of the block is swallowed
        self._args_at += len(piece)
        if piece:
            self._out.append(Delta(tool_call=ToolCallDelta(self._tool_count, arguments=piece)))

    def _end_tool(self, body: str, closed: bool) -> None:
        origin = self._origin
        if self._header == "match":  # already streamed
            self._tool_count += 1
            self._after_tool(origin)
            return
        parsed = parse_tool_block(body)
        if parsed is None:  # not a tool call: the block is text, as written
            self._state, self._separator = origin, self._pending_space
            self._emit_text(TOOL_START + body + (TOOL_END if closed else ""), origin)
            return
        name, arguments = parsed
        self._out.append(Delta(tool_call=ToolCallDelta(self._tool_count, self._new_id(), name)))
        self._out.append(Delta(tool_call=ToolCallDelta(self._tool_count, arguments=arguments)))
        self._tool_count += 1
        self._after_tool(origin)

    def _after_tool(self, origin: str) -> None:
        """Back to the text around the call: drop the whitespace after it; restore the one before if text follows."""
        keep_separator = self._pending_space if self._wrote[origin] else ""
        self._enter(origin, _WHITESPACE)
        self._separator = keep_separator


def _mergeable(a: Delta, b: Delta) -> bool:
    if a.tool_call is not None and b.tool_call is not None:
        # The first delta of a call carries only its id and name, as OpenAI sends it.
        return a.tool_call.index == b.tool_call.index and a.tool_call.id is None and b.tool_call.id is None
    return (a.content is not None and b.content is not None) or (
        a.reasoning_content is not None and b.reasoning_content is not None)


def _merge(a: Delta, b: Delta) -> Delta:
    if a.tool_call is not None:
        call = a.tool_call
        return Delta(tool_call=ToolCallDelta(call.index, call.id, call.name, call.arguments + b.tool_call.arguments))
    if a.content is not None:
        return Delta(content=a.content + b.content)
    return Delta(reasoning_content=a.reasoning_content + b.reasoning_content)
