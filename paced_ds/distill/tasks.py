"""The launcher tasks besides training: teacher responses (`generate`), held-out accuracy
(`eval`), the student's competence (`estimate`), gradient SNR (`snr`), the offline teacher
cache (`cache-teacher`) and the pipelined teacher job (`teacher-serve`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from paced_ds.config import RunConfig
from paced_ds.curriculum.calibrate import bucket_edges
from paced_ds.curriculum.curriculum import Curriculum
from paced_ds.data import sources
from paced_ds.data.collate import collate_train
from paced_ds.distill import cache, estimate, pipeline, probe
from paced_ds.distill.fused import teacher_answer
from paced_ds.distill.inputs import generate_responses, load_inputs, tokenize_problems, with_teacher_responses
from paced_ds.distill.step import divergence_params
from paced_ds.distill.teachers import EngineTeacher, LaunchedTeacher, launch_teacher, teacher_contract, teacher_path
from paced_ds.errors import UserError
from paced_ds.models import engines, generation, generators
from paced_ds.runtime import dist
from paced_ds.runtime.faults import Faults
from paced_ds.runtime.log import say
from paced_ds.runtime.rundir import RunDir


def teacher_engine_and_inputs(cfg: RunConfig, *, responses: bool = True):
    """The opening of the teacher's tasks: inputs checked, the process group, the teacher
    engine, and (``responses``) the problems with its responses, generated if missing.
    Returns (tokenizer, vocab, teacher engine, training problems)."""
    tokenizer, vocab, train_records, _ = load_inputs(cfg)
    dist.init(cfg.train.timeout_s)
    teacher = engines.build_teacher(cfg, name=teacher_path(cfg))
    if responses:
        train_records = with_teacher_responses(cfg, tokenizer, LaunchedTeacher(engine=teacher), train_records)
    return tokenizer, vocab, teacher, train_records


def frozen_student(cfg: RunConfig):
    """model.student as a ZeRO-3 inference engine (no optimizer), loaded like the teacher."""
    return engines.build_inference_engine(cfg, engines.resolve_model(cfg.model.student, "model.student"),
                                          role="student")


def student_source(cfg: RunConfig, tokenizer) -> generators.StudentGeneration:
    """Where model.student generates (rollout.engine), as it is on disk."""
    return generators.StudentGeneration(cfg, tokenizer, engines.resolve_model(cfg.model.student, "model.student"),
                                        fresh_run=True)


def student_generation(cfg: RunConfig, tokenizer):
    """model.student's generator source and, for Hugging Face generation, its engine (a vLLM
    server loads model.student itself)."""
    source = student_source(cfg, tokenizer)
    return source, frozen_student(cfg) if source.client is None else None


def generate(cfg: RunConfig) -> dict:
    """Generate, verify and store the teacher's responses for data.train (once; reused after)."""
    tokenizer, _, train_records, _ = load_inputs(cfg)
    teacher_name = sources.teacher_identity(engines.resolve_model(cfg.model.teacher, "model.teacher"))
    path = sources.stored_responses_path(cfg.data, teacher_name)
    needed = sources.missing_responses(train_records)
    if not needed:
        say("every problem in data.train already has a reference response; nothing to generate")
        return {"generated": 0, "path": None}
    if sources.with_stored_responses(train_records, cfg.data, teacher_name) is not None:
        say(f"teacher responses already stored in {path}; delete it to regenerate")
        return {"generated": 0, "path": str(path)}
    dist.init(cfg.train.timeout_s)
    if cfg.teacher.backend == "server":  # the teacher's server writes them
        launched = launch_teacher(cfg, tokenizer, engines.shared_vocab_size(cfg, tokenizer, teacher=teacher_path(cfg)))
    elif cfg.rollout.engine == "vllm":  # a vLLM server started for them
        launched = LaunchedTeacher()
    else:
        launched = LaunchedTeacher(engine=engines.build_teacher(cfg))
    rows = generate_responses(cfg, tokenizer, launched, needed)
    correct = sum(row["correct"] for row in rows)
    if dist.is_main():
        sources.store_responses(train_records, rows, cfg.data, teacher_name)
    dist.barrier()
    say(f"teacher solved {correct}/{len(rows)} ({correct / len(rows):.1%}); responses stored in {path}")
    return {"generated": len(rows), "correct": correct, "path": str(path)}


