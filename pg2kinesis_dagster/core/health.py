"""Slot health: what the facts read from PostgreSQL mean, as pass / warn / error findings. Pure: no I/O.

:mod:`pg2kinesis_dagster.postgres.health` reads a :class:`SlotHealth` (one snapshot of the slot, the
server's WAL position, the decoding statistics and the sessions that hold transactions open);
:func:`evaluate` turns it into one :class:`Finding` per check, each with a one-line summary, what to do,
and numbers for the trend in the Dagster UI. The Dagster asset checks (``defs.health``) and the alerts
(``defs.alerts``) only report what is decided here.

The checks:

* ``slot_lag_within_limit`` -- WAL written since the slot's confirmed position (``pg_current_wal_lsn() -
  confirmed_flush_lsn``): what replication still has to read. PostgreSQL keeps it on disk.
* ``slot_wal_status`` -- ``wal_status``: ``reserved`` is fine, ``extended`` (beyond ``max_wal_size``) a
  warning, ``unreserved`` (PostgreSQL will remove WAL the slot needs at the next checkpoint) and ``lost``
  errors; with ``max_slot_wal_keep_size`` set, ``safe_wal_size`` (WAL that may still be written before the
  slot is invalidated) against a fraction of it.
* ``slot_restart_lsn_not_pinned`` -- ``confirmed_flush_lsn - restart_lsn``. Every peek decodes from
  ``restart_lsn``, which cannot pass the start of the oldest transaction holding an xid anywhere in the
  cluster: an idle-in-transaction session or a forgotten prepared transaction pins it, and the slot keeps
  WAL (and each peek re-reads it) however far replication got. The finding names the likely culprits.
* ``replication_fresh`` -- changes are pending and no checkpoint was recorded for a while: replication is
  stopped, failing or stuck.

A slot that is missing or was invalidated (``lost``) fails every check with the way to recover.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from pg2kinesis_dagster.core.changes import format_lsn

LAG_CHECK = "slot_lag_within_limit"
WAL_STATUS_CHECK = "slot_wal_status"
PINNED_CHECK = "slot_restart_lsn_not_pinned"
FRESHNESS_CHECK = "replication_fresh"
CHECK_NAMES = (LAG_CHECK, WAL_STATUS_CHECK, PINNED_CHECK, FRESHNESS_CHECK)

GIB = 1024**3
MIB = 1024**2

MetadataValue = int | float | str | bool


class Level(str, Enum):
    OK = "ok"
    WARN = "warn"
    ERROR = "error"


@dataclass(frozen=True)
class Thresholds:
    """When a check warns and when it errors: a value above a limit (below, for safe_wal_size fractions)."""

    lag_warn_bytes: int = GIB
    lag_error_bytes: int = 8 * GIB
    pinned_warn_bytes: int = 512 * MIB
    pinned_error_bytes: int = 4 * GIB
    # safe_wal_size as a fraction of max_slot_wal_keep_size.
    safe_wal_warn_fraction: float = 0.5
    safe_wal_error_fraction: float = 0.2
    fresh_warn_minutes: float = 5.0
    fresh_error_minutes: float = 15.0


@dataclass(frozen=True)
class Session:
    """A backend holding a transaction id: it may pin the slot's restart_lsn."""

    pid: int
    user: str | None
    database: str | None
    xid: int | None
    # Hidden from roles without pg_read_all_stats (pg_monitor) for other roles' sessions: None then.
    application: str | None = None
    state: str | None = None
    xact_start: datetime | None = None
    client: str | None = None

    def describe(self) -> str:
        parts = [f"PID {self.pid}", f"user {self.user or '?'}"]
        if self.database:
            parts.append(f"database {self.database}")
        if self.application:
            parts.append(f"application {self.application!r}")
        if self.client:
            parts.append(f"client {self.client}")
        if self.state:
            parts.append(f"state {self.state}")
        if self.xact_start is not None:
            parts.append(f"transaction started {self.xact_start.isoformat(sep=' ', timespec='seconds')}")
        if self.xid is not None:
            parts.append(f"xid {self.xid}")
        return ", ".join(parts)


@dataclass(frozen=True)
class PreparedTransaction:
    gid: str
    owner: str | None
    database: str | None
    xid: int | None
    prepared: datetime | None = None

    def describe(self) -> str:
        when = f", prepared {self.prepared.isoformat(sep=' ', timespec='seconds')}" if self.prepared else ""
        return (f"prepared transaction {self.gid!r} (owner {self.owner or '?'}, database {self.database or '?'}"
                f"{when}; end it with COMMIT PREPARED or ROLLBACK PREPARED {_sql_literal(self.gid)})")


