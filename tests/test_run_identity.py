"""One run per configuration: a run is named by what it computes (the canonical name of the
blocks each tower keeps, `iisan.training.layerdrop.canonical_name`), and one configuration trains the
same seeds wherever the config prints it (`iisan.tables.run_seeds`). Planning only, no training."""

from collections import defaultdict

import pytest

from iisan import tables
from iisan.pipeline import plan
from iisan.training.layerdrop import SchemeError, canonical_name, canonical_scheme, scheme_layers

from conftest import ROOT, workflow_config

SIG = [12345, 12346, 12347]


@pytest.fixture(scope="module")
def paper():
    return workflow_config(ROOT, "config/paper.yaml")


@pytest.fixture(scope="module")
def tiny():
    return workflow_config(ROOT, "tests/configs/tiny.yaml")


def paths(cfg, name, dataset="Scientific", **match) -> list[str]:
    """The metrics paths of the rows of table `name` whose description matches `match`."""
    out = [p for d, p in tables.plan_runs(name, cfg) if d["dataset"] == dataset and all(d.get(k) == v for k, v in match.items())]
    assert out, (name, match)
    return out


# --- canonical names -------------------------------------------------------------------------
@pytest.mark.parametrize("layers, scheme, name", [
    (12, "all", "all"), (12, "blocks12", "all"), (12, "stride12", "all"), (12, "top", "top"), (12, "down", "down"),
    (12, "blocks6", "blocks6"), (12, "even_all", "blocks6"), (12, "stride6", "blocks6"), (12, "eq5-6", "top"),
    (12, "blocks4", "blocks4"), (12, "stride4", "blocks4"), (12, "stride5", "stride5"), (12, "blocks1", "blocks1"),
    (12, "last", "last"),
    (24, "all", "all"), (24, "blocks24", "all"), (24, "even_all", "blocks12"), (24, "stride6", "blocks6"),
    (24, "blocks6", "blocks6"), (24, "top", "top"), (24, "even_top12", "even_top12"), (24, "even_down12", "even_down12"),
    (24, "stride12", "blocks12"), (24, "stride5", "stride5"), (24, "eq5-6", "eq5-6"), (24, "stride3", "stride3"),
    (32, "stride6", "stride6"), (32, "even_all", "blocks16"), (32, "blocks8", "blocks8"), (32, "stride8", "blocks8"), (32, "stride7", "stride7"),
    (32, "eq5-6", "eq5-6"), (32, "stride32", "all"), (32, "down", "down"), (32, "even_top12", "even_top12"),
])
def test_canonical_name_keeps_the_same_blocks(layers, scheme, name):
    assert canonical_name(scheme, layers) == name
    if scheme != "last":
        assert scheme_layers(name, layers) == scheme_layers(scheme, layers)
    assert canonical_name(name, layers) == name  # a canonical name is its own


def test_canonical_name_of_every_scheme_is_unique_per_layer_set():
    """Over every scheme name a 12, 24 or 32-layer tower allows, equal layer sets get one name
    and different ones different names."""
    for layers in (12, 24, 32):
        names = ["all", "top", "down", "even_all", "even_top12", "even_down12"]
        names += [f"{k}{n}" for n in range(1, layers + 1) for k in ("blocks", "stride", "eq5-")]
        by_layers = defaultdict(set)
        for s in names:
            try:
                by_layers[tuple(scheme_layers(s, layers))].add(canonical_name(s, layers))
            except SchemeError:
                continue
        assert all(len(v) == 1 for v in by_layers.values()), layers
        assert len({next(iter(v)) for v in by_layers.values()}) == len(by_layers)


def test_canonical_scheme_joins_only_where_towers_differ():
    assert canonical_scheme("stride6+blocks6", [24, 12]) == "blocks6"
    assert canonical_scheme("blocks6+even_all", [24, 12]) == "blocks6"
    assert canonical_scheme("all+all", [24, 12]) == "all"
    assert canonical_scheme("even_all", [24, 12]) == "blocks12+blocks6"
    assert canonical_scheme("even_all+all", [24, 12]) == "blocks12+all"
    assert canonical_scheme("stride6+blocks6", [32, 12]) == "stride6+blocks6"
    assert canonical_scheme("blocks6", [12]) == "blocks6"
    assert canonical_scheme("none", []) == "none"
    with pytest.raises(SchemeError, match="does not divide"):
        canonical_scheme("blocks5", [12, 12])


