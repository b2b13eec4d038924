"""The paper's tables and figures as entries of the table registry: rows, settings, builders.

Each section's JSON schema (with its defaults) lives in its entry; `iisan.workflow.validate`
merges them into the config schema. Row keys are the names the paper's numbers use
(iisan/paper_values.yaml).
"""

from __future__ import annotations

import yaml

from .. import methods
from ..config import backbone_entry
from ..layerdrop import scheme_layers
from ..plan import compared_row, method_row, methods_table_row, row, table4_method, va_scheme, va_towers
from .build import (
    build_gates,
    build_methods_table,
    build_plain,
    build_table3,
    build_table4,
    build_table5,
    build_table6,
    build_table8,
    build_table9,
)
from .registry import Table, register

DATASETS = {"type": "array", "items": {"type": "string"}, "minItems": 1,
            "description": "the datasets it runs on (default: datasets)"}


def _schema(text: str, datasets: bool = True) -> dict:
    """A section's schema from YAML, with the optional `datasets` key."""
    schema = yaml.safe_load(text)
    if datasets:
        schema.setdefault("properties", {})["datasets"] = DATASETS
    return schema


def section_datasets(key: str):
    """`<key>.datasets`, else the config's `datasets`."""
    return lambda config: list((config.get(key) or {}).get("datasets") or config["datasets"])


def own_dataset(key: str):
    """Tables that run on one dataset of their own (MicroLens): `<key>.dataset`."""
    return lambda config: [config[key]["dataset"]]


def _check_tokens(key: str):
    def check(config: dict) -> None:
        for i, token in enumerate((config.get(key) or {}).get("methods") or []):
            methods.row(token, f"config key {key}.methods[{i}]")
    return check


def _check_text_backbone(key: str, field: str = "va_text_encoder"):
    def check(config: dict) -> None:
        name = (config.get(key) or {}).get(field)
        if name and backbone_entry(config, name)["modality"] != "text":
            raise ValueError(f"config key {key}.{field}: {name!r} is not a text backbone")
    return check


def _checks(*fns):
    def check(config: dict) -> None:
        for fn in fns:
            fn(config)
    return check


# --- Table III: baselines, IISAN-VS and IISAN-VA on the Amazon datasets ---------------------------
def table3_rows(config: dict) -> list[dict]:
    t3 = config.get("table3") or {}
    sig = t3.get("significance_seeds")
    return [compared_row(config, t, sig if t in ("iisan", "iisan-va") else None) for t in t3.get("methods", [])]


COMPARED_SCHEMA = """
type: object
additionalProperties: false
properties:
  methods: {type: array, items: {$ref: "#/definitions/compared"}, minItems: 1}
  va_text_encoder: {type: string, description: "IISAN-VA's text tower (BERT-large in the paper); default: the first tower's backbone"}
"""

register(Table(
    "table3", "Table III: FFT, Adapter, LoRA, BitFit, IISAN-VS and IISAN-VA", table3_rows, build_table3, header="method",
    section="table3", datasets=section_datasets("table3"), paper=True, check=_checks(_check_tokens("table3"), _check_text_backbone("table3")),
    schema=_schema(COMPARED_SCHEMA + "  significance_seeds: {type: array, items: {type: integer, minimum: 0}, uniqueItems: true}\n"),
))


# --- Table IV: text-encoder scaling, then image-encoder scaling -----------------------------------
IMAGE_SCALING = "image scaling"  # the group of Table IV's rows with a larger image encoder


def table4_rows(config: dict) -> list[dict]:
    """Every text encoder with `image_encoder`, grouped as Fig. 4 (PLM, base LLM, MoE LLM, 70B);
    then the image-encoder scaling rows, [text, image] pairs (group "image scaling")."""
    t4 = config["table4"]
    pairs = [(text, t4["image_encoder"], None) for text in t4["text_encoders"]]
    pairs += [(text, image, IMAGE_SCALING) for text, image in t4["image_scaling"]]
    rows = []
    for text, image, group in pairs:
        b = backbone_entry(config, text)
        tw = [{"field": t4["text_field"], "backbone": text}, {"field": t4["image_field"], "backbone": image}]
        rows.append(row(text if group is None else f"{text} + {image}", tw, table4_method(config, text, image),
                        va_scheme(config, text, image), group=group or b.get("group", "PLM"), params_b=b.get("params_b"), image=image))
    return rows


