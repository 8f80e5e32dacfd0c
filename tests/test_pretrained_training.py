"""Fine-tuning LTX-Video, Wan 2.2 A14B, HunyuanVideo and CogVideoX with Tessera's trainer, on real
process groups (torchrun, gloo, 2 CPU ranks), from tiny random pipeline folders saved with
diffusers' `save_pretrained` (Wan 2.1 and 2.2 TI2V: tests/test_wan_training.py, which runs the
same adapter):

- LoRA on LTX-Video (with given frames: conditioning=mixed), on HunyuanVideo and on both Wan 2.2
  I2V A14B experts (shown first, and first and last, images as channels), full fine-tuning of
  both A14B experts and of CogVideoX, each with FSDP2 on 2 ranks (and ZeRO-2 for LTX-Video and
  A14B), match one process with the same global batch step by step; an A14B run stopped and
  resumed (FSDP2) continues bit for bit; under LoRA the checkpoints hold only the adapters;
- the exports load in the families' own diffusers pipelines, which run on the CPU to a video:
  the LoRAs through the pipelines' load_lora_weights (I2V A14B's into WanImageToVideoPipeline,
  from an image), A14B's two experts as WanPipeline's transformer and transformer_2,
  CogVideoX's transformer in CogVideoXPipeline;
- the sampling command makes an i2v mp4 from the fine-tuned LTX-Video and i2v and connect mp4s
  from the I2V A14B, and refuses i2v for a family with one time per sample and t2v for I2V A14B.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import (
    CogVideoXPipeline,
    HunyuanVideoPipeline,
    LTXPipeline,
    WanImageToVideoPipeline,
    WanPipeline,
)
from family_models import (
    a14b_overrides,
    cogvideox_overrides,
    hunyuan_overrides,
    ltx_overrides,
    save_tiny_a14b,
    save_tiny_wan_i2v_a14b,
    tiny_cogvideox_pipeline,
    tiny_hunyuan_pipeline,
    tiny_ltx_pipeline,
)
from hydra import compose, initialize_config_dir
from launching import (
    ROOT,
    assert_runs_match_step_by_step,
    launch_training,
    step_losses,
    torchrun,
)
from PIL import Image
from safetensors.torch import load_file

from data.mp4 import write_mp4
from train.__main__ import run
from train.config import register_configs, to_config
from train.sample import main as sample_main

register_configs()
STEPS = 6
# family -> (its overrides, the fine-tune's settings, the 2-rank layouts it runs besides 1 process)
FAMILIES = {
    # LoRA with given frames: LTX-Video takes one time per token.
    "ltx_lora": (ltx_overrides, ["conditioning=mixed", "lora.rank=4", "lora.alpha=8"],
                 ("fsdp", "zero2")),
    # Both experts train; each sample's time picks one, so on 2 ranks an expert may have no
    # sample on one rank while it has on the other.
    "a14b_full": (a14b_overrides, ["buckets.token_budget=120"], ("fsdp", "zero2")),
    # LoRA on both I2V experts, shown a first image (and for some clips a last one) as channels.
    "a14b_i2v_lora": (partial(a14b_overrides, experiment="wan_i2v_finetune"),
                      ["buckets.token_budget=120", "lora.rank=4", "lora.alpha=8",
                       "conditioning.i2v=0.5", "conditioning.connect=0.5"], ("fsdp",)),
    # (the engines' LoRA and full paths are the family's adapter plus the same code: ZeRO-2 runs
    # for one family of each kind above)
    "hunyuan_lora": (hunyuan_overrides, ["lora.rank=4", "lora.alpha=8"], ("fsdp",)),
    "cogvideox_full": (cogvideox_overrides, [], ("fsdp",)),
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    for name, build in [("LTX", tiny_ltx_pipeline), ("Hunyuan", tiny_hunyuan_pipeline),
                        ("CogVideoX", tiny_cogvideox_pipeline)]:  # fmt: skip
        build().save_pretrained(root / f"{name}-tiny")
    return {
        "ltx_lora": root / "LTX-tiny",
        "a14b_full": save_tiny_a14b(root / "A14B-tiny"),
        "a14b_i2v_lora": save_tiny_wan_i2v_a14b(root / "A14B-I2V-tiny"),
        "hunyuan_lora": root / "Hunyuan-tiny",
        "cogvideox_full": root / "CogVideoX-tiny",
    }


def overrides(family: str, folder: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    family_overrides, settings, _ = FAMILIES[family]
    return [
        *family_overrides(folder),
        *settings,
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "train.keep_last=10",
        "train.sample_prompts=[]",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "logger=none",
        *extra,
    ]


@pytest.fixture(scope="module")
def fine_tunes(folders, demo_shards, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Each fine-tune in this process (two micro-batches a step) and on 2 ranks (one each)."""
    runs: dict[str, dict[str, Path]] = {}
    for family, folder in folders.items():
        single = tmp_path_factory.mktemp(f"{family}_none")
        args = overrides(family, folder, demo_shards, single, "train.grad_accum=2")
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            run(to_config(compose("config", overrides=args)))
        runs[family] = {"none x1": single}
        for backend in FAMILIES[family][2]:
            run_dir = tmp_path_factory.mktemp(f"{family}_{backend}")
            launch_training(*overrides(family, folder, demo_shards, run_dir, f"parallel={backend}"))
            runs[family][f"{backend} x2"] = run_dir
    return runs


