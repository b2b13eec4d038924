import json
import re
import zipfile

import polars as pl
import pytest

from iisan.data.amazon import preprocess
from iisan.data.demo import DemoSpec, generate
from iisan.data.errors import DataError
from iisan.data.sequences import load_sequences

from conftest import write

SCI = "Scientific/Industrial_and_Scientific_items.tsv", "Scientific/am_Industrial_and_Scientific_users.tsv"


def test_table_one_counts_scientific(mirror, tmp_path):
    stats = preprocess(mirror / SCI[0], mirror / SCI[1], tmp_path)
    assert (stats["users"], stats["items"], stats["interactions"]) == (12076, 20314, 81711)
    assert json.loads((tmp_path / "stats.json").read_text())["interactions"] == 81711
    items = pl.read_parquet(tmp_path / "items.parquet")
    assert items["item"].to_list() == list(range(1, 20315))
    # titles keep HTML entities as they are
    assert items.filter(pl.col("title").str.contains("&amp;")).height > 0
    seqs = pl.read_parquet(tmp_path / "sequences.parquet")
    assert seqs["sequence"].list.len().max() == 13
    assert seqs["sequence"].list.len().min() == 5


def _tiny(tmp_path, items_text=None, users_text=None):
    items = write(tmp_path / "raw" / "items.tsv", items_text or "".join(f"I{i}\ttitle {i}\n" for i in range(1, 21)))
    users = write(
        tmp_path / "raw" / "users.tsv",
        users_text
        or (
            "u1\tI1 I2 I3 I4 I5 I6 I7 I8 I9 I10 I11 I12 I13 I14 I15\n"  # 15 -> last 13 kept
            "u2\tI3 I3 I4\n"  # fewer than 5 -> dropped
            "u3\tI20 I19 I18 I17 I16\n"
        ),
    )
    return items, users


def test_preprocess_windows_and_splits(tmp_path):
    items, users = _tiny(tmp_path)
    stats = preprocess(items, users, tmp_path / "out")
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 18, 18)
    it = pl.read_parquet(tmp_path / "out" / "items.parquet")
    # items-file order, only items in kept windows (I1, I2 fall out of u1's last 13)
    assert it["item_id"].to_list() == [f"I{i}" for i in range(3, 21)]
    seq = pl.read_parquet(tmp_path / "out" / "sequences.parquet").row(0, named=True)
    s = list(range(1, 14))  # I3..I15 -> 1..13
    assert seq["sequence"] == s
    assert seq["train"] == s[:-2]
    assert seq["valid_input"] == s[-12:-2] and seq["valid_target"] == s[-2]
    assert seq["test_input"] == s[-11:-1] and seq["test_target"] == s[-1]
    data = load_sequences(tmp_path / "out")
    assert data.train.shape == (2, 11)
    assert data.train[1].tolist() == [0] * 8 + [18, 17, 16]  # left-padded
    pop = pl.read_parquet(tmp_path / "out" / "popularity.parquet")
    assert pop["p"][0] == 1.0 and abs(pop["p"][1:].sum() - 1) < 1e-12
    assert pop["count"][1] == 1 and pop["count"][13] == 0  # item 13 only in u1's test target


@pytest.mark.parametrize(
    "items_text,users_text,message",
    [
        ("I1\ttitle\textra\n", None, "items.tsv:1: expected 2 tab-separated fields"),
        ("I1\tok\nI2\t   \n", None, "items.tsv:2: empty title for item 'I2'"),
        (None, "u1\tI1 I2 I3 I4 I5\nu2\tI1 I99 I3 I4 I5\n", "users.tsv:2: unknown item id 'I99'"),
        (None, "u1\tI1 I2 I3 I4 I5\nu2 I1 I2\n", "users.tsv:2: expected 2 tab-separated fields"),
    ],
)
def test_bad_lines_are_errors_naming_file_and_line(tmp_path, items_text, users_text, message):
    items, users = _tiny(tmp_path, items_text, users_text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "items.parquet").write_bytes(b"previous result")
    with pytest.raises(DataError) as err:
        preprocess(items, users, out)
    assert message in str(err.value)
    # nothing already written is lost or half-written
    assert (out / "items.parquet").read_bytes() == b"previous result"
    assert sorted(p.name for p in out.iterdir()) == ["items.parquet"]


