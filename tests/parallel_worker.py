"""Run under torchrun by tests/test_parallel.py: one rank's side of a gradient check.

`python -m torch.distributed.run --nproc_per_node N tests/parallel_worker.py CHECK BACKEND OUT [LAYOUT]`

Each rank computes, on a plain single-process copy of the tiny DiT, the reference gradient of the
mean per-sample loss over the whole global batch, then the same step through the real engine and
the trainer's normalisation, and writes both gradients' differences to OUT/rank{r}.json.

CHECK is `buckets` (the ranks hold batches of different buckets and sizes) or `sequence` (all
ranks split one sample's tokens, over the sequence LAYOUT: `sp=2` (the default), `cp=2`, or
`cp=2,sp=2` on 4 ranks, and further ParallelConfig settings such as
`activation_checkpointing=full`); `sequence_wan2.1` and `sequence_wan2.2_ti2v` are
`sequence` for a tiny Wan 2.1 T2V (one time per sample), Wan 2.2 TI2V (a given first frame,
one time per token), A14B and I2V A14B (two experts; I2V's shown a condition as channels) and
LTX-Video (`sequence_ltx_video`: one time per token, a given first frame) and HunyuanVideo
(`sequence_hunyuan_video`: joint attention over caption and video, a padded caption) and
CogVideoX 1.5 (`sequence_cogvideox`: joint attention, the caption inside the patch embedding's
sequence, v-prediction) model; `sequence_packed` splits a padded pack of three samples of different
shapes (one with a given frame), where a sample straddles the ranks' chunks.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from family_models import tiny_cogvideox_model, tiny_hunyuan_model, tiny_ltx_model
from models import perturbed_tiny_dit
from wan_models import tiny_wan_model

from data.pipeline import Batch
from model.dit import DiT
from model.flow import FlowConfig, sample_timesteps, training_loss
from train.config import Config, OptimConfig, ParallelConfig
from train.objectives import Loss
from train.parallel import ParallelDims, build_engine
from train.runtime import end_finished_rank, init_runtime, shutdown
from train.trainer import Trainer

TEXT_DIM = 8
# (T, H, W) crops of a 4x8x8 batch of three: a pack of 32 + 16 + 16 tokens, padded to 72, so
# that sample 1 (tokens 32-47) straddles the ranks' chunks on 2 ranks (0-35, 36-71) and on 4
# (0-17, 18-35, 36-53, 54-71).
PACK_SHAPES = [(4, 8, 4), (1, 8, 8), (2, 4, 8)]
PACK_SEQUENCE_LENGTH = 72


def make_batch(frames: int, height: int, width: int, size: int, plan_index: int) -> Batch:
    """A batch whose 'video' are latents already (3 channels), made from its plan position."""
    generator = torch.Generator().manual_seed(plan_index)
    video = torch.randint(0, 256, (size, frames, height, width, 3), generator=generator)
    keys = [f"sample_{plan_index}_{i}" for i in range(size)]
    return Batch(
        video.to(torch.uint8),
        keys,
        keys,
        torch.full((size,), 8.0),
        torch.tensor([[height, width]] * size),
        (frames, height, width),
        {},
        plan_index=plan_index,
    )


class LatentObjective:
    """Flow matching straight on the batch tensor, with per-frame times and seeded noise."""

    def __init__(self, per_frame_times: bool, packed: bool = False, shown: bool = False):
        self.per_frame_times = per_frame_times
        self.packed = packed
        self.shown = shown  # the model takes given frames as channels: a random condition

    def __call__(self, model, batch: Batch, device) -> Loss:
        latents = batch.video.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
        generator = torch.Generator().manual_seed(1000 + batch.plan_index)
        size, frames = latents.shape[0], latents.shape[2]
        text = torch.randn(size, 5, TEXT_DIM, generator=generator)
        mask = torch.ones(size, 5, dtype=torch.bool)
        mask[:, 3:] = False
        shape = (size * frames) if self.per_frame_times else size
        t = sample_timesteps(shape, 64, FlowConfig(), generator).view(size, -1).squeeze(1)
        noise = torch.randn(latents.shape, generator=generator)
        given = torch.zeros(size, frames, dtype=torch.bool)
        given[0, 0] = self.per_frame_times or self.packed  # image-to-video: frame 0 given
        micro = {"fps": batch.fps, "native_size": batch.native_size}
        if self.shown:
            shape = (size, 4 + latents.shape[1], *latents.shape[2:])
            micro["condition"] = torch.randn(shape, generator=generator)
        if self.packed:  # the samples cut to PACK_SHAPES, in one sequence
            latents, noise = cut_to_pack(latents), cut_to_pack(noise)
            given = [g[None, :f] for g, (f, _, _) in zip(given, PACK_SHAPES, strict=True)]
            micro["sequence_length"] = PACK_SEQUENCE_LENGTH
        per_sample = training_loss(
            model, latents, text, mask, t, noise, given=given, model_kwargs=micro
        )
        return Loss(per_sample.sum(), size, 0)


def cut_to_pack(x: torch.Tensor) -> list[torch.Tensor]:
    """Sample i of x (B, C, T, H, W) cut to PACK_SHAPES[i], a shape group of its own."""
    return [x[i : i + 1, :, :f, :h, :w] for i, (f, h, w) in enumerate(PACK_SHAPES)]


def reference_gradients(model: DiT, objective, batches: list[Batch]) -> tuple[float, dict]:
    """Single-process gradient of the mean per-sample loss over `batches` together."""
    model = copy.deepcopy(model)
    losses = [objective(model, batch, "cpu") for batch in batches]
    samples = sum(loss.samples for loss in losses)
    mean = sum(loss.total for loss in losses) / samples
    mean.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without a gradient: {unused}"
    return mean.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def per_rank_mean_gradients(model: DiT, objective, batch: Batch, world_size: int) -> dict:
    """The known mistake, for contrast: each rank's own mean loss, gradients averaged."""
    model = copy.deepcopy(model)
    own = objective(model, batch, "cpu")
    (own.total / own.samples).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for grad in grads.values():
        torch.distributed.all_reduce(grad)
        grad /= world_size
    return grads


