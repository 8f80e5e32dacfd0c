"""Data preparation: from a folder, bucket or list of raw videos and images to captioned
training shards with their manifest, on Ray (an embedded local Ray or a cluster).

    python -m data.prepare SOURCE --out SHARDS [--address ray://...] [key=value ...]

Stages, per chunk of files (`source.py`): probe with decord, PyAV where decord cannot; split
into shots (PySceneDetect) and measure motion; filter by the thresholds in the config;
re-encode what the loader could not decode fast or upright (`clips.py`); score and recaption
with models on actors (`models.py`); pack into tar shards with the manifest and commit the
chunk (`pack.py`). `report.json` lists every dropped file or clip with its reason. A rerun
resumes: committed chunks are skipped and the result is byte-identical to an uninterrupted
run.
"""

from data.prepare.config import PrepareConfig, load_config
from data.prepare.run import prepare

__all__ = ["PrepareConfig", "load_config", "prepare"]
