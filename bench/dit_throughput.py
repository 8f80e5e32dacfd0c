"""DiT training throughput and model FLOPs utilisation on this machine.

Measures, side by side in one run, the matmul ceiling of the device (a square matmul in
the training dtype) and forward + backward + AdamW steps of a DiT size at a given number
of latent tokens, then prints tokens/s, achieved FLOP/s from the analytic count
(model/flops.py) and their ratio to the ceiling.

    python -m bench.dit_throughput --size tiny --tokens 2048 --batch 1 --steps 10
"""

from __future__ import annotations

import argparse
import time

import torch

from model.dit import DiT, dit_config
from model.flops import dit_train_flops, peak_flops


def matmul_ceiling(
    device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10
) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def train_step_time(
    model: DiT,
    batch: int,
    grid: tuple[int, int, int],
    text_len: int,
    text_dim: int,
    steps: int,
    channels: int,
) -> float:
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, channels, *grid, device=device)
    t = torch.rand(batch, device=device)
    text = torch.randn(batch, text_len, text_dim, device=device)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        loss = model(x, t, text, mask).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # the median resists the noise of a shared machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--tokens", type=int, default=2048, help="latent tokens per sample")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--channels", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = dit_config(args.size)
    # A (frames, height, width) token grid of about --tokens tokens, patch (1, 2, 2).
    side = max(1, round((args.tokens / 4) ** 0.5))
    grid = (4 * cfg.patch_size[0], side * cfg.patch_size[1], side * cfg.patch_size[2])
    tokens = 4 * side * side
    model = DiT(cfg, args.channels, args.text_dim).to(device)
    ceiling = matmul_ceiling(device, torch.float32)
    seconds = train_step_time(
        model, args.batch, grid, args.text_len, args.text_dim, args.steps, args.channels
    )
    flops = args.batch * dit_train_flops(cfg, args.channels, args.text_dim, tokens, args.text_len)
    achieved = flops / seconds
    print(
        f"device {device}, DiT-{args.size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"params, {tokens} tokens x batch {args.batch}, fp32"
    )
    print(f"step time (median of {args.steps}): {seconds * 1e3:.1f} ms")
    print(f"tokens/s: {args.batch * tokens / seconds:.0f}")
    print(
        f"achieved: {achieved / 1e9:.1f} GFLOP/s; fp32 matmul ceiling measured now: "
        f"{ceiling / 1e9:.1f} GFLOP/s; ratio {achieved / ceiling:.2f}"
    )
    if (peak := peak_flops(device)) is not None:
        print(f"MFU against the bf16 datasheet peak: {achieved / peak:.3f}")


if __name__ == "__main__":
    main()
