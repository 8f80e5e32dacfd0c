"""Decoding: only the frames a sample needs, at a target frame rate, straight to the
bucket's size.

decord decodes and resizes in one pass (resizing uint8 before any float conversion is far
cheaper); PyAV is the fallback where decord is not installed or fails on a file. Images
(1-frame samples) go through Pillow.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

try:
    import decord

    decord.bridge.set_bridge("native")
except ImportError:  # no aarch64 wheel: PyAV decodes everything
    decord = None

if TYPE_CHECKING:
    import av

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "mov", "webm", "mkv", "avi")


class DecodeError(RuntimeError):
    """A sample could not be decoded; the message names it and says why."""


def frame_indices(
    total: int,
    native_fps: float,
    target_fps: float,
    num_frames: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """`num_frames` indices at `target_fps` (never faster than native), from a random start, or
    centred in the video when `rng` is None."""
    stride = max(1.0, native_fps / target_fps)
    span = (num_frames - 1) * stride
    if math.floor(span) + 1 > total:
        raise ValueError(
            f"{num_frames} frames at stride {stride:.2f} need {math.floor(span) + 1} "
            f"frames, the video has {total}"
        )
    slack = total - 1 - span
    if slack <= 0:
        start = 0.0
    else:
        start = rng.uniform(0, slack) if rng is not None else slack / 2
    return np.minimum(np.round(start + stride * np.arange(num_frames)).astype(int), total - 1)


def cover_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The smallest (height, width) with this aspect ratio that covers `target`."""
    scale = max(target[0] / height, target[1] / width)
    return max(target[0], round(height * scale)), max(target[1], round(width * scale))


def center_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = frames.shape[1:3]
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return frames[:, top : top + size[0], left : left + size[1]]