def check_table4(config: dict) -> None:
    for i, pair in enumerate((config.get("table4") or {}).get("image_scaling") or []):
        for name, modality in zip(pair, ("text", "image")):
            if backbone_entry(config, name)["modality"] != modality:
                raise ValueError(f"config key table4.image_scaling[{i}]: {name!r} is not a {modality} backbone "
                                 "(each entry is [text encoder, image encoder])")


register(Table(
    "table4", "Table IV: IISAN-Versa with 13 text encoders and larger image encoders", table4_rows, build_table4,
    header="text encoder", section="table4", datasets=section_datasets("table4"), paper=True, check=check_table4,
    schema=_schema("""
type: object
additionalProperties: false
required: [text_encoders, image_encoder]
properties:
  text_encoders: {type: array, items: {type: string}, minItems: 1}
  image_encoder: {type: string}
  image_scaling:
    type: array
    items: {type: array, items: {type: string}, minItems: 2, maxItems: 2}
    default: []
  text_field: {type: string, default: title}
  image_field: {type: string, default: image}
"""),
))


# --- Table V: MicroLens, beside the benchmark's published rows -----------------------------------
def table5_rows(config: dict) -> list[dict]:
    return [compared_row(config, t, table="table5") for t in config["table5"]["methods"]]


def table5_cited(config: dict) -> list[str]:
    cited = config["table5"].get("cited")
    return [cited] if cited else []


register(Table(
    "table5", "Table V: MicroLens, our reruns beside the benchmark's published rows", table5_rows, build_table5, header="method",
    section="table5", datasets=own_dataset("table5"), extra_inputs=table5_cited, paper=True,
    check=_checks(_check_tokens("table5"), _check_text_backbone("table5")),
    schema=_schema("""
type: object
additionalProperties: false
required: [dataset]
properties:
  dataset: {type: string, description: the MicroLens dataset (a dataset_sources name) Table V runs on}
  methods:
    type: array
    items: {$ref: "#/definitions/compared"}
    minItems: 1
    default: [fft, sasrec-id, gru4rec, iisan, iisan-va]
  va_text_encoder: {type: string, description: "IISAN-VA's text tower (BERT-large in the paper); default: the first tower's backbone"}
  cited:
    type: [string, "null"]
    description: YAML file of the benchmark's published rows printed beside ours (null for none)
    default: config/cited/table5.yaml
""", datasets=False),
))


# --- Table VI: ablations of IISAN-VS and IISAN-VA ------------------------------------------------
# (key, IISAN-VS method, IISAN-VA method, scheme: None for the column's default, or "all")
TABLE6 = [
    ("iisan", "iisan", "iisan-va", None),
    ("w/o LayerDrop", "iisan", "iisan-va", "all"),
    ("no-gate", "no-gate", "no-gate-va", None),
    ("frozen", "frozen", "frozen", None),
    ("no-inter", "no-inter", "no-inter-va", None),
    ("no-intra", "no-intra", "no-intra-va", None),
]


def table6_rows(config: dict) -> list[dict]:
    """The IISAN-VS column on the configured towers; with `table6.va_text_encoder`, the IISAN-VA
    column on that text encoder + the configured image tower (its scheme `va_scheme`; without
    LayerDrop every layer of both towers, the run of Table VIII's "all+all")."""
    out = []
    for key, vs, _, scheme in TABLE6:
        label = "w/o LayerDrop" if scheme else None
        out.append(method_row(config, vs, label, scheme, key=key, column="IISAN-VS"))
    text = (config.get("table6") or {}).get("va_text_encoder")
    if text:
        image = config["towers"][-1]["backbone"]
        for key, _, va, scheme in TABLE6:
            label = "w/o LayerDrop" if scheme else None
            r = dict(method_row(config, va, label, key=key, column="IISAN-VA"), **va_towers(config, text))
            if not methods.get(va).reads_last:
                r["scheme"] = "all+all" if scheme else va_scheme(config, text, image)
            out.append(r)
    return out


register(Table(
    "table6", "Table VI: ablations of IISAN-VS and IISAN-VA", table6_rows, build_table6, header="variant",
    section="table6", datasets=section_datasets("table6"), paper=True, check=_check_text_backbone("table6"),
    schema=_schema("""
type: object
additionalProperties: false
properties:
  va_text_encoder:
    type: [string, "null"]
    description: the IISAN-VA column's text tower (BERT-large in the paper); null for the IISAN-VS column only
    default: null
default: {}
"""),
))


