"""wal2json's numeric-data-types-as-string: used when the installed plugin takes it, else the 2.5 behaviour."""

from __future__ import annotations

from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.postgres import plugin_options
from pg2kinesis_dagster.postgres.plugin_options import WAL2JSON_NUMBERS_AS_STRINGS, plugin_accepts_option
from tests.helpers import make_replicator, read_json


def test_the_probe_tells_known_from_unknown_options_and_replication_follows(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE m (id int PRIMARY KEY, n numeric, d double precision)")
    plugin_options._ACCEPTED.clear()
    with make_replicator(pg_server, pg_database, moto_server, kinesis_stream, output_plugin="wal2json") as replicator:
        base = replicator.decoder.slot_options
        replicator.prepare()
        # An option every wal2json 2.x knows is accepted; a made-up one is refused, without failing anything.
        assert plugin_accepts_option(replicator.slot, base, "include-lsn")
        assert not plugin_accepts_option(replicator.slot, base, "no-such-option-pg2k")
        accepted = plugin_accepts_option(replicator.slot, base, WAL2JSON_NUMBERS_AS_STRINGS)
        assert (WAL2JSON_NUMBERS_AS_STRINGS in replicator.decoder.slot_options) == accepted
        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO m VALUES (1, 'NaN', 'Infinity'), (2, 12.50, 1.5)")
        replicator.drain()
    values = {r["pk"]["id"]: r["after"] for r in read_json(moto_server, kinesis_stream)}
    assert values["2"]["n"] == "12.50" and values["2"]["d"] == "1.5"
    if accepted:  # wal2json >= 2.6
        assert values["1"]["n"] == "NaN" and values["1"]["d"] == "Infinity"
    else:  # wal2json 2.5 (Debian's for PostgreSQL 15): the documented limit, NaN/Infinity print as null
        assert values["1"]["n"] is None and values["1"]["d"] is None
