# mertools serve in a container. Build (BuildKit or podman/buildah; RUN --mount is used):
#   docker build -t mertools .                                             # base: python:3.11-slim-bookworm
#   podman build --format docker --build-arg BASE_IMAGE=localhost/mertools-base:bookworm -t mertools .
# Run (the layout read-only; see deploy/container/README.md):
#   docker run -d -p 127.0.0.1:8000:8000 -v /srv/layouts/mixtral-q4_0:/layout:ro -e MERTOOLS_API_KEY mertools
# `--format docker` matters to podman: the OCI image format has no HEALTHCHECK, so buildah drops it.
# deploy/container/test.sh builds this image on a Debian base made by deploy/container/make-base.sh and proves it.

# Both stages start from the same base, so the venv's python symlinks resolve in the final stage.
# The base needs python3 (3.11+) with venv and glibc (numba and llvmlite ship manylinux wheels).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder

# pip's registry, when it is not PyPI itself: pass them with --build-arg (deploy/container/test.sh passes the
# host's). Unset or empty: pip's defaults. A CA bundle for a TLS-intercepting proxy goes in as the build secret
# `pip_cert` (`--secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt`), so that it stays out of the image.
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ARG PIP_DEFAULT_TIMEOUT="120"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./

# The package and its core dependencies only (no torch, no test extras), into a venv the final stage copies.
# The dependencies first, read from pyproject.toml, so that a change to the code alone reuses this layer.
RUN --mount=type=secret,id=pip_cert \
    set -eu; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    [ -n "$PIP_TRUSTED_HOST" ] || unset PIP_TRUSTED_HOST; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    python3 -m venv /opt/mertools/venv; \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        >/tmp/requirements.txt; \
    /opt/mertools/venv/bin/python -m pip install --no-cache-dir -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt

COPY mertools ./mertools
RUN --mount=type=secret,id=pip_cert \
    set -eu; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    [ -n "$PIP_TRUSTED_HOST" ] || unset PIP_TRUSTED_HOST; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    /opt/mertools/venv/bin/python -m pip install --no-cache-dir --no-deps . ; \
    /opt/mertools/venv/bin/python -m pip check; \
    /opt/mertools/venv/bin/python -m pip uninstall -y -q pip setuptools; \
    /opt/mertools/venv/bin/mertools --help >/dev/null

# ---------------------------------------------------------------------------------------------------- final
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
LABEL org.opencontainers.image.title="mertools" \
      org.opencontainers.image.description="mertools serve: an OpenAI-compatible server for MoE layouts, experts streamed from disk" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# libgomp1: numba's OpenMP threading layer (the slim image lacks it; without it numba falls back to its
# workqueue layer, which aborts when two threads run parallel kernels at once). Installed only when missing
# (make-base.sh's base has it), so that a build on that base needs no apt.
# The numba cache directory is owned by the non-root user: numba writes there whenever a kernel recompiles
# (another CPU than the build's), and refuses to use a cache directory it cannot write.
RUN set -eu; \
    if ! ldconfig -p | grep -q 'libgomp\.so\.1'; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgomp1; \
        rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    fi; \
    groupadd --gid 10001 mertools; \
    useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --no-log-init \
        --shell /usr/sbin/nologin mertools; \
    install -d -m 0755 /layout /var/cache/mertools; \
    install -d -m 0755 -o 10001 -g 10001 /var/cache/mertools/numba

COPY --from=builder /opt/mertools/venv /opt/mertools/venv
COPY deploy/container/healthcheck.py /usr/local/bin/mertools-healthcheck

ENV PATH=/opt/mertools/venv/bin:$PATH \
    NUMBA_CACHE_DIR=/var/cache/mertools/numba \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001

# Fill numba's on-disk cache now, as the user that serves: convert the bundled trained fixture (bind-mounted
# from the build context, so it never lands in a layer) and run it with a 1 MiB expert cache (experts read
# from disk), with the default cache (held in memory), and `mertools warmup` (every path of both kernel sets).
# numba keys its cache by CPU: on a CPU other than the build's, the kernels recompile at the first start
# (into this same directory) and /health answers 503 until they are done.
RUN --mount=type=bind,source=fixtures/trained/tiny-shakespeare-moe,target=/tmp/fixture \
    set -eu; \
    python3 -c 'from numba.np.ufunc import omppool'; \
    mertools convert /tmp/fixture /tmp/x --dtype q4_0; \
    mertools run /tmp/x -p "ROMEO:" -n 8 --cache-mb 1; \
    mertools run /tmp/x -p "ROMEO:" -n 8; \
    mertools warmup /tmp/x; \
    rm -rf /tmp/x; \
    du -sh "$NUMBA_CACHE_DIR"

# a layout directory (`mertools convert`'s output), mounted read-only
VOLUME ["/layout"]
EXPOSE 8000

# GET /health (200 once the model is loaded, 503 while it loads; no API key needed) with python's urllib:
# http://127.0.0.1:8000/health, or the --host/--port the running `mertools serve` was given, or
# $MERTOOLS_HEALTH_URL. The start period covers a first start on another CPU (kernels recompiling) and
# loading a large layout; a success during it counts at once.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 CMD ["mertools-healthcheck"]

ENTRYPOINT ["mertools", "serve"]
CMD ["/layout", "--host", "0.0.0.0", "--port", "8000"]
