"""The training loop: problems -> teacher answers -> student -> weighted divergence -> step.

Read it top to bottom: ``train(cfg)`` sets up (process group, inputs, teacher, student,
curriculum, sampler, resume), evaluates the student, then runs one plain loop over
optimizer steps (``step.optimizer_step`` does each), then evaluates, checkpoints and
exports. What runs between steps (re-estimates, SNR probes, evaluations, checkpoints)
is ``between_steps``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from paced_ds.config import RunConfig
from paced_ds.curriculum import snr
from paced_ds.curriculum.calibrate import bucket_edges
from paced_ds.curriculum.curriculum import Curriculum
from paced_ds.curriculum.sampler import ProblemSampler
from paced_ds.data import sources
from paced_ds.distill import estimate, onpolicy, probe, teachers
from paced_ds.distill.compute import ComputeMeter
from paced_ds.distill.inputs import load_inputs, tokenize_problems, with_teacher_responses
from paced_ds.distill.retention import Retention
from paced_ds.distill.step import StepOutcome, divergence_params, optimizer_step, per_request
from paced_ds.errors import UserError
from paced_ds.models import engines, generation, generators
from paced_ds.models.ulysses import SequenceParallel
from paced_ds.runtime import checkpoint, dist
from paced_ds.runtime.faults import NONE, Faults
from paced_ds.runtime.log import progress_bar, say
from paced_ds.runtime.memory import model_shape
from paced_ds.runtime.rundir import RunDir
from paced_ds.runtime.tracking import Tracker


@dataclass
class Run:
    """What the loop and the work between its steps share."""

    cfg: RunConfig
    tokenizer: object
    vocab: int
    records: list[dict]  # the training problems
    eval_records: list[dict]
    examples: list[dict] | None  # the teacher's response behind each prompt (off-policy steps)
    prompts: list[list[int]] | None  # each problem's prompt (on-policy steps)
    teacher: teachers.Teacher
    student: object
    generation: generators.StudentGeneration  # what estimates and evaluations generate with
    curriculum: Curriculum
    sampler: ProblemSampler
    switch_step: int | None  # the first on-policy step
    compute: ComputeMeter  # FLOPs by phase (distill/compute.py)
    faults: Faults = NONE  # what PACED_DS_FAULT injects (tests)
    tracker: Tracker | None = None  # made once resume() has said which step the run is at
    retention: Retention | None = None
    # tokens: response tokens trained on; forward_tokens: every token through the student,
    # rollouts (competence estimates, on-policy steps) included.
    # skipped_nonfinite: tries of a step whose update was skipped for a non-finite loss or gradient.
    counters: dict = field(default_factory=lambda: {"step": 0, "tokens": 0, "samples": 0, "skipped_zero_weight": 0,
                                                    "forward_tokens": 0, "skipped_nonfinite": 0,
                                                    "nonfinite_in_a_row": 0})
    scalars: dict = field(default_factory=dict)  # the curriculum's and the SNR probe's latest, logged every step
    said_small_support: bool = False  # "fewer problems of weight > 0 than a step holds", said once

    @property
    def step(self) -> int:
        return self.counters["step"]


def train(cfg: RunConfig) -> dict:
    # ---- set up -------------------------------------------------------------------------
    tokenizer, vocab, records, eval_records = load_inputs(cfg)
    retain_records = sources.limit_per_level(sources.load_retain(cfg.data), cfg.eval.limit_per_level)
    dist.init(cfg.train.timeout_s)
    faults = Faults.from_env(dist.rank())  # PACED_DS_FAULT, read once (tests)
    seed_everything(cfg.train.seed + dist.rank())
    check_same_config(cfg)
    launched = teachers.launch_teacher(cfg, tokenizer, vocab)  # the engine or the teacher job (responses written first)
    examples = None  # a purely on-policy run needs no teacher responses
    if cfg.loss.schedule != "on_policy":
        records = with_teacher_responses(cfg, tokenizer, launched, records)
        examples = tokenize_problems(cfg.data, tokenizer, records)
    teacher = teachers.open_teacher(cfg, tokenizer, vocab, launched, records, examples)
    student, _ = engines.build_student(cfg)
    sequence_parallel = SequenceParallel.create(cfg.train.sequence_parallel)
    if sequence_parallel is not None:
        sequence_parallel.check(student.module, "model.student")
        sequence_parallel.check(launched.engine.module, "model.teacher")
    groups = dist.world_size() // cfg.train.sequence_parallel  # data-parallel: the ranks of a group share problems
    say(f"{len(records)} training problems, {len(eval_records)} held-out; {dist.world_size()} ranks"
        + (f" in {groups} sequence-parallel groups of {cfg.train.sequence_parallel}" if sequence_parallel else "")
        + "; "
        f"student ZeRO-{cfg.train.zero_stage}, teacher {teachers.describe(cfg.teacher)}; "
        f"loss {cfg.loss.kind} ({cfg.loss.schedule})")
    switch_step = schedule_switch(cfg)
    sampler = ProblemSampler(len(records), seed=cfg.train.seed, world_size=groups,
                             rank=dist.rank() // cfg.train.sequence_parallel,
                             micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                             apply=cfg.curriculum.apply)
    fresh = checkpoint.find_resume(cfg.train.output_dir, cfg.train.resume) is None
    run = Run(cfg=cfg, tokenizer=tokenizer, vocab=vocab, records=records, eval_records=eval_records,
              examples=examples,
              prompts=generation.prompt_ids(tokenizer, records, cfg.data) if switch_step is not None else None,
              teacher=teacher, student=student,
              generation=generators.StudentGeneration(
                  cfg, tokenizer, engines.resolve_model(cfg.model.student, "model.student"), fresh),
              curriculum=Curriculum(cfg, records), sampler=sampler, switch_step=switch_step,
              compute=compute_meter(cfg), faults=faults)
    resumed_rng = resume(run)
    run.tracker = Tracker(cfg.train.output_dir, tensorboard=cfg.logging.tensorboard,
                          resume_step=run.step if resumed_rng is not None else None)
    run.retention = Retention(retain_records, cfg.train.output_dir)
    start_step, before = run.step, None
    if resumed_rng is None:
        before = run_eval(run, "before training")
        if run.curriculum.active:
            update_curriculum(run)
        if cfg.snr.every:
            run_probe(run)
    else:
        run.retention.resume()
    run.scalars.update(run.curriculum.summary(run.sampler.weights) if run.curriculum.active else {})
    progress = progress_bar(cfg.train.steps, "distilling", cfg.logging.progress, initial=run.step)
    if resumed_rng is not None:  # restored last, so that none of the set-up above draws from it
        checkpoint.set_rng_state(resumed_rng)

    # ---- the loop -------------------------------------------------------------------------
    while run.step < cfg.train.steps:
        started, lr = time.time(), student.get_lr()[0]  # the rate this step uses
        on_policy = switch_step is not None and run.step >= switch_step
        if on_policy and run.step == switch_step and cfg.loss.schedule == "two_stage":
            say(f"step {switch_step}: switching to on-policy {cfg.loss.stage2_kind}")
            if cfg.curriculum.reestimate_at_switch and run.curriculum.active:
                update_curriculum(run)
        epoch_before = sampler.epoch
        indices = [i for part in sampler.next_step() for i in part]
        if sampler.epoch != epoch_before or run.step == 0:
            check_agreement(sampler, run.curriculum)
        zero_weight_problems = int((sampler.weights[sampler.last_batch] == 0).sum())  # every rank's, at the draw
        step_examples, rollout_stats = step_sequences(run, indices, on_policy)
        outcome = optimizer_step(cfg, student, teacher, step_examples, indices, sampler.loss_weights(indices),
                                 kind=cfg.loss.stage2_kind if on_policy and cfg.loss.schedule == "two_stage"
                                 else cfg.loss.kind, vocab=vocab, pad_id=tokenizer.pad_token_id, generated=on_policy,
                                 ahead=requests_ahead(run), number=run.step + 1,
                                 sequence_parallel=sequence_parallel, faults=faults)
        run.compute.add("student", outcome.student_tokens)  # spent even when the update is skipped
        run.compute.add("teacher", outcome.teacher_tokens)
        if outcome.status != "applied":
            count_skip(run, outcome)
            continue
        run.counters["nonfinite_in_a_row"] = 0
        for key, value in (("step", 1), ("tokens", outcome.tokens), ("forward_tokens", outcome.forward_tokens),
                           ("samples", sampler.global_batch)):
            run.counters[key] += value
        if run.step % cfg.logging.log_every == 0 or run.step == cfg.train.steps:
            log_step(run, outcome, lr=lr, on_policy=on_policy, step_s=time.time() - started,
                     rollout_stats=rollout_stats, zero_weight_problems=zero_weight_problems)
            progress.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{lr:.1e}")
        progress.update(1)
        if faults:
            faults.after_step(run.step)
        between_steps(run, on_policy)
    progress.close()

    # ---- finish ---------------------------------------------------------------------------
    after = None
    if run.step > start_step:  # else a finished run was resumed: its last eval and checkpoint stand
        after = run_eval(run, "after training")
        save(run)
    closing = teacher.close()
    if closing:
        say(closing)
    exported = None
    if cfg.train.export:
        exported = checkpoint.export_student(student, tokenizer, RunDir(cfg.train.output_dir).student,
                                             dtype=cfg.train.export_dtype)
        say(f"student exported to {exported}")
    run.tracker.close()
    return {"before": before, "after": after, "steps": run.step, "exported": exported,
            "output_dir": RunDir(cfg.train.output_dir).root}


# ---- set-up -----------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compute_meter(cfg: RunConfig) -> ComputeMeter:
    """The FLOP counter of the run, N from each model's config (``memory.model_shape``)."""
    student = model_shape(engines.resolve_model(cfg.model.student, "model.student"), flag="model.student")
    try:
        teacher = model_shape(teachers.teacher_path(cfg), flag="model.teacher").flop_params
    except UserError as err:  # a served teacher named by a hub id: no config here to count
        teacher = 0
        say(f"flops_teacher counts 0: {err}")
    return ComputeMeter(student.flop_params, teacher)


