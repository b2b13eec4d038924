"""The paper's tables and figures as entries of the table registry: rows, settings, builders.

Each section's JSON schema (with its defaults) lives in its entry; `iisan.pipeline.workflow.validate`
merges them into the config schema. Row keys are the names the paper's numbers use
(iisan/paper_values.yaml).
"""

from __future__ import annotations

import yaml

from iisan.config import backbone_entry
from iisan.pipeline.plan import compared_row, method_row, methods_table_row, row, table4_method, va_scheme, va_towers
from iisan.tables.build import (
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
from iisan.tables.claims import (
    CITED_BEST,
    Claim,
    above,
    above_cited_best,
    best,
    best_in_group,
    best_of_prefix,
    cache_claims,
    cache_size_claims,
    drop_larger,
    each_above,
    efficiency_claims,
    gate_claims,
    group_gain,
    instruct_helps_only,
    larger_image_gain,
    larger_image_lowers,
    largest_image_adds_nothing,
    rising,
    significant,
    stated,
    versus_claims,
)
from iisan.tables.registry import Table, register
from iisan.training import methods
from iisan.training.layerdrop import scheme_layers

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

BASELINES = ("fft", "adapter", "lora", "bitfit")  # Table III's fine-tuning baselines
PAPER_STAR = "marked * in Table {} (paired t-test, p < 0.05)"
TABLE3_CLAIMS = (
    Claim("IISAN-VA above IISAN-VS (HR@10 and NDCG@10)", above("table3", "iisan-va", "iisan")),
    Claim("IISAN-VA above IISAN-VS at p < 0.05 (paired t-test over the significance seeds)",
          significant("table3", "iisan-va", "{m} p (VA vs VS)", "iisan"), paper=PAPER_STAR.format("III")),
    *(Claim(f"IISAN-VS above {methods.get(b).label}", above("table3", "iisan", b)) for b in BASELINES),
)

register(Table(
    "table3", "Table III: FFT, Adapter, LoRA, BitFit, IISAN-VS and IISAN-VA", table3_rows, build_table3, header="method",
    claims=TABLE3_CLAIMS,
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


TABLE4_CLAIMS = (
    Claim("group means of HR@10 and NDCG@10 rise PLM < base LLM < MoE LLM < 70B", rising("table4")),
    Claim("a 70B text encoder gives the best HR@10 and NDCG@10 (Llama3-70B-GPTQ)", best_in_group("table4", "70B")),
    Claim("instruction tuning lifts only the MoE LLM (Mixtral) above its base model", instruct_helps_only("table4", "MoE LLM")),
    Claim("the PLM (BERT-base) gains under 1 % from the first larger image encoder (ViT-large)",
          larger_image_gain("table4", "PLM", 1.0)),
    Claim("the PLM (BERT-base) gains nothing more from the largest image encoder (ViT-huge)",
          largest_image_adds_nothing("table4", "PLM")),
    Claim("the 70B text encoder falls with every larger image encoder", larger_image_lowers("table4", "70B")),
    Claim("the larger PLM (BERT-large) gains over 6 % on the smaller (BERT-base)", group_gain("table4", "PLM", 6.0)),
)

register(Table(
    "table4", "Table IV: IISAN-Versa with 13 text encoders and larger image encoders", table4_rows, build_table4, claims=TABLE4_CLAIMS,
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
# Table V's printed class and label of the rows this workflow reruns
TABLE5_PRINTED = {"fft": ("MM VideoRec", "Full finetuning"), "iisan": ("IISAN-Versa", "IISAN-VS (ours)"),
                  "iisan-va": ("IISAN-Versa", "IISAN-VA (ours)"), "sasrec-id": ("IDRec (SR)", "SASRec (rerun)"),
                  "gru4rec": ("IDRec (SR)", "GRU4Rec (rerun)")}


def table5_rows(config: dict) -> list[dict]:
    """The reruns with the paper's class and label (other methods: their own label, class
    "rerun here"); IISAN-VS and IISAN-VA over `table5.significance_seeds` for the test against
    the benchmark's best."""
    t5 = config["table5"]
    out = []
    for t in t5["methods"]:
        r = compared_row(config, t, t5.get("significance_seeds") if t in ("iisan", "iisan-va") else None, table="table5")
        group, label = TABLE5_PRINTED.get(t, ("rerun here", r["label"]))
        out.append(dict(r, group=group, label=label))
    return out


TABLE5_CLAIMS = (
    Claim("IISAN-VA above IISAN-VS", above("table5", "iisan-va", "iisan")),
    Claim("IISAN-VS above multimodal FFT", above("table5", "iisan", "fft")),
    Claim("IISAN-VA above multimodal FFT", above("table5", "iisan-va", "fft")),
    Claim("IISAN-VS above the benchmark's best cited row (GRU4Rec_V)", above_cited_best("table5", "iisan"), cited=True),
    Claim("IISAN-VA above the benchmark's best cited row (GRU4Rec_V)", above_cited_best("table5", "iisan-va"), cited=True),
    Claim("IISAN-VS above the benchmark's best at p < 0.05 (one-sample t-test of our seeds against the cited value: "
          "the benchmark's per-seed results are not published)",
          significant("table5", "iisan", "{m} p (vs cited best)", CITED_BEST), cited=True, paper=PAPER_STAR.format("V")),
    Claim("IISAN-VA above the benchmark's best at p < 0.05 (one-sample t-test of our seeds against the cited value)",
          significant("table5", "iisan-va", "{m} p (vs cited best)", CITED_BEST), cited=True, paper=PAPER_STAR.format("V")),
    Claim("the video-encoder baselines (VideoRec) need over 4x the GPU resources of multimodal FFT",
          stated("the benchmark's VideoRec rows are cited, not rerun: their costs are not measured here"),
          paper="stated in the text (RQ3); no numbers printed"),
)


def table5_cited(config: dict) -> list[str]:
    cited = config["table5"].get("cited")
    return [cited] if cited else []


register(Table(
    "table5", "Table V: MicroLens, our reruns beside the benchmark's published rows", table5_rows, build_table5, header="method",
    claims=TABLE5_CLAIMS,
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
  significance_seeds: {type: array, items: {type: integer, minimum: 0}, uniqueItems: true,
                       description: "IISAN-VS's and IISAN-VA's seeds, for the test against the benchmark's best"}
  cited:
    type: [string, "null"]
    description: YAML file of the benchmark's published rows printed beside ours (null for none)
    default: config/cited/table5.yaml
""", datasets=False),
))


# --- Table VI: ablations of IISAN-VS and IISAN-VA ------------------------------------------------
# (key, IISAN-VS method, IISAN-VA method, scheme: None for the column's default, or "all")
# in the paper's order: the full model last
TABLE6 = [
    ("w/o LayerDrop", "iisan", "iisan-va", "all"),
    ("no-gate", "no-gate", "no-gate-va", None),
    ("frozen", "frozen", "frozen", None),
    ("no-inter", "no-inter", "no-inter-va", None),
    ("no-intra", "no-intra", "no-intra-va", None),
    ("iisan", "iisan", "iisan-va", None),
]
TABLE6_COLUMNS = ("IISAN-VS", "IISAN-VA")
TABLE6_CLAIMS = (
    *(Claim(f"{column}: the full model above {key}", above("table6", "iisan", key, column))
      for column in TABLE6_COLUMNS for key, *_ in TABLE6 if key != "iisan"),
    *(Claim(f"{column}: each single SAN (no-inter: intra only; no-intra: inter only) above the frozen backbone",
            each_above("table6", lambda src, ds: [("no-inter", "frozen"), ("no-intra", "frozen")], column))
      for column in TABLE6_COLUMNS),
    Claim("removing LayerDrop costs IISAN-VA more than IISAN-VS", drop_larger("table6", "iisan", "w/o LayerDrop", *TABLE6_COLUMNS)),
)


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
    "table6", "Table VI: ablations of IISAN-VS and IISAN-VA", table6_rows, build_table6, header="variant", claims=TABLE6_CLAIMS,
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
    claims=(Claim("6 blocks give IISAN-VS's best HR@10 and NDCG@10",
                  best("table7", "blocks6", lambda src, ds: [s for _, s in TABLE7])),),
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


TABLE8_CLAIMS = (
    Claim("the 6+6 selections have the best mean HR@10 and NDCG@10", best_of_prefix("table8", "mean:6+6", "mean:")),
    Claim("the default 6(even_all)+6(even_all) above the mean of the 6+6 selections", above("table8", "blocks6+even_all", "mean:6+6")),
)

register(Table(
    "table8", "Table VIII: block selections of IISAN-VA", table8_rows, build_table8, header="selection", claims=TABLE8_CLAIMS,
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
TABLE9_GROUPS = ("FFT", "Same input", "Multimodal Text", "Multimodal")  # the paper's categories, in order
FIELD_NAMES = {"title": "title", "video_caption": "video caption", "cover_caption": "cover caption", "image": "image"}


def table9_rows(config: dict) -> list[dict]:
    """FFT on each single text; IISAN-Versa with the same text in both towers; with two different
    texts (title, video and cover captions) through two text towers of `text_encoder`; and with
    the title and the cover image. IISAN-Versa is the IISAN-VS model where the two backbones have
    one shape, else IISAN-VA (as Table IV)."""
    from iisan.data import ITEM_FIELDS

    t9 = config["table9"]

    def towers(*fields):
        return [{"field": f, "backbone": t9["text_encoder" if ITEM_FIELDS[f] == "text" else "image_encoder"]} for f in fields]

    def versa(label, key, fields, group):
        tw = towers(*fields)
        a, b = (t["backbone"] for t in tw)
        return row(label, tw, table4_method(config, a, b), va_scheme(config, a, b), key=key, group=group)

    rows = [row(f"FFT: {FIELD_NAMES[f]}", towers(f), "fft", "last", "none", key=f"fft:{f}", group=TABLE9_GROUPS[0]) for f in t9["single"]]
    rows += [versa(f"IISAN-Versa: {FIELD_NAMES[f]} x2", f"x2:{f}", (f, f), TABLE9_GROUPS[1]) for f in t9["same_twice"]]
    rows += [versa(f"IISAN-Versa: {FIELD_NAMES[a]} + {FIELD_NAMES[b]}", f"pair:{a}+{b}", (a, b), TABLE9_GROUPS[2]) for a, b in t9["pairs"]]
    text = t9["text_field"]
    rows += [versa(f"IISAN-Versa: {FIELD_NAMES[text]} + image", f"text+image:{text}", (text, "image"), TABLE9_GROUPS[3])]
    return rows


def pairs_over_single(src, ds) -> list[tuple[str, str]]:
    """(multimodal-text pair, the single-text FFT row of each of its texts)."""
    keys = set(src.keys("table9", ds))
    return [(k, f"fft:{f}") for k in src.keys("table9", ds, prefix="pair:") for f in k.removeprefix("pair:").split("+")
            if f"fft:{f}" in keys]


TABLE9_CLAIMS = (
    Claim("title + image above every text-only row (HR@10 and NDCG@10)", best_of_prefix("table9", "text+image:title")),
    Claim("title + video caption the best multimodal-text row (HR@10 and NDCG@10)",
          best_of_prefix("table9", "pair:title+video_caption", "pair:")),
    Claim("each multimodal-text pair above the FFT rows of its two single texts", each_above("table9", pairs_over_single)),
)


register(Table(
    "table9", "Table IX: multimodal text on MicroLens", table9_rows, build_table9, header="input", section="table9", claims=TABLE9_CLAIMS,
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
    file_name=lambda config: config["methods_table"], check=check_methods, file_claims=versus_claims,
))


# --- gates: the learned modality gates of Table III's IISAN runs (RQ5) ---------------------------
def gate_rows(config: dict) -> list[dict]:
    """Table III's gated side-network rows (IISAN-VS and IISAN-VA)."""
    return [r for r in table3_rows(config) if methods.get(r["method"]).gated and methods.get(r["method"]).items == "side"]


register(Table(
    "gates", "Gates: learned gate values of IISAN-VS and IISAN-VA (RQ5)", gate_rows, build_gates, header="method", file_claims=gate_claims,
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
    check=_check_tokens("efficiency"), file_claims=efficiency_claims,
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
register(Table("fig6", "Fig. 6: cache sizes of Table IV's backbones", figure=True, runs="cache", datasets=section_datasets("table4"),
               file_claims=cache_size_claims))


def fig7_rows(config: dict) -> list[dict]:
    image = config["table4"]["image_encoder"]
    out = []
    for text in config["fig7"]["text_encoders"]:
        tw = [{"field": "title", "backbone": text}, {"field": "image", "backbone": image}]
        out += [row(text, tw, "iisan-va", va_scheme(config, text, image), cache=c, key=f"{text}:{c}") for c in ("full", "dropped")]
    return out


register(Table(
    "fig7", "Fig. 7: full against dropped caches", fig7_rows, figure=True, section="fig7", datasets=section_datasets("fig7"),
    file_claims=cache_claims,
    schema=_schema("""
type: object
additionalProperties: false
required: [text_encoders]
properties:
  text_encoders: {type: array, items: {type: string}, minItems: 1}
"""),
))
