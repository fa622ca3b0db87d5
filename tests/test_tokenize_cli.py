"""``qwenlab tokenize``: ids, tokens and rendered prompts, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import pytest

from qwenlab.cli import main
from tests.tokenizer_fixtures import ours, qwen3_dir, reference

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in 北京? 😀"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["tokenize", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(tmp_path, name: str, value) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(value, ensure_ascii=False))
    return str(path)


def test_text_shows_ids_and_tokens(capsys):
    code, out, _ = run(capsys, "--model", str(qwen3_dir()), "Hello 世界 <think>")
    ids = ours().encode("Hello 世界 <think>")
    assert code == 0 and f"ids: {ids}" in out and f"{len(ids)} tokens" in out
    assert "'世界'" in out and "<think>" in out and "ä¸ĸçķĮ" in out


def test_json_output_matches_transformers(capsys):
    code, out, _ = run(capsys, "--model", str(qwen3_dir()), "--json", "déjà vu 123")
    result = json.loads(out)
    assert code == 0 and result["ids"] == reference().encode("déjà vu 123", add_special_tokens=False)
    assert result["tokens"] == reference().convert_ids_to_tokens(result["ids"]) and result["prompt"] == "déjà vu 123"


@pytest.mark.parametrize("no_thinking", [False, True])
def test_chat_renders_the_template(capsys, tmp_path, no_thinking):
    argv = ["--model", str(qwen3_dir()), "--chat", write(tmp_path, "m.json", MESSAGES),
            "--tools", write(tmp_path, "t.json", TOOLS), "--json"] + (["--no-thinking"] if no_thinking else [])
    code, out, _ = run(capsys, *argv)
    result = json.loads(out)
    extra = {"enable_thinking": False} if no_thinking else {}
    expected = reference().apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True, **extra)
    assert code == 0 and result["prompt"] == expected and result["ids"] == ours().encode(expected)
    assert result["prompt"].endswith("<think>\n\n</think>\n\n") == no_thinking


def test_chat_accepts_an_openai_request_body(capsys, tmp_path):
    body = write(tmp_path, "req.json", {"model": "x", "messages": MESSAGES, "tools": TOOLS})
    code, out, _ = run(capsys, "--model", str(qwen3_dir()), "--chat", body, "--no-generation-prompt")
    assert code == 0 and "prompt:\n<|im_start|>system\nBe brief.\n\n# Tools" in out
    assert "tokenizer_config.json" in out and "<|im_start|>assistant" not in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "/nonexistent/model", "x"], "is not a directory"),
    (["--model", "{model}"], "give either a text or --chat"),
    (["--model", "{model}", "x", "--tools", "t.json"], "--tools needs --chat"),
    (["--model", "{model}", "--chat", "/nonexistent/m.json"], "cannot read messages file"),
    (["--model", "{model}", "--chat", "{bad_json}"], "is not JSON"),
    (["--model", "{model}", "--chat", "{not_messages}"], "messages must be a non-empty list"),
])
def test_errors_are_one_line_and_exit_2(capsys, tmp_path, argv, message):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{")
    values = {"model": str(qwen3_dir()), "bad_json": str(bad_json), "not_messages": write(tmp_path, "n.json", {"a": 1})}
    code, out, err = run(capsys, *[a.format(**values) for a in argv])
    assert code == 2 and out == "" and message in err
    assert err.count("\n") == 1 and err.startswith("qwenlab tokenize: error:")

