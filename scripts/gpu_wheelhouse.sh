#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, what the GPU machine lacks (scripts/gpu_wheels.txt) for its Python
# (3.12, Linux x86_64) into DIR (default gpu-wheels, git-ignored): binary wheels, and DeepSpeed as its sdist.
#   scripts/gpu_wheelhouse.sh [DIR]
# The device call then names DIR in `carry`; benchmarks/gpu_check.py installs it first (docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-gpu-wheels}"
python="${PYTHON:-python3}"
limit_mib=60
mkdir -p "$dir"
mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' scripts/gpu_wheels.txt | grep -v '^$')
sdists=() wheels=()
for pin in "${pins[@]}"; do
    if [[ "$pin" == deepspeed==* ]]; then sdists+=("$pin"); else wheels+=("$pin"); fi
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "${wheels[@]}"
"$python" -m pip download -q --no-deps --no-binary=:all: -d "$dir" "${sdists[@]}"
total=$(du -cb "$dir"/*.whl "$dir"/*.tar.gz | tail -n 1 | cut -f1)
ls -1 "$dir"
echo "$dir: $(ls "$dir" | wc -l) files, $((total / 1048576)) MiB"
if (( total > limit_mib * 1048576 )); then
    echo "error: $dir holds more than $limit_mib MiB; the device call carries at most 64 MiB with the tree" >&2
    exit 1
fi
