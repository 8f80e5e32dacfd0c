"""What latent shards buy a DiT run: steps on stored latents against online encoding.

    python -m bench.latents [--steps 100] [--warmup 10] [--rounds 3] [--threads 1]

Builds its inputs in a temporary folder: the demo shards (`data.demo.build_demo`, 10 clips and
10 stills per source), a seeded random-init demo autoencoder saved with safetensors (data.encode
refuses to run without a checkpoint; the weights change nothing about the cost), and their
latent shards (`python -m data.encode`, bfloat16). Then it trains the demo DiT
(`experiment=demo`, on the CPU, data.augment=false, buckets.token_budget=160 so the small data
makes full batches) for `--steps` steps, in four ways per round, the rounds one after the other:

- `online`: `python -m train` on the pixel shards: every step decodes clips (loader workers)
  and runs the autoencoder and the text encoder;
- `latents`: `python -m train` on the latent shards: neither encoder is built;
- `DiT fwd+bwd`: in this process, the same model (`DiTStage` of the latent run's config) on the
  latent run's own batches, read into memory first: per batch the objective (the stored
  tensors to float32, the drawn times, noise, caption dropout and given frames, the DiT's
  forward and the loss) and the backward. No data loading, optimizer, EMA or logging: the
  floor of a step;
- `DiT fwd+bwd + AdamW + EMA`: the same loop's whole time, with the engine's gradient clipping,
  AdamW and schedule step and the EMA update after each backward (train/parallel/engines.py,
  train/ema.py, as the run builds them): a step without its data and bookkeeping.

Both runs see the same batches (the plan is the same over the latent shards, and
data.augment=false cuts the clips the encoder cut), and every case runs `--threads` torch
threads (OMP_NUM_THREADS for the runs). The first `--warmup` steps are not timed. A run's step
time is the trainer's own (train/trainer.py: waiting for the batch, forward and backward,
gradient clipping, AdamW, EMA), summed over the timed steps from each logged step's samples and
samples/s; tokens/s is their tokens over that sum, and `data wait` the share of it spent waiting
for batches. Peak RSS is `ru_maxrss` of the run's process from `os.wait4` (the largest of the
rank and its loader workers, not their sum). Each figure is the median over the rounds, and each
ratio the median of the rounds' own ratios (the cases of a round ran under the same load).
Prints a table, the ratio of a step on latents to the DiT's own forward and backward (the goal
is at most 1.1x) and to its forward, backward and optimizer step, and one JSON line (with every
round's figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import safetensors.torch
import torch

from data.demo import build_demo
from data.pipeline import build_loader, open_plan
from data.plan import DataState
from model.autoencoder import build_autoencoder
from train.ema import EMA
from train.encode import compose_config
from train.parallel import ParallelDims, build_engine
from train.runtime import init_runtime, seed_everything
from train.stages import DiTStage

ROOT = Path(__file__).resolve().parents[1]
TOKEN_BUDGET = 160
CASES = {
    "online": "online encoding (pixel shards)",
    "latents": "latent shards",
    "dit_fwd_bwd": "DiT fwd+bwd only (in-process)",
    "dit_step": "DiT fwd+bwd + AdamW + EMA (in-process)",
}


def build_inputs(tmp: Path) -> tuple[Path, Path]:
    """(the demo's pixel shards, a seeded random-init demo autoencoder checkpoint)."""
    pixels = build_demo(tmp / "demo", clips_per_source=10, images_per_source=10)
    config = compose_config(["experiment=demo", "autoencoder.checkpoint=null"])
    torch.manual_seed(0)
    checkpoint = tmp / "autoencoder.safetensors"
    safetensors.torch.save_file(build_autoencoder(config.autoencoder).state_dict(), checkpoint)
    return pixels, checkpoint


def common_overrides(tmp: Path, checkpoint: Path) -> list[str]:
    """What the encoding and every run share: the demo on the CPU, clips cut without
    augmentation."""
    return [
        "experiment=demo",
        f"autoencoder.checkpoint={checkpoint}",
        f"data.cache_dir={tmp / 'cache'}",
        f"buckets.token_budget={TOKEN_BUDGET}",
        "data.augment=false",
        "train.device=cpu",
    ]


def run_overrides(shards: Path, steps: int) -> list[str]:
    return [
        f"data.shards={shards}",
        f"train.steps={steps}",
        "train.log_every=1",
        f"train.checkpoint_every={steps}",
        "train.sample_prompts=[]",
        "logger=none",
    ]


def threads_env(threads: int) -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def encode(pixels: Path, out: Path, overrides: list[str], env: dict[str, str]) -> float:
    """Seconds `python -m data.encode` took to write the latent shards of `pixels`."""
    command = [sys.executable, "-m", "data.encode", "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, *overrides, f"data.shards={pixels}"], cwd=ROOT, env=env, capture_output=True
    )
    if done.returncode:
        raise RuntimeError(f"python -m data.encode failed:\n{done.stderr.decode()[-3000:]}")
    return time.perf_counter() - start


def train_run(run_dir: Path, overrides: list[str], warmup: int, env: dict[str, str]) -> dict:
    """One `python -m train`: its timed steps' figures and its peak RSS."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "output.log", "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "train", *overrides, f"train.run_dir={run_dir}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        log_tail = (run_dir / "output.log").read_text()[-3000:]
        raise RuntimeError(f"python -m train failed ({child.returncode}):\n{log_tail}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    figures = timed_steps([json.loads(line) for line in lines], warmup)
    return figures | {"peak_rss_mib": usage.ru_maxrss / 1024}  # KiB on Linux


def timed_steps(metrics: list[dict], warmup: int) -> dict:
    """Step time, tokens/s and data-wait share over the steps after `warmup` (every step
    logged)."""
    seconds = tokens = waiting = 0.0
    for before, row in zip(metrics, metrics[1:], strict=False):
        if row["step"] <= warmup:
            continue
        step_s = (row["progress/samples_seen"] - before["progress/samples_seen"]) / row[
            "perf/samples_per_s"
        ]
        seconds += step_s
        waiting += step_s * row["perf/data_wait_share"]
        tokens += row["progress/tokens_seen"] - before["progress/tokens_seen"]
    steps = metrics[-1]["step"] - warmup
    return {
        "step_ms": seconds / steps * 1e3,
        "tokens_per_s": tokens / seconds,
        "data_wait_share": waiting / seconds,
        "tokens": int(tokens),
    }


class InProcessSteps:
    """The latent run's model, optimizer and EMA, built as `python -m train` builds them, and
    its first batches (read by this process: the same plan and rows as the run's workers)."""

    def __init__(self, overrides: list[str], steps: int):
        config = compose_config(overrides)
        seed_everything(config.train.seed)
        self.stage = DiTStage(config, init_runtime(config.train.device, config.train.precision))
        runtime = self.stage.runtime
        dims = ParallelDims.resolve(config.parallel, runtime.world_size, runtime.rank)
        self.engine = build_engine(
            self.stage.model, config.parallel, config.optim, dims, 1, steps, runtime.autocast_dtype
        )
        self.ema = EMA(self.engine, config.train.ema_decay)
        data = replace(config.data, num_workers=0)
        plan = open_plan(data, self.stage.table)
        stream = build_loader(data, plan, 0, 1, DataState(data.seed, 0, 0))
        self.batches = [next(stream) for _ in range(steps)]

    def timed(self, warmup: int) -> dict[str, dict]:
        """Over the batches after `warmup`: the DiT's forward and backward alone, and with the
        optimizer and EMA step after it, as the trainer takes them (no data loading)."""
        runtime, model = self.stage.runtime, self.engine.model.train()
        forward_backward = optimizer = tokens = 0.0
        for i, batch in enumerate(self.batches):
            start = time.perf_counter()
            with runtime.autocast():
                loss = self.stage.objective(model, batch, runtime.device)
            self.engine.micro_step(loss.total / loss.samples)
            backward_done = time.perf_counter()
            self.engine.finish_step()
            self.ema.update(self.engine.local_params())
            if i >= warmup:
                forward_backward += backward_done - start
                optimizer += time.perf_counter() - backward_done
                tokens += loss.tokens
        steps = len(self.batches) - warmup
        return {
            "dit_fwd_bwd": rates(forward_backward, steps, tokens),
            "dit_step": rates(forward_backward + optimizer, steps, tokens),
        }


def rates(seconds: float, steps: int, tokens: float) -> dict:
    return {
        "step_ms": seconds / steps * 1e3,
        "tokens_per_s": tokens / seconds,
        "tokens": int(tokens),
    }


def medians(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def paired_ratio(slower: list[dict], faster: list[dict]) -> float:
    """The median over the rounds of the step-time ratio within each round, where both ran
    under the same load."""
    return statistics.median(
        a["step_ms"] / b["step_ms"] for a, b in zip(slower, faster, strict=True)
    )


def rounded(value):
    if isinstance(value, dict):
        return {key: rounded(v) for key, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return round(value, 3) if isinstance(value, float) else value


def print_table(result: dict) -> None:
    print("| case | step ms | tokens/s | data wait | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for key, name in CASES.items():
        row = result[key]
        wait = f"{row['data_wait_share']:.1%}" if "data_wait_share" in row else "-"
        rss = f"{row['peak_rss_mib']:.0f}" if "peak_rss_mib" in row else "-"
        print(f"| {name} | {row['step_ms']:.1f} | {row['tokens_per_s']:.0f} | {wait} | {rss} |")
    rss = result["latents"]["peak_rss_mib"] - result["online"]["peak_rss_mib"]
    print(
        f"latents vs online: {result['speedup']:.2f}x tokens/s, peak RSS {rss:+.0f} MiB. A step "
        f"on latents is {result['step_over_fwd_bwd']:.2f}x the DiT's own forward+backward "
        f"(goal <= 1.1x) and {result['step_over_dit_step']:.2f}x its forward+backward+AdamW+EMA."
    )
    print(
        f"Medians of {result['rounds']} rounds, steps {result['warmup'] + 1}-{result['steps']}, "
        f"{result['threads']} torch thread(s); same tokens in every case: "
        f"{result['same_tokens']}; encoding took {result['encode_s']:.1f} s."
    )


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="steps of each run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each case, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every case")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    torch.set_num_threads(args.threads)
    env = threads_env(args.threads)
    with tempfile.TemporaryDirectory(prefix="tessera-bench-latents-") as folder:
        tmp = Path(folder)
        pixels, checkpoint = build_inputs(tmp)
        common = common_overrides(tmp, checkpoint)
        encode_s = encode(pixels, tmp / "latents", common, env)
        online = [*common, *run_overrides(pixels, args.steps)]
        latents = [*common, *run_overrides(tmp / "latents", args.steps)]
        in_process = InProcessSteps(latents, args.steps)
        cases: dict[str, list[dict]] = {name: [] for name in CASES}
        for i in range(args.rounds):
            for name, overrides in (("online", online), ("latents", latents)):
                run_dir = tmp / f"{name}-{i}"
                cases[name].append(train_run(run_dir, overrides, args.warmup, env))
            for name, figures in in_process.timed(args.warmup).items():
                cases[name].append(figures)
    result = {name: medians(rounds) for name, rounds in cases.items()}
    result |= {
        "speedup": paired_ratio(cases["online"], cases["latents"]),
        "step_over_fwd_bwd": paired_ratio(cases["latents"], cases["dit_fwd_bwd"]),
        "step_over_dit_step": paired_ratio(cases["latents"], cases["dit_step"]),
        "same_tokens": len({result[name]["tokens"] for name in cases}) == 1,
        "encode_s": encode_s,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "threads": args.threads,
        "load_avg": os.getloadavg()[0],
        "per_round": cases,
    }
    print_table(result)
    print(json.dumps(rounded(result)))
    return result


if __name__ == "__main__":
    main()
