"""Planning below the tables: where every file lives, the rows the tables are made of, and the
experiment of each run. The table registry (`iisan.tables`) builds its rows from these; the
workflow's input functions (`workflow/rules/common.smk`) call both. The path templates below are
the rules' outputs.

A row is a dict: label, key, towers ([{field, backbone}]), method, scheme, cache, and for some
tables token, group, column, params_b, batch_size or seeds.
"""

from __future__ import annotations

import dataclasses
import re

from iisan.config import Experiment, TowerConfig, backbone_entry
from iisan.data import CAPTIONS as CAPTIONS_FILE
from iisan.data.microlens import VIDEOS
from iisan.data.paths import MICROLENS_RAW, RAW, RAW_IMAGES  # noqa: F401  (path templates of this module)
from iisan.encoders.cache_files import ARRAY, MANIFEST
from iisan.training import methods
from iisan.training.layerdrop import canonical_scheme, scheme_layers, tower_schemes

# --- path templates (the rules' outputs) -------------------------------------------------------
# the raw files (iisan.data.paths: the dataset kinds name them too)
DATASET_DIR = "resources/{dataset}"
ITEMS = f"{DATASET_DIR}/items.parquet"
SEQUENCES = f"{DATASET_DIR}/sequences.parquet"
POPULARITY = f"{DATASET_DIR}/popularity.parquet"
STATS = f"{DATASET_DIR}/stats.json"
# MicroLens datasets keep the published names (iisan.data.microlens)
MICROLENS_VIDEOS = f"resources/raw/{{dataset}}/{VIDEOS}"
MICROLENS_VIDEOS_FETCHED = "resources/raw/{dataset}/videos.json"  # a MicroLens dataset's fetched videos
FRAMES = f"{DATASET_DIR}/frames.zip"  # three frames per video (iisan.data.frames)
FRAMES_MANIFEST = f"{DATASET_DIR}/frames.json"
VIDEOS_CONTENT = f"{DATASET_DIR}/videos.content.json"  # the videos' content manifest (iisan.data.folders)
CAPTIONS = f"{DATASET_DIR}/{CAPTIONS_FILE}"  # beside items.parquet, where iisan.data.item_texts reads them
CAPTION_SHARD = f"{DATASET_DIR}/captions/{{source}}.shards/{{shard}}-of-{{shards}}.parquet"  # iisan.captions.shards
CAPTIONER_DIR = "resources/captioners/{captioner}"  # a captioner stand-in
CAPTIONER = f"{CAPTIONER_DIR}/config.json"
STANDIN_DIR = "resources/backbones/{backbone}"
STANDIN = f"{STANDIN_DIR}/config.json"
CACHE_DIR = "resources/cache/{dataset}/{field}/{backbone}"
PRUNED_DIR = f"{CACHE_DIR}/pruned-{{tscheme}}"
# a cache folder's array (tracked: a replaced array reruns its readers) and manifest, named as
# iisan.encoders.cache writes them
CACHE_ARRAY, CACHE_MANIFEST = f"{CACHE_DIR}/{ARRAY}", f"{CACHE_DIR}/{MANIFEST}"
PRUNED_ARRAY, PRUNED_MANIFEST = f"{PRUNED_DIR}/{ARRAY}", f"{PRUNED_DIR}/{MANIFEST}"
RUN = "{dataset}/{towers}/{method}/{scheme}/{cache}"  # one run's folder below results/runs
RUN_METRICS = f"results/runs/{RUN}/seed{{seed}}/metrics.json"
PROFILE = f"results/efficiency/{RUN}/batch{{batch}}.json"
TABLE = "results/{table}.csv"
CLAIMS = TABLE.format(table="claims")
FIGURE = "results/{figure}.png"


def array(cache_folder: str) -> str:
    """The array file of a cache folder."""
    return f"{cache_folder}/{ARRAY}"

def cache_dir(dataset: str, field: str, backbone: str, scheme: str | None = None) -> str:
    """A backbone's full cache folder, or (with `scheme`) the one pruned to a tower scheme."""
    if scheme is None:
        return CACHE_DIR.format(dataset=dataset, field=field, backbone=backbone)
    return PRUNED_DIR.format(dataset=dataset, field=field, backbone=backbone, tscheme=scheme)


def standin_dir(backbone: str) -> str:
    return STANDIN_DIR.format(backbone=backbone)


# --- towers -----------------------------------------------------------------------------------
def towers_id(towers: list) -> str:
    """Path component naming the towers: field@backbone joined by '+' ("id" for none)."""
    if not towers:
        return "id"
    return "+".join(f"{t['field']}@{t['backbone']}" if isinstance(t, dict) else f"{t.field}@{t.backbone}" for t in towers)