@pytest.mark.multiprocess
@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tunes_on_two_ranks_match_one_process_step_by_step(family, fine_tunes):
    assert_runs_match_step_by_step(family, fine_tunes[family], STEPS)
    # Under LoRA a checkpoint holds the adapters only; a full fine-tune, every weight.
    single = fine_tunes[family]["none x1"] / "checkpoints" / "step_00000006" / "model.safetensors"
    assert all(".lora_" in name for name in load_file(single)) == family.endswith("_lora")


@pytest.mark.multiprocess
def test_a14b_stop_and_resume_is_bitwise_identical(fine_tunes, folders, demo_shards, tmp_path):
    straight = fine_tunes["a14b_full"]["fsdp x2"]
    shutil.copytree(
        straight / "checkpoints" / "step_00000003", tmp_path / "checkpoints" / "step_00000003"
    )
    args = overrides("a14b_full", folders["a14b_full"], demo_shards, tmp_path, "parallel=fsdp")
    result = launch_training(*args)
    assert "resumed from step 3" in result.stdout + result.stderr
    expected, resumed = step_losses(straight)[3:], step_losses(tmp_path)
    print(f"\nA14B fsdp steps 4-6 straight {expected}\nresumed at 3 {resumed}")
    assert resumed == expected
    for expert in ("transformer", "transformer_2"):
        first, second = (
            load_file(run / "export" / expert / "diffusion_pytorch_model.safetensors")
            for run in (straight, tmp_path)
        )
        assert first.keys() == second.keys() and all(
            torch.equal(first[k], second[k]) for k in first
        )


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("family", "layout", "nproc"),
    [
        ("ltx_video", "sp=2", 2),
        ("ltx_video", "cp=2,sp=2", 4),
        ("hunyuan_video", "sp=2", 2),
        ("cogvideox", "sp=2", 2),
    ],
)
def test_split_over_ranks_matches_one_rank(family, layout, nproc, tmp_path):
    """LTX-Video's tokens and per-token times split over Ulysses (sp) and the ring (cp), with a
    given first frame; HunyuanVideo's and CogVideoX's video tokens over Ulysses, their captions
    on every rank: the loss and gradients of one rank."""
    torchrun(str(ROOT / "tests" / "parallel_worker.py"), f"sequence_{family}", "fsdp",
             str(tmp_path), layout, nproc=nproc)  # fmt: skip
    for rank in range(nproc):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(f"{family} {layout} rank {rank}", result)
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
        assert result["engine_vs_reference"] <= 1e-5 * result["max_grad"]


def video(pipe, output_type: str = "pt", **size) -> torch.Tensor:
    return pipe(
        prompt="a rabbit",
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        **size,
    ).frames


@pytest.mark.multiprocess
def test_exports_run_in_the_families_own_pipelines(fine_tunes, folders, tmp_path):
    ltx = LTXPipeline.from_pretrained(folders["ltx_lora"])
    size = {"height": 64, "width": 64, "num_frames": 9, "max_sequence_length": 16}
    plain = video(ltx, **size)
    ltx.load_lora_weights(fine_tunes["ltx_lora"]["fsdp x2"] / "export" / "lora")
    adapted = video(ltx, **size)
    print(f"\nLTX-Video: the trained LoRA changes the video by {(adapted - plain).abs().max():.3g}")
    assert adapted.shape == plain.shape == (1, 9, 3, 64, 64) and torch.isfinite(adapted).all()
    assert (adapted - plain).abs().max() > 1e-4

    # A14B: the exported experts replace the pipeline's, boundary and all.
    pipeline = shutil.copytree(folders["a14b_full"], tmp_path / "A14B-trained")
    for expert in ("transformer", "transformer_2"):
        shutil.rmtree(pipeline / expert)
        shutil.copytree(fine_tunes["a14b_full"]["zero2 x2"] / "export" / expert, pipeline / expert)
    wan = WanPipeline.from_pretrained(pipeline)
    assert wan.config.boundary_ratio == 0.875
    frames = video(wan, height=32, width=32, num_frames=5)
    assert frames.shape == (1, 5, 3, 32, 32) and torch.isfinite(frames).all()

    hunyuan = HunyuanVideoPipeline.from_pretrained(folders["hunyuan_lora"])
    hunyuan.load_lora_weights(fine_tunes["hunyuan_lora"]["fsdp x2"] / "export" / "lora")
    frames = video(hunyuan, height=32, width=32, num_frames=5, max_sequence_length=16)
    assert frames.shape == (1, 5, 3, 32, 32) and torch.isfinite(frames).all()

    pipeline = shutil.copytree(folders["cogvideox_full"], tmp_path / "CogVideoX-trained")
    shutil.rmtree(pipeline / "transformer")
    exported = fine_tunes["cogvideox_full"]["fsdp x2"] / "export" / "transformer"
    shutil.copytree(exported, pipeline / "transformer")
    cogvideox = CogVideoXPipeline.from_pretrained(pipeline)
    frames = video(cogvideox, height=32, width=32, num_frames=5, max_sequence_length=16)
    # (its VAE decodes a latent frame to four pixel frames, the first one too)
    assert frames.shape == (1, 8, 3, 32, 32) and torch.isfinite(frames).all()


