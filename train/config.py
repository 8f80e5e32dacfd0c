"""The typed configuration of a run.

Each package owns the dataclass of its own part (model/, data/); this module adds the
trainer's parts and composes them into `Config`, registered in Hydra's ConfigStore as
`base_config` beside the DiT size presets of the `model` group. Every YAML in conf/ is merged
onto this schema, so a misspelt key or a wrong type fails with a message naming it before any
work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data.buckets import BucketConfig
from data.packing import PackingConfig
from data.pipeline import DataConfig
from model.autoencoder import AutoencoderConfig
from model.conditioning import MODES, ConditioningConfig, mode_probabilities
from model.dit import DIT_SIZES, DiTConfig
from model.flow import FlowConfig
from model.pretrained import FAMILIES, Family, PretrainedConfig
from model.text import KINDS as TEXT_ENCODER_KINDS
from model.text import TextEncoderConfig

SAMPLE_MODES = ("t2v", "t2i", "i2v", "extend", "connect", "edit")


@dataclass
class ModelConfig(DiTConfig):
    """The DiT's geometry (model/dit.py). With `pretrained` set, the model is that pretrained
    diffusers transformer (model/pretrained.py) and the geometry holds its published sizes, which
    its folder's config.json must match; FLOP counts, sequence-parallel checks and buckets read
    them."""

    pretrained: PretrainedConfig | None = None


@dataclass
class LoraConfig:
    """LoRA fine-tuning of a pretrained model through peft: only the adapters train, shard, checkpoint
    and export (diffusers' LoRA format, and merged into full weights with `merge_on_export`)."""

    rank: int = 0  # 0: no adapter, every weight trains
    alpha: float = 0.0  # scale alpha/rank; 0: alpha = rank
    # The layers adapted; null: the family's own (model/pretrained.py: attention and MLP).
    target_modules: list[str] | None = None
    # The frozen base weights' dtype: auto (bf16 when training runs in bf16, else fp32) | fp32 |
    # bf16. bf16 halves their memory; the adapters and their optimizer state stay fp32.
    frozen_dtype: str = "auto"
    merge_on_export: bool = False  # also export the base with the adapter folded in


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"  # constant | cosine | linear, after the warmup
    min_lr_ratio: float = 0.1  # the schedule's floor, as a share of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainConfig:
    stage: str = "dit"  # dit | autoencoder
    steps: int = 1000
    # > 0: a compute budget in training FLOPs; the run derives train.steps from it (train/budget.py)
    budget_flops: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast where supported on GPU) | fp32 | bf16
    ema_decay: float = 0.999  # 0 disables the EMA
    run_dir: str = "runs/${name}"
    resume: str = "auto"  # auto (latest complete checkpoint of run_dir) | never | <checkpoint dir>
    record_samples: bool = False  # write each step's sample keys to consumed/rank<r>.jsonl
    max_bad_steps: int = 10  # NaN/Inf steps in a row (each skipped) before the run stops
    # > 0: keep up to this many MiB of frozen-encoder outputs (latents, caption embeddings) in
    # host memory and reuse them; latents repeat only with data.augment=false
    encoding_cache_mb: int = 0
    # Train on a draw from the autoencoder's posterior (mean + std * noise, the noise seeded by
    # the batch like the rest) instead of its mean; on latent shards, those stored with --logvar
    sample_posterior: bool = False
    log_every: int = 10
    checkpoint_every: int = 500
    # Save in the background: the step stops only to copy the state into host memory, and the
    # checkpoint is committed once every rank has written it (not with ZeRO: DeepSpeed writes
    # its own files)
    checkpoint_async: bool = False
    keep_last: int = 3  # keep the newest K checkpoints ...
    keep_every: int = 0  # ... and every M-th step's checkpoint (0: none extra)
    sample_every: int = 0  # 0: sample only at the end of the run
    sample_prompts: list[str] = field(default_factory=list)
    sample_frames: int = 17
    sample_height: int = 64
    sample_width: int = 64
    sample_steps: int = 20
    sample_fps: float = 8.0
    # Generation modes sampled during training (see train/sample.py): t2v, t2i, i2v, extend,
    # connect, edit. i2v, extend, connect and edit start from the t2v samples of the same step.
    sample_modes: list[str] = field(default_factory=lambda: ["t2v"])


