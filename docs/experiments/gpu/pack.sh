#!/usr/bin/env bash
# Builds work/gpu/wheels/ (git-ignored) for the GPU device runs: the GPU machine's image has torch but not
# Ray, Ultralytics or pydicom, and cannot reach a package index. Carried limit: 64 MiB a call, and
# Ray's wheel alone is 79 MB, so Ray is unpacked, stripped of what scoring and training never
# import (Java jars, RLlib, Serve, LLM, the dashboard's web client, tests), its binaries stripped
# of symbols and re-packed with xz (~26 MB). The device's Python is 3.12 (this machine's is 3.11).
# Usage (repository root): bash docs/experiments/gpu/pack.sh
set -euo pipefail
dest=work/gpu/wheels; mkdir -p "$dest"  # work/ is git-ignored and never uploaded with a Ray job
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
# Pinned as in pyproject.toml; pydantic & co.: Ray Train V2 imports it (missing on the device).
dl "$dest" ultralytics==8.4.190 ultralytics-thop==2.2.3 pydicom==3.0.2 jsonschema==4.26.0 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
dl "$work" ray==2.60.0
(cd "$work" && unzip -q ray-*.whl && rm ray-*.whl && cd ray \
  && rm -rf jars rllib serve llm dashboard/client tests ./*/tests \
  && strip --strip-unneeded _raylet.so core/src/ray/raylet/raylet core/src/ray/gcs/gcs_server)
tar -C "$work" -cJf "$dest/ray-slim.tar.xz" ray ray-2.60.0.dist-info
du -sh "$dest"
