"""Per-rank training state and speed of the data-parallel backends at world size 2.

    python -m bench.parallel_memory [--size small] [--tokens 1024] [--steps 6]

Launches one torchrun per backend (ddp, fsdp, zero3; gloo on CPU, NCCL on GPUs) that trains the
DiT on synthetic latents, and prints for rank 0: bytes of parameters, gradients and optimizer
state that the rank holds (and of the EMA, sharded like the model), its peak memory (CUDA allocator peak on GPU, peak RSS on CPU), how
much of that peak training added over the process's footprint before the model was built, and
the step throughput. Sharded backends should hold about half of what DDP holds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from model.dit import DiT, dit_config
from model.flow import FlowConfig, sample_timesteps, training_loss
from train.config import OptimConfig, ParallelConfig
from train.ema import EMA
from train.parallel import ParallelDims, build_engine
from train.runtime import init_runtime

TEXT_DIM, TEXT_TOKENS, CHANNELS = 384, 64, 4


def tensor_bytes(tensors) -> int:
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def optimizer_state(engine) -> list[torch.Tensor]:
    optimizer = engine.ds.optimizer.optimizer if hasattr(engine, "ds") else engine.optimizer
    return [v for state in optimizer.state.values() for v in state.values() if v.ndim > 0]


def gradient_bytes(engine) -> int:
    """Bytes of gradients this rank keeps between backward and the optimizer step."""
    if not hasattr(engine, "ds"):
        return tensor_bytes(p.grad for p in engine.local_params().values() if p.grad is not None)
    # ZeRO-2/3 reduce-scatter gradients into buffers the size of the rank's fp32 partition.
    optimizer = engine.ds.optimizer
    partitions = getattr(optimizer, "single_partition_of_fp32_groups", None)
    if partitions is None:
        partitions = optimizer.fp32_partitioned_groups_flat
    return tensor_bytes(partitions)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(backend: str, size: str, tokens: int, steps: int, out: Path) -> None:
    runtime = init_runtime(distributed=True)
    baseline = peak_memory(runtime.device)  # the runtime's own footprint, before any model
    parallel = ParallelConfig(backend=backend)
    dims = ParallelDims.resolve(parallel, runtime.world_size, runtime.rank)
    dims.build_mesh(runtime.device.type)
    torch.manual_seed(0)
    model = DiT(dit_config(size), CHANNELS, TEXT_DIM).to(runtime.device)
    engine = build_engine(model, parallel, OptimConfig(), dims, 1, steps, runtime.autocast_dtype)
    ema = EMA(engine, decay=0.999)
    frames = tokens // 256
    x = torch.randn(1, CHANNELS, frames, 32, 32, device=runtime.device)
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, device=runtime.device)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=runtime.device)
    grads, times = 0, []
    for step in range(steps):
        start = time.perf_counter()
        t = sample_timesteps(1, tokens, FlowConfig(), device=runtime.device)
        with runtime.autocast():
            loss = training_loss(engine.model, x, text, mask, t, torch.randn_like(x)).mean()
        engine.micro_step(loss)
        grads = max(grads, gradient_bytes(engine))
        engine.finish_step()
        ema.update(engine.local_params())
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # the first step pays for allocation and warm-up
            times.append(time.perf_counter() - start)
    if runtime.is_main:
        result = {
            "parameters": tensor_bytes(engine.local_params().values()),
            "gradients": grads,
            "optimizer": tensor_bytes(optimizer_state(engine)),
            "ema": tensor_bytes(ema.shadow.values()),
            "peak": peak_memory(runtime.device),
            "peak_growth": peak_memory(runtime.device) - baseline,
            "tokens_per_s": tokens * runtime.world_size * len(times) / sum(times),
        }
        (out / f"{backend}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def launch(backend: str, args: argparse.Namespace, out: Path) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "bench.parallel_memory",
        "--worker", backend, "--size", args.size, "--tokens", str(args.tokens),
        "--steps", str(args.steps), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, check=True, env=env, capture_output=True)
    return json.loads((out / f"{backend}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--tokens", type=int, default=1024, help="multiple of 256")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.tokens, args.steps, args.out)
        return
    mib = 2**20
    print(f"DiT {args.size}, {args.tokens} tokens per rank, world size 2; per-rank figures (MiB)")
    print(f"{'backend':8} {'params':>8} {'grads':>8} {'optim':>8} {'sum':>8} {'vs ddp':>7} "
          f"{'ema':>8} {'peak':>8} {'growth':>8} {'tokens/s':>9}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        baseline = None
        for backend in ("ddp", "fsdp", "zero3"):
            r = launch(backend, args, Path(tmp))
            state = r["parameters"] + r["gradients"] + r["optimizer"]
            baseline = baseline or state
            print(
                f"{backend:8} {r['parameters'] / mib:8.1f} {r['gradients'] / mib:8.1f} "
                f"{r['optimizer'] / mib:8.1f} {state / mib:8.1f} {state / baseline:7.2f} "
                f"{r['ema'] / mib:8.1f} "
                f"{r['peak'] / mib:8.1f} {r['peak_growth'] / mib:8.1f} {r['tokens_per_s']:9.0f}"
            )


if __name__ == "__main__":
    main()
