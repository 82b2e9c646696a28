# tracehead server image: `tracehead serve` on port 8000 as a non-root user.
#
#   docker build -t tracehead:0.1.0 .
#   docker run -p 8000:8000 -v tracehead-cache:/var/cache/tracehead -v tracehead-data:/var/lib/tracehead tracehead:0.1.0
#
# Build arguments:
#   TORCH_CHANNEL    cpu (default) or a CUDA channel of PyTorch's index, e.g. cu128, for a GPU image
#   TORCH_VERSION    the torch release installed from that channel
#   TORCH_INDEX_URL  where torch comes from; PyTorch's index of the channel by default
#   BAKE_MODEL       1 fetches the default base model into the image; 0 (default) fetches it into
#                    the cache volume at first start (about 100 MB and 30 s)
#   PIP_CERT, PIP_FIND_LINKS, PIP_INDEX_URL  passed to pip, for a build behind a TLS-inspecting proxy
#                    or from a local mirror

ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
# Debian's python3 is the interpreter of both stages, so the virtual environment copies over unchanged.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/tracehead
ENV PATH=/opt/tracehead/bin:$PATH

ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ARG TORCH_CHANNEL=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CHANNEL}
# torch goes first, from its channel, so that the project's "torch>=2.4" is already met
# and pip does not fetch the default CUDA build from PyPI for a CPU image.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+${TORCH_CHANNEL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY models ./models
COPY migrations ./migrations
RUN pip install --no-cache-dir . \
    && python -c "import server.cli, models.heads"


FROM ${BASE_IMAGE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tracehead \
    && useradd --system --uid 10001 --gid tracehead --home-dir /var/lib/tracehead --shell /usr/sbin/nologin tracehead \
    && install -d -o tracehead -g tracehead /var/cache/tracehead /var/lib/tracehead

COPY --from=build /opt/tracehead /opt/tracehead

# The defaults a container needs; every other setting keeps its laptop default (see the README's table).
# Production mode requires API keys, since a published port reaches beyond this machine.
ENV PATH=/opt/tracehead/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TRACEHEAD_MODE=production \
    TRACEHEAD_HOST=0.0.0.0 \
    TRACEHEAD_PORT=8000 \
    TRACEHEAD_CACHE_DIR=/var/cache/tracehead \
    TRACEHEAD_DATA_DIR=/var/lib/tracehead

# Numeric, so that Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/tracehead

# The model fetch runs pip, which reads PIP_* from the environment, so the same arguments reach it here.
ARG BAKE_MODEL=0
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
RUN if [ "${BAKE_MODEL}" = "1" ]; then tracehead models fetch; fi

VOLUME ["/var/cache/tracehead", "/var/lib/tracehead"]
EXPOSE 8000
# Liveness only: /healthz answers while the process serves HTTP. Readiness (/readyz) is the orchestrator's.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TRACEHEAD_PORT', '8000'), timeout=4)"]

# `tracehead serve` applies pending migrations and fetches a missing default model before it listens;
# `tracehead db upgrade` and `tracehead models fetch` run either step alone (a migration job, an init step).
ENTRYPOINT ["tracehead"]
CMD ["serve"]
