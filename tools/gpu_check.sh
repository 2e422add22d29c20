#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU, torch and transformers, and no registry.
#
#     tools/gpu_check.sh [--quick]
#
# 1. installs the wheels carried in .gpu_wheels/ (made by tools/make_gpu_wheels.sh where
#    PyPI is reachable) whose packages are missing, without dependency resolution, so no
#    installed package (torch above all) is ever upgraded or replaced;
# 2. checks nvidia-smi and torch.cuda, puts this checkout on PYTHONPATH;
# 3. runs `pytest -m gpu tests/test_gpu.py`;
# 4. times the reference recipe on 1 GPU in bf16 over NCCL (tools/bench_step.py, which
#    launches `paced-ds train --nproc 1 ... model.dtype=bf16`), teacher resident and, unless
#    --quick, offloaded to CPU and pipelined (a teacher job sharing the GPU), and prints a
#    markdown table;
# 5. unless --quick, times on-policy steps with rollouts from Hugging Face and, where vLLM
#    imports, from a vLLM server synced every step (tools/bench_onpolicy.py; the model is
#    $ONPOLICY_MODEL, default the shipped tiny student).
#
# Logs, the table (bench.md, bench.json) and the runs' metrics go to $OUT when it is set,
# else to a new /tmp/gpu_check.* directory. About 6-10 minutes on an H200 (--quick: ~3);
# every phase has its own time limit. Exit status: 0 when the tests and the bench passed.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (usage: tools/gpu_check.sh [--quick])" >&2; exit 2 ;;
    esac
done

if [[ $quick == 1 ]]; then
    steps=20; warmup=5; variants=(none); bench_limit_s=200
else
    steps=100; warmup=10; variants=(none cpu pipelined); bench_limit_s=420
fi
tests_limit_s=300
out_dir="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$out_dir"

phase() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }
fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

install_wheels() {  # every carried wheel whose package is missing, with --no-deps
    python - "$out_dir/pip.log" <<'PYTHON'
import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

log_path = Path(sys.argv[1])


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_install(wheels: list) -> bool:
    base = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-warn-script-location"]
    for extra in ([], ["--break-system-packages"]):  # the second for an "externally managed" Python
        cmd = base + extra + [str(wheel) for wheel in wheels]
        with log_path.open("a") as log:
            log.write("+ " + " ".join(cmd) + "\n")
            log.flush()
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode == 0:
                return True
        if "externally-managed-environment" not in log_path.read_text()[-3000:]:
            return False
    return False


wheels = {norm(path.name.split("-")[0]): path for path in sorted(Path(".gpu_wheels").glob("*.whl"))}
required = {norm(line.split("==")[0]) for line in Path(".gpu_wheels/required.txt").read_text().split()}
missing = []
for name, wheel in wheels.items():
    try:
        print(f"  kept       {name} {metadata.version(name)} (already installed; carried {wheel.name.split('-')[1]})")
    except metadata.PackageNotFoundError:
        missing.append(name)
failed = []
if missing and not pip_install([wheels[name] for name in missing]):
    # One at a time, so that an optional wheel that does not fit cannot block the others.
    failed = [name for name in missing if not pip_install([wheels[name]])]
for name in missing:
    state = "FAILED" if name in failed else "installed"
    print(f"  {state:10} {name} {wheels[name].name.split('-')[1]}" + ("" if name in required else " (optional)"))

# Installed packages are never changed: say where a kept one misses what a carried one needs.
for name in wheels:
    try:
        requirements = [Requirement(text) for text in metadata.requires(name) or []]
    except metadata.PackageNotFoundError:
        continue
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            found = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            print(f"  warning: {name} needs {requirement}, which is not installed")
            continue
        if not requirement.specifier.contains(found, prereleases=True):
            print(f"  warning: {name} needs {requirement}, found {found}")
broken = sorted(set(failed) & required)
if broken:
    sys.exit(f"required wheels failed to install: {', '.join(broken)}")
PYTHON
}

