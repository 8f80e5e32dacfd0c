"""Scaling laws from a compute-budget sweep: `python -m launch.scaling fit <sweep dir>`.

A sweep is a Hydra multirun over model sizes N and budgets C (`train.budget_flops`; the runs
derive their steps from it), e.g. `python -m train -m experiment=scaling_demo`. Every run
leaves `eval/final.json` with its fixed evaluation loss (and its loss at fixed flow times),
parameters N, the FLOPs it spent and the latent tokens it trained on, D. This module reads them
and fits the loss, or with `--metric loss_at_time/<t>` the loss at one time, as in
Chinchilla's IsoFLOP approach:

- per budget, a parabola of the loss in ln N; its vertex is that budget's optimal N*, and
  D* is read off the budget's near-linear ln D against ln N at the vertex;
- N*(C) = k C^a and D*(C) = k' C^b by least squares in log-log space;
- 95% confidence intervals of a and b by a bootstrap over the held-out set: every draw
  resamples the evaluation samples with replacement, the same ones for every run (the runs
  share the set, fixed times and noise, so what is common to them cancels as it should),
  recomputes each run's loss from its per-sample losses and refits everything. Runs without
  per-sample losses get a parametric bootstrap instead: each loss is redrawn around its
  budget's parabola with the larger of its standard error and the parabola's residual scatter.

It writes `fit.json` and three plots (loss against compute per size, the IsoFLOP curves,
N* and D* against C) into `<sweep dir>/scaling/` or `--out`. It never imports the trainer:
the runs' JSON files are the whole interface.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

CONFIDENCE = (2.5, 97.5)  # percentiles of the bootstrap: a 95% interval


@dataclass(frozen=True)
class Run:
    model: str
    params: float  # N
    budget: float  # C, the budget the run was given
    flops: float  # the training FLOPs it spent
    tokens: float  # D, latent tokens trained on
    loss: float  # final evaluation loss
    loss_se: float  # its standard error over the held-out samples
    path: str
    sample_losses: dict[str, float] | None = None  # per held-out sample, by key


@dataclass
class IsoFlop:
    """One budget's parabola loss = c2 x² + c1 x + c0 in x = ln N, and its vertex."""

    budget: float
    coeffs: list[float]  # [c2, c1, c0]
    n_opt: float | None  # None when the parabola opens downwards or its vertex is far off
    d_opt: float | None
    loss_opt: float | None
    interior: bool  # the vertex lies within the budget's sizes (not extrapolated)


def collect_runs(sweep_dir: Path, metric: str = "loss") -> list[Run]:
    """Every run under `sweep_dir` with an eval/final.json; its loss is `metric`'s."""
    runs = []
    for path in sorted(sweep_dir.glob("**/eval/final.json")):
        values = json.loads(path.read_text())
        missing = {"model", "params", "budget_flops", "flops_seen", "tokens_seen", "loss"} - set(
            values
        )
        if missing:
            raise ValueError(f"{path}: missing {sorted(missing)}; not a Tessera evaluation result")
        if values["budget_flops"] <= 0:
            raise ValueError(
                f"{path}: budget_flops is {values['budget_flops']}: the run had no compute "
                "budget (train.budget_flops), so it belongs to no IsoFLOP curve"
            )
        loss, loss_se, sample_losses = _metric(values, metric, path)
        runs.append(
            Run(
                values["model"],
                values["params"],
                values["budget_flops"],
                values["flops_seen"],
                values["tokens_seen"],
                loss,
                loss_se,
                str(path.parent.parent),
                sample_losses,
            )
        )
    if not runs:
        raise FileNotFoundError(
            f"{sweep_dir}: no */eval/final.json; run the sweep first (python -m train -m ...) "
            "with an evaluation set (eval.shards)"
        )
    return runs


def fit_isoflop(budget: float, params, tokens, losses) -> IsoFlop | None:
    """The budget's parabola in ln N, or None with fewer than 3 distinct sizes."""
    log_n, log_d = np.log(params), np.log(tokens)
    if len(np.unique(log_n)) < 3:
        return None
    coeffs = np.polyfit(log_n, losses, 2)
    if coeffs[0] <= 0:
        return IsoFlop(budget, coeffs.tolist(), None, None, None, False)
    x = -coeffs[1] / (2 * coeffs[0])
    interior = bool(log_n.min() <= x <= log_n.max())
    if not interior and abs(x) > 2 * np.abs(log_n).max():  # far off: exp() would overflow
        return IsoFlop(budget, coeffs.tolist(), None, None, None, False)
    slope, intercept = np.polyfit(log_n, log_d, 1)
    return IsoFlop(
        budget,
        coeffs.tolist(),
        float(np.exp(x)),
        float(np.exp(intercept + slope * x)),
        float(np.polyval(coeffs, x)),
        interior,
    )