def evaluate(cfg: RunConfig) -> dict:
    """Greedy held-out accuracy of model.student, per difficulty level."""
    tokenizer, _, _, eval_records = load_inputs(cfg)
    if not eval_records:
        raise UserError("config key data.eval: nothing to evaluate (it is empty)")
    dist.init(cfg.train.timeout_s)
    source, model = student_generation(cfg, tokenizer)
    with source.generator(model, 0, keep_random_stream=True) as generator:
        result = generation.evaluate(generator, tokenizer, eval_records, cfg.data, cfg.eval)
    levels = generation.accuracy_table(result["by_difficulty"])
    say(f"{cfg.model.student}: accuracy {result['accuracy']:.1%} on {result['count']} problems | "
        + " ".join(f"{k} {v:.0%}" for k, v in levels.items()))
    return result


def estimate_competence(cfg: RunConfig) -> dict:
    """Rollouts per training problem from model.student (K each, or adaptive: curriculum.rollouts_min);
    competence.jsonl in train.output_dir."""
    tokenizer, _, train_records, _ = load_inputs(cfg)
    dist.init(cfg.train.timeout_s)
    source, model = student_generation(cfg, tokenizer)
    curriculum = Curriculum(cfg, train_records)
    with source.generator(model, 0) as generator:
        result = estimate.estimate(generator, tokenizer, train_records, curriculum.table, cfg, seed=cfg.train.seed + 1)
    weights = curriculum.weights()
    path = RunDir(cfg.train.output_dir).competence
    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        curriculum.write(cfg.train.output_dir, weights)
    dist.barrier()
    summary = curriculum.summary(weights)
    say(f"{estimate.describe(result)}; mean pass rate {result['pass_rate_mean']:.1%}; "
        + " ".join(f"{k.split('_')[-1]} {v:.2f}" for k, v in summary.items() if "pass_rate_" in k)
        + f"; written to {path}")
    return {"path": str(path), **result, **summary}


def measure_snr(cfg: RunConfig) -> dict:
    """Gradient SNR per pass-rate bucket of model.student (e.g. a checkpoint's export) on data.train."""
    tokenizer, vocab, teacher, train_records = teacher_engine_and_inputs(cfg)
    examples = tokenize_problems(cfg.data, tokenizer, train_records)
    student = frozen_student(cfg)
    curriculum = Curriculum(cfg, train_records)
    if cfg.curriculum.competence:
        curriculum.load_given(cfg.curriculum.competence)
    else:
        with student_source(cfg, tokenizer).generator(student, 0) as generator:
            estimate.estimate(generator, tokenizer, train_records, curriculum.table, cfg, seed=cfg.train.seed + 1)
    result = probe.probe(student, EngineTeacher(teacher, vocab), tokenizer, examples, curriculum.table.pass_rates(),
                         bucket_edges(cfg.snr.buckets), cfg, vocab=vocab, seed=cfg.train.seed,
                         loss_params=divergence_params(cfg.loss, cfg.loss.kind))
    path = RunDir(cfg.train.output_dir).snr_measurement
    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print("| bucket | problems | mean pass rate | SNR | ||E g||^2 | tr Cov g |\n|---|---|---|---|---|---|")
        for name, v in result["buckets"].items():
            print(f"| {name} | {v['count']} | {v['pass_rate']:.3f} | {v['snr']:.4g} | {v['signal']:.4g} | "
                  f"{v['noise']:.4g} |" if v else f"| {name} | < 2 | | no value | | |")
        print(f"paced-ds: {result['problems']} problems over {result['params']} parameters in "
              f"{result['seconds']:.1f} s; written to {path}")
    dist.barrier()
    return result