def test_bad_lines_skipped_and_counted(tmp_path):
    items, users = _tiny(
        tmp_path,
        "I1\tone\nI2\t\nI3\tthree\nI4\tfour\nI5\tfive\nI6\tsix\n" + "".join(f"I{i}\tt{i}\n" for i in range(7, 17)),
        "u1\tI1 I3 I4 I5 I6\nu2\tI1 I2 I3 I4 I5\nbroken line\nu4\t" + " ".join(f"I{i}" for i in range(7, 17)) + "\n",
    )
    stats = preprocess(items, users, tmp_path / "out", bad_lines="skip")
    assert stats["skipped_lines"] == 3  # empty title, unknown item I2 (its line was skipped), field count
    assert stats["users"] == 2 and stats["items"] == 15
    assert any("users.tsv:3" in s for s in stats["skipped"])


def _jpeg(shade: int = 128, size: int = 8) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (shade, shade, shade)).save(buf, "JPEG")
    return buf.getvalue()


def _zip(path, names, content=None):
    """A zip of JPEGs `names`; `content` replaces some members' bytes ({name: bytes})."""
    with zipfile.ZipFile(path, "w") as zf:
        for n in names:
            zf.writestr(n, (content or {}).get(n, _jpeg()))
    return path


def test_missing_image_is_an_error_or_a_counted_blank(tmp_path):
    items, users = _tiny(tmp_path)
    archive = _zip(tmp_path / "covers.zip", [f"I{i}.jpg" for i in range(3, 20)])  # I20 missing
    with pytest.raises(DataError, match=r"no image for item 'I20' \(set dataset_sources.out.missing_images: blank in the config"):
        preprocess(items, users, tmp_path / "out", images=archive)
    stats = preprocess(items, users, tmp_path / "out", images=archive, missing_images="blank")
    assert stats["blank_images"] == 1 and stats["blank_image_items"] == ["I20"]
    it = pl.read_parquet(tmp_path / "out" / "items.parquet")
    assert it.filter(pl.col("item_id") == "I20")["image"][0] is None
    assert it.filter(pl.col("item_id") == "I3")["image"][0] == "I3.jpg"


@pytest.mark.parametrize("content,why", [(b"", "it is empty (0 bytes)"),
                                         (_jpeg(size=64)[:-40], "OSError: image file is truncated"),
                                         (b"<html>not found</html>", "its 22 bytes are in no image format PIL recognises")])
def test_an_undecodable_image_is_an_error_naming_it_or_a_counted_blank(tmp_path, content, why):
    """A zero-byte, truncated or non-image member stops preprocessing naming the item, the member,
    the archive and the config key; with missing_images: blank the item gets a blank image and
    is counted as one without an image, so the backbones and the captions never see it."""
    from iisan.data.images import UndecodableImage
    from iisan.encoders.item_inputs import load_images

    items, users = _tiny(tmp_path)
    names = [f"covers/I{i}.jpg" for i in range(3, 21)]
    archive = _zip(tmp_path / "images.zip", names, {"covers/I7.jpg": content})
    out = tmp_path / "Scientific"
    with pytest.raises(UndecodableImage) as err:
        preprocess(items, users, out, images=archive)
    assert isinstance(err.value, DataError)
    assert str(err.value).startswith(f"{archive}: the image of item 'I7' (member 'covers/I7.jpg') cannot be decoded ({why}")
    assert str(err.value).endswith("set dataset_sources.Scientific.missing_images: blank in the config to give the item a "
                                   "blank image, as an item without an image gets")
    assert not (out / "stats.json").exists()
    stats = preprocess(items, users, out, images=archive, missing_images="blank")
    assert stats["blank_images"] == 1 and stats["blank_image_items"] == ["I7"]
    table = pl.read_parquet(out / "items.parquet")
    images = dict(zip(table["item_id"], table["image"]))
    assert images["I7"] is None and images["I8"] == "covers/I8.jpg"
    ids = table["item_id"].to_list()
    loaded = load_images(archive, table["image"].to_list(), 8, ids, "Scientific")  # what the cache reads
    assert loaded[ids.index("I7")].getextrema() == ((0, 0),) * 3 and loaded[ids.index("I8")].getpixel((0, 0))[0] > 100
    # read anyway (an archive replaced after preprocessing): the reader names it the same way
    with pytest.raises(UndecodableImage, match=re.escape(f"{archive}: the image of item 'I7' (member 'covers/I7.jpg') cannot "
                                                         f"be decoded ({why}")):
        load_images(archive, ["covers/I7.jpg"], 8, None, "Scientific")


