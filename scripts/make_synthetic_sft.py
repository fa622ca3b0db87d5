"""Synthetic chat data for the default model's SFT stage (and its held-out evaluation).

Every task is narrow and templated so a model of a few million parameters can master it on a CPU:

* ``add`` / ``sub``  two numbers of 2-3 digits, worked column by column (carries, borrows) in <think>
* ``count``          how many items a short list holds, counted one by one
* ``convert``        metric conversions by powers of ten (km/m/cm/mm, kg/g, L/mL), both directions
* ``sort``           3-6 numbers below 100, smallest first, by repeated minimum
* ``tool``           weather / time / currency / stock tools in Qwen's Hermes format: a <tool_call>, the
                     tool's <tool_response> fed back, then a final answer quoting the result
* ``chat``           greetings, identity, thanks (multi-turn conversations mix these with tasks)

A record is ``{"messages": [...], "tools": [...]?, "enable_thinking": bool}``; assistant turns carry their
reasoning in ``reasoning_content`` (empty when thinking is off) and tool calls in ``tool_calls``.

    python scripts/make_synthetic_sft.py --records 60000 --seed 0 --out build/default/sft/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TASKS = ("add", "sub", "count", "convert", "sort")
ITEMS = ("apple pear plum fig grape lemon mango peach cherry melon cat dog bird fish horse mouse tiger lion bear "
         "wolf red blue green yellow black white pink brown chair table lamp door book pen cup bag hat shoe "
         "river hill tree stone cloud star moon rain snow wind").split()
CITIES = ("Paris London Tokyo Berlin Madrid Rome Oslo Cairo Lima Delhi Seoul Sydney Toronto Chicago Boston Dublin "
          "Vienna Prague Warsaw Lisbon Athens Nairobi Bangkok Hanoi Manila Jakarta Dakar Quito Bogota Havana "
          "Zurich Geneva Munich Milan Naples Kyoto Osaka Beijing Shanghai Mumbai").split() + [
          "New York", "San Francisco", "Los Angeles", "Mexico City", "Buenos Aires", "Cape Town", "Hong Kong",
          "Rio de Janeiro"]
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "CNY", "INR", "SEK")
UNITS = [("km", "m", 1000, "kilometers", "meters"), ("m", "cm", 100, "meters", "centimeters"),
         ("cm", "mm", 10, "centimeters", "millimeters"), ("kg", "g", 1000, "kilograms", "grams"),
         ("L", "mL", 1000, "liters", "milliliters")]
SYSTEMS = ("You are a helpful assistant.", "You are qwenlab's small default model. Answer briefly.",
           "You are a careful assistant. Think step by step.")

TOOLS = {
    "get_weather": {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                       "required": ["city"]}}},
    "get_time": {"type": "function", "function": {
        "name": "get_time", "description": "Get the current local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                       "required": ["city"]}}},
    "convert_currency": {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money from one currency to another.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number", "description": "The amount to convert"},
            "from_currency": {"type": "string", "description": "ISO code of the source currency"},
            "to_currency": {"type": "string", "description": "ISO code of the target currency"}},
            "required": ["amount", "from_currency", "to_currency"]}}},
    "get_stock_price": {"type": "function", "function": {
        "name": "get_stock_price", "description": "Get the latest price of a stock by its ticker symbol.",
        "parameters": {"type": "object", "properties": {"symbol": {"type": "string", "description": "Ticker symbol"}},
                       "required": ["symbol"]}}},
}


# ---- reasoning tasks -------------------------------------------------------------------------------------
def _number(rng: random.Random) -> int:
    return rng.randint(10, 99) if rng.random() < 0.35 else rng.randint(100, 999)


def task_add(rng):
    a, b = _number(rng), _number(rng)
    q = rng.choice(("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "{a} + {b} = ?",
                    "What is the sum of {a} and {b}?", "Calculate {a} plus {b}.")).format(a=a, b=b)
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry, written = [f"Add {a} and {b} column by column, starting from the ones."], 0, []
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        expr = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = s // 10
        lines.append(f"{expr} = {s}, write {s % 10}" + (f", carry {carry}." if carry else "."))
        written.append(s % 10)
    if carry:
        lines.append(f"Write the last carry {carry}.")
    r = a + b
    lines.append(f"So {a} + {b} = {r}.")
    return dict(kind="add", key=f"{a}+{b}", question=q, reasoning="\n".join(lines),
                answer=f"{a} + {b} = {r}.", expected=str(r))


def task_sub(rng):
    a, b = sorted((_number(rng), _number(rng)), reverse=True)
    if a == b:
        a += 1
    q = rng.choice(("What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.", "{a} - {b} = ?",
                    "What is {a} minus {b}?", "Calculate the difference {a} - {b}.")).format(a=a, b=b)
    da, db = str(a)[::-1], str(b)[::-1]
    lines, borrow = [f"Subtract {b} from {a} column by column, starting from the ones."], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        top = x - borrow
        prefix = f"{x} - 1 = {top} after the borrow; " if borrow else ""
        if top < y:
            lines.append(f"{prefix}{top} < {y}, borrow: {top + 10} - {y} = {top + 10 - y}, write {top + 10 - y}.")
            borrow = 1
        else:
            lines.append(f"{prefix}{top} - {y} = {top - y}, write {top - y}.")
            borrow = 0
    r = a - b
    lines.append(f"So {a} - {b} = {r}.")
    return dict(kind="sub", key=f"{a}-{b}", question=q, reasoning="\n".join(lines),
                answer=f"{a} - {b} = {r}.", expected=str(r))


PLACES = ("ones", "tens", "hundreds", "thousands")


def _places(n: int) -> str:
    """``298 = 2 hundreds, 9 tens, 8 ones.``: the digits copied left to right, each labelled with its place."""
    digits = str(n)
    return f"{n} = " + ", ".join(f"{d} {PLACES[len(digits) - 1 - i]}" for i, d in enumerate(digits)) + "."


def task_add_places(rng):
    """``add`` in the "places" style: each operand's digits labelled by place first (a left-to-right copy),
    then one line per column that names it and carries the result so far (a copy plus one new digit), so no
    step has to find "the k-th digit from the end" of a number or reverse the written digits."""
    task = task_add(rng)
    a, b = (int(x) for x in task["key"].split("+"))
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry, so_far = [f"Add {a} and {b} column by column, starting from the ones.", _places(a), _places(b)], 0, ""
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        expr = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = s // 10
        so_far = str(s % 10) + so_far
        lines.append(f"{PLACES[i].capitalize()}: {expr} = {s}, write {s % 10}" + (f", carry {carry}" if carry else "")
                     + f". So far: {so_far}.")
    if carry:
        so_far = str(carry) + so_far
        lines.append(f"{PLACES[len(da if len(da) >= len(db) else db)].capitalize()}: the last carry, write {carry}. "
                     f"So far: {so_far}.")
    lines.append(f"So {a} + {b} = {a + b}.")
    return dict(task, reasoning="\n".join(lines))


def task_sub_places(rng):
    """``sub`` in the "places" style (see task_add_places); the top column drops a leading zero at the end."""
    task = task_sub(rng)
    a, b = (int(x) for x in task["key"].split("-"))
    da, db = str(a)[::-1], str(b)[::-1]
    lines, borrow, so_far = [f"Subtract {b} from {a} column by column, starting from the ones.", _places(a),
                             _places(b)], 0, ""
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        top = x - borrow
        prefix = f"{x} - 1 = {top} after the borrow; " if borrow else ""
        if top < y:
            d, body, borrow = top + 10 - y, f"{top} < {y}, borrow: {top + 10} - {y} = {top + 10 - y}", 1
        else:
            d, body, borrow = top - y, f"{top} - {y} = {top - y}", 0
        so_far = str(d) + so_far
        lines.append(f"{PLACES[i].capitalize()}: {prefix}{body}, write {d}. So far: {so_far}.")
    lines.append(f"So {a} - {b} = {a - b}.")
    return dict(task, reasoning="\n".join(lines))


def task_count(rng):
    items = rng.sample(ITEMS, rng.randint(2, 9))
    listed = ", ".join(items)
    q = rng.choice(("How many items are in this list: {l}?", "Count the words: {l}.",
                    "How many things did I name? {l}", "Here is a list: {l}. How many items does it have?")
                   ).format(l=listed)
    steps = "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))
    n = len(items)
    return dict(kind="count", key="count:" + listed, question=q,
                reasoning=f"Count them one by one:\n{steps}\nThe last number is {n}, so there are {n} items.",
                answer=f"There are {n} items.", expected=str(n))


def task_convert(rng):
    big, small, factor, big_name, small_name = rng.choice(UNITS)
    k = rng.randint(1, 99) if rng.random() < 0.6 else rng.randint(100, 999)
    if rng.random() < 0.5:
        q = rng.choice(("Convert {k} {b} to {s}.", "How many {sn} are in {k} {bn}?", "What is {k} {b} in {s}?")
                       ).format(k=k, b=big, s=small, bn=big_name, sn=small_name)
        r = k * factor
        reasoning = f"1 {big} = {factor} {small}.\nMultiply by {factor}: {k} × {factor} = {r}.\nSo {k} {big} = {r} {small}."
        answer, key = f"{k} {big} = {r} {small}.", f"{k}{big}>{small}"
    else:
        v = k * factor
        q = rng.choice(("Convert {v} {s} to {b}.", "How many {bn} are in {v} {sn}?", "What is {v} {s} in {b}?")
                       ).format(v=v, b=big, s=small, bn=big_name, sn=small_name)
        r = k
        reasoning = f"{factor} {small} = 1 {big}.\nDivide by {factor}: {v} ÷ {factor} = {k}.\nSo {v} {small} = {k} {big}."
        answer, key = f"{v} {small} = {k} {big}.", f"{v}{small}>{big}"
    return dict(kind="convert", key=key, question=q, reasoning=reasoning, answer=answer, expected=str(r))


def task_sort(rng):
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    listed = ", ".join(map(str, numbers))
    q = rng.choice(("Sort these numbers from smallest to largest: {l}.", "Sort in ascending order: {l}.",
                    "Put these numbers in increasing order: {l}.")).format(l=listed)
    lines, rest = ["Take the smallest number each time."], list(numbers)
    while rest:
        low = min(rest)
        lines.append(f"From {', '.join(map(str, rest))} the smallest is {low}.")
        rest.remove(low)
    result = ", ".join(map(str, sorted(numbers)))
    lines.append(f"Sorted: {result}.")
    return dict(kind="sort", key="sort:" + listed, question=q, reasoning="\n".join(lines),
                answer=f"From smallest to largest: {result}.", expected=result)


def task_sort_marks(rng):
    """``sort`` in the "marks" style: every line restates the whole list with the numbers already taken
    replaced by ``x`` (so each line is a position-by-position copy of the one before, one number swapped) and
    carries the sorted part so far (so the answer is a copy of the last line, not a gathering of every line).
    Removing a number from a shrinking list was where the repeated-minimum style failed."""
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    listed = ", ".join(map(str, numbers))
    q = rng.choice(("Sort these numbers from smallest to largest: {l}.", "Sort in ascending order: {l}.",
                    "Put these numbers in increasing order: {l}.")).format(l=listed)
    lines, row, done = ["Take the smallest number each time; x marks a number already taken."], list(numbers), []
    for _ in numbers:
        low = min(v for v in row if v != "x")
        done.append(low)
        lines.append(f"{', '.join(map(str, row))}: the smallest is {low}. So far: {', '.join(map(str, done))}.")
        row = ["x" if v == low else v for v in row]
    result = ", ".join(map(str, sorted(numbers)))
    lines.append(f"Sorted: {result}.")
    return dict(kind="sort", key="sort:" + listed, question=q, reasoning="\n".join(lines),
                answer=f"From smallest to largest: {result}.", expected=result)


TASK_MAKERS = {"add": task_add, "sub": task_sub, "count": task_count, "convert": task_convert, "sort": task_sort}
STYLES = {"columns": {}, "places": {"add": task_add_places, "sub": task_sub_places},
          "marks": {"add": task_add_places, "sub": task_sub_places, "sort": task_sort_marks}}
KINDS = TASKS  # the reasoning tasks drawn from (uniformly; --extra-sort repeats "sort")


def set_style(style: str, extra_sort: int = 0) -> None:
    """Choose how add/sub/sort reason: "columns" (the first SFT stages' data), "places" (see task_add_places)
    or "marks" (places, and sort as in task_sort_marks); ``extra_sort`` more draws of sort among the tasks."""
    global KINDS
    TASK_MAKERS.update({"add": task_add, "sub": task_sub, "sort": task_sort}, **STYLES[style])
    KINDS = TASKS + ("sort",) * extra_sort

CHAT = [
    (("Hello!", "Hi!", "Hi there.", "Good morning!", "Hey"), "The user greets me. I greet them back and offer help.",
     ("Hello! How can I help you today?", "Hi! What can I do for you?")),
    (("Who are you?", "What are you?", "What is your name?", "Introduce yourself."),
     "The user asks who I am. I am the small default model that ships with qwenlab.",
     ("I am qwenlab's small default model, a tiny Qwen3 trained on a CPU. I can do arithmetic, count, convert "
      "units, sort short lists and call tools.",)),
    (("Thanks!", "Thank you.", "Great, thanks.", "Perfect, thank you!"), "The user thanks me. I reply politely.",
     ("You're welcome!", "Glad to help!")),
    (("What can you do?", "How can you help me?"), "The user asks what I can do. I list my skills.",
     ("I can add and subtract numbers, count items in a list, convert metric units, sort short lists of "
      "numbers, and use tools such as weather, time, currency and stock lookups.",)),
    (("Bye!", "Goodbye.", "See you later."), "The user says goodbye. I say goodbye too.",
     ("Goodbye! Have a nice day.", "Bye! Come back any time.")),
]


def task_chat(rng):
    questions, reasoning, answers = rng.choice(CHAT)
    return dict(kind="chat", key="chat", question=rng.choice(questions), reasoning=reasoning,
                answer=rng.choice(answers), expected=None)


# ---- tools ---------------------------------------------------------------------------------------------------
def tool_task(rng):
    """A question a tool answers: the call, a tool result, and the final answer built from it."""
    name = rng.choice(list(TOOLS))
    if name == "get_weather":
        city = rng.choice(CITIES)
        q = rng.choice(("What's the weather in {c}?", "How is the weather in {c} right now?",
                        "Is it warm in {c} today?", "Tell me the weather for {c}.")).format(c=city)
        args = {"city": city}
        result = {"city": city, "temperature_c": rng.randint(-10, 38), "condition": rng.choice(CONDITIONS)}
        final = f"It is {result['temperature_c']}°C and {result['condition']} in {city}."
        expected = [str(result["temperature_c"]), result["condition"]]
        plan = f"The user wants the weather in {city}. I will call get_weather with city {city}."
        after = f"The tool says {city} has {result['temperature_c']}°C and is {result['condition']}."
    elif name == "get_time":
        city = rng.choice(CITIES)
        q = rng.choice(("What time is it in {c}?", "Tell me the local time in {c}.",
                        "What's the current time in {c}?")).format(c=city)
        args = {"city": city}
        result = {"city": city, "time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"}
        final = f"It is {result['time']} in {city}."
        expected = [result["time"]]
        plan = f"The user asks for the time in {city}. I will call get_time with city {city}."
        after = f"The tool says it is {result['time']} in {city}."
    elif name == "convert_currency":
        src, dst = rng.sample(CURRENCIES, 2)
        amount = rng.choice((rng.randint(1, 999), rng.randint(1, 99) * 10))
        q = rng.choice(("Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?",
                        "What is {a} {s} worth in {d}?")).format(a=amount, s=src, d=dst)
        args = {"amount": amount, "from_currency": src, "to_currency": dst}
        value = round(amount * rng.uniform(0.05, 20), 2)
        result = {"amount": amount, "from_currency": src, "to_currency": dst, "result": value}
        final = f"{amount} {src} is {value} {dst}."
        expected = [str(value)]
        plan = f"The user wants {amount} {src} in {dst}. I will call convert_currency."
        after = f"The tool says {amount} {src} is {value} {dst}."
    else:
        symbol = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(3, 4)))
        q = rng.choice(("What is the stock price of {s}?", "How much does {s} trade at?",
                        "Get me the latest price for {s}.")).format(s=symbol)
        args = {"symbol": symbol}
        price = round(rng.uniform(1, 900), 2)
        result = {"symbol": symbol, "price": price, "currency": "USD"}
        final = f"{symbol} trades at {price} USD."
        expected = [str(price)]
        plan = f"The user asks for the price of {symbol}. I will call get_stock_price with symbol {symbol}."
        after = f"The tool says {symbol} is at {price} USD."
    others = [t for t in TOOLS if t != name]
    offered = [name] + rng.sample(others, rng.randint(0, 2))
    rng.shuffle(offered)
    return dict(kind="tool", key=f"tool:{name}:{json.dumps(args, sort_keys=True)}", question=q, name=name,
                arguments=args, result=result, final=final, expected=expected, plan=plan, after=after,
                tools=[TOOLS[t] for t in offered])


# ---- conversations -------------------------------------------------------------------------------------------
def assistant(task: dict, thinking: bool) -> dict:
    return {"role": "assistant", "content": task["answer"], "reasoning_content": task["reasoning"] if thinking else ""}


def tool_turns(task: dict, thinking: bool) -> list[dict]:
    call = {"type": "function", "function": {"name": task["name"], "arguments": task["arguments"]}}
    return [{"role": "assistant", "content": "", "reasoning_content": task["plan"] if thinking else "",
             "tool_calls": [call]},
            {"role": "tool", "content": json.dumps(task["result"], ensure_ascii=False)},
            {"role": "assistant", "content": task["final"], "reasoning_content": task["after"] if thinking else ""}]


def reasoning_task(rng, kinds=None):
    return TASK_MAKERS[rng.choice(kinds or KINDS)](rng)


def conversation(rng: random.Random, thinking: bool, tool_fraction: float = 0.25) -> dict:
    messages: list[dict] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    record: dict = {"enable_thinking": thinking}
    roll = rng.random()
    if roll < tool_fraction:  # tool use, sometimes after a chat turn or a task
        task = tool_task(rng)
        record["tools"] = task["tools"]
        if rng.random() < 0.25:
            first = task_chat(rng) if rng.random() < 0.5 else reasoning_task(rng)
            messages += [{"role": "user", "content": first["question"]}, assistant(first, thinking)]
        messages.append({"role": "user", "content": task["question"]})
        messages += tool_turns(task, thinking)
        if rng.random() < 0.2:  # a second question in the same conversation, another tool round trip
            again = tool_task(rng)
            names = [t["function"]["name"] for t in record["tools"]]
            record["tools"] += [t for t in again["tools"] if t["function"]["name"] not in names]
            messages.append({"role": "user", "content": again["question"]})
            messages += tool_turns(again, thinking)
    elif roll < tool_fraction + 0.05:  # tools offered, but the question needs none
        task = reasoning_task(rng)
        record["tools"] = [TOOLS[t] for t in rng.sample(list(TOOLS), rng.randint(1, 3))]
        messages += [{"role": "user", "content": task["question"]}, assistant(task, thinking)]
    else:  # 1-3 turns of tasks and chat
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
            task = task_chat(rng) if rng.random() < 0.12 else reasoning_task(rng)
            messages += [{"role": "user", "content": task["question"]}, assistant(task, thinking)]
    record["messages"] = messages
    return record


def task_keys(record: dict) -> set[str]:
    """Problem keys in a record (for keeping evaluation problems out of the training set)."""
    return set(record.get("keys", []))


def generate(records: int, seed: int, thinking_fraction: float = 0.7, tool_fraction: float = 0.25):
    rng = random.Random(f"qwenlab-sft-{seed}")
    for _ in range(records):
        yield conversation(rng, rng.random() < thinking_fraction, tool_fraction)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=60000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thinking-fraction", type=float, default=0.7)
    p.add_argument("--out", default="build/default/sft/train.jsonl")
    p.add_argument("--tool-fraction", type=float, default=0.25, help="share of conversations that call a tool")
    p.add_argument("--style", choices=sorted(STYLES), default="columns",
                   help="how add/sub/sort reason in <think> (default: columns, the first SFT stages' data)")
    p.add_argument("--extra-sort", type=int, default=0, help="draw sort this many more times among the 5 tasks")
    args = p.parse_args(argv)
    set_style(args.style, args.extra_sort)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for record in generate(args.records, args.seed, args.thinking_fraction, args.tool_fraction):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{args.records} conversations -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