@dataclass
class EvalConfig:
    """The fixed evaluation loss (train/evaluate.py) on held-out shards."""

    shards: str = ""  # held-out shards like data.shards; empty: no evaluation
    every: int = 0  # evaluate every N steps; 0: only at the end of the run
    samples: int = 64  # at least this many held-out samples (whole batches)
    timesteps: int = 8  # fixed flow times per sample: quantiles of the training distribution
    times: int = 10  # and the loss at this many evenly spaced times, (k + 1/2) / times; 0: none
    seed: int = 0  # the fixed noise, and the held-out clips' crops and captions
    # Generated videos (train/eval_videos.py), scored by FVD and CLIP score; 0: none.
    videos: int = 0
    prompts: str = ""  # a prompt file, one per line; empty: the held-out clips' captions
    video_shape: list[int] = field(default_factory=lambda: [17, 64, 64])  # frames, height, width
    sample_steps: int = 20  # sampling steps per video
    fvd_model: str = ""  # a local I3D TorchScript file or VideoMAE folder; empty: no FVD
    clip_model: str = ""  # a local CLIP folder (transformers); empty: no CLIP score


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    project: str = "tessera"
    entity: str | None = None
    mode: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline
    tags: list[str] = field(default_factory=list)


PARALLEL_BACKENDS = ("none", "ddp", "fsdp", "zero1", "zero2", "zero3")


@dataclass
class ParallelConfig:
    """How the DiT is spread over ranks. Degrees multiply to the world size; one may be -1
    (inferred). dp_replicate x dp_shard is the data-parallel world; cp x sp ranks split one
    sample's tokens (ring attention across cp, Ulysses within sp) and work on the same batch."""

    backend: str = "none"  # none | ddp | fsdp | zero1 | zero2 | zero3
    dp_replicate: int = 1  # FSDP: > 1 with dp_shard > 1 is hybrid sharding (HSDP)
    dp_shard: int = -1  # data-parallel ranks in a shard group (ddp: its replicas)
    cp: int = 1  # context-parallel degree: ring attention over this many ranks
    sp: int = 1  # sequence-parallel degree; must divide the number of attention heads
    activation_checkpointing: str = "none"  # none | full (every block) | every_k
    checkpoint_every_k: int = 2  # with every_k: recompute blocks 0, k, 2k, ...
    compile: bool = False  # torch.compile each transformer block
    reshard_after_forward: bool = True  # FSDP: free gathered params after forward (ZeRO-3 style)
    # FSDP on GPU: keep sharded params, grads and the optimizer state in host memory, and step
    # the optimizer there (FSDP2's CPUOffloadPolicy); the ZeRO backends use zero_offload
    cpu_offload: bool = False
    zero_offload: str = "none"  # ZeRO on GPU: none | optimizer | params (zero3 only)
    deepspeed_config: str | None = None  # a user JSON merged over the generated DeepSpeed config


@dataclass
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


def register_configs() -> None:
    """The schema, and a `model` group option per DiT size (`model=tiny`, `model=1b`, ...) made
    from model/dit.py's DIT_SIZES, the one place the sizes live. The pretrained Wan presets are
    YAML files in conf/model/; Hydra offers both kinds as one group."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for size, dit in DIT_SIZES.items():
        store.store(group="model", name=size, node=ModelConfig(**asdict(dit)))


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"config key {name}={value!r} is not one of {', '.join(allowed)}")


def config_to_dict(config: Config) -> dict:
    """Plain, resolved values: what a checkpoint, an export and W&B record."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