def schedule_switch(cfg: RunConfig) -> int | None:
    """The first on-policy step: 0 for on_policy, loss.switch_at for two_stage, None for off_policy."""
    if cfg.loss.schedule == "off_policy":
        return None
    if cfg.loss.schedule == "on_policy":
        return 0
    at = cfg.loss.switch_at
    return int(round(at * cfg.train.steps)) if at < 1 else int(at)


def resume(run: Run):
    """Continue from the newest checkpoint (train.resume): its engine state, curriculum,
    sampler and counters; returns its RNG state, or None for a fresh run."""
    cfg, layout = run.cfg, RunDir(run.cfg.train.output_dir)
    resume_from = checkpoint.find_resume(cfg.train.output_dir, cfg.train.resume)
    if resume_from is None:
        if dist.is_main():
            layout.root.mkdir(parents=True, exist_ok=True)
            layout.config.write_text(json.dumps(cfg.to_dict(), indent=1))
            layout.snr.unlink(missing_ok=True)  # appended per probe: a fresh run starts it anew
        return None
    client_state = checkpoint.load(run.student, *resume_from)
    checkpoint.check_config(client_state["config"], cfg, client_state["counters"]["step"],
                            resume_from[0] / resume_from[1])
    run.curriculum.load_state_dict(client_state["curriculum"])
    if run.curriculum.active:
        run.sampler.set_weights(run.curriculum.weights())
    run.sampler.load_state_dict(client_state["sampler"])
    run.counters.update(client_state["counters"])
    if "compute" in client_state:  # checkpoints of paced-ds 0.2.0 and before count no FLOPs
        run.compute.load_state_dict(client_state["compute"])
    say(f"resumed from {resume_from[0] / resume_from[1]} at step {run.step}"
        + checkpoint.fallback_note(cfg.train.resume, *resume_from))
    return client_state["rng"]


