"""Which engine generates a run's text: ``rollout.engine``.

Competence estimates, held-out evaluation and the teacher's responses ask a *generator* for
completions (``complete(prompts, n=..., ...) -> Completions``) and never know which one
answers:

- ``hf``: Hugging Face ``generate`` on a gathered plain copy of the ZeRO-3 model, or on its
  shards (``rollout.gather``); nothing to install.
- ``vllm``: an OpenAI-compatible server, ``rollout.url``, or a vLLM server paced-ds starts on
  this node. Before the student generates, the server is given the student's current weights:
  exported to ``rollout.weights_dir`` and loaded in place (only when they changed since the
  last load). On-policy training steps sample from the gathered copy with Hugging Face.

The verifier, the competence table and the tracking are the same whichever engine answers.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from paced_ds.errors import UserError
from paced_ds.models import generation, server
from paced_ds.runtime import checkpoint, dist
from paced_ds.runtime.log import say


def connect_server(url: str, cfg, *, url_key: str, model: str, model_key: str, role: str, tokenizer,
                   max_logprobs: int = 20) -> server.Client:
    """A checked client: the server at ``url`` (config key ``url_key``), or one started here
    for ``model`` when ``url`` is empty; it must serve ``model`` (config key ``model_key``).
    Collective."""
    longest = cfg.data.max_length + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens,
                                        cfg.data.generate_max_new_tokens)
    if url:
        client = server.Client(url, cfg.train.timeout_s, what=url_key)
    else:
        client = server.start_local(model, cfg, role=role, log_dir=Path(cfg.train.output_dir) / "vllm",
                                    max_logprobs=max_logprobs)
    check_on_main(lambda: client.check_serves(model, model_key, tokenizer, longest))
    return client


def check_on_main(fn):
    """Run ``fn`` on rank 0 and raise its ``UserError`` on every rank. Collective. Returns
    what ``fn`` returned on rank 0, None on the other ranks."""
    error, result = None, None
    if dist.is_main():
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    error = dist.all_gather_objects(error)[0]
    if error:
        raise UserError(error)
    return result


class StudentGeneration:
    """The student's generator for estimates and evaluations, at its current weights."""

    def __init__(self, cfg, tokenizer, student_path: str, fresh_run: bool):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.client = None
        # The weights the server holds: model.student's until a step exports others (a resumed
        # run's student is a checkpoint's, so its first use loads them).
        self.loaded_step = 0 if fresh_run else None
        self.weights_dir = Path(cfg.rollout.weights_dir or Path(cfg.train.output_dir) / "rollout_weights")
        if cfg.rollout.engine == "vllm":
            self.client = connect_server(cfg.rollout.url, cfg, url_key="rollout.url", model=student_path,
                                         model_key="model.student", role="student", tokenizer=tokenizer)

    @contextmanager
    def generator(self, engine, step: int, keep_random_stream: bool = False):
        """A generator of the student ``engine`` after ``step`` optimizer steps. Collective."""
        if self.client is None:
            module, synced = generation.generating_model(engine, self.cfg.rollout.gather, keep_random_stream)
            try:
                yield generation.HFGenerator(module, self.tokenizer, synced)
            finally:
                del module
            return
        if step != self.loaded_step:
            self.sync(engine, step)
        yield server.ServerGenerator(self.client, self.tokenizer)

    def sync(self, engine, step: int) -> None:
        """Export the student to ``rollout.weights_dir`` and have the server load it. Collective."""
        started = time.time()
        checkpoint.export_student(engine, self.tokenizer, self.weights_dir)  # in the dtype the server computes in
        exported_s = time.time() - started
        reload_s = check_on_main(lambda: self.client.reload(self.weights_dir.resolve()))  # None off rank 0
        say(f"rollout server: the student's weights after step {step} exported in {exported_s:.1f} s and loaded "
            f"in {reload_s if reload_s is not None else 0.0:.1f} s ({self.weights_dir})")
        self.loaded_step = step


@contextmanager
def teacher_generator(cfg, tokenizer, *, model: str, engine=None, client: server.Client | None = None):
    """A generator of the teacher's responses: its server (``teacher.backend=server``), a vLLM
    server started for the occasion (``rollout.engine=vllm``), or Hugging Face on its engine."""
    if client is not None:
        yield server.ServerGenerator(client, tokenizer)
        return
    if cfg.rollout.engine == "vllm":
        client = connect_server("", cfg, url_key="", model=model, model_key="model.teacher",
                                role="teacher-responses", tokenizer=tokenizer)
        try:
            yield server.ServerGenerator(client, tokenizer)
        finally:
            if client.process is not None:
                client.process.stop()
            dist.barrier()
        return
    if engine is None:
        raise UserError("the teacher's responses need a teacher to generate them (teacher.backend=engine or "
                        "server, or rollout.engine=vllm)")
    module, synced = generation.generating_model(engine, cfg.rollout.gather, keep_random_stream=True)
    try:
        yield generation.HFGenerator(module, tokenizer, synced)
    finally:
        del module
