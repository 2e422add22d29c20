"""Forgetting, measured on a retention set: what the student could do before training.

The retention set is the part of ``data.retain`` that the student solves (greedy) before
its first step, as MMLU stands for a model's general ability in the PACED paper. Every
later evaluation re-asks those problems only and reports the share no longer solved,
``forgotten``. The set's ids are written to ``<output_dir>/retention.json`` at step 0,
so that a resumed run measures against the same set.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from paced_ds.models import generation
from paced_ds.runtime import dist
from paced_ds.runtime.files import write_text_atomic
from paced_ds.runtime.rundir import RunDir


class Retention:
    def __init__(self, records: list[dict], output_dir: str | Path):
        self.records = records
        self.path = RunDir(output_dir).retention
        self.kept: list[dict] | None = None  # the retention set, once known

    @property
    def active(self) -> bool:
        return bool(self.records)

    def resume(self) -> None:
        """Take the retention set a resumed run measured at its step 0. A run that saved none
        measures none: a set fixed now, from the trained student, would hide what it forgot."""
        if not self.active:
            return
        if not self.path.is_file():
            self.records = []
            return
        ids = set(json.loads(self.path.read_text())["ids"])
        self.kept = [r for r in self.records if r["id"] in ids]

    def measure(self, generator, tokenizer, data_cfg, eval_cfg) -> dict:
        """``retention_set``, ``retained`` and ``forgotten`` (shares of the set) for an eval row.
        Collective: every rank calls it. The first call fixes the set. ``generator`` as for
        ``generation.evaluate``."""
        if not self.active:
            return {}
        solving = dataclasses.replace(eval_cfg, record_problems=True)
        if self.kept is None:
            result = generation.evaluate(generator, tokenizer, self.records, data_cfg, solving)
            solved = set(result["solved"])
            self.kept = [r for r in self.records if r["id"] in solved]
            if dist.is_main():
                write_text_atomic(self.path, json.dumps({"offered": len(self.records),
                                                         "ids": [r["id"] for r in self.kept]}) + "\n")
            return {"retention_set": len(self.kept), "retained": 1.0, "forgotten": 0.0, **spent(result)}
        if not self.kept:
            return {"retention_set": 0, "retained": float("nan"), "forgotten": float("nan")}
        result = generation.evaluate(generator, tokenizer, self.kept, data_cfg, solving)
        retained = len(result["solved"]) / len(self.kept)
        return {"retention_set": len(self.kept), "retained": retained, "forgotten": 1.0 - retained, **spent(result)}


def spent(result: dict) -> dict:
    """The tokens a retention evaluation cost, under names of their own in an eval row."""
    return {"retention_tokens": result["tokens"], "retention_generated_tokens": result["generated_tokens"]}
