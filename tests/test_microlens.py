import json
import os
import zipfile
from pathlib import Path

import polars as pl
import pytest

from iisan.data.amazon import Counters, DataError
from iisan.data.microlens import TABLE_I, preprocess, read_titles_csv

from conftest import ROOT, write

FIXTURE = Path(__file__).parent / "fixtures" / "microlens"
PAIRS, TITLES = "MicroLens-100k_pairs.tsv", "MicroLens-100k_title_en.csv"

# Hand-computed from the fixture. Items-file order of the 16 surviving items (120: only user 2,
# who has 4 < 5 items; 117: only before user 1's last 13) -> 1..16.
ORDER = ["109", "103", "112", "105", "107", "101", "102", "104", "106", "108", "110", "111", "113", "114", "115", "116"]
SEQUENCES = {  # user id -> re-indexed window
    "1": [6, 7, 2, 8, 4, 9, 5, 10, 1, 11, 12, 3, 13],  # 101..113, the last 13 of 15
    "3": [16, 2, 3, 4, 15],  # exactly 5
    "4": [14, 1, 6, 5, 7, 1],  # a repeated item stays repeated
}
# training counts (each window less its last 2) of items 1..16; 13 and 15 are only targets
COUNTS = [2, 2, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1]


def test_fixture_counts_and_outputs(tmp_path):
    stats = preprocess(FIXTURE / PAIRS, FIXTURE / TITLES, tmp_path)
    assert (stats["raw_users"], stats["raw_items"], stats["raw_interactions"]) == (4, 18, 15 + 4 + 5 + 6)
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 16, 13 + 5 + 6)
    assert stats["skipped_lines"] == stats["repaired_lines"] == 0
    assert json.loads((tmp_path / "stats.json").read_text()) == stats

    items = pl.read_parquet(tmp_path / "items.parquet")
    assert items["item"].to_list() == list(range(1, 17))
    assert items["item_id"].to_list() == ORDER  # items-file order, not id or first-seen order
    titles = dict(zip(items["item_id"], items["title"]))
    assert titles["103"] == "Cooking, baking, and more"  # everything after the first comma
    assert titles["104"] == "Travel vlog: Paris, France"
    assert titles["112"] == '"Quoted title, with comma"'  # quotes kept literally
    assert titles["107"] == '"Just quotes"'

    seqs = pl.read_parquet(tmp_path / "sequences.parquet")
    assert seqs["user"].to_list() == [1, 2, 3]
    assert dict(zip(seqs["user_id"], seqs["sequence"].to_list())) == SEQUENCES
    row = seqs.row(0, named=True)
    s = SEQUENCES["1"]
    assert row["train"] == s[:-2] and row["valid_input"] == s[-12:-2] and row["test_input"] == s[-11:-1]
    assert (row["valid_target"], row["test_target"]) == (3, 13)
    assert seqs.row(2, named=True)["test_target"] == 1 and seqs.row(1, named=True)["valid_input"] == [16, 2, 3]

    pop = pl.read_parquet(tmp_path / "popularity.parquet")
    assert pop["count"].to_list() == [0] + COUNTS
    assert pop["p"].to_list() == [1.0] + [c / 18 for c in COUNTS]


def test_crlf_and_byte_order_mark_give_the_same_outputs(tmp_path):
    clean = preprocess(FIXTURE / PAIRS, FIXTURE / TITLES, tmp_path / "clean")
    pairs = tmp_path / "raw" / PAIRS
    titles = tmp_path / "raw" / TITLES
    write(pairs, (FIXTURE / PAIRS).read_text().replace("\n", "\r\n"))
    titles.write_bytes(b"\xef\xbb\xbf" + (FIXTURE / TITLES).read_bytes().replace(b"\n", b"\r\n"))
    stats = preprocess(pairs, titles, tmp_path / "crlf")
    assert stats["repaired_lines"] == 4 + 18 + 1 and stats["skipped_lines"] == 0
    assert f"{titles}:1: UTF-8 byte-order mark removed" in stats["repaired"]
    for name in ("items.parquet", "sequences.parquet", "popularity.parquet"):
        assert pl.read_parquet(tmp_path / "crlf" / name).equals(pl.read_parquet(tmp_path / "clean" / name))
    assert stats["item_order_hash"] == clean["item_order_hash"]


def test_title_is_everything_after_the_first_comma(tmp_path):
    path = write(tmp_path / "t.csv", '123,Hello, world\n 7 ,  spaced ,\n8,"a, b"\n')
    assert read_titles_csv(path) == {"123": "Hello, world", "7": "  spaced ,", "8": '"a, b"'}


