"""One place per idea: the method registry, the typed experiment, defaults, and the package's
import graph."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from iisan import tables
from iisan.config import SPEED_FIELDS, Experiment, FinetuneConfig, ModelConfig, TowerConfig, TrainConfig
from iisan.pipeline import plan
from iisan.tables import build_table
from iisan.training import methods

from conftest import workflow_config

ROOT = Path(__file__).resolve().parents[1]


def config(**extra) -> dict:
    """config/config.yaml with `extra` keys merged in, as the Snakefile sees it."""
    return workflow_config(**extra)


@pytest.fixture
def fake_method():
    """A method added through the registry alone: the side network without gates or inter tower."""
    m = methods.register(methods.Method("fake-side", "Fake side net", gated=False, inter=False))
    yield m
    methods.unregister(m.name)


def test_a_method_added_to_the_registry_alone_is_planned_trained_and_tabulated(fake_method, tmp_path):
    cfg = config(methods=["iisan", "fake-side"], table3={"methods": ["fft", "fake-side", "fake-side-uncached"]})
    runs = tables.plan_runs("methods", cfg)
    assert [r["label"] for r, _ in runs] == ["IISAN-VS", "Fake side net"]
    assert runs[1][1] == "results/runs/demo/title@bert-demo+image@vit-demo/fake-side/blocks6/dropped/seed12345/metrics.json"
    t3 = {r["token"]: (r, p) for r, p in tables.plan_runs("table3", cfg)}
    assert t3["fake-side-uncached"][0]["label"] == "Fake side net (uncached)"
    assert "/fake-side/blocks6/none/" in t3["fake-side-uncached"][1]
    # the run's experiment and model come from the registry entry
    exp = plan.experiment(cfg, "demo", "title@bert-demo+image@vit-demo", "fake-side", "blocks6", "dropped", 12345)
    from iisan.training.model import Recommender

    model = Recommender(exp.model, [16, 16], [7, 7])
    assert model.items.inter is None and all(t.gates is None for t in model.items.intra)
    # tabulated under its label
    paths = []
    for i, (_, path) in enumerate(runs):
        paths.append(tmp_path / f"{i}.json")
        run = plan.experiment(cfg, *path.split("/")[2:7], path.split("/")[7].removeprefix("seed"))  # recorded as its job does
        paths[-1].write_text(json.dumps({"test": {"hr@10": 0.1 * (i + 1), "ndcg@10": 0.05}, "trainable_params": 10, "best_epoch": 1,
                                         "time_per_epoch_train_s": 1.0, "peak_memory_mb": 1.0, "peak_memory_kind": "x",
                                         "experiment": run.to_dict(), "config_hash": run.hash()}))
    df = build_table("methods", [r for r, _ in runs], paths, tmp_path / "methods.csv")
    assert df["method"].to_list() == ["IISAN-VS", "Fake side net"] and df["hr@10"].to_list() == [10.0, 20.0]


def test_unknown_methods_are_refused_with_the_config_key():
    with pytest.raises(ValueError, match=r"methods\[1\]: unknown method 'iisan2'"):
        config(methods=["iisan", "iisan2"])
    with pytest.raises(ValueError, match=r"table3.methods\[0\]: unknown row 'lora-uncached'|no uncached variant"):
        config(table3={"methods": ["lora-uncached"]})
    with pytest.raises(ValueError, match=r"method_train.fft2"):
        config(method_train={"fft2": {"max_epochs": 1}})


def test_method_and_cache_must_agree():
    tower = TowerConfig("title", "b", {"source": "demo", "family": "bert", "modality": "text", "layers": 12, "hidden": 16})

    def exp(method, cache, towers=(tower,)):
        return Experiment("demo", list(towers), method, "blocks6", cache, True, "float16")

    exp("iisan", "none")
    with pytest.raises(ValueError, match="fft.*runs with cache none.*in the loop"):
        exp("fft", "dropped")
    with pytest.raises(ValueError, match="ID-based"):
        exp("gru4rec", "full", ())
    with pytest.raises(ValueError, match="unknown method"):
        exp("fft2", "none")


def test_schema_sections_of_dataclasses_hold_no_defaults_and_only_their_fields():
    """Defaults in one place: the dataclasses for model, train, speed and finetune; the schema
    for everything else."""
    schema = yaml.safe_load((ROOT / "config/schemas/config.schema.yaml").read_text())
    props = schema["properties"]
    sections = {"model": (schema["definitions"]["model"], ModelConfig), "train": (schema["definitions"]["train"], TrainConfig),
                "speed": (props["speed"], TrainConfig), "finetune": (props["finetune"], FinetuneConfig)}
    for name, (section, cls) in sections.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(section["properties"]) <= fields, name
        assert all("default" not in p for p in section["properties"].values()), name
    assert set(props["speed"]["properties"]) == set(SPEED_FIELDS)
    # nothing in the library or the rules repeats a schema default with config.get(key, default)
    for path in [*ROOT.glob("src/iisan/**/*.py"), *ROOT.glob("workflow/**/*.smk"), *ROOT.glob("workflow/scripts/*.py")]:
        text = path.read_text()
        for key, p in props.items():
            if "default" in p:
                assert f'config.get("{key}",' not in text and f"config.get('{key}'," not in text, (path, key)


def test_experiment_carries_finetune_settings_and_tower_pooling():
    cfg = config(finetune={"adapter_bottleneck": 16, "lora_rank": 4, "lora_alpha": 2})
    cfg["backbones"]["bert-demo"]["pooling"] = "mean"
    exp = plan.experiment(cfg, "demo", "title@bert-demo+image@vit-demo", "lora", "last", "none", 7)
    assert exp.finetune == FinetuneConfig(adapter_bottleneck=16, lora_rank=4, lora_alpha=2)
    assert exp.towers[0].backbone_spec().pooling == "mean" and exp.towers[1].backbone_spec().pooling == "cls"
    assert "group" not in exp.towers[0].spec and exp.train.seed == 7
    back = Experiment.from_dict(json.loads(json.dumps(exp.to_dict())))
    assert back == dataclasses.replace(exp, train=dataclasses.replace(exp.train)) and back.hash() == exp.hash()
    assert not set(SPEED_FIELDS) & set(exp.to_dict()["train"])
    with pytest.raises(ValueError, match="config key finetune.lora_rank: 0 is less than the minimum of 1"):
        config(finetune={"lora_rank": 0})


def test_dataset_model_overrides_one_datasets_model_and_identity():
    """dataset_model.<dataset> is merged over model for that dataset's runs only (before a
    method's heads: IISAN-VS takes it, IISAN-VA keeps va) and is part of their identity."""
    towers = "title@bert-demo+image@vit-demo"
    base = config()
    cfg = config(dataset_model={"microlens-demo": {"bottleneck_image": 512, "heads": "va"}})

    def exp(c, dataset, method="iisan"):
        return plan.experiment(c, dataset, towers, method, "blocks6", "dropped", 1)

    assert exp(cfg, "demo") == exp(base, "demo") and exp(cfg, "demo").hash() == exp(base, "demo").hash()
    assert "bottleneck_image" not in exp(base, "demo").to_dict()["model"]  # None stays out of the identity
    ml, ml_base = exp(cfg, "microlens-demo"), exp(base, "microlens-demo")
    assert (ml.model.bottleneck_image, ml.model.heads, ml.model.bottleneck) == (512, "va", 64)
    assert ml.hash() != ml_base.hash() and ml.to_dict()["model"]["bottleneck_image"] == 512
    assert Experiment.from_dict(json.loads(json.dumps(ml.to_dict()))) == ml
    assert exp(config(dataset_model={"demo": {"heads": "vs"}}), "demo", "iisan-va").model.heads == "va"
    with pytest.raises(Exception, match="bottlenek"):
        config(dataset_model={"demo": {"bottlenek": 8}})
    with pytest.raises(ValueError, match=r"dataset_model\.nowhere: no such dataset"):
        config(dataset_model={"nowhere": {"bottleneck": 8}})


