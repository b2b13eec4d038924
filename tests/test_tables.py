"""The table registry and the paper's numbers: every table of config/paper.yaml plans the paper's
rows and columns, the paper's numbers file names exactly those rows, a table registered through
the registry alone is planned, built and priced, and the claims are decided on the tables."""

import json
import re

import polars as pl
import pytest
import yaml

from iisan import tables
from iisan.pipeline.budget import Budget
from iisan.pipeline.graph import job_graph
from iisan.tables import claims, paper
from iisan.tables.registry import Table

from conftest import ROOT, workflow_config


@pytest.fixture(scope="module")
def cfg():
    return workflow_config(ROOT, "config/paper.yaml")


def planned(cfg, name):
    """{(dataset, key, column)} of a table's planned rows."""
    return {(d["dataset"], d["key"], d.get("column")) for d, _ in tables.plan_runs(name, cfg)}


def published(name):
    return {(c["dataset"], c["row"], c.get("column")) for c in paper.cells(name) if not c["row"].startswith("mean:")}


def test_table3_plans_the_papers_six_methods_on_three_datasets_and_more(cfg):
    rows = planned(cfg, "table3")
    assert len(published("table3")) == 18 and published("table3") <= rows
    # our extra rows are the ID-based recommenders, which the paper's Table III does not print
    assert {k for _, k, _ in rows - published("table3")} == {"sasrec-id", "gru4rec"}
    assert {r["dataset"] for r in paper.values()["table3_relative_improvement"]} == {"Scientific", "Instrument", "Office"}


def test_table3_relative_improvement_is_va_over_vs_as_printed(tmp_path):
    """The paper's column is (VA - VS) / VA: Scientific HR@10 (7.29 - 6.83) / 7.29 = 6.31 %."""
    rows, metrics = [], []
    for token, hr, ndcg in (("fft", 6.62, 4.06), ("iisan", 6.83, 4.14), ("iisan-va", 7.29, 4.41)):
        path = tmp_path / f"{token}.json"
        path.write_text(json.dumps({"test": {"hr@10": hr / 100, "ndcg@10": ndcg / 100}, "trainable_params": 1, "best_epoch": 1,
                                    "time_per_epoch_train_s": 1.0, "peak_memory_mb": 1.0, "peak_memory_kind": "cpu-rss", "seed": 1}))
        rows.append({"dataset": "Scientific", "label": token, "key": token, "token": token, "seed": 1})
        metrics.append(path)
    df = tables.build_table("table3", rows, metrics, tmp_path / "t3.csv", with_paper=True)
    va = df.filter(pl.col("key") == "iisan-va").row(0, named=True)
    assert va["hr@10 VA over VS (%)"] == 6.31 and va["paper hr@10 VA over VS (%)"] == 6.31
    assert va["ndcg@10 VA over VS (%)"] == 6.12 and va["paper ndcg@10 VA over VS (%)"] == 6.12
    assert df["Δ hr@10"].to_list() == [0.0, 0.0, 0.0]
    assert pl.read_csv(tmp_path / "t3.csv")["paper hr@10"].to_list() == [6.62, 6.83, 7.29]


def test_table4_plans_the_papers_17_rows_on_scientific(cfg):
    assert planned(cfg, "table4") == published("table4") and len(published("table4")) == 17
    assert tables.table_datasets(cfg, "table4") == ["Scientific"]


def test_table5_plans_five_reruns_beside_18_cited_rows(cfg):
    assert planned(cfg, "table5") == published("table5") and len(published("table5")) == 5
    assert "fft" in {k for _, k, _ in planned(cfg, "table5")}  # the paper's multimodal full fine-tuning row
    cited = tables.read_cited(ROOT / cfg["table5"]["cited"])
    assert [r["group"] for r in cited["rows"]] == ["IDRec (CF)"] * 4 + ["IDRec (SR)"] * 3 + ["VIDRec (Frozen)"] * 8 + ["VideoRec"] * 3
    assert cited["rows"][-2] == {"group": "VideoRec", "method": "GRU4Rec_V", "hr@10": 9.54, "ndcg@10": 5.17}


