"""The OpenAI-compatible client (paced_ds.models.server) against a small stand-in server on
loopback: how completions are asked, ordered and decoded, how prompt log-probs become a sparse
teacher answer, and the one-line errors of a server that is down, silent, or serves another
model. The real vLLM server is tested in test_vllm.py."""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from paced_ds.config import load_config
from paced_ds.data.collate import collate_train
from paced_ds.distill.answers import compress
from paced_ds.distill.teachers import ServerTeacher, TeacherBatch
from paced_ds.errors import UserError
from paced_ds.models import server
from paced_ds.models.generation import Completions

VOCAB = 12


class Tokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def __call__(self, text):
        return {"input_ids": [1, len(text)]}


def logits_of(sequence: list[int]) -> torch.Tensor:
    """The stand-in teacher's logits [T, V] for a sequence: a fixed function of the tokens."""
    generator = torch.Generator().manual_seed(sum(sequence))
    return torch.randn(len(sequence), VOCAB, generator=generator) * 3


class Handler(BaseHTTPRequestHandler):
    """/v1/models, /tokenize, /v1/completions (completions: token ids; prompt_logprobs)."""

    served = {"id": "teacher-model", "root": "/models/teacher-model", "max_model_len": 512}
    requests: list[dict] = []

    def log_message(self, *args):
        pass

    def reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            return self.reply(200, {"data": [self.served]})
        self.reply(404, {"error": {"message": "no such route"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        if self.path == "/tokenize":
            return self.reply(200, {"tokens": [1, len(body["prompt"])]})
        if self.path != "/v1/completions":
            return self.reply(404, {"error": {"message": "no such route"}})
        choices = []
        if body.get("prompt_logprobs"):
            for i, prompt in enumerate(body["prompt"]):
                logprobs = torch.log_softmax(logits_of(prompt), -1)
                entries = [None]
                for t in range(1, len(prompt)):
                    top = logprobs[t - 1].topk(body["prompt_logprobs"])
                    entry = {str(int(i_)): {"logprob": float(v), "rank": r + 1}
                             for r, (v, i_) in enumerate(zip(top.values, top.indices))}
                    actual = prompt[t]  # vLLM adds the prompt's own token when it is outside the top-k
                    entry.setdefault(str(actual), {"logprob": float(logprobs[t - 1, actual]), "rank": 99})
                    entries.append(entry)
                choices.append({"index": i, "text": "", "prompt_logprobs": entries})
        else:
            n = body["n"]
            for i, prompt in enumerate(body["prompt"]):
                for j in range(n):  # completion j of prompt i: its first token, j, then eos
                    choices.append({"index": i * n + j, "text": "?", "token_ids": [prompt[0], 100 + j, 2]})
            choices.reverse()  # the client orders by index
        self.reply(200, {"choices": choices, "usage": {}})


@pytest.fixture
def fake():
    Handler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_completions_come_back_per_prompt_in_order_in_requests_of_the_batch(fake):
    client = server.Client(fake, timeout_s=10)
    prompts = [[10 + i, 5] for i in range(7)]
    completions = server.ServerGenerator(client, Tokenizer()).complete(
        prompts, n=3, max_new_tokens=8, batch_size=6, greedy=False, temperature=0.7, top_p=0.9, top_k=0)
    assert isinstance(completions, Completions)
    # prompt p's sample j is keyed p * n + j; the stop token is dropped before decoding
    assert completions.texts == {p * 3 + j: f"{10 + p} {100 + j}" for p in range(7) for j in range(3)}
    assert completions.tokens == sum(len(p) + 2 for p in prompts for _ in range(3))
    assert completions.generated == 2 * 3 * len(prompts) and completions.padded == 0
    asked = [r for r in Handler.requests if "n" in r]
    assert sorted(len(r["prompt"]) for r in asked) == [1, 2, 2, 2]  # batch_size 6 = 2 prompts x 3 samples
    assert all(r["temperature"] == 0.7 and r["top_p"] == 0.9 and r["top_k"] == -1 and r["stop_token_ids"] == [2]
               and r["return_token_ids"] and r["model"] == "teacher-model" for r in asked)


def test_greedy_asks_temperature_zero(fake):
    server.ServerGenerator(server.Client(fake, timeout_s=10), Tokenizer()).complete(
        [[3, 4]], max_new_tokens=4, batch_size=8, greedy=True, temperature=0.7, top_k=50)
    asked = Handler.requests[-1]
    assert asked["temperature"] == 0.0 and asked["n"] == 1 and asked["top_k"] == -1


def test_prompt_logprobs_make_the_top_k_answer_of_the_dense_teacher(fake):
    """The served answer equals compress() of the same teacher's dense logits: the entry at
    position t + 1 scores the token the logits at t predict; the prompt's own extra token is
    left to the tail."""
    k = 4
    examples = [{"input_ids": [1, 7, 8, 9, 3, 4], "response_start": 3},
                {"input_ids": [1, 5, 6, 2], "response_start": 2}]
    batch = collate_train(examples, pad_id=0)
    request = TeacherBatch(batch, examples, [0, 1])
    served = ServerTeacher(server.Client(fake, timeout_s=10), k, VOCAB).answer(request)

    dense = torch.zeros(2, batch["input_ids"].shape[1], VOCAB)
    for row, example in enumerate(examples):
        dense[row, :len(example["input_ids"])] = logits_of(example["input_ids"])
    expected = compress(dense, batch["loss_mask"], k)
    assert torch.equal(served.ids.long(), expected.ids.long())
    assert torch.allclose(served.logprobs, expected.logprobs, atol=1e-6)
    assert torch.allclose(served.tail, expected.tail, atol=1e-6)
    assert served.per_sample.tolist() == expected.per_sample.tolist() == [3, 2]
    assert Handler.requests[-1]["prompt_logprobs"] == k and Handler.requests[-1]["max_tokens"] == 1


def test_a_server_of_another_model_is_named(fake):
    client = server.Client(fake, timeout_s=10, what="teacher.url")
    client.check_serves("/models/teacher-model", "model.teacher", Tokenizer(), longest=256)  # by root
    client.check_serves("/elsewhere/teacher-model", "model.teacher", Tokenizer(), longest=256)  # by name
    with pytest.raises(UserError) as info:
        client.check_serves("/models/other", "model.teacher", Tokenizer(), longest=256)
    message = str(info.value)
    assert message.startswith(f"teacher.url {fake}: serves 'teacher-model'") and "not /models/other (model.teacher)" \
        in message and "\n" not in message
    with pytest.raises(UserError, match="serves at most 512 tokens per sequence, and this run needs 1024"):
        client.check_serves("/models/teacher-model", "model.teacher", Tokenizer(), longest=1024)


def test_a_server_that_is_down_or_silent_is_one_line_naming_the_url():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    down = server.Client(f"http://127.0.0.1:{port}", timeout_s=5)
    with pytest.raises(UserError, match=rf"^rollout.url http://127.0.0.1:{port}: not reachable \(.*refused"):
        down.model()

    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        client = server.Client(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1)
        with pytest.raises(UserError, match=r"no answer to /v1/models within 1 s \(train.timeout_s\)"):
            client.model()
    finally:
        silent.close()


def test_server_settings_are_checked_before_a_run(tmp_path):
    recipe = "ds_configs/recipes/tiny_arith.yaml"
    for overrides, message in (
            (["rollout.url=http://h:1"], "rollout.url: a server generates only with rollout.engine=vllm"),
            (["rollout.engine=vllm", "rollout.url=h:1"], "rollout.url: an http:// or https:// URL"),
            (["teacher.backend=server"], "teacher.topk: teacher.backend=server answers top-k"),
            (["teacher.backend=server", "teacher.topk=5", "teacher.offload=cpu"], "teacher.offload"),
            (["rollout.top_k=-1"], "rollout.top_k: must be >= 0")):
        with pytest.raises(UserError, match=message):
            load_config(recipe, overrides)


def test_no_vllm_python_is_one_line_saying_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr(server, "VLLM_VENV", tmp_path / "none")
    monkeypatch.delenv("PACED_DS_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(server.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="run `paced-ds setup-vllm`"):
        server.vllm_python("")
    with pytest.raises(UserError, match="rollout.vllm_python: no such file /no/python"):
        server.vllm_python("/no/python")


@pytest.mark.distributed
def test_a_run_whose_server_is_down_stops_at_once_naming_it_and_writes_nothing(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from launch import RECIPE, paced_ds

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    out = tmp_path / "run"
    result = paced_ds("estimate", "--config", RECIPE, "--nproc", 2, "rollout.engine=vllm",
                      f"rollout.url=http://127.0.0.1:{port}", f"train.output_dir={out}", "logging.progress=false")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("paced-ds: error")]
    # every rank stops alike (rank 0 asked the server and told the others); the first to fail says why, once
    assert len(errors) == 1 and all(re.match(rf"paced-ds: error \(rank [01]\): rollout.url http://127.0.0.1:{port}: "
                                             r"not reachable \(", line) for line in errors), result.stderr[-2000:]
    assert not (out / "competence.jsonl").exists()


def test_rollouts_ahead_are_taken_for_their_own_problems_and_waited_for():
    """rollout.overlap's background generation (models/generators.py: RolloutsAhead)."""
    import time

    from paced_ds.models.generators import RolloutsAhead

    ahead = RolloutsAhead()
    assert ahead.take([1, 2]) is None  # nothing started: the step generates its own
    ahead.start([1, 2], lambda: [[7], [8]])
    assert ahead.take([1, 2]) == [[7], [8]] and ahead.pending is None
    ahead.start([1, 2], lambda: [[7], [8]])
    assert ahead.take([2, 1]) is None and ahead.pending is None  # the plan moved: dropped
    finished = []
    ahead.start([3], lambda: (time.sleep(0.3), finished.append(True), [[9]])[-1])
    ahead.wait()  # what a sync does before the server loads other weights
    assert finished == [True] and ahead.take([3]) == [[9]]

    def server_gone():
        raise UserError("rollout.url http://127.0.0.1:1: not reachable")

    ahead.start([4], server_gone)
    ahead.wait()  # the error stays for take, on the training thread
    with pytest.raises(UserError, match="not reachable"):
        ahead.take([4])


def test_a_tied_output_layer_is_written_for_the_server_as_a_tensor_of_its_own(tmp_path):
    """vLLM reloads an output layer only from a tensor of its own (tests/test_vllm.py shows why)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from paced_ds.config import REPO_ROOT
    from paced_ds.models.generators import write_tied_output_layer

    model = AutoModelForCausalLM.from_pretrained(REPO_ROOT / "paced_ds" / "assets" / "tiny-student")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for directory in (tmp_path / "single", tmp_path / "sharded"):
        write_tied_output_layer(model, directory)
        extra = load_file(directory / "output-layer.safetensors")
        assert list(extra) == ["lm_head.weight"] and torch.equal(extra["lm_head.weight"], model.lm_head.weight)
        reloaded = AutoModelForCausalLM.from_pretrained(directory)  # Hugging Face reads the directory as before
        assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] == "output-layer.safetensors"
