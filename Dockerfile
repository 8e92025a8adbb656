# GuardGate's image: docker build -t guardgate .   (from a clone; see the README's "Operate it").
# Config and policies are read from /etc/guardgate: mount your own gateway.yaml and policies/ over them.

# ----- build: the project's wheel and those of its dependencies -----
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ----- runtime: the wheels installed into a slim image, run as an unprivileged user -----
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GUARDGATE_HEALTHZ=http://127.0.0.1:8080/healthz
# Only the wheels the build stage made (exactly its guardgate wheel, and its dependencies' wheels): no
# index, no compiler, no source tree here. The bind mount keeps the wheels out of every layer (BuildKit).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels /wheels/guardgate-*.whl
RUN groupadd --system --gid 10001 guardgate \
    && useradd --system --uid 10001 --gid guardgate --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin guardgate
# Defaults, meant to be mounted over: gateway.yaml reads its endpoints from the environment
# (UPSTREAM_BASE_URL, UPSTREAM_API_KEY, GUARD_BASE_URL, REDIS_URL) and policies_dir is ./policies.
COPY --chown=root:root gateway.yaml /etc/guardgate/gateway.yaml
COPY --chown=root:root policies/default.yaml /etc/guardgate/policies/default.yaml
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8080
# No curl in a slim image: the healthcheck is Python's own urllib (any error, or a non-2xx, exits non-zero).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GUARDGATE_HEALTHZ'], timeout=4)"]
# Listen on all interfaces inside the container (gateway.yaml's own host is loopback, for a laptop).
CMD ["guardgate", "serve", "--config", "/etc/guardgate/gateway.yaml", "--host", "0.0.0.0"]