def cache_teacher(cfg: RunConfig) -> dict:
    """The teacher's top-k log-probs (temperature 1) on data.train's responses, stored in teacher.cache."""
    if not cfg.teacher.cache:
        raise UserError("config key teacher.cache: name the directory the cache is written to")
    tokenizer, vocab, teacher, records = teacher_engine_and_inputs(cfg)
    examples = tokenize_problems(cfg.data, tokenizer, records)
    mine = list(range(dist.rank(), len(examples), dist.world_size()))
    batch_size = cfg.eval.batch_size
    batches = math.ceil(math.ceil(len(examples) / dist.world_size()) / batch_size)
    k = cfg.teacher.topk or vocab
    engine_teacher = EngineTeacher(teacher, vocab, k)
    parts, offsets, ids = [], [0], []
    for b in range(batches):  # every rank makes the same number of (collective) teacher forwards
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        batch = {key: value.to(dist.device()) for key, value in
                 collate_train([examples[i] for i in chunk] or [examples[0]], tokenizer.pad_token_id).items()}
        answer = engine_teacher.answer(batch)  # top-k taken a tile of response rows at a time
        if not chunk:
            continue
        parts.append((answer.ids.cpu(), answer.logprobs.cpu(), answer.tail.cpu()))
        for row, index in enumerate(chunk):
            offsets.append(offsets[-1] + int(answer.per_sample[row]))
            ids.append(records[index]["id"])
    directory = Path(cfg.teacher.cache)
    empty = (torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k), torch.zeros(0))
    stacked = [torch.cat([p[j] for p in parts]) if parts else empty[j] for j in range(3)]
    cache.write_shard(directory, dist.rank(), ids, *stacked, offsets)
    dist.barrier()
    manifest = cache.expected_manifest(teacher=sources.teacher_identity(teacher_path(cfg)), tokenizer=tokenizer,
                                       topk=cfg.teacher.topk, vocab=vocab, records=records, examples=examples)
    if dist.is_main():
        cache.write_manifest(directory, manifest, dist.world_size())
    dist.barrier()
    tokens = int(dist.all_reduce_sum(torch.tensor([float(offsets[-1])])).item())
    say(f"teacher cache: {len(examples)} problems, {tokens} response tokens, top-{k} of {vocab} in {directory}")
    return {"path": str(directory), "problems": len(examples), "tokens": tokens, "k": k}


def teacher_serve(cfg: RunConfig) -> dict:
    """The teacher job of teacher.backend=pipelined: ZeRO-3 among its own ranks, answering the
    student job at teacher.address until every student rank is done."""
    if not cfg.teacher.address:
        raise UserError("config key teacher.address: teacher-serve needs the HOST:PORT the student job "
                        "connects to (e.g. teacher.address=node0:29600)")
    # Missing responses are generated and stored here, before the students look for them.
    tokenizer, vocab, teacher, _ = teacher_engine_and_inputs(cfg, responses=cfg.loss.schedule != "on_policy")
    ranks = dist.world_size()
    say(f"teacher job ({ranks} rank{'s' if ranks > 1 else ''}, ZeRO-3 offload={cfg.teacher.offload}) waiting for the "
        f"students at {cfg.teacher.address}")
    bridge = pipeline.Bridge(cfg.teacher.address, side="teacher", rank=dist.rank(), ranks=dist.world_size(),
                             contract=teacher_contract(cfg, tokenizer, vocab), timeout_s=cfg.train.timeout_s)
    say(f"serving {bridge.students} student ranks")
    device = dist.device()

    def score(input_ids, attention_mask, loss_mask, vocab, topk):
        batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                 "loss_mask": loss_mask.to(device)}
        if topk:  # from the hidden states of the scored positions, a tile at a time
            return teacher_answer(teacher, batch, vocab=vocab, topk=topk)
        with torch.no_grad():  # dense answers travel whole, prompt positions included
            return teacher.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    result = pipeline.serve(bridge, score, vocab=vocab, topk=cfg.teacher.topk,
                            all_reduce=dist.all_reduce_sum if dist.world_size() > 1 else None,
                            faults=Faults.from_env(bridge.rank))
    say(f"teacher job done: {result['requests']} requests in {result['forwards']} forwards "
        f"({result['forward_s']:.1f} s computing)")
    return result
