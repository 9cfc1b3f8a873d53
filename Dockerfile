# billing-bot: slim, non-root, with a health check. Build: docker build -t ghcr.io/orzbob/billing-bot:0.1.0 .
# The production image has no embedded PostgreSQL: pgserver is the `demo`/`test` extra, and this
# installs the package without extras. Without DATABASE_URL the bot therefore stops with a clear
# message instead of starting a database inside the container.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bot bot
COPY handlers handlers
COPY services services
COPY templates templates
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 billing
COPY --from=build /install /usr/local
# Fail the build if the embedded PostgreSQL slipped in through a dependency.
RUN python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('pgserver') is not None)"
USER billing
WORKDIR /home/billing
ENV PORT=3000 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LOG_FORMAT=json
EXPOSE 3000
# Liveness only (no database): the same question Kubernetes' livenessProbe asks.
HEALTHCHECK --interval=30s --timeout=3s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"3000\")}/livez', timeout=2)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["billing-bot"]
CMD ["serve"]