def test_demo_is_deterministic_and_small(tmp_path):
    spec = DemoSpec(n_items=100, n_users=150)
    a = generate(tmp_path / "a", spec)
    b = generate(tmp_path / "b", spec)
    assert a["users"].read_text() == b["users"].read_text()
    assert a["items"].read_text() == b["items"].read_text()
    with zipfile.ZipFile(a["images"]) as zf:
        assert len(zf.namelist()) == 100
    stats = preprocess(a["items"], a["users"], tmp_path / "p", images=a["images"])
    assert stats["users"] > 100 and stats["blank_images"] == 0


def test_crlf_lines_are_repaired_and_counted(tmp_path):
    items, users = _tiny(tmp_path, "".join(f"I{i}\ttitle {i}\r\n" for i in range(1, 21)))
    stats = preprocess(items, users, tmp_path / "out")
    assert stats["repaired_lines"] == 20 and stats["skipped_lines"] == 0
    titles = pl.read_parquet(tmp_path / "out/items.parquet")["title"].to_list()
    assert not any(t.endswith("\r") for t in titles)


def _bad_utf8(tmp_path, which):
    """The tiny dataset and a user u4 (I4..I9), with byte 0xff in line 3 of the items or the
    users file."""
    items, users = _tiny(tmp_path)
    users.write_text(users.read_text() + "u4\tI4 I5 I6 I7 I8 I9\n")
    path = items if which == "items" else users
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:4] + b"\xff" + lines[2][4:]  # 'I3\tt\xffitle 3' / 'u3\tI\xff20 ...'
    path.write_bytes(b"".join(lines))
    return items, users, path


@pytest.mark.parametrize("which", ["items", "users"])
def test_invalid_utf8_is_an_error_naming_file_and_line(tmp_path, which):
    items, users, bad = _bad_utf8(tmp_path, which)
    with pytest.raises(DataError) as err:
        preprocess(items, users, tmp_path / "out")
    assert f"{bad}:3: invalid UTF-8 (byte 0xff at column 5)" in str(err.value)


@pytest.mark.parametrize(
    "which,skipped,users,items",
    [
        ("items", 3, 2, 11),  # I3 is skipped, so are u1 and u2 (unknown item I3); u3 and u4 are kept
        ("users", 1, 2, 13),  # u3 is skipped; u1 and u4 (within u1's items) are kept
    ],
)
def test_invalid_utf8_skipped_and_counted(tmp_path, which, skipped, users, items):
    items_tsv, users_tsv, bad = _bad_utf8(tmp_path, which)
    stats = preprocess(items_tsv, users_tsv, tmp_path / "out", bad_lines="skip")
    assert (stats["users"], stats["items"]) == (users, items)
    written = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert written["skipped_lines"] == skipped
    assert f"{bad}:3: invalid UTF-8 (byte 0xff at column 5)" in written["skipped"]


@pytest.mark.parametrize("which", ["items", "users"])
def test_leading_byte_order_mark_is_removed_and_counted(tmp_path, which):
    items, users = _tiny(tmp_path / "plain")
    expected = preprocess(items, users, tmp_path / "plain" / "out")
    items, users = _tiny(tmp_path / "bom")
    path = items if which == "items" else users
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    stats = preprocess(items, users, tmp_path / "bom" / "out")
    assert stats["repaired_lines"] == 1 and stats["repaired"] == [f"{path}:1: UTF-8 byte-order mark removed"]
    for name in ("items.parquet", "sequences.parquet"):
        assert pl.read_parquet(tmp_path / "bom" / "out" / name).equals(
            pl.read_parquet(tmp_path / "plain" / "out" / name)
        )
    assert stats["item_order_hash"] == expected["item_order_hash"]