@dataclass(frozen=True)
class SlotHealth:
    """One snapshot of a slot and the server around it, as :mod:`postgres.health` read it."""

    slot_name: str
    where: str  # the database and server, for messages (never a password)
    current_wal_lsn: int
    exists: bool
    plugin: str | None = None
    database: str | None = None
    active_pid: int | None = None
    confirmed_flush_lsn: int | None = None
    restart_lsn: int | None = None
    wal_status: str | None = None
    safe_wal_size: int | None = None
    # PostgreSQL 16+ report why a slot was invalidated (conflicting, invalidation_reason).
    invalidation: str | None = None
    # max_slot_wal_keep_size in bytes; -1 when unlimited.
    max_slot_wal_keep_size: int = -1
    # pg_stat_replication_slots: name -> value (spill_txns, spill_bytes, stream_bytes, total_bytes ...).
    decoding_stats: dict[str, int] = field(default_factory=dict)
    # Sessions holding an xid, oldest first, and prepared transactions, oldest first.
    sessions: tuple[Session, ...] = ()
    prepared: tuple[PreparedTransaction, ...] = ()
    # Whether the role may see other roles' sessions in full (pg_read_all_stats, pg_monitor or superuser).
    can_see_all_sessions: bool = True
    role: str = ""
    # Whether the slot holds a change: True, False, or None when it could not be peeked (in use).
    pending: bool | None = None

    @property
    def lost(self) -> bool:
        return self.exists and (self.wal_status == "lost" or self.invalidation is not None)

    @property
    def lag_bytes(self) -> int | None:
        if self.confirmed_flush_lsn is None:
            return None
        return max(0, self.current_wal_lsn - self.confirmed_flush_lsn)

    @property
    def retained_wal_bytes(self) -> int | None:
        if self.restart_lsn is None:
            return None
        return max(0, self.current_wal_lsn - self.restart_lsn)

    @property
    def restart_lag_bytes(self) -> int | None:
        if self.restart_lsn is None or self.confirmed_flush_lsn is None:
            return None
        return max(0, self.confirmed_flush_lsn - self.restart_lsn)

    def position(self) -> str:
        """Where the slot stands, in words."""
        if not self.exists:
            return f"slot {self.slot_name!r} does not exist in {self.where}"
        confirmed = format_lsn(self.confirmed_flush_lsn) if self.confirmed_flush_lsn is not None else "?"
        lag = self.lag_bytes
        behind = f", {human_bytes(lag)} behind the WAL position {format_lsn(self.current_wal_lsn)}" \
            if lag is not None else ""
        return f"slot {self.slot_name!r} confirmed up to {confirmed}{behind}"


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    summary: str
    advice: str
    metadata: dict[str, MetadataValue]

    @property
    def passed(self) -> bool:
        return self.level is Level.OK


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _level(value: float | None, warn: float, error: float) -> Level:
    """``value`` against limits that it must stay at or under."""
    if value is None:
        return Level.OK
    if value > error:
        return Level.ERROR
    if value > warn:
        return Level.WARN
    return Level.OK


def recovery_advice(health: SlotHealth) -> str:
    name = health.slot_name
    plugin = health.plugin or "test_decoding"
    if not health.exists:
        return (
            f"Create the slot (pg2k --create-slot, PG2K_CREATE_SLOT=1, or SELECT "
            f"pg_create_logical_replication_slot('{name}', '{plugin}')). Changes committed while it did not "
            "exist were not captured: re-snapshot the replicated tables into the consumers."
        )
    return (
        f"The WAL the slot needed is gone, so the changes after {format_lsn(health.confirmed_flush_lsn or 0)} "
        f"cannot be read any more. Recreate the slot (pg2k --recreate-slot, or SELECT "
        f"pg_drop_replication_slot('{name}') and create it again), then re-snapshot the replicated tables into "
        "the consumers. To keep it from happening again, raise max_slot_wal_keep_size or keep replication "
        "running (the slot_lag_within_limit and slot_wal_status checks warn well before)."
    )


def _common_metadata(health: SlotHealth) -> dict[str, MetadataValue]:
    stats = health.decoding_stats

    def number(value: int | None) -> int:
        return -1 if value is None else int(value)

    metadata: dict[str, MetadataValue] = {
        "slot": health.slot_name,
        "slot_exists": health.exists,
        "current_wal_lsn": format_lsn(health.current_wal_lsn),
        "confirmed_flush_lsn": format_lsn(health.confirmed_flush_lsn) if health.confirmed_flush_lsn is not None
        else "none",
        "restart_lsn": format_lsn(health.restart_lsn) if health.restart_lsn is not None else "none",
        "lag_bytes": number(health.lag_bytes),
        "retained_wal_bytes": number(health.retained_wal_bytes),
        "restart_lag_bytes": number(health.restart_lag_bytes),
        "wal_status": health.wal_status or "none",
        "safe_wal_size_bytes": number(health.safe_wal_size),
        "active_pid": number(health.active_pid),
    }
    # Decoding that did not fit in logical_decoding_work_mem: spilled to disk, or streamed (in-progress).
    for name in ("spill_txns", "spill_count", "spill_bytes", "stream_txns", "stream_count", "stream_bytes",
                 "total_txns", "total_bytes"):
        metadata[name] = number(stats.get(name))
    return metadata


