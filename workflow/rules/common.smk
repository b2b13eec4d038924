# Input functions, wildcard constraints and helpers shared by every rule file.
import json
import os
import re
import shlex

from iisan.layerdrop import scheme_layers
from iisan.layerdrop import tower_schemes
from iisan.backbones import BackboneSpec
from iisan.backbones import DECODERS
from iisan.cache import set_aside_damaged
from iisan.data import ITEM_FIELDS
from iisan.experiment import ID_METHODS
from iisan.experiment import LAST_STATE
from iisan.tables import table_plan


wildcard_constraints:
    dataset="[^/]+",
    field="[A-Za-z0-9_]+",
    backbone="[A-Za-z0-9_.-]+",
    towers="[^/]+",
    method="[a-z0-9-]+",
    scheme="[A-Za-z0-9_+-]+",
    tscheme="[A-Za-z0-9_-]+",
    cache="full|dropped|none",
    seed="[0-9]+",
    batch="[0-9]+",


def _gpus_per_job():
    value = config.get("gpus_per_job", "auto")
    if value == "auto":
        import torch

        return 1 if torch.cuda.is_available() else 0
    return int(value)


# GPUs each GPU rule asks for (0 on a machine without CUDA, so CPU runs are not serialised).
GPUS = _gpus_per_job()

# Speed knobs change how fast, not what is computed: they reach the train rule as integer
# `resources` (which never trigger a rerun), not as `params`.
SPEED = {
    "cuda_graphs": True,
    "eval_batch": 1024,
    "compile": True,
    **config.get("speed", {}),
}


def dataset_source(dataset):
    try:
        return config["dataset_sources"][dataset]
    except KeyError:
        raise ValueError(
            f"dataset {dataset!r} has no entry under dataset_sources in the config "
            f"(known: {sorted(config['dataset_sources'])})"
        )


def datasets_of_kind(kind):
    names = [n for n, s in config["dataset_sources"].items() if s["kind"] == kind]
    return "|".join(names) if names else "(?!x)x"


def backbone_spec(name):
    try:
        return config["backbones"][name]
    except KeyError:
        raise ValueError(
            f"backbone {name!r} is not in the backbones registry of the config "
            f"(known: {sorted(config['backbones'])})"
        )


def spec_json(name):
    return shlex.quote(json.dumps(backbone_spec(name)))


def towers_id(towers=None):
    """Path component naming the towers: field@backbone joined by '+'."""
    towers = towers or config["towers"]
    return "+".join(f"{t['field']}@{t['backbone']}" for t in towers)


def parse_towers(towers):
    if towers == "id":  # ID-based recommenders read no item content
        return []
    out = []
    for part in towers.split("+"):
        field, sep, backbone = part.partition("@")
        if not sep:
            raise ValueError(
                f"towers {towers!r}: expected field@backbone parts joined by '+'"
            )
        out.append(checked_tower(field, backbone, f"towers {towers!r}"))
    return out


def checked_tower(field, backbone, where):
    """A tower {field, backbone}, refused at once (when the job graph is built, not in a late
    cache job) if the field is not an item field or does not suit the backbone's modality.
    """
    if field not in ITEM_FIELDS:
        raise ValueError(
            f"{where}: unknown item field {field!r} (item fields: {', '.join(ITEM_FIELDS)})"
        )
    modality = backbone_spec(backbone)["modality"]
    if ITEM_FIELDS[field] != modality:
        raise ValueError(
            f"{where}: field {field!r} holds {ITEM_FIELDS[field]}, but backbone "
            f"{backbone!r} is a {modality} backbone"
        )
    return {"field": field, "backbone": backbone}


for _i, _t in enumerate(config["towers"]):
    checked_tower(_t["field"], _t["backbone"], f"config key towers[{_i}]")


def raw_files(dataset):
    return {
        "items_tsv": f"resources/raw/{dataset}/items.tsv",
        "users_tsv": f"resources/raw/{dataset}/users.tsv",
    }


