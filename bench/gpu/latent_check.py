"""Latent shards on one GPU: `python -m train.encode` under torchrun on CUDA (the encoders in
bf16 autocast, bf16 shards), then the DiT trained on them and, side by side, encoding online
(data.augment=false, so both see the same clips and batches): step time, tokens/s, and the
rank's peak GPU memory (the encoders are not built on latents). The losses are compared, not
required equal: bf16 storage rounds the latents. Writes latents.json to --out; exits 1 when the
encoding or a run fails, or the two runs saw other samples.

    python -m bench.gpu.latent_check --bundle .gpu_bundle --out $OUT
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import torch

from bench.gpu.trainer_check import check_parser, torchrun

WARMUP = 5


def common(bundle: Path, autoencoder: Path) -> list[str]:
    return [
        f"text_encoder.path={bundle / 'minilm_fp16'}",
        f"autoencoder.checkpoint={autoencoder}",
        "data.augment=false",
        "train.precision=bf16",
    ]


def run_figures(run_dir: Path) -> dict:
    """Medians over the steps after the warm-up, and the consumed sample keys."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [row for row in rows if row["step"] > WARMUP]
    keys = (run_dir / "consumed" / "rank0.jsonl").read_text().splitlines()
    step_s = [
        (b["progress/samples_seen"] - a["progress/samples_seen"]) / b["perf/samples_per_s"]
        for a, b in zip(rows, rows[1:], strict=False)
        if b["step"] > WARMUP
    ]
    return {
        "tokens_per_s": statistics.median(row["perf/tokens_per_s"] for row in timed),
        "step_ms": 1e3 * statistics.median(step_s),
        "peak_gpu_memory_gib": max(row.get("perf/peak_gpu_memory_gib", 0.0) for row in rows),
        "losses": [row["train/loss"] for row in rows],
        "keys": [json.loads(line)["keys"] for line in keys],
    }


def main() -> None:
    parser = check_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    from safetensors.torch import save_file  # after --help: the run's packages

    from model.autoencoder import build_autoencoder
    from train.encode import compose_config

    work = args.out / "latent_runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(0)  # train.encode refuses an untrained autoencoder: any fixed weights do
    autoencoder = work / "autoencoder.safetensors"
    config = compose_config(["autoencoder.checkpoint=null"])
    save_file(build_autoencoder(config.autoencoder).state_dict(), autoencoder)
    shared = common(args.bundle, autoencoder)
    latents = work / "latents"
    pixels = args.bundle / "demo" / "shards"
    _, encode_s = torchrun(
        ["-m", "train.encode", "--out", str(latents), *shared, f"data.shards={pixels}"],
        args.out / "encode.log",
    )
    report = json.loads((latents / "report.json").read_text())
    figures = {}
    for name, shards in (("online", pixels), ("latents", latents)):
        run_dir = work / name
        overrides = shared + [
            f"data.shards={shards}",
            f"train.run_dir={run_dir}",
            f"model={args.model}",
            f"train.steps={args.steps}",
            "train.log_every=1",
            f"train.checkpoint_every={args.steps}",
            "train.record_samples=true",
            "train.sample_prompts=[]",
            "logger=none",
        ]
        torchrun(["-m", "train", *overrides], args.out / f"{name}.log")
        figures[name] = run_figures(run_dir)
    online, stored = figures["online"], figures["latents"]
    result = {
        "model": args.model,
        "encode_s": encode_s,
        "encoded_samples": report["samples"],
        "skipped_while_encoding": len(report["skipped"]),
        "same_keys": online.pop("keys") == stored.pop("keys"),
        "max_loss_rel_diff": max(
            abs(a - b) / abs(a) for a, b in zip(online["losses"], stored["losses"], strict=True)
        ),
        "speedup": stored["tokens_per_s"] / online["tokens_per_s"],
        "online": online,
        "latents": stored,
    }
    shutil.rmtree(work)
    (args.out / "latents.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("online", "latents")}, indent=2))
    for name in ("online", "latents"):
        row = result[name]
        print(
            f"{name}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s, "
            f"peak GPU memory {row['peak_gpu_memory_gib']:.2f} GiB"
        )
    if not result["same_keys"]:
        raise SystemExit("latent check failed: the runs on latents and on pixels saw other samples")
    print("latent check passed: encoded, trained on latents, the same batches as online")


if __name__ == "__main__":
    main()
