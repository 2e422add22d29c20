"""The memory planner: sizes, DeepSpeed's own ZeRO-3 estimator, a 70B -> 7B plan, HF configs, the CLI."""

from __future__ import annotations

import pytest

from paced_ds import cli
from paced_ds.errors import UserError
from paced_ds.runtime import memory

GB = 10**9


@pytest.mark.parametrize("text, params", [("70B", 70 * 10**9), ("1.5B", 1_500_000_000), ("500M", 500 * 10**6),
                                          ("7b", 7 * 10**9), ("1T", 10**12), (" 8B ", 8 * 10**9)])
def test_parse_size(text, params):
    assert memory.parse_size(text) == params


@pytest.mark.parametrize("text", ["70Q", "B", "", "7 billion", "-7B", "7GB"])
def test_parse_size_refuses(text):
    with pytest.raises(UserError, match="--teacher"):
        memory.parse_size(text, "--teacher")


def test_parse_bytes():
    assert memory.parse_bytes("80GB") == 80 * GB
    assert memory.parse_bytes("80GiB") == 80 * 2**30
    assert memory.parse_bytes("1TB") == 10**12
    with pytest.raises(UserError, match="--gpu-mem 80"):
        memory.parse_bytes("80", "--gpu-mem")


def test_model_shape_of_a_size_names_the_flag():
    shape = memory.model_shape("70B")
    assert (shape.params, shape.hidden, shape.layers, shape.vocab) == (70 * 10**9, 8192, 80, 152064)
    assert memory.model_shape("1.5B", vocab=32000).largest_layer_params == 32000 * 1536
    with pytest.raises(UserError, match=r"^--teacher 70Q: not a size like 70B or a model directory$"):
        memory.model_shape("70Q", flag="--teacher")


@pytest.mark.parametrize("size, gpus_per_node, nodes", [("7B", 8, 1), ("7B", 8, 4), ("1.5B", 8, 2), ("70B", 4, 3)])
@pytest.mark.parametrize("offload_optimizer", [False, True])
def test_student_states_agree_with_deepspeed(monkeypatch, size, gpus_per_node, nodes, offload_optimizer):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = memory.model_shape(size)
    gpu, cpu = memory.student_states(shape.params, shape.largest_layer_params, gpus_per_node, nodes,
                                     offload_optimizer)
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.params, shape.largest_layer_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        cpu_offload=offload_optimizer, cpu_offload_params=False, zero_init=True, additional_buffer_factor=1.5)
    assert gpu == pytest.approx(ds_gpu, rel=0.01)
    assert cpu == pytest.approx(ds_cpu, rel=0.01)


