"""The devstack: a local, throwaway PostgreSQL server plus a moto-backed Kinesis endpoint.

Used by the demo, local development and the test suite; nothing here is meant for
production. See :mod:`pg2kinesis_dagster.devstack.postgres` and
:mod:`pg2kinesis_dagster.devstack.workload`.
"""