@pytest.mark.parametrize(
    "text,message",
    [
        (b"101,ok\n102 no comma\n", "t.csv:2: no comma between item id and title"),
        (b"101,ok\n,title\n", "t.csv:2: empty item id"),
        (b"101,ok\n102,  \n", "t.csv:2: empty title for item '102'"),
        (b"101,ok\n101,again\n", "t.csv:2: duplicate item id '101'"),
        (b"101,ok\n102,caf\xff\n", "t.csv:2: invalid UTF-8 (byte 0xff at column 8)"),
        (b"101,ok\n\n102,b\n", "t.csv:2: empty line"),
    ],
)
def test_bad_title_lines_are_errors_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_bytes(text)
    with pytest.raises(DataError) as err:
        read_titles_csv(path)
    assert message in str(err.value) and "bad_lines: skip" in str(err.value)


def test_bad_title_lines_skipped_and_counted(tmp_path):
    titles = tmp_path / TITLES
    titles.write_bytes((FIXTURE / TITLES).read_bytes() + b"no comma\n118,\n,orphan\n101,Duplicate\n119,caf\xff\n")
    stats = preprocess(FIXTURE / PAIRS, titles, tmp_path / "out", bad_lines="skip")
    assert stats["skipped_lines"] == 5 and stats["raw_items"] == 18
    assert [s.split(": ", 1)[0] for s in stats["skipped"]] == [f"{titles}:{n}" for n in range(19, 24)]
    assert pl.read_parquet(tmp_path / "out" / "items.parquet")["item_id"].to_list() == ORDER
    counters = Counters()
    read_titles_csv(titles, "skip", counters)
    assert len(counters.skipped_lines) == 5
    with pytest.raises(DataError, match=f"{titles}:19: no comma"):
        preprocess(FIXTURE / PAIRS, titles, tmp_path / "err")


def test_covers_matched_by_file_stem(tmp_path):
    import io

    from PIL import Image

    cover = io.BytesIO()
    Image.new("RGB", (4, 4)).save(cover, "JPEG")  # preprocessing decodes every cover
    archive = tmp_path / "covers.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in ORDER:
            zf.writestr(f"MicroLens-100k_covers/{i}.jpg", cover.getvalue())
    stats = preprocess(FIXTURE / PAIRS, FIXTURE / TITLES, tmp_path / "out", images=archive)
    assert stats["blank_images"] == 0
    images = pl.read_parquet(tmp_path / "out" / "items.parquet")["image"].to_list()
    assert images == [f"MicroLens-100k_covers/{i}.jpg" for i in ORDER]


def test_table_one_raw_counts(tmp_path):
    """Against the published files, when present (MICROLENS_DIR, default ../shared/data/microlens)."""
    root = Path(os.environ.get("MICROLENS_DIR", ROOT.parent / "shared" / "data" / "microlens"))
    if not ((root / PAIRS).is_file() and (root / TITLES).is_file()):
        pytest.skip(f"no MicroLens-100k files at {root} (set MICROLENS_DIR)")
    stats = preprocess(root / PAIRS, root / TITLES, tmp_path)
    assert (stats["raw_users"], stats["raw_items"], stats["raw_interactions"]) == (
        TABLE_I["users"],
        TABLE_I["items"],
        TABLE_I["interactions"],
    )


def test_table9_rows_are_the_papers_inputs():
    """Table IX: FFT on each text (title, video caption, cover caption), IISAN-Versa with each
    text twice, with each pair of texts through two BERT towers, and with title + image; on
    the MicroLens dataset only."""
    from iisan.tables import plan_runs, table_plan

    from conftest import ROOT, workflow_config

    cfg = workflow_config(ROOT, "config/paper.yaml")
    rows = table_plan("table9", cfg)
    assert [[t["field"] for t in r["towers"]] for r in rows] == [
        ["title"], ["video_caption"], ["cover_caption"], ["title", "title"], ["video_caption", "video_caption"],
        ["cover_caption", "cover_caption"], ["title", "video_caption"], ["title", "cover_caption"], ["video_caption", "cover_caption"],
        ["title", "image"]]
    assert [r["method"] for r in rows] == ["fft"] * 3 + ["iisan"] * 7  # BERT-base and ViT-base have one shape
    assert all(t["backbone"] == ("vit-base" if t["field"] == "image" else "bert-base") for r in rows for t in r["towers"])
    assert {r["dataset"] for r, _ in plan_runs("table9", cfg)} == {"MicroLens"}


