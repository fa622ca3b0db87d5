"""Qwen's tokenizer and chat templates, behaving exactly as transformers does for Qwen checkpoints.

Public API::

    tok = Tokenizer.from_pretrained("path/to/checkpoint")
    ids = tok.encode("Hello")                       # list[int]; Qwen adds no BOS/EOS
    tok.encode_batch(["a", "b"])                    # list[list[int]], parallel in Rust
    tok.decode(ids, skip_special_tokens=False)      # str; <think>/<tool_call> are not special, so kept
    tok.eos_token_ids                               # (151645, 151643) for Qwen chat checkpoints
    tok.vocab_size                                  # ids the tokenizer knows, added tokens included
    prompt = tok.apply_chat_template(messages, tools=None, add_generation_prompt=True, enable_thinking=None)
    tok.encode_chat(messages, ...)                  # the same prompt, tokenized
    detok = tok.incremental_detokenizer()           # streaming: detok.add(id) -> str delta; detok.finish()

Encoding goes through the checkpoint's ``tokenizer.json`` with the ``tokenizers`` library (NFC normaliser,
Qwen's split regex, byte-level BPE; added tokens are matched verbatim inside the text, as transformers
does). The chat template is the checkpoint's own Jinja source (``chat_template.jinja`` or
``tokenizer_config.json``), rendered in a sandboxed environment configured as transformers configures
its own, so prompts are byte-identical to ``transformers``' ``apply_chat_template``. A checkpoint without
a template gets the official template of its family from ``qwenlab/templates/`` and one logged notice.

Messages are dicts (or pydantic models / dataclasses) with ``role`` and ``content``; as in transformers,
keys whose value is None are dropped and ``reasoning`` / ``thinking`` are aliased to ``reasoning_content``.
Two additions, where transformers would fail with Qwen's templates: content given as a list of OpenAI text
parts is joined into one string (with "\\n", as vLLM does), and a null or missing content is "" (OpenAI
clients send ``content: null`` beside ``tool_calls``).

transformers is never imported here; the tests compare against it.
"""

from __future__ import annotations

import codecs
import json
import logging
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, RequestError

logger = logging.getLogger(__name__)

# model_type in config.json -> built-in template used when a checkpoint ships none.
FAMILY_TEMPLATES = {"qwen2": "qwen2.5", "qwen2_moe": "qwen2.5", "qwen3": "qwen3", "qwen3_moe": "qwen3"}
IM_END, END_OF_TEXT = "<|im_end|>", "<|endoftext|>"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_TEMPLATE_FILENAME = "<chat_template>"  # the filename Jinja gives the template's frames in tracebacks


class ChatTemplateError(ConfigError):
    """A chat template cannot be compiled: the checkpoint's template is broken."""


class ChatTemplateRenderError(ChatTemplateError, RequestError):
    """Rendering failed for these messages (bad message shape, or the template called raise_exception).

    It is also a RequestError, so a server answers it with a 400 rather than a 500.
    """


# ---- byte-level BPE ------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters of byte-level BPE back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:  # control and space bytes are shifted above U+0100 to stay printable
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return value


def _read_optional_json(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}