def check_agreement(sampler: ProblemSampler, curriculum: Curriculum) -> None:
    """Every rank must hold the same plan and competence table; one that does not is named."""
    mine = (sampler.plan_digest(), curriculum.table.digest())
    everyone = dist.all_gather_objects(mine)
    for other_rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            raise UserError(f"rank {other_rank} disagrees with rank 0 about the epoch-{sampler.epoch} plan "
                            f"(plan {theirs[0]} vs {everyone[0][0]}, competence {theirs[1]} vs {everyone[0][1]}): "
                            "were the ranks given different data or competence files?")


def check_same_config(cfg: RunConfig) -> None:
    """Every rank must run the same config; one that does not (a node launched with another
    recipe or overrides) is named with the keys, instead of hanging in a collective later."""
    mine = {key: value for key, value in checkpoint.flat(cfg.to_dict()).items() if key not in NODE_LOCAL_KEYS}
    everyone = dist.all_gather_objects(mine)
    for other_rank, theirs in enumerate(everyone):
        differing = sorted(key for key in set(theirs) | set(everyone[0]) if theirs.get(key) != everyone[0].get(key))
        if differing:
            raise UserError(f"rank {other_rank} runs another config than rank 0 ({', '.join(differing)} differ): "
                            "launch every node with the same recipe and overrides")


