#!/usr/bin/env bash
# Collect into .gpu_wheels/ the wheels that a GPU machine with torch and transformers, but
# no package registry, needs to run tools/gpu_check.sh. Run it here (PyPI reachable), then
# carry .gpu_wheels to the GPU machine with the working tree.
#
#     tools/make_gpu_wheels.sh [--python-version 3.11] [--with-datasets] [--max-mib 60]
#
# Versions are the ones installed here (the ones the test suite passes with). Binary
# wheels are fetched for x86_64 Linux (manylinux) CPython of --python-version (default:
# this interpreter's); deepspeed, an sdist on PyPI, is built here as a pure-Python wheel
# (its ops are compiled just in time where they run). `datasets` needs pyarrow (~55 MB)
# and pandas, too big to carry: paced-ds imports it only when data.train/data.eval names a
# datasets directory or hub name, which neither the GPU tests nor the reference recipe do.
set -euo pipefail
cd "$(dirname "$0")/.."

python_version="$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
with_datasets=0
max_mib=60
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) python_version="$2"; shift 2 ;;
        --with-datasets) with_datasets=1; shift ;;
        --max-mib) max_mib="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "make_gpu_wheels: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

out=.gpu_wheels
# Required by paced-ds on the GPU check's path, with their dependencies that a machine
# holding only torch and transformers lacks.
required=(
    hjson py-cpuinfo ninja msgpack einops psutil pydantic pydantic_core annotated-types typing-inspection
    math-verify latex2sympy2_extended antlr4-python3-runtime
    accelerate
    pytest pluggy iniconfig pygments
)
# Installed if they fit on the machine's own versions; the check runs without them.
optional=(
    sentencepiece
    tensorboard tensorboard-data-server absl-py grpcio markdown protobuf pillow werkzeug
)
datasets_set=(datasets pyarrow pandas multiprocess dill xxhash python-dateutil six)
if [[ $with_datasets == 1 ]]; then
    optional+=("${datasets_set[@]}")
fi

installed_version() {  # the version of $1 installed here, or a clear failure
    python - "$1" <<'EOF'
import importlib.metadata as metadata, sys
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    sys.exit(f"make_gpu_wheels: {sys.argv[1]} is not installed here; pip install -e '.[test]' first")
EOF
}

pins=()
for name in "${required[@]}" "${optional[@]}"; do
    pins+=("$name==$(installed_version "$name")")
done
deepspeed_pin="deepspeed==$(installed_version deepspeed)"

rm -rf "$out"
mkdir -p "$out"
echo "make_gpu_wheels: ${#pins[@]} wheels for CPython $python_version x86_64 Linux, and $deepspeed_pin"
pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$python_version" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$out" "${pins[@]}"
# deepspeed is an sdist: build it against the torch here, no ops precompiled.
DS_BUILD_OPS=0 pip wheel --quiet --no-deps --no-build-isolation -w "$out" "$deepspeed_pin"

# What gpu_check.sh installs, and the interpreter the binary wheels are for.
printf '%s\n' "$deepspeed_pin" "${required[@]}" > "$out/required.txt"
printf '%s\n' "${optional[@]}" > "$out/optional.txt"
echo "$python_version" > "$out/python-version"

ls -S -l "$out" | awk 'NR > 1 { printf "  %8.2f MiB  %s\n", $5 / 1048576, $9 }'
total_bytes=$(du -sb "$out" | cut -f1)
total_mib=$(python -c "print(f'{$total_bytes / 2**20:.1f}')")
echo "make_gpu_wheels: $out holds $total_mib MiB (carry budget 64 MiB with the working tree)"
if python -c "import sys; sys.exit(0 if $total_bytes > $max_mib * 2**20 else 1)"; then
    echo "make_gpu_wheels: over --max-mib $max_mib: it will not travel as a carried path" >&2
    exit 1
fi
