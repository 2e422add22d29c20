"""The teacher, whatever its placement, behind one small protocol.

    teacher.answers(requests)   -> one answer per request, in order (an iterator)
    teacher.looks_ahead         -> whether ask_ahead is worth calling
    teacher.ask_ahead(requests) -> start on the next step's requests now (optional)
    teacher.close()             -> a line to report, or None

A request (``TeacherBatch``) is a collated batch of the student's sequences with the
examples and the problem indices it came from; an answer is a ``DenseAnswer`` (logits)
or a ``TopKAnswer`` (sparse), always at temperature 1 (``answers.py``). The loop asks and
never branches on which teacher it holds:

- ``EngineTeacher``: a co-located ZeRO-3 inference engine (partitions on the GPUs, in CPU
  memory or on NVMe: ``teacher.offload``); every answer is one collective forward.
- ``PipelinedTeacher``: a teacher job on its own ranks (``pipeline.py``), asked a step
  ahead; dense, or top-k with ``teacher.topk``.
- ``CachedTeacher``: top-k log-probabilities stored by ``paced-ds cache-teacher``.
- ``ServerTeacher``: top-k log-probabilities over the response tokens from a vLLM server's
  prompt log-probs (``teacher.backend=server``; a large teacher on GPUs of its own).
- ``Privileged``: self-distillation, wrapped around another teacher: the same responses
  behind the teacher's own prompt, with the reference answer shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paced_ds import __version__, verify
from paced_ds.config import RunConfig, TeacherConfig
from paced_ds.data import sources
from paced_ds.data.collate import collate_train
from paced_ds.data.prompts import privileged_prompt
from paced_ds.distill import cache, pipeline
from paced_ds.distill.answers import TopKAnswer
from paced_ds.distill.fused import teacher_answer
from paced_ds.errors import UserError
from paced_ds.models import engines, generation, generators, server
from paced_ds.runtime import dist


@dataclass
class TeacherBatch:
    """What the teacher scores: ``batch`` (collated, on the CPU) of ``examples``, the
    sequences of the run's problems ``problems`` (indices into its records)."""

    batch: dict
    examples: list[dict]
    problems: list[int]


def requests_for(examples: list[dict], problems: list[int], per_request: int, pad_id: int) -> list[TeacherBatch]:
    """The step's sequences in requests of ``per_request`` (one teacher forward each)."""
    return [TeacherBatch(collate_train(examples[first:first + per_request], pad_id),
                         examples[first:first + per_request], problems[first:first + per_request])
            for first in range(0, len(examples), per_request)]


class Teacher:
    looks_ahead = False

    def answers(self, requests: list[TeacherBatch]):
        raise NotImplementedError

    def scored_tokens(self, requests: list[TeacherBatch]) -> int:
        """The tokens the teacher runs forward to answer ``requests`` (padding excluded)."""
        return sum(len(example["input_ids"]) for request in requests for example in request.examples)

    def ask_ahead(self, requests: list[TeacherBatch]) -> None:
        """Nothing to start early, unless the teacher works in parallel with the students."""

    def close(self) -> str | None:
        return None


class EngineTeacher(Teacher):
    """The co-located teacher: each answer is one (collective, ZeRO-3) forward of its engine,
    from its hidden states at the scored positions (``fused.teacher_answer``): top-k with
    ``topk`` > 0, else dense logits the loss computes a tile at a time."""

    def __init__(self, engine, vocab: int, topk: int = 0):
        self.engine, self.vocab, self.topk = engine, vocab, topk

    def answer(self, batch: dict):
        device = dist.device()
        return teacher_answer(self.engine, {key: value.to(device) for key, value in batch.items()},
                              vocab=self.vocab, topk=self.topk)

    def answers(self, requests):
        for request in requests:
            yield self.answer(request.batch)


class CachedTeacher(Teacher):
    """The offline teacher: each problem's stored top-k answer, read memory-mapped."""

    def __init__(self, store: cache.TeacherCache, records: list[dict]):
        self.store, self.ids = store, [record["id"] for record in records]

    def answers(self, requests):
        for request in requests:
            yield self.store.answer([self.ids[i] for i in request.problems]).to(dist.device())


