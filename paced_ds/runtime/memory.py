"""Memory plan for distilling a large teacher into a student on N nodes x G GPUs.

Pure arithmetic (no GPU, nothing allocated): ``plan`` returns one ``Row`` per teacher
placement and student optimizer placement, ``render_markdown`` prints them. Bytes
throughout; the table is in GiB (2^30 bytes). Memory sizes given as ``80GB`` are 10^9
bytes, ``80GiB`` 2^30.

Student model states follow DeepSpeed's own ZeRO-3 estimator
(``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``, zero_init=True,
params on the GPU), so the two agree: with the optimizer on the GPU each rank holds
18 bytes/param / W (bf16 param 2 + fp32 grad partition 4 + fp32 master, Adam m, v 12)
plus 4 bytes x the largest layer (its gathered bf16 param and grad); with
``offload_optimizer=cpu`` the GPU keeps 2 bytes/param / W + that buffer and each node's
CPU holds 16 bytes/param / nodes x DeepSpeed's buffer factor 1.5.

A model is a size (``70B``), a Hugging Face directory, or the hub id of an architecture
shipped in ``paced_ds/assets/architectures`` (its public config.json, no weights), all
built on the meta device.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from paced_ds.errors import UserError

GIB = 2**30
BF16_BYTES = 2
DEFAULT_VOCAB = 152064  # Qwen2 / Qwen2.5
GPU_FIT_FRACTION = 0.9  # leave 10% for the allocator's fragmentation, NCCL and the CUDA context
TEACHER_RANK_HEADROOM = 0.8  # dedicated teacher ranks: bf16 params may use 80% of a GPU
DS_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for CPU-side states
# ZeRO-3 keeps the layer being computed and the next one (prefetched) gathered at once.
TEACHER_LIVE_LAYERS = 2
# offload_param=nvme: each rank pins buffer_count (DeepSpeed default 5) buffers of
# buffer_size params (default 1e8, raised to the largest layer when that is bigger).
NVME_BUFFER_COUNT = 5
NVME_BUFFER_PARAMS = 100_000_000
# The chunked loss works on ~2^25 logits at a time on the GPU, in fp32, with about four
# buffers of that size alive (two log-softmaxes, their difference, the grad).
LOSS_CHUNK_LOGITS = 2**25
LOSS_CHUNK_BUFFERS = 4
# The fused output layer's tile on a GPU (distill/fused.py, GPU_TILE_ELEMENTS), as many buffers.
FUSED_TILE_LOGITS = 2**25
# Activations of one transformer layer in bf16: 34 * batch * seq * hidden bytes without the
# attention-score term, which flash attention does not materialise (Korthikanti et al.
# 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1).
LAYER_ACTIVATION_FACTOR = 34

# (params, hidden size, layers) of common Llama / Qwen shapes, for a bare SIZE.
KNOWN_SHAPES = [
    (0.5e9, 896, 24),    # Qwen2.5-0.5B
    (1.5e9, 1536, 28),   # Qwen2.5-1.5B
    (3e9, 2048, 36),     # Qwen2.5-3B
    (7e9, 3584, 28),     # Qwen2.5-7B
    (8e9, 4096, 32),     # Llama-3-8B
    (13e9, 5120, 40),    # Llama-2-13B
    (14e9, 5120, 48),    # Qwen2.5-14B
    (32e9, 5120, 64),    # Qwen2.5-32B
    (70e9, 8192, 80),    # Llama-3-70B
    (72e9, 8192, 80),    # Qwen2.5-72B
]

# The public config.json of the models the recipes name, as <org>--<name>/config.json.
ARCHITECTURES = Path(__file__).resolve().parent.parent / "assets" / "architectures"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT])\s*$", re.IGNORECASE)
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT])(i?)B\s*$", re.IGNORECASE)
_PARAM_UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_BYTE_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4}


@dataclass(frozen=True)
class Shape:
    params: int
    hidden: int
    layers: int
    vocab: int
    largest_layer_params: int  # the biggest single module's own params (DeepSpeed's "largest layer")
    kv_bytes_per_token: int = 0  # bf16 key/value cache of one token, all layers (0: unknown, a bare SIZE)
    # The weights a token is multiplied by: every linear layer, the output projection (tied or not)
    # included, the embedding lookup not; the N of the 2N (forward) and 6N (training) FLOPs a token.
    matmul_params: int = 0

    @property
    def flop_params(self) -> int:
        """N for FLOP counts: the matmul weights, or every parameter for a bare SIZE."""
        return self.matmul_params or self.params


@dataclass(frozen=True)
class Row:
    placement: str  # resident | cpu | nvme | dedicated
    optimizer: str  # where the student's optimizer states live: gpu | cpu
    student_gpu_bytes: int
    teacher_gpu_bytes: int  # on the student's ranks; on the teacher's own ranks for dedicated
    activations_gpu_bytes: int
    total_gpu_bytes: int  # the fullest GPU
    cpu_per_node_bytes: int
    fits: bool
    teacher_gpus: int = 0  # dedicated only: the teacher's own ranks
    note: str = ""


def parse_size(text: str, flag: str = "size") -> int:
    """A parameter count like ``70B``, ``1.5B``, ``500M`` -> an int."""
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"{flag} {text}: not a parameter count like 70B, 1.5B or 500M")
    return int(float(match.group(1)) * _PARAM_UNITS[match.group(2).upper()])


def parse_bytes(text: str, flag: str = "memory") -> int:
    """A memory size like ``80GB`` (10^9 bytes per G) or ``80GiB`` (2^30) -> bytes."""
    match = _BYTES.match(str(text))
    if not match:
        raise UserError(f"{flag} {text}: not a memory size like 80GB, 80GiB or 1TB")
    base = 1024 if match.group(3) else 1000
    return int(float(match.group(1)) * base ** _BYTE_POWERS[match.group(2).upper()])


def architecture_dir(hub_id: str) -> Path | None:
    """The shipped config.json directory of a hub id like ``Qwen/Qwen3-8B`` (None if not shipped)."""
    path = ARCHITECTURES / str(hub_id).replace("/", "--")
    return path if "/" in str(hub_id) and (path / "config.json").is_file() else None


def shipped_architectures() -> list[str]:
    """The hub ids whose architecture ships with paced-ds."""
    return sorted(path.name.replace("--", "/", 1) for path in ARCHITECTURES.glob("*--*") if path.is_dir())


def model_shape(spec: str, vocab: int | None = None, flag: str = "--model") -> Shape:
    """A SIZE (shape from ``KNOWN_SHAPES``, nearest by size), a Hugging Face model directory, or
    the hub id of a shipped architecture."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _shape_from_config(path, flag)
    shipped = architecture_dir(spec)
    if shipped is not None:
        return _shape_from_config(shipped, flag)
    if "/" in str(spec):
        raise UserError(f"{flag} {spec}: no such model directory, and no architecture shipped for that hub id "
                        f"(shipped: {', '.join(shipped_architectures())}); download its config.json and give "
                        "the directory")
    if not _SIZE.match(str(spec)):
        raise UserError(f"{flag} {spec}: not a size like 70B or a model directory")
    params = parse_size(spec, flag)
    if params <= 0:
        raise UserError(f"{flag} {spec}: the parameter count must be positive")
    _, hidden, layers = min(KNOWN_SHAPES, key=lambda known: abs(math.log(known[0] / params)))
    vocab = vocab or DEFAULT_VOCAB
    # The embedding (and an untied lm_head of the same size) is the largest module of these models.
    return Shape(params, hidden, layers, vocab, largest_layer_params=vocab * hidden)