def plan_70b_to_7b(nodes: int) -> list[memory.Row]:
    return memory.plan(memory.model_shape("7B"), memory.model_shape("70B"), nodes=nodes, gpus_per_node=8,
                       gpu_mem_bytes=80 * GB, cpu_mem_bytes=10**12, seq_len=4096, micro_batch=1)


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_70b_teacher_7b_student(nodes):
    rows = plan_70b_to_7b(nodes)
    by_key = {(row.placement, row.optimizer): row for row in rows}
    assert len(by_key) == 8
    world = 8 * nodes
    teacher = memory.model_shape("70B")
    live_layers = 2 * 2 * teacher.largest_layer_params
    resident = by_key["resident", "gpu"]
    # 140 GB of bf16 teacher params over the ranks (17.5 GB each on one node) + two gathered layers.
    assert resident.teacher_gpu_bytes == 140 * GB // world + live_layers
    if nodes == 1:
        assert resident.teacher_gpu_bytes - live_layers == 17.5 * GB
    # Offloaded teachers keep only the gathered layers on the GPU; their params live per node.
    assert by_key["cpu", "gpu"].teacher_gpu_bytes == live_layers
    assert by_key["cpu", "gpu"].cpu_per_node_bytes - by_key["resident", "gpu"].cpu_per_node_bytes == 140 * GB // nodes
    # Offloading the optimizer moves 16 of the 18 bytes/param off the GPU.
    assert resident.student_gpu_bytes - by_key["resident", "cpu"].student_gpu_bytes == 16 * 7 * GB // world
    # 140 GB in 80% of 80 GB -> 3 dedicated teacher GPUs of 46.7 GB each.
    dedicated = by_key["dedicated", "gpu"]
    assert dedicated.teacher_gpus == 3 and dedicated.teacher_gpu_bytes == pytest.approx(140 * GB / 3, abs=1)
    # The totals add up and every figure is positive.
    for row in rows:
        assert min(row.student_gpu_bytes, row.teacher_gpu_bytes, row.activations_gpu_bytes) > 0
        if row.placement != "dedicated":
            assert row.total_gpu_bytes == row.student_gpu_bytes + row.teacher_gpu_bytes + row.activations_gpu_bytes
    # On 8 x 80 GB a resident sharded 70B teacher already fits next to the 7B student: it is recommended.
    assert all(row.fits for row in rows)
    assert memory.recommend(rows) is resident
    # More nodes: less per GPU.
    if nodes > 1:
        fewer_nodes = {(row.placement, row.optimizer): row for row in plan_70b_to_7b(nodes // 2)}
        assert resident.total_gpu_bytes < fewer_nodes["resident", "gpu"].total_gpu_bytes


def test_what_does_not_fit_is_said():
    # 2 x 24 GB GPUs: the resident teacher (70 GB each) cannot fit; the offloaded one can.
    rows = memory.plan(memory.model_shape("1.5B"), memory.model_shape("70B"), nodes=1, gpus_per_node=2,
                       gpu_mem_bytes=24 * GB, cpu_mem_bytes=10**12, seq_len=1024, micro_batch=1)
    by_key = {(row.placement, row.optimizer): row for row in rows}
    assert not by_key["resident", "gpu"].fits and not by_key["resident", "cpu"].fits
    assert not by_key["dedicated", "gpu"].fits  # the teacher alone needs 8 such GPUs
    assert memory.recommend(rows).placement == "cpu"
    # And with too little CPU memory for the offloaded teacher, NVMe is what is left.
    rows = memory.plan(memory.model_shape("1.5B"), memory.model_shape("70B"), nodes=1, gpus_per_node=2,
                       gpu_mem_bytes=24 * GB, cpu_mem_bytes=100 * GB, seq_len=1024, micro_batch=1)
    assert memory.recommend(rows).placement == "nvme"


def test_activations_grow_with_the_batch():
    student, teacher = memory.model_shape("7B"), memory.model_shape("70B")
    one = memory.activations(student, teacher, seq_len=4096, micro_batch=1, fused=False)
    two = memory.activations(student, teacher, seq_len=4096, micro_batch=2, fused=False)
    loss_chunk = 2**25 * 4 * 4
    assert two - loss_chunk == 2 * (one - loss_chunk)
    # Three [B, L, V] bf16 tensors (student logits, their grad, teacher logits) dominate.
    assert one > 3 * 4096 * 152064 * 2


def test_long_traces_fused_and_split():
    """At 32k tokens the whole-logits path needs three [32k, V] tensors; fused, only tiles and
    the output weights stay; S = 2 halves what grows with the length."""
    student, teacher = memory.model_shape("Qwen/Qwen3-1.7B"), memory.model_shape("Qwen/Qwen3-8B")
    whole = memory.activations(student, teacher, seq_len=32768, micro_batch=1, fused=False)
    fused = memory.activations(student, teacher, seq_len=32768, micro_batch=1)
    split = memory.activations(student, teacher, seq_len=32768, micro_batch=1, sequence_parallel=2)
    logits = 3 * 32768 * 151936 * 2  # student logits, their gradient, teacher logits, bf16
    assert whole > logits and whole - fused > 0.85 * logits  # less the weights and hidden rows it keeps
    fixed = memory.activations(student, teacher, seq_len=2, micro_batch=1)  # the tiles and the weights
    assert split - fixed == pytest.approx((fused - fixed) / 2, rel=0.01)
    # Scoring only a 30k-token response of the 32k: less of the output side.
    assert memory.activations(student, teacher, seq_len=32768, micro_batch=1, response_len=30000) < fused


def test_a_model_directory_counts_its_parameters(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    expected = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    shape = memory.model_shape(str(tmp_path), flag="--student")
    assert (shape.params, shape.hidden, shape.layers, shape.vocab) == (expected, 64, 3, 320)
    assert shape.largest_layer_params == 320 * 64  # the embedding (and the untied lm_head)


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="--student .*config.json"):
        memory.model_shape(str(tmp_path), flag="--student")


def test_cli_prints_a_table(capsys):
    code = cli.main(["plan", "--teacher", "70B", "--student", "7B", "--nodes", "1", "--gpus-per-node", "8",
                     "--gpu-mem", "80GB", "--seq-len", "4096", "--micro-batch", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| resident | gpu |" in out and "| nvme | cpu |" in out and "| dedicated (3 GPUs) | gpu |" in out
    assert "recommended: resident teacher" in out


@pytest.mark.parametrize("flags, message", [
    (["--teacher", "70Q", "--student", "7B"], "--teacher 70Q: not a size like 70B or a model directory"),
    (["--teacher", "70B", "--student", "7B", "--gpu-mem", "80"], "--gpu-mem 80: not a memory size"),
    (["--teacher", "70B", "--student", "7B", "--nodes", "0"], "--nodes must be >= 1"),
])
def test_cli_bad_input_is_one_line(capsys, flags, message):
    code = cli.main(["plan", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [err] and err.startswith(f"paced-ds: error: {message}")
