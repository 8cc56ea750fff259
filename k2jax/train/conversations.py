"""A generator of K2 Thinking tool-use conversations, for training the default model.

Every conversation is one user request with the three built-in tools declared
(``k2jax.chat.tools``: calculator, convert_units, get_capital) and the assistant's turns: short
reasoning, then tool calls (``functions.NAME:IDX`` ids counted across the conversation), the
tools' real results, and a final answer built from them. Kinds: one calculator call, one unit
conversion, one capital lookup, two calls in one section (capital + arithmetic), a chain (a
conversion whose result feeds the calculator), and turns that need no tool. Some conversations
carry an earlier exchange as history.

Each request's wording is drawn from many templates; ``HELD_OUT`` templates are never used for
training (``split="train"``) and only for evaluation (``split="eval"``), so the evaluation
measures phrasings the model has not seen. A conversation is a plain dict (``messages``,
``expected``) so tests and benchmarks can check answers without re-parsing text.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from typing import Any

from k2jax.chat import tools as builtin

TOOLS = list(builtin.DECLARATIONS)

# --- phrasings: (template, held_out) ------------------------------------------------------------

_ARITH_OPS = {
    "+": ["+", "plus", "added to"],
    "-": ["-", "minus"],
    "*": ["*", "times", "multiplied by", "x"],
    "/": ["/", "divided by", "over"],
}

_CALC_TEMPLATES = [
    ("What is {a} {op} {b}?", False),
    ("what's {a} {op} {b}", False),
    ("Calculate {a} {op} {b}.", False),
    ("Compute {a} {op} {b} please.", False),
    ("Can you work out {a} {op} {b}?", False),
    ("I need the result of {a} {op} {b}.", False),
    ("How much is {a} {op} {b}?", False),
    ("Quick question: {a} {op} {b} = ?", False),
    ("Please evaluate {a} {op} {b}", False),
    ("Tell me {a} {op} {b}.", False),
    ("{a} {op} {b}?", False),
    ("Solve {a} {op} {b}", False),
    ("Help me with some math: what is {a} {op} {b}?", False),
    ("Work out {a} {op} {b}.", False),
    ("Find {a} {op} {b}.", False),
    ("What does {a} {op} {b} come to?", False),
    ("{a} {op} {b} equals what?", False),
    ("Give me the value of {a} {op} {b}.", False),
    ("hey, what is {a} {op} {b}?", False),
    ("Please calculate {a} {op} {b} for me.", False),
    ("What do you get for {a} {op} {b}?", False),
    ("I want to know {a} {op} {b}.", False),
    ("Figure out {a} {op} {b} for me.", True),
    ("Could you tell me what {a} {op} {b} equals?", True),
    ("Do the math: {a} {op} {b}", True),
]

_CALC3_TEMPLATES = [
    ("What is ({a} {op1} {b}) {op2} {c}?", False),
    ("Calculate ({a} {op1} {b}) {op2} {c}.", False),
    ("Evaluate ({a} {op1} {b}) {op2} {c}", False),
    ("Can you compute ({a} {op1} {b}) {op2} {c}?", False),
    ("Work out ({a} {op1} {b}) {op2} {c}.", False),
    ("What does ({a} {op1} {b}) {op2} {c} give?", False),
    ("Find ({a} {op1} {b}) {op2} {c} for me.", False),
    ("I'd like to know ({a} {op1} {b}) {op2} {c}.", True),
]

_UNIT_NAMES = {
    "km": ["km", "kilometers", "kilometres"],
    "m": ["m", "meters", "metres"],
    "cm": ["cm", "centimeters"],
    "mi": ["mi", "miles"],
    "ft": ["ft", "feet"],
    "in": ["in", "inches"],
    "kg": ["kg", "kilograms"],
    "g": ["g", "grams"],
    "lb": ["lb", "pounds"],
    "oz": ["oz", "ounces"],
    "l": ["l", "liters", "litres"],
    "ml": ["ml", "milliliters"],
    "gal": ["gal", "gallons"],
    "c": ["C", "degrees Celsius", "Celsius"],
    "f": ["F", "degrees Fahrenheit", "Fahrenheit"],
}
_CONVERSIONS = [
    ("km", "mi"),
    ("mi", "km"),
    ("m", "ft"),
    ("ft", "m"),
    ("cm", "in"),
    ("in", "cm"),
    ("kg", "lb"),
    ("lb", "kg"),
    ("g", "oz"),
    ("oz", "g"),
    ("l", "gal"),
    ("gal", "l"),
    ("ml", "l"),
    ("c", "f"),
    ("f", "c"),
    ("km", "m"),
]

_CONVERT_TEMPLATES = [
    ("Convert {v} {u1} to {u2}.", False),
    ("How many {u2} is {v} {u1}?", False),
    ("What is {v} {u1} in {u2}?", False),
    ("{v} {u1} to {u2}, please.", False),
    ("Can you convert {v} {u1} into {u2}?", False),
    ("I have {v} {u1}. How much is that in {u2}?", False),
    ("Express {v} {u1} in {u2}.", False),
    ("What's {v} {u1} in {u2}?", False),
    ("Turn {v} {u1} into {u2}.", False),
    ("{v} {u1} is how many {u2}?", False),
    ("I need {v} {u1} in {u2}.", False),
    ("Convert {v} {u1} into {u2} for me.", False),
    ("Could you express {v} {u1} as {u2}?", False),
    ("Please change {v} {u1} to {u2}", True),
    ("How much is {v} {u1} when measured in {u2}?", True),
]

_CAPITAL_TEMPLATES = [
    ("What is the capital of {country}?", False),
    ("what's the capital of {country}", False),
    ("Which city is the capital of {country}?", False),
    ("Tell me the capital city of {country}.", False),
    ("Name the capital of {country}.", False),
    ("Do you know the capital of {country}?", False),
    ("{country}'s capital?", False),
    ("Look up the capital of {country}.", False),
    ("What city is the capital of {country}?", False),
    ("Capital of {country}?", False),
    ("I want to know the capital of {country}.", False),
    ("Please find the capital of {country}.", False),
    ("Can you tell me the capital of {country}?", False),
    ("Which city serves as the capital of {country}?", False),
    ("I forgot the capital of {country}. What is it?", True),
    ("Where is the seat of government of {country}?", True),
]

_PAIR_TEMPLATES = [
    ("What is the capital of {country}, and what is {a} {op} {b}?", False),
    ("Two things: the capital of {country}, and {a} {op} {b}.", False),
    ("Tell me the capital of {country} and calculate {a} {op} {b}.", False),
    ("Calculate {a} {op} {b}, and also tell me the capital of {country}.", False),
    ("Find the capital of {country}, then work out {a} {op} {b}.", False),
    ("What is {a} {op} {b}? Also, what is the capital of {country}?", False),
    ("Please look up the capital of {country} and compute {a} {op} {b}.", False),
    ("Capital of {country} and {a} {op} {b}, please.", False),
    # "plus" and "as well as" joining the two requests (not an operator): added after the
    # session-6 model read the held-out phrasing's "plus" as "+" (docs/training.md).
    ("Work out {a} {op} {b}, plus look up the capital of {country}.", False),
    ("What is the capital of {country}? Plus, what is {a} {op} {b}?", False),
    ("Tell me the capital of {country} as well as the result of {a} {op} {b}.", False),
    ("I need the capital of {country} plus the value of {a} {op} {b}.", True),
]

_CHAIN_TEMPLATES = [
    ("Convert {v} {u1} to {u2} and then multiply the result by {k}.", False),
    ("What is {v} {u1} in {u2}, times {k}?", False),
    ("Take {v} {u1}, convert it to {u2}, and multiply by {k}.", False),
    ("How many {u2} is {v} {u1}? Multiply that by {k}.", False),
    ("Convert {v} {u1} into {u2}, then multiply by {k}.", False),
    ("Multiply {v} {u1} in {u2} by {k}.", False),
    ("I have {v} {u1}. Convert to {u2} and multiply the result by {k}.", False),
    ("First convert {v} {u1} to {u2}, then multiply it by {k}.", True),
]

_NO_TOOL = [
    (["Hello!", "Hi there", "Hey!", "Good morning!", "hello"], False, "greet"),
    (["Who are you?", "What are you?", "Tell me about yourself."], False, "identity"),
    (["What can you do?", "What tools do you have?", "How can you help me?"], False, "abilities"),
    (["Thanks!", "Thank you very much.", "thanks a lot"], False, "thanks"),
    (["Goodbye!", "Bye for now.", "See you later!"], False, "bye"),
    (["Tell me a joke.", "Say something funny."], False, "joke"),
    (["What is your favorite color?", "Do you like music?"], False, "preference"),
    (["Nice to meet you!", "How are you today?"], True, "greet"),
]

_NO_TOOL_REPLIES = {
    "greet": (
        "The user is greeting me. No tool is needed.",
        ["Hello! How can I help you today?", "Hi! What can I do for you?"],
    ),
    "identity": (
        "The user asks who I am. I can answer directly.",
        [
            "I am Kimi, a small assistant that can use a calculator, convert units and look up "
            "capital cities."
        ],
    ),
    "abilities": (
        "The user asks what I can do. I will list my tools.",
        [
            "I can evaluate arithmetic with a calculator, convert between units, and look up the "
            "capital city of a country."
        ],
    ),
    "thanks": (
        "The user thanks me. No tool is needed.",
        ["You're welcome!", "Glad I could help!"],
    ),
    "bye": ("The user says goodbye.", ["Goodbye! Have a nice day."]),
    "joke": (
        "The user wants a joke. No tool is needed.",
        ["Why did the calculator stay calm? It knew how to keep things in proportion."],
    ),
    "preference": (
        "This is a personal question. No tool is needed.",
        ["I don't have personal preferences, but I'm happy to help with math, units or capitals."],
    ),
}

_CALC_REASONING = [
    "The user wants {expr}. I'll use the calculator.",
    "I need to compute {expr}. Let me call the calculator.",
    "This is arithmetic: {expr}. The calculator will give the exact value.",
]
_CALC_ANSWERS = [
    "{expr} = {result}.",
    "The answer is {result}.",
    "{expr} equals {result}.",
    "The result of {expr} is {result}.",
]
_CONVERT_REASONING = [
    "The user wants to convert {v} {u1} to {u2}. I'll use convert_units.",
    "I need to convert {v} {u1} into {u2}. Let me call the converter.",
]
_CONVERT_ANSWERS = ["{v} {u1} is {result} {u2}.", "That is {result} {u2}."]
_CAPITAL_REASONING = [
    "The user asks for the capital of {country}. I'll look it up.",
    "I should look up the capital of {country} with get_capital.",
]
_CAPITAL_ANSWERS = [
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
]
_AFTER_RESULT = [
    "The tool returned {result}.",
    "The result is {result}.",
    "Got {result} from the tool.",
]


def _number(rng: random.Random, decimals: bool) -> str:
    if decimals and rng.random() < 0.3:
        return f"{rng.randint(0, 999)}.{rng.randint(1, 99)}".rstrip("0")
    digits = rng.choice([1, 2, 2, 3, 3, 3, 4])
    return str(rng.randint(10 ** (digits - 1) if digits > 1 else 1, 10**digits - 1))


def _pick(rng: random.Random, templates: list[tuple[str, bool]], split: str) -> str:
    if split == "train":
        pool = [t for t, held in templates if not held]
    else:
        pool = [t for t, _ in templates]
        held = [t for t, h in templates if h]
        if held and rng.random() < 0.5:  # half of eval requests use phrasings never trained on
            pool = held
    return rng.choice(pool)


def _call(name: str, index: int, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"functions.{name}:{index}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _tool_message(call: dict[str, Any]) -> dict[str, Any]:
    name = call["function"]["name"]
    result = builtin.run_tool(name, json.loads(call["function"]["arguments"]))
    return {"role": "tool", "tool_call_id": call["id"], "name": name, "content": result}


def _arith(rng: random.Random, split: str) -> tuple[str, str]:
    """(user text, canonical expression) for a one- or two-operator arithmetic request."""
    if rng.random() < 0.25:
        a, b, c = (_number(rng, False) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("*+-")
        text = _pick(rng, _CALC3_TEMPLATES, split).format(
            a=a, b=b, c=c, op1=rng.choice(_ARITH_OPS[op1]), op2=rng.choice(_ARITH_OPS[op2])
        )
        return text, f"({a} {op1} {b}) {op2} {c}"
    op = rng.choice("+-*/")
    a, b = _number(rng, True), _number(rng, True)
    if op == "/" and rng.random() < 0.6:  # mostly exact quotients
        b = str(rng.randint(2, 40))
        a = str(int(b) * rng.randint(2, 400))
    text = _pick(rng, _CALC_TEMPLATES, split).format(a=a, b=b, op=rng.choice(_ARITH_OPS[op]))
    return text, f"{a} {op} {b}"


def _conversion(rng: random.Random) -> tuple[str, str, str, str, int | float]:
    """(from unit, to unit, from name, to name, value)."""
    u1, u2 = rng.choice(_CONVERSIONS)
    value: int | float = rng.randint(1, 500)
    if rng.random() < 0.25:
        value = round(rng.uniform(0.5, 100), 1)
    return u1, u2, rng.choice(_UNIT_NAMES[u1]), rng.choice(_UNIT_NAMES[u2]), value


def _assistant(reasoning: str, content: str = "", calls=None) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
    }
    if calls:
        message["tool_calls"] = calls
    return message


def _exchange(rng: random.Random, kind: str, split: str, first_index: int) -> tuple[list, dict]:
    """One user request and the assistant's turns; returns (messages, expected)."""
    say = rng.choice
    if kind == "calculator":
        text, expr = _arith(rng, split)
        call = _call("calculator", first_index, {"expression": expr})
        result = _tool_message(call)["content"]
        turns = [
            {"role": "user", "content": text},
            _assistant(say(_CALC_REASONING).format(expr=expr), calls=[call]),
            _tool_message(call),
            _assistant(
                say(_AFTER_RESULT).format(result=result),
                say(_CALC_ANSWERS).format(expr=expr, result=result),
            ),
        ]
        return turns, {"calls": [("calculator", {"expression": expr})], "answer": [result]}
    if kind == "convert":
        u1, u2, n1, n2, v = _conversion(rng)
        text = _pick(rng, _CONVERT_TEMPLATES, split).format(v=v, u1=n1, u2=n2)
        args = {"value": v, "from_unit": u1, "to_unit": u2}
        call = _call("convert_units", first_index, args)
        result = _tool_message(call)["content"]
        turns = [
            {"role": "user", "content": text},
            _assistant(say(_CONVERT_REASONING).format(v=v, u1=n1, u2=n2), calls=[call]),
            _tool_message(call),
            _assistant(
                say(_AFTER_RESULT).format(result=result),
                say(_CONVERT_ANSWERS).format(v=v, u1=n1, u2=n2, result=result),
            ),
        ]
        return turns, {"calls": [("convert_units", args)], "answer": [result]}
    if kind == "capital":
        country = say(sorted(builtin.CAPITALS))
        text = _pick(rng, _CAPITAL_TEMPLATES, split).format(country=country)
        call = _call("get_capital", first_index, {"country": country})
        capital = builtin.CAPITALS[country]
        turns = [
            {"role": "user", "content": text},
            _assistant(say(_CAPITAL_REASONING).format(country=country), calls=[call]),
            _tool_message(call),
            _assistant(
                say(_AFTER_RESULT).format(result=capital),
                say(_CAPITAL_ANSWERS).format(country=country, capital=capital),
            ),
        ]
        return turns, {"calls": [("get_capital", {"country": country})], "answer": [capital]}
    if kind == "pair":
        country = say(sorted(builtin.CAPITALS))
        op = rng.choice("+-*")
        a, b = _number(rng, False), _number(rng, False)
        expr = f"{a} {op} {b}"
        text = _pick(rng, _PAIR_TEMPLATES, split).format(
            country=country, a=a, b=b, op=rng.choice(_ARITH_OPS[op])
        )
        calls = [
            _call("get_capital", first_index, {"country": country}),
            _call("calculator", first_index + 1, {"expression": expr}),
        ]
        capital, result = builtin.CAPITALS[country], builtin.calculator(expr)
        reasoning = (
            f"Two requests: the capital of {country} and {expr}. I'll call both tools at once."
        )
        turns = [
            {"role": "user", "content": text},
            _assistant(reasoning, calls=calls),
            *(_tool_message(c) for c in calls),
            _assistant(
                f"The capital is {capital} and the result is {result}.",
                f"The capital of {country} is {capital}, and {expr} = {result}.",
            ),
        ]
        expected_calls = [
            ("get_capital", {"country": country}),
            ("calculator", {"expression": expr}),
        ]
        return turns, {"calls": expected_calls, "answer": [capital, result]}
    if kind == "chain":
        u1, u2, n1, n2, v = _conversion(rng)
        k = rng.randint(2, 12)
        text = _pick(rng, _CHAIN_TEMPLATES, split).format(v=v, u1=n1, u2=n2, k=k)
        args = {"value": v, "from_unit": u1, "to_unit": u2}
        first = _call("convert_units", first_index, args)
        converted = _tool_message(first)["content"]
        expr = f"{converted} * {k}"
        second = _call("calculator", first_index + 1, {"expression": expr})
        result = builtin.calculator(expr)
        turns = [
            {"role": "user", "content": text},
            _assistant(f"First I convert {v} {n1} to {n2}, then multiply by {k}.", calls=[first]),
            _tool_message(first),
            _assistant(f"{v} {n1} is {converted} {n2}. Now I multiply by {k}.", calls=[second]),
            _tool_message(second),
            _assistant(
                say(_AFTER_RESULT).format(result=result),
                f"{v} {n1} is {converted} {n2}; times {k} that is {result}.",
            ),
        ]
        expected = {"calls": [("convert_units", args), ("calculator", {"expression": expr})]}
        return turns, {**expected, "answer": [result]}
    # no tool
    options = [entry for entry in _NO_TOOL if split != "train" or not entry[1]]
    texts, _, topic = rng.choice(options)
    reasoning, replies = _NO_TOOL_REPLIES[topic]
    turns = [{"role": "user", "content": rng.choice(texts)}, _assistant(reasoning, say(replies))]
    return turns, {"calls": [], "answer": []}


