#!/usr/bin/env bash
# Fails when nbdev_export or nbdev_clean would change dhs/ or nbs/: the package must be exactly
# what the committed notebooks export, and the notebooks must be clean (no outputs, no stray metadata).
set -euo pipefail
cd "$(dirname "$0")/.."
snap=$(mktemp -d)
trap 'rm -rf "$snap"' EXIT
cp -r dhs nbs "$snap"/
.venv/bin/nbdev_export
.venv/bin/nbdev_clean
if ! diff -r -x __pycache__ -x .ipynb_checkpoints "$snap"/dhs dhs >"$snap/diff" || \
   ! diff -r -x __pycache__ -x .ipynb_checkpoints "$snap"/nbs nbs >>"$snap/diff"; then
  echo "nbdev_export/nbdev_clean changed dhs/ or nbs/: run 'make export' and commit the result." >&2
  head -40 "$snap/diff" >&2
  exit 1
fi
echo "nbdev: dhs/ matches the notebooks and the notebooks are clean."