# --- Table VII: LayerDrop blocks of IISAN-VS -----------------------------------------------------
TABLE7 = [("2 blocks", "blocks2"), ("3 blocks", "blocks3"), ("4 blocks", "blocks4"), ("6 blocks", "blocks6"), ("12 blocks", "all")]

register(Table(
    "table7", "Table VII: LayerDrop blocks of IISAN-VS",
    lambda config: [method_row(config, "iisan", label, scheme, key=scheme) for label, scheme in TABLE7], build_plain,
    header="blocks", section="table7", datasets=section_datasets("table7"), paper=True,
    schema=_schema("type: object\nadditionalProperties: false\ndefault: {}\n"),
))


# --- Table VIII: block selections of IISAN-VA ----------------------------------------------------
def table8_rows(config: dict) -> list[dict]:
    t8 = config["table8"]
    tw = [{"field": t8["text_field"], "backbone": t8["text_encoder"]}, {"field": t8["image_field"], "backbone": t8["image_encoder"]}]
    sizes = [backbone_entry(config, t["backbone"])["layers"] for t in tw]

    def group(text, image):  # blocks kept per tower, e.g. "12+6"
        return "+".join(str(len(scheme_layers(s, n, include_h0=False))) for s, n in zip((text, image), sizes))

    return [row(f"text {text} / image {image}", tw, "iisan-va", f"{text}+{image}", key=f"{text}+{image}", text=text, image=image,
                group=group(text, image)) for text, image in t8["rows"]]


register(Table(
    "table8", "Table VIII: block selections of IISAN-VA", table8_rows, build_table8, header="selection",
    section="table8", datasets=section_datasets("table8"), paper=True,
    schema=_schema("""
type: object
additionalProperties: false
required: [text_encoder, image_encoder, rows]
properties:
  text_encoder: {type: string}
  image_encoder: {type: string}
  text_field: {type: string, default: title}
  image_field: {type: string, default: image}
  rows:
    type: array
    items:
      type: array
      minItems: 2
      maxItems: 2
      items: {type: string, pattern: "^(all|top|down|even_all|even_top12|even_down12|blocks[1-9][0-9]*)$"}
"""),
))


# --- Table IX: multimodal text on MicroLens ------------------------------------------------------
FIELD_NAMES = {"title": "title", "video_caption": "video caption", "cover_caption": "cover caption", "image": "image"}


def table9_rows(config: dict) -> list[dict]:
    """FFT on each single text; IISAN-Versa with the same text in both towers; with two different
    texts (title, video and cover captions) through two text towers of `text_encoder`; and with
    the title and the cover image. IISAN-Versa is the IISAN-VS model where the two backbones have
    one shape, else IISAN-VA (as Table IV)."""
    from ..data import ITEM_FIELDS

    t9 = config["table9"]

    def towers(*fields):
        return [{"field": f, "backbone": t9["text_encoder" if ITEM_FIELDS[f] == "text" else "image_encoder"]} for f in fields]

    def versa(label, key, fields, group):
        tw = towers(*fields)
        a, b = (t["backbone"] for t in tw)
        return row(label, tw, table4_method(config, a, b), va_scheme(config, a, b), key=key, group=group)

    rows = [row(f"FFT: {FIELD_NAMES[f]}", towers(f), "fft", "last", "none", key=f"fft:{f}", group="single text") for f in t9["single"]]
    rows += [versa(f"IISAN-Versa: {FIELD_NAMES[f]} x2", f"x2:{f}", (f, f), "same input x2") for f in t9["same_twice"]]
    rows += [versa(f"IISAN-Versa: {FIELD_NAMES[a]} + {FIELD_NAMES[b]}", f"pair:{a}+{b}", (a, b), "multimodal text") for a, b in t9["pairs"]]
    text = t9["text_field"]
    rows += [versa(f"IISAN-Versa: {FIELD_NAMES[text]} + image", f"text+image:{text}", (text, "image"), "text + image")]
    return rows


