"""Native-size packing against buckets on the demo data: the same DiT, side by side.

    python -m bench.packed_training [--steps 150] [--rounds 2] [--warmup 10] [--threads 2]

Builds its inputs once in a temporary folder: the demo shards (`data.demo.build_demo`, 30
clips and 15 stills per source), their held-out set (12 clips and 6 stills per source, seed 1,
as `make scaling` builds it), a seeded random-init demo autoencoder (bench/latents.py's
`build_inputs`), and for each case the latent shards of the demo (`python -m train.encode` at
the case's bucket or packing shapes, float32). The cases, both `python -m train` on the CPU
with data.augment=false (the cut that latent shards store):

- `bucketed`: `experiment=demo` (conf/buckets/demo.yaml: 480 latent tokens a batch, +-15%),
  `--steps` steps;
- `packed`: `experiment=demo_packed` (packs of 480 tokens of native-size samples, up to 240
  tokens and 17 frames each), for the number of steps whose planned tokens come closest to the
  bucketed run's (train/budget.py's walk of the plan, counting tokens): both see the same
  number of tokens.

Each round trains both cases in two modes, in an order that reverses from round to round:
`latents` (on their latent shards: the DiT, the loader and the optimizer, no encoder) and
`online` (on the pixel shards: the frozen autoencoder and text encoder run every step).
Reports, per mode and case, the trainer's tokens/s over the steps after `--warmup`
(bench/latents.py's `train_run`: the step time the trainer measures, data wait included) and
the held-out loss of its exported (EMA) weights at that equal number of tokens, all scored on
the same held-out batches (the bucketed config's `Evaluator`: fixed times and noise, one
yardstick); and, from the demo manifest, the share of each clip's native tokens and frames the
buckets and the packing keep (bench/packing.py's measure, at data.fps 8). Figures are medians
over rounds, each tokens/s ratio the median of the rounds' own ratios. Goal: packed tokens/s
>= 0.95x bucketed on CPU, with more of each clip kept. Beside it, each case's training FLOPs per
token (train/budget.py's walk with the run's own FLOP count) and the ratio of FLOPs/s: a packed
sample keeps more of its clip, so its attention costs more per token.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.latents import build_inputs, encode, threads_env, train_run
from bench.packing import kept, reference_tokens, video_sizes, weighted_mean
from data.demo import build_demo
from data.pipeline import open_plan, training_stream
from data.plan import DataState
from train.budget import step_flops, steps_for_budget
from train.build import load_trained, sample_table
from train.checkpoint import find_weights, read_weights
from train.encode import compose_config
from train.parallel import ParallelDims
from train.runtime import init_runtime
from train.stages import DiTStage

CASES = {"bucketed": "experiment=demo", "packed": "experiment=demo_packed"}
MODES = ("latents", "online")


def overrides(case: str, checkpoint: Path, tmp: Path) -> list[str]:
    """A case's settings, but its shards."""
    return [
        CASES[case],
        f"autoencoder.checkpoint={checkpoint}",
        f"data.cache_dir={tmp / 'cache'}",
        "data.augment=false",
        "train.device=cpu",
        "train.sample_prompts=[]",
        "train.log_every=1",
        "logger=none",
    ]


def planned(config_overrides: list[str], count: str) -> Iterator[float]:
    """The tokens (`count="tokens"`) or training FLOPs (`"flops"`) of every step of a
    one-process run, from its plan (train/budget.py's walk)."""
    config = compose_config(config_overrides)
    stage = DiTStage(config, init_runtime("cpu", "fp32"))
    plan = open_plan(config.data, stage.table)
    stream = training_stream(config.data, plan, 0, 1, DataState(config.data.seed, 0, 0))
    per_sample = {
        "tokens": lambda shape: shape.tokens_per_sample,
        "flops": lambda shape: stage.train_flops(config, shape.tokens_per_sample),
    }[count]
    return step_flops(stream, per_sample, config.train.grad_accum)


def equal_token_steps(config: dict[str, list[str]], steps: int) -> dict[str, int]:
    """`steps` bucketed steps, and the packed steps whose tokens come closest to theirs."""
    tokens = sum(itertools.islice(planned(config["bucketed"], "tokens"), steps))
    return {
        "bucketed": steps,
        "packed": steps_for_budget(planned(config["packed"], "tokens"), tokens)[0],
    }


def flops_per_token(config: dict[str, list[str]], steps: dict[str, int]) -> dict[str, float]:
    """Each case's training FLOPs per token over its steps: attention grows with a sample's
    tokens, so a case whose samples keep more of their clips does more work per token."""
    figures = {}
    for case, count in steps.items():
        flops = sum(itertools.islice(planned(config[case], "flops"), count))
        tokens = sum(itertools.islice(planned(config[case], "tokens"), count))
        figures[f"{case}_flops_per_token"] = flops / tokens
    return figures


