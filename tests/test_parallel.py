"""Distributed training on real process groups (torchrun, gloo, 2 CPU ranks).

- ddp, fsdp (full and hybrid sharding), zero2 and zero3 train the tiny DiT for 20 steps from the same weights and data and
  match a single-process run with the same global batch, step by step;
- ranks holding batches of different buckets and sizes get the gradient of the global batch mean;
- ring attention over 2 and 3 ranks gives one process's attention and gradients, dense and
  packed, with either block kernel;
- Ulysses sequence parallelism (sp=2), ring attention (cp=2) and both (cp=2 x sp=2 on 4 ranks)
  give the loss and gradients of one rank, for one sample and for a packed sequence of samples
  of different shapes, also when activation checkpointing recomputes the blocks;
- activation checkpointing and per-block compile change no numbers;
- the DeepSpeed JSON is generated from the run's config, and a user JSON overrides it;
- impossible settings fail, naming the key, before training starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from launching import (
    PACKED,
    ROOT,
    assert_runs_match_step_by_step,
    launch_training,
    step_losses,
    torchrun,
)
from models import perturbed_tiny_dit

from model.dit import DiT
from train.__main__ import run
from train.checkpoint import find_weights
from train.config import OptimConfig, ParallelConfig, register_configs, to_config
from train.parallel import ParallelDims
from train.parallel.parallelize import apply_activation_checkpointing
from train.parallel.zero import deepspeed_config

register_configs()


def train_overrides(shards: Path, run_dir: Path) -> list[str]:
    return [
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        "train.steps=12",
        "train.log_every=1",
        "train.checkpoint_every=12",
        "train.sample_prompts=[]",
        "train.ema_decay=0.9",
        "optim.lr=2e-3",
        "optim.warmup_steps=2",
        "logger=none",
    ]


@pytest.mark.multiprocess
def test_every_backend_matches_a_single_process_run_step_by_step(demo_shards, tmp_path):
    # One process drawing both micro-batches of a step = two ranks drawing one each.
    single = tmp_path / "none"
    launch_training(*train_overrides(demo_shards, single), "train.grad_accum=2", nproc=1)
    runs = {"none x1": single}
    layouts = {
        "ddp": ["parallel=ddp"],
        "fsdp": ["parallel=fsdp"],
        "hsdp": ["parallel=fsdp", "parallel.dp_replicate=2", "parallel.dp_shard=1"],
        "zero2": ["parallel=zero2"],
        "zero3": ["parallel=zero3"],
    }
    for backend, parallel in layouts.items():
        run_dir = runs[f"{backend} x2"] = tmp_path / backend
        launch_training(*train_overrides(demo_shards, run_dir), *parallel)
        assert find_weights(run_dir / "checkpoints" / "step_00000012").kind == "ema"
        assert (run_dir / "export" / "model.safetensors").exists()
    assert_runs_match_step_by_step("every backend", runs, 12)


@pytest.mark.multiprocess
def test_packed_training_on_two_ranks_matches_one_process_step_by_step(demo_shards, tmp_path):
    """Native-size packs (per-sample shapes, times and given frames) under FSDP2 and ZeRO-2 on
    two ranks match one process drawing both ranks' packs of every step."""
    steps = ("train.steps=6", "train.checkpoint_every=6", *PACKED)
    single = tmp_path / "none"
    launch_training(*train_overrides(demo_shards, single), *steps, "train.grad_accum=2", nproc=1)
    reference = torch.tensor(step_losses(single), dtype=torch.float64)
    assert len(reference) == 6
    for backend in ("fsdp", "zero2"):
        run_dir = tmp_path / backend
        launch_training(*train_overrides(demo_shards, run_dir), *steps, f"parallel={backend}")
        losses = torch.tensor(step_losses(run_dir), dtype=torch.float64)
        print(f"\n{backend} x2: {losses.tolist()}\nnone x1:  {reference.tolist()}")
        relative = (losses - reference).abs() / reference
        assert relative.max() < 1e-4, f"{backend}: worst relative loss difference {relative.max()}"


