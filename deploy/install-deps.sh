#!/bin/sh
# Installs caesar-gpt's runtime dependencies into the image's Python, at the versions in constraints.txt.
# Run by the Dockerfile from the folder holding pyproject.toml and constraints.txt, before the source is copied.
#
# torch is the one exception: a CUDA base image (pytorch/pytorch) already ships a CUDA build of torch, and
# re-installing it would pull gigabytes of wheels and could swap the CUDA build for another. So whatever
# torch the base has is kept and pinned; only a base without torch (python:3.11-slim, for the CPU image) gets
# constraints.txt's version, from TORCH_INDEX_URL (the PyTorch CPU index, so no CUDA libraries come along).
set -eu

torch_version() { python -c "from importlib.metadata import version; print(version('torch'))"; }

if ! torch_version > /dev/null 2>&1; then
    # Only the torch wheel comes from TORCH_INDEX_URL; its dependencies are resolved below, from PyPI, at
    # constraints.txt's versions like everything else.
    python -m pip install --no-cache-dir --no-deps \
        --index-url "${TORCH_INDEX_URL:?the base image has no torch: set TORCH_INDEX_URL}" \
        "$(grep '^torch==' constraints.txt)"
fi

# constraints.txt with its torch line replaced by the torch that is now installed, so that resolving the
# other packages can never replace it. (Read from its metadata: torch installed --no-deps cannot import yet.)
echo "torch==$(torch_version)" > /tmp/constraints.txt
grep -v '^torch==' constraints.txt >> /tmp/constraints.txt

# The runtime requirements are [project].dependencies of pyproject.toml (no test or bench extras).
python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > /tmp/requirements.txt

python -m pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt
rm /tmp/constraints.txt /tmp/requirements.txt
python -c "import torch; print(f'torch {torch.__version__}, CUDA build {torch.version.cuda}')"