def fit_power_law(budgets, values) -> tuple[float, float]:
    """(exponent, prefactor) of values = prefactor · budgets^exponent."""
    exponent, log_prefactor = np.polyfit(np.log(budgets), np.log(values), 1)
    return float(exponent), float(np.exp(log_prefactor))


def _fit_laws(curves: list[IsoFlop]) -> dict | None:
    """The power laws of N* and D*, from the budgets whose minimum lies within their sizes (an
    extrapolated vertex says nothing reliable); None with fewer than 2."""
    optimal = [c for c in curves if c.n_opt is not None and c.interior]
    if len(optimal) < 2:
        return None
    budgets = [c.budget for c in optimal]
    return {
        "n_opt": fit_power_law(budgets, [c.n_opt for c in optimal]),
        "d_opt": fit_power_law(budgets, [c.d_opt for c in optimal]),
    }


def _groups(runs: list[Run]) -> dict[float, list[Run]]:
    groups: dict[float, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.budget, r.params)):
        groups.setdefault(run.budget, []).append(run)
    return groups


def _curves(groups: dict[float, list[Run]], losses: dict[float, np.ndarray]) -> list[IsoFlop]:
    curves = [
        fit_isoflop(budget, [r.params for r in group], [r.tokens for r in group], losses[budget])
        for budget, group in groups.items()
    ]
    return [c for c in curves if c is not None]


def _redraw_noise(group: list[Run], fitted: np.ndarray) -> np.ndarray:
    """Each run's noise scale: its eval standard error, or the scatter about the parabola."""
    observed = np.array([r.loss for r in group])
    dof = len(group) - 3
    residual = np.sqrt(np.sum((observed - fitted) ** 2) / dof) if dof > 0 else 0.0
    return np.maximum([r.loss_se for r in group], residual)


def _shared_samples(runs: list[Run]) -> list[str] | None:
    """The held-out samples that every run scored, if every run has per-sample losses on the
    same set; else None."""
    if any(not r.sample_losses for r in runs):
        return None
    keys = set(runs[0].sample_losses)
    return sorted(keys) if all(set(r.sample_losses) == keys for r in runs) else None


def _resampled_losses(
    groups: dict[float, list[Run]], keys: list[str], rng: np.random.Generator, draws: int
):
    """Per draw, every run's loss over a resample (with replacement) of the held-out set."""
    per_sample = {
        b: np.array([[r.sample_losses[k] for k in keys] for r in group])
        for b, group in groups.items()
    }
    for _ in range(draws):
        chosen = rng.integers(0, len(keys), len(keys))
        yield {b: values[:, chosen].mean(axis=1) for b, values in per_sample.items()}


def _redrawn_losses(groups: dict[float, list[Run]], curves: list[IsoFlop], rng, draws: int):
    """Per draw, every run's loss redrawn around its budget's parabola (parametric)."""
    fitted = {
        c.budget: np.polyval(c.coeffs, np.log([r.params for r in groups[c.budget]])) for c in curves
    }
    noise = {b: _redraw_noise(groups[b], fitted[b]) for b in fitted}
    for _ in range(draws):
        yield {b: fitted[b] + rng.normal(0.0, noise[b]) for b in fitted}


