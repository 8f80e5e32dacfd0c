"""Scaling-law sweeps: steps derived from a FLOP budget, the fixed evaluation loss, the fit
recovering known exponents, and a small real sweep (Hydra multirun + fit) end to end."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from launching import PACKED
from models import online_source

from data.pipeline import BatchStream, open_plan
from data.plan import DataState
from launch.scaling import Run, fit_scaling, fit_sweep
from model.autoencoder import build_autoencoder
from model.flops import dit_train_flops
from train.budget import budget_steps, step_flops
from train.build import build_bucket_table, build_dit, latent_geometry, sample_table
from train.config import EvalConfig, ParallelConfig, register_configs, to_config
from train.encoders import FrozenEncoders
from train.evaluate import Evaluator
from train.parallel import ParallelDims
from train.runtime import init_runtime, shutdown

ROOT = Path(__file__).resolve().parents[1]
LATENT_CHANNELS, TEXT_DIM = 4, 384  # the tiny VAE and MiniLM of the demo
register_configs()


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        # A random-weight tiny VAE: these tests need its shapes, not good latents.
        preset = ["experiment=scaling_demo", "autoencoder.checkpoint=null"]
        return to_config(compose("config", overrides=[*preset, *overrides]))


def sample_flops(cfg):
    def flops(bucket):
        return dit_train_flops(
            cfg.model,
            LATENT_CHANNELS,
            TEXT_DIM,
            bucket.tokens_per_sample,
            cfg.text_encoder.max_length,
        )

    return flops


@pytest.mark.parametrize(
    "size, grad_accum, world, budget_steps_wanted, settings",
    [
        ("micro", 1, 1, 60, ()),
        ("tiny", 2, 1, 40, ()),
        ("mini", 1, 3, 30, ()),
        ("tiny", 1, 1, 400, ()),
        # the plan the loader reads: images made half the batches
        ("tiny", 1, 1, 100, ("data.image_share=0.5",)),
        ("tiny", 1, 1, 100, PACKED),  # native-size packs: every sample's own FLOPs
        ("tiny", 2, 2, 40, PACKED),
    ],
)
def test_derived_steps_spend_the_budget_within_2_percent(
    demo_shards, size, grad_accum, world, budget_steps_wanted, settings
):
    cfg = config(f"model={size}", f"data.shards={demo_shards}", *settings)
    table = sample_table(cfg, latent_geometry(cfg, build_autoencoder(cfg.autoencoder)))
    flops = sample_flops(cfg)
    plan = open_plan(cfg.data, table)
    stream = BatchStream(cfg.data, plan, 0, world, DataState(cfg.data.seed, 0, 0))
    first = list(itertools.islice(step_flops(stream, flops, grad_accum), 10))
    budget = budget_steps_wanted * float(np.mean(first)) * 1.013  # not a whole number of steps

    steps, planned = budget_steps(budget, cfg.data, plan, flops, grad_accum, world)

    assert planned == pytest.approx(budget, rel=0.02)
    assert budget_steps_wanted * 0.8 < steps < budget_steps_wanted * 1.2
    if world == 1 and grad_accum == 1:  # the same FLOPs, counted from the loader's own plan
        batches = (
            plan.batch(0, epoch, index)
            for epoch in itertools.count()
            for index in range(len(plan.epoch(0, epoch)))
        )
        expected = sum(
            flops(b.shape_of(i))
            for b in itertools.islice(batches, steps)
            for i in range(len(b.sample_ids))
        )
        assert planned == pytest.approx(expected, rel=1e-12)


def eval_parts(demo_shards: Path, held_out: Path, run_dir: Path, samples: int = 6):
    """A micro DiT with random (seeded) weights and an Evaluator of this process's rank."""
    cfg = config(
        "model=micro",
        f"data.shards={demo_shards}",
        f"eval.shards={held_out}",
        f"eval.samples={samples}",
        "eval.timesteps=3",
        "eval.times=3",
    )
    runtime = init_runtime("cpu", "fp32")
    torch.manual_seed(0)
    encoders = FrozenEncoders(cfg, runtime.device)
    source = online_source(cfg, encoders)
    model = build_dit(cfg, source.latent_channels, source.text_dim)
    for p in model.parameters():  # leave adaLN-Zero's identity start, so the weights matter
        torch.nn.init.normal_(p, std=0.02)
    table = build_bucket_table(cfg, encoders.autoencoder)
    # Evaluation splits by data-parallel rank: plain data parallelism over this world.
    dims = ParallelDims.resolve(ParallelConfig(backend="ddp"), runtime.world_size, runtime.rank)
    evaluator = Evaluator(
        cfg.eval, cfg.data, table, source, cfg.flow, runtime, dims, run_dir, {"model": "micro"}
    )
    return model, evaluator, cfg, table, source, runtime, dims