register(Table(
    "table9", "Table IX: multimodal text on MicroLens", table9_rows, build_table9, header="input", section="table9",
    datasets=own_dataset("table9"), paper=True,
    schema=_schema("""
type: object
additionalProperties: false
required: [dataset, text_encoder, image_encoder]
properties:
  dataset: {type: string, description: the MicroLens dataset (a dataset_sources name) Table IX runs on}
  text_encoder: {type: string}
  image_encoder: {type: string}
  text_field: {type: string, default: title}
  single: {type: array, items: {type: string}, default: [title, video_caption, cover_caption]}
  same_twice: {type: array, items: {type: string}, default: [title, video_caption, cover_caption]}
  pairs:
    type: array
    items: {type: array, items: {type: string}, minItems: 2, maxItems: 2}
    default: [[title, video_caption], [title, cover_caption], [video_caption, cover_caption]]
""", datasets=False),
))


# --- the methods table: any methods of the registry ----------------------------------------------
def methods_rows(config: dict) -> list[dict]:
    return [methods_table_row(config, e, f"config key methods[{i}]") for i, e in enumerate(config.get("methods") or [])]


def check_methods(config: dict) -> None:
    labels = []
    for i, r in enumerate(methods_rows(config)):
        if r["label"] in labels:
            raise ValueError(f"config key methods[{i}]: label {r['label']!r} names an earlier row too (labels name the rows)")
        if r.get("versus") and r["versus"] not in labels:
            raise ValueError(f"config key methods[{i}].versus: {r['versus']!r} is not the label of an earlier row "
                             f"(earlier: {', '.join(labels) or 'none'})")
        labels.append(r["label"])


register(Table(
    "methods", "Methods table: rows of the config's `methods`", methods_rows, build_methods_table, header="method",
    file_name=lambda config: config["methods_table"], check=check_methods,
))


# --- gates: the learned modality gates of Table III's IISAN runs (RQ5) ---------------------------
def gate_rows(config: dict) -> list[dict]:
    """Table III's gated side-network rows (IISAN-VS and IISAN-VA)."""
    return [r for r in table3_rows(config) if methods.get(r["method"]).gated and methods.get(r["method"]).items == "side"]


register(Table(
    "gates", "Gates: learned gate values of IISAN-VS and IISAN-VA (RQ5)", gate_rows, build_gates, header="method",
    datasets=section_datasets("table3"),
))


# --- figures -------------------------------------------------------------------------------------
def efficiency_rows(config: dict) -> list[dict]:
    eff = config.get("efficiency") or {}
    return [dict(compared_row(config, t), batch_size=b) for t in eff.get("methods", []) for b in eff.get("batch_sizes", [])]


register(Table("fig4", "Fig. 4: text-encoder scaling (Table IV's runs)", figure=True, runs_of="table4"))
register(Table(
    "fig5", "Fig. 5 and efficiency.csv: time and memory per method and batch size", efficiency_rows, figure=True, runs="profile",
    section="efficiency", datasets=lambda config: list((config.get("efficiency") or {}).get("datasets") or config["datasets"][:1]),
    check=_check_tokens("efficiency"),
    schema=_schema("""
type: object
additionalProperties: false
properties:
  methods: {type: array, items: {$ref: "#/definitions/compared"}, minItems: 1}
  batch_sizes: {type: array, items: {type: integer, minimum: 1}, minItems: 1, uniqueItems: true}
  steps: {type: integer, minimum: 1, default: 10}
  # backbones in the loop: which item slots the profiles run (train.item_slots' values); every
  # slot by default, as the authors' time and memory figures count, whatever the training runs use
  item_slots: {allOf: [{$ref: "#/definitions/train/properties/item_slots"}], default: all}
default: {}
"""),
))
register(Table("fig6", "Fig. 6: cache sizes of Table IV's backbones", figure=True, runs="cache", datasets=section_datasets("table4")))


def fig7_rows(config: dict) -> list[dict]:
    image = config["table4"]["image_encoder"]
    out = []
    for text in config["fig7"]["text_encoders"]:
        tw = [{"field": "title", "backbone": text}, {"field": "image", "backbone": image}]
        out += [row(text, tw, "iisan-va", va_scheme(config, text, image), cache=c, key=f"{text}:{c}") for c in ("full", "dropped")]
    return out


register(Table(
    "fig7", "Fig. 7: full against dropped caches", fig7_rows, figure=True, section="fig7", datasets=section_datasets("fig7"),
    schema=_schema("""
type: object
additionalProperties: false
required: [text_encoders]
properties:
  text_encoders: {type: array, items: {type: string}, minItems: 1}
"""),
))