def fit_scaling(runs: list[Run], draws: int = 1000, seed: int = 0) -> dict:
    """IsoFLOP curves, and N*(C) and D*(C) with bootstrap confidence intervals where at least
    two budgets have a minimum (else those two are None and `note` says why)."""
    groups = _groups(runs)
    observed = {b: np.array([r.loss for r in group]) for b, group in groups.items()}
    curves = _curves(groups, observed)
    result = {
        "runs": [asdict(r) for r in runs],
        "isoflops": [asdict(c) for c in curves],
        "n_opt": None,
        "d_opt": None,
    }
    laws = _fit_laws(curves)
    if laws is None:
        minima = len([c for c in curves if c.n_opt is not None and c.interior])
        result["note"] = (
            f"{minima} of {len(groups)} budgets have an IsoFLOP minimum within their sizes (3+ "
            "sizes and a loss that rises on both sides of it); the power laws need 2: add sizes "
            "around the best one, or budgets"
        )
        return result
    rng = np.random.default_rng(seed)
    keys = _shared_samples(runs)
    if keys is not None:
        method = f"the {len(keys)} held-out samples, resampled for all runs together"
        losses = _resampled_losses(groups, keys, rng, draws)
    else:
        method = "parametric: losses redrawn around each budget's parabola"
        losses = _redrawn_losses(groups, curves, rng, draws)
    fitted_budgets = {c.budget for c in curves}
    samples = []
    for redrawn in losses:
        draw = _fit_laws(_curves({b: groups[b] for b in fitted_budgets}, redrawn))
        if draw is not None:
            samples.append(draw)
    for name in ("n_opt", "d_opt"):
        exponent, prefactor = laws[name]
        exponents = [s[name][0] for s in samples]
        result[name] = {
            "exponent": exponent,
            "prefactor": prefactor,
            "exponent_ci95": np.percentile(exponents, CONFIDENCE).tolist() if samples else None,
            "draws": [list(s[name]) for s in samples],
        }
    result["bootstrap"] = {"draws": draws, "valid": len(samples), "seed": seed, "method": method}
    return result


# --- plots ----------------------------------------------------------------------------------


