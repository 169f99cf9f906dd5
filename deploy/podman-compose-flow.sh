#!/usr/bin/env bash
# The compose flow without Docker: build the CPU image with buildah, then drive docker-compose.yml through
# docker-compose pointed at `podman system service`: train a tiny checkpoint, serve it, wait for /ready,
# generate once, shut down.
#
# Made for machines that reach only package registries (PyPI, Debian), never a container registry: the base
# image is a Debian bookworm root filesystem made by debootstrap, with python3 and a virtual environment on
# PATH, standing in for python:3.11-slim. Everything podman stores stays under $WORK (vfs storage, chroot
# isolation, Docker image format, its own containers.conf), so the host's container set-up is left alone.
#
# Usage, as root, from anywhere:  deploy/podman-compose-flow.sh [--base-only]
# Needs (Debian): podman buildah debootstrap docker-compose tini, and python3 with PyYAML (the repo's .venv).
# Environment:
#   WORK             scratch folder for storage, rootfs, sockets and checkpoints (default /tmp/caesar-podman)
#   DEBIAN_MIRROR    where debootstrap fetches bookworm (default http://deb.debian.org/debian)
#   TORCH_WHEEL_DIR  a folder holding a torch CPU wheel to serve as the image build's TORCH_INDEX_URL, for
#                    machines that cannot reach the PyTorch index (default: /opt/wheels when it holds one)
#   API_PORT         host port for the API (default 18000)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/caesar-podman}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
API_PORT=${API_PORT:-18000}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
BASE_IMAGE=localhost/caesar-base:bookworm
IMAGE=localhost/caesar-gpt:cpu
PROJECT=caesarflow

log() { printf '\n== %s  %s\n' "$(date +%T)" "$*"; }