# --- the paper's tables read one run per configuration -----------------------------------------
def test_iisan_va_on_scientific_is_one_run_in_every_table(paper):
    """Table III's IISAN-VA (stride6+blocks6 on BERT-large + ViT-base), Table VIII's
    blocks6+even_all, Table VI's IISAN-VA full model and Table IV's BERT-large row keep the same
    blocks: one run folder, Table III's three seeds."""
    va = paths(paper, "table3", key="iisan-va")
    assert len(va) == 3 and [p.split("/")[-2] for p in va] == [f"seed{s}" for s in SIG]
    assert "/title@bert-large+image@vit-base/iisan-va/blocks6/dropped/" in va[0]
    assert paths(paper, "table8", key="blocks6+even_all") == va
    assert paths(paper, "table6", key="iisan", column="IISAN-VA") == va
    assert paths(paper, "table4", key="bert-large") == va
    assert paths(paper, "fig4", key="bert-large") == va
    assert paths(paper, "gates", key="iisan-va") == va


def test_iisan_vs_on_scientific_is_one_run_in_every_table(paper):
    vs = paths(paper, "table3", key="iisan")
    assert len(vs) == 3 and "/title@bert-base+image@vit-base/iisan/blocks6/dropped/" in vs[0]
    assert paths(paper, "table4", key="bert-base") == vs
    assert paths(paper, "table6", key="iisan", column="IISAN-VS") == vs
    assert paths(paper, "table7", key="blocks6") == vs
    # the other block counts keep the config's seeds
    assert [p.split("/")[-2] for p in paths(paper, "table7", key="blocks2")] == [f"seed{s}" for s in paper["seeds"]]


def test_all_all_is_all(paper):
    full = paths(paper, "table8", key="all+all")
    assert "/iisan-va/all/dropped/" in full[0]
    assert paths(paper, "table6", key="w/o LayerDrop", column="IISAN-VA") == full
    assert paths(paper, "table7", key="all") == paths(paper, "table6", key="w/o LayerDrop", column="IISAN-VS")


def test_the_experiment_of_a_folder_is_named_by_what_it_keeps(paper):
    """The train rule's experiment (its hash the run's identity) and the caches a run reads are
    the canonical ones whatever name the folder's scheme was given."""
    tw = "title@bert-large+image@vit-base"
    canonical = plan.experiment(paper, "Scientific", tw, "iisan-va", "blocks6", "dropped", 12345)
    for other in ("stride6+blocks6", "blocks6+even_all", "stride6+even_all"):
        exp = plan.experiment(paper, "Scientific", tw, "iisan-va", other, "dropped", 12345)
        assert exp.scheme == "blocks6" and exp.hash() == canonical.hash()
        assert plan.run_caches(paper, "Scientific", tw, "iisan-va", other, "dropped") == [
            "resources/cache/Scientific/title/bert-large/pruned-blocks6", "resources/cache/Scientific/image/vit-base/pruned-blocks6"]
    assert plan.experiment(paper, "Scientific", tw, "iisan-va", "all+all", "dropped", 1).hash() == \
        plan.experiment(paper, "Scientific", tw, "iisan-va", "all", "dropped", 1).hash()


def test_fig6_measures_the_caches_the_runs_read(paper):
    caches = set(tables.fig6_caches(paper))
    for _, path in tables.plan_runs("table4", paper):
        w = dict(zip(("dataset", "towers", "method", "scheme", "cache"), path.split("/")[2:7]))
        assert set(plan.run_caches(paper, **w)) <= caches, path
    assert not any("pruned-stride6" in c for c in caches if "/bert-large/" in c)


# --- every config: one run per configuration, the same seeds wherever it is printed --------------
def _signature(cfg, dataset, row) -> tuple:
    """What a row's run computes (besides the seed): dataset, towers, method, cache and the
    states each tower feeds, read off its experiment."""
    w = plan.run_wildcards(dataset, row, cfg)
    exp = plan.experiment(cfg, **w, seed=cfg["seeds"][0])
    return (dataset, w["towers"], w["method"], w["cache"], tuple(tuple(exp.tower_layers(i)) for i in range(len(exp.towers))))


