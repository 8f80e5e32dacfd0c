"""Run under torchrun by tests/test_generation.py: sampling with each window one sequence over
the ranks.

`python -m torch.distributed.run --nproc_per_node 2 tests/sample_worker.py CASES_JSON`

CASES_JSON holds `common` (the command's arguments, `parallel.*` included) and `cases` (name ->
the arguments of one mode and an `out=` path); the model is loaded and split once, and rank 0
writes every mp4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from train.parallel.ring import RingAttention
from train.runtime import end_finished_rank, shutdown
from train.sample import load_over_ranks, parse, sample_to_mp4


def main(spec: dict) -> None:
    parts, runtime = load_over_ranks(parse(spec["common"]))
    assert all(isinstance(block.self_attn.attend, RingAttention) for block in parts.dit.blocks)
    for arguments in spec["cases"].values():
        sample_to_mp4(parts, parse([*spec["common"], *arguments]), write=runtime.is_main)
    shutdown(finished=True)


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
    end_finished_rank()
