"""Decoding real clips: frame selection at a target rate, decord and PyAV agreeing, images,
containers without a stored frame count, and failures that name the sample."""

from __future__ import annotations

import io

import av
import decord
import numpy as np
import pytest
from PIL import Image

from data import decode
from data.decode import DecodeError, decode_clip, frame_indices, probe


@pytest.fixture
def pyav_only(monkeypatch):
    """Decode as on a machine without decord."""
    monkeypatch.setattr(decode, "decord", None)


def test_frame_indices_follow_the_target_rate():
    rng = np.random.default_rng(0)
    # 29.97 fps at 8 fps: a stride of 3.75 native frames, rounded to the nearest frame.
    indices = frame_indices(120, 30000 / 1001, 8.0, 17, rng)
    assert set(np.diff(indices)) <= {3, 4}
    assert (indices[-1] - indices[0]) / 16 == pytest.approx(30000 / 1001 / 8, abs=1 / 16)
    # Never faster than native: 25 fps asked for 60 fps gives consecutive frames.
    assert np.array_equal(np.diff(frame_indices(30, 25.0, 60.0, 10, rng)), np.ones(9))
    with pytest.raises(ValueError, match="17 frames at stride 3.12 need 51 frames"):
        frame_indices(50, 25.0, 8.0, 17, rng)


def test_pyav_fallback_matches_decord(clips, pyav_only):
    """Same seed, same frames and crop: the two decoders give the same pixels (up to the
    resampling filter)."""
    data = (clips / "carphone_pristine.mp4").read_bytes()
    args = (data, "mp4", 9, 8.0, (64, 48), (144, 176))
    by_pyav = decode_clip(*args, np.random.default_rng(3), "carphone")
    decode.decord = decord
    by_decord = decode_clip(*args, np.random.default_rng(3), "carphone")
    assert by_pyav.shape == by_decord.shape == (9, 64, 48, 3)
    assert by_pyav.dtype == by_decord.dtype == np.uint8
    assert np.abs(by_pyav.astype(int) - by_decord.astype(int)).mean() < 3


def test_pyav_fallback_picks_every_second_frame_at_half_rate(clips, pyav_only):
    data = (clips / "bikes.mp4").read_bytes()
    frames = decode_clip(data, "mp4", 6, 12.5, (136, 320), (272, 640), np.random.default_rng(0))
    full = decord.VideoReader(str(clips / "bikes.mp4"), width=320, height=136)
    reference = full.get_batch(list(range(250))).asnumpy().astype(int)

    def best_match(stride: int) -> float:
        starts = range(250 - 5 * stride)
        return min(
            np.abs(reference[s : s + 5 * stride + 1 : stride] - frames).mean() for s in starts
        )

    # Every 2nd frame from some start matches; every frame or every 3rd matches nowhere.
    assert best_match(2) < 1.0
    assert min(best_match(1), best_match(3)) > 3.0


@pytest.mark.parametrize("container", ["matroska", "webm"])
def test_containers_without_a_frame_count(clips, container, pyav_only):
    """mkv/webm often store no frame count: probing and decoding count packets instead."""
    source = decord.VideoReader(str(clips / "carphone_pristine.mp4"), width=88, height=72)
    codec = "libx264" if container == "matroska" else "libvpx-vp9"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = 88, 72, "yuv420p"
        for frame in source.get_batch(list(range(30))).asnumpy():
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())
    data = buffer.getvalue()
    meta = probe(data, "mkv")
    assert (meta["width"], meta["height"], meta["frames"], meta["fps"]) == (88, 72, 30, 30.0)
    frames = decode_clip(data, "mkv", 5, 10.0, (48, 48), (72, 88), np.random.default_rng(0))
    assert frames.shape == (5, 48, 48, 3)


def test_image_is_one_frame_resized_to_cover_then_cropped(clips, tmp_path):
    still = decord.VideoReader(str(clips / "bigbuckbunny.mp4"), width=320, height=180)[60]
    buffer = io.BytesIO()
    Image.fromarray(still.asnumpy()).save(buffer, format="JPEG")
    data = buffer.getvalue()
    assert probe(data, "jpg") == {
        "width": 320,
        "height": 180,
        "fps": 0.0,
        "frames": 1,
        "duration": 0.0,
    }
    frames = decode_clip(data, "jpg", 1, 8.0, (64, 64), (180, 320), np.random.default_rng(0))
    assert frames.shape == (1, 64, 64, 3) and frames.dtype == np.uint8
    with pytest.raises(DecodeError, match="sample 'still-1'.*an image gives 1 frame"):
        decode_clip(data, "jpg", 5, 8.0, (64, 64), (180, 320), np.random.default_rng(0), "still-1")


def test_failures_name_the_sample(clips):
    data = (clips / "carphone_pristine.mp4").read_bytes()
    with pytest.raises(DecodeError, match="sample 'short-3'.*the video has 120"):
        decode_clip(
            data, "mp4", 121, 30.0, (64, 64), (144, 176), np.random.default_rng(0), "short-3"
        )
    truncated = data[: len(data) // 50]
    with pytest.raises(DecodeError, match="sample 'cut-9'"):
        decode_clip(
            truncated, "mp4", 5, 8.0, (64, 64), (144, 176), np.random.default_rng(0), "cut-9"
        )
    with pytest.raises(DecodeError, match="cannot probe clip.mp4"):
        probe(truncated, "mp4", "clip.mp4")
