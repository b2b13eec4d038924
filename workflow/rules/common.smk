# Input functions, wildcard constraints and helpers shared by every rule file.
import json
import os
import re
import shlex

from iisan.layerdrop import scheme_layers
from iisan.tables import table_rows


wildcard_constraints:
    dataset="[^/]+",
    field="[A-Za-z0-9_]+",
    backbone="[A-Za-z0-9_.-]+",
    towers="[^/]+",
    method="[a-z-]+",
    scheme="(all|last|blocks[0-9]+)",
    seed="[0-9]+",


# Speed knobs change how fast, not what is computed: passed to the rules outside `params`.
SPEED_JSON = shlex.quote(json.dumps(config.get("speed", {})))


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
    out = []
    for part in towers.split("+"):
        field, sep, backbone = part.partition("@")
        if not sep:
            raise ValueError(f"towers {towers!r}: expected field@backbone parts joined by '+'")
        out.append({"field": field, "backbone": backbone})
    return out


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
        inputs.update({k: v for k, v in preprocess_inputs(wildcards).items() if k == "images"})
    return inputs


def standin_arg(wildcards, input):
    return f"--standin {shlex.quote(os.path.dirname(input.standin))}" if "standin" in input.keys() else ""


def scheme_indices(wildcards):
    layers = backbone_spec(wildcards.backbone)["layers"]
    return ",".join(map(str, scheme_layers(wildcards.scheme, layers, config.get("include_h0", True))))


def run_scheme(method, scheme):
    return "last" if method == "frozen" else scheme


def train_caches(wildcards):
    """The pruned ("dropped") cache of every tower for this experiment's scheme."""
    return [
        f"resources/cache/{wildcards.dataset}/{t['field']}/{t['backbone']}/pruned-{wildcards.scheme}/manifest.json"
        for t in parse_towers(wildcards.towers)
    ]


def experiment_json(wildcards):
    exp = {
        "towers": parse_towers(wildcards.towers),
        "method": wildcards.method,
        "scheme": wildcards.scheme,
        "include_h0": config.get("include_h0", True),
        "model": config.get("model", {}),
        "train": dict(config.get("train", {}), seed=int(wildcards.seed)),
    }
    return exp


def run_path(dataset, method, scheme, seed, towers=None):
    return (
        f"results/runs/{dataset}/{towers or towers_id()}/{method}/{run_scheme(method, scheme)}"
        f"/seed{seed}/metrics.json"
    )


def table_runs(kind):
    """[(row description, metrics path)] for every dataset, row and seed of a table."""
    out = []
    for dataset in config["datasets"]:
        for label, method, scheme in table_rows(kind, config["default_scheme"], config.get("methods")):
            for seed in config["seeds"]:
                out.append(({"dataset": dataset, "label": label, "seed": seed}, run_path(dataset, method, scheme, seed)))
    return out


def table_kind(wildcards):
    if wildcards.table == config.get("methods_table", "methods"):
        return "methods"
    return wildcards.table


def table_metrics(wildcards):
    return [p for _, p in table_runs(table_kind(wildcards))]


def table_rows_json(wildcards):
    return shlex.quote(json.dumps([r for r, _ in table_runs(table_kind(wildcards))]))


def table_names():
    return "|".join(["table6", "table7", re.escape(config.get("methods_table", "methods"))])


def table_file(kind):
    name = config.get("methods_table", "methods") if kind == "methods" else kind
    return f"results/{name}.csv"


def all_targets():
    return [table_file(kind) for kind in config["tables"]]
