# The pg2kinesis code location: `dagster code-server` on port 4000, for a Dagster deployment whose webserver
# and daemon run elsewhere (README: "Deploying it"). UNTESTED HERE: our machines cannot pull base images, so
# CI never builds it. Kept minimal on purpose.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DAGSTER_HOME=/opt/dagster/home

WORKDIR /opt/pg2kinesis
COPY pyproject.toml README.md definitions.py workspace.yaml ./
COPY pg2kinesis_dagster ./pg2kinesis_dagster
RUN pip install . \
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