def gradient_check(
    check: str, backend: str, tmp_path: Path, layout: str = "sp=2", nproc: int = 2
) -> list[dict]:
    worker = str(ROOT / "tests" / "parallel_worker.py")
    torchrun(worker, check, backend, str(tmp_path), layout, nproc=nproc)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_ranks_with_different_buckets_get_the_global_batch_gradient(backend, tmp_path):
    for result in gradient_check("buckets", backend, tmp_path):
        print(backend, result)
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
        assert result["engine_vs_reference"] <= 1e-5 * result["max_grad"]
        # Averaging each rank's own mean (3 samples vs 1) is measurably wrong.
        assert result["per_rank_mean_vs_reference"] > 1e-2 * result["max_grad"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("kernel", "nproc"), [("fused", 3), ("exact", 2)])
def test_ring_attention_equals_one_process_attention(kernel, nproc, tmp_path):
    torchrun(str(ROOT / "tests" / "ring_worker.py"), kernel, str(tmp_path), nproc=nproc)
    for rank in range(nproc):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(kernel, rank, result)
        for case, differences in result.items():
            assert max(differences) <= 1e-5, (case, differences)  # output, dq, dk, dv


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("layout", "nproc", "backend"),
    [
        ("sp=2", 2, "ddp"),
        ("sp=2", 2, "fsdp"),
        ("cp=2", 2, "fsdp"),
        ("cp=2,sp=2", 4, "fsdp"),
        ("cp=2,activation_checkpointing=full", 2, "fsdp"),
    ],
)
@pytest.mark.parametrize("check", ["sequence", "sequence_packed"])
def test_sequence_parallel_matches_one_rank_in_loss_and_gradients(
    check, layout, nproc, backend, tmp_path
):
    for result in gradient_check(check, backend, tmp_path, layout, nproc):
        print(check, backend, layout, result)
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
        assert result["engine_vs_reference"] <= 1e-5 * result["max_grad"]