def _shape_from_config(path: Path, flag: str) -> Shape:
    if not (path / "config.json").is_file():
        raise UserError(f"{flag} {path}: a directory without config.json; give a model directory or a size like 7B")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):  # shapes only, nothing allocated
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{flag} {path}: cannot build a causal LM from config.json ({err})") from None
    text_config = config.get_text_config()
    # model.parameters() yields a tied weight once, as DeepSpeed's model_to_params counts it.
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    kv_per_token = 2 * text_config.num_hidden_layers * kv_heads * head_dim * BF16_BYTES  # keys and values
    return Shape(params, text_config.hidden_size, text_config.num_hidden_layers, text_config.vocab_size, largest,
                 kv_per_token, matmul)


def student_states(params: int, largest_layer_params: int, gpus_per_node: int, nodes: int,
                   offload_optimizer: bool) -> tuple[int, int]:
    """ZeRO-3 model states of the trained student: (GPU bytes per rank, CPU bytes per node),
    counted as DeepSpeed's estimator counts them (zero_init, params on the GPU)."""
    world = gpus_per_node * nodes
    gather_buffer = 4 * largest_layer_params  # bf16 param + bf16 grad of the gathered layer
    if offload_optimizer:
        gpu = gather_buffer + int(2 * params / world)
        cpu = params * 16 / nodes * DS_BUFFER_FACTOR
    else:
        gpu = gather_buffer + int(18 * params / world)
        cpu = largest_layer_params * 4 * gpus_per_node * DS_BUFFER_FACTOR  # zero_init staging
    return int(gpu), int(cpu)


def min_teacher_gpus(teacher: Shape, gpu_mem_bytes: int) -> int:
    """The fewest GPUs whose memory holds the teacher's bf16 params with 20% headroom."""
    return math.ceil(BF16_BYTES * teacher.params / (gpu_mem_bytes * TEACHER_RANK_HEADROOM))


