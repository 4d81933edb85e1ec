"""argparse types shared by the offline commands (`python -m pipeline`, `maskgen`): a bad value is one
clear line before any work starts."""
from __future__ import annotations

import argparse
import math


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def share(*, zero: bool = True, one: bool = True, what: str = "a share"):
    """A number in [0, 1], without 0 (`zero=False`) or 1 (`one=False`); NaN is refused."""
    interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a number") from None
        if not ((value >= 0 if zero else value > 0) and (value <= 1 if one else value < 1)):
            raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text!r}")
        return value

    return parse


def part(text: str) -> tuple[int, int]:
    """`K/N`: the K-th (0-based) of N shares of a job spread over processes or machines."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"part {text!r}: expected K/N, e.g. 3/8") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"part {text!r}: needs 0 <= K < N")
    return k, n