NODE_LOCAL_KEYS = ("data.responses_dir", "teacher.nvme_path", "teacher.cache")  # paths that may differ per node


# ---- one step's sequences, its look-ahead, its outcome --------------------------------------------

def step_sequences(run: Run, indices: list[int], on_policy: bool) -> tuple[list[dict], dict]:
    """The sequences the step scores (teacher responses, or the student's own rollouts), and
    what its rollouts cost: rollout_time_s (generating, or waiting for rollouts generated
    ahead), rollout_sync_s (the server loading the student's weights first) and
    rollout_staleness (the updates the rollouts' weights lag behind: 0, or 1 with rollout.overlap)."""
    stats = {"rollout_time_s": 0.0, "rollout_sync_s": 0.0, "rollout_staleness": 0}
    if not on_policy:
        return [run.examples[i] for i in indices], stats
    cfg, prompts = run.cfg, [run.prompts[i] for i in indices]
    started = time.time()
    if cfg.rollout.engine == "vllm":
        responses = run.generation.ahead.take(indices) if cfg.rollout.overlap else None
        stats["rollout_staleness"] = int(responses is not None)
        waited_s = time.time() - started
        client, stats["rollout_sync_s"] = run.generation.synced_client(run.student, run.step)
        generating = time.time()
        if responses is None:
            responses = onpolicy.served_rollouts(client, prompts, cfg.rollout, run.tokenizer.eos_token_id)
        if cfg.rollout.overlap:
            start_next_rollouts(run, client)
        stats["rollout_time_s"] = waited_s + time.time() - generating
    else:
        responses = onpolicy.rollouts(run.student, run.tokenizer, prompts, cfg.rollout)
        stats["rollout_time_s"] = time.time() - started
    generated = sum(len(r) for r in responses)
    spent = dist.all_reduce_sum(torch.tensor([float(sum(map(len, prompts)) + generated), float(generated)],
                                             dtype=torch.float64))
    run.compute.add("rollout", int(spent[0].item()), generated=int(spent[1].item()))
    if cfg.logging.rollouts:
        record_rollouts(run, indices, responses)
    sequences = [onpolicy.example(run.prompts[i], r, run.tokenizer.eos_token_id, cfg.data.max_length)
                 for i, r in zip(indices, responses)]
    if run.curriculum.observes_rollouts:
        correct = onpolicy.outcomes(run.tokenizer, responses, [run.records[i]["answer"] for i in indices])
        run.curriculum.observe(indices, correct)
    return sequences, stats


