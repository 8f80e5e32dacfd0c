"""`python -m train.sample` from a checkpoint folder of every engine (none, DDP, FSDP, ZeRO-2,
ZeRO-3), with weights=raw and weights=ema: train/checkpoint.py finds and consolidates each
format's weights in one process, and the video is the export's wherever both hold the same
weights. A run with an EMA exports the EMA's weights; one without exports its raw weights. The
ecosystem's own tools read the sharded folders as they document: DeepSpeed's zero_to_fp32.py
beside the ZeRO files, torch's dcp_to_torch on FSDP's, giving the exported weights bit for bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from launching import launch_training
from safetensors.torch import load_file

from train.checkpoint import find_weights
from train.sample import main as sample_main

ENGINES = {  # name: (overrides, ranks, the checkpoint format it writes)
    "none": ([], 1, "full"),
    "ddp": (["parallel=ddp"], 2, "full"),
    "fsdp": (["parallel=fsdp"], 2, "sharded"),
    "zero2": (["parallel=zero2"], 2, "deepspeed"),
    "zero3": (["parallel=zero3"], 2, "deepspeed"),
}
STEP = Path("checkpoints") / "step_00000002"


def train(demo_shards: Path, autoencoder: Path, run_dir: Path, engine: str, ema: float) -> None:
    parallel, ranks, _ = ENGINES[engine]
    launch_training(
        "experiment=demo",
        f"data.shards={demo_shards}",
        f"autoencoder.checkpoint={autoencoder}",
        f"train.run_dir={run_dir}",
        "train.steps=2",
        "train.checkpoint_every=2",
        f"train.ema_decay={ema}",
        "optim.lr=1e-2",  # two steps that move the weights well away from the EMA's
        "train.sample_prompts=[]",
        "logger=none",
        *parallel,
        nproc=ranks,
    )


def video(folder: Path, weights: str, out: Path) -> np.ndarray:
    """The sampling command's frames from `folder` (seeded: the same weights, the same video)."""
    path = sample_main(
        [
            f"checkpoint={folder}",
            f"weights={weights}",
            "prompt=people riding bicycles",
            "frames=5",
            "height=32",
            "width=48",
            "steps=2",
            f"out={out}",
        ]
    )
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def consolidated_by_its_tool(step: Path, written: str, out: Path) -> dict[str, torch.Tensor]:
    """The raw weights the format's own tool makes of a step folder, run as documented."""
    out.mkdir()
    if written == "deepspeed":  # "folder in, folder out", from inside the checkpoint folder
        command = [sys.executable, "zero_to_fp32.py", ".", str(out)]
        subprocess.run(command, cwd=step, check=True, capture_output=True)
        return torch.load(out / "pytorch_model.bin", weights_only=True)
    tool = ["-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch"]
    subprocess.run([sys.executable, *tool, str(step / "dcp"), str(out / "model.pt")], check=True)
    return torch.load(out / "model.pt", weights_only=True)["model"]


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(name, marks=pytest.mark.multiprocess if ranks > 1 else pytest.mark.slow)
        for name, (_, ranks, _) in ENGINES.items()
    ],
)
def test_sampling_from_a_checkpoint_folder_matches_the_export(
    engine, demo_shards, autoencoder, tmp_path
):
    with_ema, without_ema = tmp_path / "with_ema", tmp_path / "without_ema"
    train(demo_shards, autoencoder, with_ema, engine, ema=0.9)
    train(demo_shards, autoencoder, without_ema, engine, ema=0.0)
    written = ENGINES[engine][2]
    assert find_weights(with_ema / STEP, "raw").format == written
    assert find_weights(without_ema / STEP, "ema").kind == "raw"  # it has no EMA to give

    exported_ema = video(with_ema / "export", "ema", tmp_path / "export_ema.mp4")
    assert np.array_equal(video(with_ema / STEP, "ema", tmp_path / "ema.mp4"), exported_ema)
    raw_beside_ema = video(with_ema / STEP, "raw", tmp_path / "raw_beside_ema.mp4")
    assert not np.array_equal(raw_beside_ema, exported_ema)  # two steps apart, not the same

    exported_raw = video(without_ema / "export", "raw", tmp_path / "export_raw.mp4")
    assert np.array_equal(video(without_ema / STEP, "raw", tmp_path / "raw.mp4"), exported_raw)
    # A run that kept no EMA gives its raw weights when the EMA's are asked for.
    assert np.array_equal(video(without_ema / STEP, "ema", tmp_path / "no_ema.mp4"), exported_raw)

    if written != "full":
        tool = consolidated_by_its_tool(without_ema / STEP, written, tmp_path / "tool")
        exported = load_file(without_ema / "export" / "model.safetensors")
        assert tool.keys() == exported.keys()
        assert all(torch.equal(tool[name], exported[name]) for name in exported)
