"""What latent shards buy a DiT run: steps on stored latents against online encoding, per DiT size.

    python -m bench.latents [--sizes tiny,small:50] [--steps 100] [--warmup 10] [--rounds 3]
                            [--threads 1]

Builds its inputs once in a temporary folder: the demo shards (`data.demo.build_demo`, 10 clips
and 10 stills per source), a seeded random-init demo autoencoder saved with safetensors
(train.encode refuses to run without a checkpoint; the weights change nothing about the cost),
and their latent shards (`python -m train.encode`, bfloat16). The encoding does not depend on
the DiT, so every size trains on the same pixel and latent shards. Then, for each DiT size of
`--sizes` (`model=<size>`, model/dit.py's DIT_SIZES; `size:N` runs that size N steps instead of
`--steps`, so a larger, slower model can take fewer), it trains the demo DiT
(`experiment=demo`, on the CPU, data.augment=false, buckets.token_budget=160 so the small data
makes full batches) in four ways per round; within a round the sizes and their cases run one
after the other:

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

Both runs of a size see the same batches (the plan is the same over the latent shards, and
data.augment=false cuts the clips the encoder cut; the plan does not depend on the DiT either),
and every case runs `--threads` torch threads (OMP_NUM_THREADS for the runs). The first
`--warmup` steps are not timed. A run's step time is the trainer's own (train/trainer.py:
waiting for the batch, forward and backward, gradient clipping, AdamW, EMA; not the logging
between steps), summed over the timed steps from each logged step's samples and samples/s;
tokens/s is their tokens over that sum, and `data wait` the share of it spent waiting for
batches. Peak RSS is `ru_maxrss` of the run's process from `os.wait4` (the largest of the rank
and its loader workers, not their sum), taken by a small launcher process: a child's ru_maxrss
starts at the high-water RSS of the process that started it, which here would be this one,
holding the in-process models. Each figure is the median over the rounds, and each
ratio the median of the rounds' own ratios (the cases of a round ran under the same load).

Prints, per size, a table and the ratios of a step on latents
- to the DiT's own forward and backward (`DiT fwd+bwd`; the goal is at most 1.1x): what a step
  on latents costs beyond the model's compute, optimizer included;
- to its forward, backward, AdamW and EMA (`DiT fwd+bwd + AdamW + EMA`): what it costs beyond a
  step without data, i.e. waiting for the batch (the loader's hand-over), the trainer's
  bookkeeping, and whatever CPU the run's loader workers take from the rank (the in-process
  loop runs none);
with the share of the step on latents spent waiting for the batch (and that wait in ms), and
at the end one JSON line (with every size's and round's figures).
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
from model.dit import DIT_SIZES, count_params
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


def build_inputs(tmp: Path, clips: int = 10, images: int = 10) -> tuple[Path, Path]:
    """(the demo's pixel shards, `clips` and `images` per source, and a seeded random-init demo
    autoencoder checkpoint)."""
    pixels = build_demo(tmp / "demo", clips_per_source=clips, images_per_source=images)
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
    """Seconds `python -m train.encode` took to write the latent shards of `pixels`."""
    command = [sys.executable, "-m", "train.encode", "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, *overrides, f"data.shards={pixels}"], cwd=ROOT, env=env, capture_output=True
    )
    if done.returncode:
        raise RuntimeError(f"python -m train.encode failed:\n{done.stderr.decode()[-3000:]}")
    return time.perf_counter() - start


# Starts a command, waits for it and writes its ru_maxrss (KiB on Linux) to argv[1]. On Linux a
# child's ru_maxrss starts at the RSS mark of the address space its exec replaced, the one of
# the process that started it, so the runs are started from this small process rather than
# from the benchmark's, which holds the in-process models and batches.
LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def train_run(run_dir: Path, overrides: list[str], warmup: int, env: dict[str, str]) -> dict:
    """One `python -m train`: its timed steps' figures and its peak RSS."""
    run_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "train", *overrides, f"train.run_dir={run_dir}"]
    rusage = run_dir / "ru_maxrss_kib"
    with open(run_dir / "output.log", "wb") as log:
        done = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(rusage), *command],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if done.returncode:
        log_tail = (run_dir / "output.log").read_text()[-3000:]
        raise RuntimeError(f"python -m train failed ({done.returncode}):\n{log_tail}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    figures = timed_steps([json.loads(line) for line in lines], warmup)
    return figures | {"peak_rss_mib": int(rusage.read_text()) / 1024}


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


def print_table(size: str, result: dict) -> None:
    print(
        f"model={size} ({result['params'] / 1e6:.2f}M parameters): medians of "
        f"{result['rounds']} rounds, steps {result['warmup'] + 1}-{result['steps']}"
    )
    print("| case | step ms | tokens/s | data wait | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for key, name in CASES.items():
        row = result[key]
        wait = f"{row['data_wait_share']:.1%}" if "data_wait_share" in row else "-"
        rss = f"{row['peak_rss_mib']:.0f}" if "peak_rss_mib" in row else "-"
        print(f"| {name} | {row['step_ms']:.1f} | {row['tokens_per_s']:.0f} | {wait} | {rss} |")
    latents = result["latents"]
    rss = latents["peak_rss_mib"] - result["online"]["peak_rss_mib"]
    print(
        f"latents vs online: {result['speedup']:.2f}x tokens/s, peak RSS {rss:+.0f} MiB. A step "
        f"on latents is {result['step_over_fwd_bwd']:.2f}x the DiT's own forward+backward "
        f"(goal <= 1.1x: {'met' if result['step_over_fwd_bwd'] <= 1.1 else 'not met'}) and "
        f"{result['step_over_dit_step']:.2f}x its forward+backward+AdamW+EMA; waiting for the "
        f"batch is {latents['data_wait_share']:.1%} of it "
        f"({latents['data_wait_share'] * latents['step_ms']:.1f} ms). Same tokens in every "
        f"case: {result['same_tokens']}."
    )
    print()


def parse_sizes(text: str, steps: int) -> dict[str, int]:
    """`tiny,small:50` -> {"tiny": steps, "small": 50}."""
    sizes = {}
    for item in text.split(","):
        size, _, count = item.strip().partition(":")
        if size not in DIT_SIZES:
            raise ValueError(f"unknown DiT size {size!r}; known sizes: {', '.join(DIT_SIZES)}")
        sizes[size] = int(count) if count else steps
    return sizes


def size_result(cases: dict[str, list[dict]], params: int, steps: int, args) -> dict:
    result = {name: medians(rounds) for name, rounds in cases.items()}
    return result | {
        "params": params,
        "speedup": paired_ratio(cases["online"], cases["latents"]),
        "step_over_fwd_bwd": paired_ratio(cases["latents"], cases["dit_fwd_bwd"]),
        "step_over_dit_step": paired_ratio(cases["latents"], cases["dit_step"]),
        "same_tokens": len({result[name]["tokens"] for name in cases}) == 1,
        "steps": steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "per_round": cases,
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        default="tiny,small:50",
        help="DiT sizes (model=<size>), comma-separated; size:N runs that size N steps",
    )
    parser.add_argument("--steps", type=int, default=100, help="steps of each run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each case, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every case")
    args = parser.parse_args()
    try:
        sizes = parse_sizes(args.sizes, args.steps)
    except ValueError as error:
        parser.error(str(error))
    if not all(1 <= args.warmup < steps for steps in sizes.values()):
        parser.error("--warmup must be at least 1 and below every size's steps")
    torch.set_num_threads(args.threads)
    env = threads_env(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-latents-") as folder:
        tmp = Path(folder)
        pixels, checkpoint = build_inputs(tmp)
        common = common_overrides(tmp, checkpoint)
        encode_s = encode(pixels, tmp / "latents", common, env)
        runs, in_process = {}, {}
        for size, steps in sizes.items():
            online = [*common, *run_overrides(pixels, steps), f"model={size}"]
            latents = [*common, *run_overrides(tmp / "latents", steps), f"model={size}"]
            runs[size] = (("online", online), ("latents", latents))
            in_process[size] = InProcessSteps(latents, steps)
        cases = {size: {name: [] for name in CASES} for size in sizes}
        for i in range(args.rounds):
            for size in sizes:
                for name, overrides in runs[size]:
                    run_dir = tmp / f"{size}-{name}-{i}"
                    cases[size][name].append(train_run(run_dir, overrides, args.warmup, env))
                for name, figures in in_process[size].timed(args.warmup).items():
                    cases[size][name].append(figures)
    result = {
        "sizes": {
            size: size_result(cases[size], count_params(in_process[size].stage.model), steps, args)
            for size, steps in sizes.items()
        },
        "encode_s": encode_s,
        "threads": args.threads,
        "load_avg": os.getloadavg()[0],
        "wall_s": time.perf_counter() - start,
    }
    for size, figures in result["sizes"].items():
        print_table(size, figures)
    print(
        f"{args.threads} torch thread(s); encoding took {encode_s:.1f} s; the benchmark "
        f"{result['wall_s']:.0f} s; load average {result['load_avg']:.2f} at the end."
    )
    print(json.dumps(rounded(result)))
    return result


if __name__ == "__main__":
    main()