def start_next_rollouts(run: Run, client) -> None:
    """rollout.overlap: the next step's rollouts, generated from the weights the server holds
    now while this step trains (the plan is deterministic; a refresh that changes it drops them)."""
    cfg, next_step = run.cfg, run.step + 1
    if next_step >= cfg.train.steps or run.switch_step is None or next_step < run.switch_step:
        return
    upcoming = [i for part in run.sampler.peek_step() for i in part]
    prompts = [run.prompts[i] for i in upcoming]
    run.generation.ahead.start(upcoming, lambda: onpolicy.served_rollouts(client, prompts, cfg.rollout,
                                                                           run.tokenizer.eos_token_id))


def record_rollouts(run: Run, indices: list[int], responses: list[list[int]]) -> None:
    """logging.rollouts: this step's rollouts of every rank, a line each, in rollouts.jsonl."""
    rows = [{"step": run.step + 1, "rank": dist.rank(), "id": run.records[i]["id"], "response_ids": r}
            for i, r in zip(indices, responses)]
    every = dist.all_gather_objects(rows)
    if dist.is_main():
        with open(RunDir(run.cfg.train.output_dir).rollouts, "a") as f:
            f.writelines(json.dumps(row) + "\n" for part in every for row in part)


def requests_ahead(run: Run) -> list[teachers.TeacherBatch] | None:
    """The next step's teacher requests, for a teacher that looks ahead, when they are known
    now: the plan is deterministic, and nothing before that step asks the teacher."""
    cfg, next_step = run.cfg, run.step + 1
    if not run.teacher.looks_ahead or next_step >= cfg.train.steps:
        return None
    if ((run.switch_step is not None and next_step >= run.switch_step)
            or (cfg.snr.every and next_step % cfg.snr.every == 0)):
        return None
    upcoming = [i for part in run.sampler.peek_step() for i in part]
    return teachers.requests_for([run.examples[i] for i in upcoming], upcoming, per_request(cfg),
                                 run.tokenizer.pad_token_id)


def count_skip(run: Run, outcome: StepOutcome) -> None:
    """A step that made no update: every weight 0 (counted), or a non-finite loss or gradient
    (counted; stop after train.max_nonfinite_steps in a row, keeping the last checkpoint)."""
    counters, step = run.counters, run.step + 1
    if outcome.status == "zero_weight":
        counters["skipped_zero_weight"] += 1
        return
    ranks = outcome.nonfinite_ranks
    what = f"loss on rank {', '.join(map(str, ranks))}" if ranks else "gradient norm (the loss is finite)"
    if outcome.applied_anyway:  # only when DeepSpeed does not compute the gradient norm (compute_grad_norm=false)
        raise UserError(f"step {step}: non-finite {what} and DeepSpeed applied the update anyway; stopped "
                        "without saving: turn zero_optimization.compute_grad_norm (DeepSpeed's default) back on in "
                        "the DeepSpeed JSON of train.ds_config")
    counters["skipped_nonfinite"] += 1
    counters["nonfinite_in_a_row"] += 1
    say(f"step {step}: non-finite {what}; update skipped "
        f"({counters['nonfinite_in_a_row']} in a row, {counters['skipped_nonfinite']} in all)")
    if counters["nonfinite_in_a_row"] >= run.cfg.train.max_nonfinite_steps:
        raise UserError(f"step {step}: {counters['nonfinite_in_a_row']} optimizer steps in a row had a non-finite "
                        f"loss or gradient (train.max_nonfinite_steps); stopped without saving, so the last "
                        f"checkpoint in {RunDir(run.cfg.train.output_dir).checkpoints} is intact: check the data "
                        "and train.lr (a lower train.lr is a new run, in another train.output_dir)")


