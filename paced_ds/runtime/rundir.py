"""The layout of a run directory (``train.output_dir``), in one place.

    config.json        the run's full config (written when the run starts)
    metrics.jsonl      one row per logged optimizer step
    eval.jsonl         one row per held-out evaluation
    competence.jsonl   the latest pass-rate table and weights, one row per problem
    snr.jsonl          one row per gradient-SNR probe (appended)
    rollouts.jsonl     logging.rollouts: each on-policy step's rollouts, a row per problem
    snr.json           `paced-ds snr`'s measurement
    retention.json     the retention set's problem ids, fixed at step 0
    tensorboard/       TensorBoard event files
    checkpoints/       DeepSpeed checkpoints step_N/ and the file `latest` naming the newest
    student/           the exported student (Hugging Face format)
"""

from __future__ import annotations

from pathlib import Path


class RunDir:
    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir)

    config = property(lambda self: self.root / "config.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    evals = property(lambda self: self.root / "eval.jsonl")
    competence = property(lambda self: self.root / "competence.jsonl")
    snr = property(lambda self: self.root / "snr.jsonl")
    rollouts = property(lambda self: self.root / "rollouts.jsonl")
    snr_measurement = property(lambda self: self.root / "snr.json")
    retention = property(lambda self: self.root / "retention.json")
    tensorboard = property(lambda self: self.root / "tensorboard")
    checkpoints = property(lambda self: self.root / "checkpoints")
    latest = property(lambda self: self.root / "checkpoints" / "latest")
    student = property(lambda self: self.root / "student")

    def holds_run(self) -> bool:
        """Whether a run with checkpoints lives here."""
        return self.latest.is_file()
