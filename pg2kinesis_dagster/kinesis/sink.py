"""Send records to a Kinesis data stream: every record acknowledged, or an error.

The caller advances the replication slot only after :meth:`KinesisSink.put`
returns, so ``put`` either gets every record acknowledged by Kinesis or raises
:class:`SinkError`. Failed entries are retried in place, and
:func:`~pg2kinesis_dagster.core.batching.next_request` never sends a later
change of a row while an earlier one is unacknowledged, so each row's changes
reach the stream in commit order (at-least-once: a record may be written twice
if an acknowledgement is lost, never reordered per row).

With ``aggregate=True`` the records are first packed into KPL-aggregated
records, one shard's changes per aggregate (:mod:`.aggregation`); the same
rules then apply to the aggregates, which keeps each row's order too.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoRegionError,
    ProfileNotFound,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from pg2kinesis_dagster import native
from pg2kinesis_dagster.core.batching import (
    DONE,
    IN_FLIGHT,
    MAX_RECORD_BYTES,
    WAITING,
    Record,
    check_record,
    hot_rows,
    next_request,
    request_bytes_limit,
    split_at_barriers,
)
from pg2kinesis_dagster.core.errors import ConfigError, SinkError
from pg2kinesis_dagster.kinesis import put_records_body
from pg2kinesis_dagster.kinesis.aggregation import (
    AggregatedRecord,
    ShardMap,
    ShardMapError,
    record_hash_key,
)
from pg2kinesis_dagster.kinesis.aggregation import aggregate as aggregate_records

# botocore builds client classes at runtime; there is no importable type.
KinesisClient = Any
# What one PutRecords call gave: its response, or the botocore error it raised.
_Answer = Any
# PutRecords requests in flight at once by default: 8 x 500 records per 20-30 ms round trip is more than a
# 40-shard stream accepts; botocore's connection pool is sized to match (make_kinesis_client).
DEFAULT_MAX_IN_FLIGHT = 8

# Request-level error codes worth retrying (besides any HTTP 5xx).
RETRYABLE_REQUEST_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "KMSThrottlingException",
        "InternalFailure",
        "InternalFailureException",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
    }
)
# KMS problems that retrying cannot fix: the key is gone, disabled or forbidden.
KMS_KEY_ERROR_CODES = frozenset(
    {
        "KMSAccessDeniedException",
        "KMSDisabledException",
        "KMSInvalidStateException",
        "KMSNotFoundException",
        "KMSOptInRequired",
    }
)
THROTTLING_CODES = frozenset(
    {"ProvisionedThroughputExceededException", "KMSThrottlingException", "ThrottlingException",
     "LimitExceededException", "RequestLimitExceeded", "Throttling", "TooManyRequestsException"}
)
# Transport failures: the request may or may not have been applied; resending is
# safe under at-least-once.
_TRANSPORT_ERRORS = (HTTPClientError, BotoConnectionError)
# Shard map reloads within one put (aggregation) before giving up: each follows a
# resharding seen in PutRecords' answers, so more means the stream keeps changing.
MAX_SHARD_MAP_RELOADS = 10
# A shard map is listed again after this long even without a sign of resharding.
SHARD_MAP_MAX_AGE_SECONDS = 60.0


def make_kinesis_client(
    region_name: str | None = None,
    endpoint_url: str | None = None,
    profile_name: str | None = None,
    connect_timeout: float = 5,
    read_timeout: float = 30,
    max_attempts: int = 3,
    *,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
    aws_session_token: str | None = None,
    verify: bool | None = None,
    use_ssl: bool = True,
) -> KinesisClient:
    """A Kinesis client using the standard AWS credential chain.

    With ``endpoint_url=None`` botocore still honours ``AWS_ENDPOINT_URL_KINESIS``
    / ``AWS_ENDPOINT_URL`` (e.g. to point at a local emulator).
    """
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # botocore's own retries cover brief blips inside one call; the sink's
        # loop handles longer outages and per-entry failures.
        retries={"max_attempts": max_attempts, "mode": "standard"},
        # One connection per PutRecords request in flight (KinesisSink.max_in_flight), and a few more.
        max_pool_connections=DEFAULT_MAX_IN_FLIGHT + 4,
    )
    try:
        # Explicit keys are for dagster-aws-style resources fed by EnvVar; None means the chain.
        session = boto3.session.Session(
            profile_name=profile_name,
            region_name=region_name,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
        )
        client = session.client("kinesis", endpoint_url=endpoint_url, config=config, verify=verify, use_ssl=use_ssl)
        return put_records_body.install(client)
    except ProfileNotFound as exc:
        raise ConfigError(
            f"AWS profile {profile_name!r} not found in the AWS config/credentials files: "
            "fix --aws-profile or the AWS_PROFILE environment variable."
        ) from exc
    except NoRegionError as exc:
        raise ConfigError(
            "no AWS region configured for Kinesis: pass --aws-region or set AWS_REGION / "
            "AWS_DEFAULT_REGION."
        ) from exc


@dataclass(slots=True)
class PutReport:
    """What one :meth:`KinesisSink.put` call did."""

    records: int  # Kinesis records written (the input's records, or the aggregates carrying them)
    requests: int  # PutRecords calls made, including failed ones
    retried_entries: int  # entries sent again after a failure (per-entry or whole request)
    throttled_entries: int  # of those failures, how many were throttling
    seconds: float
    # Changes (input records) carried, all acknowledged; equals ``records``
    # without aggregation, which the default (-1) stands for.
    user_records: int = -1
    # Without aggregation: the rows with the most changes in this put (at least HOT_ROW_CHANGES), as
    # ("schema.table:key", changes). Each change of such a row waits a round trip for the previous one.
    hot_rows: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.user_records < 0:
            self.user_records = self.records


@dataclass(frozen=True)
class PreparedPut:
    """Records validated and, with aggregation, packed: what :meth:`KinesisSink.send` sends."""

    records: Sequence[Record]
    # The runs between barriers, and each one's aggregates (None without aggregation).
    segments: list[Sequence[Record]]
    packed: list[list[Record] | None]
    seconds: float = 0.0


@dataclass(slots=True)
class _Progress:
    """Counters and retry state of one put, shared by its ListShards and PutRecords calls."""

    total: int  # changes to acknowledge
    last_progress: float  # clock time of the last acknowledgement (or the start)
    started: float = field(init=False)
    acknowledged: int = 0  # changes acknowledged so far
    requests: int = 0
    retried: int = 0
    throttled: int = 0
    failing_rounds: int = 0  # consecutive rounds without any acknowledgement
    last_errors: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.started = self.last_progress


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def _error_message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", "")).strip()


def _http_status(exc: ClientError) -> int:
    try:
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    except (TypeError, ValueError):
        return 0


class KinesisSink:
    """Puts records into one stream, retrying until all are acknowledged or time runs out."""

    def __init__(
        self,
        client: KinesisClient,
        stream_name: str,
        *,
        max_retry_seconds: float = 300.0,
        base_backoff: float = 0.1,
        max_backoff: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        aggregate: bool = False,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if not stream_name:
            raise ConfigError("the Kinesis stream name is empty: pass --stream-name.")
        self.client = client
        self.stream_name = stream_name
        self.max_retry_seconds = max_retry_seconds
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        # KPL-aggregate records (many changes per Kinesis record); needs kinesis:ListShards.
        self.aggregate = aggregate
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be at least 1, not {max_in_flight}")
        # PutRecords requests sent before the earlier ones are answered (1: one at a time).
        self.max_in_flight = max_in_flight
        # The stream's record size limit (MaxRecordSizeInKiB), read by check_stream(); until then unknown.
        self._max_record_bytes: int | None = None
        # The threads that send requests concurrently (made on first use, see _send).
        self._pool: ThreadPoolExecutor | None = None
        # The shard map aggregation routes by, and when it was listed (see _current_shard_map).
        self._shard_map: ShardMap | None = None
        self._shard_map_listed = 0.0

    @property
    def stream_checked(self) -> bool:
        """Whether :meth:`check_stream` ran (and passed) for this sink."""
        return self._max_record_bytes is not None

    @property
    def max_record_bytes(self) -> int:
        """The largest record the stream accepts: 1 MiB unless raised for this stream (up to 10 MiB) and known
        from :meth:`check_stream`."""
        return MAX_RECORD_BYTES if self._max_record_bytes is None else self._max_record_bytes

    # -- where we talk to, for messages (never credentials) -----------------

    def _where(self) -> str:
        meta = getattr(self.client, "meta", None)
        region = getattr(meta, "region_name", None)
        endpoint = getattr(meta, "endpoint_url", None)
        parts = []
        if region:
            parts.append(f"region {region}")
        if endpoint:
            parts.append(f"endpoint {endpoint}")
        return ", ".join(parts) or "the configured AWS account"

    # -- stream check --------------------------------------------------------

    def check_stream(self) -> dict[str, Any]:
        """Fail early with a clear message unless the stream exists and accepts writes.

        Returns the ``StreamDescriptionSummary``.
        """
        name = self.stream_name
        try:
            summary = self.client.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        except ClientError as exc:
            code = _error_code(exc)
            if code == "ResourceNotFoundException":
                raise SinkError(self._missing_stream_message()) from exc
            if code in ("AccessDeniedException", "AccessDenied", "UnauthorizedOperation"):
                raise SinkError(
                    f"access denied describing Kinesis stream {name!r} in {self._where()}: the AWS "
                    "identity in use needs kinesis:DescribeStreamSummary and kinesis:PutRecords on "
                    f"this stream ({code}: {_error_message(exc)})."
                ) from exc
            raise SinkError(
                f"cannot describe Kinesis stream {name!r} in {self._where()}: {code}: "
                f"{_error_message(exc)}"
            ) from exc
        except _TRANSPORT_ERRORS as exc:
            raise SinkError(
                f"cannot reach Kinesis in {self._where()} to check stream {name!r}: {exc}. Check the "
                "network, the region and any endpoint override (AWS_ENDPOINT_URL_KINESIS)."
            ) from exc
        except BotoCoreError as exc:
            raise SinkError(self._botocore_message(exc, "check stream")) from exc
        status = summary.get("StreamStatus")
        if status not in ("ACTIVE", "UPDATING"):
            hint = {
                "CREATING": "it is still being created; wait until it is ACTIVE and run again",
                "DELETING": "it is being deleted; recreate it or choose another --stream-name",
            }.get(str(status), "wait until it is ACTIVE")
            raise SinkError(
                f"Kinesis stream {name!r} in {self._where()} is {status}, not ACTIVE: {hint}."
            )
        # Absent (older APIs, emulators): the default 1 MiB.
        kib = summary.get("MaxRecordSizeInKiB")
        self._max_record_bytes = int(kib) * 1024 if isinstance(kib, int) and kib > 0 else MAX_RECORD_BYTES
        return dict(summary)

    def _botocore_message(self, exc: BotoCoreError, action: str) -> str:
        kind = type(exc).__name__
        if kind in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return (
                f"cannot {action} on Kinesis stream {self.stream_name!r}: no usable AWS credentials "
                f"({kind}). Configure them through the standard chain (environment, "
                "--aws-profile / AWS_PROFILE, instance or task role)."
            )
        return f"cannot {action} on Kinesis stream {self.stream_name!r} in {self._where()}: {kind}: {exc}"

    # -- put -----------------------------------------------------------------

    def put(self, records: Sequence[Record]) -> PutReport:
        """Send every record; return once Kinesis acknowledged all of them, else raise SinkError.

        With ``aggregate=True`` the records are packed into KPL-aggregated
        records first (one shard per aggregate, see :mod:`.aggregation`).
        """
        return self.send(self.prepare(records))

    def prepare(self, records: Sequence[Record]) -> PreparedPut:
        """The first half of :meth:`put`: validate ``records`` and, with aggregation, pack them for the shard
        map in use. Sends nothing, so a publisher may prepare the next chunk while this sink sends the last."""
        started = self._clock()
        self._check_records(records)
        # Segments go strictly one after another, so a TRUNCATE never overtakes (or is overtaken by) the
        # row changes around it, whatever their keys; without barriers there is one segment.
        segments = split_at_barriers(records) if records else []
        packed: list[list[Record] | None] = [None] * len(segments)
        if self.aggregate and segments:
            shard_map = self._current_shard_map(_Progress(total=len(records), last_progress=started))
            packed = [list(aggregate_records(segment, shard_map, max_record_bytes=self.max_record_bytes))
                      for segment in segments]
        return PreparedPut(records, segments, packed, self._clock() - started)

    def send(self, prepared: PreparedPut) -> PutReport:
        """The second half of :meth:`put`: send what :meth:`prepare` made, until all of it is acknowledged."""
        started = self._clock()
        records = prepared.records
        total = len(records)
        if total == 0:
            return PutReport(0, 0, 0, 0, 0.0)
        progress = _Progress(total=total, last_progress=started)
        kinesis_records = 0
        for segment, packed in zip(prepared.segments, prepared.packed, strict=True):
            if self.aggregate:
                kinesis_records += self._put_aggregated(segment, progress, packed)
            else:
                self._send(list(segment), progress, aggregated=False)
                kinesis_records += len(segment)
        return PutReport(
            records=kinesis_records,
            requests=progress.requests,
            retried_entries=progress.retried,
            throttled_entries=progress.throttled,
            seconds=self._clock() - started + prepared.seconds,
            user_records=total,
            hot_rows=[] if self.aggregate else hot_rows(records),
        )

    def close(self) -> None:
        """Stop the request threads (a sink is not used after this)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _check_records(self, records: Sequence[Record]) -> None:
        """Raise :func:`check_record`'s error for the first record Kinesis would reject.

        Everything is validated before anything is sent: a bad record found halfway would leave a half-sent
        batch for the next run to resend. The compiled ``first_invalid`` finds the suspects in one C pass instead
        of a Python call per change; ``check_record`` judges each of them, so the error is the same.
        """
        limit = self.max_record_bytes
        kpl = native.load("pg2kinesis_dagster.kinesis._kpl")
        if kpl is None:
            for record in records:
                if record.size > limit and self._max_record_bytes is None:
                    limit = self._learn_record_limit()
                check_record(record, limit)
            return
        if not isinstance(records, (list, tuple)):
            records = list(records)  # first_invalid is called again from each suspect on: index one copy
        index = kpl.first_invalid(records, limit, 0)
        while index >= 0:
            record = records[index]
            if record.size > limit and self._max_record_bytes is None:
                limit = self._learn_record_limit()
            check_record(record, limit)  # raises, unless the stream's limit turned out larger
            index = kpl.first_invalid(records, limit, index + 1)

    def _learn_record_limit(self) -> int:
        """The stream's record limit, asked for when a record exceeds the default before the stream was checked
        (a re-executed publish step)."""
        self.check_stream()
        return self.max_record_bytes

    def _put_aggregated(self, records: Sequence[Record], progress: _Progress, packed: list[Record] | None) -> int:
        """Send ``records`` as aggregates (``packed``: already aggregated for the shard map in use); returns the
        number of Kinesis records written."""
        shard_map = self._current_shard_map(progress)
        to_send: Sequence[Record] = records
        written = 0
        remaps = 0
        while True:
            if packed is not None:
                pending, packed = packed, None
            else:
                pending = list(aggregate_records(to_send, shard_map, max_record_bytes=self.max_record_bytes))
            count = len(pending)
            misrouted = self._send(pending, progress, aggregated=True)
            written += count - len(pending)
            if not misrouted:
                return written
            # Kinesis put an aggregate on another shard than the map said: the
            # stream was resharded since ListShards. Consumers (the KCL) drop the
            # changes of an aggregate whose hash is outside the shard they read it
            # from, so those changes are sent again with a fresh map, together with
            # everything still pending (all aggregated with the stale map).
            remaps += 1
            if remaps > MAX_SHARD_MAP_RELOADS:
                raise SinkError(
                    f"the shards of Kinesis stream {self.stream_name!r} in {self._where()} kept changing "
                    f"while records were aggregated for them ({MAX_SHARD_MAP_RELOADS} reloads of the "
                    "shard map); wait until resharding is over, or turn aggregation off."
                    + self._progress(progress.acknowledged, progress.total)
                )
            cap = min(self.max_backoff, self.base_backoff * (2 ** (remaps - 1)))
            self._sleep(self._rng.uniform(0.0, cap))  # let ListShards catch up with the change
            shard_map = self._load_shard_map(progress)
            self._shard_map, self._shard_map_listed = shard_map, self._clock()
            again: list[Record] = []
            for sent, landed in misrouted:
                shard = shard_map.get(landed)
                stray = [
                    u for u in sent.user_records if shard is None or not shard.covers(record_hash_key(u))
                ]
                progress.acknowledged -= len(stray)
                again.extend(stray)
            for unsent in pending:
                again.extend(unsent.user_records)  # type: ignore[attr-defined]
            # Back to input order, which aggregate() needs to keep each row's order.
            position = {id(r): i for i, r in enumerate(records)}
            again.sort(key=lambda r: position[id(r)])
            to_send = again

    def _current_shard_map(self, progress: _Progress) -> ShardMap:
        """The shard map of the last listing, listed again after :data:`SHARD_MAP_MAX_AGE_SECONDS`.

        Not listed per put (a round trip each, as long as a put of a chunk against AWS): a map gone stale by
        resharding is caught by the first put after it, whose answers name another shard than the map did
        (``misrouted`` in :meth:`_put_aggregated`), and listed again there.
        """
        if self._shard_map is None or self._clock() - self._shard_map_listed > SHARD_MAP_MAX_AGE_SECONDS:
            self._shard_map = self._load_shard_map(progress)
            self._shard_map_listed = self._clock()
        return self._shard_map

    def _load_shard_map(self, progress: _Progress) -> ShardMap:
        """ListShards, retried like PutRecords while the errors are transient."""
        while True:
            failure: str
            try:
                return ShardMap.load(self.client, self.stream_name)
            except ClientError as exc:
                code = _error_code(exc)
                if not (code in RETRYABLE_REQUEST_CODES or _http_status(exc) >= 500):
                    raise self._list_shards_fatal(exc, code, progress) from exc
                failure = code
            except ShardMapError:
                failure = "IncompleteShardMap"  # listing taken mid-resharding: list again
            except _TRANSPORT_ERRORS as exc:
                failure = type(exc).__name__
            except BotoCoreError as exc:
                raise SinkError(
                    self._botocore_message(exc, "list shards")
                    + self._progress(progress.acknowledged, progress.total)
                ) from exc
            self._back_off(progress, Counter({failure: 1}), made_progress=False)

    def _send(
        self, pending_records: list[Record], progress: _Progress, *, aggregated: bool
    ) -> list[tuple[AggregatedRecord, str]]:
        """Send ``pending_records`` until all are acknowledged (the list is emptied in place).

        Up to ``max_in_flight`` PutRecords requests are in flight at once (botocore waits for the network
        without the GIL). :func:`next_request` keeps every record of a request's rows out of later requests
        until that request is answered, so a row's later change is only sent once the earlier one is
        acknowledged, and failed entries go first in the next request.

        With ``aggregated``, returns with the acknowledged aggregates that landed on another shard than their
        own (``(record, shard id)``) once the requests in flight are answered, leaving the unacknowledged ones
        in ``pending_records``.
        """
        # Entry dicts built once, parallel to the records.
        entries: list[dict[str, Any]] = [
            {"Data": r.data, "PartitionKey": r.partition_key}
            if r.explicit_hash_key is None
            else {"Data": r.data, "PartitionKey": r.partition_key, "ExplicitHashKey": r.explicit_hash_key}
            for r in pending_records
        ]
        count = len(pending_records)
        states = [WAITING] * count
        start = 0  # records before it are all acknowledged
        remaining = count
        misrouted: list[tuple[AggregatedRecord, str]] = []
        concurrent = self.max_in_flight > 1 and count > 1
        if concurrent and self._pool is None:
            # Kept for the sink's life: starting threads for every put cost more than a request to moto.
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="kinesis-put")
        pool = self._pool if concurrent else None
        in_flight: dict[Future[_Answer], list[int]] = {}
        request_limit = request_bytes_limit(self.max_record_bytes)
        try:
            while remaining:
                while not misrouted and len(in_flight) < self.max_in_flight:
                    chosen = next_request(pending_records, request_limit, states=states, start=start)
                    if not chosen:
                        break
                    for i in chosen:
                        states[i] = IN_FLIGHT
                    batch = [entries[i] for i in chosen]
                    progress.requests += 1
                    if pool is not None and (in_flight or len(chosen) < remaining):
                        future = pool.submit(self._put_records, batch)
                    else:  # the only request needed (an aggregated chunk's, often): a hand-over costs, gains nothing
                        future = Future()
                        future.set_result(self._put_records(batch))
                    in_flight[future] = chosen
                if not in_flight:
                    break
                done = wait(in_flight, return_when=FIRST_COMPLETED).done if pool is not None else list(in_flight)
                # Answers in the order the requests were sent, so failures back off in a stable order.
                for future in [f for f in in_flight if f in done]:
                    chosen = in_flight.pop(future)
                    acked = self._answer(future.result(), chosen, pending_records, progress, aggregated, misrouted)
                    for i in chosen:
                        states[i] = WAITING
                    for i in acked:
                        states[i] = DONE
                    remaining -= len(acked)
                while start < count and states[start] == DONE:
                    start += 1
                if misrouted and not in_flight:
                    break
        finally:
            if in_flight:
                wait(in_flight)  # requests still in flight after an error: answered or timed out
        pending_records[:] = [r for r, state in zip(pending_records, states, strict=True) if state != DONE]
        return misrouted

    def _put_records(self, batch: list[dict[str, Any]]) -> _Answer:
        """One PutRecords call (on a worker thread when concurrent); errors are returned, not raised."""
        try:
            return self.client.put_records(StreamName=self.stream_name, Records=batch)
        except (ClientError, BotoCoreError) as exc:
            return exc

    def _answer(self, answer: _Answer, chosen: list[int], pending_records: list[Record], progress: _Progress,
                aggregated: bool, misrouted: list[tuple[AggregatedRecord, str]]) -> list[int]:
        """Account for one request's answer; the indexes acknowledged. Raises SinkError on a fatal error,
        backs off (sleeps, or raises once retrying is over) after a failure."""
        acked: list[int] = []
        failure: Counter[str] = Counter()
        if isinstance(answer, ClientError):
            code = _error_code(answer)
            if not (code in RETRYABLE_REQUEST_CODES or _http_status(answer) >= 500):
                raise self._fatal(answer, code, progress.acknowledged, progress.total) from answer
            failure[code] = len(chosen)
        elif isinstance(answer, _TRANSPORT_ERRORS):
            failure[type(answer).__name__] = len(chosen)
        elif isinstance(answer, BotoCoreError):
            raise SinkError(
                self._botocore_message(answer, "put records")
                + f" {progress.acknowledged} of {progress.total} records were acknowledged; the "
                "slot was not advanced."
            ) from answer
        else:
            results = answer.get("Records", [])
            if len(results) != len(chosen):
                # Cannot tell which entries landed: resend them all (at-least-once).
                failure["MismatchedResponse"] = len(chosen)
            else:
                for i, result in zip(chosen, results, strict=True):
                    code = result.get("ErrorCode")
                    if code is None:
                        acked.append(i)
                        if aggregated:
                            sent: AggregatedRecord = pending_records[i]  # type: ignore[assignment]
                            landed = result.get("ShardId")
                            if landed and landed != sent.shard_id:
                                misrouted.append((sent, str(landed)))
                    else:
                        failure[code] += 1
                fatal = KMS_KEY_ERROR_CODES.intersection(failure)
                if fatal:
                    code = min(fatal)
                    message = next(
                        (r.get("ErrorMessage", "") for r in results if r.get("ErrorCode") == code), ""
                    )
                    done = progress.acknowledged + self._weight(pending_records, acked, aggregated)
                    raise SinkError(self._kms_message(code, message) + self._progress(done, progress.total))

        progress.acknowledged += self._weight(pending_records, acked, aggregated)
        if not failure:
            progress.failing_rounds = 0
            progress.last_progress = self._clock()
        else:
            progress.retried += sum(failure.values())
            progress.throttled += sum(n for c, n in failure.items() if c in THROTTLING_CODES)
            self._back_off(progress, failure, made_progress=bool(acked))
        return acked

    @staticmethod
    def _weight(pending_records: list[Record], acked: list[int], aggregated: bool) -> int:
        """Changes carried by the ``acked`` entries (one each unless aggregated)."""
        if not aggregated:
            return len(acked)
        return sum(len(pending_records[i].user_records) for i in acked)  # type: ignore[attr-defined]

    def _back_off(self, progress: _Progress, failure: Counter[str], *, made_progress: bool) -> None:
        """Sleep after a round with failures; raise once nothing was acknowledged for too long."""
        progress.last_errors = failure
        now = self._clock()
        if made_progress:
            # Progress (typically partial throttling): short backoff only.
            progress.last_progress = now
            progress.failing_rounds = 1
        else:
            progress.failing_rounds += 1
        cap = min(self.max_backoff, self.base_backoff * (2 ** (progress.failing_rounds - 1)))
        delay = self._rng.uniform(0.0, cap)  # full jitter
        if now + delay - progress.last_progress > self.max_retry_seconds:
            raise SinkError(
                self._exhausted_message(
                    progress.total, progress.total - progress.acknowledged, now - progress.started,
                    progress.last_errors,
                )
            )
        self._sleep(delay)

    # -- messages --------------------------------------------------------------

    @staticmethod
    def _progress(acknowledged: int, total: int) -> str:
        return (
            f" {acknowledged} of {total} records were acknowledged, {total - acknowledged} were not; "
            "the slot will not be advanced, so the next run sends them again."
        )

    def _missing_stream_message(self) -> str:
        name = self.stream_name
        return (
            f"Kinesis stream {name!r} does not exist in {self._where()}: create it "
            f"(aws kinesis create-stream --stream-name {name} --stream-mode-details StreamMode=ON_DEMAND) "
            "or fix --stream-name."
        )

    def _kms_message(self, code: str, detail: str) -> str:
        return (
            f"Kinesis stream {self.stream_name!r} in {self._where()} cannot encrypt records with its "
            f"KMS key ({code}: {detail}). Check that the key exists, is enabled, and that the AWS "
            "identity in use may kms:GenerateDataKey with it, or change the stream's encryption."
        )

    def _fatal(self, exc: ClientError, code: str, acknowledged: int, total: int) -> SinkError:
        name = self.stream_name
        detail = _error_message(exc)
        if code == "ResourceNotFoundException":
            text = self._missing_stream_message()
        elif code in ("AccessDeniedException", "AccessDenied"):
            text = (
                f"access denied writing to Kinesis stream {name!r} in {self._where()}: the AWS "
                f"identity in use needs kinesis:PutRecords on this stream ({code}: {detail})."
            )
        elif code in KMS_KEY_ERROR_CODES:
            text = self._kms_message(code, detail)
        elif code in ("ValidationException", "InvalidArgumentException"):
            text = (
                f"Kinesis rejected a PutRecords request to stream {name!r} as invalid ({code}: "
                f"{detail}). This is a bug in batching or record validation; please report it."
            )
        else:
            text = f"Kinesis PutRecords to stream {name!r} in {self._where()} failed: {code}: {detail}."
        return SinkError(text + self._progress(acknowledged, total))

    def _list_shards_fatal(self, exc: ClientError, code: str, progress: _Progress) -> SinkError:
        name = self.stream_name
        detail = _error_message(exc)
        if code == "ResourceNotFoundException":
            text = self._missing_stream_message()
        elif code in ("AccessDeniedException", "AccessDenied"):
            text = (
                f"access denied listing the shards of Kinesis stream {name!r} in {self._where()}: record "
                f"aggregation needs kinesis:ListShards on this stream ({code}: {detail})."
            )
        else:
            text = f"Kinesis ListShards of stream {name!r} in {self._where()} failed: {code}: {detail}."
        return SinkError(text + self._progress(progress.acknowledged, progress.total))

    def _exhausted_message(self, total: int, unacknowledged: int, elapsed: float,
                           errors: Counter[str]) -> str:
        shown = ", ".join(f"{code} x{n}" for code, n in errors.most_common(5))
        return (
            f"gave up writing to Kinesis stream {self.stream_name!r} in {self._where()} after "
            f"{elapsed:.1f}s: no record was acknowledged for {self.max_retry_seconds:g}s "
            f"(last round's errors: {shown})."
            + self._progress(total - unacknowledged, total)
            + " If the errors are throttling, add shards or use on-demand mode."
        )