# ---- the tokenizer ------------------------------------------------------------------------------
class Tokenizer:
    """A Qwen tokenizer: ``tokenizers`` for the BPE, plus chat templates and Qwen's special-token rules.

    ``from_pretrained`` is the usual way in. The constructor takes a loaded ``tokenizers.Tokenizer``, so one
    vocabulary can be reused with another template; without ``chat_template`` it uses the family's
    built-in one.
    """

    def __init__(self, backend, *, tokenizer_config: dict | None = None, generation_config: dict | None = None,
                 chat_template: str | dict[str, str] | list | None = None, template_source: str | None = None,
                 family: str = "qwen3", name_or_path: str = ""):
        import tokenizers

        if not isinstance(backend.decoder, tokenizers.decoders.ByteLevel):
            raise ConfigError(f"{name_or_path or 'tokenizer'}: expected a byte-level BPE decoder as in Qwen "
                              f"checkpoints, found {type(backend.decoder).__name__}")
        self.backend = backend
        self.name_or_path = name_or_path
        self.family = family
        self.tokenizer_config = dict(tokenizer_config or {})
        self.generation_config = dict(generation_config or {})
        self.added_tokens: dict[str, int] = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        self.added_ids = frozenset(self.added_tokens.values())
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_text(self.tokenizer_config.get("bos_token"))
        self.eos_token = _token_text(self.tokenizer_config.get("eos_token"))
        self.pad_token = _token_text(self.tokenizer_config.get("pad_token"))
        self.unk_token = _token_text(self.tokenizer_config.get("unk_token"))
        self.eos_token_ids = self._eos_ids()
        if chat_template is None:
            chat_template, template_source = builtin_template(family), f"built-in {family} template"
        self._chat_templates = _named_templates(chat_template)
        self.template_source = template_source or "given template"
        self._fallback_notice_pending = self.template_source.startswith("built-in")
        self._byte_cache: dict[int, bytes] = {}

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, generation_config.json (and chat_template.jinja)."""
        import tokenizers

        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is not a directory")
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{directory} has no tokenizer.json")
        config = _read_optional_json(directory / "tokenizer_config.json")
        generation = _read_optional_json(directory / "generation_config.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception on malformed files
            raise CheckpointError(f"cannot read {tokenizer_file}: {exc}") from exc
        family = _family(directory, backend)
        template, source = _find_template(directory, config, family)
        return cls(backend, tokenizer_config=config, generation_config=generation, chat_template=template,
                   template_source=source, family=family, name_or_path=str(directory))

    def _eos_ids(self) -> tuple[int, ...]:
        """generation_config's eos ids first, then the tokenizer's eos token; no duplicates."""
        generation_eos = self.generation_config.get("eos_token_id")
        ids = list(generation_eos) if isinstance(generation_eos, list) else [generation_eos]
        ids.append(self.token_to_id(self.eos_token) if self.eos_token else None)
        if not generation_eos and self.eos_token == IM_END:
            # A chat checkpoint without generation_config.json: Qwen chat models also end on <|endoftext|>.
            ids.append(self.token_to_id(END_OF_TEXT))
        return tuple(dict.fromkeys(i for i in ids if isinstance(i, int)))

    # ---- vocabulary -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def special_tokens(self) -> list[str]:
        """Added tokens flagged special (removed by skip_special_tokens): <|im_end|>, <|endoftext|>, ..."""
        return sorted((t for t, i in self.added_tokens.items() if i in self.special_ids), key=self.added_tokens.get)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token as stored in the vocabulary (byte-level characters, e.g. 'Ġhello')."""
        return self.backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (b'' for an unknown id); an added token is its UTF-8 text."""
        cached = self._byte_cache.get(token_id)
        if cached is None:
            cached = self._byte_cache[token_id] = self._compute_token_bytes(token_id)
        return cached

    def _compute_token_bytes(self, token_id: int) -> bytes:
        token = self.backend.id_to_token(token_id) if 0 <= token_id < 2**32 else None
        if token is None:
            return b""
        if token_id in self.added_ids:
            return token.encode("utf-8")
        table = byte_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode("utf-8")  # what the ByteLevel decoder does with characters outside its map

    # ---- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text become their ids (as in transformers)."""
        if not isinstance(text, str):
            raise RequestError(f"text to encode must be a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); same ids as ``encode`` on each."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise RequestError("encode_batch takes a list of strings")
        # encode_batch_fast skips character offsets, which nothing here needs (tokenizers >= 0.21).
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Ids the tokenizer does not know (the embedding's padding rows) are skipped."""
        try:
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as exc:
            raise RequestError(f"token ids must be non-negative integers: {exc}") from exc

    def incremental_detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        """The default template's source (the checkpoint's own, or the family's built-in one)."""
        return self._chat_templates.get("default") or next(iter(self._chat_templates.values()))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                            add_generation_prompt: bool = True, enable_thinking: bool | None = None, *,
                            parse_tool_arguments: bool = False, **kwargs: Any) -> str:
        """Render ``messages`` into the prompt text, exactly as transformers' ``apply_chat_template``.

        ``enable_thinking`` is passed to the template only when not None (Qwen3's template tests
        ``enable_thinking is defined``). Extra ``kwargs`` become template variables, as in transformers.
        ``parse_tool_arguments=True`` turns assistant tool-call arguments given as JSON strings (as OpenAI
        clients send them) into objects first, so Qwen2.5's template does not encode them a second time;
        leave it False to match transformers exactly.
        """
        template_source = self._select_template(tools)
        messages = normalize_messages(messages, parse_tool_arguments=parse_tool_arguments)
        variables = {name: value for name, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                                     ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                     if value is not None}
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        variables.update(plain_data(kwargs))
        variables.update(messages=messages, tools=plain_data(_tool_list(tools)),
                         documents=plain_data(variables.get("documents")),
                         add_generation_prompt=add_generation_prompt)
        self._notice_fallback()
        return render_template(template_source, variables)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                    add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                    **kwargs: Any) -> list[int]:
        """``encode(apply_chat_template(...))``: the prompt ids a model is given."""
        return self.encode(self.apply_chat_template(messages, tools, add_generation_prompt, enable_thinking,
                                                    **kwargs))

    def _select_template(self, tools) -> str:
        # Checkpoints with several named templates pick "tool_use" when tools are given, as transformers does.
        if tools and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if "default" not in self._chat_templates:
            raise ChatTemplateError(f"{self.name_or_path}: no default chat template among "
                                    f"{sorted(self._chat_templates)}")
        return self._chat_templates["default"]

    def _notice_fallback(self) -> None:
        if self._fallback_notice_pending:
            self._fallback_notice_pending = False
            logger.warning("%s has no chat template; using qwenlab's %s", self.name_or_path or "tokenizer",
                           self.template_source)


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _named_templates(template: str | dict[str, str] | list) -> dict[str, str]:
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list):  # tokenizer_config's [{"name": ..., "template": ...}, ...] form
        return {item["name"]: item["template"] for item in template}
    return dict(template)


