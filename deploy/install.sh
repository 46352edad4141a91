#!/bin/sh
# Install bnexporter from a source tree into a self-contained virtualenv.
#
# The one place that says how the package is installed: deploy/Dockerfile runs
# it in its build stage, and tests/deploy/test_deploy_install.py runs it into a
# fresh directory and starts the result as a non-root user, so the two cannot
# drift apart.
#
# Usage: install.sh SOURCE_DIR VENV_DIR
# Environment: PYTHON (default python3) is the base interpreter; PIP_* variables
# (PIP_NO_CACHE_DIR, PIP_INDEX_URL, ...) are honoured by pip.
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 SOURCE_DIR VENV_DIR" >&2
    exit 64
fi
src=$1
venv=$2

"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-warn-script-location "$src"
# Fail the build here rather than at container start if the entry point is broken.
"$venv/bin/bnexporter" --version
