"""Build DeepSpeed's JIT ops once, ahead of time, so no run or test pays for it.

    python -m paced_ds.runtime.ops [--cpu-adam] [--async-io]

On the CPU accelerator DeepSpeed compiles a shared-memory collective op the first time a
process group starts (minutes on a small machine); it is cached afterwards under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import argparse
import time

from paced_ds.runtime.dist import ensure_accelerator_env


def prebuild(cpu_adam: bool = False, async_io: bool = False) -> list[tuple[str, float]]:
    ensure_accelerator_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    names = []
    if get_accelerator().device_name() == "cpu":
        names.append("ShareMemCommBuilder")
    if cpu_adam:
        names.append("CPUAdamBuilder")
    if async_io:
        names.append("AsyncIOBuilder")
    built = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            built.append((name, -1.0))
            continue
        start = time.time()
        builder.load(verbose=False)
        built.append((name, time.time() - start))
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-adam", action="store_true", help="also build DeepSpeedCPUAdam (optimizer offload)")
    parser.add_argument("--async-io", action="store_true", help="also build async_io (NVMe offload; needs libaio)")
    args = parser.parse_args()
    for name, seconds in prebuild(args.cpu_adam, args.async_io):
        state = "not compatible here, skipped" if seconds < 0 else f"ready ({seconds:.0f} s)"
        print(f"paced-ds: DeepSpeed op {name}: {state}")


if __name__ == "__main__":
    main()