def teacher_placements(teacher: Shape, gpus_per_node: int, nodes: int, teacher_gpus: int) -> dict[str, dict]:
    """Per placement: the teacher's bytes per GPU, CPU bytes per node, disk bytes per node."""
    world = gpus_per_node * nodes
    live_layers = TEACHER_LIVE_LAYERS * BF16_BYTES * teacher.largest_layer_params
    params_bytes = BF16_BYTES * teacher.params
    nvme_buffer_params = max(NVME_BUFFER_PARAMS, teacher.largest_layer_params)
    return {
        "resident": {"gpu": params_bytes // world + live_layers, "cpu": 0, "disk": 0},
        "cpu": {"gpu": live_layers, "cpu": params_bytes // nodes, "disk": 0},
        "nvme": {"gpu": live_layers,
                 "cpu": gpus_per_node * NVME_BUFFER_COUNT * nvme_buffer_params * BF16_BYTES,
                 "disk": params_bytes // nodes},
        # A pipelined teacher: its layers split over its own ranks, nothing gathered.
        "dedicated": {"gpu": math.ceil(params_bytes / teacher_gpus), "cpu": 0, "disk": 0},
    }


def logits_bytes(micro_batch: int, seq_len: int, vocab: int) -> int:
    return micro_batch * seq_len * vocab * BF16_BYTES


def activations(student: Shape, teacher: Shape, seq_len: int, micro_batch: int,
                teacher_batch: int | None = None, checkpointing: bool = True, *, fused: bool = True,
                sequence_parallel: int = 1, response_len: int | None = None) -> int:
    """Peak activation and logit bytes on a student rank for one micro-batch; the teacher's
    answer is for ``teacher_batch`` sequences (one teacher forward; default a micro-batch).

    ``sequence_parallel`` = S: each rank holds a 1/S share of every sequence's positions
    (Ulysses; the attention's all-to-all buffers are a layer's q, k, v, inside the layer factor).
    ``fused`` (loss.fused): only the ``response_len`` positions (default all) go through the
    output layers, a tile of ``FUSED_TILE_LOGITS`` logits at a time; what stays is the tile's
    buffers, the student's fp32 output-weight gradient, the teacher's hidden states at those
    positions and its gathered output weight. Unfused: the student's logits and their gradient,
    and the teacher's logits, of every position."""
    local = -(-seq_len // sequence_parallel)
    tokens = micro_batch * local
    if checkpointing:
        # Each layer's bf16 input is kept; backward recomputes one layer at a time.
        checkpoints = BF16_BYTES * tokens * student.hidden * student.layers
        student_layer = LAYER_ACTIVATION_FACTOR * tokens * student.hidden
    else:  # every layer's activations are kept for backward
        checkpoints, student_layer = 0, LAYER_ACTIVATION_FACTOR * tokens * student.hidden * student.layers
    # The teacher's forward (no grad) finishes before the student's, so only the larger of
    # the two working sets is alive at once; the teacher's answer stays for the loss.
    teacher_batch = teacher_batch or micro_batch
    teacher_layer = LAYER_ACTIVATION_FACTOR * teacher_batch * local * teacher.hidden
    if fused:
        scored = -(-(response_len or seq_len) // sequence_parallel)
        output = (FUSED_TILE_LOGITS * 4 * LOSS_CHUNK_BUFFERS + 4 * student.vocab * student.hidden
                  + BF16_BYTES * micro_batch * scored * student.hidden)
        teacher_answer = BF16_BYTES * (teacher_batch * scored * teacher.hidden + teacher.vocab * teacher.hidden)
        return max(checkpoints + student_layer, teacher_layer) + output + teacher_answer
    student_logits_and_grad = 2 * logits_bytes(micro_batch, local, student.vocab)
    teacher_logits = logits_bytes(teacher_batch, local, teacher.vocab)
    loss_chunk = LOSS_CHUNK_LOGITS * 4 * LOSS_CHUNK_BUFFERS
    return max(checkpoints + student_layer, teacher_layer) + student_logits_and_grad + teacher_logits + loss_chunk


def generation_bytes(model: Shape, sequences: int, tokens: int, gathered: bool) -> int:
    """GPU bytes of one generation batch (HF generate) beyond the model states: the key/value
    cache of ``sequences`` x ``tokens``, and with ``gathered`` the full bf16 copy of the model
    (rollout.gather), which exists twice while it is being made (gathered ZeRO-3 params and
    their clone); without it, two gathered layers of the sharded model."""
    kv_cache = model.kv_bytes_per_token * sequences * tokens
    if gathered:
        copy = BF16_BYTES * model.params
        return max(2 * copy, copy + kv_cache)
    return TEACHER_LIVE_LAYERS * BF16_BYTES * model.largest_layer_params + kv_cache


def teacher_rank_activations(teacher: Shape, seq_len: int, micro_batch: int) -> int:
    """A dedicated teacher rank: one layer's working set and the logits it sends on."""
    tokens = micro_batch * seq_len
    return LAYER_ACTIVATION_FACTOR * tokens * teacher.hidden + logits_bytes(micro_batch, seq_len, teacher.vocab)


# The order of preference: a resident teacher costs nothing per step; a CPU-offloaded one
# streams 2 bytes/param over PCIe every forward; dedicated ranks take GPUs from the student;
# NVMe streams from disk, the slowest. Within each, the student's optimizer on the GPU
# comes before offload_optimizer=cpu (a CPU Adam step is slower).
PLACEMENT_ORDER = ("resident", "cpu", "dedicated", "nvme")


def plan(student: Shape, teacher: Shape, nodes: int, gpus_per_node: int, gpu_mem_bytes: int,
         cpu_mem_bytes: int, seq_len: int, micro_batch: int, teacher_gpus: int | None = None,
         teacher_batch: int | None = None, checkpointing: bool = True, *, fused: bool = True,
         sequence_parallel: int = 1, response_len: int | None = None) -> list[Row]:
    """One row per (teacher placement, student optimizer placement), in order of preference;
    ``fused``, ``sequence_parallel`` and ``response_len`` as ``activations``'."""
    world = nodes * gpus_per_node
    teacher_gpus = teacher_gpus or min_teacher_gpus(teacher, gpu_mem_bytes)
    placements = teacher_placements(teacher, gpus_per_node, nodes, teacher_gpus)
    student_acts = activations(student, teacher, seq_len, micro_batch, teacher_batch, checkpointing, fused=fused,
                               sequence_parallel=sequence_parallel, response_len=response_len)
    gpu_budget = gpu_mem_bytes * GPU_FIT_FRACTION
    rows = []
    for placement in PLACEMENT_ORDER:
        where = placements[placement]
        for offload_optimizer in (False, True):
            note = ""
            if placement == "dedicated":
                student_ranks = world - teacher_gpus
                if student_ranks < 1:
                    rows.append(Row(placement, "cpu" if offload_optimizer else "gpu", 0, where["gpu"], 0, 0, 0,
                                    False, teacher_gpus, f"the teacher needs {teacher_gpus} GPUs, only {world} in all"))
                    continue
                # The student shards over the ranks left to it; its CPU side still spreads
                # over all the nodes (the same per-node figures as the whole cluster).
                student_gpu, _ = student_states(student.params, student.largest_layer_params,
                                                student_ranks, 1, offload_optimizer)
                _, student_cpu = student_states(student.params, student.largest_layer_params,
                                                gpus_per_node, nodes, offload_optimizer)
                teacher_rank_total = where["gpu"] + teacher_rank_activations(
                    teacher, seq_len, teacher_batch or micro_batch)
                total = max(student_gpu + student_acts, teacher_rank_total)
                note = f"teacher ranks: {teacher_rank_total / GIB:.1f} GiB each; student on {student_ranks} GPUs"
            else:
                student_gpu, student_cpu = student_states(student.params, student.largest_layer_params,
                                                          gpus_per_node, nodes, offload_optimizer)
                total = student_gpu + where["gpu"] + student_acts
                if placement == "nvme":
                    note = f"NVMe: {where['disk'] / GIB:.0f} GiB per node"
            cpu = student_cpu + where["cpu"]
            fits = total <= gpu_budget and cpu <= cpu_mem_bytes
            rows.append(Row(placement, "cpu" if offload_optimizer else "gpu", student_gpu, where["gpu"],
                            student_acts, total, cpu, fits, teacher_gpus if placement == "dedicated" else 0, note))
    return rows


def recommend(rows: list[Row]) -> Row | None:
    """The first row that fits (rows come in order of preference)."""
    return next((row for row in rows if row.fits), None)


def render_markdown(rows: list[Row]) -> str:
    header = ("| teacher | student optimizer | student states GPU | teacher GPU | activations+logits GPU "
              "| total GPU | CPU per node | fits? | note |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        cells = [f"{value / GIB:.1f}" for value in (row.student_gpu_bytes, row.teacher_gpu_bytes,
                                                     row.activations_gpu_bytes, row.total_gpu_bytes,
                                                     row.cpu_per_node_bytes)]
        label = f"dedicated ({row.teacher_gpus} GPUs)" if row.placement == "dedicated" else row.placement
        fits = "yes" if row.fits else "no"
        lines.append(f"| {label} | {row.optimizer} | " + " | ".join(cells) + f" | {fits} | {row.note} |")
    return "\n".join(lines)
