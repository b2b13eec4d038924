"""The config can only say what the code can do: configs generated from the schema itself,
overlaid on the tiny test config a key or a whole section at a time, either plan (the config
check, every table's runs and experiments, the GPU-hour budget: what a dry run computes) or stop
with a ValueError naming a config key; never another exception."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hypothesis_jsonschema")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis_jsonschema import from_schema  # noqa: E402
from snakemake.utils import update_config  # noqa: E402

from iisan import tables  # noqa: E402
from iisan.pipeline import plan, workflow
from iisan.pipeline.budget import Budget  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/configs/tiny.yaml"
EXAMPLES = 150

SCHEMA = workflow.schema(ROOT)
BASE: dict = {}
for _f in (workflow.DEFAULT_CONFIG, TINY):
    update_config(BASE, workflow.load_yaml(ROOT / _f))

# Keys whose values name files or folders outside the config (a dry run reads nothing from them
# but the workflow's jobs do) or only change speed: not worth examples.
SKIP = {"download_url", "mirror", "compile_cache", "worker", "keep_checkpoints", "standin_corpus"}
KEYS = sorted(k for k in SCHEMA["properties"] if k not in SKIP)


def _vocabularies() -> dict[str, list[str]]:
    """Names the tiny config and the registries know, by the config keys that hold them, so that
    free strings often name something and the examples reach the planning, not only the name
    checks."""
    from iisan.data import ITEM_FIELDS
    from iisan.training import methods
    from iisan.training.layerdrop import SELECTIONS

    backbones = sorted(BASE["backbones"])
    datasets = sorted(BASE["dataset_sources"])
    rows = sorted({*methods.METHODS, *methods.row_tokens()})
    schemes = ["all", "last", *(f"blocks{n}" for n in (0, 1, 2, 3, 4, 5, 6, 12, 24, 100)), "stride3", "eq5-4", *SELECTIONS, "all+all", "top+blocks6"]
    by_key = {"backbone": backbones, "text_encoder": backbones, "image_encoder": backbones, "va_text_encoder": backbones,
              "text_encoders": backbones, "image_scaling": backbones, "standin_corpus": datasets, "datasets": datasets,
              "dataset": datasets, "methods": rows, "method": rows, "field": sorted(ITEM_FIELDS), "text_field": sorted(ITEM_FIELDS),
              "image_field": sorted(ITEM_FIELDS), "single": sorted(ITEM_FIELDS), "same_twice": sorted(ITEM_FIELDS),
              "pairs": sorted(ITEM_FIELDS), "scheme": schemes, "default_scheme": schemes, "rows": schemes,
              "cover": ["llava-cover-demo"], "video": ["llava-video-demo"],
              "versus": ["IISAN-VS", "Frozen"], "label": ["IISAN-VS", "Frozen", "x"]}
    keys = {"dataset_train": datasets, "dataset_model": datasets, "dataset_sources": datasets, "method_train": rows, "backbones": backbones}
    return by_key, keys


VOCABULARY, KEY_NAMES = _vocabularies()


def _known_names(node, name: str = ""):
    """The schema with every string (no enum or const) under a key that names something
    (`VOCABULARY`, those its pattern allows), and every free key of such a mapping (`KEY_NAMES`), drawn from the
    known names as often as not."""
    if isinstance(node, list):
        return [_known_names(n, name) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("enum", "const", "default", "description"):
            out[k] = v
        elif k in ("properties", "definitions"):
            out[k] = {p: _known_names(sub, p) for p, sub in v.items()}
        else:
            out[k] = _known_names(v, name)
    if out.get("type") == "string" and name in VOCABULARY and not {"enum", "const"} & set(out):
        known = [v for v in VOCABULARY[name] if re.search(out.get("pattern", ""), v)]
        if known:
            return {"anyOf": [{"enum": known}, {k: v for k, v in out.items() if k != "description"}]}
    if name in KEY_NAMES and isinstance(out.get("additionalProperties"), dict):
        out["propertyNames"] = {"anyOf": [{"enum": KEY_NAMES[name]}, {"type": "string"}]}
    return out


def _section(key: str) -> dict:
    """The schema of one top-level key, with the definitions its $refs point to."""
    sub = _known_names(copy.deepcopy(SCHEMA["properties"][key]), key)
    sub["definitions"] = _known_names(copy.deepcopy(SCHEMA["definitions"]))
    return sub


STRATEGIES = {k: from_schema(_section(k)) for k in KEYS}


@st.composite
def overlays(draw):
    """(key, value, how): a schema-valid value of one top-level key replacing the tiny config's
    value ("replace") or merged into it ("merge": a section's keys one at a time), or the key
    left out ("delete", unless the schema requires it)."""
    key = draw(st.sampled_from(KEYS))
    how = draw(st.sampled_from(["replace", "merge", "delete"] if key not in SCHEMA["required"] else ["replace", "merge"]))
    return key, None if how == "delete" else draw(STRATEGIES[key]), how


def overlay(key: str, value, how: str) -> dict:
    """The tiny config with one overlay (see `overlays`)."""
    config = copy.deepcopy(BASE)
    if how == "delete":
        config.pop(key, None)
    elif how == "merge" and isinstance(value, dict) and isinstance(config.get(key), dict):
        update_config(config[key], value)
    else:
        config[key] = value
    return config


def plan_everything(config: dict) -> None:
    """What a dry run computes from a config, through the library: the checks, every table's
    runs with their experiments and caches, the targets and the estimates their rules request."""
    workflow.validate(config, ROOT)
    workflow.check_config(config)
    tables.targets(config)
    budget = Budget(config)
    for name in [*config["tables"], *config["figures"]]:
        for row, _ in tables.plan_runs(name, config):
            w = plan.run_wildcards(row["dataset"], {**row, "towers": _towers(config, name, row)})
            exp = plan.experiment(config, row["dataset"], w["towers"], w["method"], w["scheme"], w["cache"], row["seed"])
            for t in range(len(exp.towers)):
                exp.tower_layers(t)
            plan.run_caches(config, row["dataset"], w["towers"], w["method"], w["scheme"], w["cache"])
            budget.train({**w, "seed": row["seed"]})  # what the train rule's resources ask for
            if w["cache"] != "none":
                for t in plan.parse_towers(config, w["towers"]):
                    budget.cache({"dataset": row["dataset"], "field": t.field, "backbone": t.backbone})


def _towers(config, name, row):
    """The towers of a planned row (plan_runs leaves them out of its description)."""
    for r in tables.table_plan(name, config):
        if r["label"] == row["label"] and r.get("key") == row.get("key"):
            return r["towers"]
    raise AssertionError(f"{name}: row {row['label']!r} not planned")


def _names_a_key(message: str) -> bool:
    """A config error names its key; the budget's one error about data names the dataset and
    the file that would tell its size (a dataset source that is neither generated nor Table I's)."""
    return "config key " in message or bool(re.search(r"^dataset '.*': no resources/.*/stats.json yet", message))


@pytest.mark.slow  # about 30 s
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(overlays())
def test_a_schema_valid_value_plans_or_is_refused_naming_a_key(example):
    key, value, how = example
    try:
        plan_everything(overlay(key, value, how))
    except ValueError as err:
        assert _names_a_key(str(err)), f"{how} {key}={value!r}: {err}"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"default_scheme": "blocks0"}, "config key default_scheme: 'blocks0' is not allowed: all, last or blocks<n>"),
        ({"default_scheme": "blocks5"}, "config key default_scheme: LayerDrop scheme 'blocks5' cannot be applied to a 12-layer backbone"),
        ({"preprocess": {"min_interactions": 1}}, "config key preprocess.min_interactions: 1 is less than the minimum of 3"),
        ({"preprocess": {"window": 3}}, "config key preprocess.window: 3 is less than the minimum of 4"),
        ({"seeds": [-1]}, "config key seeds[0]: -1 is less than the minimum of 0"),
        ({"seeds": [1, 2, 1]}, "config key seeds: 1 is listed twice in [1, 2, 1]"),
        ({"table3": {"significance_seeds": [3, 3]}}, "config key table3.significance_seeds: 3 is listed twice"),
        ({"table3": {"significance_seeds": [-3]}}, "config key table3.significance_seeds[0]: -3 is less than the minimum of 0"),
        ({"model": {"max_len": 11}}, "config key model.max_len: 11 input positions need preprocess.window >= 14"),
        ({"cache": {"dtype": "bfloat16"}}, "config key cache.dtype: 'bfloat16' is not one of auto, float16, float32"),
        ({"train": {"precision": "fp8"}}, "config key train.precision: 'fp8' is not one of bf16, fp16, fp32"),
        ({"model": {"bottlenek": 8}}, "config key model.bottlenek: Additional properties are not allowed"),
        ({"methods": [5]}, "config key methods[0]: 5 is not allowed: expected a string or a mapping of method, towers"),
        ({"gpus_per_job": -1}, "config key gpus_per_job: -1 is less than the minimum of 0"),
        ({"gpus_per_job": [1]}, "config key gpus_per_job: [1] is not allowed: expected an integer >= 0 or one of auto"),
        ({"dataset_sources": {"Foo": {"kind": "microlens"}}}, "config key dataset_sources.Foo.pairs: missing (required in dataset_sources.Foo)"),
        ({"fig7": {"text_encoders": []}}, "config key fig7.text_encoders: [] should be non-empty"),
    ],
)
def test_values_the_code_cannot_run_are_refused_naming_the_key(overrides, message):
    config = copy.deepcopy(BASE)
    update_config(config, overrides)
    with pytest.raises(ValueError) as err:
        plan_everything(config)
    assert message in str(err.value)
    assert len(str(err.value)) < 600  # the key, the value and what is allowed; never the schema


