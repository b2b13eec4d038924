"""Planning: which runs each table and figure needs, where every file lives, and the experiment
of each run. The workflow's input functions (`workflow/rules/common.smk`) call these; the path
templates below are the rules' outputs.

A table *row* is a dict: label, towers ([{field, backbone}]), method, scheme, cache, and for some
tables token, group, params_b, batch_size or seeds.
"""

from __future__ import annotations

import re

from . import methods
from .cache import ARRAY, MANIFEST
from .config import Experiment, TowerConfig, backbone_entry
from .data import CAPTIONS as CAPTIONS_FILE
from .data.microlens import VIDEOS
from .layerdrop import scheme_layers, tower_schemes

# --- path templates (the rules' outputs) -------------------------------------------------------
RAW = "resources/raw/{dataset}/{kind}.tsv"  # kind: items | users
RAW_IMAGES = "resources/raw/{dataset}/images.zip"  # the demo's generated covers
DATASET_DIR = "resources/{dataset}"
ITEMS = f"{DATASET_DIR}/items.parquet"
SEQUENCES = f"{DATASET_DIR}/sequences.parquet"
POPULARITY = f"{DATASET_DIR}/popularity.parquet"
STATS = f"{DATASET_DIR}/stats.json"
# MicroLens datasets keep the published names (iisan.data.microlens)
MICROLENS_RAW = "resources/raw/{dataset}/{name}"  # name: MicroLens-100k_pairs.tsv | _title_en.csv | covers.zip
MICROLENS_VIDEOS = f"resources/raw/{{dataset}}/{VIDEOS}"
MICROLENS_VIDEOS_FETCHED = "resources/raw/{dataset}/videos.json"  # a MicroLens dataset's fetched videos
FRAMES = f"{DATASET_DIR}/frames.zip"  # three frames per video (iisan.frames)
FRAMES_MANIFEST = f"{DATASET_DIR}/frames.json"
CAPTIONS = f"{DATASET_DIR}/{CAPTIONS_FILE}"  # beside items.parquet, where iisan.data.item_texts reads them
CAPTIONER_DIR = "resources/captioners/{captioner}"  # a captioner stand-in
CAPTIONER = f"{CAPTIONER_DIR}/config.json"
STANDIN_DIR = "resources/backbones/{backbone}"
STANDIN = f"{STANDIN_DIR}/config.json"
CACHE_DIR = "resources/cache/{dataset}/{field}/{backbone}"
PRUNED_DIR = f"{CACHE_DIR}/pruned-{{tscheme}}"
# a cache folder's array (tracked: a replaced array reruns its readers) and manifest, named as
# iisan.cache writes them
CACHE_ARRAY, CACHE_MANIFEST = f"{CACHE_DIR}/{ARRAY}", f"{CACHE_DIR}/{MANIFEST}"
PRUNED_ARRAY, PRUNED_MANIFEST = f"{PRUNED_DIR}/{ARRAY}", f"{PRUNED_DIR}/{MANIFEST}"
RUN = "{dataset}/{towers}/{method}/{scheme}/{cache}"  # one run's folder below results/runs
RUN_METRICS = f"results/runs/{RUN}/seed{{seed}}/metrics.json"
PROFILE = f"results/efficiency/{RUN}/batch{{batch}}.json"
TABLE = "results/{table}.csv"
FIGURE = "results/{figure}.png"


def array(cache_folder: str) -> str:
    """The array file of a cache folder."""
    return f"{cache_folder}/{ARRAY}"

TABLES = ("table3", "table4", "table5", "table6", "table7", "table8", "table9", "methods")
# tables that run on their own (MicroLens) dataset, `<table>.dataset`, instead of `datasets`
OWN_DATASET = ("table5", "table9")
KINDS = (*TABLES, "efficiency", "fig7")

# Table VI (ablations) and Table VII (LayerDrop blocks): (label or None for the method's, method,
# scheme or None for the config's default_scheme)
TABLE6 = [
    (None, "iisan", None),
    ("w/o LayerDrop", "iisan", "all"),
    (None, "no-gate", None),
    (None, "frozen", None),
    (None, "no-inter", None),
    (None, "no-intra", None),
]
TABLE7 = [("2 blocks", "iisan", "blocks2"), ("3 blocks", "iisan", "blocks3"), ("4 blocks", "iisan", "blocks4"),
          ("6 blocks", "iisan", "blocks6"), ("12 blocks", "iisan", "all")]


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