def _family(directory: Path, backend) -> str:
    """The checkpoint's template family: config.json's model_type, else guessed from the vocabulary."""
    config_file = directory / "config.json"
    if config_file.is_file():
        model_type = _read_json(config_file).get("model_type")
        if model_type in FAMILY_TEMPLATES:
            return FAMILY_TEMPLATES[model_type]
    return "qwen3" if backend.token_to_id("<think>") is not None else "qwen2.5"


def builtin_template(family: str) -> str:
    """Source of an official template shipped with qwenlab ('qwen3' or 'qwen2.5')."""
    try:
        return (resources.files("qwenlab") / "templates" / f"{family}.jinja").read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"no built-in chat template for family {family!r}") from exc


def _find_template(directory: Path, config: dict, family: str) -> tuple[str | dict, str]:
    """chat_template.jinja wins over tokenizer_config.json (as in transformers 5); else the built-in one."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    if config.get("chat_template"):
        return config["chat_template"], str(directory / "tokenizer_config.json")
    return builtin_template(family), f"built-in {family} template"


# ---- messages ----------------------------------------------------------------------------------
def plain_data(value: Any) -> Any:
    """A copy made only of JSON types: templates are untrusted code and must not reach rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses such as str enums carry extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value] if isinstance(value, list) else tuple(plain_data(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models (the OpenAI SDK's messages)
        return plain_data(value.model_dump())
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in fields(value)}
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Any, parse_tool_arguments: bool = False) -> list[dict]:
    """Messages as the template sees them (see the module docstring)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateRenderError("messages must be a non-empty list")
    out = []
    for index, message in enumerate(plain_data(list(messages))):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateRenderError(f"message {index} must be an object with a string 'role'")
        message = {k: v for k, v in message.items() if v is not None}
        # OpenAI clients send content null beside tool_calls; Qwen3's template (and transformers with it)
        # fails on a missing content, and both templates render "" exactly as they render no content.
        message.setdefault("content", "")
        if isinstance(message.get("content"), list):
            message["content"] = _join_text_parts(message["content"], index)
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        if parse_tool_arguments and isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_parse_arguments(call) for call in message["tool_calls"]]
        out.append(message)
    return out


def _join_text_parts(parts: list, index: int) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatTemplateRenderError(f"message {index}: only text content parts are supported, got {kind!r}")
    return "\n".join(texts)


def _parse_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call  # not JSON: render the string as given
    if not isinstance(arguments, dict):
        return call  # only objects are what templates expect as arguments
    return {**call, "function": {**function, "arguments": arguments}}


def _tool_list(tools: Any) -> list | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) or hasattr(t, "model_dump")
                                                        for t in tools):
        raise ChatTemplateRenderError("tools must be a list of JSON-schema objects")
    return list(tools)


# ---- Jinja --------------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def compile_template(source: str):
    """Compile a chat template in a sandbox configured as transformers configures its own."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_namespace_class())
    try:
        code = env.compile(source, filename=_TEMPLATE_FILENAME)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template line {exc.lineno}: {exc.message}"
                                f"{_source_line(source, exc.lineno)}") from exc
    return env.template_class.from_code(env, code, env.make_globals(None))


