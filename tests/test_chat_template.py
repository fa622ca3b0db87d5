"""Chat prompts byte-identical to transformers' apply_chat_template, for Qwen3's and Qwen2.5's templates."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from qwenlab.errors import ConfigError, RequestError
from qwenlab.tokenizer import ChatTemplateError, ChatTemplateRenderError, Tokenizer, _family, builtin_template
from tests.tokenizer_fixtures import QWEN25_TEMPLATE, make_checkpoint, ours, qwen3_dir, reference

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city. Returns °C.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. 北京 or <Paris>"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Web search & more",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
TOOLS = [WEATHER, SEARCH]


def call(name: str, arguments, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


USER = {"role": "user", "content": "What's the weather in Paris and 北京?"}
SYSTEM = {"role": "system", "content": "You are terse. /no_think"}
TOOL_TURN = [
    USER,
    {"role": "assistant", "content": "", "reasoning_content": "Two cities: call twice.",
     "tool_calls": [call("get_weather", {"city": "Paris"}), call("get_weather", '{"city": "北京", "unit":"c"}', "c2")]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "c2", "content": '{"temp": 30, "note": "热"}'},
]
CONVERSATIONS = {
    "single_user": [USER],
    "system_user": [SYSTEM, USER],
    "multi_turn_thinking_in_content": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nEasy: four.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nSix.\n</think>\n\n6"},
        {"role": "user", "content": "Thanks /think"},
    ],
    "reasoning_content_field": [
        USER, {"role": "assistant", "content": "Sunny.", "reasoning_content": "I guessed."}, {"role": "user", "content": "Sure?"},
    ],
    "reasoning_alias_field": [USER, {"role": "assistant", "content": "Sunny.", "reasoning": "Alias of reasoning."}],
    "tool_loop": [SYSTEM, *TOOL_TURN],
    "tool_loop_answered": [*TOOL_TURN, {"role": "assistant", "content": "<think>\nDone.\n</think>\n\nParis 21°C, 北京 30°C."},
                           {"role": "user", "content": "And tomorrow?"}],
    "assistant_content_and_calls": [
        USER, {"role": "assistant", "content": "Checking.", "tool_calls": [call("search", {"q": "Paris weather"})]},
        {"role": "tool", "content": "rain"},
    ],
    "assistant_content_none": [
        USER, {"role": "assistant", "content": None, "tool_calls": [call("search", '{"q": "x"}')]},
        {"role": "tool", "content": "ok"},
    ],
    "tool_response_user_message": [
        USER, {"role": "assistant", "content": "", "tool_calls": [call("search", {"q": "y"})]},
        {"role": "user", "content": "<tool_response>\nmanual\n</tool_response>"},
    ],
    "final_assistant": [USER, {"role": "assistant", "content": "It is sunny."}],
    "unicode_and_specials_in_text": [{"role": "user", "content": "<b>“quotes”</b> \\n \u00e9 😀 \"json\": {}\n"}],
}
QWEN25_CONVERSATIONS = {
    "default_system": [USER],
    "own_system": [SYSTEM, USER],
    "multi_turn": [USER, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}],
    "tool_loop_dict_args": [
        USER, {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"}),
                                                                  call("get_weather", {"city": "北京"}, "c2")]},
        {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": '{"temp": 30}'},
    ],
    "string_args": [USER, {"role": "assistant", "content": "On it.",
                           "tool_calls": [call("get_weather", '{"city": "Paris"}')]}],
}


def reference_prompt(kind: str, messages, **kwargs) -> str:
    messages = copy.deepcopy(messages)
    for message in messages:  # transformers fails on Qwen3's template with content null; qwenlab renders ""
        if message.get("content") is None:
            message["content"] = ""
    return reference(kind).apply_chat_template(messages, tokenize=False, **kwargs)


THINKING = [None, True, False]


@pytest.mark.parametrize("enable_thinking", THINKING, ids=["default", "on", "off"])
@pytest.mark.parametrize("with_tools", [False, True], ids=["no_tools", "tools"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_qwen3_prompt_identical(name, with_tools, enable_thinking):
    messages = CONVERSATIONS[name]
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    tools = TOOLS if with_tools else None
    for add_generation_prompt in (True, False):
        expected = reference_prompt("qwen3", messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    **extra)
        got = ours("qwen3").apply_chat_template(copy.deepcopy(messages), tools=tools,
                                                add_generation_prompt=add_generation_prompt,
                                                enable_thinking=enable_thinking)
        assert got == expected


@pytest.mark.parametrize("with_tools", [False, True], ids=["no_tools", "tools"])
@pytest.mark.parametrize("name", sorted(QWEN25_CONVERSATIONS))
def test_qwen25_prompt_identical(name, with_tools):
    messages = QWEN25_CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    expected = reference_prompt("qwen2.5", messages, tools=tools, add_generation_prompt=True)
    assert ours("qwen2.5").apply_chat_template(copy.deepcopy(messages), tools=tools) == expected


def test_qwen3_prompt_shapes():
    tok = ours("qwen3")
    assert tok.apply_chat_template([USER]).endswith("<|im_start|>assistant\n")
    assert tok.apply_chat_template([USER], enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    history = tok.apply_chat_template(CONVERSATIONS["multi_turn_thinking_in_content"])
    assert "Easy: four" not in history and "<|im_start|>assistant\n4<|im_end|>" in history
    loop = tok.apply_chat_template(TOOL_TURN, tools=TOOLS)
    assert "<think>\nTwo cities: call twice.\n</think>\n\n<tool_call>" in loop
    assert '"arguments": {"city": "Paris"}' in loop and '"arguments": {"city": "北京", "unit":"c"}' in loop


def test_qwen25_default_system_prompt_and_string_arguments():
    tok = ours("qwen2.5")
    prompt = tok.apply_chat_template([USER])
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    # transformers encodes a string argument a second time with Qwen2.5's template; we match it...
    doubled = tok.apply_chat_template(QWEN25_CONVERSATIONS["string_args"])
    assert '"arguments": "{\\"city\\": \\"Paris\\"}"' in doubled
    # ...and parse_tool_arguments=True gives what the model was trained on (the dict rendering).
    as_dict = copy.deepcopy(QWEN25_CONVERSATIONS["string_args"])
    as_dict[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    parsed = tok.apply_chat_template(QWEN25_CONVERSATIONS["string_args"], parse_tool_arguments=True)
    assert parsed == reference_prompt("qwen2.5", as_dict, add_generation_prompt=True)
    assert '"arguments": {"city": "Paris"}' in parsed


def test_encode_chat_identical_to_transformers_ids():
    messages = CONVERSATIONS["tool_loop"]
    ids = ours("qwen3").encode_chat(messages, tools=TOOLS, enable_thinking=False)
    expected = reference("qwen3").apply_chat_template(copy.deepcopy(messages), tools=TOOLS, enable_thinking=False,
                                                      add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == list(expected)


def test_text_content_parts_are_joined():
    tok = ours("qwen3")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "Hello\nworld"}])
    tool_parts = [USER, {"role": "assistant", "content": "", "tool_calls": [call("search", {"q": "x"})]},
                  {"role": "tool", "content": [{"type": "text", "text": "result"}]}]
    assert "<tool_response>\nresult\n</tool_response>" in tok.apply_chat_template(tool_parts)
    with pytest.raises(ChatTemplateRenderError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_messages_are_not_modified():
    messages = copy.deepcopy(CONVERSATIONS["reasoning_alias_field"])
    before = copy.deepcopy(messages)
    ours("qwen3").apply_chat_template(messages, parse_tool_arguments=True)
    assert messages == before


def test_pydantic_like_messages():
    class Message:
        def __init__(self, **fields):
            self.fields = fields

        def model_dump(self):
            return dict(self.fields)

    tok = ours("qwen3")
    assert tok.apply_chat_template([Message(role="user", content="hi", name=None)]) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages", [[], "hello", [{"content": "no role"}], [123], None])
def test_bad_messages_raise_request_errors(messages):
    with pytest.raises(RequestError):
        ours("qwen3").apply_chat_template(messages)


def test_bad_tools_raise_request_errors():
    with pytest.raises(ChatTemplateRenderError):
        ours("qwen3").apply_chat_template([USER], tools=["not a schema"])


# ---- the template engine -----------------------------------------------------------------------
FEATURES = """{%- set ns = namespace(count=0) -%}
{%- for m in messages -%}
  {%- if loop.index > 3 %}{% break %}{% endif -%}
  {%- if m.role == 'system' %}{% continue %}{% endif -%}
  {%- set ns.count = ns.count + 1 -%}
  [{{ m.role }}] {{ m.content | trim }} {{ m | tojson }} {{ m | tojson(indent=2, sort_keys=true) }}
  {{ {'b': 1, 'a': [1, 2]} | tojson(separators=(',', ':')) }} {{ dict(x=1) | tojson }}
{% endfor -%}
count={{ ns.count }} eos={{ eos_token }} pad={{ pad_token }} bos={{ bos_token is defined }}
{%- if tools %} tools={{ tools | length }}{% endif %}
{%- if add_generation_prompt %} GEN{% endif %} custom={{ custom_var }} year={{ strftime_now('%Y')[:2] }}
<blocks>
    {% for m in messages %}
    {% if m.role == 'user' %}
    indented {{ loop.index0 }}
    {% endif %}
    {% endfor %}