class ServerTeacher(Teacher):
    """The served teacher: one prefill per sequence on a vLLM server, its top-``k``
    log-probabilities at every scored position (temperature 1), sparse to the loss."""

    def __init__(self, client: server.Client, k: int, vocab: int):
        self.client, self.k, self.vocab = client, k, vocab

    def answers(self, requests):
        for request in requests:
            yield self.answer(request).to(dist.device())

    def answer(self, request: TeacherBatch) -> TopKAnswer:
        mask = request.batch["loss_mask"]
        per_position = self.client.prompt_logprobs([e["input_ids"] for e in request.examples], self.k)
        ids, logprobs = [], []
        for row, entries in enumerate(per_position):
            # The logits at position t score token t + 1: vLLM's entry t + 1.
            for t in mask[row].nonzero().flatten().tolist():
                top = sorted(entries[t + 1].items(), key=lambda item: -item[1][0])[:self.k]
                if len(top) < self.k:
                    raise self.client.fail(f"answered {len(top)} log-probs where teacher.topk={self.k} were asked")
                beyond = [token for token, _ in top if token >= self.vocab]
                if beyond:
                    raise self.client.fail(f"ranks token {beyond[0]}, outside the shared vocabulary of {self.vocab}, "
                                           "among its top-k")
                ids.append([token for token, _ in top])
                logprobs.append([value[0] for _, value in top])
        ids_t = torch.tensor(ids, dtype=torch.int32).reshape(-1, self.k)
        logprobs_t = torch.tensor(logprobs, dtype=torch.float32).reshape(-1, self.k)
        tail = (1.0 - logprobs_t.double().exp().sum(-1)).clamp(min=0.0).float()
        return TopKAnswer(ids_t, logprobs_t, tail, mask.sum(1).to(torch.int64), self.vocab)


class PipelinedTeacher(Teacher):
    """The teacher job of ``teacher.backend=pipelined``, asked a step ahead when the plan allows.

    Whether what was asked ahead is still what is needed is decided alike on every student
    rank (one all-reduce), so that the students' requests stay in step for the teacher."""

    looks_ahead = True

    def __init__(self, client: pipeline.StudentClient):
        self.client = client

    def answers(self, requests):
        batches = [request.batch for request in requests]
        stale = torch.tensor([float(not self.client.asked(batches))], dtype=torch.float64)
        reuse = dist.all_reduce_sum(stale).item() == 0
        device = dist.device()
        return (answer.to(device) for answer in self.client.answers(batches, reuse=reuse))

    def ask_ahead(self, requests):
        self.client.ask([request.batch for request in requests])

    def close(self) -> str:
        self.client.close()
        return f"pipelined teacher: students waited {self.client.wait_s:.2f} s for it in all (this rank)"


class Privileged(Teacher):
    """Self-distillation: the wrapped teacher (a frozen copy of the initial student) scores
    each response behind its problem's privileged prompt, the reference answer shown. Its
    answers score the same response tokens as the student's sequences, in order."""

    def __init__(self, inner: Teacher, prompts: list[list[int]], pad_id: int):
        self.inner, self.prompts, self.pad_id = inner, prompts, pad_id
        self.looks_ahead = inner.looks_ahead

    def rewrite(self, requests):
        out = []
        for request in requests:
            examples = [behind(self.prompts[i], e) for i, e in zip(request.problems, request.examples)]
            out.append(TeacherBatch(collate_train(examples, self.pad_id), examples, request.problems))
        return out

    def answers(self, requests):
        return self.inner.answers(self.rewrite(requests))

    def scored_tokens(self, requests):
        return sum(len(self.prompts[i]) + len(e["input_ids"]) - e["response_start"]
                   for request in requests for i, e in zip(request.problems, request.examples))

    def ask_ahead(self, requests):
        self.inner.ask_ahead(self.rewrite(requests))

    def close(self):
        return self.inner.close()


def behind(prompt: list[int], example: dict) -> dict:
    """The example's response behind another prompt, never truncated (so it stays aligned)."""
    response = example["input_ids"][example["response_start"]:]
    return {"input_ids": prompt + response, "response_start": len(prompt)}


# ---- building the run's teacher ---------------------------------------------------------------

def teacher_path(cfg: RunConfig) -> str:
    """model.teacher, or model.student when the student distils into itself."""
    if cfg.teacher.self_distill:
        return engines.resolve_model(cfg.model.student, "model.student")
    return engines.resolve_model(cfg.model.teacher, "model.teacher")


def teacher_contract(cfg: RunConfig, tokenizer, vocab: int) -> dict:
    """What the teacher job and the student job of teacher.backend=pipelined must agree on."""
    return {"teacher": sources.teacher_identity(teacher_path(cfg)), "tokenizer": cache.tokenizer_digest(tokenizer),
            "vocab": vocab, "topk": cfg.teacher.topk, "paced_ds": __version__}