def test_table5_rows_are_the_papers():
    """Table V: multimodal FFT, ID-based SASRec and GRU4Rec, IISAN-VS on BERT-base + ViT-base and
    IISAN-VA on BERT-large + ViT-base, on MicroLens only; the published rows come from the cited file."""
    from iisan.tables import plan_runs, read_cited, table_plan

    from conftest import ROOT, workflow_config

    cfg = workflow_config(ROOT, "config/paper.yaml")
    rows = table_plan("table5", cfg)
    # the paper's labels and classes
    assert [(r["group"], r["label"]) for r in rows] == [
        ("MM VideoRec", "Full finetuning"), ("IDRec (SR)", "SASRec (rerun)"), ("IDRec (SR)", "GRU4Rec (rerun)"),
        ("IISAN-Versa", "IISAN-VS (ours)"), ("IISAN-Versa", "IISAN-VA (ours)")]
    towers = {r["method"]: [(t["field"], t["backbone"]) for t in r["towers"]] for r in rows}
    assert towers["iisan"] == towers["fft"] == [("title", "bert-base"), ("image", "vit-base")]
    assert towers["iisan-va"] == [("title", "bert-large"), ("image", "vit-base")]
    assert towers["sasrec-id"] == towers["gru4rec"] == []
    runs = plan_runs("table5", cfg)
    # IISAN-VS and IISAN-VA over the significance seeds (the test against the benchmark's best)
    assert {r["dataset"] for r, _ in runs} == {"MicroLens"} and len(runs) == 3 + 2 * len(cfg["table5"]["significance_seeds"])
    cited = read_cited(ROOT / cfg["table5"]["cited"])
    published = {r["method"]: (r["hr@10"], r["ndcg@10"]) for r in cited["rows"]}
    assert published["SASRec"] == (9.09, 5.17) and published["GRU4Rec_V"] == (9.54, 5.17)  # the paper's Table V


@pytest.mark.parametrize("text, error", [
    ("source: x\ndataset: y\nrows: [{group: IDRec, method: A, hr@10: 101, ndcg@10: 1}]", r"rows\[0\]\.hr@10: expected a percentage"),
    ("source: x\ndataset: y\nrows: [{group: IDRec, method: A, hr@10: 1}]", r"rows\[0\]: expected exactly the keys"),
    ("dataset: y\nrows: []", "expected a mapping with the strings 'source' and 'dataset'"),
    ("source: x\ndataset: y\nrows: {a: 1}", "'rows' must be a list"),
    ("source: [x\n", "cannot read the cited rows"),
])
def test_cited_rows_errors_name_the_file_and_row(tmp_path, text, error):
    from iisan.tables import read_cited

    path = tmp_path / "cited.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error) as info:
        read_cited(path)
    assert str(path) in str(info.value)


def test_table5_prints_published_rows_first_and_marked(tmp_path):
    import json

    import polars as pl

    from iisan.tables import build_table

    cited = tmp_path / "cited.yaml"
    cited.write_text("source: Someone 2023\ndataset: Real (published)\nrows: [{group: IDRec, method: SASRec, hr@10: 9.09, ndcg@10: 5.17}]\n")
    metrics = []
    for i, hr in enumerate((0.2, 0.3)):
        m = {"test": {"hr@10": hr, "ndcg@10": hr / 2}, "trainable_params": 10 + i, "best_epoch": 1, "time_per_epoch_train_s": 1.0,
             "peak_memory_mb": 1.0, "peak_memory_kind": "cpu-rss", "seed": 1}
        metrics.append(tmp_path / f"m{i}.json")
        metrics[-1].write_text(json.dumps(m))
    rows = [{"dataset": "twin", "label": "IISAN-VS", "seed": 1}, {"dataset": "twin", "label": "IISAN-VA", "seed": 1}]
    df = build_table("table5", rows, metrics, tmp_path / "t5.csv", extra=[cited])
    assert df.equals(pl.read_csv(tmp_path / "t5.csv", schema=df.schema))
    assert df["method"].to_list() == ["SASRec", "IISAN-VS", "IISAN-VA"]
    assert df["source"].to_list() == ["cited: Someone 2023", "rerun here", "rerun here"]
    assert df["dataset"].to_list() == ["Real (published)", "twin", "twin"]
    assert df["hr@10"].to_list() == [9.09, 20.0, 30.0]
    assert build_table("table5", rows, metrics, tmp_path / "t5b.csv")["method"].to_list() == ["IISAN-VS", "IISAN-VA"]


def test_paper_config_trains_microlens_as_the_authors_script():
    from iisan.config import Experiment, TowerConfig
    from iisan.data.microlens import TRAINING_DEFAULTS
    from iisan.encoders.backbones import BackboneSpec

    from conftest import ROOT, workflow_config

    cfg = workflow_config(ROOT, "config/paper.yaml")
    towers = [TowerConfig.from_config(cfg, "title", "bert-base", "t")]
    exp = Experiment.from_config(cfg, "MicroLens", towers, "iisan", "blocks6", "dropped", 12345)
    want = {k: v for k, v in TRAINING_DEFAULTS.items() if k != "max_tokens"}
    assert {k: getattr(exp.train, k) for k in want} == want
    assert BackboneSpec.from_config("bert-base", towers[0].spec).max_tokens == TRAINING_DEFAULTS["max_tokens"]