def _count(n: float) -> str:
    """1.5e6 -> '1.5M', 3e9 -> '3B'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def _ticks_at(axis, values, labels) -> None:
    """Labelled ticks at the sweep's own sizes or budgets only, when there are few: a log axis
    over a decade or two otherwise crowds its minor labels into each other."""
    if len(values) > 8:
        return
    axis.set_ticks(values, labels)
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _budget_ticks(axis, budgets) -> None:
    budgets = sorted(set(budgets))
    _ticks_at(axis, budgets, [f"{b:.3g}" for b in budgets])


def plot_loss_vs_compute(runs: list[Run], path: Path) -> None:
    """One line per model size, coloured by its parameters; named in a legend when few."""
    sizes = sorted({r.params for r in runs})
    cmap = matplotlib.colors.ListedColormap(plt.cm.plasma(np.linspace(0.0, 0.85, 256)))
    norm = matplotlib.colors.LogNorm(min(sizes), max(sizes) * 1.001)  # a valid range for 1 size
    fig, ax = plt.subplots(figsize=(7, 5))
    for params in sizes:
        color = cmap(norm(params))
        mine = sorted((r for r in runs if r.params == params), key=lambda r: r.flops)
        label = f"{mine[0].model} ({_count(params)} params)"
        ax.plot([r.flops for r in mine], [r.loss for r in mine], "o-", color=color, label=label)
    ax.set(
        xscale="log",
        xlabel="training compute C (FLOPs)",
        ylabel="evaluation loss",
        title="Evaluation loss against compute, per model size",
    )
    _budget_ticks(ax.xaxis, [r.budget for r in runs])
    ax.grid(True, which="both", alpha=0.3)
    if len(sizes) <= 10:
        ax.legend(title="model")
    else:  # too many sizes to name: a colour scale of N instead
        fig.colorbar(plt.cm.ScalarMappable(norm, cmap), ax=ax, label="parameters N")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_isoflops(runs: list[Run], fit: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    groups = _groups(runs)
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(groups)))
    curves = {c["budget"]: c for c in fit["isoflops"]}
    for color, (budget, group) in zip(colors, groups.items(), strict=True):
        params = np.array([r.params for r in group])
        ax.plot(params, [r.loss for r in group], "o", color=color, label=f"C = {budget:.3g} FLOPs")
        curve = curves.get(budget)
        if curve is None:
            continue
        grid = np.geomspace(params.min() / 1.5, params.max() * 1.5, 100)
        ax.plot(grid, np.polyval(curve["coeffs"], np.log(grid)), "-", color=color)
        if curve["n_opt"] is not None and curve["interior"]:
            ax.plot(curve["n_opt"], curve["loss_opt"], "*", color=color, markersize=14, mec="k")
    ax.plot([], [], "k*", markersize=10, label="IsoFLOP minimum N*")
    ax.set(
        xscale="log",
        xlabel="parameters N",
        ylabel="evaluation loss",
        title="IsoFLOP curves: loss against model size at fixed compute",
    )
    sizes = sorted({(r.params, r.model) for r in runs})
    _ticks_at(ax.xaxis, [n for n, _ in sizes], [f"{m}\n{_count(n)}" for n, m in sizes])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _metric(values: dict, metric: str, path: Path) -> tuple[float, float, dict | None]:
    """(loss, its standard error, per-sample losses or None) of `metric`: "loss", the fixed
    evaluation loss, or "loss_at_time/<t>", the loss at one of its fixed times (no per-sample
    losses: its bootstrap is the parametric one)."""
    if metric == "loss":
        return values["loss"], values.get("loss_se", 0.0), values.get("sample_losses")
    kind, _, time = metric.partition("/")
    at_time = values.get("loss_at_time", {})
    if kind != "loss_at_time" or time not in at_time:
        known = ", ".join(["loss", *(f"loss_at_time/{t}" for t in at_time)])
        raise ValueError(f"--metric {metric}: {path} has no such loss; it has {known}")
    return at_time[time]["loss"], at_time[time]["loss_se"], None


def plot_compute_optimal(fit: dict, path: Path) -> None:
    optimal = [c for c in fit["isoflops"] if c["n_opt"] is not None and c["interior"]]
    budgets = np.array([c["budget"] for c in optimal])
    grid = np.geomspace(budgets.min() / 2, budgets.max() * 2, 100)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, name, key, symbol, letter in [
        (axes[0], "n_opt", "n_opt", "N*", "a"),
        (axes[1], "d_opt", "d_opt", "D*", "b"),
    ]:
        law = fit[name]
        ax.plot(budgets, [c[key] for c in optimal], "o", label=f"IsoFLOP minima {symbol}")
        label = f"{symbol} ∝ C^{letter}, {letter} = {law['exponent']:.3f}"
        if law["exponent_ci95"]:
            low, high = law["exponent_ci95"]
            label += f" (95% CI {low:.3f} to {high:.3f})"
            lines = np.array([k * grid**e for e, k in law["draws"]])
            band = np.percentile(lines, CONFIDENCE, axis=0)
            ax.fill_between(grid, band[0], band[1], alpha=0.2, label="95% bootstrap band")
        ax.plot(grid, law["prefactor"] * grid ** law["exponent"], "-", label=label)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="training compute C (FLOPs)",
            ylabel="parameters N*" if key == "n_opt" else "latent tokens D*",
            title=f"Compute-optimal {'model size' if key == 'n_opt' else 'training tokens'}",
        )
        _budget_ticks(ax.xaxis, budgets)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fit_sweep(
    sweep_dir: Path,
    out: Path | None = None,
    draws: int = 1000,
    seed: int = 0,
    metric: str = "loss",
) -> dict:
    """Collect, fit `metric`, and write fit.json and the plots; returns the fit."""
    runs = collect_runs(sweep_dir, metric)
    fit = {"metric": metric, **fit_scaling(runs, draws, seed)}
    out = out or sweep_dir / "scaling"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit.json").write_text(json.dumps(fit, indent=2) + "\n")
    plot_loss_vs_compute(runs, out / "loss_vs_compute.png")
    plot_isoflops(runs, fit, out / "isoflops.png")
    if fit["n_opt"] is not None:
        plot_compute_optimal(fit, out / "compute_optimal.png")
    return fit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m launch.scaling", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="fit the scaling laws of a finished sweep")
    fit.add_argument("sweep_dir", type=Path, help="the sweep's directory (hydra.sweep.dir)")
    fit.add_argument("--out", type=Path, help="where to write (default: <sweep_dir>/scaling)")
    fit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws")
    fit.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    fit.add_argument(
        "--metric",
        default="loss",
        help="what to fit: loss (the fixed evaluation loss) or loss_at_time/<t>, the loss at "
        "one of eval.times' fixed times, as eval/final.json names it (e.g. loss_at_time/0.5)",
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"sweep_dir {args.sweep_dir}: no such directory")
    result = fit_sweep(args.sweep_dir, args.out, args.bootstrap, args.seed, args.metric)
    out = args.out or args.sweep_dir / "scaling"
    if result["n_opt"] is None:
        print(f"no compute-optimal fit: {result['note']}; wrote {out}/fit.json and 2 plots")
        return
    for name, symbol in [("n_opt", "N*"), ("d_opt", "D*")]:
        law = result[name]
        ci = law["exponent_ci95"]
        interval = f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else ""
        print(f"{symbol}(C) = {law['prefactor']:.3g} · C^{law['exponent']:.3f}{interval}")
    print(f"wrote {out}/fit.json and 3 plots")


if __name__ == "__main__":
    main()
