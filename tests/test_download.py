from pathlib import Path

import pytest

from iisan.data.download import ChecksumError, fetch, sha256

from conftest import write

SCI_USERS = "Scientific/am_Industrial_and_Scientific_users.tsv"
SCI_USERS_SHA = "1cc801daba6bb7af4e1f2ed4506231d489b1445e58f8ea3e1d399ac9e14846b2"


def test_fetch_from_mirror_verifies_the_published_checksum(mirror, tmp_path):
    digest = fetch(SCI_USERS, tmp_path / "users.tsv", base_url="http://unused.invalid", mirror=str(mirror),
                   expected_sha256=SCI_USERS_SHA)
    assert digest == SCI_USERS_SHA == sha256(tmp_path / "users.tsv")


def test_checksum_mismatch_stops_and_keeps_the_old_file(tmp_path):
    mirror = tmp_path / "mirror"
    write(mirror / "Scientific/items.tsv", "I1\tchanged\n")
    dest = write(tmp_path / "raw/items.tsv", "previous\n")
    with pytest.raises(ChecksumError, match="Scientific/items.tsv: sha256 is .*the config expects 00"):
        fetch("Scientific/items.tsv", dest, base_url="http://unused.invalid", mirror=str(mirror), expected_sha256="00" * 32)
    assert dest.read_text() == "previous\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["items.tsv"]


def test_missing_mirror_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file Office/x.tsv"):
        fetch("Office/x.tsv", tmp_path / "x.tsv", base_url="http://unused.invalid", mirror=str(tmp_path))


def test_missing_hash_is_allowed_and_logged(tmp_path, caplog):
    write(tmp_path / "m/a.tsv", "x\n")
    fetch("a.tsv", tmp_path / "a.tsv", base_url="http://unused.invalid", mirror=str(tmp_path / "m"))
    assert "no sha256" in caplog.text


def test_fetch_many_resumes_and_skips_what_is_there(tmp_path):
    """Videos are fetched one file at a time, each atomically: a rerun fetches only the missing."""
    from iisan.data.download import fetch_many

    mirror = tmp_path / "mirror" / "videos"
    mirror.mkdir(parents=True)
    for i in ("1", "2", "3"):
        (mirror / f"{i}.mp4").write_bytes(i.encode() * 10)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "2.mp4").write_bytes(b"22222222222")  # already fetched
    got = fetch_many([f"videos/{i}.mp4" for i in ("1", "2", "3")], dest, base_url="http://unused", mirror=str(tmp_path / "mirror"))
    assert got["2.mp4"] is None and got["1.mp4"] and got["3.mp4"]
    assert (dest / "3.mp4").read_bytes() == b"3" * 10 and sorted(p.name for p in dest.iterdir()) == ["1.mp4", "2.mp4", "3.mp4"]
    with pytest.raises(FileNotFoundError, match="no file videos/4.mp4"):
        fetch_many(["videos/4.mp4"], dest, base_url="http://unused", mirror=str(tmp_path / "mirror"))


# --- the Amazon datasets' image archives (rule fetch_amazon_images) -----------------------------
def _authors_archive(path, ids, folder="am_image_is"):
    """An image archive laid out as the authors' am_image_is.zip: <folder>/<item_id>.jpg, with the
    macOS metadata a zip made on a Mac carries."""
    import io
    import zipfile

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{folder}/", b"")
        for n, item in enumerate(ids):
            buf = io.BytesIO()
            Image.new("RGB", (8, 6), (10 * n, 0, 0)).save(buf, format="JPEG")
            zf.writestr(f"{folder}/{item}.jpg", buf.getvalue())
            zf.writestr(f"__MACOSX/{folder}/._{item}.jpg", b"resource fork")
    return path


def _amazon_tsvs(tmp_path, ids):
    items = write(tmp_path / "items.tsv", "".join(f"{i}\ttitle of {i}\n" for i in ids))
    users = write(tmp_path / "users.tsv", "".join(f"U{u}\t{' '.join(ids[u:u + 5])}\n" for u in range(len(ids) - 4)))
    return items, users


IDS = [f"B00{n:07d}" for n in range(14)]  # more items than the metrics' top-10
SOURCE = {"file": "am_image_is.zip", "url": None, "sha256": None}


