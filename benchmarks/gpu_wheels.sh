#!/usr/bin/env bash
# The wheels gpu_check.py needs on the lent GPU machines (Python 3.12, torch 2.11 + CUDA 13, no
# package index there), downloaded into .whl/ (git-ignored) for the device tool to carry.
# Versions as gpu_check last needed them: crc32c for the fast-CRC arm, TorchCodec 0.16 (the
# release built for torch 2.11; its wheel bundles nvJPEG) for the GPU JPEG encoder, captum and
# torchcam for the peers' rows. Everything else gpu_check imports is on the machine's image.
#
#   bash benchmarks/gpu_wheels.sh          # here, once (about 10 MB)
#
# then one device run, carrying .whl (see benchmarks/README.md, "gpu_check.py").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    "crc32c>=2.3" "torchcodec==0.16.0" "captum==0.9.0" "torchcam==0.5.0"
ls -l .whl
