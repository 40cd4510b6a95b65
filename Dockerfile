# The GPU image of the captioning service: the serving side (app/, captioner/) with onnxruntime-gpu
# on the NVIDIA CUDA 13 runtime with cuDNN 9, what onnxruntime-gpu 1.31 is built for. No torch and
# no training code (model_export/ is never copied). The CPU image is docker/Dockerfile.cpu.
#
#   docker build -t captioner:gpu .
#   docker run --rm --gpus all -p 127.0.0.1:8000:8000 captioner:gpu
#   docker compose up -d                      # see docker-compose.yml and docs/containers.md
#
# Build arguments:
#   BASE             any Debian/Ubuntu image with apt; the tests use a local Debian base (no CUDA
#                    there, so the image serves on CPU, with a warning, when CAPTIONER_DEVICE=auto).
#   ONNXRUNTIME_GPU  the onnxruntime-gpu requirement; keep it matched to the base's CUDA major.
#   PIP_CERT         a CA bundle path for pip, only where a TLS-intercepting proxy needs one
#                    (bind-mount it into the build); empty by default.
#   VERSION, REVISION, CREATED  fill the OCI labels (declared last: they never invalidate the cache).
ARG BASE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- python: the base plus Python from the distribution (3.12 on Ubuntu 24.04, 3.11 on Debian 12)
# and the service's user. Nothing else: the wheels carry their own native libraries and CUDA and
# cuDNN come from the base image.
FROM ${BASE} AS python
SHELL ["/bin/sh", "-eu", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin captioner

# ---- requirements: the runtime requirements read from pyproject.toml. Only this list reaches the
# next stage, so editing pyproject.toml elsewhere (version, test tools) keeps the installed layer.
FROM python AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["gpu"]))' > /tmp/requirements.txt

# ---- the image
FROM python
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPTIONER_BUNDLE=/models/default \
    CAPTIONER_HOST=0.0.0.0 \
    CAPTIONER_PORT=8000

# Dependencies first, into a virtualenv at /opt/venv: the largest layer, and the most stable.
ARG ONNXRUNTIME_GPU="onnxruntime-gpu==1.31.*"
ARG PIP_CERT=""
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && pip install -r /tmp/requirements.txt "${ONNXRUNTIME_GPU}" \
    && rm /tmp/requirements.txt

# The default model bundle (a bundle mounted at /models/default replaces it).
COPY models/default/ /models/default/

# The container's helpers, shared with the CPU image: the start-up check and the health check.
COPY docker/entrypoint.sh docker/healthcheck.py /usr/local/lib/captioner/

# The serving code last, as it changes most often. Only app/ and captioner/: never model_export/.
COPY pyproject.toml README.md /tmp/src/
COPY app/ /tmp/src/app/
COPY captioner/ /tmp/src/captioner/
RUN pip install --no-deps /tmp/src \
    && rm -rf /tmp/src \
    && python -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ("torch", "model_export")))'

# HTTP worker processes on port 8000, each with its own engine (docs/scale.md). On one GPU keep it low
# (1-2, enough that the front end is not the limit): each worker batches only its share of the requests.
# Override at run time: docker run -e CAPTIONER_WORKERS=2 ..., or CAPTIONER_WORKERS=2 docker compose up -d.
ENV CAPTIONER_WORKERS=1

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/lib/captioner/healthcheck.py"]
# The entrypoint checks the bundle, then execs the command: the service runs as PID 1 and gets SIGTERM.
ENTRYPOINT ["/bin/sh", "/usr/local/lib/captioner/entrypoint.sh"]
CMD ["python", "-m", "app.cli", "serve"]

ARG BASE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="captioner" \
      org.opencontainers.image.description="Image captioning service (CNN encoder + LSTM decoder, served from ONNX by onnxruntime-gpu)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/containers.md" \
      org.opencontainers.image.base.name="${BASE}"
