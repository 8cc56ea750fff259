"""Built-in tools: a calculator, a unit converter and a capital-city lookup.

The trained default model (``k2jax.load_default``) learned to call exactly these, with exactly
these declarations; ``python -m k2jax.sample --chat`` hands them to the agent loop. The
calculator parses its expression with a small recursive-descent parser over exact fractions:
nothing is ever evaluated as Python. Results are strings, as a tool result is text.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}

CONVERT_UNITS = {
    "type": "function",
    "function": {
        "name": "convert_units",
        "description": "Convert a value from one unit to another.",
        "parameters": {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "from_unit": {"type": "string"},
                "to_unit": {"type": "string"},
            },
            "required": ["value", "from_unit", "to_unit"],
        },
    },
}

GET_CAPITAL = {
    "type": "function",
    "function": {
        "name": "get_capital",
        "description": "Look up the capital city of a country.",
        "parameters": {
            "type": "object",
            "properties": {"country": {"type": "string"}},
            "required": ["country"],
        },
    },
}


class CalculatorError(ValueError):
    """An expression the calculator cannot evaluate (names the problem and where)."""


_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(.))")
MAX_EXPRESSION_CHARS = 200


def _tokens(expression: str) -> list[str]:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    out = []
    for match in _TOKEN.finditer(expression):
        number, symbol = match.groups()
        if number is not None:
            out.append(number)
        elif symbol is not None:
            if symbol not in "+-*/()":
                raise CalculatorError(f"unexpected character {symbol!r} at {match.start(2)}")
            out.append(symbol)
    return out


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := '-' unary | '+' unary | atom; atom := NUMBER | '(' expr ')'."""

    MAX_DEPTH = 50

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.at = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise CalculatorError("the expression ends too early")
        self.at += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value *= self.unary()
            else:
                divisor = self.unary()
                if divisor == 0:
                    raise CalculatorError("division by zero")
                value /= divisor
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            sign = -1 if self.take() == "-" else 1
            self.depth += 1
            if self.depth > self.MAX_DEPTH:
                raise CalculatorError("the expression nests too deeply")
            value = sign * self.unary()
            self.depth -= 1
            return value
        return self.atom()

    def atom(self) -> Fraction:
        token = self.take()
        if token == "(":
            self.depth += 1
            if self.depth > self.MAX_DEPTH:
                raise CalculatorError("the expression nests too deeply")
            value = self.expr()
            if self.take() != ")":
                raise CalculatorError("a '(' is not closed")
            self.depth -= 1
            return value
        if token[0].isdigit() or token[0] == ".":
            return Fraction(token)
        raise CalculatorError(f"unexpected {token!r}")


def format_number(value: Fraction | float, places: int = 4) -> str:
    """An exact integer as is; anything else rounded to ``places`` decimals, zeros stripped."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(round(value, places)):.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression: + - * / ( ), integers and decimals."""
    parser = _Parser(_tokens(expression))
    if parser.peek() is None:
        raise CalculatorError("the expression is empty")
    value = parser.expr()
    if parser.peek() is not None:
        raise CalculatorError(f"unexpected {parser.peek()!r} after a complete expression")
    return value


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression; the result as a string."""
    return format_number(evaluate(expression))


# unit -> (dimension, factor to the dimension's base unit); temperatures are affine, below.
UNITS: dict[str, tuple[str, Fraction]] = {
    "km": ("length", Fraction(1000)),
    "m": ("length", Fraction(1)),
    "cm": ("length", Fraction(1, 100)),
    "mi": ("length", Fraction(1609344, 1000)),
    "ft": ("length", Fraction(3048, 10000)),
    "in": ("length", Fraction(254, 10000)),
    "kg": ("mass", Fraction(1000)),
    "g": ("mass", Fraction(1)),
    "lb": ("mass", Fraction(45359237, 100000)),
    "oz": ("mass", Fraction(45359237, 1600000)),
    "l": ("volume", Fraction(1)),
    "ml": ("volume", Fraction(1, 1000)),
    "gal": ("volume", Fraction(3785411784, 1000000000)),
    "c": ("temperature", Fraction(1)),
    "f": ("temperature", Fraction(1)),
}


def convert_value(value: Fraction, from_unit: str, to_unit: str) -> Fraction:
    """``value`` in ``from_unit`` expressed in ``to_unit`` (exact)."""
    for unit in (from_unit, to_unit):
        if unit not in UNITS:
            raise ValueError(f"unknown unit {unit!r}; known units: {', '.join(UNITS)}")
    if UNITS[from_unit][0] != UNITS[to_unit][0]:
        raise ValueError(f"cannot convert {from_unit} ({UNITS[from_unit][0]}) to {to_unit}")
    if UNITS[from_unit][0] == "temperature":
        celsius = value if from_unit == "c" else (value - 32) * Fraction(5, 9)
        return celsius if to_unit == "c" else celsius * Fraction(9, 5) + 32
    return value * UNITS[from_unit][1] / UNITS[to_unit][1]


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a value from one unit to another; the result as a string."""
    exact = Fraction(str(value))
    return format_number(convert_value(exact, from_unit.lower(), to_unit.lower()))


CAPITALS = {
    "Argentina": "Buenos Aires",
    "Australia": "Canberra",
    "Austria": "Vienna",
    "Belgium": "Brussels",
    "Brazil": "Brasilia",
    "Canada": "Ottawa",
    "Chile": "Santiago",
    "China": "Beijing",
    "Colombia": "Bogota",
    "Cuba": "Havana",
    "Denmark": "Copenhagen",
    "Egypt": "Cairo",
    "Ethiopia": "Addis Ababa",
    "Finland": "Helsinki",
    "France": "Paris",
    "Germany": "Berlin",
    "Ghana": "Accra",
    "Greece": "Athens",
    "Hungary": "Budapest",
    "Iceland": "Reykjavik",
    "India": "New Delhi",
    "Indonesia": "Jakarta",
    "Ireland": "Dublin",
    "Italy": "Rome",
    "Japan": "Tokyo",
    "Kenya": "Nairobi",
    "Mexico": "Mexico City",
    "Morocco": "Rabat",
    "Nepal": "Kathmandu",
    "Netherlands": "Amsterdam",
    "Nigeria": "Abuja",
    "Norway": "Oslo",
    "Peru": "Lima",
    "Poland": "Warsaw",
    "Portugal": "Lisbon",
    "Spain": "Madrid",
    "Sweden": "Stockholm",
    "Thailand": "Bangkok",
    "Turkey": "Ankara",
    "Vietnam": "Hanoi",
}


def get_capital(country: str) -> str:
    """Look up the capital city of a country."""
    for name, capital in CAPITALS.items():
        if name.lower() == country.strip().lower():
            return capital
    raise ValueError(f"no capital known for {country!r}")


DECLARATIONS = (CALCULATOR, CONVERT_UNITS, GET_CAPITAL)
_FUNCTIONS = {"calculator": calculator, "convert_units": convert_units, "get_capital": get_capital}


def builtin_tools() -> dict[str, tuple[dict[str, Any], Any]]:
    """The built-in tools by name as ``(declaration, function)``, for ``Agent(model, tools=)``."""
    return {d["function"]["name"]: (d, _FUNCTIONS[d["function"]["name"]]) for d in DECLARATIONS}


def run_tool(name: str, arguments: dict[str, Any]) -> str:
    """Runs built-in tool ``name`` (used by the data generator to write tool results)."""
    return _FUNCTIONS[name](**arguments)