def test_authors_image_archive_from_the_mirror_is_read_by_item_id(tmp_path):
    """The authors' layout (am_image_is/<item_id>.jpg, __MACOSX entries beside) reaches the
    item table and the image loader of the cache."""
    import polars as pl

    from iisan.data.amazon import preprocess
    from iisan.data.download import fetch_images
    from iisan.encoders.item_inputs import load_images

    _authors_archive(tmp_path / "mirror" / "am_image_is.zip", IDS)
    dest = tmp_path / "raw/Scientific/images.zip"
    fetch_images("Scientific", SOURCE, dest, mirror=str(tmp_path / "mirror"))
    items, users = _amazon_tsvs(tmp_path, IDS)
    stats = preprocess(items, users, tmp_path / "ds", images=dest, min_interactions=5)
    assert stats["blank_images"] == 0
    table = pl.read_parquet(tmp_path / "ds/items.parquet")
    assert table["image"].to_list() == [f"am_image_is/{i}.jpg" for i in table["item_id"]]
    first, third = load_images(dest, [table["image"][0], table["image"][2]], 8)
    assert first.size == (8, 6) and first.getpixel((4, 3))[0] < third.getpixel((4, 3))[0]


def test_unpacked_authors_folder_in_the_mirror_is_packed(tmp_path):
    """The authors' README unzips the archives under Dataset/: a mirror of that folder holds
    am_image_is/ instead of the zip."""
    import zipfile

    _authors_archive(tmp_path / "a.zip", IDS)
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        zf.extractall(tmp_path / "mirror")
    from iisan.data.download import fetch_images

    dest = tmp_path / "images.zip"
    fetch_images("Scientific", SOURCE, dest, mirror=str(tmp_path / "mirror"))
    with zipfile.ZipFile(dest) as zf:
        assert {f"am_image_is/{i}.jpg" for i in IDS} <= set(zf.namelist())


def test_missing_image_archive_says_where_to_put_it(tmp_path):
    from iisan.data.download import MissingSource, fetch_images

    dest = tmp_path / "resources/raw/Office/images.zip"
    with pytest.raises(MissingSource, match=r"dataset Office: no image archive: neither .*am_image_op.zip .* has no url\. "
                       r"Download am_image_op.zip by hand .* place it at .*resources/raw/Office/images.zip"):
        fetch_images("Office", {"file": "am_image_op.zip"}, dest, mirror=str(tmp_path))
    assert not dest.exists()


def test_failed_download_says_where_to_put_it(tmp_path, monkeypatch):
    """A Drive link goes through gdown; a quota or permission page instead of the archive stops
    with the by-hand instructions and leaves nothing behind."""
    import iisan.data.download as dl

    seen = []

    def fake_gdown(url, output, quiet, fuzzy):
        seen.append(url)
        Path(output).write_text("<!DOCTYPE html><html>Google Drive - Quota exceeded</html>")

    gdown = pytest.importorskip("gdown")
    monkeypatch.setattr(gdown, "download", fake_gdown)
    dest = tmp_path / "images.zip"
    url = "https://drive.google.com/file/d/XYZ/view"
    with pytest.raises(dl.MissingSource, match=r"downloading its image archive from .*XYZ/view failed \(.*not a zip archive.*"
                       r"Quota.*place it at .*images.zip"):
        dl.fetch_images("Scientific", {"file": "am_image_is.zip", "url": url}, dest)
    assert seen == [url] and list(tmp_path.iterdir()) == []


def test_downloaded_archive_is_checked_by_sha256(tmp_path, monkeypatch):
    import shutil

    import iisan.data.download as dl

    archive = _authors_archive(tmp_path / "src.zip", IDS[:2])
    monkeypatch.setattr(dl, "download", lambda url, dest: shutil.copyfile(archive, dest))
    source = {"file": "am_image_is.zip", "url": "https://example.org/am_image_is.zip", "sha256": dl.sha256(archive)}
    assert dl.fetch_images("Scientific", source, tmp_path / "a.zip") == source["sha256"]
    with pytest.raises(dl.ChecksumError, match="the config expects 00"):
        dl.fetch_images("Scientific", dict(source, sha256="00" * 32), tmp_path / "b.zip")