def preprocess_inputs(wildcards):
    files = raw_files(wildcards.dataset)
    src = dataset_source(wildcards.dataset)
    if src["kind"] == "demo":
        files["images"] = f"resources/raw/{wildcards.dataset}/images.zip"
    elif src.get("images"):
        files["images"] = src["images"]
    return files


def images_arg(wildcards, input):
    return f"--images {shlex.quote(input.images)}" if "images" in input.keys() else ""


def missing_images_policy(wildcards):
    return dataset_source(wildcards.dataset).get("missing_images", "error")


def fetch_relpath(wildcards):
    src = dataset_source(wildcards.dataset)
    return src[wildcards.kind]


def fetch_sha256(wildcards):
    return dataset_source(wildcards.dataset).get("sha256", {}).get(wildcards.kind, "")


def standin_folder(name):
    return f"resources/backbones/{name}"


def cache_inputs(wildcards):
    spec = backbone_spec(wildcards.backbone)
    inputs = {"item_table": f"resources/{wildcards.dataset}/items.parquet"}
    if spec["source"] == "demo":
        inputs["standin"] = f"{standin_folder(wildcards.backbone)}/config.json"
    if spec["modality"] == "image":
        inputs.update(
            {k: v for k, v in preprocess_inputs(wildcards).items() if k == "images"}
        )
    return inputs


def standin_arg(wildcards, input):
    return (
        f"--standin {shlex.quote(os.path.dirname(input.standin))}"
        if "standin" in input.keys()
        else ""
    )


def scheme_indices(wildcards):
    """Hidden-state indices that one tower's scheme keeps (for the prune rule)."""
    layers = backbone_spec(wildcards.backbone)["layers"]
    return ",".join(
        map(
            str,
            scheme_layers(wildcards.tscheme, layers, config.get("include_h0", True)),
        )
    )


def train_caches(wildcards):
    """Per tower: the pruned ("dropped") cache of its scheme, or the full cache; none for
    uncached runs (backbones in the loop) and ID-based models."""
    if wildcards.cache == "none":
        return []
    towers = parse_towers(wildcards.towers)
    scheme = "last" if wildcards.method in LAST_STATE else wildcards.scheme
    schemes = tower_schemes(scheme, len(towers))
    out = []
    for t, s in zip(towers, schemes):
        base = cache_dir(wildcards.dataset, t["field"], t["backbone"])
        out.append(
            cache_array(base if wildcards.cache == "full" else f"{base}/pruned-{s}")
        )
    return out


def cache_dir(dataset, field, backbone):
    return f"resources/cache/{dataset}/{field}/{backbone}"


def cache_array(folder):
    """The array a job reads from a cache folder: tracked, so a replaced array reruns its
    readers."""
    return f"{folder}/cache.npy"


# Before the job graph is built (an error raised by an input function cannot stop a run:
# Snakemake then takes the job's existing outputs as source files).
set_aside_damaged("resources/cache")


def prune_source(wildcards):
    return cache_array(
        cache_dir(wildcards.dataset, wildcards.field, wildcards.backbone)
    )


def uncached_inputs(wildcards):
    """Uncached runs read the items, the image archive and the backbones themselves."""
    if wildcards.cache != "none":
        return {}
    inputs = {"item_table": f"resources/{wildcards.dataset}/items.parquet"}
    for t in parse_towers(wildcards.towers):
        spec = backbone_spec(t["backbone"])
        if spec["source"] == "demo":
            inputs[f"standin{len(inputs)}"] = (
                f"{standin_folder(t['backbone'])}/config.json"
            )
        if spec["modality"] == "image":
            inputs.update(
                {k: v for k, v in preprocess_inputs(wildcards).items() if k == "images"}
            )
    return inputs


