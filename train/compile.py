"""torch.compile of each transformer block, where it pays.

Per-block compile (one graph, reused by every block of the same shape) is a GPU speed-up: Inductor
fuses the norms, modulation, RoPE and gates around the matmuls into a few Triton kernels. On a CPU
it only costs: measured on a 2-core machine (bench/compile.py, DiT-mini, 1024 tokens, fp32), the
first step took 47 s against 5.4 s eager and steady steps were no faster (4.45 s against 4.39 s),
because the time there is in matmuls and attention that Inductor hands to the same oneDNN/BLAS
calls as eager; and with varying bucket shapes every new shape compiles again. So it is refused
there with that reason rather than silently making a run slower.
"""

from __future__ import annotations

import torch
from torch import nn

CPU_REFUSAL = (
    "parallel.compile=true is refused on CPU: per-block torch.compile made DiT training steps no "
    "faster there (bench/compile.py: 4.45 s compiled against 4.39 s eager a step, after a 47 s "
    "first step), since CPU time goes to matmuls that Inductor leaves to the same BLAS calls; "
    "compile on a CUDA device, or set parallel.compile=false"
)


def compile_blocks(blocks: nn.ModuleList, device: torch.device) -> None:
    """Compile every block in place; a CPU device raises ValueError with the measured reason.

    Shapes are left static: each bucket shape compiles once, and Dynamo's dynamic-shape guess
    after a second shape would trade the fused static kernels for slower generic ones.
    """
    if device.type != "cuda":
        raise ValueError(CPU_REFUSAL)
    for block in blocks:
        block.compile(dynamic=False)
