#!/usr/bin/env bash
# The compose flow without Docker: build the CPU image with buildah, then drive docker-compose.yml through
# docker-compose pointed at `podman system service`: train a tiny checkpoint, serve it, wait for /ready,
# generate once, shut down.
#
# Made for machines that reach only package registries (PyPI, Debian), never a container registry: the base
# image is a Debian bookworm root filesystem made by debootstrap, with python3 and a virtual environment on
# PATH, standing in for python:3.11-slim. Everything podman stores stays under $WORK (its own storage, chroot
# isolation, Docker image format, its own containers.conf), so the host's container set-up is left alone.
#
# Usage, as root, from anywhere:  deploy/podman-compose-flow.sh [--base-only]
# On Debian it installs what it lacks with apt-get: podman buildah debootstrap catatonit runc docker-compose
# (1.29) python3-yaml. It uses Debian's python3 (with PyYAML), not the repository's .venv.
# Environment:
#   WORK             scratch folder for storage, rootfs, sockets and checkpoints (default /tmp/caesar-podman)
#   DEBIAN_MIRROR    where debootstrap fetches bookworm (default http://deb.debian.org/debian)
#   TORCH_WHEEL_DIR  a folder holding a torch CPU wheel to serve as the image build's TORCH_INDEX_URL, for
#                    machines that cannot reach the PyTorch index (default: /opt/wheels when it holds one)
#   API_PORT         host port for the API (default 18000)
#   STORAGE_DRIVER   overlay where the kernel can mount overlayfs in $WORK (tried first), else vfs. vfs copies
#                    the whole root filesystem for every build step and container: about 25 GB of disk at the
#                    peak and minutes more than overlay for this image.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/caesar-podman}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
API_PORT=${API_PORT:-18000}
PYTHON=${PYTHON:-/usr/bin/python3}  # a Python with PyYAML, for editing the compose file
BASE_IMAGE=localhost/caesar-base:bookworm
IMAGE=localhost/caesar-gpt:cpu
PROJECT=caesarflow

log() { printf '\n== %s  %s\n' "$(date +%T)" "$*"; }

# --- 0. Debian packages ------------------------------------------------------------------------------------
# catatonit: podman's init (/usr/libexec/podman/catatonit), which compose's `init: true` asks for. runc: see
# containers.conf below. python3-yaml: PyYAML for $PYTHON.
packages=(podman buildah debootstrap catatonit runc docker-compose python3-yaml)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
"$PYTHON" -c 'import yaml' || { echo "$PYTHON has no PyYAML (PYTHON names the Python to use)" >&2; exit 1; }

mkdir -p "$WORK"
if [ -z "${STORAGE_DRIVER:-}" ]; then
    probe=$(mktemp -d "$WORK/overlay-probe.XXXXXX")
    mkdir "$probe/lower" "$probe/upper" "$probe/work" "$probe/merged"
    STORAGE_DRIVER=vfs
    if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
        "$probe/merged" 2>/dev/null; then
        umount "$probe/merged"
        STORAGE_DRIVER=overlay
    fi
    rm -rf "$probe"
fi
log "storage driver: $STORAGE_DRIVER"
# vfs needs no overlay support from the kernel; chroot isolation needs no nested user namespaces. The
# ulimits: podman's default copies the host's limits, which a sandboxed runtime may refuse to set. runc, not
# Debian's default crun 1.8: on a host with hybrid cgroups (v1 controllers beside a cgroup2 mount that has
# controllers enabled) crun refuses to start any container ("cgroups in hybrid mode not supported"), which
# docker-compose's `run` reports only as "unable to upgrade to tcp, received 409" when it attaches.
cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=1000:1000"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
STORAGE=(--root "$WORK/storage-$STORAGE_DRIVER" --runroot "$WORK/run-$STORAGE_DRIVER"
         --storage-driver "$STORAGE_DRIVER")
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
# The CPU image: torch from PyTorch's CPU index, at constraints.txt's pin (install-deps.sh installs the pin).
torch_pin=$(sed -n 's/^torch==//p' "$REPO/constraints.txt")
torch_index_args=(--build-arg "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
torch_wheel=$(find "$TORCH_WHEEL_DIR" -maxdepth 1 -name "torch-$torch_pin+cpu-*.whl" 2>/dev/null | sort | tail -n 1)
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
    # A fixed port where it is free: TORCH_INDEX_URL is a build argument, so a new URL would rebuild the
    # dependency layer on every run instead of taking it from the cache.
    index_port=$("$PYTHON" - <<'EOF'
import socket

with socket.socket() as s:
    try:
        s.bind(("127.0.0.1", 18099))
    except OSError:
        s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
)
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
# `command podman`, not the podman function: a function in the background runs in a subshell, and killing
# that subshell's PID at the end would leave the service running.
command podman "${STORAGE[@]}" system service --time 0 "unix://$socket" > "$WORK/podman-service.log" 2>&1 &
podman_service_pid=$!
for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.2; done
export DOCKER_HOST=unix://$socket
# vfs gives every container a full copy of the image's files: creating one can outlast compose's 60 s.
export COMPOSE_HTTP_TIMEOUT=600

# docker-compose.yml reserves an NVIDIA GPU for api and train; this CPU machine has none, so the flow runs
# a copy of the same file with the `deploy` GPU reservations removed, and one podman bug worked around:
# podman's Docker API (bookworm's 4.3, and later ones until containers/podman#27818) splits each argument of
# a ["CMD", ...] health check at whitespace (containers/podman#26519), so that `python -c "import
# urllib.request; ..."` runs as `python -c import ...` and never passes. The copy gives the same command as
# ["CMD-SHELL", "<the arguments, shell-quoted>"], which it passes intact.
compose_file=$WORK/docker-compose.cpu.yml
"$PYTHON" - "$REPO/docker-compose.yml" "$compose_file" <<'EOF'
import shlex
import sys

import yaml

with open(sys.argv[1]) as f:
    compose = yaml.safe_load(f)
for service in compose["services"].values():
    service.pop("deploy", None)
    test = service.get("healthcheck", {}).get("test")
    if test and test[0] == "CMD":
        service["healthcheck"]["test"] = ["CMD-SHELL", shlex.join(test[1:])]
compose = {key: value for key, value in compose.items() if not key.startswith("x-")}
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(compose, f, sort_keys=False)
EOF

models=$WORK/models
rm -rf "$models"  # a previous run's checkpoint: training refuses to overwrite it
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
# Without systemd podman schedules no health checks (its service log says so), so run api's health check (the
# compose file's) once by hand, inside the container: it must pass now that /ready answers 200.
api_id=$(compose ps -q api)
if ! podman healthcheck run "$api_id"; then
    podman inspect --format '{{json .State.Health}}' "$api_id" >&2
    echo "api's health check fails" >&2
    exit 1
fi
echo "api's health check passes"

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
# SIGTERM reached the service through compose's init (catatonit): it drained and exited 0, not killed.
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$api_id")
[ "$exit_code" = 0 ] || { echo "api exited with $exit_code after stop" >&2; exit 1; }
log "done"