def random_crop(frames: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    height, width = frames.shape[1:3]
    top = int(rng.integers(0, height - size[0] + 1))
    left = int(rng.integers(0, width - size[1] + 1))
    return frames[:, top : top + size[0], left : left + size[1]]


def _decode_decord(data: bytes, indices_for, out_size: tuple[int, int]) -> np.ndarray:
    out_h, out_w = out_size
    reader = decord.VideoReader(io.BytesIO(data), width=out_w, height=out_h)
    indices = indices_for(len(reader), reader.get_avg_fps())
    return reader.get_batch(list(indices)).asnumpy()


def _open_pyav(data: bytes) -> av.container.InputContainer:
    # Imported on first use: with decord alone (as on the GPU image) PyAV is never needed.
    import av

    return av.open(io.BytesIO(data))


def _pyav_info(container: av.container.InputContainer) -> tuple[int, int, float, int]:
    """(width, height, fps, frames) of a container's first video stream."""
    stream = container.streams.video[0]
    fps = stream.average_rate or stream.guessed_rate
    if not fps:
        raise ValueError("the video stream has no frame rate")
    # mp4/mov store the frame count; webm/mkv may not, so count packets (no decoding).
    frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    return stream.codec_context.width, stream.codec_context.height, float(fps), frames


def _decode_pyav(data: bytes, indices_for, out_size: tuple[int, int]) -> np.ndarray:
    """Streams through the video and converts (and resizes) only the wanted frames, so a
    long video never sits in memory."""
    out_h, out_w = out_size
    with _open_pyav(data) as container:
        _, _, fps, total = _pyav_info(container)
    indices = indices_for(total, fps)
    wanted: dict[int, list[int]] = {}
    for position, index in enumerate(indices):
        wanted.setdefault(int(index), []).append(position)
    frames: list[np.ndarray | None] = [None] * len(indices)
    with _open_pyav(data) as container:
        for index, frame in enumerate(container.decode(video=0)):
            for position in wanted.get(index, ()):
                frames[position] = frame.to_ndarray(format="rgb24", width=out_w, height=out_h)
            if index >= indices[-1]:
                break
    if any(frame is None for frame in frames):
        raise ValueError(f"the video ended before frame {int(indices[-1])} of {total}")
    return np.stack(frames)


def _decode_image(data: bytes, out_size: tuple[int, int]) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    out_h, out_w = out_size
    return np.asarray(image.resize((out_w, out_h), Image.BILINEAR))[None]


def decode_clip(
    data: bytes,
    ext: str,
    num_frames: int,
    target_fps: float,
    size: tuple[int, int],
    source_size: tuple[int, int],
    rng: np.random.Generator | None,
    key: str = "",
) -> np.ndarray:
    """uint8 (num_frames, height, width, 3) of one sample, resized (during decoding) to cover
    `size`, then randomly cropped to it; with `rng` None, the middle frames and the centre
    crop, so the sample decodes to the same pixels every time. `source_size` is the sample's
    probed (height, width). Raises DecodeError naming `key` on any failure."""
    ext = ext.lower()
    out_size = cover_size(*source_size, size)

    def indices_for(total: int, fps: float) -> np.ndarray:
        return frame_indices(total, fps, target_fps, num_frames, rng)

    try:
        if ext in IMAGE_EXTS:
            if num_frames != 1:
                raise ValueError(f"an image gives 1 frame, {num_frames} were asked for")
            frames = _decode_image(data, out_size)
        elif decord is not None:
            try:
                frames = _decode_decord(data, indices_for, out_size)
            except (decord.DECORDError, RuntimeError):
                frames = _decode_pyav(data, indices_for, out_size)
        else:
            frames = _decode_pyav(data, indices_for, out_size)
    except Exception as error:  # decoders raise many types; a sample is skipped either way
        raise DecodeError(f"cannot decode sample {key!r} ({ext}): {error}") from error
    cropped = random_crop(frames, size, rng) if rng is not None else center_crop(frames, size)
    return np.ascontiguousarray(cropped)


def probe(data: bytes, ext: str, name: str = "") -> dict:
    """width, height, fps, frames and duration of a video or image; DecodeError otherwise."""
    ext = ext.lower()
    try:
        if ext in IMAGE_EXTS:
            image = Image.open(io.BytesIO(data))
            image.verify()
            return {
                "width": image.width,
                "height": image.height,
                "fps": 0.0,
                "frames": 1,
                "duration": 0.0,
            }
        if decord is not None:
            reader = decord.VideoReader(io.BytesIO(data))
            height, width = reader[0].shape[:2]
            fps, frames = float(reader.get_avg_fps()), len(reader)
        else:
            with _open_pyav(data) as container:
                width, height, fps, frames = _pyav_info(container)
    except Exception as error:
        raise DecodeError(f"cannot probe {name or 'sample'} ({ext}): {error}") from error
    if frames < 1 or width < 1 or height < 1 or not fps > 0:
        raise DecodeError(f"cannot probe {name or 'sample'} ({ext}): no decodable frames")
    return {
        "width": int(width),
        "height": int(height),
        "fps": fps,
        "frames": int(frames),
        "duration": frames / fps,
    }


def read_media(path: str | Path, size: tuple[int, int], target_fps: float) -> np.ndarray:
    """Every frame of an image or video file, uint8 (frames, height, width, 3): a video at
    `target_fps` (never faster than its own rate), resized to cover `size` and centre-cropped to it.
    The inputs of the generation modes (image to video, extension, editing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image or video file")
    ext = path.suffix.lstrip(".").lower()
    if ext not in IMAGE_EXTS + VIDEO_EXTS:
        raise DecodeError(
            f"{path}: unsupported extension {ext!r} (known: {IMAGE_EXTS + VIDEO_EXTS})"
        )
    data = path.read_bytes()
    meta = probe(data, ext, str(path))
    out_size = cover_size(meta["height"], meta["width"], size)

    def indices_for(total: int, fps: float) -> np.ndarray:
        stride = max(1.0, fps / target_fps)
        return np.round(np.arange(0.0, total - 0.5, stride)).astype(int).clip(max=total - 1)

    try:
        if ext in IMAGE_EXTS:
            frames = _decode_image(data, out_size)
        elif decord is not None:
            frames = _decode_decord(data, indices_for, out_size)
        else:
            frames = _decode_pyav(data, indices_for, out_size)
    except Exception as error:
        raise DecodeError(f"cannot decode {path}: {error}") from error
    return np.ascontiguousarray(center_crop(frames, size))