mkdir -p "$WORK"
# vfs needs no overlay support from the kernel; chroot isolation needs no nested user namespaces. The
# ulimits: podman's default copies the host's limits, which a sandboxed runtime may refuse to set.
cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=1000:1000"]
init_path = "/usr/bin/tini"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
STORAGE=(--root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
podman() { command podman "${STORAGE[@]}" "$@"; }
buildah() { command buildah "${STORAGE[@]}" "$@"; }

# --- 1. Base image: Debian bookworm + python3 + a venv, from debootstrap --------------------------------
if ! podman image exists "$BASE_IMAGE"; then
    log "debootstrap bookworm -> $BASE_IMAGE"
    rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        "$DEBIAN_MIRROR"
    # Debian's python3 refuses `pip install` into the system (PEP 668); a venv on PATH behaves like
    # python:3.11-slim's /usr/local, which is what the Dockerfile expects.
    chroot "$rootfs" python3 -m venv /opt/venv
    # Trust what the host trusts: CAs it added locally (a TLS-inspecting proxy in front of PyPI, say) go
    # into the system store, and pip is pointed at that store instead of its own bundled one.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates
    fi
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' - "$BASE_IMAGE"
    rm -rf "$rootfs"
fi
[ "${1:-}" = "--base-only" ] && exit 0

# --- 2. The CPU image, from the project's Dockerfile -----------------------------------------------------
torch_index_args=()
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
torch_wheel=$(find "$TORCH_WHEEL_DIR" -maxdepth 1 -name 'torch-*+cpu-*.whl' 2>/dev/null | sort | tail -n 1)
index_server_pid=
cleanup() {
    set +e
    if [ -n "${compose_file:-}" ]; then
        docker-compose -f "$compose_file" --project-directory "$REPO" -p "$PROJECT" down --timeout 30
    fi
    [ -n "${podman_service_pid:-}" ] && kill "$podman_service_pid" && wait "$podman_service_pid"
    [ -n "$index_server_pid" ] && kill "$index_server_pid"
}
trap cleanup EXIT
if [ -n "$torch_wheel" ]; then
    # A one-package PEP 503 index on loopback (chroot isolation shares the host's network), so the
    # Dockerfile's own TORCH_INDEX_URL knob installs the local CPU wheel.
    index_root=$WORK/torch-index
    mkdir -p "$index_root/simple/torch"
    ln -sf "$torch_wheel" "$index_root/simple/torch/"
    name=$(basename "$torch_wheel")
    printf '<!DOCTYPE html><html><body><a href="%s">%s</a></body></html>\n' "$name" "$name" \
        > "$index_root/simple/torch/index.html"
    index_port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$index_root" "$index_port" \
        > "$WORK/torch-index.log" 2>&1 &
    index_server_pid=$!
    torch_index_args=(--build-arg "TORCH_INDEX_URL=http://127.0.0.1:$index_port/simple")
    log "torch from $torch_wheel via http://127.0.0.1:$index_port/simple"
fi

log "buildah build -> $IMAGE"
buildah build --isolation chroot --format docker --network host --layers \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" "${torch_index_args[@]}" \
    -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO"
podman image inspect --format 'user={{.Config.User}} cmd={{.Config.Cmd}} healthcheck={{.Config.Healthcheck.Test}}' \
    "$IMAGE" 2>/dev/null || podman image inspect --format 'user={{.Config.User}} cmd={{.Config.Cmd}}' "$IMAGE"

# --- 3. docker-compose against podman's Docker-compatible API --------------------------------------------
log "podman system service"
socket=$WORK/podman.sock
rm -f "$socket"
podman system service --time 0 "unix://$socket" > "$WORK/podman-service.log" 2>&1 &
podman_service_pid=$!
for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.2; done
export DOCKER_HOST=unix://$socket
# vfs gives every container a full copy of the image's files: creating one can outlast compose's 60 s.
export COMPOSE_HTTP_TIMEOUT=600

# docker-compose.yml reserves an NVIDIA GPU for api and train; this CPU machine has none, so the flow runs
# a copy of the same file with only the `deploy` GPU reservations removed.
compose_file=$WORK/docker-compose.cpu.yml
"$PYTHON" - "$REPO/docker-compose.yml" "$compose_file" <<'EOF'
import sys

import yaml

with open(sys.argv[1]) as f:
    compose = yaml.safe_load(f)
for service in compose["services"].values():
    service.pop("deploy", None)
compose = {key: value for key, value in compose.items() if not key.startswith("x-")}
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(compose, f, sort_keys=False)
EOF

models=$WORK/models
mkdir -p "$models"
chown 10001:0 "$models"
export CAESAR_IMAGE=$IMAGE CAESAR_MODELS_DIR=$models CAESAR_CHECKPOINT=/models/tiny CAESAR_DEVICE=cpu
export CAESAR_API_PORT=$API_PORT
compose() { docker-compose -f "$compose_file" --project-directory "$REPO" -p "$PROJECT" "$@"; }

log "compose: train a tiny checkpoint into $models/tiny"
compose --profile train run --rm train \
    python -m training --preset tiny --max-steps 40 --eval-interval 20 --device cpu --out /models/tiny
ls -l "$models/tiny"

log "compose: up api (serving /models/tiny)"
compose up -d --no-build api
for i in $(seq 120); do
    if "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$API_PORT/ready', timeout=2)" \
        2>/dev/null; then
        log "/ready is 200 after ~${i}s"
        break
    fi
    [ "$i" = 120 ] && { compose logs api; echo "api never became ready" >&2; exit 1; }
    sleep 1
done
compose ps

log "one generation"
"$PYTHON" - "$API_PORT" <<'EOF'
import json
import sys
import urllib.request

body = {"inputs": "CAESAR:", "parameters": {"max_new_tokens": 60, "seed": 7, "details": True}}
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as response:
    answer = json.load(response)
print(json.dumps(answer, indent=2))
assert len(answer["generated_text"]) == 60, answer
EOF

log "compose: logs and stop"
compose logs --tail 20 api
compose stop --timeout 45 api
log "done"
