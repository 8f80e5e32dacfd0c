"""What one evaluation costs, counted in training steps, so that users can choose eval.every.

    python -m bench.evaluate [--steps 12] [--videos 8] [--threads 2]

Builds its inputs in a temporary folder: the demo shards and their held-out set (seed 1), a
seeded random-init demo autoencoder (bench/latents.py's `build_inputs`), and feature networks
of the real architectures with random weights (nothing is downloaded; a network's cost does not
depend on its weights): VideoMAE-base for FVD (16 frames at 224x224, as content-debiased FVD
uses it) and CLIP ViT-B/32 for the CLIP score, its tokenizer a word-level one over the demo's
captions. Then `python -m train experiment=demo` (the embedded default: tiny DiT) trains
`--steps` steps and evaluates once, at the end: the fixed loss on the held-out set (eval=demo:
32 samples, 4 quantile times and 5 fixed times each) and `--videos` videos generated at the
demo's sample size (17 frames, 64x64, 20 steps) and scored.

Reported: the median training step after the first two (the trainer's `perf/step_s`), and the
evaluation's parts (the record's `seconds`: the loss, generating the videos, scoring them, the
total) in seconds and in training steps. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    PreTrainedTokenizerFast,
    VideoMAEConfig,
    VideoMAEImageProcessor,
    VideoMAEModel,
)

from bench.latents import build_inputs, threads_env
from data.demo import build_demo

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]


def videomae_base(folder: Path) -> Path:
    VideoMAEModel(VideoMAEConfig()).eval().save_pretrained(folder)  # the base defaults
    VideoMAEImageProcessor().save_pretrained(folder)
    return folder


def clip_b32(folder: Path, captions: list[str]) -> Path:
    """CLIP ViT-B/32 (transformers' defaults), random, with a word-level tokenizer."""
    words = sorted({word for text in captions for word in re.findall(r"\w+|[^\w\s]", text.lower())})
    tokenizer = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(SPECIAL + words)}, unk_token="<unk>")
    )
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=77,
    )
    fast.save_pretrained(folder)
    text = {"vocab_size": len(SPECIAL) + len(words), "bos_token_id": 2, "eos_token_id": 3}
    CLIPModel(CLIPConfig(text_config=text)).eval().save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


def captions_of(shards: Path) -> list[str]:
    """The captions and recaptions `data.demo.build_demo` wrote beside the shards' clips."""
    with open(shards.parent / "clips" / "captions.csv", newline="") as file:
        return [text for row in csv.DictReader(file) for text in (row["caption"], row["recaption"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        pixels, autoencoder = build_inputs(tmp, clips=30, images=15)
        held_out = build_demo(tmp / "held_out", clips_per_source=12, images_per_source=6, seed=1)
        fvd_model = videomae_base(tmp / "videomae")
        clip_model = clip_b32(tmp / "clip", captions_of(held_out))
        overrides = [
            "experiment=demo",
            f"data.shards={pixels}",
            f"autoencoder.checkpoint={autoencoder}",
            f"train.steps={args.steps}",
            "train.log_every=1",
            f"train.checkpoint_every={args.steps}",
            "train.sample_prompts=[]",
            "train.device=cpu",
            "logger=none",
            "eval=demo",
            f"eval.shards={held_out}",
            f"eval.videos={args.videos}",
            f"eval.fvd_model={fvd_model}",
            f"eval.clip_model={clip_model}",
        ]
        run = tmp / "run"
        command = [sys.executable, "-m", "train", *overrides, f"train.run_dir={run}"]
        done = subprocess.run(command, env=threads_env(args.threads), capture_output=True)
        if done.returncode:
            raise RuntimeError(f"python -m train failed:\n{done.stderr.decode()[-3000:]}")
        steps = [m["perf/step_s"] for m in read_metrics(run) if "perf/step_s" in m][2:]
        seconds = json.loads((run / "eval" / "final.json").read_text())["seconds"]
    step = statistics.median(steps)
    report = {
        "step_s": round(step, 4),
        "videos": args.videos,
        "seconds": {part: round(value, 2) for part, value in seconds.items()},
        "in_steps": {part: round(value / step, 1) for part, value in seconds.items()},
    }
    print(json.dumps(report))


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    main()