@pytest.mark.parametrize("config", ["paper", "tiny"])
def test_every_table_printing_a_configuration_reads_the_same_runs(config, request):
    cfg = request.getfixturevalue(config)
    runs = defaultdict(set)  # what a row computes -> the tuples of metrics paths its tables read
    for name in tables.planned_run_tables(cfg):
        described = defaultdict(list)
        for d, p in tables.plan_runs(name, cfg):
            described[(d["dataset"], d["key"], d.get("column"))].append(p)
        for dataset in tables.table_datasets(cfg, name):
            for row in tables.table_plan(name, cfg):
                runs[_signature(cfg, dataset, row)].add(tuple(described[(dataset, row["key"], row.get("column"))]))
    assert all(len(v) == 1 for v in runs.values()), {k: v for k, v in runs.items() if len(v) > 1}
    # and different configurations, different folders
    folders = [next(iter(v))[0].rsplit("/", 2)[0] for v in runs.values()]
    assert len(folders) == len(set(folders))


@pytest.mark.parametrize("config", ["paper", "tiny"])
def test_no_two_paths_of_a_table_share_an_identity(config, request):
    cfg = request.getfixturevalue(config)
    hashes = {}
    for name in tables.planned_run_tables(cfg):
        by_hash = defaultdict(set)
        for d, p in tables.plan_runs(name, cfg):
            by_hash[d["config_hash"]].add(p)
            assert hashes.setdefault(p, d["config_hash"]) == d["config_hash"], p  # one identity per path, across tables
        assert all(len(v) == 1 for v in by_hash.values()), name


def test_tiny_tables_share_their_runs(tiny):
    ds = "demo"
    va = paths(tiny, "table3", ds, key="iisan-va")
    assert len(va) == 3 and "/iisan-va/blocks6/" in va[0]
    assert paths(tiny, "table4", ds, key="bert-large-tiny") == va
    assert paths(tiny, "table6", ds, key="iisan", column="IISAN-VA") == va
    vs = paths(tiny, "table3", ds, key="iisan")
    assert len(vs) == 3
    assert paths(tiny, "table4", ds, key="bert-demo") == paths(tiny, "table7", ds, key="blocks6") == vs
    assert paths(tiny, "table6", ds, key="iisan", column="IISAN-VS") == vs
    # Table VIII's even_all+top on BERT-large (24) + ViT (12): every second block of BERT-large
    (t8,) = paths(tiny, "table8", ds, key="even_all+top")
    assert "/iisan-va/blocks12+top/" in t8


def test_seeds_are_the_union_of_what_the_planned_rows_ask(paper):
    """A run trains every seed any planned row asks of it, in order, once per config (cached);
    a change of the config plans anew."""
    cfg = {**paper, "seeds": [7]}
    shared = tables.run_seeds(cfg)
    assert tables.run_seeds(cfg) is shared  # computed once per config
    vs = next(r for r in tables.table_plan("table3", cfg) if r["key"] == "iisan")
    assert shared[tables.run_identity(cfg, "Scientific", vs)] == [*SIG, 7]  # Table III's, then Table VII's
    assert shared[tables.run_identity(cfg, "Instrument", vs)] == [*SIG, 7]  # Table III's, then the methods table's
    alone = {**cfg, "methods": []}
    assert tables.run_seeds(alone)[tables.run_identity(alone, "Instrument", vs)] == SIG  # Table III alone runs there
    assert [d["seed"] for d, _ in tables.plan_runs("table7", cfg) if d["key"] == "blocks6"] == [*SIG, 7]
    other = {**cfg, "table3": {**cfg["table3"], "significance_seeds": [1, 2]}}
    assert [d["seed"] for d, _ in tables.plan_runs("table7", other) if d["key"] == "blocks6"] == [1, 2, 7]
    # Fig. 5's profiles keep the first seed
    for row, _ in tables.efficiency_plan(cfg):
        exp = plan.profile_experiment(cfg, **plan.run_wildcards(row["dataset"], row, cfg))
        assert exp.train.seed == 7 and exp.hash() == row["config_hash"]


def test_a_table_outside_the_config_still_gets_its_own_seeds(paper):
    cfg = {**paper, "tables": ["table7"], "figures": [], "methods": []}
    seeds = [d["seed"] for d, _ in tables.plan_runs("table3", cfg) if d["key"] == "iisan" and d["dataset"] == "Scientific"]
    assert seeds == [12345, 12346, 12347]
    assert [d["seed"] for d, _ in tables.plan_runs("table7", cfg) if d["key"] == "blocks6"] == [12345]
