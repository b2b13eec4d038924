"""GPU-hour budget of a workflow config before it runs (`iisan plan`).

Every GPU job the targets of a config need (captions, backbone caches, training runs, Fig. 5
profiles) is found through the same planning functions the workflow's rules use (iisan.plan), and
priced from measured reference rates (`rates.yaml` beside this file, each from a benchmark in
docs/benchmarks.md) scaled by the backbone registry (layers, width, parameters, tokens), the
dataset's size and each run's batch size. Training runs are priced at `max_epochs` (an upper
bound: early stopping usually ends them sooner). Estimates, not measurements: docs/benchmarks.md
compares them with measured runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import methods, plan, shards, tables
from .backbones import output_layer
from .config import backbone_entry
from .data import CAPTION_FIELDS
from .data.amazon import TABLE_I as AMAZON_TABLE_I
from .data.microlens import TABLE_I as MICROLENS_TABLE_I

RATES = Path(__file__).with_name("rates.yaml")

# Table I: (users, items) of the paper's datasets, for datasets not preprocessed yet
TABLE_I = {name: (t["users"], t["items"]) for name, t in {**AMAZON_TABLE_I, "MicroLens": MICROLENS_TABLE_I}.items()}
QUANTIZED_BYTES = {"bnb-4bit": 0.55, "gptq": 0.55, "4bit": 0.55, "bnb-8bit": 1.1}  # bytes per parameter


def load_rates(path: Path | None = None) -> dict:
    return yaml.safe_load(Path(path or RATES).read_text())


def params_b(entry: dict) -> float:
    """A backbone's parameters in billions: the registry's `params_b`, else about 12 L d^2 (a
    transformer block's weights; a demo stand-in's own size, whatever its params_b says)."""
    if entry.get("source") != "demo" and entry.get("params_b"):
        return float(entry["params_b"])
    return 12 * entry["layers"] * entry["hidden"] ** 2 * entry.get("experts", 1) / 1e9


def weight_gb(entry: dict) -> float:
    """GB a backbone's weights take in memory: 4-bit and 8-bit checkpoints at their packed size,
    the others in their registry dtype."""
    if entry.get("quantization") in QUANTIZED_BYTES:
        return params_b(entry) * QUANTIZED_BYTES[entry["quantization"]]
    return params_b(entry) * (4.0 if entry.get("dtype", "float32") == "float32" else 2.0)


def captioner_gb(entry: dict) -> float:
    """GB of GPU memory a captioner's bf16 weights take, with 20 % for the vision tower's and the
    prompt's activations (`params_b`, 8 when the registry leaves it out)."""
    return 2 * entry.get("params_b", 8) * 1.2


CARD_GB = 75  # usable GB of one 80 GB card


def cache_cards(entry: dict) -> int:
    """80 GB cards that hold a backbone's weights with 15 % to spare (device_map='auto' spreads them)."""
    return math.ceil(weight_gb(entry) * 1.15 / CARD_GB)


def captioner_cards(entry: dict) -> int:
    """80 GB cards that hold a captioner (captioner_gb)."""
    return math.ceil(captioner_gb(entry) / CARD_GB)


