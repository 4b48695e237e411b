"""The built-in preference set: small checkable tasks (uppercase, sort, add, reverse) whose chosen
answer is the correct one. Generated, so the default run needs no download.

Every prompt reads `<Task>: <input>\nAnswer: `, and `solve` gives the correct answer from the
prompt alone, so a generated answer can be judged (judges/builtin.py).

Version 3 (`dataset.builtin_version`, the default) has easier inputs (one or two words, three
distinct digits, two one-digit numbers) and one rejected answer for every row: the non-answer
`not sure`. A model fine-tuned on a mix of chosen and rejected answers then answers some prompts
and declines others, and preference training has a clear choice to learn that leaves the skill
of answering alone. Version 2 made each rejected answer a systematic mistake (the input copied
unchanged, sorted the wrong way, two numbers side by side): the mistake uses the same skill as
the correct answer (a copied word against the reversed one), and on the tiny default model DPO's
push against the rejected answer unlearned that skill, so no setting of a sweep improved what
the policy generates. Version 1, the first set, mixed such mistakes with random one-letter
slips. Runs saved with either still reproduce.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Tuple

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


def _upper_v2(rng: random.Random) -> Tuple[str, str, str]:
    text = " ".join(rng.sample(_WORDS, rng.randint(1, 3)))
    return f"Uppercase: {text}\nAnswer: ", text.upper(), text  # left unchanged


def _sort_v2(rng: random.Random) -> Tuple[str, str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    while len(set(digits)) < 2 or digits == sorted(digits):
        digits = [rng.randint(0, 9) for _ in range(len(digits))]
    fmt = lambda xs: " ".join(map(str, xs))  # noqa: E731
    return f"Sort: {fmt(digits)}\nAnswer: ", fmt(sorted(digits)), fmt(sorted(digits, reverse=True))


def _add_v2(rng: random.Random) -> Tuple[str, str, str]:
    a, b = rng.randint(1, 9), rng.randint(10, 49)
    return f"Add: {a}+{b}\nAnswer: ", str(a + b), f"{a}{b}"  # written side by side


def _reverse_v2(rng: random.Random) -> Tuple[str, str, str]:
    word = rng.choice(_WORDS)
    return f"Reverse: {word}\nAnswer: ", word[::-1], word  # copied


NON_ANSWER = "not sure"


def _upper_v3(rng: random.Random) -> Tuple[str, str, str]:
    text = " ".join(rng.sample(_WORDS, rng.randint(1, 2)))
    return f"Uppercase: {text}\nAnswer: ", text.upper(), NON_ANSWER


def _sort_v3(rng: random.Random) -> Tuple[str, str, str]:
    digits = rng.sample(range(10), 3)
    while digits == sorted(digits):
        rng.shuffle(digits)
    fmt = lambda xs: " ".join(map(str, xs))  # noqa: E731
    return f"Sort: {fmt(digits)}\nAnswer: ", fmt(sorted(digits)), NON_ANSWER


def _add_v3(rng: random.Random) -> Tuple[str, str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"Add: {a}+{b}\nAnswer: ", str(a + b), NON_ANSWER


def _reverse_v3(rng: random.Random) -> Tuple[str, str, str]:
    word = rng.choice(_WORDS)
    return f"Reverse: {word}\nAnswer: ", word[::-1], NON_ANSWER


VERSIONS = {1: (_upper, _sort, _add, _reverse), 2: (_upper_v2, _sort_v2, _add_v2, _reverse_v2),
            3: (_upper_v3, _sort_v3, _add_v3, _reverse_v3)}
LATEST = 3


def builtin_rows(n: int, seed: int = 1234, version: int = LATEST) -> List[Dict[str, str]]:
    """`n` standard rows of four small tasks whose chosen answer is the correct one."""
    rng = random.Random(seed)  # fixed: the data set does not change with the run's seed
    tasks = VERSIONS[version]
    rows = []
    for i in range(n):
        prompt, chosen, rejected = tasks[i % len(tasks)](rng)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    return rows


def _solve_sort(text: str) -> str:
    return " ".join(sorted(text.split(), key=int))


def _solve_add(text: str) -> str:
    a, b = text.split("+")
    return str(int(a) + int(b))


SOLVERS = {
    "Uppercase": str.upper,
    "Sort": _solve_sort,
    "Add": _solve_add,
    "Reverse": lambda text: text[::-1],
}


def solve(prompt: str) -> Optional[str]:
    """The correct answer to a built-in task's prompt (`Task: input\nAnswer: `, text before it is
    ignored); None when the prompt is not one of the tasks."""
    head, sep, _ = prompt.rpartition("\nAnswer:")
    task, colon, text = head.rpartition("\n")[2].partition(": ")
    if not (sep and colon) or task not in SOLVERS:
        return None
    try:
        return SOLVERS[task](text)
    except ValueError:
        return None