def _tiny_dit_gradients(model: DiT) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, 4, 6, generator=generator)
    t = torch.rand(2, 3, generator=generator)
    text = torch.randn(2, 5, 8, generator=generator)
    model(x, t, text, torch.ones(2, 5, dtype=torch.bool)).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _opened_tiny_dit() -> DiT:
    return perturbed_tiny_dit(in_channels=3, text_dim=8, scale=0.02)


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_keeps_names_and_gradients(every):
    plain = _opened_tiny_dit()
    checkpointed = _opened_tiny_dit()
    apply_activation_checkpointing(checkpointed, every)
    assert [n for n, _ in plain.named_parameters()] == [
        n for n, _ in checkpointed.named_parameters()
    ]
    expected, got = _tiny_dit_gradients(plain), _tiny_dit_gradients(checkpointed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_gradients():
    plain, compiled = _opened_tiny_dit(), _opened_tiny_dit()
    # The compile parallel.compile=true applies on CUDA (train/compile.py refuses it on a CPU).
    for block in compiled.blocks:
        block.compile(dynamic=False)
    expected, got = _tiny_dit_gradients(plain), _tiny_dit_gradients(compiled)
    assert [n for n, _ in plain.named_parameters()] == list(got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_deepspeed_config_follows_the_run_and_a_user_json_overrides_it(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "bf16": {}}))
    parallel = ParallelConfig(backend="zero3", deepspeed_config=str(user))
    dims = ParallelDims.resolve(parallel, 4)
    optim = OptimConfig(lr=1e-3, grad_clip=0.5, weight_decay=0.1)
    generated = deepspeed_config(parallel, optim, dims, grad_accum=3, param_dtype=torch.bfloat16)
    assert generated["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert generated["train_batch_size"] == 3 * 4 and generated["gradient_clipping"] == 0.5
    assert generated["optimizer"]["params"]["weight_decay"] == 0.1
    assert generated["bf16"] == {"enabled": True}
    user.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"parallel.deepspeed_config={user}: must hold a JSON"):
        deepspeed_config(parallel, optim, dims, 1, None)


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize(
    ("settings", "world_size", "message"),
    [
        ({"backend": "fsdp", "dp_shard": 3}, 2, "must equal the world size 2"),
        ({"backend": "fsdp", "dp_shard": -1, "sp": 3}, 4, "not divisible"),
        ({"backend": "zero2", "sp": 2}, 2, "parallel.sp=2 is not supported"),
        ({"backend": "zero3", "cp": 2}, 2, "parallel.cp=2 is not supported"),
        (
            {"backend": "fsdp", "dp_shard": 1, "cp": 2, "sp": 2},
            2,
            "dp_replicate 1 x dp_shard 1 x cp 2 x sp 2 = 4 must equal the world size 2",
        ),
        ({"backend": "zero2", "zero_offload": "params"}, 2, "parallel.zero_offload=params"),
        ({"backend": "ddp", "dp_replicate": 2}, 2, "hybrid sharding"),
        ({"backend": "none"}, 2, "WORLD_SIZE=2"),
        ({"backend": "fsdp", "dp_shard": -1, "dp_replicate": -1}, 2, "at most one -1"),
    ],
)
def test_impossible_degrees_are_refused_with_the_key(settings, world_size, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims.resolve(ParallelConfig(**settings), world_size)


def test_degrees_are_inferred_and_hybrid_sharding_resolves():
    dims = ParallelDims.resolve(ParallelConfig(backend="fsdp", dp_replicate=2, sp=2), 16)
    assert (dims.dp_replicate, dims.dp_shard, dims.sp, dims.dp_size) == (2, 4, 2, 8)
    dims.rank = 5
    assert (dims.dp_rank, dims.sequence_rank) == (2, 1)


def test_sp_must_divide_the_heads():
    dims = ParallelDims.resolve(ParallelConfig(backend="fsdp", sp=3), 6)
    with pytest.raises(ValueError, match="parallel.sp=3 must divide the DiT's 4 attention heads"):
        dims.check_model(num_heads=4)


def test_impossible_settings_fail_before_any_work(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    bad = config(
        f"data.shards={demo_shards}",
        f"train.run_dir={run_dir}",
        "parallel=zero2",
        "parallel.zero_offload=params",
        "logger=none",
    )
    with pytest.raises(ValueError, match="parallel.zero_offload=params needs parameter partition"):
        run(bad)
    assert not run_dir.exists() and not torch.distributed.is_initialized()


def test_a_bucket_the_ring_cannot_split_fails_before_any_process_group(
    demo_shards, tmp_path, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    run_dir = tmp_path / "run"
    settings = [f"data.shards={demo_shards}", f"train.run_dir={run_dir}", "logger=none"]
    with pytest.raises(ValueError, match=r"bucket \[\d+, \d+, \d+\] holds \d*[13579] tokens"):
        run(config(*settings, "experiment=demo", "parallel=fsdp", "parallel.cp=2"))
    assert not run_dir.exists() and not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["packing.sequence_tokens=256", "packing.max_tokens_per_sample=512"],
            "packing.max_tokens_per_sample=512 is above packing.sequence_tokens=256",
        ),
        (["packing.max_frames=0"], r"packing.max_frames=0 is outside its range \[1, inf\)"),
        (
            ["packing.max_frames=65", "packing.max_tokens_per_sample=8"],
            r"packing.max_tokens_per_sample=8 rounds a clip of packing.max_frames=65",
        ),
        (
            [
                "parallel.sp=2",
                "packing.sequence_tokens=481",
                "packing.max_tokens_per_sample=240",
            ],
            "packing.sequence_tokens=481 holds 481 tokens, which do not split into "
            r"parallel.cp=1 x parallel.sp=2 = 2 equal chunks",
        ),
        (
            ["parallel.cp=2", "packing.sequence_tokens=239", "packing.max_tokens_per_sample=200"],
            "packing.sequence_tokens=239 holds 239 tokens, which do not split into "
            r"parallel.cp=2 x parallel.sp=1 = 2 equal chunks of at least one token",
        ),
        (["model=wan2.1_t2v_1.3b"], "cannot be combined with a pretrained model"),
    ],
)
def test_bad_packing_settings_fail_before_any_process_group(
    settings, message, demo_shards, tmp_path, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would start it, without a peer
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run(
            config(
                f"data.shards={demo_shards}",
                f"train.run_dir={run_dir}",
                "packing.enabled=true",
                "parallel=fsdp",
                "logger=none",
                *settings,
            )
        )
    assert not run_dir.exists() and not torch.distributed.is_initialized()