def test_table6_plans_six_ablations_in_two_columns(cfg):
    rows = planned(cfg, "table6")
    assert rows == published("table6") and len(rows) == 12
    va = [r for r, _ in tables.plan_runs("table6", cfg) if r["column"] == "IISAN-VA"]
    towers = {d["key"]: run for d, run in tables.plan_runs("table6", cfg) if d["column"] == "IISAN-VA"}
    assert all("title@bert-large+image@vit-base" in p for p in towers.values())
    # without LayerDrop, IISAN-VA is Table VIII's "all+all" run (the paper prints 6.85 / 4.11 in both)
    t8 = {d["key"]: p for d, p in tables.plan_runs("table8", cfg)}
    assert towers["w/o LayerDrop"] == t8["all+all"]
    assert {r["method"] for r in va} == {"iisan-va", "no-gate-va", "frozen", "no-inter-va", "no-intra-va"}


def test_table7_plans_five_block_counts(cfg):
    assert planned(cfg, "table7") == published("table7") and len(published("table7")) == 5


def test_table8_plans_22_selections_in_the_papers_groups(cfg):
    assert planned(cfg, "table8") == published("table8") and len(published("table8")) == 22
    groups = {r["key"]: r["group"] for r, _ in tables.plan_runs("table8", cfg)}
    assert groups == {c["row"]: c["group"] for c in paper.cells("table8") if not c["row"].startswith("mean:")}
    assert [m["group"] for m in paper.values()["table8_means"]] == ["12+12", "12+6", "6+6"]


def test_table9_plans_the_papers_10_rows(cfg):
    assert planned(cfg, "table9") == published("table9") and len(published("table9")) == 10


def test_paper_scope_runs_the_ablations_and_scaling_on_scientific(cfg):
    for name in ("table4", "table6", "table7", "table8", "fig4", "fig6", "fig7"):
        assert tables.table_datasets(cfg, name) == ["Scientific"], name
    assert tables.table_datasets(cfg, "table3") == ["Scientific", "Instrument", "Office"]
    assert all(tables.compares_to_paper(cfg, n) for n in ("table3", "table4", "table5", "table6", "table7", "table8", "table9"))


def test_the_demo_prints_no_paper_columns():
    demo = workflow_config()
    assert not any(tables.compares_to_paper(demo, n) for n in demo["tables"])


def test_a_table_registered_alone_is_validated_planned_built_and_priced(tmp_path):
    """One register() call: its config section is validated with its defaults, its rows planned on
    its datasets, its CSV built from runs and its runs priced."""
    from iisan.pipeline.plan import experiment, method_row

    def rows(config):
        return [method_row(config, m, key=m) for m in config["toy"]["methods"]]

    def build(rows, metrics, header, extra):
        return tables.aggregate(rows, metrics, header).select("dataset", header, "key", "hr@10", "ndcg@10")

    schema = {"type": "object", "additionalProperties": False, "default": {},
              "properties": {"methods": {"type": "array", "items": {"type": "string"}, "default": ["iisan", "frozen"]}}}
    tables.register(Table("toy", "a toy table", rows, build, header="method", section="toy", schema=schema))
    try:
        cfg = workflow_config(ROOT, tables=["toy"], figures=[])
        assert cfg["toy"] == {"methods": ["iisan", "frozen"]}
        with pytest.raises(ValueError, match="config key toy.colour: Additional properties"):
            workflow_config(ROOT, tables=["toy"], figures=[], toy={"colour": "red"})
        runs = tables.plan_runs("toy", cfg)
        assert [d["key"] for d, _ in runs] == ["iisan", "frozen"] and tables.targets(cfg)[0] == "results/toy.csv"
        graph = job_graph(ROOT, [], {"tables": "[toy]", "figures": "[]", "claims": "false"})
        budget = Budget(graph.config).build(graph)
        assert {p for _, p in runs} <= set(budget.jobs) and "toy" in {s["group"] for s in budget.summary()}
        metrics = []
        for i, (_, path) in enumerate(runs):
            metrics.append(tmp_path / f"{i}.json")
            exp = experiment(cfg, *path.split("/")[2:7], path.split("/")[7].removeprefix("seed"))  # the run's, as its job records it
            metrics[-1].write_text(json.dumps({"test": {"hr@10": 0.1 * (i + 1), "ndcg@10": 0.05}, "trainable_params": 1, "best_epoch": 1,
                                               "time_per_epoch_train_s": 1.0, "peak_memory_mb": 1.0, "peak_memory_kind": "cpu-rss",
                                               "experiment": exp.to_dict(), "config_hash": exp.hash()}))
        df = tables.build_table("toy", [d for d, _ in runs], metrics, tmp_path / "toy.csv")
        assert df["hr@10"].to_list() == [10.0, 20.0] and (tmp_path / "toy.csv").is_file()
    finally:
        tables.unregister("toy")
    with pytest.raises(ValueError, match=r"config key tables\[0\]: 'toy' is not one of"):
        workflow_config(ROOT, tables=["toy"])


