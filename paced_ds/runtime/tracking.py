"""What a run reports: TensorBoard events and JSON lines, written by rank 0 only.

``metrics.jsonl`` holds one object per logged optimizer step and ``eval.jsonl`` one per
held-out evaluation (docs/real-models.md, "Run directory"); the same numbers go to TensorBoard scalars.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from paced_ds.errors import UserError
from paced_ds.runtime import dist
from paced_ds.runtime.files import write_jsonl_atomic
from paced_ds.runtime.rundir import RunDir

# TensorBoard's "Custom scalars" tab: the per-level curves of the curriculum in one chart each, so
# that the frontier is seen moving (each level's own card holds one line).
CHARTS = {
    "curriculum": {
        "pass rate per level": ["Multiline", [r"curriculum/pass_rate_(?!mean$).*"]],
        "share of the weight per level": ["Multiline", [r"curriculum/weight_share_(?!p[01]$).*"]],
        "problems at p = 0 and p = 1": ["Multiline", [r"curriculum/(zero|full)_pass_share"]],
    },
    "compute": {
        "FLOPs by phase (cumulative)": ["Multiline", [r"train/flops_(student|teacher|rollout|eval|total)$"]],
    },
    "held-out accuracy": {
        "per level": ["Multiline", [r"eval/accuracy.*"]],
    },
}


class Tracker:
    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None):
        """``resume_step``: the step of the checkpoint a resumed run starts from (None: a new run)."""
        self.enabled = dist.is_main()
        self.output_dir = Path(output_dir)
        self.writer = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        layout = RunDir(output_dir)
        if resume_step is not None:
            # A run that crashed logged steps past its last checkpoint; they are done again now.
            for path in (layout.metrics, layout.evals, layout.snr, layout.rollouts):
                drop_rows_after(path, resume_step)
        mode = "a" if resume_step is not None else "w"
        if resume_step is None:  # appended to by the trainer (logging.rollouts): a new run starts it afresh
            layout.rollouts.unlink(missing_ok=True)
        self.metrics_file = layout.metrics.open(mode)
        self.eval_file = layout.evals.open(mode)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                                "or set logging.tensorboard=false") from None

            # On resume, TensorBoard drops the events a crashed run wrote past its checkpoint.
            purge_step = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(log_dir=str(layout.tensorboard), purge_step=purge_step)
            self.writer.add_custom_scalars(CHARTS)


    def log_step(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        self.metrics_file.write(json.dumps(row, default=_jsonable) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(_tag(key), value, step)

    def log_eval(self, step: int, result: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "accuracy": result["accuracy"], "by_difficulty": result["by_difficulty"],
               "count": result["count"],
               **{key: result[key] for key in ("retention_set", "retained", "forgotten", "solved") if key in result},
               **{key: value for key, value in result.items() if key.startswith("flops_")}}  # compute spent so far
        self.eval_file.write(json.dumps(row) + "\n")
        self.eval_file.flush()
        if self.writer is not None:
            self.writer.add_scalar("eval/accuracy", result["accuracy"], step)
            for level, accuracy in result["by_difficulty"].items():
                self.writer.add_scalar(f"eval/accuracy_{level}", accuracy, step)
            if math.isfinite(result.get("forgotten", float("nan"))):
                self.writer.add_scalar("eval/forgotten", result["forgotten"], step)
            self.writer.flush()

    def histogram(self, tag: str, values, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_histogram(tag, values, step)

    def image(self, tag: str, rgb, step: int) -> None:
        """An [H, W, 3] uint8 array as a TensorBoard image."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        self.eval_file.close()
        if self.writer is not None:
            self.writer.close()


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of a JSON-lines log up to ``step``; a torn last line (a killed writer) goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(row)
    write_jsonl_atomic(path, kept)


def _tag(key: str) -> str:
    return key if "/" in key else f"train/{key}"


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def new_figure(width_in: float, height_in: float, columns: int = 1):
    """A matplotlib figure and its axes (``columns`` of them side by side) drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width_in, height_in), dpi=100)


def figure_rgb(fig):
    """The figure as an [H, W, 3] uint8 array (for Tracker.image), and closed."""
    import io

    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))
