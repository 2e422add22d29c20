"""A run's inputs, checked and made ready: tokenizer, vocabulary, problems, the teacher's
responses (stored, or generated now) and the tokenized training sequences. Shared by
``paced-ds train`` and the other launcher tasks."""

from __future__ import annotations

from pathlib import Path

from paced_ds.config import DataConfig, RunConfig
from paced_ds.curriculum.calibrate import bucket_edges
from paced_ds.data import prompts, sources
from paced_ds.data.collate import encode
from paced_ds.distill.teachers import LaunchedTeacher, teacher_path
from paced_ds.errors import UserError
from paced_ds.models import engines, generation, generators
from paced_ds.runtime import checkpoint, dist
from paced_ds.runtime.faults import Faults
from paced_ds.runtime.files import check_output_dir
from paced_ds.runtime.log import progress_bar, say
from paced_ds.runtime.rundir import RunDir


def load_inputs(cfg: RunConfig):
    """Everything that can be checked before a process group exists: tokenizer, the two
    models' vocabularies, and the problems. Bad input fails here, on every rank alike."""
    for key, path in (("train.output_dir", cfg.train.output_dir),
                      ("rollout.weights_dir", cfg.rollout.weights_dir if cfg.rollout.engine == "vllm" else ""),
                      ("teacher.nvme_path", cfg.teacher.nvme_path if cfg.teacher.offload == "nvme" else "")):
        if path:
            check_output_dir(path, key)
    check_output_dir(cfg.data.responses_dir, "data.responses_dir", writable=False)  # read-only when all are stored
    if cfg.train.resume == "never" and RunDir(cfg.train.output_dir).holds_run():
        raise UserError(f"config key train.output_dir: {cfg.train.output_dir} already holds a run with "
                        "checkpoints; continue it with train.resume=auto or choose another train.output_dir")
    resume_from = checkpoint.find_resume(cfg.train.output_dir, cfg.train.resume)
    if resume_from is not None:
        checkpoint.check_resumable(*resume_from, cfg)
    Faults.from_env(rank=0)  # a malformed PACED_DS_FAULT fails here too
    if cfg.curriculum.competence and not Path(cfg.curriculum.competence).is_file():
        raise UserError(f"config key curriculum.competence: no file {cfg.curriculum.competence}")
    engines.student_ds_config(cfg)  # the DeepSpeed JSONs exist and parse
    engines.teacher_ds_config(cfg)
    tokenizer = engines.load_tokenizer(cfg)
    vocab = engines.shared_vocab_size(cfg, tokenizer, teacher=teacher_path(cfg))
    check_settings_against(cfg, vocab)
    train_records = sources.load_train(cfg.data)
    eval_records = sources.limit_per_level(sources.load_eval(cfg.data), cfg.eval.limit_per_level)
    return tokenizer, vocab, train_records, eval_records


def check_settings_against(cfg: RunConfig, vocab: int) -> None:
    """The settings only the models or a parser can check: top-k against the vocabulary, the
    prompt templates, the SNR buckets (else they would fail inside a rank, steps into the run)."""
    for key, value in (("teacher.topk", cfg.teacher.topk), ("rollout.top_k", cfg.rollout.top_k)):
        if value > vocab:
            raise UserError(f"config key {key}: must be <= the vocabulary ({vocab} tokens), got {value}")
    prompts.format_prompt(None, "", template=cfg.data.prompt_template, use_chat_template=False)
    if cfg.teacher.self_distill:
        prompts.privileged_prompt("", "", cfg.teacher.privileged_template)
    if cfg.snr.every:
        bucket_edges(cfg.snr.buckets)


def with_teacher_responses(cfg: RunConfig, tokenizer, launched: LaunchedTeacher,
                           train_records: list[dict]) -> list[dict]:
    """Train problems with a response each: their own, stored ones, or generated now by the
    teacher (``launched``: its engine or its server; or a vLLM server started for the purpose)."""
    teacher_name = sources.teacher_identity(teacher_path(cfg))
    attached = sources.with_stored_responses(train_records, cfg.data, teacher_name)
    can_generate = launched.engine is not None or launched.server is not None or cfg.rollout.engine == "vllm"
    if attached is None and not can_generate:
        raise UserError(f"teacher.backend={cfg.teacher.backend}: the teacher's responses are not stored for these "
                        f"problems in data.responses_dir ({cfg.data.responses_dir}); run `paced-ds generate` first")
    if attached is None:
        needed = sources.missing_responses(train_records)
        say(f"generating teacher responses for {len(needed)} problems (stored for later runs)")
        rows = generate_responses(cfg, tokenizer, launched, needed)
        if dist.is_main():
            path = sources.store_responses(train_records, rows, cfg.data, teacher_name)
            correct = sum(row["correct"] for row in rows)
            say(f"teacher solved {correct}/{len(rows)}; responses stored in {path}")
        dist.barrier()
        attached = sources.with_stored_responses(train_records, cfg.data, teacher_name)
    records, dropped = attached
    if dropped:
        say(f"dropped {dropped} problems whose teacher response failed verification (data.keep_incorrect)")
    records = [r for r in records if r.get("response")]
    if not records:
        raise UserError(f"data.train: no problem has a usable teacher response ({cfg.data.train})")
    return records


def generate_responses(cfg: RunConfig, tokenizer, launched: LaunchedTeacher, records: list[dict]) -> list[dict]:
    progress = progress_bar(len(records), "teacher responses", cfg.logging.progress) if dist.is_main() else None
    with generators.teacher_generator(cfg, tokenizer, model=teacher_path(cfg), engine=launched.engine,
                                      client=launched.server) as generator:
        rows = generation.teacher_responses(generator, tokenizer, records, cfg.data, batch_size=cfg.eval.batch_size,
                                            progress=progress)
    if progress is not None:
        progress.close()
    return rows


def tokenize_problems(data_cfg: DataConfig, tokenizer, records: list[dict]) -> list[dict]:
    texts = generation.prompt_texts(tokenizer, records, data_cfg)
    examples = [encode(tokenizer, text, record["response"], data_cfg.max_length, problem_id=record["id"])
                for text, record in zip(texts, records)]
    # encode cuts a sequence at max_length, end-of-turn token included: say so, or a run on long
    # chains of thought would train on their beginnings alone without a word.
    cut = sum(len(e["input_ids"]) == data_cfg.max_length and e["input_ids"][-1] != tokenizer.eos_token_id
              for e in examples)
    if cut:
        say(f"data.max_length ({data_cfg.max_length} tokens) cuts the responses of {cut} of {len(examples)} "
            "problems: their ends and end-of-turn tokens are never trained on; raise data.max_length to keep them")
    return examples