# The range of every numeric config key: an interval, and values allowed outside it ("or -1",
# "or None"). to_config checks them before any work, naming the key; tests/test_config.py fails
# for a numeric key without one, and sets every key out of its range.
RANGES: dict[str, str] = {
    "model.depth": "[1, inf)",
    "model.width": "[1, inf)",
    "model.num_heads": "[1, inf)",
    "model.mlp_ratio": "(0, inf)",
    "model.rope_theta": "(0, inf)",
    "autoencoder.latent_channels": "[1, inf)",
    "autoencoder.base_channels": "[1, inf)",
    "autoencoder.num_res_blocks": "[1, inf)",
    "autoencoder.spatial_compression": "[1, inf)",
    "autoencoder.temporal_compression": "[1, inf)",
    "autoencoder.kl_weight": "[0, inf)",
    "autoencoder.chunk_latent_frames": "[0, inf)",
    "autoencoder.tile_latents": "[0, inf)",
    "autoencoder.tile_overlap_latents": "[0, inf)",
    "text_encoder.max_length": "[1, inf)",
    "text_encoder.template_crop": "[0, inf)",
    "flow.logit_mean": "(-inf, inf)",
    "flow.logit_std": "(0, inf)",
    "flow.shift_base_tokens": "[1, inf)",
    "flow.caption_dropout": "[0, 1]",
    "flow.sample_steps": "[1, inf)",
    "flow.cfg_scale": "[0, inf)",
    "conditioning.t2v": "[0, inf)",
    "conditioning.i2v": "[0, inf)",
    "conditioning.extend_forward": "[0, inf)",
    "conditioning.extend_backward": "[0, inf)",
    "conditioning.connect": "[0, inf)",
    "conditioning.random_frames": "[0, inf)",
    "data.fps": "(0, 240]",
    "data.recaption_prob": "[0, 1]",
    "data.num_workers": "[0, inf)",
    "data.seed": "[0, inf)",
    "data.image_share": "[0, 1] or None",
    "data.cache_mb": "[0, inf)",
    "data.read_ahead": "[1, inf)",
    "data.read_retries": "[0, inf)",
    "data.read_backoff_s": "[0, inf)",
    "data.max_failed_reads": "[1, inf)",
    "data.max_skipped_share": "[0, 1]",
    "data.skipped_window": "[1, inf)",
    "data.decoded_cache_mb": "[0, inf)",
    "buckets.token_budget": "[1, inf)",
    "buckets.max_aspect_change": "[0, inf)",
    "packing.sequence_tokens": "[1, inf)",
    "packing.max_tokens_per_sample": "[1, inf)",
    "packing.max_frames": "[1, inf)",
    "packing.max_aspect_change": "[0, inf)",
    "packing.packs_per_rank": "[1, inf)",
    "optim.lr": "(0, inf)",
    "optim.weight_decay": "[0, inf)",
    "optim.eps": "(0, inf)",
    "optim.warmup_steps": "[0, inf)",
    "optim.min_lr_ratio": "[0, 1]",
    "optim.grad_clip": "[0, inf)",
    "train.steps": "[1, inf)",
    "train.budget_flops": "[0, inf)",
    "train.grad_accum": "[1, inf)",
    "train.seed": "[0, inf)",
    "train.ema_decay": "[0, 1)",
    "train.max_bad_steps": "[1, inf)",
    "train.encoding_cache_mb": "[0, inf)",
    "train.log_every": "[1, inf)",
    "train.checkpoint_every": "[1, inf)",
    "train.keep_last": "[0, inf)",
    "train.keep_every": "[0, inf)",
    "train.sample_every": "[0, inf)",
    "train.sample_frames": "[1, inf)",
    "train.sample_height": "[1, inf)",
    "train.sample_width": "[1, inf)",
    "train.sample_steps": "[1, inf)",
    "train.sample_fps": "(0, 240]",
    "eval.every": "[0, inf)",
    "eval.samples": "[1, inf)",
    "eval.timesteps": "[1, inf)",
    "eval.times": "[0, inf)",
    "eval.videos": "[0, inf)",
    "eval.sample_steps": "[1, inf)",
    "eval.seed": "[0, inf)",
    "parallel.dp_replicate": "[1, inf) or -1",
    "parallel.dp_shard": "[1, inf) or -1",
    "parallel.cp": "[1, inf) or -1",
    "parallel.sp": "[1, inf) or -1",
    "parallel.checkpoint_every_k": "[1, inf)",
    "lora.rank": "[0, inf)",
    "lora.alpha": "[0, inf)",  # 0: alpha = rank
}


@dataclass(frozen=True)
class Range:
    """An interval as RANGES writes it, "[low, high)" with inf, and values allowed beside it."""

    text: str

    def __contains__(self, value) -> bool:
        interval, *others = self.text.split(" or ")
        if any(value == (None if other == "None" else float(other)) for other in others):
            return True
        if value is None:
            return False
        low, high = (float(bound) for bound in interval[1:-1].split(","))
        above = value > low if interval[0] == "(" else value >= low
        below = value < high if interval[-1] == ")" else value <= high
        return above and below


def check_ranges(config: Config) -> None:
    """Every numeric key within its RANGES entry, or a ValueError naming it and the range."""
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in Range(allowed):
            raise ValueError(f"config key {key}={value} is outside its range {allowed}")


