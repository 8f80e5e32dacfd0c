"""DiT training-step throughput and model FLOPs utilisation (MFU) on one device, in one call.

Measures, side by side: the bf16 matmul ceiling (8192³); forward + backward + AdamW steps of the
1B and 3B DiT at about 16k and 64k latent tokens a sample, eager and with per-block compile, with
and without activation checkpointing (tokens/s, TFLOP/s from model/flops.py, MFU against the
datasheet peak and against the measured ceiling, peak memory; OOM is recorded, not fatal); and
which SDPA kernel ran, with its share of a step, from a short torch.profiler trace. Cases run in
priority order until --budget-s is spent; the rest are recorded as skipped. Writes
results.json and results.txt to $OUT (else bench/gpu/results).

Precision is the trainer's without FSDP: fp32 master weights under bf16 autocast. Activation
checkpointing recomputes the forward, which MFU does not count (model FLOPs, by convention).

    python -m bench.gpu.mfu            # CUDA: the full sweep
    python -m bench.gpu.mfu --smoke    # CPU, tiny sizes, seconds: keeps this script from rotting
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.dit import DiT, dit_config
from model.flops import dit_train_flops, peak_flops
from train.compile import compile_blocks
from train.torch_private import checkpoint_activations

TEXT_LEN, TEXT_DIM, CHANNELS = 128, 4096, 16  # a T5-sized caption and a 16-channel VAE latent
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_attention_math": "math",
    "flash_attn::_flash_attn_forward": "flash-attn package",
}
ATTENTION_KERNEL = re.compile(r"flash|fmha|sdpa|attention|attn", re.IGNORECASE)


@dataclass(frozen=True)
class Case:
    size: str
    tokens: int  # latent tokens a sample
    compile: bool
    checkpointing: bool

    @property
    def name(self) -> str:
        mode = "compiled" if self.compile else "eager"
        ckpt = "+ckpt" if self.checkpointing else ""
        tokens = f"{self.tokens // 1024}k" if self.tokens >= 1024 else str(self.tokens)
        return f"{self.size}@{tokens} {mode}{ckpt}"


def full_cases() -> list[Case]:
    """Most informative first: the budget cuts from the end."""
    order = [
        ("1b", 16384, False, False),
        ("1b", 16384, True, False),
        ("1b", 65536, False, True),
        ("1b", 65536, True, True),
        ("3b", 16384, False, False),
        ("3b", 16384, True, False),
        ("1b", 16384, False, True),
        ("1b", 16384, True, True),
        ("1b", 65536, False, False),
        ("3b", 65536, False, True),
        ("3b", 65536, True, True),
        ("3b", 16384, False, True),
        ("3b", 65536, False, False),  # expected to run out of memory
    ]
    return [Case(*row) for row in order]


def smoke_cases() -> list[Case]:
    # The compiled case is refused on a CPU: it records the reason instead of a figure.
    return [
        Case("pico", 256, False, False),
        Case("pico", 256, False, True),
        Case("pico", 256, True, False),
    ]


def latent_shape(tokens: int, patch: list[int]) -> tuple[int, int, int]:
    """A (frames, height, width) latent of exactly `tokens` tokens: 16 token frames (fewer for
    small counts) of a square token grid."""
    frames = 16 if tokens >= 16 * 64 else 1
    side = round((tokens // frames) ** 0.5)
    if frames * side * side != tokens:
        raise ValueError(f"{tokens} tokens are not {frames} frames of a square grid")
    return frames * patch[0], side * patch[1], side * patch[2]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an n³ matmul on random data (zeros run faster and would flatter it)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


class StepRunner:
    """One DiT, its AdamW and a fixed random sample; `step()` runs one training step."""

    def __init__(self, case: Case, device: torch.device, autocast: torch.dtype | None):
        cfg = dit_config(case.size)
        with device:  # parameters are made on the device: a 3B model builds in seconds
            self.model = DiT(cfg, CHANNELS, TEXT_DIM)
        if case.checkpointing:
            for block in self.model.blocks:
                checkpoint_activations(block)
        if case.compile:
            compile_blocks(self.model.blocks, device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-5, fused=device.type == "cuda"
        )
        shape = latent_shape(case.tokens, cfg.patch_size)
        self.inputs = (
            torch.randn(1, CHANNELS, *shape, device=device),
            torch.rand(1, device=device),
            torch.randn(1, TEXT_LEN, TEXT_DIM, device=device),
            torch.ones(1, TEXT_LEN, dtype=torch.bool, device=device),
        )
        self.device, self.autocast = device, autocast
        self.flops = dit_train_flops(cfg, CHANNELS, TEXT_DIM, case.tokens, TEXT_LEN)

    def step(self) -> None:
        context = (
            torch.autocast(self.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with context:
            loss = self.model(*self.inputs).float().square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_steps(self, warmup: int, steps: int) -> float:
        """Median seconds a step, after `warmup` steps (which compile, if compiled)."""
        for _ in range(warmup):
            self.step()
        times = []
        for _ in range(steps):
            synchronize(self.device)
            start = time.perf_counter()
            self.step()
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]


def measure(case: Case, device, autocast, warmup: int, steps: int, ceiling: float) -> dict:
    """One case's figures, or its status: 'oom' or 'refused' with the reason."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()  # each case compiles afresh instead of piling onto the recompile limit
    started = time.perf_counter()
    try:
        runner = StepRunner(case, device, autocast)
        seconds = runner.timed_steps(warmup, steps)
    except torch.OutOfMemoryError as error:
        return {"status": "oom", "reason": str(error).splitlines()[0]}
    except ValueError as error:  # compile_blocks refuses on CPU
        return {"status": "refused", "reason": str(error)}
    achieved = runner.flops / seconds
    peak = peak_flops(device)
    return {
        "status": "ok",
        "seconds_per_step": seconds,
        "tokens_per_s": case.tokens / seconds,
        "flops_per_step": runner.flops,
        "tflops": achieved / 1e12,
        "mfu_datasheet": achieved / peak if peak else None,
        "mfu_ceiling": achieved / ceiling,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
        "wall_s": time.perf_counter() - started,
    }


