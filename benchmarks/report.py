"""Collecting measurements and printing them as a markdown table with ratios."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "/s", "ms" or "%"
    higher_is_better: bool = True


@dataclass
class Target:
    """An issue target: a description and a check over the row's values by system."""

    text: str
    check: Callable[[dict[str, float | None]], bool | None]


def ratio_to(
    competitors: tuple[str, ...], minimum: float
) -> Callable[[dict[str, float | None]], bool | None]:
    """sitq's value is at least ``minimum`` times the best of ``competitors``'."""

    def check(values: dict[str, float | None]) -> bool | None:
        mine = values.get("sitq")
        found = [values.get(name) for name in competitors]
        theirs = [value for value in found if value is not None and not math.isnan(value)]
        if mine is None or math.isnan(mine) or not theirs:
            return None
        return mine >= minimum * max(theirs)

    return check


def below(limit: float) -> Callable[[dict[str, float | None]], bool | None]:
    def check(values: dict[str, float | None]) -> bool | None:
        mine = values.get("sitq")
        return None if mine is None or math.isnan(mine) else mine < limit

    return check


def at_least(limit: float) -> Callable[[dict[str, float | None]], bool | None]:
    def check(values: dict[str, float | None]) -> bool | None:
        mine = values.get("sitq")
        return None if mine is None or math.isnan(mine) else mine >= limit

    return check


@dataclass
class Results:
    systems: list[str]
    metrics: list[Metric] = field(default_factory=list)
    values: dict[str, dict[str, float | None]] = field(default_factory=dict)
    notes: dict[tuple[str, str], str] = field(default_factory=dict)
    targets: dict[str, Target] = field(default_factory=dict)

    def metric(self, metric: Metric, target: Target | None = None) -> Metric:
        if metric not in self.metrics:
            self.metrics.append(metric)
        if target is not None:
            self.targets[metric.key] = target
        return metric

    def put(self, system: str, metric: Metric, value: float | None, note: str = "") -> None:
        self.values.setdefault(metric.key, {})[system] = value
        if note:
            self.notes[(metric.key, system)] = note


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if math.isnan(value):
        return "-"
    if unit == "ms":
        return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "%":
        return f"{value:.0f}%"
    return f"{value:,.0f}{unit}"


def _ratio(metric: Metric, mine: float | None, theirs: float | None) -> str:
    if mine is None or theirs is None or math.isnan(mine) or math.isnan(theirs):
        return "-"
    if metric.unit == "%":
        return "-"
    if metric.higher_is_better:
        return f"{mine / theirs:.2f}x" if theirs > 0 else "-"
    # Latencies: how many times lower sitq's is (>1 is better for sitq).
    return f"{theirs / mine:.1f}x lower" if mine > 0 else "-"


def table(results: Results) -> str:
    sitq, competitors = results.systems[0], results.systems[1:]
    header = ["metric", *results.systems]
    header += [f"{sitq} vs {other}" for other in competitors]
    header += ["target", "met?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in results.metrics:
        values = results.values.get(metric.key, {})
        cells = [metric.label]
        for system in results.systems:
            text = _number(values.get(system), metric.unit)
            extra = results.notes.get((metric.key, system))
            cells.append(f"{text} ({extra})" if extra else text)
        for other in competitors:
            cells.append(_ratio(metric, values.get(sitq), values.get(other)))
        target = results.targets.get(metric.key)
        if target is None:
            cells += ["", ""]
        else:
            verdict = target.check(values)
            cells += [target.text, {True: "yes", False: "**NO**", None: "?"}[verdict]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