def test_finetune_settings_reach_the_backbone(tmp_path):
    from transformers import BertConfig, BertModel

    from iisan.encoders.finetune import HoulsbyAdapter, prepare_backbone

    def bert():
        return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    vocab_size=100), add_pooling_layer=False)

    ft = FinetuneConfig(adapter_bottleneck=16, lora_rank=4, lora_alpha=2)
    m = prepare_backbone(bert(), "bert", "adapter", ft)
    assert {a.adapter_down.out_features for a in m.modules() if isinstance(a, HoulsbyAdapter)} == {16}
    m = prepare_backbone(bert(), "bert", "lora", ft)
    q = m.encoder.layer[0].attention.self.query
    assert q.r["default"] == 4 and q.scaling["default"] == 2 / 4


def _imports(path: Path, package: str) -> set[str]:
    """iisan modules that `path` imports at module level (imports inside functions are lazy)."""
    tree = ast.parse(path.read_text())
    here = package.split(".")
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("iisan"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("iisan"))
    return out


def test_the_package_has_no_import_cycle():
    src = ROOT / "src"
    modules = {}
    for path in src.glob("iisan/**/*.py"):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        modules[name] = path, package
    graph = {n: {m for m in _imports(p, pkg) if m in modules and m != n} for n, (p, pkg) in modules.items()}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            assert state.get(m) != 1, f"import cycle: {' -> '.join([*stack, n, m])}"
            if m not in state:
                visit(m, [*stack, n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
    assert "iisan.tables.figures" not in graph["iisan.tables"]


@pytest.mark.parametrize("name", ["IISAN", "my_method", "a/b", "va method", ""])
def test_a_method_name_that_breaks_the_run_folder_is_refused_at_register(name):
    with pytest.raises(ValueError, match="lower-case letters, digits and '-'"):
        methods.register(methods.Method(name, "x", gated=False, inter=False))
    assert name not in methods.METHODS
