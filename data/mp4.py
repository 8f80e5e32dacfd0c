"""Writing H.264 mp4 files with PyAV (libx264 ships in its wheel): demo clips and samples."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    metadata: dict | None = None,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Encode uint8 (T, H, W, 3) frames (even H and W); `metadata` goes into the container's
    comment as JSON (a provenance record: model, checkpoint, prompt)."""
    import av  # on use: a run that writes no video needs no PyAV (the GPU image has none)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        if metadata:
            container.metadata["comment"] = json.dumps(metadata)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