main() {
    local started=$SECONDS
    phase "machine"
    echo "checkout $(pwd), logs in $out_dir, mode $([[ $quick == 1 ]] && echo quick || echo full)"
    python -V
    command -v nvidia-smi > /dev/null || fail "nvidia-smi not found: no NVIDIA driver here, this is not a GPU machine"
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader \
        || fail "nvidia-smi cannot query the GPUs (driver problem?)"
    python - <<'PYTHON' || fail "torch sees no usable CUDA GPU (see above)"
import sys

import torch

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: a CPU build of torch, or CUDA_VISIBLE_DEVICES hides the GPUs")
print(f"{torch.cuda.device_count()} GPU(s); 0: {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
PYTHON

    phase "install the carried wheels (.gpu_wheels/)"
    [[ -f .gpu_wheels/required.txt ]] \
        || fail ".gpu_wheels/ is missing: run tools/make_gpu_wheels.sh where PyPI is reachable, and carry .gpu_wheels"
    local want have
    want="$(cat .gpu_wheels/python-version)"
    have="$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    [[ "$want" == "$have" ]] || fail "the carried wheels are for CPython $want, this machine runs $have:" \
        "make them with tools/make_gpu_wheels.sh --python-version $have"
    if ! install_wheels; then
        tail -n 25 "$out_dir/pip.log"
        fail "installing the required wheels failed (log: $out_dir/pip.log)"
    fi
    python -c "import deepspeed, math_verify, accelerate, pytest; print('deepspeed', deepspeed.__version__)" \
        || fail "the installed packages do not import (log: $out_dir/pip.log)"
    echo "installs took $((SECONDS - started)) s"

    # This checkout, not an installed paced-ds; DeepSpeed picks its CUDA accelerator itself.
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    unset DS_ACCELERATOR
    local tensorboard
    tensorboard="$(python -c 'import importlib.util as u; print(str(u.find_spec("tensorboard") is not None).lower())')"

    phase "pytest -m gpu (limit ${tests_limit_s} s)"
    local tests_rc=0
    timeout "$tests_limit_s" python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
        2>&1 | tee "$out_dir/pytest.log" || tests_rc=${PIPESTATUS[0]}

    phase "the reference recipe on 1 GPU, bf16 ($steps steps, limit ${bench_limit_s} s)"
    local bench_rc=0
    timeout "$bench_limit_s" python tools/bench_step.py --nproc 1 --steps "$steps" --warmup "$warmup" \
        --variants "${variants[@]}" --sample-gpu-memory --timeout-s "$bench_limit_s" \
        --work-dir "$out_dir/bench" --json "$out_dir/bench.json" \
        --extra model.dtype=bf16 "logging.tensorboard=$tensorboard" \
        2>&1 | tee "$out_dir/bench.log" || bench_rc=${PIPESTATUS[0]}
    grep '^|' "$out_dir/bench.log" > "$out_dir/bench.md" || true
    rm -rf "$out_dir"/bench/*/checkpoints  # large, and of no use to the reader

    # On-policy steps with rollouts from Hugging Face and from a vLLM server synced every step
    # (tools/bench_onpolicy.py); vLLM only where it imports. Reported, never failing the check.
    local onpolicy="skipped (--quick)"
    if [[ $quick == 0 ]]; then
        local engines=hf
        python -c 'import vllm' >/dev/null 2>&1 && engines=hf,vllm
        phase "on-policy steps, rollouts from $engines (limit 300 s)"
        if timeout 300 python tools/bench_onpolicy.py --nproc 1 --engines "$engines" \
                --model "${ONPOLICY_MODEL:-tiny-student}" --output-dir "$out_dir/onpolicy" \
                2>&1 | tee "$out_dir/onpolicy.log"; then
            onpolicy="done ($engines)"
            grep '^|' "$out_dir/onpolicy.log" >> "$out_dir/bench.md" || true
        else
            onpolicy="FAILED ($out_dir/onpolicy.log)"
        fi
    fi

    phase "summary ($((SECONDS - started)) s)"
    echo "pytest -m gpu: $([[ $tests_rc == 0 ]] && echo passed || echo "FAILED (exit $tests_rc, $out_dir/pytest.log)")"
    echo "bench:         $([[ $bench_rc == 0 ]] && echo done || echo "FAILED (exit $bench_rc, $out_dir/bench.log)")"
    echo "on-policy:     $onpolicy"
    if [[ -s "$out_dir/bench.md" ]]; then
        echo
        cat "$out_dir/bench.md"
    fi
    [[ $tests_rc == 0 && $bench_rc == 0 ]]
}

main 2>&1 | tee "$out_dir/gpu_check.log"
exit "${PIPESTATUS[0]}"
