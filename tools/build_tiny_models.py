"""Build the shipped tiny models: a SentencePiece tokenizer, a teacher and a student.

    python tools/build_tiny_models.py [--out paced_ds/assets] [--teacher-steps 2000]

Both models are small Llama-architecture ``LlamaForCausalLM``s trained with plain
PyTorch on the reference arithmetic task (``paced_ds.data.arith``). The teacher sees
every level until it solves >= 90% of each held-out level; the student is a smaller
model trained mostly on the easy levels and stopped once it solves the easiest, so its
pass rates span 0..1 and there is a frontier for PACED to find. The accuracies reached
are printed as a table and written to ``<out>/build_report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paced_ds.data import arith  # noqa: E402

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
    "model_max_length": 64,
}

TEACHER_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=384)
STUDENT_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, intermediate_size=192)


def train_tokenizer(out_dir: Path, seed: int):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    lines = list(arith.corpus_lines(seed))
    # Privileged-context prompts (self-distillation) and plain words must tokenize too;
    # byte fallback covers anything else a user types.
    lines += [f"The answer is {r['answer']}.\n{r['prompt']}" for r in arith.dataset("train", 300, seed)]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "sp")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=300,
            model_type="bpe", split_digits=True, byte_fallback=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False,
            add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2,
            num_threads=1,
        )
        staging = Path(tmp) / "tok"
        staging.mkdir()
        shutil.copy(prefix + ".model", staging / "tokenizer.model")
        (staging / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
        tokenizer = AutoTokenizer.from_pretrained(staging)
        tokenizer.save_pretrained(out_dir)
        shutil.copy(prefix + ".model", out_dir / "tokenizer.model")
    return tokenizer


def encode(tokenizer, records):
    """Token ids of prompt + response + eos, and the index where the response starts."""
    rows = []
    for r in records:
        prompt = tokenizer(r["prompt"]).input_ids
        response = tokenizer(r["response"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt + response, len(prompt)))
    return rows


def make_batch(rows, pad_id):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, start: len(ids)] = torch.tensor(ids[start:])
        attention[i, : len(ids)] = 1
    return input_ids, labels, attention


@torch.no_grad()
def accuracy_by_level(model, tokenizer, eval_sets, limit=200):
    """Greedy accuracy per level; prompts of one level share a length, so no padding."""
    model.eval()
    result = {}
    for name, records in eval_sets.items():
        records = records[:limit]
        prompts = torch.tensor([tokenizer(r["prompt"]).input_ids for r in records])
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=16,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, prompts.shape[1]:], skip_special_tokens=True)
        correct = sum(text.split("=")[-1].strip() == r["answer"] for text, r in zip(texts, records))
        result[name] = correct / len(records)
    model.train()
    return result


def train_model(name, shape, tokenizer, mix, steps, minutes, seed, eval_sets, done, lr=3e-3,
                batch_size=128, eval_every=500):
    """Train on ``mix`` (level -> share of each batch) for ``steps`` steps, stopping early
    when ``done(acc)`` holds at an evaluation; ``minutes`` is only a safety cap."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, **shape)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{name}] {n_params / 1e6:.2f}M parameters, mix {mix}", flush=True)

    pools = {level: encode(tokenizer, arith.problems(arith.LEVELS_BY_NAME[level], "train", 20_000, seed=seed))
             for level in mix}
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 200
    deadline = time.time() + minutes * 60
    start = time.time()
    history = []
    step = 0
    acc = {}
    while step < steps:
        # Linear warmup, then cosine decay to 5% over the step budget.
        progress = step / steps
        scale = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        rows = []
        for level, share in mix.items():
            rows += rng.choices(pools[level], k=max(1, round(batch_size * share)))
        input_ids, labels, attention = make_batch(rows, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % eval_every == 0 or step == steps or time.time() > deadline:
            acc = accuracy_by_level(model, tokenizer, eval_sets)
            elapsed = time.time() - start
            history.append({"step": step, "minutes": round(elapsed / 60, 2), "loss": loss.item(), **acc})
            print(f"[{name}] step {step} {elapsed / 60:.1f} min loss {loss.item():.4f} "
                  + " ".join(f"{k}={v:.2f}" for k, v in acc.items()), flush=True)
            if done(acc) or time.time() > deadline:
                break
    return model, acc, history, n_params


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="paced_ds/assets", help="where tiny-teacher/ and tiny-student/ go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--student-steps", type=int, default=1500)
    parser.add_argument("--max-minutes", type=float, default=25.0, help="safety cap per model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    started = time.time()

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tok_dir.mkdir()
        tokenizer = train_tokenizer(tok_dir, args.seed)
        eval_sets = {level.name: arith.problems(level, "eval", 200, seed=args.seed) for level in arith.LEVELS}
        names = [level.name for level in arith.LEVELS]

        teacher, teacher_acc, teacher_hist, teacher_params = train_model(
            "teacher", TEACHER_SHAPE, tokenizer, {"L1": 0.15, "L2": 0.2, "L3": 0.25, "L4": 0.4},
            args.teacher_steps, args.max_minutes, args.seed, eval_sets, lr=2e-3,
            done=lambda acc: min(acc.values()) >= 0.99)
        hardest = names[-1]
        student, student_acc, student_hist, student_params = train_model(
            "student", STUDENT_SHAPE, tokenizer, {"L1": 0.88, "L2": 0.08, "L3": 0.04},
            args.student_steps, args.max_minutes, args.seed + 1, eval_sets, lr=2e-3, eval_every=250,
            done=lambda acc: acc["L1"] >= 0.85 and acc[hardest] <= 0.2)

        for label, model in (("tiny-teacher", teacher), ("tiny-student", student)):
            staging = out.parent / f".{label}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            shutil.copy(tok_dir / "tokenizer.model", staging / "tokenizer.model")
            target = out / label
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.replace(target)

    report = {
        "seed": args.seed, "minutes": round((time.time() - started) / 60, 1),
        "teacher": {"params": teacher_params, "accuracy": teacher_acc, "history": teacher_hist},
        "student": {"params": student_params, "accuracy": student_acc, "history": student_hist},
    }
    (out / "build_report.json").write_text(json.dumps(report, indent=1))
    print("\n| model | params | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, params, acc in (("teacher", teacher_params, teacher_acc), ("student", student_params, student_acc)):
        print(f"| {label} | {params / 1e6:.2f}M | " + " | ".join(f"{acc[n]:.0%}" for n in names) + " |")
    print(f"built in {report['minutes']} min -> {out}")


if __name__ == "__main__":
    main()
