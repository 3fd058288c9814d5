"""What the backend did to a graph: swaps and the candidate matches it left alone.

Counts go three places so that every audience finds them: the active ``explain`` report,
``torch._dynamo.utils.counters["chronicals"]`` (tests, scripts), and the ``chronicals_compile``
logger (users reading logs).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections import Counter
from typing import Iterator

log = logging.getLogger("chronicals_compile")


@dataclasses.dataclass
class Fallback:
    pattern: str
    node: str
    reason: str


@dataclasses.dataclass
class _Attempt:
    number: int
    swaps: Counter = dataclasses.field(default_factory=Counter)
    fallbacks: list[Fallback] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
    """Swaps per compiled graph. Dynamo may restart a capture (e.g. to specialise a float the
    first attempt passed symbolically); only each graph's last attempt counts."""

    notes: list[str] = dataclasses.field(default_factory=list)
    output: object = dataclasses.field(default=None, repr=False)
    _attempts: dict = dataclasses.field(default_factory=dict, repr=False)

    def _current(self) -> _Attempt:
        key, number = _compile_key()
        attempt = self._attempts.get(key)
        if attempt is None or attempt.number < number:
            attempt = self._attempts[key] = _Attempt(number)
        return attempt

    @property
    def graphs(self) -> int:
        return len(self._attempts)

    @property
    def swaps(self) -> dict[str, int]:
        total: Counter = Counter()
        for attempt in self._attempts.values():
            total.update(attempt.swaps)
        return dict(total)

    @property
    def fallbacks(self) -> list[Fallback]:
        return [f for attempt in self._attempts.values() for f in attempt.fallbacks]

    def __str__(self) -> str:
        lines = [f"chronicals: {self.graphs} graph(s) compiled", "", f"{'pattern':<24}{'swaps':>6}"]
        names = sorted(set(self.swaps) | {f.pattern for f in self.fallbacks})
        for name in names:
            lines.append(f"{name:<24}{self.swaps.get(name, 0):>6}")
        if not names:
            lines.append("(no candidate subgraphs)")
        if self.fallbacks:
            lines += ["", "left to Inductor:"]
            grouped: dict[tuple[str, str], list[Fallback]] = {}
            for f in self.fallbacks:  # one line per distinct reason: a model repeats its layers
                grouped.setdefault((f.pattern, f.reason), []).append(f)
            for (pattern, reason), same in grouped.items():
                times = f" (x{len(same)})" if len(same) > 1 else ""
                lines.append(f"  {pattern:<22} at {same[0].node}{times}: {reason}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _compile_key() -> tuple[object, int]:
    from torch._guards import CompileContext

    trace = CompileContext.current_trace_id()
    if trace is None:
        return None, 0
    cid = trace.compile_id
    return (cid.frame_id, cid.frame_compile_id), trace.attempt


_active: contextvars.ContextVar[Report | None] = contextvars.ContextVar("chronicals_report", default=None)


@contextlib.contextmanager
def collecting() -> Iterator[Report]:
    report = Report()
    token = _active.set(report)
    try:
        yield report
    finally:
        _active.reset(token)


def _counters() -> Counter:
    from torch._dynamo.utils import counters

    return counters["chronicals"]


def record_graph() -> None:
    report = _active.get()
    if report is not None:
        report._current()


def record_swap(pattern: str, where: str) -> None:
    _counters()[pattern] += 1
    log.info("chronicals: swapped %s at %s", pattern, where)
    report = _active.get()
    if report is not None:
        report._current().swaps[pattern] += 1


def record_fallback(pattern: str, where: str, reason: str) -> None:
    _counters()[f"{pattern}_fallback"] += 1
    log.info("chronicals: left %s at %s to Inductor: %s", pattern, where, reason)
    report = _active.get()
    if report is not None:
        report._current().fallbacks.append(Fallback(pattern, where, reason))


def record_note(note: str) -> None:
    log.info("chronicals: %s", note)
    report = _active.get()
    if report is not None and note not in report.notes:
        report.notes.append(note)