def test_evaluation_is_fixed_and_deterministic(demo_shards, held_out, tmp_path):
    model, first, cfg, table, source, runtime, dims = eval_parts(
        demo_shards, held_out, tmp_path / "a"
    )
    rng_before = torch.get_rng_state()
    metrics = first(model, {"step": 3}, final=True)
    assert torch.equal(torch.get_rng_state(), rng_before)  # training randomness is untouched
    assert first(model, {"step": 4}, final=False) == metrics
    second = eval_parts(demo_shards, held_out, tmp_path / "b")[1]
    assert second(model, {"step": 3}, final=True) == metrics

    result = json.loads((tmp_path / "a" / "eval" / "final.json").read_text())
    assert result["loss"] == metrics["eval/loss"] and result["model"] == "micro"
    assert result["samples"] == 6 == sum(b["samples"] for b in result["buckets"].values())
    overall = sum(b["loss"] * b["samples"] for b in result["buckets"].values()) / 6
    assert overall == pytest.approx(result["loss"], rel=1e-12)
    assert len(result["sample_losses"]) == 6  # each held-out sample's own loss, by key
    assert np.mean(list(result["sample_losses"].values())) == pytest.approx(result["loss"])
    at_time = result["loss_at_time"]  # eval.times=3: 1/6, 1/2, 5/6
    assert list(at_time) == ["0.167", "0.5", "0.833"]
    assert all(metrics[f"eval/loss_at_time/{t}"] == at_time[t]["loss"] for t in at_time)
    for time, values in at_time.items():
        per_bucket = [b["loss_at_time"][time] for b in result["buckets"].values()]
        mean = sum(v["loss"] * v["samples"] for v in per_bucket) / 6
        assert values["samples"] == 6 and mean == pytest.approx(values["loss"], rel=1e-12)
    assert len(set(round(v["loss"], 6) for v in at_time.values())) == 3  # the times differ
    assert (tmp_path / "a" / "eval" / "step_00000004.json").exists()

    # Weights that change: a random nudge (a constant one added to patch_embed's weight would
    # shift every token's channels alike, which each LayerNorm then removes up to rounding).
    with torch.no_grad():
        nudge = torch.randn(
            model.patch_embed.weight.shape, generator=torch.Generator().manual_seed(1)
        )
        model.patch_embed.weight.add_(0.1 * nudge)
    changed = first(model, {"step": 5}, final=False)["eval/loss"]
    assert abs(changed - metrics["eval/loss"]) > 1e-4 * metrics["eval/loss"]

    with pytest.raises(ValueError, match="fewer than eval.samples=1000"):
        Evaluator(
            EvalConfig(shards=str(held_out), samples=1000),
            cfg.data,
            table,
            source,
            cfg.flow,
            runtime,
            dims,
            tmp_path,
            {},
        )


def _evaluate_as_rank(rank: int, world: int, store: Path, demo_shards, held_out, run_dir) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    # A store in a file: no port to choose, which another process could take first.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, evaluator, *_ = eval_parts(demo_shards, held_out, run_dir, samples=7)
    evaluator(model, {"step": 1}, final=True)
    shutdown(finished=True)


@pytest.mark.multiprocess
def test_two_ranks_share_the_set_and_reduce_to_the_single_process_loss(
    demo_shards, held_out, tmp_path
):
    ranks = (2, tmp_path / "store", demo_shards, held_out, tmp_path / "two")
    mp.spawn(_evaluate_as_rank, args=ranks, nprocs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: a matmul's rounding may depend on its threads
    try:
        model, single, *_ = eval_parts(demo_shards, held_out, tmp_path / "one", samples=7)
        single(model, {"step": 1}, final=True)
    finally:
        torch.set_num_threads(threads)

    two, one = (json.loads((tmp_path / d / "eval/final.json").read_text()) for d in ("two", "one"))
    assert two["samples"] == one["samples"] == 7  # each sample once, on one of the ranks
    # Bit for bit: each sample's losses come from one rank, and are summed in the set's order.
    assert two["buckets"] == one["buckets"] and two["sample_losses"] == one["sample_losses"]
    for key in ("loss", "loss_se", "loss_at_time"):
        assert two[key] == one[key], key


# --- the fit --------------------------------------------------------------------------------

# Chinchilla's fitted law L(N, D) = E + A / N^alpha + B / D^beta with C = 6 N D: the optimum is
# N* ∝ C^(beta / (alpha + beta)) and D* ∝ C^(alpha / (alpha + beta)).
E, A, ALPHA, B, BETA = 1.69, 406.4, 0.34, 410.7, 0.28
TRUE_A, TRUE_B = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)


