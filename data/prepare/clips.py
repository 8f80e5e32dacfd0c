"""Per-file work: read, probe, find the shots, measure motion, filter, and cut the clips.

A file becomes clip rows (plain dicts, so Ray can carry them) or dropped rows naming the
file and the reason. A clip keeps the file's own bytes when it is the whole file and the
loader can decode it as it is (decord reads it, no rotation); otherwise its frames are
re-encoded to H.264 mp4, upright, so every sample decodes fast in training.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from data.decode import IMAGE_EXTS, VIDEO_EXTS
from data.prepare.config import FilterConfig, PrepareConfig
from data.storage import read_bytes

try:
    import decord
except ImportError:  # no aarch64 wheel: PyAV probes everything
    decord = None

# Pillow reads these; the ones the loader does not take are converted to PNG.
STILL_EXTS = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff")


class Rejected(Exception):
    """A file or clip that cannot become a sample; the message is the report's reason."""


def dropped(source: dict, reason: str, clip: tuple[float, float] | None = None) -> dict:
    """A report row; `clip_s` is the clip's time range, None when the whole file is dropped
    (every row has the same keys, as Ray's Arrow blocks need)."""
    clip_s = [round(clip[0], 3), round(clip[1], 3)] if clip is not None else None
    return {"file": source["file"], "reason": reason, "clip_s": clip_s}


def cut_file(source: dict, cfg: PrepareConfig) -> tuple[list[dict], list[dict]]:
    """(clips, dropped) of one source file: never raises for bad input."""
    try:
        data = read_bytes(source["url"])
        if source["caption_url"]:
            caption = read_bytes(source["caption_url"]).decode("utf-8", errors="replace")
            source = source | {"caption": caption.strip()}
    except OSError as error:
        return [], [dropped(source, f"unreadable: {error}")]
    if not data:
        return [], [dropped(source, "corrupt: empty file")]
    ext = posixpath.splitext(source["file"])[1].lstrip(".").lower()
    try:
        if ext in STILL_EXTS:
            return [still_clip(source, data, ext)], []
        return video_clips(source, data, ext, cfg)
    except Rejected as error:
        return [], [dropped(source, str(error))]


# --- images ---------------------------------------------------------------------------------


def still_clip(source: dict, data: bytes, ext: str) -> dict:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # verify() misses truncated pixel data
    except Exception as error:  # Pillow raises many types for bad files
        raise Rejected(f"corrupt: not a readable image: {error}") from error
    if ext not in IMAGE_EXTS:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="PNG")
        data, ext = out.getvalue(), "png"
    meta = {"width": image.width, "height": image.height, "fps": 0.0, "frames": 1}
    return clip_row(source, 0, ext, data, meta | {"duration": 0.0})


# --- videos ---------------------------------------------------------------------------------


def video_clips(
    source: dict, data: bytes, ext: str, cfg: PrepareConfig
) -> tuple[list[dict], list[dict]]:
    info = probe_video(data)
    ranges, motion = [(0, info["frames"])], None
    if cfg.split.enabled or cfg.filter.min_motion is not None:
        cuts, motion = scan(data, info, cfg)
        if cfg.split.enabled:
            bounds = [0, *cuts, info["frames"]]
            ranges = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    whole = len(ranges) == 1
    reencode = not (whole and info["decord"] and info["rotation"] == 0 and ext in VIDEO_EXTS)
    clips, rejected = [], []
    for start, end in ranges:
        meta = clip_meta(info, start, end, motion)
        reason = filter_reason(meta, cfg.filter)
        if reason:
            rejected.append(dropped(source, reason, (start / info["fps"], end / info["fps"])))
            continue
        if not whole:
            meta["clip_s"] = [round(start / info["fps"], 3), round(end / info["fps"], 3)]
        clips.append((start, end, meta))
    if not clips:
        return [], rejected
    if reencode:
        return encode_clips(source, data, info, clips, cfg), rejected
    return [clip_row(source, 0, ext, data, clips[0][2])], rejected


