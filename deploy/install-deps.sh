#!/bin/sh
# Installs caesar-gpt's runtime dependencies into the image's Python at exactly constraints.txt's versions,
# torch included. Run by the Dockerfile from the folder holding pyproject.toml and constraints.txt, before the
# source is copied.
#
# torch is always constraints.txt's pin, the version every test ran, whatever the base image brings: a torch
# of another version in the base is replaced, never kept. Only where the wheel comes from varies, with
# TORCH_INDEX_URL (the Dockerfile's ARG): PyPI, whose Linux torch wheel is the CUDA build (its CUDA libraries
# come as pip packages, so the base needs no CUDA), for the GPU image; PyTorch's CPU index for the CPU image.
#
# tests/test_deploy.py runs this script with a stand-in pip, over a base that has another torch.
set -eu

torch_pin=$(grep -x 'torch==[0-9][0-9a-z.]*' constraints.txt) || {
    echo "constraints.txt pins no torch (expected a line torch==X.Y.Z)" >&2
    exit 1
}

# 1. torch alone from TORCH_INDEX_URL, at the pin; its dependencies are resolved in step 2 with everything
#    else, from PyPI at constraints.txt's versions (the CUDA build's nvidia-*/cuda-* packages at the exact
#    versions torch's own metadata pins).
python -m pip install --no-cache-dir --no-deps \
    --index-url "${TORCH_INDEX_URL:?set TORCH_INDEX_URL to the index holding the torch build to install}" \
    "$torch_pin"

# 2. The runtime requirements, [project].dependencies of pyproject.toml (no test or bench extras), constrained
#    by constraints.txt. Its torch line is the pin installed above (a local version such as 2.13.0+cpu
#    satisfies ==2.13.0), so resolving can neither replace torch nor keep another one.
requirements=$(mktemp)
python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > "$requirements"
python -m pip install --no-cache-dir -c constraints.txt -r "$requirements"
rm "$requirements"

# 3. Fail the build unless the installed torch is the pin.
python - "${torch_pin#torch==}" <<'EOF'
import sys

import torch

print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")
if torch.__version__.split("+")[0] != sys.argv[1]:
    sys.exit(f"torch {torch.__version__} is not the pinned {sys.argv[1]}")
EOF