def check_config(config: dict) -> None:
    """What the schema cannot check: tower fields against backbone modalities, method names and
    Table III rows against the method registry. Errors name the config key."""
    for i, t in enumerate(config["towers"]):
        TowerConfig.from_config(config, t["field"], t["backbone"], f"config key towers[{i}]")
    for i, entry in enumerate(config.get("methods") or []):
        methods_table_row(config, entry, f"config key methods[{i}]")
    for name in config.get("method_train") or {}:
        methods.get(name, f"config key method_train.{name}")
    for name in config.get("dataset_train") or {}:
        if name not in config["dataset_sources"]:
            raise ValueError(f"config key dataset_train.{name}: no such dataset under dataset_sources "
                             f"(known: {', '.join(config['dataset_sources'])})")
    for key in ("table3", "table5", "efficiency"):
        for i, token in enumerate((config.get(key) or {}).get("methods") or []):
            methods.row(token, f"config key {key}.methods[{i}]")
    for kind in OWN_DATASET:
        own = config.get(kind)
        if own and own["dataset"] not in config["dataset_sources"]:
            raise ValueError(f"config key {kind}.dataset: no such dataset {own['dataset']!r} under dataset_sources "
                             f"(known: {', '.join(config['dataset_sources'])})")
    va_text = (config.get("table5") or {}).get("va_text_encoder")
    if va_text and backbone_entry(config, va_text)["modality"] != "text":
        raise ValueError(f"config key table5.va_text_encoder: {va_text!r} is not a text backbone")
    for i, pair in enumerate((config.get("table4") or {}).get("image_scaling") or []):
        for name, modality in zip(pair, ("text", "image")):
            if backbone_entry(config, name)["modality"] != modality:
                raise ValueError(f"config key table4.image_scaling[{i}]: {name!r} is not a {modality} backbone "
                                 "(each entry is [text encoder, image encoder])")


# --- rows of the tables -----------------------------------------------------------------------
IMAGE_SCALING = "image scaling"  # the group of Table IV's rows with a larger image encoder


def _row(label, towers, method, scheme, cache="dropped", **extra) -> dict:
    return {"label": label, "towers": towers, "method": method, "scheme": scheme, "cache": cache, **extra}


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
    return _row(label or m.label, [] if m.is_id else config["towers"], name,
                m.scheme(scheme or config["default_scheme"]), m.default_cache, **extra)


def methods_table_row(config: dict, entry: str | dict, where: str = "methods table") -> dict:
    """A row of the methods table: a method name (on `towers`, the default scheme), or a dict
    {method, towers, scheme, label}; without `scheme` an asymmetric method on two towers takes
    `va_scheme`."""
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
    return _row(entry.get("label") or m.label, [] if m.is_id else towers, m.name, m.scheme(scheme or config["default_scheme"]),
                m.default_cache)


def compared_row(config: dict, token: str, seeds: list[int] | None = None, table: str = "table3") -> dict:
    """One Table III / Table V / Fig. 5 row: a row token of the registry on the configured
    towers (BERT-base + ViT-base in the paper); an asymmetric method takes
    `<table>.va_text_encoder` (BERT-large in the paper) as its text tower and `va_scheme`."""
    m, label, cache = methods.row(token)
    row = dict(method_row(config, m.name, label), cache=cache, token=token)
    if m.asymmetric:
        towers = config["towers"]
        text = (config.get(table) or {}).get("va_text_encoder", towers[0]["backbone"])
        image = towers[-1]["backbone"]
        row.update(towers=[dict(towers[0], backbone=text), towers[-1]], scheme=va_scheme(config, text, image))
    if seeds:
        row["seeds"] = list(seeds)
    return row


