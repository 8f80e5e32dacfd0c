"""Run under torchrun by tests/test_parallel.py: ring attention against one process's attention.

`python -m torch.distributed.run --nproc_per_node N tests/ring_worker.py KERNEL OUT`

Every rank computes the whole sequence's attention and its gradients in one process, then its
chunk through `RingAttention` over the world, and writes the largest differences of the output
and of the q, k, v gradients, relative to their scale, to OUT/rank{r}.json. KERNEL `fused` runs
the CPU flash kernel per block; `exact` the fp32 computation other devices use, in slices of 5
queries. Sequences: a
dense batch of two, a pack of four samples and padding (some blocks share no sample: skipped),
and a pack cut at a chunk boundary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from model.attention import Segments, attention
from train.parallel import ring
from train.runtime import end_finished_rank

TOKENS = 24  # 12, 8 or 6 per rank on 2, 3 or 4 ranks


def main(kernel: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    if kernel == "exact":
        ring._fused_kernel_applies = lambda q: False
        ring.QUERY_SLICE = 5  # several slices of queries per rectangle
    generator = torch.Generator().manual_seed(0)
    cases = {
        "dense": None,
        "pack": Segments.from_lengths([5, 9, 3, 4], padding=3),
        "pack_at_boundary": Segments.from_lengths([12, 12]),
    }
    chunk = slice(rank * TOKENS // size, (rank + 1) * TOKENS // size)
    result = {}
    for name, segments in cases.items():
        batch = 2 if segments is None else 1
        q, k, v = (torch.randn(batch, TOKENS, 2, 8, generator=generator) for _ in range(3))
        weights = torch.randn(q.shape, generator=generator)
        whole = [x.clone().requires_grad_() for x in (q, k, v)]
        expected = attention(*whole, segments=segments)
        (expected * weights).sum().backward()
        local = [x[:, chunk].clone().requires_grad_() for x in (q, k, v)]
        got = ring.RingAttention(dist.group.WORLD)(*local, segments=segments)
        (got * weights[:, chunk]).sum().backward()
        pairs = [(got, expected[:, chunk])]
        pairs += [(mine.grad, full.grad[:, chunk]) for mine, full in zip(local, whole, strict=True)]
        result[name] = [
            ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in pairs
        ]
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    end_finished_rank()
