"""python -m data.prepare SOURCE --out SHARDS [options] [key=value ...]"""

from __future__ import annotations

import argparse

from data.prepare.config import load_config
from data.prepare.run import prepare

EXAMPLES = """
options (key=value, checked before any work; see data/prepare/config.py):
  shard_size_mb=256 seed=0 crf=18 workers=N
  split.enabled=true split.threshold=27 split.min_clip_s=0.5
  filter.min_duration_s=1 filter.max_duration_s=60 filter.min_width=256 filter.min_height=256
  filter.min_aspect=0.5 filter.max_aspect=2.5 filter.min_fps=12 filter.max_fps=60
  filter.min_motion=1.0 filter.aesthetic_model=scorer.pt filter.min_aesthetic=4.5
  recaption.model=/models/my-vlm recaption.prompt='...' recaption.frames=4 recaption.batch_size=8

examples:
  python -m data.prepare my_videos/ --out my_shards
  python -m data.prepare captions.csv --out my_shards split.enabled=true filter.min_duration_s=2
  RAY_ADDRESS=ray://head:10001 python -m data.prepare s3://bucket/raw/ --out /shared/shards
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Probe, split, filter, recaption and pack videos and images into shards.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source",
        help="folder, s3:// or gs:// prefix, or CSV/JSON/JSONL/Parquet list: Tessera's (file "
        "[+ caption]), Open-Sora's (path + text), DiffSynth-Studio's (video or image + prompt), "
        "LTX-Video-Trainer's (media_path + caption) or musubi-tuner's (video_path or "
        "image_path + caption)",
    )
    parser.add_argument("--out", required=True, help="folder for the shards, manifest and report")
    parser.add_argument(
        "--address", help="a Ray cluster to run on (default: $RAY_ADDRESS, else local)"
    )
    parser.add_argument(
        "--inline", action="store_true", help="run in this one process, without Ray"
    )
    parser.add_argument("options", nargs="*", help="key=value settings")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.options)
    except ValueError as error:
        parser.error(str(error))
    return prepare(
        args.source, args.out, cfg, runner="inline" if args.inline else "ray", address=args.address
    )


if __name__ == "__main__":
    main()