def attention_profile(case: Case, device, autocast) -> dict:
    """Which SDPA implementation ran and the attention kernels' share of a step's device time."""
    torch._dynamo.reset()
    runner = StepRunner(case, device, autocast)
    runner.step()  # warm-up outside the trace
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        runner.step()
        synchronize(device)
    events = profiler.key_averages()
    backends = sorted({SDPA_OPS[e.key] for e in events if e.key in SDPA_OPS})
    on_device = device.type == "cuda"

    def self_us(event) -> float:
        return event.self_device_time_total if on_device else event.self_cpu_time_total

    kernels = [
        e for e in events if self_us(e) > 0 and (not on_device or e.device_type.name == "CUDA")
    ]
    total = sum(self_us(e) for e in kernels)
    attention_us = sum(self_us(e) for e in kernels if ATTENTION_KERNEL.search(e.key))
    top = sorted(kernels, key=self_us, reverse=True)[:10]
    return {
        "case": case.name,
        "sdpa_backends": backends,
        "attention_share": attention_us / total if total else 0.0,
        "top_kernels": [
            {"name": e.key[:120], "ms": self_us(e) / 1e3, "share": self_us(e) / total} for e in top
        ],
    }


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(smoke: bool, budget_s: float) -> dict:
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("bench.gpu.mfu needs a CUDA device; use --smoke on a CPU")
    autocast = None if smoke else torch.bfloat16
    deadline = time.monotonic() + budget_s
    size, repeats = (256, 3) if smoke else (8192, 20)
    ceiling = matmul_ceiling(device, torch.float32 if smoke else torch.bfloat16, size, repeats)
    warmup, steps = (1, 1) if smoke else (1, 3)
    cases = smoke_cases() if smoke else full_cases()
    results = []
    for case in cases:
        if time.monotonic() > deadline:
            result = {"status": "skipped", "reason": f"time budget of {budget_s:.0f} s spent"}
        else:
            result = measure(case, device, autocast, warmup, steps, ceiling)
            release(device)
        results.append({"case": case.name, **asdict(case), **result})
        print(format_row(results[-1]), flush=True)
    profile = attention_profile(cases[0], device, autocast)
    release(device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": "fp32" if smoke else "bf16 autocast, fp32 master weights",
        "matmul": {"n": size, "tflops": ceiling / 1e12},
        "datasheet_peak_tflops": (peak_flops(device) or 0) / 1e12 or None,
        "text_len": TEXT_LEN,
        "text_dim": TEXT_DIM,
        "channels": CHANNELS,
        "cases": results,
        "attention": profile,
    }


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['case']:<22} {row['status']}: {row['reason'][:90]}"
    mfu = f"{row['mfu_datasheet']:.3f}" if row["mfu_datasheet"] is not None else "-"
    memory = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
    return (
        f"{row['case']:<22} {row['seconds_per_step'] * 1e3:>9.1f} {row['tokens_per_s']:>10.0f} "
        f"{row['tflops']:>8.1f} {mfu:>7} {row['mfu_ceiling']:>7.3f} {memory:>7}"
    )


def text_table(report: dict) -> str:
    lines = [
        f"{report['device']}, torch {report['torch']}, {report['dtype']}",
        f"matmul {report['matmul']['n']}^3: {report['matmul']['tflops']:.1f} TFLOP/s",
        f"{'case':<22} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>7} {'/ceil':>7} {'GiB':>7}",
        *(format_row(row) for row in report["cases"]),
        f"attention ({report['attention']['case']}): SDPA "
        f"{', '.join(report['attention']['sdpa_backends']) or 'none seen'}, "
        f"{report['attention']['attention_share']:.1%} of device time",
        "top kernels:",
        *(
            f"  {k['share']:6.1%} {k['ms']:9.2f} ms  {k['name']}"
            for k in report["attention"]["top_kernels"]
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, in seconds")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting cases after")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/gpu/results")
    args = parser.parse_args()
    report = run_bench(args.smoke, args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = text_table(report)
    (out / "results.txt").write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
