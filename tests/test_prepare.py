"""Data preparation (`python -m data.prepare`): real files of many codecs and containers,
images, audio-only and corrupt files, through a real local Ray and inline; shot splitting,
filters, recaptioning with a real (tiny, random) vision-language model, resume after
SIGKILL, and the dataset lists of other video trainers."""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from launching import reserved_ports
from manifests import manifest_rows, span_members
from media import encode, half_white, mixed_folder, source_frames
from vlm import save_tiny_vlm

from data.decode import decode_clip
from data.prepare import load_config, prepare
from data.prepare.__main__ import main as prepare_command
from data.prepare.source import list_source

ROOT = Path(__file__).resolve().parents[1]


def samples(out: Path) -> dict[str, dict]:
    """file the source named -> {"meta", "media", "ext", "row"}, read through each manifest
    row's byte span as the loader reads it."""
    found = {}
    for row in manifest_rows(str(out)):
        (members,) = span_members(row).values()
        meta, media = json.loads(members["json"]), members[row["media"]]
        found.setdefault(meta["source"], []).append(
            {"meta": meta, "media": media, "ext": row["media"], "row": row}
        )
    return found


def output_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict, dict]:
    folder = tmp_path_factory.mktemp("mixed")
    valid, bad = mixed_folder(folder)
    return folder, valid, bad


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm"))


@pytest.mark.multiprocess
def test_mixed_folder_on_local_ray_with_recaptioning(mixed, vlm, tmp_path):
    """Every valid file becomes a sample the loader decodes, every bad one is reported with
    its reason, the VLM's captions land in `recaption` through Ray actors, and the inline
    runner writes the same bytes."""
    folder, valid, bad = mixed
    options = [
        "shard_size_mb=0.05",
        "workers=2",
        f"recaption.model={vlm}",
        "recaption.frames=2",
        "recaption.max_new_tokens=6",
        "recaption.prompt=describe the video",
    ]
    report = prepare_command([str(folder), "--out", str(tmp_path / "ray"), *options])
    assert report["files"] == len(valid) + len(bad)
    assert report["samples"] == report["clips"] == len(valid)
    reasons = {row["file"]: row["reason"] for row in report["dropped"]}
    assert set(reasons) == set(bad)
    for file, reason in bad.items():
        assert reasons[file].startswith(reason), (file, reasons[file])
    assert json.loads((tmp_path / "ray" / "report.json").read_text()) == report

    found = samples(tmp_path / "ray")
    assert set(found) == set(valid)
    for file, (sample,) in found.items():
        meta, row = sample["meta"], sample["row"]
        assert meta["caption"] == valid[file]  # the original caption is kept
        assert meta["recaption"] and meta["recaption"] != meta["caption"]
        assert row["has_recaption"]
        frames = min(meta["frames"], 4)
        pixels = decode_clip(
            sample["media"],
            sample["ext"],
            frames,
            meta["fps"] or 1.0,
            (32, 32),
            (meta["height"], meta["width"]),
            rng=None,
            key=file,
        )
        assert pixels.shape == (frames, 32, 32, 3), file
        assert (row["width"], row["height"], row["frames"]) == (
            meta["width"],
            meta["height"],
            meta["frames"],
        )
    # The phone video is stored upright: portrait, its white half now on top.
    phone = found["phone.mp4"][0]
    assert (phone["meta"]["width"], phone["meta"]["height"]) == (32, 64)
    upright = decode_clip(phone["media"], "mp4", 1, 24.0, (64, 32), (64, 32), rng=None)[0]
    assert upright[:32].mean() > 200 and upright[32:].mean() < 50
    # Codecs decord reads pass through untouched; the rest were re-encoded to H.264.
    assert found["vp9.webm"][0]["media"] == (folder / "vp9.webm").read_bytes()
    assert found["still_bmp.bmp"][0]["ext"] == "png"

    inline = prepare(str(folder), tmp_path / "inline", load_config(options), runner="inline")
    assert inline == report | {"source": str(folder)}
    assert output_files(tmp_path / "inline") == output_files(tmp_path / "ray")