def log_step(run: Run, outcome: StepOutcome, *, lr: float, on_policy: bool, step_s: float, rollout_stats: dict,
             zero_weight_problems: int) -> None:
    grad_norm = run.student.get_global_grad_norm()
    values = {
        "loss": outcome.loss, "lr": lr, "tokens": run.counters["tokens"],
        "forward_tokens": run.counters["forward_tokens"], "samples": run.counters["samples"],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "weight_mean": outcome.weight_mean, "step_time_s": step_s, "teacher_time_s": outcome.teacher_s,
        **rollout_stats, "train_time_s": step_s - rollout_stats["rollout_time_s"] - rollout_stats["rollout_sync_s"],
        "tokens_per_s": outcome.tokens / step_s, "on_policy": int(on_policy),
        "epoch": run.sampler.epoch, "batch": run.sampler.batch_digest(),
        "skipped_zero_weight": run.counters["skipped_zero_weight"],
        "skipped_nonfinite": run.counters["skipped_nonfinite"], "zero_weight_problems": zero_weight_problems,
        **run.compute.row(), **run.scalars}
    device = dist.device()
    if device.type == "cuda":  # this rank's peak since the previous logged step, both engines
        values["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    run.tracker.log_step(run.step, values)


# ---- between steps ------------------------------------------------------------------------------

def between_steps(run: Run, on_policy: bool) -> None:
    """What is due after step ``run.step``: the curriculum's refresh or re-estimate, the SNR
    probe, an evaluation, a checkpoint. Collective, alike on every rank."""
    cfg, step = run.cfg, run.step
    if run.curriculum.merge_due(step, on_policy):
        run.curriculum.merge_observed()
        refresh_weights(run)
    if run.curriculum.reestimate_due(step) and step < cfg.train.steps:
        update_curriculum(run)
    if cfg.snr.every and step % cfg.snr.every == 0:
        run_probe(run)
    if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
        run_eval(run, "during training")
    if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
        save(run)


def update_curriculum(run: Run) -> None:
    """(Re-)estimate competence (or read the given file), then reweight the sampler and report;
    the rollouts' student tokens are counted."""
    cfg, curriculum = run.cfg, run.curriculum
    if cfg.curriculum.competence:
        unmatched = curriculum.load_given(cfg.curriculum.competence)
        say(f"competence read from {cfg.curriculum.competence}"
            + (f" ({unmatched} ids there are not in this run)" if unmatched else ""))
    else:
        total = len(run.records) * cfg.curriculum.rollouts  # the most an adaptive estimate rolls out
        at_most = " at most" if cfg.curriculum.rollouts_min else ""
        progress = progress_bar(total // dist.world_size(), f"rollouts (K={cfg.curriculum.rollouts}{at_most})",
                                cfg.logging.progress)
        with run.generation.generator(run.student, run.step) as generator:
            result = estimate.estimate(generator, run.tokenizer, run.records, curriculum.table, cfg,
                                       seed=cfg.train.seed + 7 * curriculum.estimates + 1, progress=progress)
        progress.close()
        say(f"competence estimated at step {run.step}: {estimate.describe(result)}, mean pass rate "
            f"{result['pass_rate_mean']:.1%}")
        run.counters["forward_tokens"] += result["forward_tokens"]
        run.compute.add("rollout", result["forward_tokens"], generated=result["generated_tokens"])
    refresh_weights(run)


def refresh_weights(run: Run, new_estimate: bool = True) -> None:
    """New pass rates (or a new kernel): reweight the sampler, write competence.jsonl, report."""
    curriculum = run.curriculum
    weights = curriculum.weights()
    if new_estimate:
        curriculum.record_estimate(run.step, weights)
    run.sampler.set_weights(weights)
    if run.sampler.support < run.sampler.global_batch and not run.said_small_support:
        run.said_small_support = True
        say(f"curriculum: only {run.sampler.support} problems have weight > 0, fewer than a step's global batch of "
            f"{run.sampler.global_batch}: each step draws some of them more than once (each pass over them in a new "
            "order); a wider curriculum (curriculum.posterior=true, another band) or a smaller batch avoids it")
    summary = curriculum.summary(weights)
    say("curriculum: " + ", ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in summary.items()
                                   if "share" in k or "pass_rate_" in k))
    if dist.is_main():
        curriculum.write(run.cfg.train.output_dir, weights)
    curriculum.log(run.tracker, run.step, weights)
    run.scalars.update(summary)


