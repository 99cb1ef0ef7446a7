#!/usr/bin/env bash
# Gets what bench/gpu_check.sh needs on a GPU machine that cannot download: wheels of the packages its image
# lacks (.whl/: hdf5plugin, for Python 3.12 on x86-64 Linux) and a copy of the v2e snapshot (.v2e/, from
# ../shared/reference/v2e or V2E_ROOT). Both folders are added to .git/info/exclude. Run here, from anywhere:
#   bash bench/gpu_prepare.sh
# then carry .whl and .v2e to the GPU machine and run bash bench/gpu_check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
for d in .whl .v2e; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >>.git/info/exclude
done
hdf5plugin=$(grep -E '^hdf5plugin==' requirements.txt | cut -d= -f3)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "hdf5plugin==$hdf5plugin"
src=${V2E_ROOT:-../shared/reference/v2e}
rm -rf .v2e && mkdir .v2e && cp -r "$src"/v2ecore "$src"/LICENSE "$src"/SNAPSHOT.md .v2e/
find .v2e -name __pycache__ -prune -exec rm -rf {} +
du -sh .whl .v2e
