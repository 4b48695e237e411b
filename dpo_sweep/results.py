"""A sweep's trials as results: one definition of a trial's state (interrupted included), one
ranking, one way to count and to tabulate them. The end-of-sweep summary fills these from the
Optuna study, `python -m dpo_sweep.report` from the MLflow store; both print the same way.

No Optuna and no MLflow here: plain values in, text out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from dpo_sweep import names

STATES = ("COMPLETE", "PRUNED", "FAIL")  # a finished trial's state; the order of the table after ranking
INTERRUPTED_LABEL = "FAIL (interrupted)"


def is_interrupted(state: str, marks: Mapping[str, Any]) -> bool:
    """Whether a FAIL trial was cut short (its sweeper died or was stopped) rather than failing:
    it does not count and its point runs again. `marks` are the trial's Optuna user attrs or its
    MLflow run's tags. Stores written before runs carried the `sweep.interrupted` tag say so in
    the error text alone ("interrupted: its sweeper died")."""
    if state != "FAIL":
        return False
    flag = marks.get(names.INTERRUPTED)
    if flag is not None:
        return flag is True or str(flag).lower() == "true"
    return str(marks.get(names.ERROR, "")).startswith("interrupted")


@dataclass
class TrialResult:
    """One trial of a sweep, wherever it was read from."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL, or RUNNING, WAITING, an MLflow status when untagged
    params: Dict[str, Any] = field(default_factory=dict)  # swept key -> value
    values: Optional[List[float]] = None  # the final objective(s) of a complete trial
    interrupted: bool = False
    last_report: Optional[Tuple[int, float]] = None  # (step, value) of a pruned trial's last eval
    duration_s: Optional[float] = None
    built: Tuple[str, ...] = ()  # the shared caches the trial built (sft, reflogps, refsamples): in its duration
    pack: str = ""  # the trials it trained beside in one process (hydra.sweeper.pack), "4,5,6,7"; "" alone
    error: Optional[str] = None

    @property
    def label(self) -> str:
        """The state as tables show it: FAIL (interrupted) apart from plain FAIL."""
        return INTERRUPTED_LABEL if self.interrupted else self.state


def counts(trials: Sequence[TrialResult]) -> Dict[str, int]:
    """Trials by state: COMPLETE, PRUNED and FAIL count finished trials (an interrupted trial is
    not among the FAIL ones); INTERRUPTED those cut short; any other state (RUNNING) as itself."""
    out = {state: 0 for state in STATES}
    out["INTERRUPTED"] = 0
    for t in trials:
        key = "INTERRUPTED" if t.interrupted else t.state
        out[key] = out.get(key, 0) + 1
    return out


def describe_counts(trials: Sequence[TrialResult]) -> str:
    """"3 COMPLETE, 1 FAIL (interrupted)": the non-zero counts."""
    shown = {"INTERRUPTED": INTERRUPTED_LABEL}
    return ", ".join(f"{n} {shown.get(k, k)}" for k, n in counts(trials).items() if n) or "none yet"


def rank(trials: Sequence[TrialResult], directions: Sequence[str], best: Sequence[int] = ()) -> List[TrialResult]:
    """Complete trials best first (the best trial or Pareto front, then by objective, ties by
    number), then pruned, failed, interrupted and other trials, each by number."""
    sign = [-1 if d == "maximize" else 1 for d in directions]
    done = sorted((t for t in trials if t.values is not None),
                  key=lambda t: (t.number not in best, [s * v for s, v in zip(sign, t.values)], t.number))
    order = {"PRUNED": 1, "FAIL": 2, INTERRUPTED_LABEL: 3}
    rest = sorted((t for t in trials if t.values is None), key=lambda t: (order.get(t.label, 4), t.number))
    return done + rest


def best_complete(trials: Sequence[TrialResult], directions: Sequence[str]) -> List[int]:
    """The number of the best complete trial by the first objective (empty when none completed)."""
    ranked = rank(trials, directions)
    return [ranked[0].number] if ranked and ranked[0].values is not None else []


# -- cells and tables


def fmt(value: Any) -> str:
    """A cell: numbers (or numeric strings) to 4 significant digits, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "-"
    return f"{number:.4g}"


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def objective_cell(trial: TrialResult) -> str:
    """The final objective, or a pruned trial's last reported value and its step."""
    if trial.values is not None:
        return ", ".join(fmt(v) for v in trial.values)
    if trial.last_report is not None:
        return f"{fmt(trial.last_report[1])} (step {trial.last_report[0]})"
    return "-"


Column = Tuple[str, Callable[[TrialResult], str]]


def param_columns(keys: Sequence[str]) -> List[Column]:
    return [(k, lambda t, k=k: fmt(t.params.get(k))) for k in keys]


TRIAL = ("trial", lambda t: str(t.number))
STATE = ("state", lambda t: t.label)
OBJECTIVE = ("objective", objective_cell)
DURATION = ("duration", lambda t: fmt_duration(t.duration_s) + (" *" if t.built else "") + (" +" if t.pack else ""))
DURATION_NOTE = ("* built the shared caches ({kinds}) that the other trials loaded: its duration includes them; "
                 "the others' cover start-up, training and evaluation")
PACK_NOTE = ("+ trained in a pack (trials {packs}), one process over one base model: its duration is the whole "
             "pack's, shared with the trials beside it")


def duration_note(trials: Sequence[TrialResult]) -> Optional[str]:
    """The footnotes of the duration column, when a trial built caches or trained in a pack."""
    kinds = sorted({k for t in trials for k in t.built})
    packs = sorted({t.pack for t in trials if t.pack}, key=lambda p: [int(n) for n in p.split(",") if n.isdigit()])
    notes = [DURATION_NOTE.format(kinds=", ".join(CACHE_NAMES.get(k, k) for k in kinds))] if kinds else []
    notes += [PACK_NOTE.format(packs="; ".join(packs))] if packs else []
    return "\n".join(notes) or None


CACHE_NAMES = {"sft": "SFT weights", "reflogps": "reference log-probs", "refsamples": "reference samples"}


def table_rows(trials: Sequence[TrialResult], columns: Sequence[Column]) -> Tuple[List[str], List[List[str]]]:
    """(header, rows) of a trials table, one row per trial in the given order."""
    return [name for name, _ in columns], [[cell(t) for _, cell in columns] for t in trials]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned with spaces, a dashed rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with aligned columns (readable as plain text too)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def error_lines(trials: Sequence[TrialResult]) -> List[str]:
    """"trial N: why" for every failed trial that says why (interrupted ones included)."""
    return [f"trial {t.number}: {t.error}" for t in trials if t.state == "FAIL" and t.error]
