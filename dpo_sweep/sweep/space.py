"""The search space of a sweep, from Hydra sweep overrides to Optuna distributions.

`x=a,b` and `choice()` are categorical, `range()` is finite (exclusive end, as in Hydra),
`interval()` is continuous (`int(...)` for integers, `tag(log, ...)` for a log scale); other
overrides are fixed and pass through to every trial.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from dpo_sweep.config import ConfigError


@dataclass(frozen=True)
class Dimension:
    """One swept config key: its Optuna distribution and, when finite, its values in order."""

    key: str  # the override key: optimizer.lr, loss, +new.key
    spec: str  # as written: tag(log, interval(1e-5, 1e-2))
    distribution: BaseDistribution
    values: Optional[Tuple[Any, ...]]  # every value (list, choice, range); None for interval()
    # Choices written as a list or dict, held as their override text (see _choice_value)
    containers: Tuple[str, ...] = ()

    def override(self, value: Any) -> str:
        """The override that sets this key to `value` in a trial."""
        text = value if isinstance(value, str) and value in self.containers else override_text(value)
        return f"{self.key}={text}"

    def corners(self) -> Tuple[Any, ...]:
        """The values that stand for this dimension in a check: every value, or an interval's bounds."""
        if self.values is not None:
            return self.values
        return (self.distribution.low, self.distribution.high)


def override_text(value: Any) -> str:
    """`value` as a Hydra override value: strings quoted (so '1' stays a string), lists and
    dicts in Hydra's syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_text(v)}" for k, v in value.items()) + "}"
    return quote(str(value))


def quote(text: str) -> str:
    """A single-quoted Hydra string: quotes escaped, and backslashes that precede one (or end
    the string) doubled, as Hydra's grammar wants."""
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def _choice_value(value: Any) -> Any:
    """A categorical choice as Optuna stores it: primitives as they are, lists and dicts as
    their override text (Optuna choices must be str, int, float, bool or None)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return override_text(value)


def to_dimension(override: Override) -> Dimension:
    """The Dimension of a sweep override; ConfigError naming the key for what Optuna cannot take."""
    key = override.get_key_element()
    spec = override.input_line.split("=", 1)[1] if override.input_line else str(override.value())
    sweep = override.value()

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"sweep parameter '{key}' = {spec!r}: expected {expected}")

    if isinstance(sweep, IntervalSweep):
        return _interval_dimension(key, spec, sweep, fail)
    if sweep.tags:
        raise fail("tag(log, ...) only on interval(); choice() and range() take no tags")
    if isinstance(sweep, ChoiceSweep):
        values = tuple(dict.fromkeys(_choice_value(v) for v in sweep.list))  # unique, in order
        containers = tuple(_choice_value(v) for v in sweep.list if isinstance(v, (list, dict)))
        return Dimension(key, spec, CategoricalDistribution(values), values, containers)
    if isinstance(sweep, RangeSweep):
        return _range_dimension(key, spec, range_values(sweep), sweep, fail)
    raise fail("a list (a,b,c), choice(), range() or interval()")


def _interval_dimension(key: str, spec: str, sweep: IntervalSweep, fail) -> Dimension:
    if sweep.tags - {"log"}:
        raise fail(f"no tag but 'log' (got {', '.join(sorted(sweep.tags))})")
    log_scale = "log" in sweep.tags
    if not sweep.start < sweep.end:
        raise fail("interval(low, high) with low < high")
    if log_scale and sweep.start <= 0:
        raise fail("low > 0 for a log scale")
    if isinstance(sweep.start, int) and isinstance(sweep.end, int):  # int(interval(...))
        return Dimension(key, spec, IntDistribution(sweep.start, sweep.end, log=log_scale), None)
    return Dimension(key, spec, FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale), None)


def range_values(sweep: RangeSweep) -> List[Any]:
    """The values of range(start, stop, step), end excluded. Floats are counted, not summed, and
    rounded, so range(0.1, 0.4, 0.1) is 0.1, 0.2, 0.3 (Hydra's own gives 0.30000000000000004 and 0.4)."""
    start, stop, step = sweep.start, sweep.stop, sweep.step
    if all(isinstance(v, int) for v in (start, stop, step)):
        return list(range(start, stop, step))
    count = math.ceil((stop - start) / step - 1e-9) if step else 0
    return [round(start + i * step, 12) for i in range(max(0, count))]


def _range_dimension(key: str, spec: str, values: List[Any], sweep: RangeSweep, fail) -> Dimension:
    if not values:
        raise fail("a range() with at least one value (the end is exclusive)")
    if all(isinstance(v, int) for v in values):
        step = abs(int(sweep.step)) if len(values) > 1 else 1
        return Dimension(key, spec, IntDistribution(min(values), max(values), step=step), tuple(values))
    return Dimension(key, spec, CategoricalDistribution(tuple(values)), tuple(values))


def parse_search_space(params: Optional[Dict[str, Any]], arguments: Sequence[str],
                       config_loader=None) -> Tuple[List[Dimension], List[str]]:
    """(dimensions, fixed overrides) from `hydra.sweeper.params` and the command line; the
    command line wins for a key set in both."""
    parser = OverridesParser.create(config_loader=config_loader)
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    overrides: Dict[str, Override] = {}
    for line in lines:
        override = parser.parse_override(line)
        overrides.pop(override.get_key_element(), None)
        overrides[override.get_key_element()] = override
    dims = [to_dimension(o) for o in overrides.values() if o.is_sweep_override()]
    fixed = [o.input_line for o in overrides.values() if not o.is_sweep_override()]
    return dims, fixed


def grid_points(dims: Sequence[Dimension]) -> List[Dict[str, Any]]:
    """Every combination of the dimensions' values, in order (one point if there are none)."""
    return [dict(zip([d.key for d in dims], combo)) for combo in itertools.product(*(d.values for d in dims))]


def check_points(dims: Sequence[Dimension], limit: int) -> Iterator[Dict[str, Any]]:
    """The points whose configs a check validates: every combination of each dimension's corners
    (its values, or an interval's two bounds), in grid order. Past `limit` points, each
    dimension's corners alone, the other dimensions at their first corner."""
    corners = [d.corners() for d in dims]
    if math.prod(len(c) for c in corners) <= limit:
        yield from (dict(zip([d.key for d in dims], combo)) for combo in itertools.product(*corners))
        return
    first = {d.key: c[0] for d, c in zip(dims, corners)}
    for d, values in zip(dims, corners):
        yield from (dict(first, **{d.key: v}) for v in values)


def describe(dims: Sequence[Dimension]) -> Dict[str, str]:
    return {d.key: d.spec for d in dims}


def format_params(params: Dict[str, Any]) -> str:
    """A point of the space for a log line: `beta=0.1, optimizer.lr=0.001`."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def in_space(dims: Sequence[Dimension], params: Dict[str, Any]) -> bool:
    """Whether `params` is a point of the search space `dims` (it may have changed since)."""
    if set(params) != {d.key for d in dims}:
        return False
    for d in dims:
        value, dist = params[d.key], d.distribution
        inside = value in dist.choices if isinstance(dist, CategoricalDistribution) else dist.low <= value <= dist.high
        if not inside:
            return False
    return True
