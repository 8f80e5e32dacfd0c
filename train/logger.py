"""Metrics to W&B and the console: scalars, sample videos and a progress bar with ETA.

W&B runs offline when there is no API key (sync later with `wandb sync <run_dir>/wandb`);
`logger=none` keeps only the console. Only rank 0 logs.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from tqdm import tqdm

from train.config import LoggerConfig


def wandb_mode(cfg: LoggerConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        name: str,
        config: dict,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.run = None
        self.metrics_file = None
        self.bar = None
        if not enabled:
            return
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True)
        if cfg.kind == "wandb":
            import wandb

            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=name,
                id=self._run_id(run_dir),
                resume="allow",
                dir=str(run_dir),
                mode=wandb_mode(cfg),
                config=config,
                tags=cfg.tags,
            )

    @staticmethod
    def _run_id(run_dir: Path) -> str:
        """One W&B run per run directory, so a resumed run continues its curves."""
        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        return id_file.read_text().strip()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)
        self.bar.set_postfix(
            {
                k.split("/")[-1]: f"{v:.4g}"
                for k, v in metrics.items()
                if k in ("train/loss", "train/lr", "perf/tokens_per_s")
            }
        )

    def log_videos(self, step: int, videos: dict[str, Path], fps: float) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log(
            {
                f"samples/{name}": wandb.Video(str(path), fps=fps, format="mp4")
                for name, path in videos.items()
            },
            step=step,
        )

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        if self.run is None or not images:
            return
        import wandb

        self.run.log({name: wandb.Image(str(path)) for name, path in images.items()}, step=step)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def print(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.run is not None:
            self.run.finish()