</blocks>
"""


def with_template(template) -> Tokenizer:
    """The Qwen3 tokenizer with another chat template (no need to load the vocabulary again)."""
    return Tokenizer(ours().backend, tokenizer_config=ours().tokenizer_config, chat_template=template)


def test_template_features_identical_to_transformers():
    messages = [SYSTEM, {"role": "user", "content": "  <tag> & “x” é  "}, {"role": "assistant", "content": "y"},
                {"role": "user", "content": "never rendered"}]
    expected = reference().apply_chat_template(copy.deepcopy(messages), tools=TOOLS, tokenize=False,
                                               add_generation_prompt=True, custom_var="v", chat_template=FEATURES)
    assert with_template(FEATURES).apply_chat_template(messages, tools=TOOLS, custom_var="v") == expected
    assert '"content": "  <tag> & “x” é  "' in expected and "count=2 eos=<|im_end|>" in expected
    assert "<blocks>\n    indented 1\n    indented 3\n</blocks>" in expected  # trim_blocks and lstrip_blocks


def test_chat_template_jinja_file_wins(tmp_path):
    directory = make_checkpoint(tmp_path / "file")
    (directory / "chat_template.jinja").write_text("FILE {{ messages[0].content }}")
    tok = Tokenizer.from_pretrained(directory)
    assert tok.apply_chat_template([USER]) == "FILE " + USER["content"]
    assert tok.template_source.endswith("chat_template.jinja")


def test_named_templates_pick_tool_use():
    # tokenizer_config.json may hold a list of named templates; transformers picks "tool_use" with tools.
    tok = with_template([{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}])
    assert tok.apply_chat_template([USER]) == "D" and tok.apply_chat_template([USER], tools=TOOLS) == "T"
    with pytest.raises(ChatTemplateError, match="no default"):
        with_template({"tool_use": "T"}).apply_chat_template([USER])


@pytest.mark.parametrize("model_type,family", [("qwen3", "qwen3"), ("qwen3_moe", "qwen3"), ("qwen2", "qwen2.5"),
                                               ("qwen2_moe", "qwen2.5"), ("llama", "qwen3"), (None, "qwen3")])
def test_template_family(tmp_path, model_type, family):
    if model_type:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert _family(tmp_path, ours().backend) == family


@pytest.mark.parametrize("model_type,family", [("qwen2", "qwen2.5"), (None, "qwen3")])
def test_builtin_template_when_checkpoint_has_none(tmp_path, caplog, model_type, family):
    config = {"model_type": model_type} if model_type else None
    tok = Tokenizer.from_pretrained(make_checkpoint(tmp_path / "bare", template=False, config=config))
    assert tok.family == family and tok.chat_template == builtin_template(family)
    with caplog.at_level(logging.WARNING, logger="qwenlab.tokenizer"):
        first = tok.apply_chat_template([USER], tools=TOOLS)
        tok.apply_chat_template([USER])
    notices = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(notices) == 1 and family in notices[0].getMessage()
    reference_kind = "qwen3" if family == "qwen3" else "qwen2.5"
    assert first == reference_prompt(reference_kind, [USER], tools=TOOLS, add_generation_prompt=True)


def test_constructor_without_template_uses_the_family_one():
    tok = Tokenizer(ours().backend, tokenizer_config=ours().tokenizer_config, family="qwen2.5")
    assert tok.template_source == "built-in qwen2.5 template" and "You are Qwen" in tok.apply_chat_template([USER])


def test_builtin_templates_are_the_official_ones():
    official_qwen3 = json.loads((qwen3_dir() / "tokenizer_config.json").read_text())["chat_template"]
    assert builtin_template("qwen3") == official_qwen3
    assert builtin_template("qwen2.5") == QWEN25_TEMPLATE.read_text()
    with pytest.raises(ConfigError):
        builtin_template("llama")


def test_syntax_error_names_the_line():
    tok = with_template("line one\n{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ChatTemplateError, match=r"chat template line 3: .*\(in: \{\{ m.content \}\)") as info:
        tok.apply_chat_template([USER])
    assert isinstance(info.value, ConfigError) and not isinstance(info.value, RequestError)


def test_raise_exception_names_the_line():
    template = "{% for m in messages %}\n{% if m.role == 'user' %}\n{{ raise_exception('Only assistants here') }}\n{% endif %}{% endfor %}"
    with pytest.raises(ChatTemplateRenderError, match="chat template line 3: Only assistants here"):
        with_template(template).apply_chat_template([USER])


def test_runtime_error_names_the_line():
    template = "ok\n\n{{ messages[0].content.startswith('x') }}\n{{ messages[0].content.nope() }}"
    with pytest.raises(ChatTemplateRenderError, match="chat template line 4"):
        with_template(template).apply_chat_template([USER])
    with pytest.raises(ChatTemplateRenderError, match="chat template line 3"):  # Qwen3's .startswith on a number
        with_template(template).apply_chat_template([{"role": "user", "content": 5}])


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.append(1) }}",  # the sandbox is immutable
    "{{ dict.__class__.__base__.__subclasses__() }}",
])
def test_sandbox_refuses_escapes(template):
    with pytest.raises(ChatTemplateRenderError):
        with_template(template).apply_chat_template([USER])
