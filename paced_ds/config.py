"""The run configuration: one typed dataclass per concern, a YAML recipe, dotted overrides.

    cfg = load_config("ds_configs/recipes/tiny_arith.yaml", ["train.lr=1e-4", "loss.kind=akl"])

A recipe names only what differs from the defaults below. Every problem (unknown key,
wrong type, value outside its choices, impossible combination) raises ``UserError``
with one line naming the key, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from paced_ds.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a number: ``Bounds.parse("(0, 1]")``, ``Bounds.parse(">= 1")``."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    @classmethod
    def parse(cls, text: str) -> Bounds:
        if text.startswith((">=", ">")):
            return cls(float(text.lstrip(">= ")), low_open=not text.startswith(">="))
        low, high = (float(part) for part in text[1:-1].split(","))
        return cls(low, high, low_open=text[0] == "(", high_open=text[-1] == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low = f"{self.low:g}"
        if self.high == math.inf:
            return f"> {low}" if self.low_open else f">= {low}"
        return f"in {'(' if self.low_open else '['}{low}, {self.high:g}{')' if self.high_open else ']'}"


def _f(default, help: str, choices: tuple | None = None, bounds: str | None = None):
    """A config field with its one line of help, and its allowed values (``choices``) or range
    (``bounds``: ``"> 0"``, ``">= 1"``, ``"[0, 1)"``, ...; every number has one)."""
    metadata = {"help": help, "choices": choices, "bounds": Bounds.parse(bounds) if bounds else None}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "akl")


@dataclass
class ModelConfig:
    teacher: str = _f("tiny-teacher", "teacher: HF model directory or name; 'tiny-teacher' is the shipped one")
    student: str = _f("tiny-student", "student: HF model directory or name; 'tiny-student' is the shipped one")
    tokenizer: str = _f("", "tokenizer to use (default: the student's)")
    trust_remote_code: bool = _f(False, "allow model repos to run their own code (off: safe by default)")
    dtype: str = _f("auto", "parameter/compute dtype; auto = bf16 on GPUs that have it, else fp32 (bf16 on a CPU "
                    "without bf16 instructions, e.g. AVX2 only, is emulated and warns)",
                    ("auto", "fp32", "bf16"))
    gradient_checkpointing: bool = _f(False, "recompute student activations in backward (saves memory)")
    tiled_mlp: bool = _f(False, "run the student's MLPs a slice of positions at a time (DeepSpeed's TiledMLP), "
                                "recomputed in backward: for long sequences")
    freeze_embeddings: bool = _f(False, "keep the student's input and output embeddings fixed: no gradients or "
                                        "optimizer states for them (16 bytes a parameter saved; a 152k vocabulary "
                                        "is 43% of a 0.5B model)")


@dataclass
class DataConfig:
    train: str = _f("arith:train", "training problems: .jsonl/.json/.parquet file, datasets dir or name, "
                                   "'arith:train' (the generated reference task) or 'words:train' "
                                   "(generated GSM8K-style word problems)")
    eval: str = _f("arith:eval", "held-out problems (same forms as data.train); empty = no evaluation. "
                                 "'arith:val' is the reference task's validation split, for choosing settings")
    retain: str = _f("", "retention problems (same forms as data.train): those the student solves before training "
                         "are its retention set, and every evaluation reports the share of it forgotten; "
                         "'arith:retain' for the reference task; empty = none")
    split: str = _f("train", "split to read when data.train is a datasets name")
    eval_split: str = _f("test", "split to read when data.eval is a datasets name")
    subset: str = _f("", "the configuration of a datasets name (e.g. 'main' for openai/gsm8k; empty = none)")
    layout: str = _f("", "a public dataset's field layout: gsm8k (question/answer) or math (problem/solution/level); "
                         "data.fields entries override it", ("", "gsm8k", "math"))
    fields: dict = _f({}, "field mapping: canonical name (id, prompt, answer, response, difficulty) -> source field")
    prompt_template: str = _f("{prompt}", "how a prompt is written when the tokenizer has no chat template")
    use_chat_template: bool = _f(True, "format prompts with the tokenizer's chat template when it has one")
    system_prompt: str = _f("", "system message for chat templates (empty = none)")
    max_length: int = _f(256, "longest prompt + response in tokens; longer responses are truncated", bounds=">= 2")
    arith_train_per_level: int = _f(600, "problems per difficulty level of a generated data.train "
                                         "('arith:train', 'words:train')", bounds=">= 1")
    arith_eval_per_level: int = _f(200, "problems per difficulty level of a generated data.eval "
                                        "('arith:eval', 'arith:val', 'words:eval', ...)", bounds=">= 1")
    arith_retain_per_level: int = _f(200, "problems per difficulty level of a generated data.retain "
                                          "('arith:retain', 'words:retain')", bounds=">= 1")
    arith_seed: int = _f(0, "seed of the generated tasks (arith:, words:)", bounds=">= 0")
    responses_dir: str = _f("~/.cache/paced_ds/responses",
                            "where teacher responses are stored for sources that are not local files")
    keep_incorrect: bool = _f(False, "keep problems whose teacher response fails verification")
    generate_max_new_tokens: int = _f(64, "longest teacher response `paced-ds generate` writes", bounds=">= 1")


@dataclass
class LossConfig:
    kind: str = _f("forward_kl", "token-level divergence between teacher and student", DIVERGENCE_KINDS)
    temperature: float = _f(1.0, "softmax temperature applied to both teacher and student logits", bounds="> 0")
    jsd_beta: float = _f(0.5, "mixture weight beta of the generalized JSD, as TRL's generalized_jsd_loss "
                              "(loss.kind=jsd; 0 = forward KL, 1 = reverse KL)", bounds="[0, 1]")
    skew_alpha: float = _f(0.1, "own share of the skewed mixture (loss.kind=skew_kl: the teacher's; "
                                "skew_reverse_kl: the student's)", bounds="[0, 1)")
    akl_mu: float = _f(0.5, "teacher probability mass that defines the head (loss.kind=akl)", bounds="(0, 1]")
    schedule: str = _f("off_policy", "off_policy = loss.kind on teacher responses; on_policy = loss.kind on fresh "
                                     "student rollouts; two_stage = off_policy, then loss.stage2_kind on_policy "
                                     "from loss.switch_at", ("off_policy", "on_policy", "two_stage"))
    stage2_kind: str = _f("reverse_kl", "divergence of the second (on-policy) stage of loss.schedule=two_stage",
                          DIVERGENCE_KINDS)
    switch_at: float = _f(0.5, "two_stage: the switch, as a share of train.steps (< 1) or a step number (>= 1)",
                          bounds="> 0")
    chunk_tokens: int = _f(0, "tokens per chunk (tile) of the divergence, bounding fp32 [tokens, vocab] memory "
                              "(0 = chosen from the vocabulary size and device)", bounds=">= 0")
    fused: bool = _f(True, "the student's output layer runs inside the divergence, on the response positions "
                           "only, a tile of loss.chunk_tokens at a time: its [tokens, vocab] logits never exist "
                           "whole (false = whole logits, then the chunked divergence)")


@dataclass
class CurriculumConfig:
    kernel: str = _f("beta", "beta = w(p) = p^alpha (1-p)^beta with the alpha, beta given; calibrated = alpha, "
                             "beta fitted to the measured gradient SNR at each probe (needs snr.every)",
                     ("beta", "calibrated"))
    mode: str = _f("paced", "per-problem weight from the pass rate p: paced = Beta kernel p^alpha (1-p)^beta, "
                            "uniform = 1, hard_filter = 1 inside (band_lo, band_hi)",
                   ("paced", "uniform", "hard_filter"))
    apply: str = _f("weight", "weight = uniform draw, loss x w (the paper's form); sample = draw problems "
                              "in proportion to w, loss unweighted (w = 0 costs nothing)", ("weight", "sample"))
    alpha: float = _f(1.0, "Beta kernel exponent of p", bounds=">= 0")
    beta: float = _f(1.0, "Beta kernel exponent of 1 - p", bounds=">= 0")
    posterior: bool = _f(False, "use E[w(p)] under p's posterior, Beta(correct + a0, wrong + b0), instead of "
                                "w(correct/trials)")
    prior: str = _f("uniform", "posterior weights' prior Beta(a0, b0): uniform = Beta(1, 1); fitted = fitted to the "
                               "counts of each difficulty level (empirical Bayes; what the adaptive estimate wants)",
                    ("uniform", "fitted"))
    weight_floor: float = _f(0.0, "paced weights below this share of the kernel's peak are 0 (not drawn in weight "
                                  "mode); 0 = off", bounds="[0, 1)")
    band_lo: float = _f(0.0, "hard_filter: lower pass-rate bound (exclusive)", bounds="[0, 1)")
    band_hi: float = _f(1.0, "hard_filter: upper pass-rate bound (exclusive)", bounds="(0, 1]")
    normalize: str = _f("dataset_mean", "weight normalisation: none, batch_mean (each step's weights average 1) "
                                        "or dataset_mean (the weights of the problems drawn, those > 0, average 1)",
                        ("none", "batch_mean", "dataset_mean"))
    rollouts: int = _f(8, "K: student rollouts per problem to estimate its pass rate (with rollouts_min > 0: the "
                          "most a problem gets)", bounds=">= 1")
    rollouts_min: int = _f(0, "adaptive estimate: rollouts every problem gets first; more follow in rounds only for "
                              "the problems whose weight could still move, up to curriculum.rollouts (0 = off: "
                              "curriculum.rollouts each; docs/curriculum.md measures 2)", bounds=">= 0")
    rollouts_round: int = _f(2, "adaptive estimate: rollouts added per round to each problem still sampling",
                             bounds=">= 1")
    rollouts_tol: float = _f(0.4, "adaptive estimate: a problem stops once its remaining rollouts would change its "
                                   "weight by at most this share of the kernel's peak (root mean square, under its "
                                   "posterior pass rate)", bounds="(0, 1)")
    refresh: str = _f("static", "when pass rates are re-estimated: static (once, before training), every "
                                "(K fresh rollouts every curriculum.refresh_every steps) or on_policy (from the "
                                "on-policy stage's own rollouts, free)", ("static", "every", "on_policy"))
    refresh_every: int = _f(0, "steps between re-estimates (refresh=every) or merges of on-policy outcomes "
                               "(refresh=on_policy)", bounds=">= 0")
    decay: float = _f(0.5, "refresh=on_policy: weight kept by the older counts at each merge", bounds="[0, 1]")
    reestimate_at_switch: bool = _f(False, "two_stage: re-estimate competence when the on-policy stage starts")
    competence: str = _f("", "competence.jsonl to use instead of estimating (e.g. from `paced-ds estimate` "
                             "or another engine); its pass rates are kept static")


@dataclass
class SnrConfig:
    every: int = _f(0, "gradient-SNR probe every N optimizer steps (0 = off)", bounds=">= 0")
    buckets: str = _f("0,0.25,0.5,0.75,1", "pass-rate bucket edges: buckets {0}, (e0, e1], ..., (e_k-1, 1), {1}")
    per_bucket: int = _f(16, "problems probed per bucket (each costs one forward and backward)", bounds=">= 2")
    params: str = _f("", "regular expression on parameter names the probe covers (empty = all)")


@dataclass
class RolloutConfig:
    temperature: float = _f(1.0, "sampling temperature of student rollouts (competence estimates, on-policy steps); "
                                 "0 = greedy", bounds=">= 0")
    top_p: float = _f(1.0, "nucleus sampling of student rollouts", bounds="(0, 1]")
    top_k: int = _f(0, "top-k truncation of student rollouts (0 = off: the whole distribution, as vLLM, TRL and "
                       "verl sample by default)", bounds=">= 0")
    max_new_tokens: int = _f(64, "longest rollout", bounds=">= 1")
    batch_size: int = _f(256, "rollout prompts per generation batch per rank", bounds=">= 1")
    gather: bool = _f(True, "generate (rollouts, estimates, evaluation, teacher responses) from a full copy of "
                            "the model gathered once per generation phase, when it fits in 80% of every rank's "
                            "free memory (fast); false, or a copy that does not fit = generate from the ZeRO-3 "
                            "shards, all ranks stepping together")
    engine: str = _f("hf", "what generates the student's rollouts (competence estimates, on-policy steps), "
                           "evaluations and teacher responses: hf = Hugging Face generate on the gathered student; "
                           "vllm = an OpenAI-compatible server (rollout.url, or a vLLM server paced-ds starts on "
                           "this node), given the student's weights before each generation that follows an update",
                     ("hf", "vllm"))
    overlap: bool = _f(False, "rollout.engine=vllm: generate the next on-policy step's rollouts while this step "
                              "trains, from the weights before its update (one step off-policy, as verl's and "
                              "slime's async rollouts; rollout_staleness in metrics.jsonl). Worth it with the "
                              "server on devices of its own")
    url: str = _f("", "rollout.engine=vllm: base URL of a running server of the student (e.g. "
                      "http://node7:8000), started with VLLM_SERVER_DEV_MODE=1 so that it can load fresh weights; "
                      "empty = paced-ds starts vLLM on this node")
    weights_dir: str = _f("", "rollout.engine=vllm: where the student is exported for the server to load before "
                              "it generates again (a directory the server can read; empty = a directory in "
                              "/dev/shm for the server paced-ds starts on this node, else "
                              "<output_dir>/rollout_weights, which a server on another node must read too)")
    vllm_python: str = _f("", "Python that runs the vLLM servers paced-ds starts (empty: the venv of `paced-ds "
                              "setup-vllm`, else this Python)")
    server_args: str = _f("", "extra arguments of the vLLM servers paced-ds starts, e.g. "
                              "'--tensor-parallel-size 4 --gpu-memory-utilization 0.85'")
    server_devices: str = _f("", "CUDA_VISIBLE_DEVICES of the vLLM servers paced-ds starts (GPUs the training "
                                 "ranks leave free; empty = as inherited)")
    server_start_timeout_s: int = _f(900, "how long a vLLM server paced-ds starts may take to answer", bounds=">= 1")


@dataclass
class TeacherConfig:
    backend: str = _f("engine", "where teacher answers come from: engine = a ZeRO-3 inference engine on the "
                                "student's ranks; pipelined = a teacher job on its own ranks that computes the "
                                "next steps' answers ahead; cache = top-k log-probs (temperature 1) stored by "
                                "`paced-ds cache-teacher`; server = top-k log-probs (temperature 1) from an "
                                "OpenAI-compatible vLLM server's prompt log-probs (teacher.url)",
                      ("engine", "pipelined", "cache", "server"))
    url: str = _f("", "teacher.backend=server: base URL of a vLLM server of model.teacher (empty: paced-ds starts "
                      "one on this node)")
    ranks: int = _f(1, "teacher.backend=pipelined: ranks of the teacher job `paced-ds train` starts beside the "
                       "students (ZeRO-3 among them)", bounds=">= 1")
    address: str = _f("", "teacher.backend=pipelined: HOST:PORT of a teacher job started with `paced-ds "
                          "teacher-serve` (empty: `paced-ds train` starts one on this node)")
    cache: str = _f("", "teacher cache directory (teacher.backend=cache, and where `paced-ds cache-teacher` writes)")
    topk: int = _f(0, "teacher log-probs kept per token: by the cache, the co-located engine teacher (a tile of "
                      "positions at a time) and a pipelined one, or asked of a served one; read sparse by the loss "
                      "(0 = the full distribution; server: 1..its --max-logprobs)", bounds=">= 0")
    offload: str = _f("none", "where the teacher's partitioned parameters live", ("none", "cpu", "nvme"))
    nvme_path: str = _f("", "directory for teacher.offload=nvme")
    ds_config: str = _f("auto", "DeepSpeed JSON for the teacher; auto = ds_configs/teacher_zero3[_offload_*].json")
    self_distill: bool = _f(False, "the teacher is a frozen copy of the initial student that sees the reference "
                                   "answer in its prompt (needs an on-policy loss.schedule)")
    privileged_template: str = _f("The answer is {answer}.\n{prompt}",
                                  "self-distillation: the teacher's prompt, with {answer} and {prompt}")
    forward_micro_batches: int = _f(0, "micro-batches per teacher forward (0 = the whole optimizer step: "
                                       "one all-gather of the teacher per step, more logits memory)", bounds=">= 0")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/tiny_arith", "run directory: tensorboard/, metrics.jsonl, checkpoints/, student/")
    steps: int = _f(100, "optimizer steps", bounds=">= 1")
    micro_batch_size: int = _f(8, "problems per rank per micro-batch", bounds=">= 1")
    grad_accum: int = _f(1, "micro-batches per optimizer step", bounds=">= 1")
    lr: float = _f(1e-4, "peak learning rate", bounds="> 0")
    warmup_steps: int = _f(10, "linear warmup steps", bounds=">= 0")
    decay: str = _f("cosine", "learning-rate decay after warmup", ("cosine", "linear", "constant"))
    min_lr_ratio: float = _f(0.1, "final learning rate as a share of train.lr", bounds="[0, 1]")
    weight_decay: float = _f(0.0, "AdamW weight decay", bounds=">= 0")
    clip_grad: float = _f(1.0, "gradient norm clipping (0 = off)", bounds=">= 0")
    seed: int = _f(0, "seed of the sampler, rollouts and initialisation", bounds=">= 0")
    ds_config: str = _f("ds_configs/student_zero3.json", "DeepSpeed JSON for the student")
    zero_stage: int = _f(3, "student ZeRO stage (the teacher is always stage 3)", (1, 2, 3))
    sequence_parallel: int = _f(1, "Ulysses sequence parallelism: each sequence split over this many ranks, for "
                                   "the student and the engine teacher (its ranks share their problems; the ranks "
                                   "are a multiple of it)", bounds=">= 1")
    offload_optimizer: str = _f("none", "where the student's optimizer states live", ("none", "cpu"))
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end)", bounds=">= 0")
    resume: str = _f("never", "never | auto (newest checkpoint in output_dir) | PATH of a checkpoint directory")
    export: bool = _f(True, "write the student in Hugging Face format to <output_dir>/student at the end")
    export_dtype: str = _f("auto", "dtype of the exported student's weights: auto = the dtype it trained in (the "
                                   "end-of-run export) or its fp32 master weights (`paced-ds export`); bf16 = half "
                                   "the size of fp32 (a 7B student: 14 GB, not 28)", ("auto", "fp32", "bf16"))
    timeout_s: int = _f(900, "timeout of every collective; a dead or stuck rank stops the others after it",
                        bounds=">= 1")
    max_nonfinite_steps: int = _f(8, "stop (keeping the last checkpoint) after this many optimizer steps in a "
                                     "row were skipped for a non-finite loss or gradient", bounds=">= 1")


@dataclass
class EvalConfig:
    every: int = _f(50, "held-out evaluation every N steps (0 = only before and after training)", bounds=">= 0")
    max_new_tokens: int = _f(32, "longest greedy answer", bounds=">= 1")
    batch_size: int = _f(64, "prompts per generation batch per rank", bounds=">= 1")
    limit_per_level: int = _f(0, "at most this many held-out problems per difficulty level (0 = all)", bounds=">= 0")
    record_problems: bool = _f(False, "list the ids of the solved problems in eval.jsonl (to measure forgetting)")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "write TensorBoard events to <output_dir>/tensorboard")
    progress: bool = _f(True, "progress bar on rank 0")
    log_every: int = _f(1, "TensorBoard/metrics.jsonl every N steps", bounds=">= 1")
    rollouts: bool = _f(False, "write every on-policy step's rollouts (problem id, response token ids) to "
                               "<output_dir>/rollouts.jsonl")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    snr: SnrConfig = field(default_factory=SnrConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _section_class(name: str):
    return {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}[name]


def _coerce(key: str, value: Any, kind, choices) -> Any:
    """``value`` as the field's type, or a UserError naming ``key``."""
    if isinstance(kind, str):  # annotations are strings under `from __future__ import annotations`
        kind = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict}[kind]
    if kind is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            out = value.lower() in ("true", "yes", "1")
        else:
            raise UserError(f"config key {key}: expected true or false, got {value!r}")
    elif kind in (int, float):
        expected = "an integer" if kind is int else "a number"
        accepted = (int, str) if kind is int else (int, float, str)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise UserError(f"config key {key}: expected {expected}, got {value!r}")
        try:
            out = kind(value)
        except ValueError:
            raise UserError(f"config key {key}: expected {expected}, got {value!r}") from None
    elif kind is str:
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"config key {key}: expected a string, got {value!r}")
        out = str(value)
    elif kind is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a mapping, got {value!r}")
        out = {str(k): str(v) for k, v in value.items()}
    else:  # pragma: no cover - every field above has one of these types
        raise TypeError(f"unsupported config type {kind} for {key}")
    if choices is not None and out not in choices:
        raise UserError(f"config key {key}: {out!r} is not one of {', '.join(map(str, choices))}")
    return out


