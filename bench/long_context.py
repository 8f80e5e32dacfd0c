"""Activation memory and step time per rank for one long sequence at cp=1, cp=2 and sp=2.

    python -m bench.long_context [--size small] [--frames 16] [--steps 4]

Launches one run per layout (cp=1: one process; cp=2 and sp=2: torchrun, 2 gloo ranks, DDP) that
trains the DiT on the same synthetic sample of `--frames` x 32 x 32 latents (256 tokens a frame)
and reports, for rank 0: the activation memory the forward pass saves for the backward (every
tensor autograd keeps, by storage, parameters left out), the bytes per token of the whole
sequence, and the step time (forward + backward, after the first step). Goal: activation memory
per rank at cp=2 <= 0.55x of cp=1.

From the measured bytes per token and block, it then states as arithmetic (not measurement) the
longest sequence a 1b and a 3b DiT train per 80 GB GPU at cp = 1, 8 and 32, with full activation
checkpointing in bf16: each block keeps only its input (2 x width bytes a token), and one block at
a time recomputes its activations (the measured fp32 bytes per token and block, scaled by width
and halved for bf16); parameters, gradients and Adam state (16 bytes a parameter) are sharded over
64 GPUs, and two blocks are gathered at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model.dit import DiT, dit_config
from model.flops import dit_param_count
from model.flow import FlowConfig, sample_timesteps, training_loss
from train.config import OptimConfig, ParallelConfig
from train.parallel import ParallelDims, build_engine
from train.runtime import init_runtime

TEXT_DIM, TEXT_TOKENS, CHANNELS, FRAME_TOKENS = 384, 64, 4, 256
LAYOUTS = {"cp=1": (1, {}), "cp=2": (2, {"cp": 2}), "sp=2": (2, {"sp": 2})}
GPU_BYTES, SHARDS = 80e9, 64


class SavedActivations:
    """Bytes of the tensors autograd saves for the backward, each storage once, parameters not."""

    def __init__(self, model: torch.nn.Module):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.parameters:
                self.storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def worker(layout: str, size: str, frames: int, steps: int, out: Path) -> None:
    runtime = init_runtime(distributed=LAYOUTS[layout][0] > 1)
    parallel = ParallelConfig(
        backend="ddp" if runtime.world_size > 1 else "none", **LAYOUTS[layout][1]
    )
    dims = ParallelDims.resolve(parallel, runtime.world_size, runtime.rank)
    dims.build_mesh(runtime.device.type)
    torch.manual_seed(0)
    model = DiT(dit_config(size), CHANNELS, TEXT_DIM).to(runtime.device)
    engine = build_engine(model, parallel, OptimConfig(), dims, 1, steps, runtime.autocast_dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, CHANNELS, frames, 32, 32, generator=generator).to(runtime.device)
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator).to(runtime.device)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=runtime.device)
    micro = {
        "fps": torch.full((1,), 24.0, device=runtime.device),
        "native_size": torch.tensor([[720.0, 1280.0]], device=runtime.device),
    }
    given = torch.zeros(1, frames, dtype=torch.bool, device=runtime.device)  # text-to-video
    tokens = frames * FRAME_TOKENS
    saved, times = SavedActivations(model), []
    for step in range(steps):
        start = time.perf_counter()
        t = sample_timesteps(1, tokens, FlowConfig(), generator).to(runtime.device)
        noise = torch.randn(x.shape, generator=generator).to(runtime.device)
        saved.storages.clear()
        with runtime.autocast(), saved.hooks():
            loss = training_loss(
                engine.model, x, text, mask, t, noise, given=given, model_kwargs=micro
            ).mean()
        activations = saved.bytes
        engine.micro_step(loss)
        engine.finish_step()
        if step > 0:  # the first step pays for allocation and warm-up
            times.append(time.perf_counter() - start)
    if runtime.is_main:
        result = {"activations": activations, "tokens": tokens, "step_s": sum(times) / len(times)}
        (out / f"{layout}.json").write_text(json.dumps(result))
    if runtime.world_size > 1:
        torch.distributed.destroy_process_group()


def launch(layout: str, args: argparse.Namespace, out: Path) -> dict:
    module = ["-m", "bench.long_context", "--worker", layout, "--out", str(out)]
    module += ["--size", args.size, "--frames", str(args.frames), "--steps", str(args.steps)]
    nproc = LAYOUTS[layout][0]
    if nproc == 1:
        command = [sys.executable, *module]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--standalone", *module,
        ]  # fmt: skip
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    subprocess.run(command, check=True, env=env, capture_output=True)
    return json.loads((out / f"{layout}.json").read_text())


def longest_sequences(bytes_per_token_block: float, measured_width: int) -> dict:
    """Tokens of the longest sequence per 80 GB GPU, by size and cp (see the module docstring)."""
    result = {}
    for size in ("1b", "3b"):
        cfg = dit_config(size)
        params = dit_param_count(cfg, 16, 4096)
        states = 16 * params / SHARDS + 2 * 2 * params / cfg.depth
        recompute = bytes_per_token_block * cfg.width / measured_width / 2
        per_token = cfg.depth * 2 * cfg.width + recompute
        local = (GPU_BYTES - states) / per_token
        result[size] = {f"cp={cp}": int(local * cp) for cp in (1, 8, 32)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--frames", type=int, default=16, help="256 tokens each")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.frames, args.steps, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        runs = {layout: launch(layout, args, Path(tmp)) for layout in LAYOUTS}
    whole = runs["cp=1"]
    report = {"size": args.size, "tokens": whole["tokens"]}
    for layout, run in runs.items():
        report[layout] = {
            "activation_mib": round(run["activations"] / 2**20, 1),
            "activation_ratio": round(run["activations"] / whole["activations"], 3),
            "step_s": round(run["step_s"], 3),
        }
    per_token_block = whole["activations"] / whole["tokens"] / dit_config(args.size).depth
    report["fp32_bytes_per_token_and_block"] = round(per_token_block)
    report["longest_tokens_per_80GB"] = longest_sequences(
        per_token_block, dit_config(args.size).width
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