def to_config(cfg: DictConfig) -> Config:
    """The typed, validated Config of a composed Hydra config."""
    config: Config = OmegaConf.to_object(cfg)
    check_ranges(config)
    _choice("train.stage", config.train.stage, ("dit", "autoencoder"))
    _choice("train.precision", config.train.precision, ("auto", "fp32", "bf16"))
    _choice("train.device", config.train.device, ("auto", "cpu", "cuda"))
    _choice("optim.schedule", config.optim.schedule, ("constant", "cosine", "linear"))
    _choice("logger.kind", config.logger.kind, ("wandb", "none"))
    _choice("logger.mode", config.logger.mode, ("auto", "online", "offline"))
    _choice("parallel.backend", config.parallel.backend, PARALLEL_BACKENDS)
    _choice(
        "parallel.activation_checkpointing",
        config.parallel.activation_checkpointing,
        ("none", "full", "every_k"),
    )
    _choice("parallel.zero_offload", config.parallel.zero_offload, ("none", "optimizer", "params"))
    for mode in config.train.sample_modes:
        _choice("train.sample_modes[]", mode, SAMPLE_MODES)
    mode_probabilities(config.conditioning)
    _choice("text_encoder.kind", config.text_encoder.kind, TEXT_ENCODER_KINDS)
    _check_pretrained(config)
    _check_packing(config)
    _check_eval(config.eval)
    if config.train.checkpoint_async and config.parallel.backend.startswith("zero"):
        raise ValueError(
            f"config key train.checkpoint_async=true cannot be used with parallel.backend="
            f"{config.parallel.backend}: DeepSpeed writes a ZeRO checkpoint's files itself, and "
            "its asynchronous engines (Nebula, FastPersist) need Azure storage or GPU direct "
            "I/O; save blocking (train.checkpoint_async=false)"
        )
    if config.train.budget_flops and config.train.stage != "dit":
        raise ValueError("config key train.budget_flops needs train.stage=dit (DiT FLOPs)")
    if config.data.decoded_cache_mb and config.data.augment:
        raise ValueError(
            "config key data.decoded_cache_mb needs data.augment=false: an augmented sample "
            "decodes to new pixels every epoch"
        )
    if config.train.encoding_cache_mb and config.train.stage != "dit":
        raise ValueError(
            "config key train.encoding_cache_mb needs train.stage=dit (frozen encoders)"
        )
    if config.train.sample_posterior and config.train.encoding_cache_mb:
        raise ValueError(
            "config keys train.sample_posterior and train.encoding_cache_mb exclude each other: "
            "the cache keeps only the posterior's mean"
        )
    return config


def _check_eval(cfg: EvalConfig) -> None:
    """The evaluation's models and prompts are local files: a wrong path fails here, before
    any process starts, not when the first evaluation runs."""
    for key in ("fvd_model", "clip_model", "prompts"):
        path = getattr(cfg, key)
        if path and not Path(path).exists():
            raise ValueError(f"config key eval.{key}={path!r}: no such file or folder")
        if path and not cfg.videos:
            raise ValueError(f"config key eval.{key}={path!r} needs eval.videos > 0")
    if cfg.videos and not cfg.shards:
        raise ValueError("config key eval.videos needs eval.shards (the held-out clips)")
    if len(cfg.video_shape) != 3 or min(cfg.video_shape) < 1:
        raise ValueError(
            f"config key eval.video_shape={cfg.video_shape}: expected [frames, height, width], "
            "each at least 1"
        )


def _check_packing(config: Config) -> None:
    """What packing cannot train with, refused before any work (the settings that need the
    latent geometry are checked by data/packing.py when the stage checks its layout)."""
    packing = config.packing
    if not packing.enabled:
        return
    refused = {
        "train.stage=autoencoder": config.train.stage != "dit",
        "a pretrained model (model.pretrained): its attention processors attend over one "
        "sample with one rotary table, not over packed samples": config.model.pretrained
        is not None,
        "data.image_share: images and videos share packs in the data's own mix": (
            config.data.image_share is not None
        ),
        "parallel.compile: every step's packs have other sample boundaries, so a compiled "
        "block would compile again and again": config.parallel.compile,
    }
    for what, present in refused.items():
        if present:
            raise ValueError(f"config key packing.enabled=true cannot be combined with {what}")


