"""The launcher's typed configuration and how a command line is split between it and the run.

`launcher.*` keys (and `launcher=<name>`, a YAML in conf/launcher/) belong to the launcher; every
other argument is a Hydra override of the run and is handed to `python -m train` unchanged. The
launcher reads its own YAML onto `LauncherConfig` here, so launch/ never imports train/ and a
misspelt launcher key fails before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "launcher"


@dataclass
class LauncherConfig:
    nodes: int = 1
    procs_per_node: int = 1  # processes per node when gpus_per_node is 0 (CPU, gloo)
    gpus_per_node: int = 0  # > 0: one process per GPU, NCCL settings exported
    node_rank: int = 0  # this node's rank (launch.local; SLURM uses SLURM_NODEID)
    rdzv_endpoint: str = "127.0.0.1:29500"  # host:port of node 0 (launch.local, nodes > 1)
    rdzv_port: int = 29500  # SLURM: the port on the allocation's first node
    local_addr: str | None = None  # this node's address, when the hostname does not resolve to it
    socket_ifname: str | None = None  # network interface for gloo/NCCL traffic
    threads_per_proc: int = 0  # OMP_NUM_THREADS; 0: the node's (or task's) CPUs / processes
    max_restarts: int = 0  # torchrun restarts of all workers after a failure
    # SLURM only
    job_name: str | None = None  # default: the run's name
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str = "04:00:00"
    exclusive: bool = False
    cpus_per_node: int = 0  # --cpus-per-task of the one task per node; 0: not asked for
    signal_grace_s: int = 300  # USR1 this long before the time limit: checkpoint and requeue
    requeue: bool = True  # requeue after a preemption checkpoint
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ["--mem=0", "--mail-type=END"]

    @property
    def procs(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.procs_per_node


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(launcher overrides, run overrides)."""
    launcher = [a for a in args if a.startswith(("launcher.", "launcher="))]
    return launcher, [a for a in args if a not in launcher]


def load_launcher(default: str, overrides: list[str]) -> LauncherConfig:
    """conf/launcher/<name>.yaml with `launcher.key=value` overrides, checked against the schema."""
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("launcher=")), default)
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in CONF_DIR.glob("*.yaml")))
        raise ValueError(f"launcher={name}: no {path} (choices: {choices})")
    dotlist = [o for o in overrides if o.startswith("launcher.")]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(LauncherConfig), OmegaConf.load(path))
        # Hydra's override grammar, as for the run's keys: time=48:00:00 stays a string.
        for override in OverridesParser.create().parse_overrides(dotlist):
            key = override.key_or_group.removeprefix("launcher.")
            OmegaConf.update(merged, key, override.value(), merge=False)
    except (OmegaConfBaseException, HydraException) as error:
        raise ValueError(f"launcher config ({path} and {dotlist}): {error}") from error
    config: LauncherConfig = OmegaConf.to_object(merged)
    _check(config)
    return config


def _check(config: LauncherConfig) -> None:
    for key in ("nodes", "procs_per_node"):
        if getattr(config, key) < 1:
            raise ValueError(f"launcher.{key}={getattr(config, key)} must be at least 1")
    if not 0 <= config.node_rank < config.nodes:
        raise ValueError(
            f"launcher.node_rank={config.node_rank} must be in [0, launcher.nodes={config.nodes})"
        )
    host, _, port = config.rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"launcher.rdzv_endpoint={config.rdzv_endpoint!r} is not host:port")
