"""torch.compile of each transformer block, where it pays.

Per-block compile (one graph, reused by every block of the same shape) is a GPU speed-up: Inductor
fuses the norms, modulation, RoPE and gates around the matmuls into a few Triton kernels. On a CPU
it buys nothing reliable and costs a long first step: on this project's 2-core machines
(bench/compile.py, fp32, one shared and loaded machine, so steady times are noisy) DiT-mini at
1024 tokens took 47 s for the first compiled step against 5.4 s eager, then 4.45 s a step against
4.39 s; DiT-base at 2048 tokens 46 s against 12 s, then 12.0 s against 16.1 s. TORCH_LOGS=
recompiles,graph_breaks logged neither, in the bench nor in 8 trainer steps of DiT-tiny: the time
is in matmuls and attention, which Inductor leaves to the same BLAS and SDPA calls as eager, and
every new bucket shape compiles again. So it is refused there, with that reason.
"""

from __future__ import annotations

import torch
from torch import nn

CPU_REFUSAL = (
    "parallel.compile=true is refused on CPU: per-block torch.compile gave DiT training steps no "
    "reliable gain there (bench/compile.py, DiT-mini: 4.45 s compiled against 4.39 s eager a "
    "step) after a first step of 47 s against 5.4 s, since CPU time goes to matmuls that "
    "Inductor leaves to the same BLAS calls; compile on a CUDA device, or set "
    "parallel.compile=false"
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