def test_paper_numbers_file_is_percent_and_complete():
    data = yaml.safe_load(paper.VALUES.read_text())
    for name in ("table3", "table4", "table5", "table6", "table7", "table8", "table9"):
        for c in data[name]:
            assert 0 < c["hr@10"] < 100 and 0 < c["ndcg@10"] < c["hr@10"], (name, c)
    # the paper's own means of Table VIII agree with its rows
    for m in data["table8_means"]:
        part = [c["hr@10"] for c in data["table8"] if c["group"] == m["group"]]
        assert abs(sum(part) / len(part) - m["hr@10"]) < 0.006


def test_claims_on_the_papers_own_numbers(tmp_path):
    """Decided on the paper's numbers, its own claims hold, except where its tables contradict its
    text: IISAN-VA without intra-modal SAN has a higher NDCG@10 than the full model; ViT-large
    lifts BERT-base's NDCG@10 by 2.7 % (the text: under 1 %); the video + cover caption pair is
    below FFT on the cover caption. Claims the paper's numbers cannot decide (significance, costs
    it does not print) are not run."""
    src = claims.Source.paper()
    got = {(t, d, c.text): c.decide(src, d)[0] for t, c in claims.claim_list() for d in src.datasets(t)}
    fails = {k for k, v in got.items() if v == claims.FAILS}
    assert fails == {
        ("table6", "Scientific", "IISAN-VA: the full model above no-intra"),
        ("table4", "Scientific", "the PLM (BERT-base) gains under 1 % from the first larger image encoder (ViT-large)"),
        ("table9", "MicroLens", "each multimodal-text pair above the FFT rows of its two single texts"),
    }
    not_run = {k[2] for k, v in got.items() if v == claims.NOT_RUN}
    assert all("p < 0.05" in c or "cited" in c or "VideoRec" in c for c in not_run), not_run
    assert len([k for k in got if k[0] == "table4"]) == 7


def test_claims_come_from_the_registry_once(tmp_path):
    """Every row of claims.csv is a claim of a registered table or figure, listed once; a table
    registered alone with a claim of its own gets its row."""
    df = claims.build_claims({}, tmp_path / "claims.csv")
    assert set(df["table"]) <= set(tables.TABLES)
    assert df.select("table", "dataset", "claim").n_unique() == df.height
    texts = [(t, c.text) for t, c in claims.claim_list()]
    assert len(texts) == len(set(texts))
    assert {t for t, _ in texts} == {n for n, t in tables.TABLES.items() if t.paper}
    assert set(df.filter(pl.col("table").is_in(["table3", "table9"]))["verdict"]) == {claims.NOT_RUN}
    src = (ROOT / "src/iisan/tables/claims.py").read_text()
    assert not re.search(r'"(table[3-9]|fig[4-7])"', src), "the claims module names no table"
    t = tmp_path / "mine.csv"
    pl.DataFrame({"dataset": ["d", "d"], "row": ["a", "b"], "key": ["a", "b"], "hr@10": [2.0, 1.0], "ndcg@10": [1.0, 0.5]}).write_csv(t)
    tables.register(Table("mine", "a test table", claims=(claims.Claim("a above b", claims.above("mine", "a", "b")),)))
    try:
        df = claims.build_claims({"mine": t}, tmp_path / "claims.csv")
    finally:
        tables.unregister("mine")
    assert df.filter(pl.col("table") == "mine").select("dataset", "claim", "verdict").rows() == [("d", "a above b", claims.HOLDS)]