def test_a_config_error_shows_the_allowed_keys_not_the_schema():
    config = copy.deepcopy(BASE)
    config["preprocess"] = {"window": 13, "min_interaction": 5}
    with pytest.raises(ValueError) as err:
        workflow.validate(config, ROOT)
    assert str(err.value) == ("config key preprocess.min_interaction: Additional properties are not allowed "
                              "('min_interaction' was unexpected) (allowed keys of preprocess: min_interactions, window)")
    config = copy.deepcopy(BASE)
    del config["towers"]
    with pytest.raises(ValueError, match=r"^config key towers: missing \(required at the top level\)$"):
        workflow.validate(config, ROOT)


def test_enums_and_minimums_have_one_source_the_code(tmp_path):
    """The schema file lists none of the enums and minimums the code defines; the schema a run
    validates against has exactly the code's values (so the two cannot drift)."""
    from iisan.config import ITEM_SLOTS, PRECISIONS
    from iisan.data.amazon import MIN_INTERACTIONS, MIN_WINDOW
    from iisan.encoders.backbones import CACHE_DTYPES, FAMILIES, QUANTIZATIONS

    raw = yaml.safe_load((ROOT / workflow.SCHEMA).read_text())
    merged = workflow.schema(ROOT)
    expected = {"family": set(FAMILIES), "modality": set(FAMILIES.values()), "quantization": QUANTIZATIONS,
                "precision": set(PRECISIONS), "item_slots": set(ITEM_SLOTS), "dtype": set(CACHE_DTYPES),
                "tables": set(tables.names(figures=False)), "figures": set(tables.names(figures=True)),
                "min_interactions": MIN_INTERACTIONS, "window": MIN_WINDOW}
    from iisan.captions.settings import ATTENTIONS, KV_CACHES, CaptionSettings
    from iisan.data import kinds

    caption_defaults = CaptionSettings.defaults()
    for place, keywords in workflow.from_code().items():
        node_raw, node = raw, merged
        for k in place:
            node_raw, node = node_raw[k], node[k]
        assert not set(keywords) & set(node_raw), place
        name = place[-1] if place[-1] != "items" else place[-2]
        if place in kinds.schema_keywords():  # the dataset kinds' (tests/test_kinds.py)
            continue
        if place[1] == "captions":  # the caption settings' defaults, and two enums, are CaptionSettings'
            assert node["default"] == caption_defaults[name], place
            assert set(node.get("enum", [])) == set({"kv_cache": KV_CACHES, "attention": ATTENTIONS}.get(name, [])), place
            continue
        value = node.get("enum", node.get("minimum"))
        assert (set(value) if isinstance(value, list) else value) == expected[name], place
    assert {p[-1] for p in workflow.from_code() if p[1] == "captions"} == set(caption_defaults)
    # a second list in the file is refused
    raw["definitions"]["train"]["properties"]["precision"]["enum"] = ["bf16"]
    (tmp_path / workflow.SCHEMA).parent.mkdir(parents=True)
    (tmp_path / workflow.SCHEMA).write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="definitions.train.properties.precision sets enum, which the code defines"):
        workflow.schema(tmp_path)
    # the code's values are all accepted, and nothing else
    config = copy.deepcopy(BASE)
    for family in FAMILIES:
        config["backbones"]["bert-demo"]["family"] = family
        config["backbones"]["bert-demo"]["modality"] = FAMILIES[family]
        workflow.validate(copy.deepcopy(config), ROOT)