def probe_video(data: bytes) -> dict:
    """width and height as displayed, fps, frames, rotation (degrees counter-clockwise) and
    whether decord reads the whole file. Rejected for anything that is not a decodable video."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise Rejected("no video stream")
            stream = container.streams.video[0]
            declared = stream.frames
            rate = stream.average_rate or stream.guessed_rate
            first = next(container.decode(stream), None)
    except Rejected:
        raise
    except Exception as error:  # FFmpeg's errors for corrupt data have many types
        raise Rejected(f"corrupt: {reason(error)}") from error
    if first is None or not rate:
        raise Rejected("corrupt: no decodable video frame")
    rotation = int(round((first.rotation or 0) / 90)) * 90 % 360
    info = {"rotation": rotation, "fps": float(rate), "decord": False}
    size = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    info["width"], info["height"] = size
    frames = decord_frames(data)
    if frames is not None:
        return info | {"frames": frames, "decord": True}
    decoded = count_frames(data)
    if declared and decoded < declared:
        raise Rejected(f"corrupt: truncated (decoded {decoded} of {declared} frames)")
    return info | {"frames": decoded}


def reason(error: Exception) -> str:
    """FFmpeg's own words, without PyAV's '<none>' file name for in-memory data."""
    return getattr(error, "strerror", None) or str(error)


def decord_frames(data: bytes) -> int | None:
    """The frame count if decord opens the file and decodes its first and last frame."""
    if decord is None:
        return None
    try:
        reader = decord.VideoReader(io.BytesIO(data))
        reader[0]
        reader[len(reader) - 1]
        return len(reader)
    except Exception:  # decord raises DECORDError or RuntimeError on codecs it lacks
        return None


def count_frames(data: bytes) -> int:
    count = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            for _ in container.decode(video=0):
                count += 1
    except Exception as error:
        raise Rejected(f"corrupt: decoding failed after {count} frames: {reason(error)}") from error
    return count


def displayed_frames(data: bytes, rotation: int, height: int | None = None) -> Iterator:
    """uint8 RGB frames, upright, resized to `height` (keeping the aspect) when given."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if height is not None:
                frame = frame.reformat(**stored_size(frame.width, frame.height, rotation, height))
            yield np.rot90(frame.to_ndarray(format="rgb24"), rotation // 90)


def stored_size(width: int, height: int, rotation: int, upright_height: int) -> dict:
    """The stored frame size whose upright height is `upright_height`, aspect kept, even."""
    turned = rotation in (90, 270)
    upright_w, upright_h = (height, width) if turned else (width, height)
    scaled_w = max(2, round(upright_w * upright_height / upright_h / 2) * 2)
    if turned:
        return {"width": upright_height, "height": scaled_w}
    return {"width": scaled_w, "height": upright_height}


def scan(data: bytes, info: dict, cfg: PrepareConfig) -> tuple[list[int], np.ndarray]:
    """Shot cuts (first frame of each new shot) and each frame's mean absolute change from
    the previous one, from one pass at `split.analysis_height`."""
    from scenedetect import ContentDetector
    from scenedetect.common import FrameTimecode

    min_frames = max(1, round(cfg.split.min_clip_s * info["fps"]))
    detector = ContentDetector(threshold=cfg.split.threshold, min_scene_len=min_frames)
    cuts: list[int] = []
    changes = [0.0]
    previous = None
    timecode = None
    for index, rgb in enumerate(
        displayed_frames(data, info["rotation"], cfg.split.analysis_height)
    ):
        timecode = FrameTimecode(index, fps=info["fps"])
        cuts += [c.frame_num for c in detector.process_frame(timecode, rgb[..., ::-1].copy())]
        small = rgb.astype(np.int16)
        if previous is not None:
            changes.append(float(np.abs(small - previous).mean()))
        previous = small
    if timecode is not None:
        cuts += [c.frame_num for c in detector.post_process(timecode)]
    return sorted({c for c in cuts if 0 < c < info["frames"]}), np.asarray(changes)


def clip_meta(info: dict, start: int, end: int, motion: np.ndarray | None) -> dict:
    frames = end - start
    meta = {
        "width": info["width"],
        "height": info["height"],
        "fps": info["fps"],
        "frames": frames,
        "duration": frames / info["fps"],
    }
    if motion is not None:
        # Changes into frames start+1..end-1: the cut into `start` is not motion.
        inside = motion[start + 1 : end]
        meta["motion"] = round(float(inside.mean()), 4) if len(inside) else 0.0
    return meta


def filter_reason(meta: dict, f: FilterConfig) -> str | None:
    """Why a clip fails the filters (naming the threshold), or None."""
    aspect = meta["width"] / meta["height"]
    checks = (
        ("duration", meta["duration"], f.min_duration_s, f.max_duration_s, "s", "duration_s"),
        ("width", meta["width"], f.min_width, None, " px", "width"),
        ("height", meta["height"], f.min_height, None, " px", "height"),
        ("aspect ratio", aspect, f.min_aspect, f.max_aspect, "", "aspect"),
        ("frame rate", meta["fps"], f.min_fps, f.max_fps, " fps", "fps"),
        ("motion", meta.get("motion"), f.min_motion, None, "", "motion"),
    )
    for name, value, low, high, unit, key in checks:
        if value is None:
            continue
        if low is not None and value < low:
            return f"filtered: {name} {value:.3g}{unit} < filter.min_{key}={low}"
        if high is not None and value > high:
            return f"filtered: {name} {value:.3g}{unit} > filter.max_{key}={high}"
    return None


def encode_clips(
    source: dict, data: bytes, info: dict, clips: list[tuple[int, int, dict]], cfg: PrepareConfig
) -> list[dict]:
    """Each clip's frames re-encoded to H.264 mp4, upright and cropped to even sizes, in one
    decoding pass over the file."""
    rows, pending = [], list(clips)
    encoder = None
    for index, frame in enumerate(displayed_frames(data, info["rotation"])):
        if encoder is None and pending and index == pending[0][0]:
            start, end, meta = pending.pop(0)
            encoder = ClipEncoder(info["fps"], cfg.crf, cfg.reproducible_encoding)
        if encoder is not None:
            encoder.add(frame)
            if index == end - 1:
                rows.append(finish(source, len(rows), encoder, meta))
                encoder = None
    if encoder is not None:  # the file ended early: keep what was decoded
        rows.append(finish(source, len(rows), encoder, meta))
    return rows


def finish(source: dict, number: int, encoder: ClipEncoder, meta: dict) -> dict:
    media, (height, width), frames = encoder.close()
    meta = meta | {"width": width, "height": height, "frames": frames}
    return clip_row(source, number, "mp4", media, meta | {"duration": frames / meta["fps"]})


class ClipEncoder:
    """H.264 in an in-memory mp4, frame by frame, so a long clip never sits in memory."""

    def __init__(self, fps: float, crf: int, reproducible: bool):
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        self.stream = self.container.add_stream(
            "libx264", rate=Fraction(fps).limit_denominator(1001)
        )
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "medium"}
        if reproducible:  # see PrepareConfig.reproducible_encoding; chunks fill the CPUs
            self.stream.options["x264-params"] = "threads=1:asm=0"
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def add(self, frame: np.ndarray) -> None:
        if self.size is None:  # yuv420p needs even sizes: drop an odd last row or column
            self.size = (frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2)
            self.stream.height, self.stream.width = self.size
        rgb = np.ascontiguousarray(frame[: self.size[0], : self.size[1]])
        picture = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        picture.pts = self.frames  # in 1/fps, the stream's time base
        self.container.mux(self.stream.encode(picture))
        self.frames += 1

    def close(self) -> tuple[bytes, tuple[int, int], int]:
        self.container.mux(self.stream.encode())
        self.container.close()
        return self.buffer.getvalue(), self.size, self.frames


def clip_row(source: dict, number: int, ext: str, media: bytes, meta: dict) -> dict:
    """A clip: its sample key, source file, media bytes and the sample's `json` member (kept
    as text: Ray's Arrow blocks would give dicts of different keys each other's keys)."""
    meta = meta | {"caption": source["caption"], "recaption": source["recaption"]}
    return {
        "key": f"{source['index']:09d}-{number:03d}",
        "file": source["file"],
        "ext": ext,
        "media": media,
        "json": json.dumps(meta | {"source": source["file"]}, sort_keys=True),
    }