def held_out_losses(
    config_overrides: list[str], held_out: Path, runs: dict[str, Path], tmp: Path
) -> dict:
    """Each run's exported weights scored on the same held-out batches (the bucketed config's)."""
    config = compose_config([*config_overrides, f"eval.shards={held_out}", "eval.samples=48"])
    stage = DiTStage(config, init_runtime("cpu", "fp32"))
    evaluator = stage.evaluator(config, ParallelDims.resolve(config.parallel, 1, 0), tmp)
    losses = {}
    for case, run_dir in runs.items():
        weights = read_weights(find_weights(run_dir), stage.model)
        load_trained(stage.model, weights, f"{run_dir}'s weights")
        losses[case] = evaluator(stage.model, {"step": 0}, final=False)["eval/loss"]
    return losses


def kept_shares(shards: Path, config_overrides: dict[str, list[str]]) -> dict:
    """The share of each demo clip's native tokens and frames each case keeps."""
    packed = compose_config(config_overrides["packed"])
    geometry = DiTStage(packed, init_runtime("cpu", "fp32")).source.geometry
    packing = sample_table(packed, geometry)
    buckets = sample_table(compose_config(config_overrides["bucketed"]), geometry)
    sizes, counts = video_sizes(shards, packed.data.fps)
    reference = reference_tokens(sizes, packing)
    frames = np.minimum(sizes["frames"], packing.max_frames)
    shares = {}
    for case, table in (("bucketed", buckets), ("packed", packing)):
        tokens, kept_frames = kept(sizes, table)
        shares[f"{case}_kept_tokens"] = weighted_mean(tokens / reference, counts)
        shares[f"{case}_kept_frames"] = weighted_mean(kept_frames / frames, counts)
    return shares


def one_round(
    index: int,
    config: dict[str, list[str]],
    shards: dict[tuple[str, str], Path],
    steps: dict[str, int],
    held_out: Path,
    tmp: Path,
    warmup: int,
    env: dict[str, str],
    work_ratio: float,
) -> dict:
    """Every mode and case trained once: their tokens/s, tokens and held-out losses, and the
    packed/bucketed ratios of tokens/s and of training FLOPs/s (`work_ratio`: of their FLOPs
    per token)."""
    runs, figures = {}, {}
    order = [(mode, case) for mode in MODES for case in CASES]
    for mode, case in order if index % 2 == 0 else order[::-1]:
        name = f"{mode}_{case}"
        runs[name] = tmp / f"round{index}-{name}"
        timed = [*config[case], f"data.shards={shards[mode, case]}", f"train.steps={steps[case]}"]
        run = train_run(runs[name], timed, warmup, env)
        metrics = [json.loads(line) for line in (runs[name] / "metrics.jsonl").open()]
        figures |= {
            f"{name}_tokens_per_s": run["tokens_per_s"],
            f"{name}_tokens": metrics[-1]["progress/tokens_seen"],
        }
    scoring = [*config["bucketed"], f"data.shards={shards['online', 'bucketed']}"]
    losses = held_out_losses(scoring, held_out, runs, tmp)
    figures |= {f"{name}_held_out_loss": loss for name, loss in losses.items()}
    for mode in MODES:
        packed, bucketed = (
            figures[f"{mode}_{case}_tokens_per_s"] for case in ("packed", "bucketed")
        )
        figures[f"{mode}_tokens_per_s_ratio"] = packed / bucketed
        figures[f"{mode}_flops_per_s_ratio"] = packed / bucketed * work_ratio
    return figures


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="steps of the bucketed run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of timings")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    args = parser.parse_args()
    env = threads_env(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="tessera-packed-bench-"))
    pixels, checkpoint = build_inputs(tmp, clips=30, images=15)
    held_out = build_demo(tmp / "eval", clips_per_source=12, images_per_source=6, seed=1)
    config = {case: overrides(case, checkpoint, tmp) for case in CASES}
    on_pixels = {case: [*values, f"data.shards={pixels}"] for case, values in config.items()}
    shards = {("online", case): pixels for case in CASES}
    for case in CASES:
        shards["latents", case] = tmp / f"latents-{case}"
        encode(pixels, shards["latents", case], ["--dtype", "float32", *config[case]], env)
    steps = equal_token_steps(on_pixels, args.steps)
    work = flops_per_token(on_pixels, steps)
    work_ratio = work["packed_flops_per_token"] / work["bucketed_flops_per_token"]
    rounds = [
        one_round(index, config, shards, steps, held_out, tmp, args.warmup, env, work_ratio)
        for index in range(args.rounds)
    ]
    result = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    result |= {f"{case}_steps": count for case, count in steps.items()} | work
    result |= kept_shares(pixels, on_pixels) | {"rounds": rounds, "threads": args.threads}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
