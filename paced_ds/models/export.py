"""Offline export of a checkpoint's student to Hugging Face format, in one process.

DeepSpeed's ``zero_to_fp32`` merges the ZeRO partitions of any world size into one fp32
state dict, so a checkpoint written by 64 GPUs exports on a laptop.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from paced_ds.errors import UserError
from paced_ds.runtime.checkpoint import damaged, incomplete, save_pretrained_as
from paced_ds.runtime.rundir import RunDir


def export_checkpoint(run_dir: str, tag: str | None = None, out: str | None = None, dtype: str | None = None) -> Path:
    """The checkpoint ``tag`` (default: the latest) of ``run_dir`` as a Hugging Face directory,
    its weights in ``dtype`` (fp32 | bf16; default: the run's train.export_dtype, where auto keeps
    the merged fp32 master weights)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from paced_ds.config import RunConfig
    from paced_ds.models.engines import resolve_model

    layout = RunDir(run_dir)
    run, config_path, root = layout.root, layout.config, layout.checkpoints
    if not config_path.is_file():
        raise UserError(f"--run {run_dir}: no config.json (not a paced-ds run directory)")
    if tag is None:
        if not (root / "latest").is_file():
            raise UserError(f"--run {run_dir}: no checkpoint (checkpoints/latest is missing)")
        tag = (root / "latest").read_text().strip()
    if not (root / tag).is_dir():
        raise UserError(f"--tag {tag}: no checkpoint {root / tag}")
    why = incomplete(root / tag) or damaged(root / tag)  # one process: it hashes every file
    if why is not None:
        raise UserError(f"--tag {tag}: {why}; export another checkpoint (--tag step_N)")
    saved = json.loads(config_path.read_text())
    model_cfg = RunConfig().model
    model_cfg.student = saved["model"]["student"]
    model_cfg.trust_remote_code = saved["model"].get("trust_remote_code", False)
    student = resolve_model(model_cfg.student, "model.student")
    target = Path(out) if out else run / f"student-{tag}"
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    config = AutoConfig.from_pretrained(student, trust_remote_code=model_cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise UserError(f"checkpoint {root / tag} does not match {student}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    model.tie_weights()
    save_pretrained_as(model, model.state_dict(), staging, dtype or saved["train"].get("export_dtype", "auto"))
    AutoTokenizer.from_pretrained(student).save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target