def uncached_args(wildcards, input):
    """--backbones (registry entry and load path per tower) and --images of an uncached run."""
    if wildcards.cache != "none" or wildcards.towers == "id":
        return ""
    backbones = []
    for t in parse_towers(wildcards.towers):
        spec = backbone_spec(t["backbone"])
        path = (
            standin_folder(t["backbone"])
            if spec["source"] == "demo"
            else spec["source"]
        )
        backbones.append({"spec": spec, "path": path})
    args = f"--backbones {shlex.quote(json.dumps(backbones))}"
    return args + (
        f" --images {shlex.quote(input.images)}" if "images" in input.keys() else ""
    )


def uses_decoder_text(wildcards):
    """Whether a text tower of this run is a decoder LLM (the paper's "LLM-text runs")."""
    if wildcards.towers == "id":
        return False
    return any(
        backbone_spec(t["backbone"])["modality"] == "text"
        and backbone_spec(t["backbone"])["family"] in DECODERS
        for t in parse_towers(wildcards.towers)
    )


def experiment_json(wildcards):
    """train <- decoder_train (LLM-text runs) <- method_train[method], then the seed."""
    train = dict(config.get("train", {}))
    if uses_decoder_text(wildcards):
        train.update(config.get("decoder_train", {}))
    train.update(config.get("method_train", {}).get(wildcards.method, {}))
    out = {
        "towers": [experiment_tower(t) for t in parse_towers(wildcards.towers)],
        "method": wildcards.method,
        "scheme": wildcards.scheme,
        "cache": wildcards.cache,
        "include_h0": config.get("include_h0", True),
        "model": config.get("model", {}),
        "train": dict(train, seed=int(wildcards.seed)),
    }
    if wildcards.towers != "id":
        # the cache's storage dtype (uncached runs round frozen states to it)
        out["cache_dtype"] = config["cache"]["dtype"]
    return out


def experiment_tower(tower):
    """A tower as the experiment sees it: what its cache manifest must say (pooling, width,
    layer count) comes from the backbone registry."""
    spec = BackboneSpec.from_config(tower["backbone"], backbone_spec(tower["backbone"]))
    return dict(
        tower,
        source=spec.source,
        family=spec.family,
        pooling=spec.pooling,
        hidden=spec.hidden,
        layers=spec.layers,
    )


def run_dir(dataset, row):
    scheme = "last" if row["method"] in LAST_STATE else row["scheme"]
    towers = "id" if row["method"] in ID_METHODS else towers_id(row["towers"])
    cache = "none" if row["method"] in ID_METHODS else row.get("cache", "dropped")
    return os.path.join(
        "results", "runs", dataset, towers, row["method"], scheme, cache
    )


def run_path(dataset, row, seed):
    return os.path.join(run_dir(dataset, row), f"seed{seed}", "metrics.json")


def plan_runs(kind):
    """[(row description, metrics path)] for every dataset, row and seed of a table or figure."""
    out = []
    for dataset in config["datasets"]:
        for row in table_plan(kind, config):
            for seed in row.get("seeds") or config["seeds"]:
                desc = {k: v for k, v in row.items() if k not in ("towers", "seeds")}
                out.append(
                    (
                        dict(desc, dataset=dataset, seed=seed),
                        run_path(dataset, row, seed),
                    )
                )
    return out


def table_kind(wildcards):
    if wildcards.table == config.get("methods_table", "methods"):
        return "methods"
    return wildcards.table


def table_metrics(wildcards):
    return [p for _, p in plan_runs(table_kind(wildcards))]


def table_rows_json(wildcards):
    return shlex.quote(json.dumps([r for r, _ in plan_runs(table_kind(wildcards))]))


def plan_metrics(kind):
    return [p for _, p in plan_runs(kind)]


def plan_rows_json(kind):
    return shlex.quote(json.dumps([r for r, _ in plan_runs(kind)]))


def table_names():
    return "|".join(
        [
            "table3",
            "table4",
            "table6",
            "table7",
            "table8",
            re.escape(config.get("methods_table", "methods")),
        ]
    )


def table_file(kind):
    name = config.get("methods_table", "methods") if kind == "methods" else kind
    return f"results/{name}.csv"


