"""Evaluate the embedded default model: the figures of docs/default-model.md.

* reasoning tasks with thinking on (held-out problems of the trained difficulty, none seen in training):
  correct = the answer sentence of the task (e.g. "347 + 586 = 933.") appears in the parsed content, and
  the reasoning was parsed out of <think>; well-formed = the output ended by itself with a parsed reasoning
  (thinking on), a non-empty answer and no stray </think> (the format, right or wrong)
* the same kind of problems with ``enable_thinking=False``: respected = no reasoning parsed and no <think>
  in the output; accuracy reported too
* tool use: tools offered (the right one among up to three), a question one of them fits. Valid call = the
  engine's parser (qwenlab.parsing) yields exactly one call with the right name and arguments; then the
  tool's result is fed back and the final answer must quote it (temperature and condition, time, price...);
  also counted: a call parsed at all, and the right tool's name (the format without the arguments)
* perplexity of every stage's exported checkpoint on every held-out set (prose, code, long, SFT chats)

    .venv/bin/python scripts/eval_default_model.py --per-kind 10 --tools 10 --ppl-rows 4 --out docs/default-model-eval.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_synthetic_sft as synth  # noqa: E402


def seen_questions(train_jsonl: Path) -> set[str]:
    seen = set()
    if train_jsonl.is_file():
        for line in open(train_jsonl, encoding="utf-8"):
            for message in json.loads(line)["messages"]:
                if message["role"] == "user":
                    seen.add(message["content"])
    return seen


def held_out(maker, n: int, rng: random.Random, seen: set[str]) -> list[dict]:
    out, keys = [], set()
    while len(out) < n:
        task = maker(rng)
        if task["question"] in seen or task["key"] in keys:
            continue
        keys.add(task["key"])
        out.append(task)
    return out


def reasoning_eval(llm, params, per_kind: int, rng, seen, thinking: bool) -> dict:
    results = {}
    for kind in synth.TASKS:
        tasks = held_out(synth.TASK_MAKERS[kind], per_kind, rng, seen)
        outs = llm.chat([[{"role": "user", "content": t["question"]}] for t in tasks], params,
                        enable_thinking=thinking)
        correct = respected = formatted = 0
        failures = []
        for task, out in zip(tasks, outs):
            c = out.outputs[0]
            content = c.content or ""
            ok = task["answer"] in content and (bool(c.reasoning_content and c.reasoning_content.strip())
                                                if thinking else True)
            correct += ok
            respected += (not (c.reasoning_content or "").strip()) and "<think>" not in c.text
            formatted += c.finish_reason == "stop" and bool(content.strip()) and "</think>" not in content and (
                bool((c.reasoning_content or "").strip()) if thinking else True)
            if not ok and len(failures) < 3:
                failures.append({"question": task["question"], "expected": task["answer"], "output": c.text})
        results[kind] = {"n": len(tasks), "correct": correct / len(tasks),
                         "well_formed": formatted / len(tasks), "failures": failures}
        if not thinking:
            results[kind]["thinking_off_respected"] = respected / len(tasks)
        print(f"  {kind:8s} thinking={'on ' if thinking else 'off'} correct {correct}/{len(tasks)}"
              + ("" if thinking else f", respected {respected}/{len(tasks)}"), file=sys.stderr, flush=True)
    return results


def chat_batch(llm, params, conversations, tools_list, thinking):
    """LLM.chat for many conversations that each offer their own tools: render, generate in one batch, parse."""
    from qwenlab.parsing import parse_output, thinking_mode

    if not conversations:
        return []
    prompts = [llm.tokenizer.apply_chat_template(c, tools=t, enable_thinking=thinking)
               for c, t in zip(conversations, tools_list)]
    outs = llm.generate(prompts, params)
    return [(o.outputs[0].text, parse_output(o.outputs[0].text, thinking=thinking_mode(p), tools=True))
            for p, o in zip(prompts, outs)]


def tool_eval(llm, params, n: int, rng, seen, thinking: bool) -> dict:
    tasks = held_out(synth.tool_task, n, rng, seen)
    convos = [[{"role": "user", "content": t["question"]}] for t in tasks]
    firsts = chat_batch(llm, params, convos, [t["tools"] for t in tasks], thinking)
    valid, final_ok, failures, second = 0, 0, [], []
    parsed = right_name = 0  # what the format alone gets right: a call parsed at all, and the right tool
    for task, convo, (text, out) in zip(tasks, convos, firsts):
        calls = out.tool_calls or []
        parsed += len(calls) >= 1
        right_name += len(calls) == 1 and calls[0].name == task["name"]
        ok = (len(calls) == 1 and calls[0].name == task["name"]
              and _json(calls[0].arguments) == task["arguments"])
        valid += ok
        if not ok:
            if len(failures) < 3:
                failures.append({"question": task["question"], "expected": {"name": task["name"],
                                 "arguments": task["arguments"]}, "output": text})
            continue
        convo = convo + [{"role": "assistant", "content": out.content or "",
                          "reasoning_content": out.reasoning_content or "",
                          "tool_calls": [c.to_openai() for c in calls]},
                         {"role": "tool", "content": json.dumps(task["result"], ensure_ascii=False)}]
        second.append((task, convo))
    finals = chat_batch(llm, params, [c for _, c in second], [t["tools"] for t, _ in second], thinking)
    for (task, _), (text, final) in zip(second, finals):
        good = all(e in (final.content or "") for e in task["expected"]) and not final.tool_calls
        final_ok += good
        if not good and len(failures) < 6:
            failures.append({"question": task["question"], "tool_result": task["result"], "output": text})
    print(f"  tools    thinking={'on ' if thinking else 'off'} valid call {valid}/{n}, "
          f"correct final answer {final_ok}/{n} (a call parsed {parsed}/{n}, right tool {right_name}/{n})",
          file=sys.stderr, flush=True)
    return {"n": n, "call_parsed": parsed / n, "right_tool_name": right_name / n, "valid_call": valid / n, "final_answer_correct": final_ok / n,
            "final_correct_given_valid_call": final_ok / max(1, valid), "failures": failures}


def _json(text):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def perplexities(run_dir: Path, work: Path, max_rows: int) -> dict:
    from qwenlab.train.evaluate import perplexity

    sets = {"prose": work / "corpora" / "prose-heldout.jsonl", "code": work / "corpora" / "code-heldout.jsonl",
            "long": work / "corpora" / "long-heldout.jsonl", "sft": work / "sft" / "prepared-heldout"}
    table = {}
    for stage in sorted((run_dir / "stages").glob("*")):
        table[stage.name] = {}
        for name, path in sets.items():
            if path.exists():
                seq = 1024 if name == "long" else 512
                r = perplexity(stage, path, seq_len=seq, batch=4, max_rows=max_rows, progress=False)
                table[stage.name][name] = round(r["perplexity"], 2)
        print(f"  ppl {stage.name}: {table[stage.name]}", file=sys.stderr, flush=True)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded default model")
    p.add_argument("--per-kind", type=int, default=40, help="held-out problems per reasoning task")
    p.add_argument("--tools", type=int, default=40, help="held-out tool questions")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--work", default="build/default")
    p.add_argument("--run", default="runs/default")
    p.add_argument("--ppl-rows", type=int, default=8, help="rows per held-out set for perplexity (0: skip)")
    p.add_argument("--max-tokens", type=int, default=240, help="per answer (the longest trained answer is ~150)")
    p.add_argument("--out", default=None, help="write the results as JSON (after every section)")
    args = p.parse_args(argv)

    from qwenlab.assets import default_model_dir
    from qwenlab.engine import LLM, SamplingParams

    model = args.model or str(default_model_dir())
    llm = LLM(model, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    rng = random.Random(args.seed)
    seen = set().union(*(seen_questions(path) for path in sorted((ROOT / args.work / "sft").glob("*train.jsonl"))))
    started = time.perf_counter()
    report = {"model": model, "seed": args.seed, "greedy": True}

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    report["thinking_on"] = reasoning_eval(llm, params, args.per_kind, rng, seen, thinking=True)
    save()
    report["thinking_off"] = reasoning_eval(llm, params, args.per_kind, rng, seen, thinking=False)
    save()
    report["tools_thinking_on"] = tool_eval(llm, params, args.tools, rng, seen, thinking=True)
    save()
    report["tools_thinking_off"] = tool_eval(llm, params, args.tools // 2, rng, seen, thinking=False)
    save()
    on = report["thinking_on"]
    off = report["thinking_off"]
    report["summary"] = {
        "thinking_on_accuracy": round(sum(v["correct"] for v in on.values()) / len(on), 4),
        "thinking_off_accuracy": round(sum(v["correct"] for v in off.values()) / len(off), 4),
        "thinking_off_respected": round(sum(v["thinking_off_respected"] for v in off.values()) / len(off), 4),
        "tool_call_valid": report["tools_thinking_on"]["valid_call"],
        "tool_final_answer_correct": report["tools_thinking_on"]["final_answer_correct"],
        "tool_call_valid_thinking_off": report["tools_thinking_off"]["valid_call"],
        "tool_final_answer_correct_thinking_off": report["tools_thinking_off"]["final_answer_correct"],
    }
    if args.ppl_rows and (ROOT / args.run / "stages").is_dir():
        report["perplexity"] = perplexities(ROOT / args.run, ROOT / args.work, args.ppl_rows)
    report["eval_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report["summary"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
