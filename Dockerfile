# The pg2kinesis code location: `dagster code-server` on port 4000, for a Dagster deployment whose webserver
# and daemon run elsewhere (README: "Deploying it"). UNTESTED HERE: our machines cannot pull base images, so
# CI never builds it. Kept minimal on purpose.
# The native accelerators (Cython, setup.py) are compiled in a build stage with a C compiler; the image gets the
# wheel. PG2K_REQUIRE_NATIVE=1 makes a failed compile fail the build rather than fall back to the slow path.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY pg2kinesis_dagster ./pg2kinesis_dagster
RUN PG2K_REQUIRE_NATIVE=1 pip wheel --no-deps -w /wheels .

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DAGSTER_HOME=/opt/dagster/home

WORKDIR /opt/pg2kinesis
COPY definitions.py workspace.yaml ./
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && mkdir -p "$DAGSTER_HOME" /var/lib/pg2kinesis/spool \
    && useradd --system --uid 10001 pg2kinesis \
    && chown -R pg2kinesis "$DAGSTER_HOME" /var/lib/pg2kinesis
# The instance settings every process of the deployment shares (PostgreSQL storage, run queue, monitoring).
COPY deploy/dagster.yaml "$DAGSTER_HOME/dagster.yaml"

USER pg2kinesis
# The window in flight is spooled here: mount a volume (set PG2K_SPOOL_DIR or spool_dir to this path).
VOLUME /var/lib/pg2kinesis/spool
EXPOSE 4000
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s \
    CMD dagster api grpc-health-check -h 127.0.0.1 -p 4000 || exit 1
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-f", "definitions.py"]