def fig6_caches(wildcards):
    """Every cache (full and dropped) of the Table IV runs, for measured sizes."""
    out = set()
    for dataset in config["datasets"]:
        for row in table_plan("table4", config):
            schemes = tower_schemes(row["scheme"], len(row["towers"]))
            for t, s in zip(row["towers"], schemes):
                base = cache_dir(dataset, t["field"], t["backbone"])
                out.update({cache_array(base), cache_array(f"{base}/pruned-{s}")})
    return sorted(out)


def fig6_backbones_json():
    return shlex.quote(json.dumps(config["backbones"]))


def all_targets():
    targets = [table_file(kind) for kind in config["tables"]]
    targets += [f"results/{fig}.png" for fig in config.get("figures", [])]
    return targets


# Resource requests derived from the backbone registry (scaled by `attempt` on retries).
def backbone_weight_gb(name):
    b = backbone_spec(name)
    if (
        b["source"] == "demo"
    ):  # a stand-in: about 12 L d^2 parameters (its params_b is the real model's)
        params_b = 12 * b["layers"] * b["hidden"] ** 2 * (b.get("experts", 1)) / 1e9
    else:
        params_b = b.get("params_b") or 0.5
    bytes_per_param = {
        "bnb-4bit": 0.55,
        "gptq": 0.55,
        "4bit": 0.55,
        "bnb-8bit": 1.1,
    }.get(b.get("quantization"), 2.0)
    if b.get("dtype", "float32") == "float32" and not b.get("quantization"):
        bytes_per_param = 4.0
    return params_b * bytes_per_param


def cache_mem_mb(wildcards, attempt):
    """Host memory to load a backbone: its weights plus 8 GB, more on each retry."""
    return int((8 + 1.2 * backbone_weight_gb(wildcards.backbone)) * 1024 * attempt)


def cache_gpus(wildcards):
    """GPUs for one backbone: enough 80 GB cards for its weights (device_map='auto' spreads it)."""
    if GPUS == 0:
        return 0
    import math

    return max(GPUS, math.ceil(backbone_weight_gb(wildcards.backbone) * 1.15 / 75))


def cache_threads(wildcards):
    """Stand-ins are tiny: one thread each lets two run side by side on a small CPU."""
    return 1 if backbone_spec(wildcards.backbone)["source"] == "demo" else 4


def cache_runtime(wildcards, attempt):
    return int((30 + 2 * backbone_weight_gb(wildcards.backbone)) * attempt)


def train_mem_mb(wildcards, attempt):
    """Host memory for one training run: the caches it loads (items x states x width x 2 bytes
    for every tower, full caches when asked) plus 4 GB."""
    items = config.get("fig6_items", 20825) if config["datasets"] == ["demo"] else 25000
    total = 0
    for t in parse_towers(wildcards.towers):
        b = backbone_spec(t["backbone"])
        states = (
            b["layers"] + 1 if wildcards.cache == "full" else min(b["layers"] + 1, 25)
        )
        total += items * states * b["hidden"] * 2
    return int((4096 + 2 * total / 2**20) * attempt)


def profile_path(dataset, row):
    """results/efficiency/... mirrors the run's folder; one JSON per batch size."""
    run = run_dir(dataset, row)
    return os.path.join(
        "results",
        "efficiency",
        os.path.relpath(run, "results/runs"),
        f"batch{row['batch_size']}.json",
    )


def efficiency_plan():
    """[(row, profile path)]: every efficiency method x batch size on the first dataset."""
    dataset = config["datasets"][0]
    return [
        (dict(row, dataset=dataset), profile_path(dataset, row))
        for row in table_plan("efficiency", config)
    ]


def profile_experiment_arg(wildcards):
    """The experiment of a profile: the run's, with the first configured seed."""
    from types import SimpleNamespace

    w = SimpleNamespace(**dict(wildcards.items()), seed=config["seeds"][0])
    return shlex.quote(json.dumps(experiment_json(w)))