def parse_towers(config: dict, text: str) -> list[TowerConfig]:
    if text == "id":  # ID-based recommenders read no item content
        return []
    out = []
    for part in text.split("+"):
        field, sep, backbone = part.partition("@")
        if not sep:
            raise ValueError(f"towers {text!r}: expected field@backbone parts joined by '+'")
        out.append(TowerConfig.from_config(config, field, backbone, f"towers {text!r}"))
    return out


# --- rows of the tables -----------------------------------------------------------------------
def row(label, towers, method, scheme, cache="dropped", key=None, **extra) -> dict:
    """A planned row; `key` names it in the paper's numbers (default: its label)."""
    return {"label": label, "key": label if key is None else key, "towers": towers, "method": method, "scheme": scheme,
            "cache": cache, **extra}


def va_scheme(config: dict, text: str, image: str) -> str:
    """Group LayerDrop of IISAN-VA: the image tower keeps `default_scheme` (n blocks), or n
    blocks with the authors' stride where that scheme does not fit its layer count (`blocks6` on
    ViT-huge's 32 layers); the text tower keeps as many blocks, with the authors' stride (or the
    paper's eq. 5, `va_stride: eq5`) when its backbone has another layer count, else the image
    tower's scheme. One scheme name when both towers use the same."""
    default = config["default_scheme"]
    kind = "eq5-" if config["va_stride"] == "eq5" else "stride"
    image_layers = backbone_entry(config, image)["layers"]
    blocks = re.fullmatch(r"blocks(\d+)", default)
    if blocks and image_layers % int(blocks.group(1)):
        image_scheme, n = f"{kind}{blocks.group(1)}", int(blocks.group(1))
    else:
        image_scheme, n = default, len(scheme_layers(default, image_layers, include_h0=False))
    text_scheme = image_scheme if backbone_entry(config, text)["layers"] == image_layers else f"{kind}{n}"
    return text_scheme if text_scheme == image_scheme else f"{text_scheme}+{image_scheme}"


def table4_method(config: dict, text: str, image: str) -> str:
    """Table IV's model: IISAN-VA, except where the two backbones have the same shape (the
    paper's BERT-base + ViT-base row), where it is the IISAN-VS model."""
    t, i = backbone_entry(config, text), backbone_entry(config, image)
    same = (t["layers"], t["hidden"]) == (i["layers"], i["hidden"])
    return "iisan" if same else "iisan-va"


def method_row(config: dict, name: str, label: str | None = None, scheme: str | None = None, **extra) -> dict:
    """A row of `name` on the configured towers with the config's default scheme (or the one the
    method forces: last for last-state methods, none for ID models) and its default cache."""
    m = methods.get(name)
    return row(label or m.label, [] if m.is_id else config["towers"], name,
               m.scheme(scheme or config["default_scheme"]), m.default_cache, **extra)


def methods_table_row(config: dict, entry: str | dict, where: str = "methods table") -> dict:
    """A row of the methods table: a method name (on `towers`, the default scheme), or a dict
    {method, towers, scheme, label, versus}; without `scheme` an asymmetric method on two towers
    takes `va_scheme`; `versus` names the row it is compared with."""
    if isinstance(entry, str):
        methods.get(entry, where)
        return method_row(config, entry)
    m = methods.get(entry["method"], f"{where}.method")
    towers = entry.get("towers") or config["towers"]
    for i, t in enumerate(towers):
        TowerConfig.from_config(config, t["field"], t["backbone"], f"{where}.towers[{i}]")
    scheme = entry.get("scheme")
    if scheme is None and m.asymmetric and len(towers) == 2:
        scheme = va_scheme(config, towers[0]["backbone"], towers[1]["backbone"])
    extra = {"versus": entry["versus"]} if entry.get("versus") else {}
    return row(entry.get("label") or m.label, [] if m.is_id else towers, m.name, m.scheme(scheme or config["default_scheme"]),
               m.default_cache, **extra)


def compared_row(config: dict, token: str, seeds: list[int] | None = None, table: str = "table3") -> dict:
    """One Table III / Table V / Fig. 5 row: a row token of the registry on the configured
    towers (BERT-base + ViT-base in the paper); an asymmetric method takes
    `<table>.va_text_encoder` (BERT-large in the paper) as its text tower and `va_scheme`."""
    m, label, cache = methods.row(token)
    out = dict(method_row(config, m.name, label), cache=cache, token=token, key=token)
    if m.asymmetric:
        text = (config.get(table) or {}).get("va_text_encoder") or config["towers"][0]["backbone"]
        out.update(va_towers(config, text), scheme=va_scheme(config, text, config["towers"][-1]["backbone"]))
    if seeds:
        out["seeds"] = list(seeds)
    return out


