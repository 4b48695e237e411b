"""The built-in tasks' judge: an answer scores 1 when it is the task's correct answer (surrounding
whitespace aside), else 0; an empty, wrong or over-long answer scores 0."""

from __future__ import annotations

from typing import List, Sequence

from dpo_sweep.tasks import solve


class BuiltinJudge:
    name = "builtin"

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> List[float]:
        scores = []
        for prompt, answer in zip(prompts, answers):
            correct = solve(prompt)
            scores.append(float(correct is not None and answer.strip() == correct))
        return scores
