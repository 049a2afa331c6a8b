#!/usr/bin/env bash
# The whole EKG pipeline on the quickstart config (ResNet-20, synthetic images, offline):
# train a dense baseline -> search a sub-network + memory bank -> fine-tune with ensemble
# knowledge -> export SavedModel / TFLite / ONNX, each verified. Re-running resumes.
#   bash scripts/quickstart.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-/tmp/ekg_quickstart}"
config=configs/quickstart.py
ekg-train --config="$config" --workdir="$workdir"
ekg-search --config="$config" --workdir="$workdir" --config.model.init="$workdir/model.weights.h5"
ekg-finetune --config="$config" --workdir="$workdir" --config.model.init="$workdir/model.weights.h5"
ekg-export --config="$config" --workdir="$workdir" --config.model.init="$workdir/model.weights.h5"