@pytest.mark.parametrize("where", ["plan", "library"])
def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [demo]\ntowers: [{field: title\nseeds: [1]\n")
    if where == "library":
        with pytest.raises(ValueError, match=rf"^{bad}:3:\d+: not valid YAML"):
            workflow.workflow_config(ROOT, [str(bad)])
        return
    res = subprocess.run([sys.executable, "-m", "iisan.cli", "plan", "-d", str(ROOT), "--configfile", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and f"{bad}:3:" in res.stderr and "<unicode string>" not in res.stderr, res.stderr


SNAKEMAKE = [sys.executable, "-m", "snakemake"]


@pytest.mark.slow
def test_the_snakefile_finds_its_config_from_another_folder_and_names_yaml_errors(tmp_path):
    """`snakemake -s path/Snakefile` from another folder reads the workflow's own default config
    (a dry run of the tiny config plans); a YAML error in the default config names file, line and
    column."""
    res = subprocess.run([*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-n", "--cores", "1", "--configfile", str(ROOT / TINY),
                          "--directory", str(tmp_path), "--", "results/table7.csv"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "required property" not in res.stdout + res.stderr
    # every target of the default config, files the repository ships (Table V's cited rows, the
    # caption prompts) found beside the Snakefile
    res = subprocess.run([*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-n", "--cores", "1", "--directory", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # a broken default config: a copy of the workflow with one bad line
    wf = tmp_path / "wf"
    for name in ("Snakefile", "workflow", "config", "profiles"):
        src = ROOT / name
        (wf / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            import shutil

            shutil.copytree(src, wf / name)
        elif src.exists():
            (wf / name).write_bytes(src.read_bytes())
    cfg = wf / workflow.DEFAULT_CONFIG
    cfg.write_text(cfg.read_text().replace("datasets: [demo]", "datasets: [demo", 1))
    res = subprocess.run([*SNAKEMAKE, "-s", str(wf / "Snakefile"), "-n", "--cores", "1"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode != 0 and f"{cfg}:" in res.stdout + res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