def run_probe(run: Run) -> None:
    """The gradient-SNR probe (collective); with curriculum.kernel=calibrated, refit and reweight.
    Its student forward tokens are counted; its scalars are logged with the following steps."""
    cfg, step = run.cfg, run.step
    result = probe.probe(run.student, run.teacher, run.tokenizer, run.examples, run.curriculum.table.pass_rates(),
                         bucket_edges(cfg.snr.buckets), cfg, vocab=run.vocab, seed=cfg.train.seed * 7_919 + step,
                         loss_params=divergence_params(cfg.loss, cfg.loss.kind))
    run.scalars.update({f"snr/{name}": v["snr"] for name, v in result["buckets"].items() if v is not None})
    run.scalars["snr/probe_time_s"] = result["seconds"]
    run.counters["forward_tokens"] += result["forward_tokens"]
    run.compute.add("student", result["forward_tokens"])  # each probed sequence: a forward and a backward
    run.compute.add("teacher", result["forward_tokens"])
    say(f"gradient SNR at step {step} ({result['problems']} problems, {result['params']} parameters, "
        f"{result['seconds']:.1f} s): " + ", ".join(f"{name} {v['snr']:.3g} (n={v['count']})" if v else f"{name} -"
                                                  for name, v in result["buckets"].items()))
    run.tracker.image("snr/snr_vs_pass_rate", snr.picture(result), step)
    if dist.is_main():
        with open(RunDir(cfg.train.output_dir).snr, "a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
    if cfg.curriculum.kernel == "calibrated":
        fit = run.curriculum.calibrate(result)
        say(f"calibrated kernel: alpha {run.curriculum.alpha:.3f}, beta {run.curriculum.beta:.3f}"
            + ("" if fit.fitted else f" (kept: {fit.reason})"))
        refresh_weights(run, new_estimate=False)
    run.scalars.update(run.curriculum.summary(run.sampler.weights))


def run_eval(run: Run, label: str) -> dict | None:
    if not run.eval_records:
        return None
    cfg, step, started = run.cfg, run.step, time.time()
    with run.generation.generator(run.student, step, keep_random_stream=True) as generator:
        result = generation.evaluate(generator, run.tokenizer, run.eval_records, cfg.data, cfg.eval)
        result.update(run.retention.measure(generator, run.tokenizer, cfg.data, cfg.eval))
    run.compute.add("eval", result["tokens"] + result.get("retention_tokens", 0),
                    generated=result["generated_tokens"] + result.get("retention_generated_tokens", 0))
    result.update(run.compute.flops())  # the compute spent until now, this evaluation included
    run.tracker.log_eval(step, result)
    levels = generation.accuracy_table(result["by_difficulty"])
    forgot = ""
    if "forgotten" in result:
        forgot = (f" | retention set: the {result['retention_set']} retention problems solved now" if step == 0 else
                  f" | forgotten {result['forgotten']:.1%} of the retention set ({result['retention_set']})")
    say(f"eval ({label}, step {step}): accuracy {result['accuracy']:.1%} | "
        + " ".join(f"{k} {v:.0%}" for k, v in levels.items()) + forgot + f" | {time.time() - started:.1f} s")
    return result


def save(run: Run) -> None:
    cfg = run.cfg
    client_state = {"sampler": run.sampler.state_dict(), "counters": dict(run.counters), "config": cfg.to_dict(),
                    "curriculum": run.curriculum.state_dict(), "compute": run.compute.state_dict()}
    path = checkpoint.save(run.student, cfg.train.output_dir, run.step, client_state, cfg.to_dict(), run.faults)
    say(f"checkpoint saved: {path}")