@pytest.mark.multiprocess
def test_the_i2v_a14b_lora_runs_in_its_pipeline_and_the_sampler(fine_tunes, folders, tmp_path):
    """Both experts' adapters load into WanImageToVideoPipeline and change its video of an image;
    the sampling command makes i2v and first-and-last-frame videos from the run, and refuses t2v."""
    rng = np.random.default_rng(0)
    first, last = (Image.fromarray(rng.integers(0, 255, (32, 48, 3), np.uint8)) for _ in "ab")
    pipe = WanImageToVideoPipeline.from_pretrained(folders["a14b_i2v_lora"])
    size = {"image": first, "height": 32, "width": 48, "num_frames": 9}
    plain = video(pipe, **size, output_type="latent")
    lora = fine_tunes["a14b_i2v_lora"]["fsdp x2"] / "export" / "lora"
    pipe.load_lora_weights(lora)
    pipe.load_lora_weights(lora / "transformer_2", load_into_transformer_2=True)
    adapted = video(pipe, **size, output_type="latent")
    # (the tiny autoencoder decodes to nearly flat frames: the change is measured on latents)
    change = (adapted - plain).abs().max()
    print(f"\nWan I2V A14B: the trained LoRAs change the latents by up to {change:.3g}")
    assert change > 1e-3
    frames = video(pipe, **size)
    assert frames.shape == (1, 9, 3, 32, 48) and torch.isfinite(frames).all()

    first.save(tmp_path / "first.png")
    run = fine_tunes["a14b_i2v_lora"]["none x1"]
    common = [f"checkpoint={run}", "height=32", "width=48", "steps=2", "fps=8"]
    sample_main([*common, "mode=i2v", f"image={tmp_path / 'first.png'}", "frames=9",
                 f"out={tmp_path / 'i2v.mp4'}"])  # fmt: skip
    with av.open(str(tmp_path / "i2v.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    # connect: the first clip's last frame and the second's first end a window of 1 + 4 x 2
    # frames (1 s at 8 fps makes two new latent frames), which joins the clips.
    clips = [rng.integers(0, 255, (5, 32, 64, 3), np.uint8) for _ in "ab"]  # cropped to 48
    for name, clip in zip("ab", clips, strict=True):
        write_mp4(tmp_path / f"{name}.mp4", clip, 8.0)
    sample_main([*common, "mode=connect", f"video={tmp_path / 'a.mp4'}", "seconds=1",
                 f"video2={tmp_path / 'b.mp4'}", f"out={tmp_path / 'connect.mp4'}"])  # fmt: skip
    with av.open(str(tmp_path / "connect.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4 + 9 + 4
    with pytest.raises(ValueError, match="mode=t2v: model.pretrained.family=wan2.2_i2v_a14b"):
        sample_main([*common, "mode=t2v", f"out={tmp_path / 'refused.mp4'}"])


@pytest.mark.multiprocess
def test_the_sampler_makes_an_i2v_video_from_the_fine_tuned_ltx(fine_tunes, tmp_path):
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)).save(image)
    out = tmp_path / "i2v.mp4"
    run = fine_tunes["ltx_lora"]["none x1"]
    sample_main([f"checkpoint={run}", "mode=i2v", f"image={image}", "frames=9", "height=64",
                 "width=96", "steps=2", f"out={out}"])  # fmt: skip
    assert out.is_file() and out.stat().st_size > 0
    # CogVideoX: t2v makes the frames asked (its VAE decodes pairs of latent frames to 8), and
    # i2v is refused before any work, naming the family (one time per sample).
    cogvideox = fine_tunes["cogvideox_full"]["none x1"]
    common = [f"checkpoint={cogvideox}", "frames=5", "height=32", "width=32", "steps=2"]
    sample_main([*common, "mode=t2v", f"out={tmp_path / 't2v.mp4'}"])
    with av.open(str(tmp_path / "t2v.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    with pytest.raises(ValueError, match="mode=i2v keeps given frames clean, which .*cogvideox"):
        sample_main([*common, "mode=i2v", f"image={image}", f"out={tmp_path / 'refused.mp4'}"])
