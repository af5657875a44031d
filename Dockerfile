FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
# The default config is the shipped example (`docker run -e ANTHROPIC_API_KEY=... IMAGE` serves it);
# mount your own over /app/config/proxy.yaml (docker-compose.yml). .dockerignore keeps a local one out.
COPY config/proxy.example.yaml ./config/proxy.yaml
# /app/data -> /data: a mounted config with a relative `store: sqlite:///data/ledger.db` writes to the volume too.
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /app budget-proxy \
 && mkdir -p /data && chown budget-proxy /data \
 && ln -s /data /app/data

USER budget-proxy
# ${VAR}_FILE works for every ${VAR} of the config (Docker/Kubernetes secrets): -e ANTHROPIC_API_KEY_FILE=/run/secrets/...
ENV BUDGET_PROXY_CONFIG=/app/config/proxy.yaml \
    BUDGET_PROXY_STORE=sqlite:////data/ledger.db
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
# SIGTERM drains requests in flight for server.shutdown_grace_seconds: give `docker stop -t` / compose more.
CMD ["budget-proxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
