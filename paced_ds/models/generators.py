"""Which engine generates a run's text: ``rollout.engine``.

Competence estimates, held-out evaluation and the teacher's responses ask a *generator* for
completions (``complete(prompts, n=..., ...) -> Completions``) and never know which one
answers:

- ``hf``: Hugging Face ``generate`` on a gathered plain copy of the ZeRO-3 model, or on its
  shards (``rollout.gather``); nothing to install.
- ``vllm``: an OpenAI-compatible server, ``rollout.url``, or a vLLM server paced-ds starts on
  this node. Before the student generates, the server is given the student's current weights:
  exported to ``rollout.weights_dir`` (by default in /dev/shm, memory, for the server on this
  node) and loaded in place, only when they changed since the last load. On-policy training
  steps generate there too (``distill/onpolicy.py``), synced before every step.

The verifier, the competence table and the tracking are the same whichever engine answers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from paced_ds.errors import UserError
from paced_ds.models import generation, server
from paced_ds.runtime import checkpoint, dist
from paced_ds.runtime import exit as exit_hooks
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


class RolloutsAhead:
    """rollout.overlap: the next step's rollouts generated in a thread, from the weights the
    server holds now, while this step trains. One batch at most is pending; it is waited for
    before the server loads other weights (a generation must not see two sets of weights)."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paced-ds-rollouts-ahead")
        self.pending: tuple[list[int], Future] | None = None

    def start(self, indices: list[int], generate) -> None:
        """Run ``generate()`` (the rollouts of the problems ``indices``) in the background."""
        self.wait()
        self.pending = (list(indices), self.pool.submit(generate))

    def take(self, indices: list[int]) -> list | None:
        """The rollouts started for ``indices``; None when none were (or others were: the plan
        moved, say by a curriculum refresh; those are dropped)."""
        if self.pending is None:
            return None
        started_for, future = self.pending
        self.pending = None
        result = future.result()  # re-raises the generation's error (a server that died) here
        return result if started_for == list(indices) else None

    def wait(self) -> None:
        """Until the pending generation is done (its result kept for ``take``)."""
        if self.pending is not None:
            self.pending[1].exception()  # waits; an error stays in the future for take


class StudentGeneration:
    """The student's generator for estimates and evaluations, at its current weights."""

    def __init__(self, cfg, tokenizer, student_path: str, fresh_run: bool):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.client = None
        # The weights the server holds: model.student's until a step exports others (a resumed
        # run's student is a checkpoint's, so its first use loads them).
        self.loaded_step = 0 if fresh_run else None
        self.said_on_policy, self.room_checked = False, False
        self.ahead = RolloutsAhead()
        self.weights_dir = rollout_weights_dir(cfg.rollout, cfg.train.output_dir)
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

    def sync(self, engine, step: int, *, quiet: bool = False) -> float:
        """Export the student to ``rollout.weights_dir`` and have the server load it; the
        seconds it took. Collective."""
        self.ahead.wait()  # a generation in flight finishes on the weights it started with
        self.make_room(engine)
        started = time.time()
        checkpoint.export_student(engine, self.tokenizer, self.weights_dir)  # in the dtype the server computes in
        if dist.is_main():
            write_tied_output_layer(engine.module, self.weights_dir)
        exported_s = time.time() - started
        reload_s = check_on_main(lambda: self.client.reload(self.weights_dir.resolve()))  # None off rank 0
        if not quiet:
            say(f"rollout server: the student's weights after step {step} exported in {exported_s:.1f} s and "
                f"loaded in {reload_s if reload_s is not None else 0.0:.1f} s ({self.weights_dir})")
        self.loaded_step = step
        return time.time() - started

    def make_room(self, engine) -> None:
        """Once: a /dev/shm too small for the exported student (a container's 64 MB, say) gives
        way to <output_dir>/rollout_weights, with a line saying so."""
        if self.room_checked or not self.weights_dir.is_relative_to("/dev/shm"):
            return
        self.room_checked = True
        parameters = list(engine.module.parameters())
        need = sum(getattr(p, "ds_numel", p.numel()) for p in parameters) * parameters[0].element_size()
        free = shutil.disk_usage("/dev/shm").free
        if free < 1.1 * need + 2**26:
            self.weights_dir = Path(self.cfg.train.output_dir) / "rollout_weights"
            say(f"rollout server: /dev/shm has {free / 2**30:.1f} GiB free, the student needs {need / 2**30:.1f}: "
                f"its weights go through {self.weights_dir} instead (set rollout.weights_dir to choose)")

    def synced_client(self, engine, step: int) -> tuple[server.Client, float]:
        """The server, holding the student after ``step`` optimizer steps, for an on-policy step's
        rollouts, and the seconds the sync took (0 when it held them already). Collective."""
        sync_s = self.sync(engine, step, quiet=self.said_on_policy) if step != self.loaded_step else 0.0
        if not self.said_on_policy:
            say("rollout server: on-policy steps generate on the server, the student's weights synced before each "
                "(rollout_sync_s in metrics.jsonl)")
            self.said_on_policy = True
        return self.client, sync_s


def write_tied_output_layer(module, weights_dir: Path) -> None:
    """For a model whose output layer is its input embedding (tie_word_embeddings: SmolLM2, Qwen2.5's
    small ones), write the output layer's weight as a tensor of its own beside the export.

    Hugging Face saves a tied weight once, under the embedding's name. vLLM (0.32 measured) keeps
    its own copy of the output layer, filled from the embedding when it loads a model, but not
    when it reloads weights in place: an updated embedding left it generating from the old output
    layer (greedy rollouts of a student whose embedding moved: 0 of 8 equal to Hugging Face's,
    8 of 8 with this file). The extra file is listed in the shard index where there is one;
    Hugging Face loads the directory as before."""
    output, embedding = module.get_output_embeddings(), module.get_input_embeddings()
    if output is None or output.weight is not embedding.weight:
        return
    names = {id(m): name for name, m in module.named_modules()}
    source, target = f"{names[id(embedding)]}.weight", f"{names[id(output)]}.weight"
    index = weights_dir / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    shard = weights_dir / (weight_map[source] if weight_map else "model.safetensors")
    with safe_open(shard, framework="pt") as f:
        tensor = f.get_tensor(source)
    save_file({target: tensor}, weights_dir / "output-layer.safetensors", metadata={"format": "pt"})
    if weight_map is not None:
        listing = json.loads(index.read_text())
        listing["weight_map"][target] = "output-layer.safetensors"
        index.write_text(json.dumps(listing, indent=2))


def rollout_weights_dir(rollout, output_dir: str) -> Path:
    """Where the student is exported for the server: rollout.weights_dir; else, for a server
    paced-ds starts on this node, a directory in /dev/shm (memory: the fastest path, removed when
    the run ends); else <output_dir>/rollout_weights, which a server elsewhere must read too."""
    if rollout.weights_dir:
        return Path(rollout.weights_dir).expanduser()
    shared_memory = Path("/dev/shm")
    if rollout.engine == "vllm" and not rollout.url and shared_memory.is_dir():
        path = shared_memory / f"paced_ds-rollout-weights-{os.getpid()}"
        if dist.is_main():
            exit_hooks.on_exit(shutil.rmtree, path, ignore_errors=True)
        return path
    return Path(output_dir) / "rollout_weights"


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