def _set(cfg: RunConfig, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    section_name = parts[0]
    if section_name not in SECTIONS:
        raise UserError(f"unknown config key {dotted!r} (sections: {', '.join(SECTIONS)})")
    section = getattr(cfg, section_name)
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise UserError(f"config key {dotted}: expected a mapping of its keys, got {value!r}")
        for key, sub in value.items():
            _set(cfg, f"{section_name}.{key}", sub)
        return
    fields_by_name = {f.name: f for f in dataclasses.fields(section)}
    name = parts[1]
    if name not in fields_by_name:
        raise UserError(f"unknown config key {section_name}.{name!s} "
                        f"(known in {section_name}: {', '.join(fields_by_name)})")
    spec = fields_by_name[name]
    if len(parts) > 2:  # data.fields.prompt=question
        if spec.type not in (dict, "dict"):
            raise UserError(f"unknown config key {dotted!r}: {section_name}.{name} has no sub-keys")
        getattr(section, name)[".".join(parts[2:])] = _coerce(dotted, value, str, None)
        return
    setattr(section, name, _coerce(dotted, value, spec.type, spec.metadata.get("choices")))


def _is_text_key(dotted: str) -> bool:
    """Whether ``dotted`` names a string field, or a sub-key of a mapping field (values are text)."""
    parts = dotted.split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS:
        return False
    spec = {f.name: f for f in dataclasses.fields(_section_class(parts[0]))}.get(parts[1])
    if spec is None:
        return False
    return spec.type in (str, "str") if len(parts) == 2 else spec.type in (dict, "dict")


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", "1e-4")``; typing happens when it is applied."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not key=value (e.g. train.lr=1e-4)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override {text!r} has no key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    # Keep strings that YAML would turn into dates or nulls as the text the user typed.
    if parsed is None or not isinstance(parsed, (str, int, float, bool, dict)):
        parsed = value
    return key, parsed


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Defaults, then the YAML recipe, then ``key=value`` overrides; validated."""
    cfg = RunConfig()
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise UserError(f"recipe {recipe} is a directory; name its YAML file" if path.is_dir()
                            else f"recipe not found: {recipe}")
        try:
            loaded = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
        except OSError as err:
            raise UserError(f"{path}: cannot be read ({err.strerror})") from None
        except UnicodeDecodeError as err:
            line = err.object[:err.start].count(b"\n") + 1
            raise UserError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise UserError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: a recipe is a mapping of sections (model:, data:, train:, ...)")
        for key, value in loaded.items():
            try:
                _set(cfg, str(key), value)
            except UserError as err:
                raise UserError(f"{path}: {err}") from None
    for text in overrides:
        key, value = parse_override(text)
        if not isinstance(value, str) and _is_text_key(key):
            # A string field keeps the text as typed: "Q: {prompt}" is no YAML mapping, "010" no 8.
            value = text.split("=", 1)[1]
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def check_ranges(cfg: RunConfig) -> None:
    """Every number inside its field's ``bounds``; else one line naming the key, value and range."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for spec in dataclasses.fields(values):
            bounds, value = spec.metadata.get("bounds"), getattr(values, spec.name)
            if bounds is not None and not (math.isfinite(value) and value in bounds):
                raise UserError(f"config key {section.name}.{spec.name}: must be {bounds}, got {value}")


def validate(cfg: RunConfig) -> None:
    """Out-of-range values and impossible combinations, each naming its key."""
    check_ranges(cfg)
    c, r = cfg.curriculum, cfg.rollout
    if not c.band_lo < c.band_hi:
        raise UserError(f"config key curriculum.band_lo: the band needs band_lo < band_hi, "
                        f"got ({c.band_lo}, {c.band_hi})")
    if c.rollouts_min != 0 and not 2 <= c.rollouts_min <= c.rollouts:
        raise UserError(f"config key curriculum.rollouts_min: must be 0 (off) or in [2, curriculum.rollouts = "
                        f"{c.rollouts}] (the first round's counts fit the spread of the pass rates, which one "
                        f"rollout per problem cannot show), got {c.rollouts_min}")
    for key, url in (("rollout.url", r.url), ("teacher.url", cfg.teacher.url)):
        if url and not url.startswith(("http://", "https://")):
            raise UserError(f"config key {key}: an http:// or https:// URL, got {url!r}")
    if cfg.snr.params:
        try:
            re.compile(cfg.snr.params)
        except re.error as err:
            raise UserError(f"config key snr.params: {cfg.snr.params!r} is not a regular expression ({err})") from None
    if r.overlap and r.engine != "vllm":
        raise UserError("config key rollout.overlap: overlapping rollouts come from a server; set rollout.engine=vllm")
    if r.url and r.engine != "vllm":
        raise UserError("config key rollout.url: a server generates only with rollout.engine=vllm")
    if cfg.teacher.backend == "server":
        if cfg.teacher.topk <= 0:
            raise UserError("config key teacher.topk: teacher.backend=server answers top-k log-probs; set "
                            "teacher.topk (e.g. 20, at most the server's --max-logprobs)")
        if cfg.teacher.offload != "none":
            raise UserError("config key teacher.offload: a served teacher lives in its server; leave it none")
    if c.refresh in ("every", "on_policy") and c.refresh_every <= 0:
        raise UserError(f"config key curriculum.refresh_every: must be > 0 with curriculum.refresh={c.refresh}")
    if c.refresh == "on_policy" and cfg.loss.schedule == "off_policy":
        raise UserError("config key curriculum.refresh: on_policy needs on-policy rollouts "
                        "(loss.schedule=on_policy or two_stage)")
    if cfg.snr.every and cfg.loss.schedule == "on_policy":
        raise UserError("config key snr.every: the probe uses the teacher's responses; it needs "
                        "loss.schedule=off_policy or two_stage")
    if c.kernel == "calibrated" and not (cfg.snr.every and c.mode == "paced"):
        raise UserError("config key curriculum.kernel: calibrated needs snr.every > 0 and curriculum.mode=paced")
    if cfg.teacher.self_distill and cfg.loss.schedule == "off_policy":
        raise UserError("config key teacher.self_distill: the privileged teacher scores the student's own "
                        "rollouts; set loss.schedule=on_policy (or two_stage)")
    if cfg.teacher.self_distill and not all(k in cfg.teacher.privileged_template for k in ("{answer}", "{prompt}")):
        raise UserError("config key teacher.privileged_template: must contain {answer} and {prompt}")
    if c.competence and c.refresh != "static":
        raise UserError("config key curriculum.competence: a given competence file is static; "
                        "drop it or set curriculum.refresh=static")
    if cfg.teacher.backend == "cache":
        if not cfg.teacher.cache:
            raise UserError("config key teacher.cache: required with teacher.backend=cache")
        if cfg.loss.schedule != "off_policy" or cfg.teacher.self_distill or cfg.snr.every:
            raise UserError("config key teacher.backend: a cache holds the teacher's view of its own responses "
                            "only; on-policy schedules, self-distillation and the SNR probe need a live teacher "
                            "(teacher.backend=engine or pipelined)")
    if cfg.teacher.backend == "pipelined" and cfg.teacher.address:
        from paced_ds.runtime.dist import parse_address

        parse_address(cfg.teacher.address)
    if cfg.teacher.offload == "nvme" and not cfg.teacher.nvme_path:
        raise UserError("config key teacher.nvme_path: required when teacher.offload=nvme")
    check_sequence_parallel(cfg)
    if cfg.train.offload_optimizer == "cpu" and cfg.train.zero_stage == 1:
        raise UserError("config key train.offload_optimizer: cpu offload needs train.zero_stage 2 or 3")
    if "{prompt}" not in cfg.data.prompt_template:
        raise UserError("config key data.prompt_template: must contain {prompt}")
    if not cfg.train.output_dir:
        raise UserError("config key train.output_dir: must not be empty")
    if not cfg.data.train:
        raise UserError("config key data.train: must name the training problems")


def resolve_path(path: str) -> Path:
    """A config-named file (e.g. a DeepSpeed JSON): as given, else relative to the checkout."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    in_repo = REPO_ROOT / path
    return in_repo if in_repo.exists() else candidate


def load_ds_config(path: str, key: str) -> dict:
    """A DeepSpeed JSON named by config key ``key``; a one-line error when it is missing or bad:
    not JSON, not an object, or a section paced-ds writes into (``optimizer``,
    ``zero_optimization`` and their ``params`` / ``offload_param``) that is not an object.
    DeepSpeed checks the rest."""
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise UserError(f"config key {key}: {path} is a directory, not a DeepSpeed JSON" if resolved.is_dir()
                        else f"config key {key}: DeepSpeed config not found: {path}")
    try:
        ds_config = json.loads(resolved.read_bytes())
    except OSError as err:
        raise UserError(f"{resolved}: cannot be read ({err.strerror}) (config key {key})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{resolved}:{err.lineno}: not valid JSON ({err.msg}) (config key {key})") from None
    except ValueError as err:  # bytes that are not UTF-8
        raise UserError(f"{resolved}: not valid JSON ({str(err).splitlines()[0]}) (config key {key})") from None
    if not isinstance(ds_config, dict):
        raise UserError(f"{resolved}: a DeepSpeed config is a JSON object, got a {type(ds_config).__name__} "
                        f"(config key {key})")
    for name in ("optimizer", "optimizer.params", "zero_optimization", "zero_optimization.offload_param"):
        outer, _, inner = name.rpartition(".")
        holder = ds_config.get(outer, {}) if outer else ds_config  # an outer section is an object by now
        if inner in holder and not isinstance(holder[inner], dict):
            raise UserError(f"{resolved}: key {name!r} must be a JSON object, got {json.dumps(holder[inner])} "
                            f"(config key {key})")
    buffer_size = ds_config.get("zero_optimization", {}).get("offload_param", {}).get("buffer_size", 0)
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, (int, float)):
        raise UserError(f"{resolved}: key 'zero_optimization.offload_param.buffer_size' must be a number, got "
                        f"{json.dumps(buffer_size)} (config key {key})")
    return ds_config


def describe() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every config key: the README's config reference."""
    rows = []
    for section in dataclasses.fields(RunConfig):
        for spec in dataclasses.fields(section.default_factory):
            default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
            kind = spec.type if isinstance(spec.type, str) else spec.type.__name__
            choices = spec.metadata.get("choices")
            bounds = spec.metadata.get("bounds")
            help_text = spec.metadata["help"] + (f" ({' | '.join(map(str, choices))})" if choices else "")
            help_text += f" (allowed: {bounds})" if bounds else ""
            rows.append((f"{section.name}.{spec.name}", kind, json.dumps(default), help_text))
    return rows


def check_sequence_parallel(cfg: RunConfig) -> None:
    """train.sequence_parallel > 1 splits the student's and the engine teacher's sequences; what
    it does not split yet is refused here, before any rank starts."""
    size = cfg.train.sequence_parallel
    if size == 1:
        return
    for key, value, needed in (("teacher.backend", cfg.teacher.backend, "engine"),
                               ("loss.schedule", cfg.loss.schedule, "off_policy"),
                               ("teacher.self_distill", cfg.teacher.self_distill, False)):
        if value != needed:
            raise UserError(f"config key {key}: train.sequence_parallel={size} needs {key}={needed} for now "
                            f"(got {value}); sequence parallelism splits off-policy steps of the co-located teacher")
