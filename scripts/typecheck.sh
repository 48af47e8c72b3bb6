#!/usr/bin/env bash
# mypy cannot follow setup.py's package_dir mapping (layer folders at the repository root are
# installed as needle_steering.<layer>), so check a symlinked view with the installed layout.
set -euo pipefail
mypy=${1:-mypy}
view=.typecheck/needle_steering
rm -rf .typecheck
mkdir -p "$view"
for entry in needle_steering/*; do ln -s "../../$entry" "$view/$(basename "$entry")"; done
for layer in perception planning control sim nodes benchmarks; do ln -s "../../$layer" "$view/$layer"; done
"$mypy" .typecheck/needle_steering tests
