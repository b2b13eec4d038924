"""GPU-hour budget of a workflow config before it runs (`iisan plan`), and the estimates the GPU
rules request their resources from.

Every GPU job the targets of a config need (captions, backbone caches, training runs, Fig. 5
profiles) is a job of Snakemake's own DAG (iisan.graph), read by rule and wildcards, and
priced from measured reference rates (`rates.yaml` beside this file, each from a benchmark in
docs/benchmarks.md) scaled by the backbone registry (layers, width, parameters, tokens), the
dataset's size and each run's batch size. Training runs are priced at `max_epochs` (an upper
bound: early stopping usually ends them sooner). Estimates, not measurements: docs/benchmarks.md
compares them with measured runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from . import methods, plan, shards, tables
from .backbones import output_layer
from .config import backbone_entry
from .data.amazon import TABLE_I as AMAZON_TABLE_I
from .data.microlens import TABLE_I as MICROLENS_TABLE_I

if TYPE_CHECKING:
    from .graph import Graph

RATES = Path(__file__).with_name("rates.yaml")

# Table I: users, items and interactions of the paper's datasets, for datasets not preprocessed yet
TABLE_I = {**AMAZON_TABLE_I, "MicroLens": MICROLENS_TABLE_I}
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


GPU_RULES = ("caption", "cache", "train", "profile")  # the workflow's GPU rules, priced by Budget.estimate
USABLE = 0.94  # share of a card's memory a job may plan to fill (the CUDA context and the allocator's slack)


def caption_rates(rates: dict, captions: dict) -> dict:
    """The measured caption rates of a `captions` section's KV cache and attention: the static
    cache's with `sdpa_gqa` where measured (`static_sdpa_gqa`), else the static cache's, else the
    dynamic cache's."""
    r = rates["captions"]
    if captions.get("kv_cache") != "static":
        return r
    return r.get(f"static_{captions.get('attention', 'sdpa')}", r["static"])


def usable_gib(config: dict) -> float:
    """GiB of one card (`cluster.gpu_gib`) a job may plan to fill."""
    return config["cluster"]["gpu_gib"] * USABLE


