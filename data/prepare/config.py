"""The typed configuration of `python -m data.prepare`.

Options are `key=value` overrides of these dataclasses (as in training, a misspelt key or a
wrong type fails before any work), e.g. `split.enabled=true filter.min_duration_s=2`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class SplitConfig:
    """Shot splitting with PySceneDetect's content detector."""

    enabled: bool = False
    threshold: float = 27.0  # ContentDetector's cut threshold (HSV change, 0-255)
    min_clip_s: float = 0.5  # shorter shots are merged into their neighbour by the detector
    analysis_height: int = 128  # frames are scanned at this height: cuts need no detail


@dataclass
class FilterConfig:
    """Clips outside any threshold are dropped; a null threshold does not filter."""

    min_duration_s: float | None = None
    max_duration_s: float | None = None
    min_width: int | None = None
    min_height: int | None = None
    min_aspect: float | None = None  # width / height
    max_aspect: float | None = None
    min_fps: float | None = None
    max_fps: float | None = None
    # Mean absolute change between consecutive frames (0-255) at the scan height: 0 is a
    # still video. Images are never filtered by motion.
    min_motion: float | None = None
    # A `torch.export.save`d program mapping float (1, 3, 224, 224) RGB in [0, 1] to a score.
    aesthetic_model: str | None = None
    min_aesthetic: float | None = None


@dataclass
class RecaptionConfig:
    """Recaptioning with a Hugging Face vision-language model saved in a local folder."""

    model: str | None = None  # the folder; null: no recaptioning
    prompt: str = (
        "Describe this video in detail: the subjects, their motion, the scene, the camera."
    )
    frames: int = 1  # frames per clip shown to the model, evenly spaced
    max_new_tokens: int = 96
    batch_size: int = 8
    actors: int | None = None  # default: one per GPU, or one on CPU
    dtype: str = "auto"  # bfloat16 on GPU, float32 on CPU


@dataclass
class PrepareConfig:
    shard_size_mb: float = 256.0  # a chunk of about this much source data packs into one shard
    seed: int = 0  # the order of files (a shard holds a mix)
    crf: int = 18  # H.264 quality of re-encoded clips (cut, rotated, or unreadable by decord)
    # x264 in plain C on one thread: the same bytes on every run and every CPU, so a resumed
    # run equals an uninterrupted one. Its SIMD code reads uninitialised memory (seen here:
    # equal frames gave different bytes run to run); false encodes about 5x faster, and a
    # resumed run's re-encoded clips may then differ in bytes (not in what they show).
    reproducible_encoding: bool = True
    workers: int | None = None  # CPUs of the embedded local Ray (default: all)
    split: SplitConfig = field(default_factory=SplitConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    recaption: RecaptionConfig = field(default_factory=RecaptionConfig)


# What decides the output: a resumed run must match these, not the runner settings.
RUNNER_KEYS = ("workers", "recaption.actors", "recaption.batch_size")


def load_config(overrides: list[str]) -> PrepareConfig:
    """The config with `key=value` overrides; a clear error for unknown keys or bad values."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"option {item!r} is not key=value (e.g. split.enabled=true)")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(PrepareConfig), OmegaConf.from_dotlist(overrides)
        )
    except OmegaConfBaseException as error:
        raise ValueError(f"bad data.prepare option: {error}") from error
    cfg: PrepareConfig = OmegaConf.to_object(merged)
    check(cfg)
    return cfg


def check(cfg: PrepareConfig) -> None:
    if cfg.shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb={cfg.shard_size_mb} must be positive")
    if cfg.recaption.frames < 1 or cfg.recaption.batch_size < 1:
        raise ValueError("recaption.frames and recaption.batch_size must be at least 1")
    if (cfg.filter.aesthetic_model is None) != (cfg.filter.min_aesthetic is None):
        raise ValueError("filter.aesthetic_model and filter.min_aesthetic go together")
    if cfg.split.min_clip_s < 0 or cfg.split.analysis_height < 16:
        raise ValueError("split.min_clip_s must be >= 0 and split.analysis_height >= 16")


def fingerprint(cfg: PrepareConfig) -> dict:
    """The settings that decide the shards' bytes."""
    settings = OmegaConf.to_container(OmegaConf.structured(cfg))
    for key in RUNNER_KEYS:
        *path, last = key.split(".")
        node = settings
        for part in path:
            node = node[part]
        node.pop(last)
    return settings