def test_significance_claims_read_the_tables_tests(tmp_path):
    """Table III's significance claim holds where IISAN-VA is better at p < 0.05 on both metrics,
    fails otherwise, and is not run with one seed; the paper's verdict is its caption's mark."""
    t3 = tmp_path / "table3.csv"

    def write(p_hr, p_ndcg):
        pl.DataFrame({"dataset": ["Scientific"] * 2, "method": ["IISAN-VS", "IISAN-VA"], "key": ["iisan", "iisan-va"],
                      "hr@10": [6.8, 7.3], "ndcg@10": [4.1, 4.4], "hr@10 p (VA vs VS)": [None, p_hr],
                      "ndcg@10 p (VA vs VS)": [None, p_ndcg]}, schema_overrides={"hr@10 p (VA vs VS)": pl.Float64,
                                                                                  "ndcg@10 p (VA vs VS)": pl.Float64}).write_csv(t3)
        df = claims.build_claims({"table3": t3}, tmp_path / "claims.csv", paper={"table3": True})
        return df.filter(pl.col("claim").str.contains("p < 0.05")).row(0, named=True)

    row = write(0.01, 0.03)
    assert row["verdict"] == claims.HOLDS and row["ours"] == "hr@10 7.30 vs 6.80, p 0.010; ndcg@10 4.40 vs 4.10, p 0.030"
    assert row["paper verdict"] == claims.HOLDS and row["paper"] == "marked * in Table III (paired t-test, p < 0.05)"
    assert write(0.01, 0.2)["verdict"] == claims.FAILS
    assert write(None, None)["verdict"] == claims.NOT_RUN


def test_table5_tests_our_seeds_against_the_cited_best(tmp_path):
    """Table V: cited rows are keyed cited:<method>; each rerun row carries the one-sample t-test
    of its seeds against the best cited row, which the significance claims read."""
    from scipy import stats

    cited = tmp_path / "cited.yaml"
    cited.write_text(yaml.safe_dump({"source": "s", "dataset": "published", "rows": [
        {"group": "VideoRec", "method": "GRU4Rec_V", "hr@10": 9.54, "ndcg@10": 5.17},
        {"group": "IDRec (SR)", "method": "SASRec", "hr@10": 9.09, "ndcg@10": 5.17}]}))
    rows, metrics = [], []
    hrs = [0.097, 0.099, 0.098]
    for seed, hr in zip((1, 2, 3), hrs):
        path = tmp_path / f"vs{seed}.json"
        path.write_text(json.dumps({"test": {"hr@10": hr, "ndcg@10": hr / 1.8}, "trainable_params": 1, "best_epoch": 1,
                                    "time_per_epoch_train_s": 1.0, "peak_memory_mb": 1.0, "peak_memory_kind": "cpu-rss", "seed": seed}))
        rows.append({"dataset": "MicroLens", "label": "IISAN-VS (ours)", "key": "iisan", "group": "IISAN-Versa", "seed": seed})
        metrics.append(path)
    df = tables.build_table("table5", rows, metrics, tmp_path / "table5.csv", extra=[cited])
    assert df["key"].to_list()[:2] == ["cited:GRU4Rec_V", "cited:SASRec"]
    ours = df.filter(pl.col("key") == "iisan").row(0, named=True)
    assert ours["group"] == "IISAN-Versa" and ours["method"] == "IISAN-VS (ours)"
    assert ours["hr@10 p (vs cited best)"] == round(stats.ttest_1samp([100 * h for h in hrs], 9.54).pvalue, 4)
    out = claims.build_claims({"table5": tmp_path / "table5.csv"}, tmp_path / "claims.csv", paper={"table5": True})
    got = {r["claim"]: r for r in out.filter(pl.col("dataset") == "MicroLens").iter_rows(named=True)}
    assert got["IISAN-VS above the benchmark's best cited row (GRU4Rec_V)"]["verdict"] == claims.HOLDS
    sig = next(r for c, r in got.items() if c.startswith("IISAN-VS above the benchmark's best at p < 0.05"))
    assert sig["verdict"] == claims.HOLDS and sig["ours"].startswith("hr@10 9.80 vs 9.54, p ")
    # the paper's verdict on "above the cited best" is decided on its numbers and the cited rows
    assert got["IISAN-VS above the benchmark's best cited row (GRU4Rec_V)"]["paper verdict"] == claims.HOLDS
    # off the paper's data the cited rows decide nothing
    out = claims.build_claims({"table5": tmp_path / "table5.csv"}, tmp_path / "claims.csv", paper={"table5": False})
    assert out.filter(pl.col("claim").str.contains("cited row"))["verdict"].to_list() == [claims.NOT_RUN] * 2


