import pytest

from iisan.download import ChecksumError, fetch, sha256

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
    from iisan.download import fetch_many

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