def _check_given_as_channels(config: Config, family: Family) -> None:
    """A family shown its given frames as input channels (Wan 2.2 I2V) trains on what its pipeline
    shows it, from pixels; its training-time samples and held-out loss would start from text
    alone, which it does not take."""
    name, conditioning = f"model.pretrained.family={family.name}", config.conditioning
    others = [
        f"conditioning.{mode}={getattr(conditioning, mode)}"
        for mode in MODES
        if getattr(conditioning, mode) and mode not in family.conditioning_modes
    ]
    if others:
        raise ValueError(
            f"{name} is shown a first image (conditioning.i2v) or a first and a last image "
            f"(conditioning.connect), nothing else: set {', '.join(others)} to 0"
        )
    if config.data.image_share != 0.0:
        raise ValueError(
            f"config key data.image_share={config.data.image_share}: {name} animates an image and "
            "trains on video clips only; set data.image_share=0"
        )
    if conditioning.connect and list(conditioning.given_frames) != [1, 1]:
        raise ValueError(
            f"config key conditioning.given_frames={list(conditioning.given_frames)}: {name} is "
            "shown one first and one last image (connect); use [1, 1]"
        )
    for key, value in (("train.sample_prompts", config.train.sample_prompts),
                       ("eval.shards", config.eval.shards)):  # fmt: skip
        if value:
            raise ValueError(
                f"config key {key}={value!r}: {name} needs an image to start from, and the "
                f"training-time samples and the held-out loss start from text alone; unset "
                f"{key}, and sample the export with python -m train.sample mode=i2v image=..."
            )


def _check_pretrained(config: Config) -> None:
    pretrained, lora = config.model.pretrained, config.lora
    _choice("lora.frozen_dtype", lora.frozen_dtype, ("auto", "fp32", "bf16"))
    if lora.rank and pretrained is None:
        raise ValueError(
            "config key lora.rank > 0 needs a pretrained model: a conf/model/ preset with "
            "model.pretrained (wan2.1_t2v_1.3b, ltx_video_2b, ...)"
        )
    if pretrained is None:
        return
    _choice("model.pretrained.family", pretrained.family, tuple(FAMILIES))
    family = FAMILIES[pretrained.family]
    if family.text_encoder != "auto" and config.text_encoder.kind != family.text_encoder:
        raise ValueError(
            f"model.pretrained.family={family.name} reads captions of "
            f"text_encoder.kind={family.text_encoder}, got {config.text_encoder.kind!r}"
        )
    if family.given == "channels":
        _check_given_as_channels(config, family)
    elif family.time == "sample":  # one time per sample: no frame stays clean
        given_modes = [m for m in config.train.sample_modes if m not in ("t2v", "t2i")]
        if config.conditioning.t2v != 1.0 or given_modes:
            raise ValueError(
                f"model.pretrained.family={family.name} has one time per sample and cannot keep "
                "given frames clean: use conditioning=t2v and train.sample_modes of t2v/t2i only "
                f"(conditioning.t2v={config.conditioning.t2v}, given modes {given_modes})"
            )
    if len(family.experts) > 1:
        unknown = sorted(set(pretrained.train_experts) - set(family.experts))
        if unknown or not pretrained.train_experts:
            raise ValueError(
                f"config key model.pretrained.train_experts={list(pretrained.train_experts)}: "
                f"name one or more of {', '.join(family.experts)}"
            )
        if not 0.0 < pretrained.boundary < 1.0:
            raise ValueError(
                f"config key model.pretrained.boundary={pretrained.boundary} must be in (0, 1)"
            )
    if family.sequence_split is None and (config.parallel.sp != 1 or config.parallel.cp != 1):
        raise ValueError(
            f"model.pretrained.family={family.name} cannot split its sequence "
            f"(parallel.sp={config.parallel.sp}, parallel.cp={config.parallel.cp}): its "
            "attention processor has no sequence-parallel counterpart yet; use sp=1 and cp=1"
        )
    if not family.ring and config.parallel.cp != 1:
        raise ValueError(
            f"model.pretrained.family={family.name} splits its sequence with Ulysses only "
            f"(parallel.sp), not round a ring (parallel.cp={config.parallel.cp}): its joint "
            "attention over caption and video has no ring yet; use cp=1"
        )
    if lora.rank and lora.target_modules is not None and not lora.target_modules:
        raise ValueError("config key lora.target_modules is empty: name the layers to adapt")
