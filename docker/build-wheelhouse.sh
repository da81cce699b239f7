#!/usr/bin/env bash
# Fill docker/wheelhouse/ with every wheel the image needs, for builds without a
# package index (air-gapped sites, or Docker engines whose containers cannot reach one).
#
#   docker/build-wheelhouse.sh                 # uses python3 from PATH
#   PYTHON=/opt/py311/bin/python docker/build-wheelhouse.sh
#   PIP_EXTRA_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" docker/build-wheelhouse.sh
#
# Run it on a machine that can reach the index, with the SAME Python minor version and
# platform as the image (python:3.11-slim and Debian bookworm: CPython 3.11, x86_64),
# then build with `--build-arg WHEELHOUSE=1`. Copy the whole repository (wheelhouse
# included) to the air-gapped machine if the build happens there.
#
# The wheelhouse holds the project's runtime dependencies (built to wheels where only an
# sdist exists, so nothing is compiled inside the image) plus the build backend
# (hatchling), so that the image can build pfedmma itself from the copied source.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${WHEELHOUSE_DIR:-$here/wheelhouse}"
python="${PYTHON:-python3}"

mkdir -p "$out"
echo "wheelhouse: $out (python: $("$python" -c 'import sys; print(sys.version.split()[0])'))"
# shellcheck disable=SC2086  # PIP_EXTRA_ARGS is a list of options on purpose
"$python" -m pip wheel --wheel-dir "$out" ${PIP_EXTRA_ARGS:-} "$repo" hatchling pip
# The project itself is built from source inside the image: a stale wheel of it here
# would only hide which code is baked in.
rm -f "$out"/pfedmma-*.whl
echo "$(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1)"
