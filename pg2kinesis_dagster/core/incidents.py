"""Incidents: which problems are new, which got worse, which are over -- so each is announced once. Pure.

The alert sensor (``defs.alerts``) turns what it saw since its last tick into :class:`Signal` objects:
a failing check or a failed run is a problem; a passing check or a succeeded run clears what it had
raised. :class:`IncidentBook` remembers the open incidents between ticks (in the sensor's cursor), so a
failure that repeats every tick -- a check failing each minute, the sensor's runs failing one after the
other -- is announced when it starts, again only if it gets worse (warn -> error) or changes kind (another
error), and once more when it is over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

WARN = "warn"
ERROR = "error"
_RANK = {WARN: 1, ERROR: 2}


@dataclass(frozen=True)
class Signal:
    """A problem seen now (``level`` warn or error), keyed by what it is about."""

    key: str  # e.g. "check:slot_lag_within_limit" or "run:replicate:publish:SinkError"
    level: str
    title: str  # what failed, one line
    detail: str = ""  # the finding's summary or the error's first line
    advice: str = ""  # what to do


@dataclass(frozen=True)
class Changes:
    opened: list[Signal]
    escalated: list[Signal]
    resolved: list[tuple[str, dict[str, Any]]]  # (key, what was open)

    def __bool__(self) -> bool:
        return bool(self.opened or self.escalated or self.resolved)


@dataclass
class IncidentBook:
    """Open incidents: key -> {"level", "since" (epoch seconds), "title"}."""

    open: dict[str, dict[str, Any]] = field(default_factory=dict)

    def update(self, problems: list[Signal], cleared: list[str], now: float) -> Changes:
        """Record ``problems`` (failing now) and ``cleared`` key prefixes (their source succeeded or passed now).

        Open incidents under a cleared prefix are resolved, except those failing in ``problems`` too.
        """
        failing = {p.key for p in problems}
        resolved: list[tuple[str, dict[str, Any]]] = []
        for prefix in cleared:
            for key in [k for k in self.open if k.startswith(prefix) and k not in failing]:
                resolved.append((key, self.open.pop(key)))
        opened: list[Signal] = []
        escalated: list[Signal] = []
        for problem in problems:
            current = self.open.get(problem.key)
            if current is None:
                self.open[problem.key] = {"level": problem.level, "since": now, "title": problem.title}
                opened.append(problem)
            elif _RANK.get(problem.level, 0) > _RANK.get(current["level"], 0):
                current["level"] = problem.level
                escalated.append(problem)
        return Changes(opened, escalated, resolved)

    def to_json(self) -> dict[str, Any]:
        return {"open": self.open}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> IncidentBook:
        return cls(open=dict((data or {}).get("open", {})))


def _since(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(slot: str, where: str, position: str, changes: Changes, now: float) -> str:
    """One message (Slack mrkdwn-compatible plain text) for everything that changed in one tick."""
    lines: list[str] = []
    problems = changes.opened + changes.escalated
    if problems:
        worst = ERROR if any(p.level == ERROR for p in problems) else WARN
        icon = ":rotating_light:" if worst == ERROR else ":warning:"
        lines.append(f"{icon} pg2kinesis {worst.upper()}: replication slot '{slot}' ({where})")
        # Findings that say the same (a missing slot fails every check) are listed once.
        grouped: dict[tuple[str, str, str], list[Signal]] = {}
        for p in problems:
            grouped.setdefault((p.level, p.detail, p.advice), []).append(p)
        for (level, detail, advice), signals in grouped.items():
            titles = ", ".join(s.title for s in signals)
            worse = " (worse than before)" if any(s in changes.escalated for s in signals) else ""
            lines.append(f"• {level.upper()} {titles}{worse}: {detail}")
            if advice:
                lines.append(f"  What to do: {advice}")
        lines.append(f"Where the slot stands: {position}")
    if changes.resolved:
        if not lines:
            lines.append(f":white_check_mark: pg2kinesis: replication slot '{slot}' ({where})")
        for _key, info in changes.resolved:
            lines.append(f"• resolved: {info.get('title', _key)} (open since {_since(float(info.get('since', now)))})")
        if not problems:
            lines.append(f"Where the slot stands: {position}")
    return "\n".join(lines)


def dumps(state: dict[str, Any]) -> str:
    return json.dumps(state, sort_keys=True, separators=(",", ":"))


def loads(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