def _unusable(health: SlotHealth, check: str, metadata: dict[str, MetadataValue]) -> Finding:
    if not health.exists:
        summary = f"replication slot {health.slot_name!r} does not exist in {health.where}"
    else:
        why = f" ({health.invalidation})" if health.invalidation else ""
        summary = (f"replication slot {health.slot_name!r} was invalidated by PostgreSQL{why}: wal_status "
                   f"{health.wal_status}")
    return Finding(check, Level.ERROR, summary, recovery_advice(health), metadata)


def evaluate(
    health: SlotHealth, thresholds: Thresholds, *, minutes_since_checkpoint: float | None
) -> list[Finding]:
    """One finding per check of :data:`CHECK_NAMES`, in that order.

    ``minutes_since_checkpoint``: age of the last recorded checkpoint (None when none was ever recorded).
    """
    metadata = _common_metadata(health)
    metadata["minutes_since_checkpoint"] = (
        round(minutes_since_checkpoint, 2) if minutes_since_checkpoint is not None else -1.0
    )
    if not health.exists or health.lost:
        return [_unusable(health, name, dict(metadata)) for name in CHECK_NAMES]
    return [
        _lag(health, thresholds, dict(metadata)),
        _wal_status(health, thresholds, dict(metadata)),
        _pinned(health, thresholds, dict(metadata)),
        _freshness(health, thresholds, minutes_since_checkpoint, dict(metadata)),
    ]


def _lag(health: SlotHealth, t: Thresholds, metadata: dict[str, MetadataValue]) -> Finding:
    lag = health.lag_bytes
    metadata.update(lag_warn_bytes=t.lag_warn_bytes, lag_error_bytes=t.lag_error_bytes)
    # The name and first field of the check before it had levels: dashboards may read it.
    metadata["max_lag_bytes"] = t.lag_warn_bytes
    level = _level(lag, t.lag_warn_bytes, t.lag_error_bytes)
    if level is Level.OK:
        return Finding(LAG_CHECK, level, f"{health.position()}", "", metadata)
    limit = t.lag_error_bytes if level is Level.ERROR else t.lag_warn_bytes
    summary = f"{health.position()}: more than {human_bytes(limit)}, which PostgreSQL keeps on disk"
    advice = (
        "Replication is behind or stopped: check that the replication_sensor is running and its runs succeed "
        "(or that pg2k is running); a large backlog drains at the pipeline's rate. Until the slot moves, "
        "the WAL stays on the database server's disk: watch its free space."
    )
    return Finding(LAG_CHECK, level, summary, advice, metadata)


def _wal_status(health: SlotHealth, t: Thresholds, metadata: dict[str, MetadataValue]) -> Finding:
    status = health.wal_status or "unknown"
    metadata.update(safe_wal_warn_fraction=t.safe_wal_warn_fraction, safe_wal_error_fraction=t.safe_wal_error_fraction,
                    max_slot_wal_keep_size_bytes=health.max_slot_wal_keep_size)
    levels = {"reserved": Level.OK, "extended": Level.WARN, "unreserved": Level.ERROR, "lost": Level.ERROR}
    level = levels.get(status, Level.OK)
    reasons: list[str] = []
    if level is not Level.OK:
        reasons.append(f"wal_status is {status}")
    keep = health.max_slot_wal_keep_size
    fraction: float | None = None
    if keep > 0 and health.safe_wal_size is not None:
        fraction = health.safe_wal_size / keep
        metadata["safe_wal_fraction"] = round(fraction, 4)
        by_size = Level.OK
        if fraction < t.safe_wal_error_fraction:
            by_size = Level.ERROR
        elif fraction < t.safe_wal_warn_fraction:
            by_size = Level.WARN
        if by_size is not Level.OK:
            reasons.append(
                f"only {human_bytes(max(0, health.safe_wal_size))} of WAL may still be written before PostgreSQL "
                f"invalidates the slot ({fraction:.0%} of max_slot_wal_keep_size {human_bytes(keep)})"
            )
        level = max(level, by_size, key=_rank)
    if level is Level.OK:
        summary = f"wal_status {status}" + (f", {fraction:.0%} of max_slot_wal_keep_size left" if fraction else "")
        return Finding(WAL_STATUS_CHECK, level, summary, "", metadata)
    summary = f"replication slot {health.slot_name!r}: " + "; ".join(reasons)
    if status == "unreserved" or (fraction is not None and level is Level.ERROR):
        advice = (
            "The slot is about to be invalidated, which loses changes: make replication catch up now (check the "
            "replication runs), or raise max_slot_wal_keep_size. A pinned restart_lsn (see "
            "slot_restart_lsn_not_pinned) also keeps WAL: end the transaction that pins it."
        )
    else:
        advice = (
            "The slot keeps more WAL than max_wal_size: replication is behind or restart_lsn is pinned. Check the "
            "replication runs and slot_restart_lsn_not_pinned; watch the server's disk."
        )
    return Finding(WAL_STATUS_CHECK, level, summary, advice, metadata)