def tokens(entry: dict, config: dict) -> int:
    """Tokens one item puts through a backbone: the title length, or the image's patches + CLS."""
    if entry["modality"] == "image":
        patch = int(m.group(1)) if (m := re.search(r"patch(\d+)", str(entry.get("source", "")))) else 16
        return (entry.get("image_size", 224) // patch) ** 2 + 1
    return int((config.get("preprocess") or {}).get("max_tokens", 30))


def dataset_size(config: dict, dataset: str) -> tuple[int, int]:
    """(users, items): the preprocessed dataset's stats.json, else Table I, else the demo spec's."""
    import json

    stats = Path(plan.STATS.format(dataset=dataset))
    if stats.is_file():
        s = json.loads(stats.read_text())
        return int(s["users"]), int(s["items"])
    if dataset in TABLE_I:
        return TABLE_I[dataset]
    source = (config.get("dataset_sources") or {}).get(dataset) or {}
    demo = source.get("demo") or source.get("microlens_demo")
    if demo:  # a generated demo dataset (before preprocessing drops users and items)
        return int(demo["n_users"]), int(demo["n_items"])
    raise ValueError(f"dataset {dataset!r}: no {stats} yet and not a Table I dataset; preprocess it first "
                     f"(snakemake {stats}) so that its size is known")


@dataclass
class Job:
    """One GPU job: what it is, the groups (tables, figures) that need it, its estimated GPU
    seconds and peak GPU memory."""

    kind: str  # caption | cache | train | profile
    name: str  # its output
    seconds: float
    peak_gib: float
    detail: str = ""
    groups: tuple = ()
    gpus: int = 1  # cards it takes at once (iisan.schedule), as the workflow's rules ask


class Budget:
    def __init__(self, config: dict, rates: dict | None = None):
        self.config, self.rates = config, rates or load_rates()
        self.jobs: dict[str, Job] = {}

    # --- pricing ------------------------------------------------------------------------------
    def _backbone_work(self, towers) -> float:
        """Backbone work per item relative to the reference BERT-base + ViT-base pair."""
        ref = self.rates["reference"]
        unit = ref["backbone"]["layers"] * ref["backbone"]["hidden"] ** 2
        work = sum(t.spec["layers"] * t.spec["hidden"] ** 2 * tokens(t.spec, self.config) for t in towers)
        return work / (unit * (ref["text_tokens"] + ref["image_tokens"]))

    def train(self, dataset: str, row: dict, seed, groups=(), profile_batch: int | None = None) -> Job:
        cfg = self.config
        w = plan.run_wildcards(dataset, row)
        exp = plan.experiment(cfg, dataset, w["towers"], w["method"], w["scheme"], w["cache"], seed)
        m = methods.get(exp.method)
        users, items = dataset_size(cfg, dataset)
        B = profile_batch or exp.train.batch_size
        S = self.rates["reference"]["slots"]
        steps = math.ceil(users / B)
        epochs = exp.train.max_epochs
        if exp.cache == "none" and not m.is_id:  # backbones in the loop
            r = self.rates["in_loop"]
            key = exp.method if exp.method in r["step_s"] else "iisan-uncached"
            work = self._backbone_work(exp.towers)
            step = r["step_s"][key] * work * B / r["batch"]
            # weights (+ gradients and Adam moments when every weight trains) and activations,
            # the latter scaled from the reference peak by items per step x backbone work
            per_param = 16 if m.finetune == "fft" else 4
            ref = self.rates["reference"]["backbone"]
            ref_state = 2 * 12 * ref["layers"] * ref["hidden"] ** 2 * per_param
            state = sum(params_b(t.spec) * 1e9 for t in exp.towers) * per_param
            peak = (state + max(r["peak_gib"][key] * 2**30 - ref_state, 0) * work * B / r["batch"]) / 2**30
            eval_s = r["eval_s"] * work * items / self.rates["reference"]["items"]
            startup = r["startup_s"] + sum(weight_gb(t.spec) for t in exp.towers) / self.rates["caching"]["load_gb_per_s"]
            detail = f"{exp.method}, backbones in the loop, batch {B}"
        else:
            r = self.rates["cached"]
            widths = [len(exp.tower_layers(t)) * tw.spec["hidden"] for t, tw in enumerate(exp.towers)]
            states = [len(exp.tower_layers(t)) if exp.cache != "full" else
                      output_layer(tw.spec["family"], tw.spec["layers"]) + 1 for t, tw in enumerate(exp.towers)]
            width = sum(widths) or exp.model.embed_dim  # ID models: their embeddings
            units = B * S * width
            step = r["step_fixed_s"] + r["step_per_unit_s"] * units
            ref = self.rates["reference"]
            eval_s = r["eval_s"] * items * width / (ref["items"] * ref["side_width"])
            cache_bytes = sum(items * k * tw.spec["hidden"] * (2 if tw.backbone_spec().cache_dtype(exp.cache_dtype) == "float16" else 4)
                              for k, tw in zip(states, exp.towers))
            trainable = self._side_params(exp)
            peak = (cache_bytes + 16 * trainable + r["memory_fixed_mb"] * 2**20 + r["memory_per_unit_byte"] * units * 4) / 2**30
            startup = r["startup_s"]
            detail = f"{exp.method}, {exp.cache} cache, batch {B}"
        if profile_batch:  # a profile: warm-up and timed steps, no epochs
            n = (self.config.get("efficiency") or {}).get("steps", 20) + 4
            return Job("profile", plan.profile_path(dataset, dict(row, batch_size=B)), startup + n * step, peak,
                       f"{detail}, {n} steps", tuple(groups))
        seconds = startup + epochs * (steps * step + eval_s) + 2 * eval_s
        return Job("train", plan.run_path(dataset, row, seed), seconds, peak, f"{detail}, <= {epochs} epochs x {steps} steps",
                   tuple(groups))

    def _side_params(self, exp) -> int:
        """Trainable parameters of a cached run's model, without building it: per SANB 2 d r, per
        DTL d_a d_b, heads and fusion (roughly; the memory term is small beside the cache)."""
        D = exp.model.embed_dim
        rs, r_inter = exp.model.bottlenecks([tw.spec["hidden"] for tw in exp.towers])
        total = 0
        for t, (tw, r) in enumerate(zip(exp.towers, rs)):
            d, k = tw.spec["hidden"], len(exp.tower_layers(t))
            total += k * 2 * d * r + d * d + d * D
        if len(exp.towers) == 2:
            d = min(tw.spec["hidden"] for tw in exp.towers)
            k = min(len(exp.tower_layers(t)) for t in range(2))
            total += k * (2 * d * r_inter + sum(tw.spec["hidden"] * d for tw in exp.towers if tw.spec["hidden"] != d))
        return total + 20 * D * D

    def cache(self, dataset: str, field: str, backbone: str, groups=()) -> Job:
        entry = backbone_entry(self.config, backbone)
        _, items = dataset_size(self.config, dataset)
        r = self.rates["caching"]
        flops = 2 * params_b(entry) * 1e9 * tokens(entry, self.config) * items
        seconds = r["startup_s"] + weight_gb(entry) / r["load_gb_per_s"] + flops / (r["tflops"] * 1e12)
        batch = (self.config.get("cache") or {}).get("batch_size", 64)
        states = output_layer(entry["family"], entry["layers"]) + 1
        act_gb = batch * tokens(entry, self.config) * entry["hidden"] * states * 2 / 1e9
        peak = (weight_gb(entry) * 1.05 + act_gb + 1) * 1e9 / 2**30
        return Job("cache", plan.CACHE_ARRAY.format(dataset=dataset, field=field, backbone=backbone), seconds, peak,
                   f"{items} items x {tokens(entry, self.config)} tokens", tuple(groups),
                   gpus=max(1, cache_cards(entry)))

    def caption(self, dataset: str, source: str, groups=()) -> Job:
        cap = self.config["captioners"][self.config["captions"][source]]
        _, items = dataset_size(self.config, dataset)
        r = self.rates["captions"]
        demo = cap.get("source") == "demo"
        size = 0.01 if demo else cap.get("params_b", 8)
        per_item = (r["static"] if self.config["captions"].get("kv_cache") == "static" else r)[f"{source}_item_s"]
        seconds = items * per_item * size / r["params_b"]
        peak = ((captioner_gb({"params_b": size}) if demo else captioner_gb(cap)) + 4) * 1e9 / 2**30
        return Job("caption", plan.CAPTIONS.format(dataset=dataset, source=source), seconds, peak,
                   f"{items} items, {self.config['captions'][source]}", tuple(groups),
                   gpus=0 if demo else max(1, captioner_cards(cap)))

    # --- caption shards (iisan.shards): one job per shard, priced at its share of the items ---------
    def caption_shards(self, dataset: str, source: str, groups=()) -> list[Job]:
        whole = self.caption(dataset, source, groups)
        outputs = shards.caption_outputs(self.config, dataset, source)
        _, items = dataset_size(self.config, dataset)
        jobs = []
        for k, name in enumerate(outputs, start=1):
            start, stop = shards.shard_bounds(items, k, len(outputs))
            detail = whole.detail if len(outputs) == 1 else f"shard {k} of {len(outputs)}: {stop - start} of {whole.detail}"
            jobs.append(dataclasses.replace(whole, name=name, seconds=whole.seconds * (stop - start) / max(items, 1), detail=detail))
        return jobs

    # --- what the targets need ------------------------------------------------------------------
    def _add(self, job: Job, group: str) -> None:
        have = self.jobs.get(job.name)
        if have is None:
            self.jobs[job.name] = job
            have = job
        if group not in have.groups:
            have.groups = (*have.groups, group)

    def _needs(self, dataset: str, row: dict, group: str) -> None:
        """The caches and captions a run reads."""
        w = plan.run_wildcards(dataset, row)
        towers = [] if w["towers"] == "id" else plan.parse_towers(self.config, w["towers"])
        for t in towers:
            if t.field in CAPTION_FIELDS:
                for job in self.caption_shards(dataset, CAPTION_FIELDS[t.field]):
                    self._add(job, group)
        if w["cache"] != "none":
            for t in towers:
                self._add(self.cache(dataset, t.field, t.backbone), group)

    def build(self) -> Budget:
        """Every GPU job of the configured tables and figures, each priced once (the registry says
        what a table runs: training runs, Fig. 5's profiles or Fig. 6's caches)."""
        cfg = self.config
        for name in [*(cfg.get("tables") or []), *(cfg.get("figures") or [])]:
            group = tables.table_name(cfg, name)
            kind = tables.runs_entry(name).runs
            if kind == "profile":
                for row, _path in tables.efficiency_plan(cfg):
                    self._add(self.train(row["dataset"], row, cfg["seeds"][0], profile_batch=row["batch_size"]), group)
                    self._needs(row["dataset"], row, group)
            elif kind == "cache":
                for folder in tables.fig6_caches(cfg):
                    parts = Path(folder).parts  # resources/cache/{dataset}/{field}/{backbone}[/pruned-...]
                    if not parts[-1].startswith("pruned-"):
                        self._add(self.cache(parts[2], parts[3], parts[4]), group)
            else:
                for dataset in tables.table_datasets(cfg, name):
                    for row in tables.table_plan(name, cfg):
                        for seed in row.get("seeds") or cfg["seeds"]:
                            self._add(self.train(dataset, row, seed), group)
                        self._needs(dataset, row, group)
        return self

    # --- report -----------------------------------------------------------------------------------
    def summary(self) -> list[dict]:
        """Per group (table or figure) and in total: jobs, GPU hours, largest peak memory."""
        out = []
        names = sorted({g for j in self.jobs.values() for g in j.groups}, key=_group_order)
        for name in [*names, "total"]:
            jobs = [j for j in self.jobs.values() if name == "total" or name in j.groups]
            top = max(jobs, key=lambda j: j.peak_gib)
            out.append({"group": name, "jobs": len(jobs), **{k: sum(j.kind == k for j in jobs) for k in KINDS},
                        "gpu_hours": sum(j.seconds for j in jobs) / 3600, "peak_gib": top.peak_gib, "peak_job": top.name})
        return out


KINDS = ("caption", "cache", "train", "profile")


def _group_order(name: str):
    m = re.match(r"(table|fig)(\d+)", name)
    return (0 if name.startswith("table") else 1, int(m.group(2)) if m else 99, name)


def render(budget: Budget) -> str:
    """The summary as a fixed-width table (shared jobs count once in the total)."""
    rows = budget.summary()
    w = max(14, *(len(r["group"]) + 2 for r in rows))
    head = f"{'table/figure':<{w}}{'GPU jobs':>9}{'caption':>9}{'cache':>7}{'train':>7}{'profile':>9}{'GPU hours':>11}{'peak GiB':>10}  largest job"
    lines = [f"GPU-hour budget (upper bound: every run to max_epochs) from rates measured on {budget.rates['device']}", head]
    for r in rows:
        lines.append(f"{r['group']:<{w}}{r['jobs']:>9}{r['caption']:>9}{r['cache']:>7}{r['train']:>7}{r['profile']:>9}"
                     f"{r['gpu_hours']:>11.1f}{r['peak_gib']:>10.1f}  {r['peak_job']}")
    lines.append("A job shared by several tables counts in each of them and once in the total.")
    return "\n".join(lines)


def write_jobs(budget: Budget, path: Path) -> None:
    import csv

    from .io import atomic_path

    with atomic_path(Path(path), ".csv") as tmp, open(tmp, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["kind", "output", "gpu_hours", "peak_gib", "groups", "detail"])
        for j in sorted(budget.jobs.values(), key=lambda j: (KINDS.index(j.kind), j.name)):
            out.writerow([j.kind, j.name, f"{j.seconds / 3600:.4f}", f"{j.peak_gib:.2f}", " ".join(j.groups), j.detail])
