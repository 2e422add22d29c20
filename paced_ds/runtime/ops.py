"""Build DeepSpeed's JIT ops once, ahead of time, so no run or test pays for it.

    python -m paced_ds.runtime.ops [--cpu-adam] [--no-async-io]

On the CPU accelerator DeepSpeed compiles a shared-memory collective op the first time a
process group starts (minutes on a small machine); it is cached afterwards under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). The async_io op of
NVMe offload (teacher.offload=nvme, with its pin_memory op) is built too when libaio is
installed (Debian/Ubuntu: ``apt-get install libaio-dev``), and skipped, saying so, when not.
"""

from __future__ import annotations

import argparse
import time

from paced_ds.runtime.dist import ensure_accelerator_env

NOT_COMPATIBLE = {"AsyncIOBuilder": "no libaio here (apt-get install libaio-dev), skipped; "
                                    "teacher.offload=nvme needs it"}


def prebuild(cpu_adam: bool = False, async_io: bool = True) -> list[tuple[str, float]]:
    """Each op's name and its build (or cache load) time in seconds; -1 when it cannot build here."""
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
    parser.add_argument("--no-async-io", dest="async_io", action="store_false",
                        help="skip async_io (NVMe offload), built by default when libaio is installed")
    args = parser.parse_args()
    for name, seconds in prebuild(args.cpu_adam, args.async_io):
        state = NOT_COMPATIBLE.get(name, "not compatible here, skipped") if seconds < 0 else f"ready ({seconds:.0f} s)"
        print(f"paced-ds: DeepSpeed op {name}: {state}")


if __name__ == "__main__":
    main()
