"""The run's curriculum: competence table -> per-problem weights, and what to report of them.

A plain object the training loop calls: when to (re-)estimate or fold in on-policy
outcomes (``curriculum.refresh``), the weights the sampler and the loss use, the scalars,
histograms and picture that show how competence moves.
"""

from __future__ import annotations

from pathlib import Path

import torch

from paced_ds.curriculum.calibrate import fit_kernel
from paced_ds.curriculum.competence import CompetenceTable, level_pass_rates
from paced_ds.curriculum.kernel import curriculum_weights, normalize_to_dataset_mean, weight_summary
from paced_ds.curriculum.stopping import fit_priors
from paced_ds.errors import UserError
from paced_ds.runtime import dist
from paced_ds.runtime.rundir import RunDir
from paced_ds.runtime.tracking import figure_rgb, new_figure

PICTURE_BINS = 10


class Curriculum:
    def __init__(self, cfg, records: list[dict]):
        self.cfg = cfg.curriculum
        self.probing = cfg.snr.every > 0  # the SNR probe buckets problems by pass rate
        self.table = CompetenceTable([r["id"] for r in records])
        self.difficulties = [str(r.get("difficulty", "all")) for r in records]
        self.level_members = {level: torch.tensor([d == level for d in self.difficulties])  # level -> problem mask
                              for level in sorted(set(self.difficulties))}
        # per estimate: (step, pass-rate histogram, {level: (mean pass rate, share of the weight)})
        self.history: list[tuple[int, torch.Tensor, dict]] = []
        self.estimates = 0
        self.alpha, self.beta = self.cfg.alpha, self.cfg.beta  # refit by calibrate() with kernel=calibrated
        # On-policy outcomes since the last merge (curriculum.refresh=on_policy), the same on every rank.
        self.observed_correct = torch.zeros(len(records), dtype=torch.float64)
        self.observed_trials = torch.zeros(len(records), dtype=torch.float64)

    @property
    def active(self) -> bool:
        """Whether pass rates matter: every mode but uniform, a given competence file, or an SNR probe."""
        return self.cfg.mode != "uniform" or bool(self.cfg.competence) or self.probing

    @property
    def observes_rollouts(self) -> bool:
        """Whether on-policy rollouts' outcomes feed the table (curriculum.refresh=on_policy)."""
        return self.cfg.refresh == "on_policy"

    def load_given(self, path: str) -> int:
        """Counts from a competence.jsonl (curriculum.competence); returns unmatched ids."""
        given = CompetenceTable.read_jsonl(path, self.table.ids)
        self.table.load_state_dict(given.state_dict())
        return given.unmatched

    def observe(self, indices: list[int], correct: list[int]) -> None:
        """Collective: every rank's on-policy outcomes of this step, gathered so that every
        rank holds the same observations (small: one (index, 0/1) pair per problem)."""
        for part_indices, part_correct in dist.all_gather_objects((list(indices), list(correct))):
            index = torch.tensor(part_indices, dtype=torch.long)
            self.observed_correct.index_add_(0, index, torch.tensor(part_correct, dtype=torch.float64))
            self.observed_trials.index_add_(0, index, torch.ones(len(part_indices), dtype=torch.float64))

    def merge_observed(self) -> None:
        """Fold the observations since the last merge into the table, the older counts
        discounted by curriculum.decay (so pass rates follow the student as it learns)."""
        decay = self.cfg.decay
        self.table.correct = self.table.correct * decay + self.observed_correct
        self.table.trials = self.table.trials * decay + self.observed_trials
        self.observed_correct.zero_()
        self.observed_trials.zero_()

    def state_dict(self) -> dict:
        return {"competence": self.table.state_dict(), "estimates": self.estimates,
                "alpha": self.alpha, "beta": self.beta,
                "observed_correct": self.observed_correct.tolist(),
                "observed_trials": self.observed_trials.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.table.load_state_dict(state["competence"])
        self.estimates = state["estimates"]
        self.alpha, self.beta = state["alpha"], state["beta"]
        self.observed_correct = torch.tensor(state["observed_correct"], dtype=torch.float64)
        self.observed_trials = torch.tensor(state["observed_trials"], dtype=torch.float64)

    def merge_due(self, step: int, on_policy: bool) -> bool:
        """Whether to merge the observed outcomes into the table after optimizer step ``step``
        (curriculum.refresh=on_policy; ``on_policy``: the step trained on rollouts)."""
        return self.observes_rollouts and on_policy and step % self.cfg.refresh_every == 0

    def reestimate_due(self, step: int) -> bool:
        """Whether to re-estimate after optimizer step ``step`` (curriculum.refresh=every)."""
        return (self.active and not self.cfg.competence and self.cfg.refresh == "every"
                and step % self.cfg.refresh_every == 0)

    def weights(self) -> torch.Tensor:
        """Per-problem weights from the table: the kernel, normalised as configured.

        In sample mode these are the draw's probabilities (unnormalised is fine); in
        weight mode they multiply the loss, and ``dataset_mean`` makes them average 1 over
        the problems the sampler draws from (those of weight > 0), so that a step has the
        loss scale of unweighted distillation.
        """
        prior = (1.0, 1.0)
        if self.cfg.posterior and self.cfg.prior == "fitted":
            prior = fit_priors(self.table.correct, self.table.trials, self.difficulties)
        weights = curriculum_weights(self.table.correct, self.table.trials, mode=self.cfg.mode,
                                     alpha=self.alpha, beta=self.beta, posterior=self.cfg.posterior, prior=prior,
                                     floor=self.cfg.weight_floor, band=(self.cfg.band_lo, self.cfg.band_hi))
        if not weights.sum() > 0:
            raise UserError(f"curriculum.mode={self.cfg.mode}: every problem has weight 0 (are all pass rates "
                            "0 or 1?); try curriculum.posterior=true, another band, or curriculum.mode=uniform")
        if self.cfg.apply == "weight" and self.cfg.normalize == "dataset_mean":
            weights = normalize_to_dataset_mean(weights, dataset_weights=weights[weights > 0])
        return weights.float()

    def summary(self, weights: torch.Tensor) -> dict:
        """Curriculum scalars for metrics.jsonl and TensorBoard (estimated problems only)."""
        tried = self.table.trials > 0
        if not tried.any():
            return {}
        rates = self.table.pass_rates()[tried]
        stats = weight_summary(rates, weights[tried])
        out = {f"curriculum/{key}": value for key, value in stats.items()}
        for level, rate in level_pass_rates(self.table, self.difficulties).items():
            out[f"curriculum/pass_rate_{level}"] = rate
        for level, share in self.level_weight_shares(weights).items():  # where the weight mass sits
            out[f"curriculum/weight_share_{level}"] = share
        out["curriculum/estimates"] = self.estimates
        out["curriculum/alpha"], out["curriculum/beta"] = self.alpha, self.beta
        return out

    def calibrate(self, snr_result: dict):
        """curriculum.kernel=calibrated: refit alpha, beta to the measured SNR curve (smoothed)."""
        buckets = [v for v in snr_result["buckets"].values() if v is not None]
        fit = fit_kernel([v["pass_rate"] for v in buckets], [v["snr"] for v in buckets],
                         previous=(self.alpha, self.beta))
        self.alpha, self.beta = fit.alpha, fit.beta
        return fit

    def level_weight_shares(self, weights: torch.Tensor) -> dict[str, float]:
        """Each difficulty level's share of the weight mass."""
        total = float(weights.sum())
        return {level: float(weights[members].sum()) / total if total > 0 else 0.0
                for level, members in self.level_members.items()}

    def record_estimate(self, step: int, weights: torch.Tensor) -> None:
        """Keep what the curriculum picture shows of this estimate (its ``weights``)."""
        self.estimates += 1
        rates = self.table.pass_rates()
        counts = torch.histc(rates[~torch.isnan(rates)].float(), bins=PICTURE_BINS, min=0.0, max=1.0)
        shares = self.level_weight_shares(weights)
        rates = level_pass_rates(self.table, self.difficulties)
        levels = {level: (rate, shares[level]) for level, rate in rates.items()}
        self.history.append((step, counts / counts.sum().clamp(min=1), levels))

    def write(self, output_dir: str | Path, weights: torch.Tensor) -> Path:
        return self.table.write_jsonl(RunDir(output_dir).competence, weights=weights)

    def log(self, tracker, step: int, weights: torch.Tensor) -> None:
        """Histograms of pass rates and weights, and the curriculum picture (rank 0 only)."""
        rates = self.table.pass_rates()
        tried = ~torch.isnan(rates)
        if tried.any():
            tracker.histogram("curriculum/pass_rate", rates[tried], step)
            tracker.histogram("curriculum/weight", weights[tried], step)
        if self.history:
            tracker.image("curriculum/pass_rate_over_steps", self.picture(), step)

    def picture(self):
        """An RGB array: left, the pass-rate distribution (rows: bins of p) at each estimate
        (columns); right, each level's mean pass rate (solid) and share of the weight (dashed)
        over the steps of the estimates: the frontier moving as the student learns."""
        grid = torch.stack([counts for _, counts, _ in self.history], dim=1).numpy()
        steps = [step for step, _, _ in self.history]
        fig, (ax, levels_ax) = new_figure(10, 3.4, columns=2)
        ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=max(grid.max(), 1e-9),
                  extent=(-0.5, len(steps) - 0.5, 0, 1))
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels([str(s) for s in steps], fontsize=7)
        ax.set_xlabel("optimizer step of the estimate")
        ax.set_ylabel("pass rate p")
        ax.set_title("share of problems per pass-rate bin", fontsize=9)
        names = sorted({level for _, _, levels in self.history for level in levels})
        for number, level in enumerate(names):
            color = f"C{number % 10}"  # matplotlib's default colour cycle
            points = [(step, levels[level]) for step, _, levels in self.history if level in levels]
            x = [step for step, _ in points]
            levels_ax.plot(x, [rate for _, (rate, _) in points], "-o", color=color, markersize=3,
                           label=f"{level} pass rate")
            levels_ax.plot(x, [share for _, (_, share) in points], "--s", color=color, markersize=3,
                           label=f"{level} weight share")
        levels_ax.set_ylim(-0.02, 1.02)
        levels_ax.set_xlabel("optimizer step of the estimate")
        levels_ax.set_title("per level: pass rate (solid), share of the weight (dashed)", fontsize=9)
        levels_ax.legend(fontsize=6, ncol=2, loc="best")
        return figure_rgb(fig)