def describe(teacher_cfg: TeacherConfig) -> str:
    if teacher_cfg.backend == "cache":
        return f"cache {teacher_cfg.cache}"
    if teacher_cfg.backend == "server":
        return f"served (top-{teacher_cfg.topk}) at {teacher_cfg.url or 'a vLLM server on this node'}" + \
            (", self-distillation" if teacher_cfg.self_distill else "")
    where = f"pipelined at {teacher_cfg.address}, " if teacher_cfg.backend == "pipelined" else ""
    return f"{where}ZeRO-3 offload={teacher_cfg.offload}" + (", self-distillation" if teacher_cfg.self_distill else "")


@dataclass
class LaunchedTeacher:
    """What exists before the problems are ready: the co-located engine or the teacher's
    server (either writes missing teacher responses), or the connection to the teacher job
    (it wrote them before it answered), or none of them (a cache)."""

    engine: object = None
    client: pipeline.StudentClient | None = None
    server: server.Client | None = None


def launch_teacher(cfg: RunConfig, tokenizer, vocab: int) -> LaunchedTeacher:
    """The teacher's engine, server or connection (teacher.backend), before the problems are ready."""
    if cfg.teacher.backend == "engine":
        return LaunchedTeacher(engine=engines.build_teacher(cfg, name=teacher_path(cfg)))
    if cfg.teacher.backend == "pipelined":
        return LaunchedTeacher(client=connect_pipelined(cfg, tokenizer, vocab))
    if cfg.teacher.backend == "server":
        client = generators.connect_server(
            cfg.teacher.url, cfg, url_key="teacher.url", model=teacher_path(cfg),
            model_key="model.student" if cfg.teacher.self_distill else "model.teacher",
            role="teacher", tokenizer=tokenizer, max_logprobs=cfg.teacher.topk)
        # The contract's k, asked once now: a server whose --max-logprobs is below teacher.topk says so
        # before the first step. (The vocabulary is model.teacher's, the model the server was checked to serve.)
        eos = tokenizer.eos_token_id
        generators.check_on_main(lambda: client.prompt_logprobs([[eos, eos]], cfg.teacher.topk))
        return LaunchedTeacher(server=client)
    return LaunchedTeacher()


def open_teacher(cfg: RunConfig, tokenizer, vocab: int, launched: LaunchedTeacher, records: list[dict],
                 examples: list[dict] | None) -> Teacher:
    """The run's teacher (from what ``launch_teacher`` began), checked against the run's problems."""
    if cfg.teacher.backend == "cache":
        expected = cache.expected_manifest(teacher=sources.teacher_identity(teacher_path(cfg)), tokenizer=tokenizer,
                                           topk=cfg.teacher.topk, vocab=vocab, records=records, examples=examples)
        teacher = CachedTeacher(cache.TeacherCache(cfg.teacher.cache, expected), records)
    elif cfg.teacher.backend == "pipelined":
        teacher = PipelinedTeacher(launched.client)
    elif cfg.teacher.backend == "server":
        teacher = ServerTeacher(launched.server, cfg.teacher.topk, vocab)
    else:
        teacher = EngineTeacher(launched.engine, vocab, cfg.teacher.topk)
    if cfg.teacher.self_distill:
        shown = [{**r, "prompt": privileged_prompt(r["prompt"], verify.reference_answer(r["answer"]),
                                                         cfg.teacher.privileged_template)}
                 for r in records]
        teacher = Privileged(teacher, generation.prompt_ids(tokenizer, shown, cfg.data), tokenizer.pad_token_id)
    return teacher


def connect_pipelined(cfg: RunConfig, tokenizer, vocab: int) -> pipeline.StudentClient:
    """Join the teacher job at teacher.address (teacher.backend=pipelined)."""
    if not cfg.teacher.address:
        raise UserError("config key teacher.address: teacher.backend=pipelined needs the teacher job's HOST:PORT "
                        "(`paced-ds train` starts a teacher job and sets it; `paced-ds teacher-serve` starts one)")
    if dist.is_main():
        print(f"paced-ds: connecting to the teacher job at {cfg.teacher.address}", flush=True)
    bridge = pipeline.Bridge(cfg.teacher.address, side="student", rank=dist.rank(), ranks=dist.world_size(),
                             contract=teacher_contract(cfg, tokenizer, vocab), timeout_s=cfg.train.timeout_s)
    return pipeline.StudentClient(bridge, vocab=vocab, topk=cfg.teacher.topk, timeout_s=cfg.train.timeout_s)