def va_towers(config: dict, text: str) -> dict:
    """{"towers": ...}: the configured towers with `text` as the text tower's backbone."""
    towers = config["towers"]
    return {"towers": [dict(towers[0], backbone=text), towers[-1]]}


# --- runs -------------------------------------------------------------------------------------
# A run is named by what it computes: its scheme wildcard is `run_scheme`, one name per set of
# kept blocks (iisan.training.layerdrop.canonical_name), so rows that keep the same blocks under other
# scheme names (Table III's IISAN-VA `stride6+blocks6` and Table VIII's `blocks6+even_all` on
# BERT-large + ViT-base, `all+all` and `all`) read one run folder, one experiment (its hash) and
# the same pruned caches. The seeds a run identity trains are planned in `iisan.tables`.
def _layers(config: dict, tower) -> int:
    backbone = tower["backbone"] if isinstance(tower, dict) else tower.backbone
    return backbone_entry(config, backbone)["layers"]


def run_scheme(config: dict, towers: list, method: str, scheme: str) -> str:
    """The scheme that names a run of `method` on `towers` (dicts {field, backbone} or
    TowerConfig): the method's own (`none` for ID models, `last` for last-state methods), else
    the canonical name of the blocks each tower keeps (`iisan.training.layerdrop.canonical_scheme`)."""
    m = methods.get(method)
    scheme = m.scheme(scheme)
    if m.is_id or m.reads_last or not towers:
        return scheme
    return canonical_scheme(scheme, [_layers(config, t) for t in towers])


def run_wildcards(dataset: str, row: dict, config: dict | None = None) -> dict:
    """The wildcards of a row's run folder (RUN): the method decides what its runs read; with
    `config`, the scheme is the run's canonical one (`run_scheme`: what the workflow plans), else
    the row's own name (an experiment of the same run, in a folder of its own)."""
    m = methods.get(row["method"])
    scheme = run_scheme(config, row["towers"], m.name, row["scheme"]) if config is not None else m.scheme(row["scheme"])
    return {"dataset": dataset, "towers": "id" if m.is_id else towers_id(row["towers"]), "method": m.name,
            "scheme": scheme, "cache": "none" if m.is_id else row.get("cache", m.default_cache)}


def run_path(dataset: str, row: dict, seed: int, config: dict | None = None) -> str:
    return RUN_METRICS.format(**run_wildcards(dataset, row, config), seed=seed)


def profile_path(dataset: str, row: dict, config: dict | None = None) -> str:
    return PROFILE.format(**run_wildcards(dataset, row, config), batch=row["batch_size"])


def experiment(config: dict, dataset: str, towers: str, method: str, scheme: str, cache: str, seed: int) -> Experiment:
    """The experiment of one run folder (the train rule's wildcards), its scheme the canonical
    one (`run_scheme`): its hash is the run's identity, whatever name the scheme was given."""
    tw = parse_towers(config, towers)
    return Experiment.from_config(config, dataset, tw, method, run_scheme(config, tw, method, scheme), cache, seed)


def profile_experiment(config: dict, dataset: str, towers: str, method: str, scheme: str, cache: str) -> Experiment:
    """What a profile (Fig. 5) times: the run's experiment with the first seed, its backbones in
    the loop seeing the item slots `efficiency.item_slots` says (default every slot, the work the
    authors' time and memory figures count), whatever the training runs use."""
    exp = experiment(config, dataset, towers, method, scheme, cache, config["seeds"][0])
    slots = config["efficiency"]["item_slots"]
    return dataclasses.replace(exp, train=dataclasses.replace(exp.train, item_slots=slots))


def run_caches(config: dict, dataset: str, towers: str, method: str, scheme: str, cache: str) -> list[str]:
    """Per tower the cache folder a run reads: the pruned ("dropped") cache of its tower's
    scheme (its canonical name, `run_scheme`), or the full cache; none for uncached runs and ID
    models."""
    if cache == "none":
        return []
    tw = parse_towers(config, towers)
    schemes = tower_schemes(run_scheme(config, tw, method, scheme), len(tw))
    return [cache_dir(dataset, t.field, t.backbone, None if cache == "full" else s) for t, s in zip(tw, schemes)]
