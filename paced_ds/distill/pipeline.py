"""The pipelined teacher: a teacher job on its own ranks, answering the student job ahead of time.

The teacher runs as its own DeepSpeed job (its own world, ZeRO-3 among its own ranks), so
the student job's world-wide barriers never wait for it. The two jobs meet through a
*bridge*: a process group built from a TCPStore that teacher rank 0 hosts at
``teacher.address``. Bridge ranks 0..T-1 are the teacher ranks, T..T+S-1 the students;
student s is served by teacher rank s mod T.

A request carries one batch's token ids, attention and loss masks; the answer carries
the teacher's logits over the shared vocabulary (``teacher.topk=0``, a ``DenseAnswer``),
or the top-k log-probabilities and tail mass of the response positions at temperature 1
(``teacher.topk=k``, a ``TopKAnswer``, which the loss reads sparse, as a cache's). Each student's requests are answered
in order, and every student makes the same sequence of requests (the trainer makes the
same decisions on every rank), so each teacher rank takes one request from each of its
students per round and runs one forward for them all.

Because the sampler's plan is deterministic, students send the next optimizer step's
batches before they train on the current one (``StudentClient.ask``); the teacher
computes while they train. If the plan changed meanwhile on any rank, every student drops
those answers and asks again, so that the students' requests stay in step. At most one step
is in flight per student, so memory stays fixed. A dead peer closes its sockets and the other
side stops at once with an error naming it; a silent one is given up on after ``train.timeout_s``.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from paced_ds.distill.answers import DenseAnswer, TopKAnswer, compress
from paced_ds.errors import UserError
from paced_ds.runtime.dist import parse_address
from paced_ds.runtime.faults import NONE, Faults

LOGITS, STOP = 0, 1  # request kinds
HEADER = 6  # int64 fields of every header: kind, tag, batch, length, topk, spare
IDLE_TIMEOUT = datetime.timedelta(days=7)  # waits between requests: a dead peer is noticed sooner


class Bridge:
    """The process group between the teacher job and the student job, and the handshake before it.

    ``contract`` is what both sides must agree on (teacher, tokenizer, vocabulary, top-k);
    the students check the teacher's and refuse, naming the keys, when they differ.
    """

    def __init__(self, address: str, *, side: str, rank: int, ranks: int, contract: dict, timeout_s: int):
        host, port = parse_address(address)
        self.address, self.side, self.rank = address, side, rank
        self.timeout = datetime.timedelta(seconds=timeout_s)
        hosting = side == "teacher" and rank == 0
        try:
            self.store = torch_dist.TCPStore(host, port, None, hosting, timeout=self.timeout,
                                             wait_for_workers=False)
        except (RuntimeError, OSError) as err:
            what = f"could not listen on {address}" if hosting else f"no teacher job answered at {address}"
            raise UserError(f"config key teacher.address: {what} within {timeout_s} s "
                            f"({str(err).splitlines()[0][:160]})") from None
        if side == "teacher":
            if rank == 0:
                self.store.set("teacher", json.dumps({"ranks": ranks, "contract": contract}))
            students = json.loads(self._get("students"))
            self.teachers, self.students = ranks, students["ranks"]
            verdict = self._get("verdict")
            if verdict != "ok":
                raise UserError(f"the student job at {address} refused this teacher: {verdict}")
            self.bridge_rank = rank
        else:
            if rank == 0:
                self.store.set("students", json.dumps({"ranks": ranks}))
            teacher = json.loads(self._get("teacher"))
            self.teachers, self.students = teacher["ranks"], ranks
            differing = [key for key in contract if teacher["contract"].get(key) != contract[key]]
            problem = ", ".join(f"{key}: {teacher['contract'].get(key)!r} there, {contract[key]!r} here"
                                for key in differing)
            if rank == 0:
                self.store.set("verdict", f"it differs in {problem}" if differing else "ok")
            if differing:
                raise UserError(f"teacher job at {address} does not match this run ({problem})")
            if self.teachers > self.students:
                raise UserError(f"config key teacher.ranks: {self.teachers} teacher ranks for {self.students} "
                                "student ranks; use at most one teacher rank per student rank")
            self.bridge_rank = self.teachers + rank
        self.group = torch_dist.ProcessGroupGloo(torch_dist.PrefixStore("bridge", self.store), self.bridge_rank,
                                                 self.teachers + self.students, IDLE_TIMEOUT)

    def _get(self, key: str) -> str:
        try:
            return self.store.get(key).decode()
        except RuntimeError as err:
            other = "student job" if self.side == "teacher" else "teacher job"
            raise UserError(f"the {other} at {self.address} did not get ready within "
                            f"{self.timeout.total_seconds():.0f} s (train.timeout_s): {str(err).splitlines()[0][:160]}"
                            ) from None

    def send(self, tensors: list[torch.Tensor], peer: int):
        """Start sending ``tensors`` to bridge rank ``peer``; keep them alive until the works finish."""
        return [self.group.send([t.contiguous()], peer, 0) for t in tensors]

    def recv(self, tensor: torch.Tensor, peer: int, timeout: datetime.timedelta | None = None) -> torch.Tensor:
        work = self.group.recv([tensor], peer, 0)
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
        return tensor


def describe_failure(err: Exception) -> str:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Connection closed" in first or "Connection reset" in first:
        return "it stopped (connection closed)"
    if "Timed out" in first:
        return "it did not answer in time (train.timeout_s)"
    return first[:200]


@dataclass
class Request:
    """A request in flight: its tag, its send works and the tensors they send (kept alive
    until sent), and the batch's loss mask (where top-k answers go)."""

    tag: int
    works: list
    header: torch.Tensor
    planes: torch.Tensor
    loss_mask: torch.Tensor