def test_a_lone_carriage_return_is_not_a_line_end(tmp_path):
    """A \\r inside a title is no line end: the error names its own line (not the valid next
    one); skipped, the whole record goes (never kept with its title cut at the \\r) and no
    CRLF repair is counted."""
    text = "".join(f"I{i}\ttitle {i}\n" for i in range(1, 21)).replace("I5\ttitle 5", "I5\ttitle\rfive")
    items, users = _tiny(tmp_path, text)
    with pytest.raises(DataError) as err:
        preprocess(items, users, tmp_path / "out")
    assert f"{items}:5: carriage return (\\r) inside the line at column 9" in str(err.value)
    users.write_text(users.read_text().replace("I5 ", ""))  # u1 without I5, so that it is kept
    stats = preprocess(items, users, tmp_path / "out", bad_lines="skip")
    assert stats["skipped"] == [f"{items}:5: carriage return (\\r) inside the line at column 9 (only \\n or \\r\\n ends a line)"]
    assert stats["repaired_lines"] == 0
    it = pl.read_parquet(tmp_path / "out" / "items.parquet")
    assert "I5" not in it["item_id"].to_list() and not any("\r" in t or t == "title" for t in it["title"].to_list())
    # CRLF endings stay a counted repair, and a \r\n inside the file is one line end
    items.write_bytes(items.read_bytes().replace(b"I5\ttitle\rfive\n", b"I5\tfive\r\n"))
    stats = preprocess(items, users, tmp_path / "out2")
    assert stats["repaired"] == [f"{items}:5: CRLF line ending"] and stats["skipped_lines"] == 0


@pytest.mark.parametrize(
    "users_text,options,message",
    [
        ("u1\tI1 I2 I3 I4 I5 I6 I7 I8 I9 I10 I11 I12 I13\nu2\tI1 I2\n", {"min_interactions": 2},
         "1 of 2 users have fewer than 3 interactions, so their training history is empty (preprocess.min_interactions is 2"),
        ("u1\tI1 I2 I3 I4 I5 I6 I7 I8 I9 I10 I11 I12 I13\n", {}, "only 1 user has at least 5 interactions; training needs 2"),
        ("u1\tI1 I2 I3 I4 I5 I6\nu2\tI6 I5 I4 I3 I2 I7 I8 I9 I10\n", {},
         "10 items after preprocessing (2 users), not more than the top-10 of HR@10 and NDCG@10"),
    ],
)
def test_data_that_trains_without_meaning_stops_with_counts(tmp_path, users_text, options, message):
    """Users with an empty training history, a single user (loss 0) or no more items than the
    metrics' top-K (every HR and NDCG 1.0) stop the preprocessing; nothing is written."""
    items, users = _tiny(tmp_path, users_text=users_text)
    with pytest.raises(DataError, match=re.escape(message)):
        preprocess(items, users, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_evaluation_windows_follow_the_window_and_max_len(tmp_path):
    """The evaluation inputs are the T = window - 3 items before each target (the authors' 13 =
    10 + 3); a user encoder of max_len T' <= T reads the last T' of them, a longer one is refused
    naming preprocess.window."""
    items, users = _tiny(tmp_path)
    stats = preprocess(items, users, tmp_path / "out", window=8)
    assert (stats["window"], stats["max_len"]) == (8, 5)
    seq = pl.read_parquet(tmp_path / "out" / "sequences.parquet").row(0, named=True)
    s = seq["sequence"]
    assert len(s) == 8 and seq["train"] == s[:-2]
    assert seq["valid_input"] == s[-7:-2] and seq["test_input"] == s[-6:-1]
    data = load_sequences(tmp_path / "out", max_len=5)
    assert data.valid_input.shape == (2, 5) and data.train.shape == (2, 6)
    assert data.test_input[0].tolist() == s[-6:-1]
    assert load_sequences(tmp_path / "out", max_len=3).test_input[0].tolist() == s[-4:-1]
    with pytest.raises(ValueError, match=r"model.max_len 6 is longer than the 5 evaluation inputs .* set preprocess.window to at least 9"):
        load_sequences(tmp_path / "out", max_len=6)
    with pytest.raises(ValueError, match="preprocess.window: 3 keeps no evaluation input"):
        preprocess(items, users, tmp_path / "out3", window=3)
