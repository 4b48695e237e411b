"""The built-in preference set: small checkable tasks (uppercase, sort, add, reverse) whose chosen
answer is the correct one. Generated, so the default run needs no download."""

from __future__ import annotations

import random
from typing import Dict, List, Tuple

_WORDS = "apple river stone cloud maple tiger lemon piano rocket garden silver ocean winter".split()


def _upper(rng: random.Random) -> Tuple[str, str, str]:
    text = " ".join(rng.sample(_WORDS, rng.randint(1, 3)))
    good = text.upper()
    if rng.random() < 0.5:
        bad = text  # left unchanged
    else:
        i = rng.choice([k for k, c in enumerate(good) if c != " "])
        bad = good[:i] + good[i].lower() + good[i + 1 :]  # one letter missed
    return f"Uppercase: {text}\nAnswer: ", good, bad


def _sort(rng: random.Random) -> Tuple[str, str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(4, 6))]
    while digits == sorted(digits):
        rng.shuffle(digits)
    good = sorted(digits)
    bad = list(digits) if rng.random() < 0.5 else sorted(digits, reverse=True)
    if bad == good:
        bad = list(reversed(good))
    fmt = lambda xs: " ".join(map(str, xs))  # noqa: E731
    return f"Sort: {fmt(digits)}\nAnswer: ", fmt(good), fmt(bad)


def _add(rng: random.Random) -> Tuple[str, str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
    return f"Add: {a}+{b}\nAnswer: ", str(a + b), str(abs(wrong))


def _reverse(rng: random.Random) -> Tuple[str, str, str]:
    word = rng.choice(_WORDS)
    good = word[::-1]
    if rng.random() < 0.5:
        bad = word  # copied, not reversed
    else:
        i = rng.randrange(len(good) - 1)
        bad = good[:i] + good[i + 1] + good[i] + good[i + 2 :]  # two letters swapped
        if bad == good:
            bad = word
    return f"Reverse: {word}\nAnswer: ", good, bad


def builtin_rows(n: int, seed: int = 1234) -> List[Dict[str, str]]:
    """`n` standard rows of four small tasks whose chosen answer is the correct one."""
    rng = random.Random(seed)  # fixed: the data set does not change with the run's seed
    tasks = (_upper, _sort, _add, _reverse)
    rows = []
    for i in range(n):
        prompt, chosen, rejected = tasks[i % len(tasks)](rng)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    return rows