def synthetic_runs(noise: float, seed: int = 0) -> list[Run]:
    """7 sizes around each of 5 budgets' optimum, losses from the known law plus noise."""
    rng = np.random.default_rng(seed)
    scale = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    runs = []
    for budget in np.geomspace(1e18, 1e21, 5):
        n_opt = scale * (budget / 6) ** TRUE_A
        for params in n_opt * np.exp(np.linspace(-1.5, 1.5, 7)):
            tokens = budget / (6 * params)
            loss = E + A / params**ALPHA + B / tokens**BETA + rng.normal(0, noise)
            runs.append(Run("synthetic", params, budget, budget, tokens, loss, noise, ""))
    return runs


def test_fit_recovers_known_exponents_with_intervals_that_cover_them():
    fit = fit_scaling(synthetic_runs(noise=0.005), draws=300)
    for name, truth in [("n_opt", TRUE_A), ("d_opt", TRUE_B)]:
        low, high = fit[name]["exponent_ci95"]
        assert fit[name]["exponent"] == pytest.approx(truth, abs=0.015), name
        assert low <= truth <= high, name
        assert high - low < 0.05, name  # and informative
    assert fit["bootstrap"]["valid"] == 300
    assert all(c["interior"] for c in fit["isoflops"])


def with_sample_losses(runs: list[Run], samples: int, spread: float, noise: float) -> list[Run]:
    """Per-sample losses as a real held-out set gives them: every sample is easier or harder by
    the same amount for every run (`spread`), plus a little per-run scatter (`noise`)."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, spread, samples)
    out = []
    for run in runs:
        losses = run.loss + difficulty + rng.normal(0, noise, samples)
        by_key = {f"sample-{k}": float(v) for k, v in enumerate(losses)}
        se = float(np.std(losses, ddof=1) / np.sqrt(samples))
        out.append(replace(run, loss=float(losses.mean()), loss_se=se, sample_losses=by_key))
    return out


def test_bootstrap_over_shared_samples_is_tighter_than_treating_runs_as_independent():
    runs = with_sample_losses(synthetic_runs(noise=0.0), samples=40, spread=0.3, noise=0.003)
    paired = fit_scaling(runs, draws=200)
    unpaired = fit_scaling([replace(r, sample_losses=None) for r in runs], draws=200)
    assert paired["bootstrap"]["method"].startswith("the 40 held-out samples")
    assert unpaired["bootstrap"]["method"].startswith("parametric")
    for name, truth in [("n_opt", TRUE_A), ("d_opt", TRUE_B)]:
        low, high = paired[name]["exponent_ci95"]
        assert low <= truth <= high, name
        unpaired_low, unpaired_high = unpaired[name]["exponent_ci95"]
        # The samples' shared difficulty (SE ~0.05) cancels between runs; redrawn per run, it
        # swamps the curvature of the IsoFLOP curves.
        assert 3 * (high - low) < unpaired_high - unpaired_low, name


def test_fit_without_minima_says_why():
    runs = synthetic_runs(noise=0.0)
    two_sizes = [r for i, r in enumerate(runs) if i % 7 < 2]  # no parabola through 2 sizes
    fit = fit_scaling(two_sizes, draws=10)
    assert fit["n_opt"] is None and fit["note"].startswith("0 of 5 budgets")
    falling = [r for i, r in enumerate(runs) if 2 <= i % 7 <= 4 or r.budget > 1e18]
    falling = [replace(r, loss=-r.loss) if r.budget > 1e18 else r for r in falling]
    fit = fit_scaling(falling, draws=10)  # 4 budgets' parabolas open downwards
    assert fit["n_opt"] is None and fit["note"].startswith("1 of 5 budgets")
    below = [r for i, r in enumerate(runs) if i % 7 < 3]  # every size smaller than the optimum
    fit = fit_scaling(below, draws=10)  # convex, but each vertex is an extrapolation
    assert all(c["n_opt"] and not c["interior"] for c in fit["isoflops"])
    assert fit["n_opt"] is None and fit["note"].startswith("0 of 5 budgets")


def test_fit_sweep_writes_json_and_labelled_plots(tmp_path):
    for i, run in enumerate(synthetic_runs(noise=0.005)):
        (tmp_path / f"{i}" / "eval").mkdir(parents=True)
        (tmp_path / f"{i}" / "eval" / "final.json").write_text(
            json.dumps(
                {
                    "model": f"n{run.params:.3g}",
                    "params": run.params,
                    "budget_flops": run.budget,
                    "flops_seen": run.flops,
                    "tokens_seen": run.tokens,
                    "loss": run.loss,
                    "loss_se": run.loss_se,
                    "loss_at_time": {"0.5": {"loss": 2 * run.loss, "loss_se": run.loss_se}},
                }
            )
        )
    fit = fit_sweep(tmp_path, draws=50)
    at_time = fit_sweep(tmp_path, tmp_path / "at_time", draws=50, metric="loss_at_time/0.5")
    assert [r["loss"] for r in at_time["runs"]] == [2 * r["loss"] for r in fit["runs"]]
    with pytest.raises(ValueError, match=r"loss_at_time/0.9: .* it has loss, loss_at_time/0.5"):
        fit_sweep(tmp_path, draws=50, metric="loss_at_time/0.9")
    out = tmp_path / "scaling"
    assert (
        json.loads((out / "fit.json").read_text())["n_opt"]["exponent"] == fit["n_opt"]["exponent"]
    )
    for plot in ("loss_vs_compute.png", "isoflops.png", "compute_optimal.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


# --- a real sweep ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_runs_as_a_hydra_multirun_and_fits(demo_shards, held_out, tmp_path):
    """2 sizes x 2 budgets through `python -m train -m`, then `python -m launch.scaling fit`."""
    sweep = tmp_path / "sweep"
    overrides = [
        f"data.shards={demo_shards}",
        f"eval.shards={held_out}",
        "eval.samples=4",
        "eval.timesteps=2",
        "autoencoder.checkpoint=null",
        "logger=none",
        "data.num_workers=0",
    ]
    subprocess.run(
        [sys.executable, "-m", "train", "-m", "experiment=scaling_demo", "model=micro,tiny"]
        + ["train.budget_flops=6e8,1.2e9", f"hydra.sweep.dir={sweep}", *overrides],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    results = sorted(sweep.glob("*/eval/final.json"))
    assert len(results) == 4
    for path in results:
        result = json.loads(path.read_text())
        cfg = config(f"model={result['model']}", overrides[0])
        table = build_bucket_table(cfg, build_autoencoder(cfg.autoencoder))
        plan = open_plan(cfg.data, table)
        steps, planned = budget_steps(
            result["budget_flops"], cfg.data, plan, sample_flops(cfg), 1, 1
        )
        # The run trained exactly the derived steps and spent exactly the planned FLOPs.
        assert (result["steps"], result["step"], result["flops_seen"]) == (steps, steps, planned)

    fitted = subprocess.run(
        [sys.executable, "-m", "launch.scaling", "fit", str(sweep), "--bootstrap", "20"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    fit = json.loads((sweep / "scaling" / "fit.json").read_text())
    assert len(fit["runs"]) == 4 and "fit.json" in fitted.stdout
    for plot in ("loss_vs_compute.png", "isoflops.png"):
        assert (sweep / "scaling" / plot).read_bytes()[:4] == b"\x89PNG"

    # The same runs fitted on their loss at one fixed time.
    time = list(json.loads(results[0].read_text())["loss_at_time"])[1]
    metric = ["--metric", f"loss_at_time/{time}", "--out", str(tmp_path / "at_time")]
    subprocess.run(
        [sys.executable, "-m", "launch.scaling", "fit", str(sweep), "--bootstrap", "20", *metric],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    at_time = json.loads((tmp_path / "at_time" / "fit.json").read_text())
    assert at_time["metric"] == f"loss_at_time/{time}" and fit["metric"] == "loss"
    losses = {r["path"]: r["loss"] for r in at_time["runs"]}
    for path in results:
        expected = json.loads(path.read_text())["loss_at_time"][time]["loss"]
        assert losses[str(path.parent.parent)] == expected