def table_plan(kind: str, config: dict) -> list[dict]:
    """Rows of table (or figure) `kind`."""
    if kind == "table3":
        t3 = config.get("table3") or {}
        sig = t3.get("significance_seeds")
        return [compared_row(config, t, sig if t in ("iisan", "iisan-va") else None) for t in t3.get("methods", [])]
    if kind == "table5":
        # our rows on MicroLens; the benchmark's published rows are cited beside them (tables.py)
        return [compared_row(config, t, table="table5") for t in config["table5"]["methods"]]
    if kind == "efficiency":
        eff = config.get("efficiency") or {}
        return [dict(compared_row(config, t), batch_size=b) for t in eff.get("methods", []) for b in eff.get("batch_sizes", [])]
    if kind == "table6":
        return [method_row(config, m, label, scheme) for label, m, scheme in TABLE6]
    if kind == "table7":
        return [method_row(config, m, label, scheme) for label, m, scheme in TABLE7]
    if kind == "methods":
        return [methods_table_row(config, e, f"config key methods[{i}]") for i, e in enumerate(config.get("methods") or [])]
    if kind == "table4":
        # every text encoder with `image_encoder`, grouped as Fig. 4 (PLM, base LLM, MoE LLM,
        # 70B); then the image-encoder scaling rows, [text, image] pairs (group "image scaling")
        t4 = config["table4"]
        pairs = [(text, t4["image_encoder"], None) for text in t4["text_encoders"]]
        pairs += [(text, image, IMAGE_SCALING) for text, image in t4["image_scaling"]]
        rows = []
        for text, image, group in pairs:
            b = backbone_entry(config, text)
            tw = [{"field": t4["text_field"], "backbone": text}, {"field": t4["image_field"], "backbone": image}]
            rows.append(_row(text if group is None else f"{text} + {image}", tw, table4_method(config, text, image),
                             va_scheme(config, text, image), group=group or b.get("group", "PLM"),
                             params_b=b.get("params_b"), image=image))
        return rows
    if kind == "table9":
        return table9_rows(config)
    if kind == "table8":
        t8 = config["table8"]
        tw = [{"field": t8["text_field"], "backbone": t8["text_encoder"]}, {"field": t8["image_field"], "backbone": t8["image_encoder"]}]
        sizes = [backbone_entry(config, t["backbone"])["layers"] for t in tw]

        def group(text, image):  # blocks kept per tower, e.g. "12+6"
            return "+".join(str(len(scheme_layers(s, n, include_h0=False))) for s, n in zip((text, image), sizes))

        return [_row(f"text {text} / image {image}", tw, "iisan-va", f"{text}+{image}", text=text, image=image,
                     group=group(text, image)) for text, image in t8["rows"]]
    if kind == "fig7":
        image = config["table4"]["image_encoder"]
        out = []
        for text in config["fig7"]["text_encoders"]:
            tw = [{"field": "title", "backbone": text}, {"field": "image", "backbone": image}]
            out += [_row(text, tw, "iisan-va", va_scheme(config, text, image), cache=c) for c in ("full", "dropped")]
        return out
    raise KeyError(f"unknown table {kind!r} (known: {', '.join(KINDS)})")


FIELD_NAMES = {"title": "title", "video_caption": "video caption", "cover_caption": "cover caption", "image": "image"}


def table9_rows(config: dict) -> list[dict]:
    """Table IX (multimodal text, MicroLens): FFT on each single text; IISAN-Versa with the same
    text in both towers; with two different texts (title, video and cover captions) through two
    text towers of `text_encoder`; and with the title and the cover image. IISAN-Versa is the
    IISAN-VS model where the two backbones have one shape, else IISAN-VA (as Table IV)."""
    from .data import ITEM_FIELDS

    t9 = config["table9"]

    def towers(*fields):
        return [{"field": f, "backbone": t9["text_encoder" if ITEM_FIELDS[f] == "text" else "image_encoder"]} for f in fields]

    def versa(label, fields, group):
        tw = towers(*fields)
        a, b = (t["backbone"] for t in tw)
        return _row(label, tw, table4_method(config, a, b), va_scheme(config, a, b), group=group)

    rows = [_row(f"FFT: {FIELD_NAMES[f]}", towers(f), "fft", "last", "none", group="single text") for f in t9["single"]]
    rows += [versa(f"IISAN-Versa: {FIELD_NAMES[f]} x2", (f, f), "same input x2") for f in t9["same_twice"]]
    rows += [versa(f"IISAN-Versa: {FIELD_NAMES[a]} + {FIELD_NAMES[b]}", (a, b), "multimodal text") for a, b in t9["pairs"]]
    rows += [versa(f"IISAN-Versa: {FIELD_NAMES[t9['text_field']]} + image", (t9["text_field"], "image"), "text + image")]
    return rows