KINDS = ("calculator", "convert", "capital", "pair", "chain", "none")
WEIGHTS = (0.34, 0.16, 0.14, 0.12, 0.1, 0.14)


def conversation(rng: random.Random, split: str = "train", kind: str | None = None) -> dict:
    """One conversation: ``{"messages", "history", "kind", "expected"}``.

    ``history`` counts the leading messages of an earlier, finished exchange (rendered without
    reasoning, as K2's template does; never trained on). ``expected`` holds the calls
    (``(name, arguments)``) the last exchange must make and the strings its answer must contain.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    kind = kind or rng.choices(KINDS, WEIGHTS)[0]
    history: list[dict[str, Any]] = []
    if rng.random() < 0.15:
        history, _ = _exchange(rng, rng.choice(("calculator", "capital", "none")), split, 0)
    calls_before = sum(len(m.get("tool_calls") or ()) for m in history)
    turns, expected = _exchange(rng, kind, split, calls_before)
    return {
        "messages": history + turns,
        "history": len(history),
        "kind": kind,
        "expected": expected,
    }


def conversations(seed: int, count: int, split: str = "train") -> list[dict]:
    """``count`` conversations drawn with ``seed`` (training and evaluation use disjoint seeds)."""
    rng = random.Random(seed)
    return [conversation(rng, split) for _ in range(count)]


def expected_value(expression: str) -> Fraction:
    """The exact value of an expression the generator wrote (for checking answers)."""
    return builtin.evaluate(expression)