def test_claims_csv_marks_tables_not_run(tmp_path):
    t7 = tmp_path / "table7.csv"
    pl.DataFrame({"dataset": ["demo"] * 2, "blocks": ["6 blocks", "2 blocks"], "key": ["blocks6", "blocks2"],
                  "hr@10": [5.0, 4.0], "ndcg@10": [3.0, 2.0]}).write_csv(t7)
    df = claims.build_claims({"table7": t7}, tmp_path / "claims.csv")
    row = df.filter(pl.col("table") == "table7").row(0, named=True)
    assert row["verdict"] == claims.HOLDS and row["dataset"] == "demo" and row["paper verdict"] == ""
    assert set(df.filter(pl.col("table") == "table3")["verdict"]) == {claims.NOT_RUN}
    assert set(df.filter(pl.col("table") == "fig5")["verdict"]) == {claims.NOT_RUN}


def test_best_row_claims_need_both_metrics(tmp_path):
    """A best-row claim holds only where the row is best on HR@10 and on NDCG@10: best on HR@10
    alone it does not hold, and its numbers show both metrics."""
    t7 = tmp_path / "table7.csv"
    pl.DataFrame({"dataset": ["demo"] * 3, "blocks": ["6 blocks", "2 blocks", "all"], "key": ["blocks6", "blocks2", "all"],
                  "hr@10": [5.0, 4.0, 4.5], "ndcg@10": [3.0, 2.0, 3.2]}).write_csv(t7)
    df = claims.build_claims({"table7": t7}, tmp_path / "claims.csv")
    row = df.filter(pl.col("table") == "table7").row(0, named=True)
    assert row["claim"] == "6 blocks give IISAN-VS's best HR@10 and NDCG@10"
    assert row["verdict"] == claims.FAILS
    assert row["ours"] == "hr@10: blocks6 5.00, best blocks6 5.00; ndcg@10: blocks6 3.00, best all 3.20"
    # without NDCG@10 for the row the claim is not decided
    src = claims.Source({("table7", "demo", k, None): {"hr@10": v} for k, v in (("blocks6", 5.0), ("blocks2", 4.0))})
    assert claims._best(src, "table7", "demo", "blocks6", ["blocks6", "blocks2"]) == (claims.NOT_RUN, "")


def test_rising_means_claim_needs_both_metrics():
    """Table IV's group means must rise on HR@10 and on NDCG@10."""
    means = {"PLM": (7.0, 4.3), "base LLM": (7.6, 4.7), "MoE LLM": (7.9, 4.6), "70B": (8.1, 4.9)}
    src = claims.Source({("table4", "demo", f"mean:{g}", None): {"hr@10": h, "ndcg@10": n} for g, (h, n) in means.items()})
    assert claims._rising(src, "demo", "table4") == (
        claims.FAILS, "hr@10: PLM 7.00, base LLM 7.60, MoE LLM 7.90, 70B 8.10; ndcg@10: PLM 4.30, base LLM 4.70, MoE LLM 4.60, 70B 4.90")
    src.cells[("table4", "demo", "mean:MoE LLM", None)]["ndcg@10"] = 4.8
    assert claims._rising(src, "demo", "table4")[0] == claims.HOLDS


