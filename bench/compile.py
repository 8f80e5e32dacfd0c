"""Eager against per-block torch.compile for DiT training steps, side by side.

The same model, input and optimizer run first eagerly, then with every block compiled the way
`parallel.compile=true` does it; it prints the first compiled step (which compiles) apart from
the steady steps. Run with TORCH_LOGS=recompiles,graph_breaks to see why a step recompiles.

    python -m bench.compile --size mini --tokens 1024 --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch

from model.dit import DiT, dit_config

TEXT_LEN, TEXT_DIM, CHANNELS = 64, 384, 4


def step_seconds(model: DiT, tokens: int, steps: int, dtype: torch.dtype) -> list[float]:
    """Wall time of each of `steps` forward + backward + AdamW steps on one random sample."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    side = max(1, round((tokens / 4) ** 0.5))
    x = torch.randn(1, CHANNELS, 4, 2 * side, 2 * side, device=device, dtype=dtype)
    t = torch.rand(1, device=device)
    text = torch.randn(1, TEXT_LEN, TEXT_DIM, device=device, dtype=dtype)
    mask = torch.ones(1, TEXT_LEN, dtype=torch.bool, device=device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(x, t, text, mask).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mini")
    parser.add_argument("--tokens", type=int, default=1024, help="latent tokens per sample")
    parser.add_argument("--steps", type=int, default=3, help="steps after the first of each")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = DiT(dit_config(args.size), CHANNELS, TEXT_DIM).to(device, dtype)
    eager = step_seconds(model, args.tokens, args.steps + 1, dtype)
    for block in model.blocks:
        block.compile()
    compiled = step_seconds(model, args.tokens, args.steps + 1, dtype)
    print(
        f"device {device} ({torch.get_num_threads()} threads), DiT-{args.size}, "
        f"{args.tokens} tokens, {args.dtype}"
    )
    print(f"{'':10}{'first step':>12}{'steady median':>15}")
    for name, times in (("eager", eager), ("compiled", compiled)):
        steady = sorted(times[1:])[len(times[1:]) // 2]
        print(f"{name:10}{times[0]:>11.2f}s{steady:>14.3f}s")


if __name__ == "__main__":
    main()