def tokens(entry: dict, config: dict) -> int:
    """Tokens one item puts through a backbone: the title length, or the image's patches + CLS."""
    if entry["modality"] == "image":
        patch = int(m.group(1)) if (m := re.search(r"patch(\d+)", str(entry.get("source", "")))) else 16
        return (entry.get("image_size", 224) // patch) ** 2 + 1
    return int((config.get("preprocess") or {}).get("max_tokens", 30))


def dataset_stats(config: dict, dataset: str) -> dict:
    """``users``, ``items`` and, where known, ``interactions``: the preprocessed dataset's
    stats.json, else Table I, else the demo spec's users and items."""
    import json

    stats = Path(plan.STATS.format(dataset=dataset))
    if stats.is_file():
        return json.loads(stats.read_text())
    if dataset in TABLE_I:
        return TABLE_I[dataset]
    source = (config.get("dataset_sources") or {}).get(dataset) or {}
    demo = source.get("demo") or source.get("microlens_demo")
    if demo:  # a generated demo dataset (before preprocessing drops users and items)
        return {"users": demo["n_users"], "items": demo["n_items"]}
    raise ValueError(f"dataset {dataset!r}: no {stats} yet and not a Table I dataset; preprocess it first "
                     f"(snakemake {stats}) so that its size is known")


def dataset_size(config: dict, dataset: str) -> tuple[int, int]:
    """(users, items) of `dataset_stats`."""
    s = dataset_stats(config, dataset)
    return int(s["users"]), int(s["items"])


def slot_share(config: dict, dataset: str, slots: int) -> float:
    """Share of a training window's `slots` that hold an item: interactions per user less the two
    held out (validation and test targets) over `slots`, at most 1 (`dataset_stats`); 1 when the
    interactions are not known (every slot, the upper bound). On Scientific 4.77 of 11 slots
    (0.433; the same as counted on its windows)."""
    s = dataset_stats(config, dataset)
    if not s.get("interactions"):
        return 1.0
    return min(max(s["interactions"] / s["users"] - 2, 1) / slots, 1.0)


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
    after: frozenset = frozenset()  # the GPU jobs it waits for, by name
    wildcards: dict = field(default_factory=dict)  # its rule's


class Budget:
    def __init__(self, config: dict, rates: dict | None = None):
        self.config, self.rates = config, rates or load_rates()
        self.jobs: dict[str, Job] = {}
        self._estimates: dict[tuple, Job] = {}

    # --- pricing ------------------------------------------------------------------------------
    def _backbone_work(self, towers) -> float:
        """Backbone work per item relative to the reference BERT-base + ViT-base pair."""
        ref = self.rates["reference"]
        unit = ref["backbone"]["layers"] * ref["backbone"]["hidden"] ** 2
        work = sum(t.spec["layers"] * t.spec["hidden"] ** 2 * tokens(t.spec, self.config) for t in towers)
        return work / (unit * (ref["text_tokens"] + ref["image_tokens"]))

    def train(self, wildcards: dict) -> Job:
        """A training run (the train rule's wildcards) or, with a `batch` wildcard, a profile of
        its steps at that batch size (the profile rule's)."""
        cfg, w = self.config, wildcards
        profile_batch = int(w["batch"]) if "batch" in w else None
        if profile_batch:
            exp = plan.profile_experiment(cfg, w["dataset"], w["towers"], w["method"], w["scheme"], w["cache"])
        else:
            exp = plan.experiment(cfg, w["dataset"], w["towers"], w["method"], w["scheme"], w["cache"], int(w["seed"]))
        m = methods.get(exp.method)
        users, items = dataset_size(cfg, w["dataset"])
        B = profile_batch or exp.train.batch_size
        S = self.rates["reference"]["slots"]
        steps = math.ceil(users / B)
        epochs = exp.train.max_epochs
        if exp.cache == "none" and not m.is_id:  # backbones in the loop
            r = self.rates["in_loop"]
            key = exp.method if exp.method in r["step_s"] else "iisan-uncached"
            # rows through the backbones per step: every slot, or (real, distinct) the slots holding
            # an item; the rest of an every-slot step (`rows_fixed_share`) does not shrink with them
            # (the activations are scaled the same way: above the measured peak, FFT 23 against 21 GiB)
            rows = 1.0 if exp.train.item_slots == "all" else slot_share(cfg, w["dataset"], S)
            cost = r["rows_fixed_share"] + (1 - r["rows_fixed_share"]) * rows
            work = self._backbone_work(exp.towers)
            step = r["step_s"][key] * work * B / r["batch"] * cost
            # weights (+ gradients and Adam moments when every weight trains) and activations,
            # the latter scaled from the reference peak by items per step x backbone work
            per_param = 16 if m.finetune == "fft" else 4
            ref = self.rates["reference"]["backbone"]
            ref_state = 2 * 12 * ref["layers"] * ref["hidden"] ** 2 * per_param
            state = sum(params_b(t.spec) * 1e9 for t in exp.towers) * per_param
            peak = (state + max(r["peak_gib"][key] * 2**30 - ref_state, 0) * work * cost * B / r["batch"]) / 2**30
            eval_s = r["eval_s"] * work * items / self.rates["reference"]["items"]
            startup = r["startup_s"] + sum(weight_gb(t.spec) for t in exp.towers) / self.rates["caching"]["load_gb_per_s"]
            detail = f"{exp.method}, backbones in the loop ({exp.train.item_slots} item slots), batch {B}"
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
            n = self.config["efficiency"]["steps"] + 4
            return Job("profile", plan.PROFILE.format(**w), startup + n * step, peak, f"{detail}, {n} steps")
        seconds = startup + epochs * (steps * step + eval_s) + 2 * eval_s
        return Job("train", plan.RUN_METRICS.format(**w), seconds, peak, f"{detail}, <= {epochs} epochs x {steps} steps")

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

    def cache(self, wildcards: dict) -> Job:
        """A backbone cache (the cache rule's wildcards: dataset, field, backbone); its weights are
        spread over as many cards as they need (device_map='auto')."""
        dataset, backbone = wildcards["dataset"], wildcards["backbone"]
        entry = backbone_entry(self.config, backbone)
        _, items = dataset_size(self.config, dataset)
        r = self.rates["caching"]
        flops = 2 * params_b(entry) * 1e9 * tokens(entry, self.config) * items
        seconds = r["startup_s"] + weight_gb(entry) / r["load_gb_per_s"] + flops / (r["tflops"] * 1e12)
        batch = (self.config.get("cache") or {}).get("batch_size", 64)
        states = output_layer(entry["family"], entry["layers"]) + 1
        act_gb = batch * tokens(entry, self.config) * entry["hidden"] * states * 2 / 1e9
        peak = (weight_gb(entry) * 1.05 + act_gb + 1) * 1e9 / 2**30
        return Job("cache", plan.CACHE_ARRAY.format(**wildcards), seconds, peak,
                   f"{items} items x {tokens(entry, self.config)} tokens", gpus=self.cards(peak))

    def caption(self, wildcards: dict) -> Job:
        """The captions of one source of a dataset, or of one shard of its items (the caption
        rule's wildcards; iisan.shards)."""
        dataset, source = wildcards["dataset"], wildcards["source"]
        cap = self.config["captioners"][self.config["captions"][source]]
        _, items = dataset_size(self.config, dataset)
        name = plan.CAPTIONS.format(**wildcards)
        if "shard" in wildcards:
            start, stop = shards.shard_bounds(items, int(wildcards["shard"]), int(wildcards["shards"]))
            items, name = stop - start, plan.CAPTION_SHARD.format(**wildcards)
        r = self.rates["captions"]
        demo = cap.get("source") == "demo"
        size = 0.01 if demo else cap.get("params_b", 8)
        per_item = caption_rates(self.rates, self.config["captions"])[f"{source}_item_s"]
        seconds = items * per_item * size / r["params_b"]
        peak = ((captioner_gb({"params_b": size}) if demo else captioner_gb(cap)) + 4) * 1e9 / 2**30
        return Job("caption", name, seconds, peak,
                   f"{items} items, {self.config['captions'][source]}", gpus=0 if demo else self.cards(peak))

    def cards(self, peak_gib: float) -> int:
        """Cards of `cluster.gpu_gib` that hold a peak spread over them (at least one)."""
        return max(1, math.ceil(peak_gib / usable_gib(self.config)))

    def estimate(self, rule: str, wildcards: dict) -> Job:
        """The job of a GPU rule (GPU_RULES) with these wildcards, priced once per Budget: what
        `iisan plan` reports and what the rule's resources request."""
        key = (rule, tuple(sorted(wildcards.items())))
        if key not in self._estimates:
            w = {k: str(v) for k, v in wildcards.items()}
            job = {"caption": self.caption, "cache": self.cache, "train": self.train, "profile": self.train}[rule](w)
            job.wildcards = w
            self._estimates[key] = job
        return self._estimates[key]

    # --- the workflow's jobs ------------------------------------------------------------------------
    def build(self, graph: Graph) -> Budget:
        """Every GPU job of Snakemake's DAG (iisan.graph.job_graph), priced once; a job belongs to
        each table or figure downstream of it and waits for the GPU jobs upstream of it."""
        gpu = {n.index: self.estimate(n.rule, dict(n.wildcards)) for n in graph.nodes if n.rule in GPU_RULES}
        groups = {_target_group(t): t for t in tables.targets(self.config) if t != plan.CLAIMS}
        for node in graph.nodes:
            group = next((g for g, t in groups.items() if t in node.outputs), None)
            if group is None:
                continue
            for i in graph.ancestors(node.index) & gpu.keys():
                if group not in gpu[i].groups:
                    gpu[i].groups = (*gpu[i].groups, group)
        for i, job in gpu.items():
            job.after = frozenset(gpu[k].name for k in graph.nearest(i, lambda n: n.index in gpu))
        self.jobs = {job.name: job for job in gpu.values()}
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


def _target_group(target: str) -> str:
    """The table or figure a target file is (results/table4.csv: table4)."""
    return Path(target).stem


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
