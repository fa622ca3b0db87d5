"""The default model's synthetic SFT generator (scripts/make_synthetic_sft.py): every worked example is right.

The model can only learn what its data shows, so the reasoning of every task is checked against the task's
own answer: the columns of add/sub (both styles) reproduce the result, counts and sorts agree, tool calls
carry the arguments the question names.
"""

import json
import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import make_synthetic_sft as synth  # noqa: E402


@pytest.fixture(params=["columns", "places"])
def style(request):
    synth.set_style(request.param)
    yield request.param
    synth.set_style("columns")


def _written_digits(reasoning: str) -> str:
    return "".join(re.findall(r"(?i)write (?:the last carry )?(\d)", reasoning))[::-1]


@pytest.mark.parametrize("kind", ["add", "sub"])
def test_arithmetic_reasoning_reaches_the_answer(style, kind):
    rng = random.Random(7)
    for _ in range(400):
        task = synth.TASK_MAKERS[kind](rng)
        a, b = (int(x) for x in re.split(r"[+-]", task["key"]))
        result = a + b if kind == "add" else a - b
        assert task["expected"] == str(result)
        assert task["answer"] == f"{a} {'+' if kind == 'add' else '-'} {b} = {result}."
        reasoning = task["reasoning"]
        assert int(_written_digits(reasoning)) == result, reasoning
        if style == "places":
            assert reasoning.splitlines()[1] == f"{a} = " + ", ".join(
                f"{d} {synth.PLACES[len(str(a)) - 1 - i]}" for i, d in enumerate(str(a))) + "."
            so_far = re.findall(r"So far: (\d+)\.", reasoning)
            assert int(so_far[-1]) == result and all(len(s) == i + 1 for i, s in enumerate(so_far)), reasoning
            assert [line.split(":")[0] for line in reasoning.splitlines()[3:3 + len(so_far)]] == [
                p.capitalize() for p in synth.PLACES[:len(so_far)]]
        else:
            assert "So far" not in reasoning


def test_places_style_only_changes_add_and_sub():
    records = {}
    for style in ("columns", "places"):
        synth.set_style(style)
        records[style] = list(synth.generate(300, seed=4))
    synth.set_style("columns")
    differ = 0
    for one, two in zip(records["columns"], records["places"]):
        assert [m["content"] for m in one["messages"]] == [m["content"] for m in two["messages"]]
        for m1, m2 in zip(one["messages"], two["messages"]):
            if m1.get("reasoning_content") != m2.get("reasoning_content"):
                differ += 1
                assert re.search(r"column by column", m1["reasoning_content"]), m1
    assert differ > 20


def test_other_tasks_are_consistent():
    rng = random.Random(3)
    for _ in range(300):
        count = synth.task_count(rng)
        assert count["reasoning"].count("\n") - 1 == int(count["expected"])
        sort = synth.task_sort(rng)
        numbers = [int(x) for x in re.findall(r"\d+", sort["question"])]
        assert sort["expected"] == ", ".join(map(str, sorted(numbers)))
        tool = synth.tool_task(rng)
        for value in tool["arguments"].values():
            assert str(value) in tool["question"]
        assert tool["name"] in [t["function"]["name"] for t in tool["tools"]]
        assert all(text in tool["final"] for text in tool["expected"])
    assert json.dumps(next(synth.generate(1, seed=0)))


def test_marks_style_sort_is_a_correct_selection_sort():
    """Each line restates the list position by position with exactly the numbers taken so far marked x,
    names the smallest number left, and carries the sorted part; the last line is the answer."""
    rng = random.Random(11)
    for _ in range(300):
        task = synth.task_sort_marks(rng)
        numbers = [int(x) for x in re.findall(r"\d+", task["question"])]
        ordered = sorted(numbers)
        lines = task["reasoning"].splitlines()
        assert len(lines) == len(numbers) + 2 and lines[-1] == f"Sorted: {task['expected']}."
        for step, line in enumerate(lines[1:-1]):
            listed, rest = line.split(": the smallest is ")
            assert listed.split(", ") == ["x" if v in ordered[:step] else str(v) for v in numbers], line
            assert rest == f"{ordered[step]}. So far: {', '.join(map(str, ordered[:step + 1]))}."
        assert task["expected"] == ", ".join(map(str, ordered))
        assert task["answer"] == f"From smallest to largest: {task['expected']}."


def test_marks_style_changes_sort_and_draws_it_more_often():
    synth.set_style("marks", extra_sort=3)
    try:
        assert synth.TASK_MAKERS["sort"] is synth.task_sort_marks and synth.TASK_MAKERS["add"] is synth.task_add_places
        assert synth.KINDS.count("sort") == 4
        kinds = [synth.reasoning_task(random.Random(i))["kind"] for i in range(400)]
        assert 0.4 < kinds.count("sort") / len(kinds) < 0.6
    finally:
        synth.set_style("columns")
    assert synth.TASK_MAKERS["sort"] is synth.task_sort and synth.KINDS == synth.TASKS