def _rank(level: Level) -> int:
    return {Level.OK: 0, Level.WARN: 1, Level.ERROR: 2}[level]


def worst(levels: list[Level]) -> Level:
    return max(levels, key=_rank) if levels else Level.OK


def _pinned(health: SlotHealth, t: Thresholds, metadata: dict[str, MetadataValue]) -> Finding:
    behind = health.restart_lag_bytes
    metadata.update(pinned_warn_bytes=t.pinned_warn_bytes, pinned_error_bytes=t.pinned_error_bytes,
                    sessions_holding_xid=len(health.sessions), prepared_transactions=len(health.prepared))
    level = _level(behind, t.pinned_warn_bytes, t.pinned_error_bytes)
    culprits = [s.describe() for s in health.sessions[:3]] + [p.describe() for p in health.prepared[:3]]
    if culprits:
        metadata["oldest_transactions"] = "; ".join(culprits)
    if level is Level.OK:
        return Finding(PINNED_CHECK, level, f"restart_lsn {human_bytes(behind or 0)} behind confirmed_flush_lsn",
                       "", metadata)
    assert behind is not None
    summary = (
        f"replication slot {health.slot_name!r}: restart_lsn {format_lsn(health.restart_lsn or 0)} is "
        f"{human_bytes(behind)} behind confirmed_flush_lsn {format_lsn(health.confirmed_flush_lsn or 0)}, so "
        "PostgreSQL keeps that WAL and every peek decodes it again"
    )
    if culprits:
        summary += ". Oldest transactions holding an xid: " + "; ".join(culprits)
    advice = (
        "restart_lsn cannot pass the start of the oldest transaction that holds a transaction id anywhere in the "
        "cluster. End it: commit or roll back the idle-in-transaction session (SELECT pg_terminate_backend(<pid>) "
        "as a last resort), finish the long batch job, or COMMIT/ROLLBACK PREPARED the forgotten prepared "
        "transaction; set idle_in_transaction_session_timeout to stop it recurring."
    )
    if not health.can_see_all_sessions:
        advice += (
            f" Role {health.role!r} cannot see other roles' sessions in full (their state, client and transaction "
            f"start are hidden): GRANT pg_monitor TO {health.role} (or pg_read_all_stats) so this check can name them."
        )
    if not culprits:
        advice += " No open transaction holding an xid was visible right now: it may have just ended."
    return Finding(PINNED_CHECK, level, summary, advice, metadata)


def _freshness(
    health: SlotHealth, t: Thresholds, minutes: float | None, metadata: dict[str, MetadataValue]
) -> Finding:
    metadata.update(fresh_warn_minutes=t.fresh_warn_minutes, fresh_error_minutes=t.fresh_error_minutes,
                    pending="unknown" if health.pending is None else health.pending)
    if health.pending is False:
        return Finding(FRESHNESS_CHECK, Level.OK, "no change pending", "", metadata)
    # Pending, or unknown because another backend reads the slot right now: judge by the last checkpoint.
    age = float("inf") if minutes is None else minutes
    level = _level(age, t.fresh_warn_minutes, t.fresh_error_minutes)
    when = ("no checkpoint was ever recorded" if minutes is None
            else f"the last checkpoint was {minutes:.1f} minutes ago")
    what = "changes are pending" if health.pending else (
        f"the slot is in use by PID {health.active_pid}" if health.active_pid else "the slot is in use")
    if level is Level.OK:
        return Finding(FRESHNESS_CHECK, level, f"{what}; {when}", "", metadata)
    summary = f"replication of slot {health.slot_name!r} is not moving: {what} and {when}; {health.position()}"
    advice = (
        "Replication is stopped, failing or stuck: turn the replication_sensor on (or the replicate_schedule), "
        "look at the latest replicate runs' errors, and cancel a run that hangs. Nothing is lost while the slot "
        "waits; it only holds WAL."
    )
    return Finding(FRESHNESS_CHECK, level, summary, advice, metadata)
