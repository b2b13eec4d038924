"""Files written atomically honouring the umask, and files read back: a damaged one is moved
aside (nothing deleted) with an error naming it and what happens next, so no rerun fails on it again."""

import json
import os
import stat
import zipfile

import polars as pl
import pytest

import iisan.io as io_mod
from iisan.io import DamagedFileError, DiskFullError, atomic_path, read_json, read_or_set_aside, require_free_space, set_aside, write_json


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_outputs_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"x")
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(old)
    for f in ("m.json", "x.bin"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "m.json").read_text().strip().startswith("{") and len(list(tmp_path.iterdir())) == 1


def _damaged(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f"{name}.damaged-"))


def test_a_damaged_file_is_moved_aside_and_named(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"hr@10": 0.')
    with pytest.raises(DamagedFileError, match=rf"{path}: unreadable \(JSONDecodeError: .*\); moved aside to "
                                               rf"{tmp_path}/metrics.json.damaged-\d{{8}}T\d{{6}}Z; do this next"):
        read_json(path, then="do this next")
    assert not path.exists() and [(tmp_path / n).read_text() for n in _damaged(tmp_path, "metrics.json")] == ['{"hr@10": 0.']
    path.write_text("[")  # the same second: a second name, nothing overwritten
    with pytest.raises(DamagedFileError):
        read_json(path, then="again")
    assert len(_damaged(tmp_path, "metrics.json")) == 2


def test_without_a_next_step_a_json_error_names_the_file_and_moves_nothing(tmp_path):
    (tmp_path / "a.json").write_text("{")
    with pytest.raises(ValueError, match=rf"{tmp_path}/a.json: not valid JSON"):
        read_json(tmp_path / "a.json")
    assert (tmp_path / "a.json").exists()


def test_missing_or_unreadable_is_not_damage(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_or_set_aside(tmp_path / "none", lambda p: p.read_text(), "x")
    with pytest.raises(TypeError):  # an error the reader does not count as damage
        read_or_set_aside(tmp_path, lambda p: (_ for _ in ()).throw(TypeError("bug")), "x", errors=(ValueError,))
    assert tmp_path.exists()


def test_set_aside_moves_a_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    dst = set_aside(tmp_path / "model", "test")
    assert not (tmp_path / "model").exists() and (dst / "config.json").read_text() == "{}"


def test_free_space_is_checked_against_the_bytes_needed(tmp_path, monkeypatch):
    real = io_mod.shutil.disk_usage
    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=2**30))
    require_free_space(tmp_path / "new" / "cache.npy", 2**29)  # a folder not made yet: its parent's filesystem
    with pytest.raises(DiskFullError, match=rf"{tmp_path}/cache.npy: needs {3 * 2**29} bytes \(1.50 GiB\), "
                                            rf"but its filesystem has only {2**30} bytes \(1.00 GiB\) free"):
        require_free_space(tmp_path / "cache.npy", 3 * 2**29)


def test_a_damaged_metrics_file_is_moved_aside_so_the_next_run_redoes_its_job(tmp_path):
    from iisan.tables.build import read_runs

    good, bad = tmp_path / "a" / "metrics.json", tmp_path / "b" / "metrics.json"
    write_json(good, {"hr@10": 0.5})
    write_json(bad, {"hr@10": 0.5})
    bad.write_text(bad.read_text()[:-5])
    with pytest.raises(DamagedFileError, match=rf"{bad}: unreadable .* moved aside .* rerun the workflow: it redoes the job"):
        read_runs([{}, {}], [good, bad])
    assert not bad.exists() and _damaged(bad.parent, "metrics.json") and good.exists()