def table_datasets(config: dict, kind: str) -> list[str]:
    """The datasets of a table: Tables V and IX run on their own (MicroLens) dataset, the others on `datasets`."""
    return [config[kind]["dataset"]] if kind in OWN_DATASET else config["datasets"]


# --- runs -------------------------------------------------------------------------------------
def run_wildcards(dataset: str, row: dict) -> dict:
    """The wildcards of a row's run folder (RUN): the method decides what its runs read."""
    m = methods.get(row["method"])
    return {"dataset": dataset, "towers": "id" if m.is_id else towers_id(row["towers"]), "method": m.name,
            "scheme": m.scheme(row["scheme"]), "cache": "none" if m.is_id else row.get("cache", m.default_cache)}


def run_path(dataset: str, row: dict, seed: int) -> str:
    return RUN_METRICS.format(**run_wildcards(dataset, row), seed=seed)


def profile_path(dataset: str, row: dict) -> str:
    return PROFILE.format(**run_wildcards(dataset, row), batch=row["batch_size"])


def plan_runs(kind: str, config: dict) -> list[tuple[dict, str]]:
    """[(row description, metrics path)] for every dataset, row and seed of a table or figure."""
    out = []
    for dataset in table_datasets(config, kind):
        for row in table_plan(kind, config):
            for seed in row.get("seeds") or config["seeds"]:
                desc = {k: v for k, v in row.items() if k not in ("towers", "seeds")}
                out.append((dict(desc, dataset=dataset, seed=seed), run_path(dataset, row, seed)))
    return out


def efficiency_plan(config: dict) -> list[tuple[dict, str]]:
    """[(row, profile path)]: every efficiency method x batch size on the first dataset."""
    dataset = config["datasets"][0]
    return [(dict(row, dataset=dataset), profile_path(dataset, row)) for row in table_plan("efficiency", config)]


def experiment(config: dict, dataset: str, towers: str, method: str, scheme: str, cache: str, seed: int) -> Experiment:
    """The experiment of one run folder (the train rule's wildcards)."""
    return Experiment.from_config(config, dataset, parse_towers(config, towers), method, scheme, cache, seed)


def run_caches(config: dict, dataset: str, towers: str, method: str, scheme: str, cache: str) -> list[str]:
    """Per tower the cache folder a run reads: the pruned ("dropped") cache of its tower's
    scheme, or the full cache; none for uncached runs and ID models."""
    if cache == "none":
        return []
    tw = parse_towers(config, towers)
    schemes = tower_schemes(methods.get(method).scheme(scheme), len(tw))
    return [cache_dir(dataset, t.field, t.backbone, None if cache == "full" else s) for t, s in zip(tw, schemes)]


def fig6_caches(config: dict) -> list[str]:
    """Every cache folder (full and dropped) of the Table IV runs, for measured sizes."""
    out = set()
    for dataset in config["datasets"]:
        for row in table_plan("table4", config):
            for t, s in zip(row["towers"], tower_schemes(row["scheme"], len(row["towers"]))):
                out.update(cache_dir(dataset, t["field"], t["backbone"], scheme) for scheme in (None, s))
    return sorted(out)


# --- tables and targets -----------------------------------------------------------------------
def table_name(config: dict, kind: str) -> str:
    """The file name (results/<name>.csv) of table `kind`: the methods table's is configurable."""
    return config["methods_table"] if kind == "methods" else kind


def table_file(config: dict, kind: str) -> str:
    return TABLE.format(table=table_name(config, kind))


def table_kind(config: dict, name: str) -> str:
    """The table kind of results/<name>.csv (the methods table's file name is configurable)."""
    return "methods" if name == config["methods_table"] else name


def targets(config: dict) -> list[str]:
    return [table_file(config, k) for k in config["tables"]] + [FIGURE.format(figure=f) for f in config["figures"]]
