"""Fine-tuning a pretrained Wan model with Tessera's trainer, on real process groups (torchrun,
gloo, 2 CPU ranks), from a tiny random Wan pipeline folder saved with diffusers' `save_pretrained`:

- full fine-tuning and LoRA run with FSDP2 on 2 ranks and match one process with the same
  global batch step by step (LoRA's FSDP run with optimizer offload to the host and activation
  checkpointing; ZeRO-2 runs the same adapter for other families in
  tests/test_pretrained_training.py); LoRA checkpoints hold only the adapters;
- a LoRA run stopped and resumed (FSDP) gives the same losses and adapters, bit for bit;
- Ulysses sequence parallelism (sp=2), ring attention (cp=2, also with activation
  checkpointing) and both (cp=2 x sp=2 on 4 ranks) give the loss and gradients of one rank for
  Wan 2.1 T2V; sp=2 and cp=2 x sp=2 for Wan 2.2 TI2V (per-token times, a given first frame) and
  cp=2 x sp=2 for Wan 2.2 A14B and I2V A14B (both experts split; I2V's condition channels go in
  before the split);
- the sampling command makes an mp4 from the fine-tuned model: t2v, and i2v for TI2V.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from launching import ROOT, assert_runs_match_step_by_step, launch_training, step_losses, torchrun
from PIL import Image
from safetensors.torch import load_file
from wan_models import save_tiny_pipeline, wan_overrides

from train.__main__ import run
from train.config import register_configs, to_config
from train.sample import main as sample_main

register_configs()
STEPS = 6


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("wan") / "Wan-tiny-Diffusers")


def overrides(experiment: str, pipeline: Path, shards: Path, run_dir: Path, *extra: str):
    return [
        f"experiment={experiment}",
        *wan_overrides(pipeline),
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "train.keep_last=10",
        "train.sample_prompts=[]",
        "optim.warmup_steps=2",
        "logger=none",
        *extra,
    ]


FINE_TUNES = {
    "full": ["optim.lr=1e-3"],
    "lora": ["optim.lr=1e-2", "lora.rank=4", "lora.alpha=8"],
}
# LoRA's FSDP run also takes the memory switches of a 14B fine-tune (host-offloaded optimizer,
# activation checkpointing): they must change no number.
FSDP = {
    "full": ["parallel=fsdp"],
    "lora": [
        "parallel=fsdp",
        "parallel.cpu_offload=true",
        "parallel.activation_checkpointing=full",
    ],
}


@pytest.fixture(scope="module")
def fine_tunes(pipeline, demo_shards, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Each fine-tune in one process (two micro-batches a step) and on 2 ranks (one each)."""
    runs: dict[str, dict[str, Path]] = {}
    for kind, settings in FINE_TUNES.items():
        experiment = "wan_finetune" if kind == "full" else "wan_lora"
        runs[kind] = {}
        for layout, extra, nproc in [
            ("none x1", ["train.grad_accum=2"], 1),
            ("fsdp x2", FSDP[kind], 2),
        ]:
            run_dir = tmp_path_factory.mktemp(f"{kind}_{layout.split()[0]}")
            args = overrides(experiment, pipeline, demo_shards, run_dir, *settings, *extra)
            launch_training(*args, nproc=nproc)
            runs[kind][layout] = run_dir
    return runs


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fine_tunes_on_two_ranks_match_one_process_step_by_step(kind, fine_tunes):
    assert_runs_match_step_by_step(f"{kind} fine-tune", fine_tunes[kind], STEPS)

    for run_dir in fine_tunes[kind].values():
        exported = run_dir / "export"
        if kind == "full":  # the whole transformer, in diffusers' layout
            assert (exported / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
            continue
        lora = load_file(exported / "lora" / "pytorch_lora_weights.safetensors")
        assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    # A LoRA checkpoint holds the adapters, not the frozen base.
    single = fine_tunes[kind]["none x1"] / "checkpoints" / "step_00000006" / "model.safetensors"
    names = load_file(single).keys()
    assert all(".lora_" in name for name in names) == (kind == "lora")


@pytest.mark.multiprocess
def test_lora_stop_and_resume_is_bitwise_identical(fine_tunes, pipeline, demo_shards, tmp_path):
    straight = fine_tunes["lora"]["fsdp x2"]
    shutil.copytree(
        straight / "checkpoints" / "step_00000003", tmp_path / "checkpoints" / "step_00000003"
    )
    args = overrides("wan_lora", pipeline, demo_shards, tmp_path, *FINE_TUNES["lora"])
    result = launch_training(*args, *FSDP["lora"])
    assert "resumed from step 3" in result.stdout + result.stderr
    expected, resumed = step_losses(straight)[3:], step_losses(tmp_path)
    print(f"\nLoRA fsdp steps 4-6 straight {expected}\nresumed at 3 {resumed}")
    assert resumed == expected
    first, second = (load_file(r / "export" / "model.safetensors") for r in (straight, tmp_path))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


SEQUENCE_LAYOUTS = [
    ("sp=2", 2), ("cp=2", 2), ("cp=2,activation_checkpointing=full", 2), ("cp=2,sp=2", 4)
]  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("family", "layout", "nproc"),
    [("wan2.1", *layout) for layout in SEQUENCE_LAYOUTS]
    # TI2V also splits the per-token times (its ring and Ulysses are Wan 2.1's); A14B splits
    # both experts (one runs its sample, the other idles).
    + [
        ("wan2.2_ti2v", "sp=2", 2),
        ("wan2.2_ti2v", "cp=2,sp=2", 4),
        ("wan2.2_a14b", "cp=2,sp=2", 4),
        ("wan2.2_i2v_a14b", "cp=2,sp=2", 4),
    ],
)
def test_sequence_parallel_matches_one_rank(family, layout, nproc, tmp_path):
    worker = str(ROOT / "tests" / "parallel_worker.py")
    torchrun(worker, f"sequence_{family}", "fsdp", str(tmp_path), layout, nproc=nproc)
    for rank in range(nproc):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(f"{family} {layout} rank {rank}", result)
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
        assert result["engine_vs_reference"] <= 1e-5 * result["max_grad"]


def read_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.slow
def test_the_sampler_makes_videos_from_a_fine_tuned_tiny_wan(demo_shards, tmp_path):
    """Wan 2.2 TI2V fine-tuned (LoRA) for 2 steps; then t2v and i2v through the command."""
    pipeline = save_tiny_pipeline(tmp_path / "Wan-tiny-TI2V")
    args = overrides(
        "wan_lora", pipeline, demo_shards, tmp_path / "run", "lora.rank=4", "train.steps=2"
    )
    args = [
        a.replace("model.pretrained.family=wan2.1", "model.pretrained.family=wan2.2_ti2v")
        for a in args
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        losses = run(to_config(compose("config", overrides=args + ["conditioning=mixed"])))
    assert len(losses) == 2 and all(np.isfinite(losses))

    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), np.uint8)).save(image)
    common = [f"checkpoint={tmp_path / 'run'}", "frames=9", "height=32", "width=48", "steps=2"]
    for mode, extra in [("t2v", []), ("i2v", [f"image={image}"])]:
        out = tmp_path / f"{mode}.mp4"
        sample_main([*common, f"mode={mode}", f"out={out}", *extra])
        frames = read_frames(out)
        print(f"{mode}: {frames.shape}")
        assert frames.shape == (9, 32, 48, 3) and frames.std() > 0
