"""Reasoning and tool-call parsing, on finished text and on streams split every possible way."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenlab.parsing import (Delta, ParsedOutput, StreamParser, ToolCall, collect, parse_output, parse_tool_block,
                             thinking_mode)
from tests.tokenizer_fixtures import ours

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
SEARCH = '<tool_call>\n{"name": "search", "arguments": {"q": "北京 weather 😀", "n": [1, {"x": "a } \\" { ]"}]}}\n</tool_call>'
WEATHER_CALL = ("get_weather", '{"city": "Paris", "unit": "c"}')
SEARCH_CALL = ("search", '{"q": "北京 weather 😀", "n": [1, {"x": "a } \\" { ]"}]}')

# name: (text, thinking, tools, (content, reasoning_content, [(tool name, arguments)]))
CASES = {
    "think_then_answer": ("<think>\nLet me think.\n\nStep 2.\n</think>\n\nThe answer is 4.", "auto", False,
                          ("The answer is 4.", "Let me think.\n\nStep 2.", [])),
    "prompt_opened_think": ("Let me think.\n</think>\n\nThe answer.", "started", False,
                            ("The answer.", "Let me think.", [])),
    "truncated_thinking": ("<think>\nStill thinking about it\n\n", "auto", False,
                           (None, "Still thinking about it", [])),
    "truncated_thinking_started": ("thinking without an end", "started", True, (None, "thinking without an end", [])),
    "thinking_disabled": ("The answer is 4.", "off", True, ("The answer is 4.", None, [])),
    "thinking_disabled_keeps_tags": ("<think>\nx\n</think>\n\nHi", "off", False, ("<think>\nx\n</think>\n\nHi", None, [])),
    "no_think_in_auto": ("Just an answer.\n", "auto", False, ("Just an answer.\n", None, [])),
    "empty_think": ("<think>\n\n</think>\n\nHi there", "auto", False, ("Hi there", None, [])),
    "space_before_think": ("\n <think>\nr\n</think>\n\nc", "auto", False, ("c", "r", [])),
    "think_tag_like_text": ("<thinking is fun>", "auto", False, ("<thinking is fun>", None, [])),
    "empty_output": ("", "auto", True, (None, None, [])),
    "only_think_open": ("<think>", "auto", True, (None, None, [])),
    "one_call": (WEATHER, "off", True, (None, None, [WEATHER_CALL])),
    "content_and_two_calls": ("Let me check.\n\n" + WEATHER + "\n" + SEARCH, "off", True,
                              ("Let me check.", None, [WEATHER_CALL, SEARCH_CALL])),
    "think_then_call": ("<think>\nNeed weather.\n</think>\n\n" + WEATHER, "auto", True,
                        (None, "Need weather.", [WEATHER_CALL])),
    "call_before_think_end": ("<think>\nI need the weather.\n" + WEATHER, "auto", True,
                              (None, "I need the weather.", [WEATHER_CALL])),
    "call_inside_think_then_more": ("<think>\nA\n" + WEATHER + "\nB\n</think>\n\nC", "auto", True,
                                    ("C", "A\nB", [WEATHER_CALL])),
    "call_before_think_end_started": ("plan\n" + SEARCH + "\n</think>\n\n", "started", True,
                                      (None, "plan", [SEARCH_CALL])),
    "tools_disabled": ("Sure.\n" + WEATHER, "off", False, ("Sure.\n" + WEATHER, None, [])),
    "tools_disabled_in_think": ("<think>\n" + WEATHER + "\n</think>\n\nok", "auto", False, ("ok", WEATHER, [])),
    "malformed_not_json": ("<tool_call>\nnot json\n</tool_call>", "off", True,
                           ("<tool_call>\nnot json\n</tool_call>", None, [])),
    "malformed_single_quotes": ("x\n<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>", "off", True,
                                ("x\n<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>", None, [])),
    "malformed_no_name": ('<tool_call>\n{"arguments": {}}\n</tool_call>', "off", True,
                          ('<tool_call>\n{"arguments": {}}\n</tool_call>', None, [])),
    "malformed_in_think": ("<think>\nhm\n<tool_call>\nbad\n</tool_call>\n</think>\n\nok", "auto", True,
                           ("ok", "hm\n<tool_call>\nbad\n</tool_call>", [])),
    "good_then_malformed": ("A\n" + WEATHER + "\n<tool_call>\n{oops}\n</tool_call>", "off", True,
                            ("A\n<tool_call>\n{oops}\n</tool_call>", None, [WEATHER_CALL])),
    "missing_closing_brace": ('<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>', "off", True,
                              (None, None, [("f", '{"a": 1}')])),
    "extra_closing_brace": ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}}\n</tool_call>', "off", True,
                            (None, None, [("f", '{"a": 1}')])),
    "string_arguments": ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', "off", True,
                         (None, None, [("f", '{"a": 1}')])),
    "no_arguments": ('<tool_call>\n{"name": "f"}\n</tool_call>', "off", True, (None, None, [("f", "{}")])),
    "arguments_first": ('<tool_call>\n{"arguments": {"a": [1,2]}, "name": "f"}\n</tool_call>', "off", True,
                        (None, None, [("f", '{"a": [1, 2]}')])),
    "extra_keys": ('<tool_call>\n{"name": "f", "arguments": {"a":1}, "id": 3}\n</tool_call>', "off", True,
                   (None, None, [("f", '{"a":1}')])),
    "compact_json": ('<tool_call>{"name":"f","arguments":{"a":"b"}}</tool_call>', "off", True,
                     (None, None, [("f", '{"a":"b"}')])),
    "second_open_closes_first": ('<tool_call>\n{"name": "f", "arguments": {}}\n' + WEATHER, "off", True,
                                 (None, None, [("f", "{}"), WEATHER_CALL])),
    "unclosed_complete_at_end": ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', "off", True,
                                 (None, None, [("f", '{"a": 1}')])),
    "text_after_call": ("A\n" + WEATHER + "\nB", "off", True, ("A\nB", None, [WEATHER_CALL])),
    "whitespace_after_last_call": ("A\n" + WEATHER + "\n\n  ", "off", True, ("A", None, [WEATHER_CALL])),
    "tag_like_content": ("a < b, <tool and <toolbox> </tool_call> ok", "off", True,
                         ("a < b, <tool and <toolbox> </tool_call> ok", None, [])),
    "partial_tag_at_end": ("answer <tool_ca", "off", True, ("answer <tool_ca", None, [])),
    "partial_think_end_in_reasoning": ("<think>\nx </thin", "auto", False, (None, "x </thin", [])),
    "trailing_newline_content_with_tools": ("Done.\n", "off", True, ("Done.\n", None, [])),
    "call_right_after_think_end": ("<think>\nr\n</think>" + WEATHER, "auto", True, (None, "r", [WEATHER_CALL])),
    "unicode_name_escape": ('<tool_call>\n{"name": "get_\\u0077eather", "arguments": {"city": "Paris", "unit": "c"}}\n'
                            '</tool_call>', "off", True, (None, None, [WEATHER_CALL])),
}
# Finished text leaves these in content; a stream that already sent the tool call's name cannot take it back.
STREAM_DIVERGES = {
    "unclosed_incomplete": ('<tool_call>\n{"name": "f", "arguments": {"a": ', "off", True,
                            ('<tool_call>\n{"name": "f", "arguments": {"a": ', None, []), ("f", '{"a": ')),
    "args_not_json": ("<tool_call>\n{\"name\": \"f\", \"arguments\": {'a': 1}}\n</tool_call>", "off", True,
                      ("<tool_call>\n{\"name\": \"f\", \"arguments\": {'a': 1}}\n</tool_call>", None, []),
                      ("f", "{'a': 1}")),
}


def summary(out: ParsedOutput):
    return out.content, out.reasoning_content, [(c.name, c.arguments) for c in out.tool_calls]


def check_deltas(deltas: list[Delta]) -> None:
    """Each delta is one non-empty field; a tool call opens with id+name and no arguments, in index order."""
    seen = set()
    for delta in deltas:
        fields = [delta.reasoning_content, delta.content, delta.tool_call]
        assert sum(f is not None for f in fields) == 1, delta
        if delta.tool_call is None:
            assert (delta.content or delta.reasoning_content) != ""
            continue
        call = delta.tool_call
        if call.index not in seen:
            assert call.index == len(seen) and re.fullmatch(r"call_[0-9a-f]{24}", call.id) and call.name
            assert call.arguments == ""
            seen.add(call.index)
        else:
            assert call.id is None and call.name is None and call.arguments


def run_stream(pieces, thinking, tools, stream_tool_arguments=True):
    parser = StreamParser(thinking, tools, stream_tool_arguments=stream_tool_arguments)
    deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
    check_deltas(deltas)
    result = collect(deltas)
    assert summary(result) == summary(parser.result())
    return result


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


def token_pieces(text: str) -> list[str]:
    tok = ours("qwen3")
    detok = tok.incremental_detokenizer()
    return [detok.add(i) for i in tok.encode(text)] + [detok.finish()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_finished_text(name):
    text, thinking, tools, expected = CASES[name]
    assert summary(parse_output(text, thinking, tools)) == expected


@pytest.mark.parametrize("progressive", [True, False], ids=["streamed_args", "held_calls"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_streams_agree_with_finished_text(name, progressive):
    text, thinking, tools, expected = CASES[name]
    rng = random.Random(name)
    splits = [list(text), token_pieces(text), [text]] + [random_chunks(text, rng) for _ in range(15)]
    for pieces in splits:
        assert summary(run_stream(pieces, thinking, tools, progressive)) == expected, pieces


@pytest.mark.parametrize("name", sorted(STREAM_DIVERGES))
def test_stream_cannot_retract_a_started_call(name):
    text, thinking, tools, expected, streamed_call = STREAM_DIVERGES[name]
    assert summary(parse_output(text, thinking, tools)) == expected
    for pieces in (list(text), token_pieces(text)):
        assert summary(run_stream(pieces, thinking, tools)) == (None, None, [streamed_call])
        assert summary(run_stream(pieces, thinking, tools, stream_tool_arguments=False)) == expected


def test_tool_call_streams_like_openai():
    parser = StreamParser("auto", tools=True)
    pieces = token_pieces("<think>\nok\n</think>\n\nOne moment.\n" + SEARCH)
    chunks = [parser.feed(p) for p in pieces] + [parser.finish()]
    openai = [d.to_openai() for chunk in chunks for d in chunk]
    assert openai[0] == {"reasoning_content": "ok"}
    first_call = next(i for i, c in enumerate(openai) if "tool_calls" in c)
    assert "".join(c["content"] for c in openai[1:first_call]) == "One moment."
    header = openai[first_call]["tool_calls"][0]
    assert header["index"] == 0 and header["type"] == "function" and header["function"] == {"name": "search", "arguments": ""}
    argument_deltas = [c["tool_calls"][0]["function"]["arguments"] for c in openai[first_call + 1:]]
    assert len(argument_deltas) > 5  # streamed as the tokens come, not in one piece
    assert all(set(c["tool_calls"][0]) == {"index", "function"} for c in openai[first_call + 1:])
    assert "".join(argument_deltas) == SEARCH_CALL[1]
    assert json.loads("".join(argument_deltas))["q"] == "北京 weather 😀"


def test_held_calls_arrive_whole():
    parser = StreamParser("off", tools=True, stream_tool_arguments=False)
    deltas = [d for p in token_pieces(WEATHER) for d in parser.feed(p)] + parser.finish()
    assert [d.tool_call.arguments for d in deltas] == ["", WEATHER_CALL[1]]


def test_reasoning_and_content_stream_before_the_end():
    parser = StreamParser("auto", tools=True)
    assert parser.feed("<think>\n") == []
    assert parser.feed("step one") == [Delta(reasoning_content="step one")]
    assert parser.feed("\n") == []  # a newline that </think> would drop is held
    assert parser.feed("step two") == [Delta(reasoning_content="\nstep two")]
    assert parser.feed("\n</think>\n\nHel") == [Delta(content="Hel")]
    assert parser.feed("lo <to") == [Delta(content="lo")]  # " <to" may start <tool_call>
    assert parser.feed("day") == [Delta(content=" <today")]
    assert parser.finish() == []


def test_ids_are_fresh_and_injectable():
    out = parse_output(WEATHER + SEARCH, "off", True)
    assert len({c.id for c in out.tool_calls}) == 2
    counter = itertools.count()
    fixed = parse_output(WEATHER + SEARCH, "off", True, new_id=lambda: f"call_{next(counter)}")
    assert [c.id for c in fixed.tool_calls] == ["call_0", "call_1"]


def test_to_message_and_openai_shapes():
    out = parse_output("<think>\nr\n</think>\n\n" + WEATHER, "auto", True)
    message = out.to_message()
    assert message["role"] == "assistant" and message["content"] is None and message["reasoning_content"] == "r"
    assert message["tool_calls"] == [{"id": out.tool_calls[0].id, "type": "function",
                                      "function": {"name": "get_weather", "arguments": WEATHER_CALL[1]}}]
    assert parse_output("hi").to_message() == {"role": "assistant", "content": "hi"}
    assert ToolCall("call_x", "f", "{}").to_openai()["type"] == "function"


def test_parse_tool_block_directly():
    assert parse_tool_block('{"name": "f", "arguments": {"a": 1}}') == ("f", '{"a": 1}')
    assert parse_tool_block('{"name": "f", "parameters": {"a": 1}}') == ("f", '{"a": 1}')
    assert parse_tool_block('{"name": "", "arguments": {}}') is None
    assert parse_tool_block('{"name": 3, "arguments": {}}') is None
    assert parse_tool_block("[1, 2]") is None
    assert parse_tool_block("[" * 100000) is None  # deep nesting: no RecursionError escapes


def test_feed_after_finish_and_bad_mode():
    parser = StreamParser()
    parser.finish()
    assert parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(ValueError):
        StreamParser(thinking="maybe")


def test_thinking_mode_from_real_prompts():
    tok = ours("qwen3")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nold\n</think>\n\nyo"},
                {"role": "user", "content": "again"}]
    assert thinking_mode(tok.apply_chat_template(messages)) == "auto"
    assert thinking_mode(tok.apply_chat_template(messages, enable_thinking=True)) == "auto"
    assert thinking_mode(tok.apply_chat_template(messages, enable_thinking=False)) == "off"
    assert thinking_mode(tok.apply_chat_template(messages) + "<think>\n") == "started"  # Qwen3-Thinking-2507
    assert thinking_mode(ours("qwen2.5").apply_chat_template(messages[:1])) == "auto"
    assert thinking_mode("") == "auto" and thinking_mode("raw <think> text") == "started"


# ---- fuzzing -----------------------------------------------------------------------------------------
FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "\n", "\n\n", " ", "text", "北京", "😀",
             '{"name": "f", "arguments": ', '{"name": "g"}', "{", "}", '"a"', ": ", "1", ", ", '"x}"', "<", "</",
             "<tool", "'", "\\", "[", "]", "null", WEATHER, SEARCH, '{"name": "f", "arguments": {"a": "}"}}']
outputs = st.lists(st.sampled_from(FRAGMENTS), max_size=25).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=outputs, thinking=st.sampled_from(["auto", "started", "off"]), tools=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_outputs_never_raise_and_chunking_does_not_matter(text, thinking, tools, seed):
    final = parse_output(text, thinking, tools)
    chunks = random_chunks(text, random.Random(seed))
    assert summary(run_stream(chunks, thinking, tools, stream_tool_arguments=False)) == summary(final)
    streamed = run_stream(chunks, thinking, tools)
    if "<tool_call>" not in (final.content or "") + (final.reasoning_content or ""):
        assert summary(streamed) == summary(final)  # every block was a tool call: nothing to retract
    for call in final.tool_calls:
        json.loads(call.arguments)  # a finished call's arguments are always JSON