def test_shot_splitting_cuts_a_joined_video_at_the_join(tmp_path):
    rabbit = source_frames("bigbuckbunny.mp4", 30)
    car = source_frames("carphone_pristine.mp4", 20)
    width = min(rabbit.shape[2], car.shape[2])
    rabbit, car = rabbit[:, :, :width], car[:, :, :width]
    folder = tmp_path / "joined"
    folder.mkdir()
    encode(folder / "joined.mp4", np.concatenate([rabbit, car]), "libx264", "yuv420p")
    (folder / "joined.txt").write_text("a rabbit, then a man in a car")
    cfg = load_config(["split.enabled=true", "split.min_clip_s=0.25"])
    report = prepare(str(folder), tmp_path / "out", cfg, runner="inline", progress=False)
    assert report["clips"] == report["samples"] == 2
    clips = sorted(samples(tmp_path / "out")["joined.mp4"], key=lambda s: s["meta"]["clip_s"])
    first, second = (clip["meta"] for clip in clips)
    assert abs(first["frames"] - len(rabbit)) <= 1 and abs(second["frames"] - len(car)) <= 1
    assert first["frames"] + second["frames"] == len(rabbit) + len(car)
    assert first["clip_s"][0] == 0 and abs(first["clip_s"][1] - len(rabbit) / 24) <= 1 / 24
    assert second["clip_s"][0] == first["clip_s"][1]