def test_paper_verdict_on_best_rows_is_decided_on_both_metrics(tmp_path):
    """On the paper's data the paper's verdict beside ours is decided on its HR@10 and NDCG@10."""
    t8 = tmp_path / "table8.csv"
    pl.DataFrame({"dataset": ["Scientific"] * 2, "group": ["12+6", "6+6"], "selection": ["mean (12+6)", "mean (6+6)"],
                  "key": ["mean:12+6", "mean:6+6"], "hr@10": [7.0, 7.1], "ndcg@10": [4.4, 4.3]}).write_csv(t8)
    df = claims.build_claims({"table8": t8}, tmp_path / "claims.csv", paper={"table8": True})
    row = df.filter(pl.col("table") == "table8").row(0, named=True)
    assert row["claim"] == "the 6+6 selections have the best mean HR@10 and NDCG@10"
    assert row["verdict"] == claims.FAILS
    assert row["paper verdict"] == claims.HOLDS
    assert row["paper"] == "hr@10: mean:6+6 7.08, best mean:6+6 7.08; ndcg@10: mean:6+6 4.33, best mean:6+6 4.33"


def test_methods_table_gives_spread_over_seeds_and_paired_differences(tmp_path):
    """Mean and standard deviation over seeds; a row with `versus` its mean difference to that row
    over shared seeds with the paired t-test (scipy's ttest_rel)."""
    from scipy import stats

    hrs = {"frozen": [0.08, 0.082, 0.081], "iisan": [0.09, 0.0915, 0.089]}
    rows, metrics = [], []
    for label, values in hrs.items():
        for seed, hr in zip((1, 2, 3), values):
            path = tmp_path / f"{label}{seed}.json"
            path.write_text(json.dumps({"test": {"hr@10": hr, "ndcg@10": hr / 2}, "trainable_params": 1, "best_epoch": 1,
                                        "time_per_epoch_train_s": 1.0, "peak_memory_mb": 1.0, "peak_memory_kind": "cpu-rss", "seed": seed}))
            rows.append({"dataset": "Scientific", "label": label, "key": label, "seed": seed, **({"versus": "frozen"} if label == "iisan" else {})})
            metrics.append(path)
    df = tables.build_table("methods", rows, metrics, tmp_path / "m.csv")
    iisan = df.filter(pl.col("method") == "iisan").row(0, named=True)
    assert iisan["hr@10"] == 9.02 and iisan["hr@10 std"] == 0.13 and iisan["seeds"] == 3 and iisan["versus"] == "frozen"
    assert iisan["Δ hr@10 vs versus"] == 0.92
    assert iisan["p hr@10"] == round(stats.ttest_rel([100 * h for h in hrs["iisan"]], [100 * h for h in hrs["frozen"]]).pvalue, 4)
    assert df.filter(pl.col("method") == "frozen")["p hr@10"].to_list() == [None]
    with pytest.raises(ValueError, match=r"methods\[1\].versus: 'nobody' is not the label of an earlier row"):
        workflow_config(ROOT, methods=[{"method": "frozen", "label": "a"}, {"method": "iisan", "label": "b", "versus": "nobody"}])


def test_methods_rows_with_versus_are_claims(tmp_path):
    m = tmp_path / "methods.csv"
    pl.DataFrame({"dataset": ["Scientific"] * 3, "method": ["frozen", "iisan", "worse"], "versus": [None, "frozen", "frozen"],
                  "Δ hr@10 vs versus": [None, 0.38, -0.2], "p hr@10": [None, 0.28, 0.5],
                  "Δ ndcg@10 vs versus": [None, 0.36, 0.1], "p ndcg@10": [None, 0.17, 0.6]}).write_csv(m)
    df = claims.build_claims({"methods": m}, tmp_path / "claims.csv").filter(pl.col("table") == "methods")
    assert df["claim"].to_list() == ["iisan above frozen", "worse above frozen"]
    assert df["verdict"].to_list() == [claims.HOLDS, claims.FAILS]
    assert df["ours"][0] == "Δ hr@10 +0.38 (paired p 0.280); Δ ndcg@10 +0.36 (paired p 0.170)"


def test_a_table_on_an_unknown_dataset_is_refused_naming_its_key():
    with pytest.raises(ValueError, match=r"config key table5: dataset 'nowhere' is not under dataset_sources"):
        workflow_config(ROOT, table5={"dataset": "nowhere"})
    with pytest.raises(ValueError, match=r"config key table7: dataset 'nowhere' is not under dataset_sources"):
        workflow_config(ROOT, table7={"datasets": ["nowhere"]})