class StudentClient:
    """The student side: send batches now or ahead of time, collect the teacher's answers in order."""

    def __init__(self, bridge: Bridge, *, vocab: int, topk: int, timeout_s: int):
        self.bridge, self.vocab, self.topk = bridge, vocab, topk
        self.teacher = bridge.rank % bridge.teachers
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.tag = 0
        self.in_flight: list[Request] = []  # oldest first
        self.wait_s = 0.0  # time spent waiting for answers: ~0 when the teacher keeps up

    def _fail(self, err: Exception):
        raise UserError(f"teacher rank {self.teacher} (teacher job at {self.bridge.address}): "
                        f"{describe_failure(err)}; this student rank stops") from None

    @staticmethod
    def _planes(batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        return torch.stack([ids, batch["attention_mask"].to(ids.dtype), batch["loss_mask"].to(ids.dtype)]).cpu()

    def _submit(self, batch: dict) -> None:
        ids, planes = batch["input_ids"], self._planes(batch)
        header = torch.tensor([LOGITS, self.tag, ids.shape[0], ids.shape[1], self.topk, 0], dtype=torch.int64)
        try:
            works = self.bridge.send([header, planes], self.teacher)
        except RuntimeError as err:
            self._fail(err)
        self.in_flight.append(Request(self.tag, works, header, planes, batch["loss_mask"]))
        self.tag += 1

    def _collect(self):
        request = self.in_flight.pop(0)
        tag, loss_mask = request.tag, request.loss_mask
        started = time.time()
        try:
            for work in request.works:
                work.wait(self.timeout)
            header = self.bridge.recv(torch.zeros(HEADER, dtype=torch.int64), self.teacher, self.timeout)
            if int(header[1]) != tag:
                raise UserError(f"teacher rank {self.teacher} (teacher job at {self.bridge.address}) answered "
                                f"request {int(header[1])} where {tag} was due: the two jobs are out of step")
            batch, length, k = (int(x) for x in header[2:5])
            if k == 0:
                logits = self.bridge.recv(torch.empty(batch, length, self.vocab), self.teacher, self.timeout)
                out = DenseAnswer(logits, loss_mask.cpu())
            else:
                per_sample = loss_mask.cpu().bool().sum(1)
                count = int(per_sample.sum())
                top_ids = self.bridge.recv(torch.empty(count, k, dtype=torch.int32), self.teacher, self.timeout)
                top_logp = self.bridge.recv(torch.empty(count, k), self.teacher, self.timeout)
                tail = self.bridge.recv(torch.empty(count), self.teacher, self.timeout)
                out = TopKAnswer(top_ids, top_logp, tail, per_sample, self.vocab)
        except RuntimeError as err:
            self._fail(err)
        self.wait_s += time.time() - started
        return out

    def ask(self, batches: list[dict]) -> None:
        """Send ``batches`` now, for ``answers`` to collect later, after what is in flight."""
        for batch in batches:
            self._submit(batch)

    def asked(self, batches: list[dict]) -> bool:
        """Whether what is in flight is exactly ``batches`` (asked ahead, and the plan held)."""
        return len(self.in_flight) == len(batches) and all(
            torch.equal(request.planes, self._planes(batch)) for request, batch in zip(self.in_flight, batches))

    def answers(self, batches: list[dict], *, reuse: bool):
        """The teacher's answers for ``batches``, an iterator: collected from what was asked ahead
        (``reuse``, which every student rank must decide alike: ``asked`` on every rank), else
        asked now, what was in flight dropped. Alike, so that every student makes the same
        requests and the teacher's rounds pair them up."""
        if not reuse:
            self.drop_ahead()
            self.ask(batches)
        elif not self.asked(batches):
            raise UserError("pipelined teacher: asked to reuse answers to other batches than were sent ahead "
                            "(a bug in the caller: decide `reuse` from `asked` on every rank)")
        return (self._collect() for _ in batches)

    def drop_ahead(self) -> None:
        """Collect and discard what was asked ahead and will not be used."""
        while self.in_flight:
            self._collect()

    def close(self) -> None:
        """Tell the teacher this student is done (after collecting everything in flight)."""
        self.drop_ahead()
        header = torch.tensor([STOP, self.tag, 0, 0, 0, 0], dtype=torch.int64)
        try:
            for work in self.bridge.send([header], self.teacher):
                work.wait(self.timeout)
        except RuntimeError as err:
            self._fail(err)


def logits_scorer(forward):
    """A ``serve`` scorer from a forward that returns logits: ``forward(input_ids, attention_mask)``'s
    logits, or their top-k at the scored positions (``compress``, from the whole logits)."""
    def score(input_ids, attention_mask, loss_mask, vocab: int, topk: int):
        logits = forward(input_ids, attention_mask)[..., :vocab].float()
        return logits if topk == 0 else compress(logits, loss_mask, topk)
    return score


def serve(bridge: Bridge, score, *, vocab: int, topk: int, all_reduce=None, faults: Faults = NONE) -> dict:
    """The teacher side: answer this teacher rank's students until every one has said stop.

    ``score(input_ids, attention_mask, loss_mask, vocab, topk)`` is the (collective, ZeRO-3) teacher
    forward: logits [B, T, >= vocab] with ``topk`` = 0, else a ``TopKAnswer`` of the
    ``loss_mask`` positions (``teacher-serve`` takes it from the hidden states a tile at a time,
    ``fused.teacher_answer``; ``logits_scorer`` makes one from a logits forward);
    ``all_reduce`` sums a small tensor over the teacher job's ranks, so that a rank with
    no request in a round still joins the forward its peers make. ``faults``: this teacher rank's
    ``PACED_DS_FAULT`` (tests).
    """
    mine = [s for s in range(bridge.students) if s % bridge.teachers == bridge.rank]
    active = set(mine)
    sending: list = []  # the previous round's sends and their tensors
    served, batches, busy_s = 0, 0, 0.0
    while True:
        requests = []
        for student in sorted(active):
            peer = bridge.teachers + student
            try:
                header = bridge.recv(torch.zeros(HEADER, dtype=torch.int64), peer)
                if int(header[0]) == STOP:
                    active.discard(student)
                    continue
                planes = bridge.recv(torch.empty(3, int(header[2]), int(header[3]), dtype=torch.int64), peer)
            except RuntimeError as err:
                raise UserError(f"student rank {student} (of the student job joined at {bridge.address}): "
                                f"{describe_failure(err)}; the teacher stops") from None
            requests.append((student, header, planes))
        pending = torch.tensor([float(bool(requests))])
        if all_reduce is not None:
            pending = all_reduce(pending)
        if pending.item() == 0:
            break
        started = time.time()
        answers = answer(score, requests, vocab=vocab, topk=topk)
        busy_s += time.time() - started
        for work_list in sending:
            for work in work_list[0]:
                work.wait()
        sending = []
        for (student, header, _), tensors in zip(requests, answers):
            reply = torch.tensor([0, int(header[1]), int(header[2]), int(header[3]), topk, 0], dtype=torch.int64)
            sending.append((bridge.send([reply, *tensors], bridge.teachers + student), reply, tensors))
            served += 1
            if faults:
                faults.after_answers(served)  # PACED_DS_FAULT=kill:answers=N (tests)
        batches += 1
    for work_list in sending:
        for work in work_list[0]:
            work.wait()
    return {"requests": served, "forwards": batches, "forward_s": busy_s}


def answer(score, requests: list, *, vocab: int, topk: int) -> list[list[torch.Tensor]]:
    """One teacher forward for every request of the round (right-padded to the longest);
    a round with none here makes a one-token forward, so the ranks' ZeRO-3 gathers pair up."""
    if not requests:
        one = torch.ones(1, 1, dtype=torch.int64)
        score(torch.zeros(1, 1, dtype=torch.int64), one, one.bool(), vocab, topk)
        return []
    length = max(int(header[3]) for _, header, _ in requests)
    rows = sum(int(header[2]) for _, header, _ in requests)
    planes = torch.zeros(3, rows, length, dtype=torch.int64)  # ids, attention, loss mask
    row = 0
    for _, header, request_planes in requests:
        count, width = int(header[2]), int(header[3])
        planes[:, row:row + count, :width] = request_planes
        row += count
    scored = score(planes[0], planes[1], planes[2].bool(), vocab, topk)
    out, row = [], 0
    for _, header, _ in requests:
        count, width = int(header[2]), int(header[3])
        if topk == 0:
            out.append([scored[row:row + count, :width, :vocab].float().cpu().contiguous()])
        else:
            mine = scored.samples(slice(row, row + count))
            out.append([mine.ids.cpu(), mine.logprobs.float().cpu(), mine.tail.float().cpu()])
        row += count
    return out