def test_filters_drop_clips_naming_the_threshold(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    rabbit = source_frames("bigbuckbunny.mp4", 48)
    encode(folder / "long.mp4", rabbit, "libx264", "yuv420p")
    encode(folder / "short.mp4", rabbit[:6], "libx264", "yuv420p")
    encode(folder / "still.mp4", np.repeat(rabbit[:1], 24, axis=0), "libx264", "yuv420p")
    encode(folder / "dark.mp4", rabbit[:24] // 8, "libx264", "yuv420p")
    encode(folder / "tall.mp4", half_white(64, 16, 24), "libx264", "yuv420p")
    for name in ("long", "short", "still", "dark", "tall"):
        (folder / f"{name}.txt").write_text(f"a {name} clip")
    # A user's aesthetic model, exported: brighter frames score higher.
    program = torch.export.export(Brightness(), (torch.rand(1, 3, 224, 224),))
    torch.export.save(program, tmp_path / "brightness.pt2")
    cfg = load_config(
        [
            "filter.min_duration_s=0.5",
            "filter.max_aspect=2.5",
            "filter.min_aspect=0.4",
            "filter.min_motion=0.1",
            f"filter.aesthetic_model={tmp_path / 'brightness.pt2'}",
            "filter.min_aesthetic=0.1",
        ]
    )
    report = prepare(str(folder), tmp_path / "out", cfg, runner="inline", progress=False)
    reasons = {row["file"]: row["reason"] for row in report["dropped"]}
    assert reasons["short.mp4"].startswith("filtered: duration 0.25s < filter.min_duration_s=0.5")
    assert re.match(r"filtered: motion 0\.\d+ < filter.min_motion=0.1", reasons["still.mp4"])
    assert reasons["tall.mp4"].startswith("filtered: aspect ratio 0.25 < filter.min_aspect=0.4")
    assert reasons["dark.mp4"].startswith("filtered: aesthetic")
    assert all(row["clip_s"] for row in report["dropped"])  # clips, with their time range
    (long,) = samples(tmp_path / "out")["long.mp4"]
    assert long["meta"]["motion"] > 0.1 and long["meta"]["aesthetic"] >= 0.1
    assert report["clips"] == 5 and report["samples"] == 1


class Brightness(torch.nn.Module):
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(1, 2, 3))


@pytest.mark.multiprocess
def test_a_run_killed_with_sigkill_resumes_to_identical_shards(tmp_path):
    """Twelve chunks of one file each; the first run dies by SIGKILL after some chunks are
    committed, the rerun finishes: shards, manifest and report equal an uninterrupted run's."""
    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(12):
        frames = source_frames(["bigbuckbunny.mp4", "bikes.mp4"][i % 2], 20 + i)
        encode(folder / f"clip{i:02d}.mp4", frames, "libx264", "yuv420p")
        (folder / f"clip{i:02d}.txt").write_text(f"clip number {i}")
    options = ["--inline", "shard_size_mb=0.001", "split.enabled=true"]
    command = [sys.executable, "-m", "data.prepare", str(folder), *options]
    killed = subprocess.Popen(
        [*command, "--out", str(tmp_path / "resumed")],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    records = tmp_path / "resumed" / ".prepare" / "chunks"
    deadline = time.monotonic() + 120
    while len(list(records.glob("*.json"))) < 3 and killed.poll() is None:
        assert time.monotonic() < deadline, "no chunk was committed in 120 s"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    committed = len(list(records.glob("*.json")))
    assert 3 <= committed < 12, f"killed with {committed} of 12 chunks committed"
    assert not (tmp_path / "resumed" / "manifest.parquet").exists()
    prepare_command([str(folder), "--out", str(tmp_path / "resumed"), *options])
    prepare_command([str(folder), "--out", str(tmp_path / "whole"), *options])
    resumed, whole = output_files(tmp_path / "resumed"), output_files(tmp_path / "whole")
    assert len([name for name in whole if name.endswith(".tar")]) >= 12  # a shard a chunk at least
    assert resumed == whole


def test_bad_options_and_outputs_fail_before_any_work(mixed, tmp_path, capsys):
    folder, _, _ = mixed
    with pytest.raises(ValueError, match="min_duraton_s"):
        load_config(["filter.min_duraton_s=1"])
    with pytest.raises(ValueError, match="split.enabled"):
        load_config(["split.enabled=maybe"])
    with pytest.raises(SystemExit):
        prepare_command([str(folder), "--out", str(tmp_path / "x"), "workers"])
    assert "is not key=value" in capsys.readouterr().err
    with pytest.raises(ValueError, match="aesthetic_model and filter.min_aesthetic go together"):
        load_config(["filter.min_aesthetic=3"])
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="output folder .*file/out is not writable"):
        prepare(str(folder), tmp_path / "file" / "out", load_config([]), runner="inline")
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        prepare(str(tmp_path / "nothing"), tmp_path / "out", load_config([]), runner="inline")
    out = tmp_path / "out"
    prepare(str(folder), out, load_config(["shard_size_mb=0.05"]), runner="inline")
    with pytest.raises(ValueError, match=r"another source or config \(differs in \['config'\]\)"):
        prepare(str(folder), out, load_config(["shard_size_mb=0.05", "seed=1"]), runner="inline")


@pytest.fixture(scope="module")
def listed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A list's folder and {file as a list names it: caption}: tiny clips by a relative path,
    in a subfolder, by an absolute path outside the folder, and one without a caption."""
    folder, elsewhere = tmp_path_factory.mktemp("listed"), tmp_path_factory.mktemp("elsewhere")
    (folder / "sub").mkdir()
    rabbit = source_frames("bigbuckbunny.mp4", 8, height=32)
    bikes = source_frames("bikes.mp4", 8, height=32)
    encode(folder / "rabbit.mp4", rabbit, "libx264", "yuv420p")
    encode(folder / "sub" / "bikes.mp4", bikes, "libx264", "yuv420p")
    encode(folder / "uncaptioned.mp4", bikes[::-1], "libx264", "yuv420p")
    far = encode(elsewhere / "far.mp4", rabbit[::-1], "libx264", "yuv420p")
    captions = {
        "rabbit.mp4": "a cartoon rabbit",
        "sub/bikes.mp4": 'bikes, "fast", on a track',  # a comma and quotes: CSV quoting
        str(far): "a rabbit, given by an absolute path",
        "uncaptioned.mp4": "",  # empty, or null: no caption, dropped as for a `file` list
    }
    return folder, captions


@pytest.fixture(scope="module")
def file_list_prepared(listed, tmp_path_factory) -> tuple[list[dict], dict, dict[str, bytes]]:
    """Tessera's own `file` + `caption` list of the clips, listed and prepared once: the
    reference the other trainers' lists must equal."""
    folder, captions = listed
    source = folder / "tessera.csv"
    write_csv(source, ["file", "caption"], [[file, text] for file, text in captions.items()])
    out = tmp_path_factory.mktemp("file_list")
    report = prepare(str(source), out, load_config([]), runner="inline", progress=False)
    assert report["dropped"] == [{"file": "uncaptioned.mp4", "reason": "no caption"}]
    found = samples(out)
    assert {file: sample["meta"]["caption"] for file, (sample,) in found.items()} == {
        file: text for file, text in captions.items() if text
    }
    files = output_files(out)
    del files["report.json"]  # it names the source list
    return list_source(str(source)), report, files


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def open_sora(folder: Path, captions: dict[str, str]) -> Path:
    """Open-Sora's CSV: `path`, `text`, and the columns its tools add (ignored)."""
    header = ["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps"]
    rows = [[file, text, 8, 32, 56, 0.57, 24] for file, text in captions.items()]
    write_csv(folder / "open_sora.csv", header, rows)
    return folder / "open_sora.csv"


def diffsynth(folder: Path, captions: dict[str, str], column: str = "video") -> Path:
    """DiffSynth-Studio's `metadata.csv`: `video` (or, for images, `image`) and `prompt`."""
    path = folder / ("metadata.csv" if column == "video" else f"metadata_{column}.csv")
    write_csv(path, [column, "prompt"], [[file, text] for file, text in captions.items()])
    return path


def ltx_video_trainer(folder: Path, captions: dict[str, str]) -> Path:
    """LTX-Video-Trainer's `dataset.json`: an array of {media_path, caption}, no caption null."""
    rows = [{"caption": text or None, "media_path": file} for file, text in captions.items()]
    (folder / "dataset.json").write_text(json.dumps(rows, indent=2))
    return folder / "dataset.json"


def musubi_tuner(folder: Path, captions: dict[str, str], column: str = "video_path") -> Path:
    """musubi-tuner's JSONL (`video_jsonl_file`, or `image_jsonl_file` with `image_path`): a
    row without a caption has none."""
    path = folder / f"musubi_{column}.jsonl"
    rows = [{column: file} | ({"caption": text} if text else {}) for file, text in captions.items()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "write_list",
    [
        open_sora,
        diffsynth,
        lambda folder, captions: diffsynth(folder, captions, column="image"),
        ltx_video_trainer,
        musubi_tuner,
        lambda folder, captions: musubi_tuner(folder, captions, column="image_path"),
    ],
    ids=[
        "open-sora",
        "diffsynth",
        "diffsynth-image",
        "ltx-video-trainer",
        "musubi",
        "musubi-image",
    ],
)
def test_other_trainers_lists_prepare_as_a_file_list(
    write_list, listed, file_list_prepared, tmp_path
):
    """Each trainer's list, in its own form, of the same clips and captions: the same listing
    (files, sizes, captions) and, prepared, the same shards and manifest, byte for byte, as
    Tessera's `file` + `caption` list."""
    folder, captions = listed
    rows, report, files = file_list_prepared
    source = str(write_list(folder, captions))
    assert list_source(source) == rows
    out = tmp_path / "out"
    assert prepare(source, out, load_config([]), runner="inline", progress=False) == report | {
        "source": source
    }
    assert output_files(out) == files | {"report.json": (out / "report.json").read_bytes()}


def test_a_list_of_unknown_columns_fails_naming_the_list_and_its_columns(tmp_path):
    """Before any work: the list, the columns it has, and the column pairs a list may have."""
    source = tmp_path / "clips.csv"  # Open-Sora's `path`, another trainer's `caption`
    write_csv(source, ["path", "caption", "fps"], [["x.mp4", "a clip", 24]])
    with pytest.raises(ValueError) as failed:
        prepare(str(source), tmp_path / "out", load_config([]), runner="inline")
    message = str(failed.value)
    assert message.startswith(f"{source}: its columns ['path', 'caption', 'fps'] are no known")
    for accepted in (
        "file [+ caption]",
        "path + text (Open-Sora)",
        "video + prompt (DiffSynth-Studio)",
        "media_path + caption (LTX-Video-Trainer)",
        "video_path + caption (musubi-tuner)",
    ):
        assert accepted in message
    assert not list((tmp_path / "out").glob("*.tar"))
    # A row without a file is named with the list's own column; a .json list is an array.
    (tmp_path / "musubi.jsonl").write_text(
        '{"video_path": "x.mp4", "caption": "a"}\n{"caption": "b"}\n'
    )
    with pytest.raises(
        ValueError, match=r"musubi.jsonl: row 2 has an empty or missing 'video_path'"
    ):
        list_source(str(tmp_path / "musubi.jsonl"))
    (tmp_path / "dataset.json").write_text('{"media_path": "x.mp4", "caption": "a clip"}')
    with pytest.raises(ValueError, match=r"dataset.json: a .json list must be an array of objects"):
        list_source(str(tmp_path / "dataset.json"))


@pytest.fixture
def ray_cluster(tmp_path):
    """A Ray head started apart from the test (`ray start --head --block`), with the S3 test
    server's settings in its environment, as a user's cluster would have its own. Its token is
    made here and handed to head and driver: nothing is read from ~/.ray."""
    from object_store import S3Server

    s3 = S3Server()
    # The head's and the driver's token authentication must agree, as on any cluster.
    auth = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env = os.environ | s3.env | auth | {"PYTHONPATH": str(ROOT)}
    log = tmp_path / "ray_head.log"
    head = None
    try:
        with reserved_ports(1) as (port,), open(log, "wb") as output:  # held till GCS listens
            head = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "ray"),
                    "start",
                    "--head",
                    "--block",
                    f"--port={port}",
                    "--num-cpus=2",
                    "--include-dashboard=false",
                ],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            _wait_for_head(head, port, log)
        yield s3, f"127.0.0.1:{port}", auth
    finally:
        if head is not None and head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        s3.stop()