def render_template(source: str, variables: dict[str, Any]) -> str:
    """Render a chat template; any failure becomes a ChatTemplateRenderError naming the template line."""
    template = compile_template(source)
    try:
        return template.render(**variables)
    except Exception as exc:  # template code can raise anything; report where it happened
        line = _template_line(exc)
        where = f"chat template line {line}" if line else "chat template"
        message = getattr(exc, "message", None) or str(exc)
        raise ChatTemplateRenderError(f"{where}: {message}{_source_line(source, line)}") from exc


def _template_line(exc: BaseException) -> int | None:
    """The last line of the template the traceback went through (Jinja maps its frames to template lines)."""
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__)
             if frame.filename == _TEMPLATE_FILENAME]
    return lines[-1] if lines else None


def _source_line(source: str, line: int | None) -> str:
    lines = source.splitlines()
    if not line or line > len(lines):
        return ""
    return f" (in: {lines[line - 1].strip()[:120]})"


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' tojson: plain json.dumps, no HTML escaping, and the options templates use.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` for templates, without handing them the dict type itself (attribute access on it)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _namespace_class():
    import jinja2.utils
    from jinja2.exceptions import SecurityError

    class TemplateNamespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing underscore names that would reach Python internals."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat templates cannot set underscore attributes on a namespace: {name!r}")

    return TemplateNamespace


# ---- streaming detokenizer ----------------------------------------------------------------------
class IncrementalDetokenizer:
    """Turns ids fed one at a time into text deltas, for streaming.

    Regular tokens are byte strings; an incremental UTF-8 decoder holds back the bytes of a character
    that is not complete yet, so a delta never splits a character and never shows U+FFFD for bytes that
    a later token completes. Bytes that can never form a character give U+FFFD exactly where
    ``decode`` puts it. Added tokens (<think>, <|im_end|>, ...) are text of their own that ends the byte
    run before them, as in the ``tokenizers`` decoder. Joined, the deltas of ``add`` and ``finish`` equal
    ``tokenizer.decode(all_ids, skip_special_tokens)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Feed one id; returns the new text (possibly empty while a character is incomplete)."""
        if not isinstance(token_id, int) or token_id < 0:
            raise RequestError(f"token ids must be non-negative integers, got {token_id!r}")
        self.ids.append(token_id)
        tok = self.tokenizer
        if self.skip_special_tokens and token_id in tok.special_ids:
            return ""  # skipped tokens do not break the byte run, as in tokenizers' decode
        if token_id in tok.added_ids:
            delta = self._utf8.decode(b"", final=True) + tok.id_to_token(token_id)
            self._utf8.reset()
        else:
            delta = self._utf8.decode(tok.token_bytes(token_id))
        self.text += delta
        return delta

    def extend(self, ids: Iterable[int]) -> str:
        return "".join(self.add(i) for i in ids)

    def finish(self) -> str:
        """Flush bytes still held (an incomplete character at the end becomes U+FFFD, as in ``decode``)."""
        delta = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self.text += delta
        return delta