@pytest.fixture(scope="module")
def bert_standin(tmp_path_factory):
    from iisan.encoders.backbones import BackboneSpec

    spec = BackboneSpec.from_config("b", dict(source="demo", family="bert", modality="text", layers=2, hidden=16, heads=2,
                                              vocab_size=200, max_tokens=12))
    return spec, ["a red bike", "blue paint for bikes", "a red hat"]


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_standin_weights_honour_the_umask(tmp_path, bert_standin, umask):
    from iisan.encoders.backbones import build_standin

    spec, texts = bert_standin
    old = os.umask(umask)
    try:
        build_standin(spec, tmp_path / "s", texts)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "s").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_captioner_standin_weights_honour_the_umask(tmp_path, umask):
    from iisan.captions import build_captioner_standin

    old = os.umask(umask)
    try:
        build_captioner_standin(tmp_path / "c", ["a red bike", "describe the image"], seed=1)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "c").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_a_truncated_standin_is_moved_aside_when_loaded(tmp_path, bert_standin):
    """safetensors' own error names no file; the stand-in folder goes aside, so the next run builds it again."""
    import torch

    from iisan.encoders.backbones import build_standin, load_backbone

    spec, texts = bert_standin
    folder = tmp_path / "s"
    build_standin(spec, folder, texts)
    load_backbone(spec, str(folder), torch.device("cpu"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DamagedFileError, match=rf"{weights}: unreadable \(SafetensorError: .*\); moved aside to {tmp_path}/s.damaged-"
                                               r".*; the next run of the workflow builds it again"):
        load_backbone(spec, str(folder), torch.device("cpu"))
    assert not folder.exists() and len(_damaged(tmp_path, "s")) == 1


def test_a_damaged_frames_archive_is_moved_aside(tmp_path):
    from iisan.data.frames import read_frames

    archive = tmp_path / "frames.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for k in range(3):
            zf.writestr(f"i1_{k}.jpg", b"jpeg bytes %d" % k * 50)
    write_json(tmp_path / "frames.json", {"frames": 3})
    assert read_frames(archive) == {"i1_0.jpg", "i1_1.jpg", "i1_2.jpg"}
    data = bytearray(archive.read_bytes())
    data[100] ^= 0xFF  # a changed byte inside a member: its CRC fails
    archive.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=rf"{archive}: unreadable \(BadZipFile: .*i1_\d.jpg.*the next run of the workflow extracts"):
        read_frames(archive)
    assert not archive.exists() and _damaged(tmp_path, "frames.zip")
    with zipfile.ZipFile(archive, "w") as zf:  # another archive than its manifest describes
        zf.writestr("i1_0.jpg", b"x")
    with pytest.raises(DamagedFileError, match="1 frames, but frames.json beside it says 3"):
        read_frames(archive)
    (tmp_path / "frames.json").write_text('{"frames": ')
    with pytest.raises(DamagedFileError, match=rf"{tmp_path}/frames.json: unreadable \(JSONDecodeError"):
        read_frames(tmp_path / "frames.zip")


def test_a_truncated_captions_file_is_moved_aside(tmp_path):
    from iisan.data import caption_file, item_texts

    items = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"]}).write_parquet(items)
    path = caption_file(items, "cover_caption")
    path.parent.mkdir()
    pl.DataFrame({"item_id": ["a", "b"], "caption": ["red", "blue"]}).write_parquet(path)
    assert item_texts(items, "cover_caption") == ["red", "blue"]
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DamagedFileError, match=rf"{path}: unreadable .*; the next run of the workflow captions the items again"):
        item_texts(items, "cover_caption")
    assert not path.exists() and _damaged(path.parent, "cover.parquet")


def test_write_json_output_reads_back(tmp_path):
    write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert read_json(tmp_path / "x.json", then="-") == json.loads((tmp_path / "x.json").read_text())


def test_a_caption_field_reads_the_caption_set_it_is_given(tmp_path):
    """A job passes the caption set its rule declares as input; without one, the set beside the
    item table is read."""
    from iisan.data import caption_file, item_texts

    items = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"]}).write_parquet(items)
    beside = caption_file(items, "cover_caption")
    beside.parent.mkdir()
    pl.DataFrame({"item_id": ["a", "b"], "caption": ["red", "blue"]}).write_parquet(beside)
    given = tmp_path / "elsewhere.parquet"
    pl.DataFrame({"item_id": ["a", "b"], "caption": ["green", "grey"]}).write_parquet(given)
    assert item_texts(items, "cover_caption") == ["red", "blue"]
    assert item_texts(items, "cover_caption", given) == ["green", "grey"]