def _wait_for_head(head: subprocess.Popen, port: int, log: Path, timeout: float = 120) -> None:
    """Until the head's GCS port answers; its log in the message if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"the Ray head exited ({head.returncode}):\n{log.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the Ray head did not answer in {timeout} s:\n{log.read_text()}")


@pytest.mark.multiprocess
def test_an_s3_prefix_on_an_existing_ray_cluster(ray_cluster, mixed, tmp_path, monkeypatch):
    """`--address` runs the job on a cluster that was already there, reading an s3:// prefix
    (captions from the `.txt` beside each file): the same shards as from the local folder."""
    s3, address, auth = ray_cluster
    folder, valid, bad = mixed
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    url = s3.upload(folder, "raw")
    options = ["shard_size_mb=0.05"]
    # A process of its own with a deadline: a driver that cannot reach its cluster fails the
    # test instead of hanging it.
    subprocess.run(
        [sys.executable, "-m", "data.prepare", url, "--out", str(tmp_path / "s3")]
        + ["--address", address, *options],
        env=os.environ | auth | {"PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    report = json.loads((tmp_path / "s3" / "report.json").read_text())
    local = prepare(str(folder), tmp_path / "local", load_config(options), runner="inline")
    assert report["samples"] == len(valid) and report == local | {"source": url}
    assert output_files(tmp_path / "s3") == output_files(tmp_path / "local") | {
        "report.json": (tmp_path / "s3" / "report.json").read_bytes()
    }
    fetched = {request.path.rsplit("/", 1)[1] for request in s3.log.requests(method="GET")}
    non_empty = {file for file in valid | bad if (folder / file).stat().st_size}
    assert non_empty | {f"{Path(file).stem}.txt" for file in valid} <= fetched
