"""The typed configuration of a run.

Each package owns the dataclass of its own part (model/, data/); this module adds the
trainer's parts and composes them into `Config`, registered in Hydra's ConfigStore as
`base_config` beside the DiT size presets of the `model` group. Every YAML in conf/ is merged
onto this schema, so a misspelt key or a wrong type fails with a message naming it before any
work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data.buckets import BucketConfig
from data.packing import PackingConfig
from data.pipeline import DataConfig
from model.autoencoder import AutoencoderConfig
from model.conditioning import ConditioningConfig, mode_probabilities
from model.dit import DIT_SIZES, DiTConfig
from model.flow import FlowConfig
from model.text import TextEncoderConfig
from model.wan import WAN_VARIANTS, WanConfig

SAMPLE_MODES = ("t2v", "t2i", "i2v", "extend", "connect", "edit")


@dataclass
class ModelConfig(DiTConfig):
    """The DiT's geometry (model/dit.py). With `wan` set, the model is that pretrained Wan
    transformer (model/wan.py) and the geometry holds its published sizes, which its folder's
    config.json must match; FLOP counts, sequence-parallel checks and buckets read them."""

    wan: WanConfig | None = None


@dataclass
class LoraConfig:
    """LoRA fine-tuning of a Wan model through peft: only the adapters train, shard, checkpoint
    and export (diffusers' LoRA format, and merged into full weights with `merge_on_export`)."""

    rank: int = 0  # 0: no adapter, every weight trains
    alpha: float = 0.0  # scale alpha/rank; 0: alpha = rank
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    )
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
    seed: int = 0  # the fixed noise, and the held-out clips' crops and captions


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


def to_config(cfg: DictConfig) -> Config:
    """The typed, validated Config of a composed Hydra config."""
    config: Config = OmegaConf.to_object(cfg)
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
    _check_wan(config)
    _check_packing(config)
    if config.train.steps < 1 or config.train.grad_accum < 1:
        raise ValueError("config keys train.steps and train.grad_accum must be at least 1")
    if config.train.budget_flops < 0:
        raise ValueError(f"config key train.budget_flops={config.train.budget_flops} is negative")
    if config.train.budget_flops and config.train.stage != "dit":
        raise ValueError("config key train.budget_flops needs train.stage=dit (DiT FLOPs)")
    _check_reads(config.data)
    if config.data.decoded_cache_mb < 0:
        raise ValueError(
            f"config key data.decoded_cache_mb={config.data.decoded_cache_mb} is negative"
        )
    if config.data.decoded_cache_mb and config.data.augment:
        raise ValueError(
            "config key data.decoded_cache_mb needs data.augment=false: an augmented sample "
            "decodes to new pixels every epoch"
        )
    if config.train.encoding_cache_mb < 0:
        raise ValueError(
            f"config key train.encoding_cache_mb={config.train.encoding_cache_mb} is negative"
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
    if config.eval.samples < 1 or config.eval.timesteps < 1 or config.eval.every < 0:
        raise ValueError(
            "config keys eval.samples and eval.timesteps must be at least 1, eval.every >= 0"
        )
    return config


def _check_reads(data: DataConfig) -> None:
    """The sample reader's counts and sizes: none negative, at least one read in flight."""
    least = {
        "data.cache_mb": (data.cache_mb, 0),
        "data.read_ahead": (data.read_ahead, 1),
        "data.read_retries": (data.read_retries, 0),
        "data.read_backoff_s": (data.read_backoff_s, 0),
        "data.max_failed_reads": (data.max_failed_reads, 1),
    }
    for key, (value, minimum) in least.items():
        if value < minimum:
            raise ValueError(f"config key {key}={value} must be at least {minimum}")


def _check_packing(config: Config) -> None:
    """What packing cannot train with, refused before any work (the settings that need the
    latent geometry are checked by data/packing.py when the stage checks its layout)."""
    packing = config.packing
    if not packing.enabled:
        return
    refused = {
        "train.stage=autoencoder": config.train.stage != "dit",
        "a pretrained Wan model (model.wan): its attention processors attend over one sample "
        "with one rotary table, not over packed samples": config.model.wan is not None,
        "data.image_share: images and videos share packs in the data's own mix": (
            config.data.image_share is not None
        ),
        "parallel.compile: every step's packs have other sample boundaries, so a compiled "
        "block would compile again and again": config.parallel.compile,
    }
    for what, present in refused.items():
        if present:
            raise ValueError(f"config key packing.enabled=true cannot be combined with {what}")


def _check_wan(config: Config) -> None:
    wan, lora = config.model.wan, config.lora
    if wan is not None:
        _choice("model.wan.variant", wan.variant, WAN_VARIANTS)
    if wan is not None and wan.variant == "t2v":  # one time per sample: no frame stays clean
        given_modes = [m for m in config.train.sample_modes if m not in ("t2v", "t2i")]
        if config.conditioning.t2v != 1.0 or given_modes:
            raise ValueError(
                "a Wan 2.1 T2V model (model.wan.variant=t2v) cannot keep given frames clean: "
                "use conditioning=t2v and train.sample_modes of t2v/t2i only "
                f"(conditioning.t2v={config.conditioning.t2v}, given modes {given_modes})"
            )
    _choice("lora.frozen_dtype", lora.frozen_dtype, ("auto", "fp32", "bf16"))
    if lora.rank < 0 or lora.alpha < 0:
        raise ValueError(
            f"config keys lora.rank={lora.rank} and lora.alpha={lora.alpha} must be >= 0"
        )
    if lora.rank and wan is None:
        raise ValueError("config key lora.rank > 0 needs a pretrained Wan model (model=wan2.*)")
    if lora.rank and not lora.target_modules:
        raise ValueError("config key lora.target_modules is empty: name the layers to adapt")