def main(check: str, backend: str, out: Path, layout: str) -> None:
    runtime = init_runtime("cpu", "fp32", distributed=True)
    degrees = {}
    if check.startswith("sequence"):
        settings = (item.split("=") for item in layout.split(","))
        degrees = {name: int(value) if value.isdigit() else value for name, value in settings}
    parallel = ParallelConfig(backend=backend, **degrees)
    dims = ParallelDims.resolve(parallel, runtime.world_size, runtime.rank)
    dims.build_mesh("cpu")
    if check.startswith("sequence_wan"):
        model = tiny_wan_model(check.removeprefix("sequence_"), 3, TEXT_DIM)
    elif check == "sequence_ltx_video":
        model = tiny_ltx_model(3, TEXT_DIM)
    elif check == "sequence_hunyuan_video":
        model = tiny_hunyuan_model(3, TEXT_DIM)
    elif check == "sequence_cogvideox":
        model = tiny_cogvideox_model(3, TEXT_DIM)
    else:
        model = perturbed_tiny_dit(in_channels=3, text_dim=TEXT_DIM, scale=0.02)

    if check == "buckets":  # rank 0: three 2x8x8 samples; rank 1: one 4x4x12 sample
        batches = [make_batch(2, 8, 8, 3, plan_index=0), make_batch(4, 4, 12, 1, plan_index=1)]
        mine = [batches[dims.dp_rank]]
    else:  # one 4x8x8 sample (2 token frames per rank), or three to pack; the same on both ranks
        size = 3 if check == "sequence_packed" else 1
        batches = mine = [make_batch(4, 8, 8, size, plan_index=0)]
    objective = LatentObjective(
        per_frame_times=check in ("sequence", "sequence_wan2.2_ti2v", "sequence_ltx_video"),
        packed=check == "sequence_packed",
        shown=check == "sequence_wan2.2_i2v_a14b",
    )
    ref_loss, ref_grads = reference_gradients(model, objective, batches)
    naive_grads = per_rank_mean_gradients(model, objective, mine[0], dims.world_size)

    engine = build_engine(model, parallel, OptimConfig(), dims, grad_accum=1, total_steps=1)
    trainer = Trainer(
        config=Config(parallel=parallel),
        runtime=runtime,
        dims=dims,
        engine=engine,
        objective=objective,
        batches=iter([]),
        checkpointer=None,
        logger=None,
    )
    sums = trainer.accumulate_gradients(mine)
    grads = engine.full_tensors({n: p.grad for n, p in engine.local_params().items()})

    def max_diff(a: dict, b: dict) -> float:
        return max((a[n] - b[n]).abs().max().item() for n in ref_grads)

    scale = max(g.abs().max().item() for g in ref_grads.values())
    result = {
        "loss": sums["loss_sum"] / sums["samples"],
        "reference_loss": ref_loss,
        "max_grad": scale,
        "engine_vs_reference": max_diff(grads, ref_grads),
        "per_rank_mean_vs_reference": max_diff(naive_grads, ref_grads),
    }
    (out / f"rank{runtime.rank}.json").write_text(json.dumps(result))
    shutdown(finished=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "sp=2")
    end_finished_rank()
