"""GPU-hour budget of a workflow config before it runs (`iisan plan`), and the estimates the GPU
rules request their resources from.

Every GPU job the targets of a config need (captions, backbone caches, training runs, Fig. 5
profiles) is a job of Snakemake's own DAG (iisan.pipeline.graph), read by rule and wildcards, and
priced from measured reference rates (`rates.yaml` beside this file, each from a benchmark in
docs/benchmarks.md or, older, docs/benchmarks-history.md) scaled by the backbone registry (layers, width, parameters, tokens), the
dataset's size and each run's batch size. Training runs are priced at `max_epochs` (an upper
bound: early stopping usually ends them sooner). Estimates, not measurements: docs/benchmarks-history.md
compares them with measured runs, and each rate's `provenance` in rates.yaml says which device it
was measured on, or that it was extrapolated or set by hand (`Budget.provenance`).

A job's Snakemake priority (`Budget.priority`) is the length of the longest chain of GPU work from
it to the end (its own estimate and the longest chain of the GPU jobs that wait for it), worked
out from the config alone as the workflow's rules wire the jobs (`Budget.config_jobs`), so that
the rules can ask for it while Snakemake builds the DAG; `iisan plan --gpus N` schedules by it
(iisan.pipeline.schedule).

A training run with its backbones in the loop may be spread over k cards of one node (PyTorch
DDP; `Split` prices it, rates.yaml `cards`). How many each takes is chosen once per config
(`Budget.choice`, from `config_jobs` on one card: the shortest wall time of the jobs on the
node's `cluster.node_gpus` cards, the fewest card-hours among equal ones), and `estimate` puts
each job on its cards, so that `iisan plan` and the rules' `gpu`, runtime and priority read the
same k.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from iisan import tables
from iisan.captions import shards
from iisan.config import backbone_entry
from iisan.data import CAPTION_FIELDS, kinds
from iisan.data.amazon import TABLE_I as AMAZON_TABLE_I
from iisan.data.microlens import TABLE_I as MICROLENS_TABLE_I
from iisan.encoders.backbones import output_layer
from iisan.encoders.cache_job import CacheJob
from iisan.pipeline import plan
from iisan.training import methods

if TYPE_CHECKING:
    from iisan.pipeline.graph import Graph

RATES = Path(__file__).with_name("rates.yaml")
log = logging.getLogger(__name__)

# Table I: users, items and interactions of the paper's datasets, for datasets not preprocessed yet
TABLE_I = {**AMAZON_TABLE_I, "MicroLens": MICROLENS_TABLE_I}
QUANTIZED_BYTES = {"bnb-4bit": 0.55, "gptq": 0.55, "4bit": 0.55, "bnb-8bit": 1.1}  # bytes per parameter
# MB of one MicroLens video (the fetch_videos rule's script says about 20-50 MB each): an assumed
# range, not measured here; `iisan plan` prints the videos' disk at it and says so
VIDEO_MB = (20, 50)
# sections of rates.yaml that hold no rates (the shapes the rates were measured at) and so no provenance
NOT_RATES = ("reference",)
HOW = ("measured", "extrapolated", "not measured")  # a rate's provenance: how it was found
SCALED_OFF = 0.05  # a captioner priced from a rate measured on one this far off its size is "scaled"


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


def captioner_host_gb(entry: dict) -> float:
    """GB of host memory a caption job takes: its captioner's bf16 weights as they load (2.2 GB
    per billion parameters) and 8 GB for the images its workers prepare; a stand-in 2 GB."""
    return 2.0 if entry.get("source") == "demo" else 8 + 2.2 * entry.get("params_b", 8)


GPU_RULES = ("caption", "cache", "train", "profile")  # the workflow's GPU rules, priced by Budget.estimate
CARD_CHOICES = (1, 2, 4, 8)  # the cards of one node a training run may be spread over (Budget.choice)
USABLE = 0.94  # share of a card's memory a job may plan to fill (the CUDA context and the allocator's slack)


def caption_rates(rates: dict, captions: dict) -> dict:
    """The measured caption rates of a `captions` section's KV cache and attention: the static
    cache's with `sdpa_gqa` where measured (`static_sdpa_gqa`), else the static cache's, else the
    dynamic cache's."""
    return _dig(rates, caption_rates_key(rates, captions))


def caption_rates_key(rates: dict, captions: dict) -> str:
    """Where `caption_rates` are in the rates: captions, captions.static or captions.static_<attention>."""
    if captions.get("kv_cache") != "static":
        return "captions"
    key = f"static_{captions.get('attention', 'sdpa')}"
    return f"captions.{key if key in rates['captions'] else 'static'}"


def _dig(rates: dict, key: str):
    value = rates
    for part in key.split("."):
        value = value[part]
    return value


def provenance(rates: dict, key: str) -> dict:
    """Where the rate at dotted `key` (in_loop.step_s.fft) comes from: the record of its section's
    `provenance` for the longest part of the key its `rates` name, else the section's own;
    `device`, `how` (HOW), `source` and `note` (None where not said). A rates file without
    provenance (an older copy) gives its `device` and how "not recorded"."""
    section, _, rest = key.partition(".")
    record = dict((rates.get(section) or {}).get("provenance") or {})
    if not record:
        return {"device": rates.get("device"), "how": "not recorded", "source": None, "note": None}
    overrides = record.pop("rates", None) or {}
    parts = rest.split(".") if rest else []
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in overrides:
            record = overrides[".".join(parts[:n])]
            break
    return {k: record.get(k) for k in ("device", "how", "source", "note")}


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
    stats.json, else Table I, else the size its kind reads from its entry (a generated dataset's
    users and items; iisan.data.kinds)."""
    import json

    stats = Path(plan.STATS.format(dataset=dataset))
    if stats.is_file():
        return json.loads(stats.read_text())
    if dataset in TABLE_I:
        return TABLE_I[dataset]
    source = (config.get("dataset_sources") or {}).get(dataset) or {}
    kind = kinds.KINDS.get(source.get("kind"))
    size = kind.size(source) if kind else None
    if size:  # a generated dataset or twin (before preprocessing drops users and items)
        return size
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


@dataclass(frozen=True)
class Split:
    """What of a training run with its backbones in the loop divides over k cards of one node
    (DDP: each process takes batch / k rows of the global batch; rates.yaml `cards`): its one-card
    step split into the host's part, which every process pays in full (the same kernel launches
    for fewer rows), and the kernels' part, which k cards share; the gradients all-reduced every
    step; evaluation divided by k (each process embeds a 1/k share of the items, in chunks of
    2,048 without autograd, and ranks a 1/k share of the users: iisan.training.train.Trainer
    .item_table and .evaluate), start-up whole; parameters, gradients and Adam moments whole on
    each card, activations divided by k."""

    steps: int  # training steps the price counts (max_epochs x steps per epoch)
    host_s: float  # seconds of a step's host work, on every card alike
    gpu_s: float  # seconds of a step's kernels on one card; max(host_s, gpu_s) is the one-card step
    grad_bytes: float  # bytes all-reduced every step: trainable parameters x 4 (fp32 gradients)
    bus_gb_per_s: float  # the all-reduce's bus bandwidth
    fixed_s: float  # seconds that do not divide: start-up
    state_gib: float  # GiB on every card: weights (with gradients and Adam moments where they train)
    act_gib: float  # GiB of activations on one card; each of k cards holds 1 / k
    eval_s: float = 0.0  # seconds of every evaluation on one card; k cards share them

    def allreduce_s(self, k: int) -> float:
        """Seconds of a step's ring all-reduce of the gradients over k cards (none on one)."""
        return self.grad_bytes * 2 * (k - 1) / k / (self.bus_gb_per_s * 1e9)

    def step_s(self, k: int) -> float:
        """Seconds of a step on k cards: max(host, kernels / k) + all-reduce."""
        return max(self.host_s, self.gpu_s / k) + self.allreduce_s(k)

    def seconds(self, k: int) -> float:
        return self.fixed_s + self.eval_s / k + self.steps * self.step_s(k)

    def peak_gib(self, k: int) -> float:
        """Peak GiB of each of k cards: the state whole, DDP's gradient buckets (one more fp32
        copy of the trainable parameters) on more than one card, the activations divided."""
        return self.state_gib + (k > 1) * self.grad_bytes / 2**30 + self.act_gib / k


@dataclass
class Job:
    """One GPU job: what it is, the groups (tables, figures) that need it, its estimated GPU
    seconds and peak GPU memory (of each card it holds)."""

    kind: str  # caption | cache | train | profile
    name: str  # its output
    seconds: float
    peak_gib: float
    detail: str = ""
    groups: tuple = ()
    gpus: int = 1  # cards it takes at once (iisan.pipeline.schedule), as the workflow's rules ask
    after: frozenset = frozenset()  # the GPU jobs it waits for, by name
    wildcards: dict = field(default_factory=dict)  # its rule's
    rates: tuple = ()  # the rates it is priced from, as dotted keys of rates.yaml (in_loop.step_s.fft)
    scaled: str = ""  # what its price is scaled from, where that is more than shapes (a captioner's size)
    priority: int = 0  # Budget.priority: minutes of the longest chain of GPU work from it to the end
    split: Split | None = None  # how it divides over cards (a training run with its backbones in the loop)

    @property
    def card_seconds(self) -> float:
        """Seconds x the cards it holds (none for a job that takes no card)."""
        return self.seconds * self.gpus


class Budget:
    def __init__(self, config: dict, rates: dict | None = None):
        self.config, self.rates = config, rates or load_rates()
        self.jobs: dict[str, Job] = {}
        self._estimates: dict[tuple, Job] = {}
        self._prices: dict[tuple, Job] = {}  # the jobs on one card (`price`)
        self._config_prices: dict[str, Job] | None = None  # config_jobs on one card
        self._choice: dict[str, int] | None = None  # `choice`: cards of the jobs spread over several
        self._chains: dict[str, float] | None = None  # config_jobs' longest chains, by name
        self._waiting: dict[str, set] = {}  # config_jobs' GPU jobs waiting for a job, by name

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
            act = max(r["peak_gib"][key] * 2**30 - ref_state, 0) * work * cost * B / r["batch"]
            peak = (state + act) / 2**30
            eval_s = r["eval_s"] * work * items / self.rates["reference"]["items"]
            startup = r["startup_s"] + sum(weight_gb(t.spec) for t in exp.towers) / self.rates["caching"]["load_gb_per_s"]
            detail = f"{exp.method}, backbones in the loop ({exp.train.item_slots} item slots), batch {B}"
            used = [f"in_loop.step_s.{key}", f"in_loop.peak_gib.{key}", "in_loop.startup_s", "caching.load_gb_per_s"]
            used += ["in_loop.rows_fixed_share"] * (rows < 1) + ["in_loop.eval_s"] * (not profile_batch)
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
            used = [f"cached.{k}" for k in ("step_fixed_s", "step_per_unit_s", "memory_fixed_mb", "memory_per_unit_byte", "startup_s")]
            used += ["cached.eval_s"] * (not profile_batch)
        if profile_batch:  # a profile: warm-up and timed steps, no epochs
            n = self.config["efficiency"]["steps"] + 4
            return Job("profile", plan.PROFILE.format(**w), startup + n * step, peak, f"{detail}, {n} steps", rates=tuple(used))
        seconds = startup + epochs * (steps * step + eval_s) + 2 * eval_s
        split = None
        if exp.cache == "none" and not m.is_id and "cards" in self.rates:  # divides over cards (an older rates file: not)
            split = self._split(exp, m, step, epochs * steps, startup, (epochs + 2) * eval_s, state, act, work, rows, B)
        return Job("train", plan.RUN_METRICS.format(**w), seconds, peak, f"{detail}, <= {epochs} epochs x {steps} steps",
                   rates=tuple(used), split=split)

    def _split(self, exp, m, step: float, steps: int, startup: float, evals: float, state: float, act: float, work: float,
               rows: float, batch: int) -> Split:
        """How a run with its backbones in the loop divides over cards (`Split`, rates.yaml `cards`):
        its one-card `step` split into host and kernels in the proportions the measured FFT step
        gives at its shapes (the host's time scales with the backbones' layers, each layer the
        same launches whatever its width or rows; the kernels' with backbone work x batch x rows,
        as the in_loop step does, those that do not shrink with rows worked out from the two
        measured row shares), the one bound taking the whole step; `state` and `act` in bytes."""
        c, r = self.rates["cards"], self.rates["in_loop"]
        host = c["host_s"] * sum(t.spec["layers"] for t in exp.towers) / c["layers"]
        share = c["slot_share"]
        fixed = (c["gpu_s"]["real"] / c["gpu_s"]["all"] - share) / (1 - share)  # kernels that do not shrink with rows
        kernels = c["gpu_s"]["all"] * work * batch / r["batch"] * (fixed + (1 - fixed) * rows)
        bound = max(host, kernels)
        return Split(steps, step * host / bound, step * kernels / bound, 4 * self._trainable(exp, m), float(c["bus_gb_per_s"]),
                     startup, state / 2**30, act / 2**30, evals)

    def _trainable(self, exp, m) -> float:
        """Trainable parameters of a run with its backbones in the loop, without building it:
        every backbone weight (FFT), or what the method inserts or frees per layer
        (iisan.encoders.finetune: two adapters of the bottleneck, rank-r LoRA on query and value
        with their biases, about 11 d of biases), plus the heads and the user encoder (20 D^2, as
        `_side_params` counts them); a frozen backbone's side network (`_side_params`)."""
        if m.finetune == "frozen":
            return self._side_params(exp)
        b, rank = exp.finetune.adapter_bottleneck, exp.finetune.lora_rank
        total = 20 * exp.model.embed_dim**2
        for t in exp.towers:
            layers, d = t.spec["layers"], t.spec["hidden"]
            total += {"fft": params_b(t.spec) * 1e9, "adapter": layers * 2 * (2 * d * b + b + d),
                      "lora": layers * 2 * (2 * d * rank + d), "bitfit": layers * 11 * d}.get(m.finetune, 0)
        return total

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
        batch = CacheJob.from_config(self.config, wildcards["field"], backbone).batch_size  # as the cache rule's job
        states = output_layer(entry["family"], entry["layers"]) + 1
        act_gb = batch * tokens(entry, self.config) * entry["hidden"] * states * 2 / 1e9
        peak = (weight_gb(entry) * 1.05 + act_gb + 1) * 1e9 / 2**30
        return Job("cache", plan.CACHE_ARRAY.format(**wildcards), seconds, peak,
                   f"{items} items x {tokens(entry, self.config)} tokens", gpus=self.cards(peak),
                   rates=("caching.tflops", "caching.load_gb_per_s", "caching.startup_s"))

    def caption(self, wildcards: dict) -> Job:
        """The captions of one source of a dataset, or of one shard of its items (the caption
        rule's wildcards; iisan.captions.shards)."""
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
        key = f"{caption_rates_key(self.rates, self.config['captions'])}.{source}_item_s"
        seconds = items * _dig(self.rates, key) * size / r["params_b"]
        peak = ((captioner_gb({"params_b": size}) if demo else captioner_gb(cap)) + 4) * 1e9 / 2**30
        scaled = "" if demo or abs(size / r["params_b"] - 1) <= SCALED_OFF else (
            f"{self.config['captions'][source]} ({size:g} B parameters) at the rate measured on a {r['params_b']:g} B "
            f"captioner x {size / r['params_b']:.2f} (parameters)")
        return Job("caption", name, seconds, peak,
                   f"{items} items, {self.config['captions'][source]}", gpus=0 if demo else self.cards(peak),
                   rates=(key,), scaled=scaled)

    def cards(self, peak_gib: float) -> int:
        """Cards of `cluster.gpu_gib` that hold a peak spread over them (at least one)."""
        usable = usable_gib(self.config)
        n = peak_gib / usable if usable > 0 else math.inf
        if not math.isfinite(n):
            raise ValueError(f"config key cluster.gpu_gib: {self.config['cluster']['gpu_gib']} GiB a card cannot hold a peak of "
                             f"{peak_gib:.1f} GiB on any number of cards; give your cards' memory in GiB (80 for an H100)")
        return max(1, math.ceil(n))

    def estimate(self, rule: str, wildcards: dict) -> Job:
        """The job of a GPU rule (GPU_RULES) with these wildcards, priced once per Budget on the
        cards `choice` gives it (its `price` where it takes one): what `iisan plan` reports and
        what the rule's resources request."""
        key = (rule, tuple(sorted(wildcards.items())))
        if key not in self._estimates:
            job = self.price(rule, wildcards)
            self._estimates[key] = self.on_cards(job, self.choice().get(job.name, 1))
        return self._estimates[key]

    def price(self, rule: str, wildcards: dict) -> Job:
        """The job of a GPU rule with these wildcards as priced by its rule's method (`train`,
        `cache`, `caption`): a training run on one card, a cache or captioner on the cards its
        weights need; priced once per Budget."""
        key = (rule, tuple(sorted(wildcards.items())))
        if key not in self._prices:
            w = {k: str(v) for k, v in wildcards.items()}
            job = {"caption": self.caption, "cache": self.cache, "train": self.train, "profile": self.train}[rule](w)
            job.wildcards = w
            self._prices[key] = job
        return self._prices[key]

    # --- runs spread over several cards ---------------------------------------------------------------
    def node_gpus(self) -> int:
        """Cards of one node (config cluster.node_gpus; 1 when not set): the most one run may be
        spread over."""
        return int((self.config.get("cluster") or {}).get("node_gpus", 1))

    def on_cards(self, job: Job, k: int) -> Job:
        """`job` (on one card) spread over k cards (`Split`): its seconds and per-card peak at k,
        the rates of rates.yaml `cards` added; the job itself where k is 1 or it does not divide."""
        s = job.split
        if k == 1 or s is None:
            return job
        rates = (*job.rates, "cards.host_s", "cards.gpu_s", "cards.slot_share", "cards.layers", "cards.bus_gb_per_s")
        return replace(job, seconds=s.seconds(k), peak_gib=s.peak_gib(k), gpus=k, rates=rates,
                       detail=f"{job.detail}, DDP on {k} cards ({s.step_s(k):.3f} s a step against {s.step_s(1):.3f} on one)")

    def card_options(self, job: Job) -> dict[int, Job]:
        """The cards (CARD_CHOICES, at most `node_gpus`) a job that divides may take, each with
        the job on them, those whose per-card peak fits a card of cluster.gpu_gib; {1: job} for
        one that does not divide or fits on none."""
        if job.split is None:
            return {1: job}
        usable = usable_gib(self.config)
        out = {k: self.on_cards(job, k) for k in CARD_CHOICES if k <= self.node_gpus()}
        return {k: j for k, j in out.items() if j.peak_gib <= usable} or {1: job}

    def choice(self) -> dict[str, int]:
        """The cards of each training run the config's tables and figures spread over more than
        one (by name; a run not named takes one), chosen once per Budget on the node's
        `node_gpus` cards (iisan.pipeline.schedule.choose_cards: the shortest wall time of the
        jobs' list schedule, fewest card-hours among equal ones) from `config_jobs` on one card,
        so that `iisan plan` and the rules' resources (both through `estimate`) ask the same k.
        Empty on one card a node."""
        if self._choice is None:
            self._choice = {}
            if self.node_gpus() > 1:
                from iisan.pipeline.schedule import choose_cards

                jobs = self._one_card_jobs()
                options = {n: self.card_options(j) for n, j in jobs.items() if j.split is not None}
                chosen = choose_cards(jobs.values(), self.node_gpus(), options)
                self._choice = {n: k for n, k in chosen.items() if k != 1}
        return self._choice

    # --- the workflow's jobs ------------------------------------------------------------------------
    def build(self, graph: Graph) -> Budget:
        """Every GPU job of Snakemake's DAG (iisan.pipeline.graph.job_graph), priced once; a job belongs to
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
            job.priority = self.priority(graph.nodes[i].rule, job.wildcards)
        self.jobs = {job.name: job for job in gpu.values()}
        return self

    # --- priorities ---------------------------------------------------------------------------------
    def config_jobs(self) -> dict[str, Job]:
        """Every GPU job of the config's tables and figures, each with the GPU jobs it waits for
        (`after`), from the config alone, as the workflow's rules wire them: a training run or
        profile waits for the caches of its towers (their full caches, behind the pruning jobs),
        or, with its backbones in the loop, for the captions of its caption fields; a cache of a
        caption field waits for those captions (every shard, behind their merge). Jobs are
        priced by `price` and put on the cards `choice` gives them, as `estimate` does; one whose
        dataset's size is not known yet (not preprocessed, not in Table I) is left out. The same
        jobs and dependencies as Snakemake's DAG of the config's default targets (`build`; a test
        compares them), without the DAG, which a rule's priority and cards cannot wait for."""
        choice = self.choice()
        return {n: self.on_cards(j, choice.get(n, 1)) for n, j in self._one_card_jobs().items()}

    def _one_card_jobs(self) -> dict[str, Job]:
        """`config_jobs` as `price` gives them (training runs on one card), worked out once."""
        if self._config_prices is None:
            self._config_prices = self._wire()
        return self._config_prices

    def _wire(self) -> dict[str, Job]:
        cfg = self.config
        found: dict[str, tuple[Job, set]] = {}

        def add(rule: str, wildcards: dict, after=()) -> list[str]:
            try:
                job = self.price(rule, wildcards)
            except ValueError:  # dataset_stats: not preprocessed yet
                return []
            found.setdefault(job.name, (job, set()))[1].update(after)
            return [job.name]

        def captions(dataset: str, field: str) -> list[str]:
            if field not in CAPTION_FIELDS:
                return []
            out = []
            for path in shards.caption_outputs(cfg, dataset, CAPTION_FIELDS[field]):
                w = _wildcards(plan.CAPTION_SHARD, path) or _wildcards(plan.CAPTIONS, path)
                out += add("caption", w)
            return out

        def cache(dataset: str, field: str, backbone: str) -> list[str]:
            return add("cache", {"dataset": dataset, "field": field, "backbone": backbone}, captions(dataset, field))

        def run(rule: str, path: str) -> None:
            w = _wildcards(plan.RUN_METRICS if rule == "train" else plan.PROFILE, path)
            towers = plan.parse_towers(cfg, w["towers"])
            if plan.run_caches(cfg, w["dataset"], w["towers"], w["method"], w["scheme"], w["cache"]):
                after = [n for t in towers for n in cache(w["dataset"], t.field, t.backbone)]
            else:  # backbones in the loop (or an ID model): the captions of its caption fields
                after = [n for t in towers for n in captions(w["dataset"], t.field)] if w["cache"] == "none" else []
            add(rule, w, after)

        figures = {"fig4": "table4", "fig7": "fig7"}  # figures drawn from a table's (or their own) runs
        for name in [*cfg["tables"], *(figures[f] for f in cfg["figures"] if f in figures)]:
            for _, path in tables.plan_runs(name, cfg):
                run("train", path)
        if "fig5" in cfg["figures"]:
            for _, path in tables.efficiency_plan(cfg):
                run("profile", path)
        if "fig6" in cfg["figures"]:
            for folder in tables.fig6_caches(cfg):
                if w := _wildcards(plan.CACHE_DIR, folder):
                    cache(w["dataset"], w["field"], w["backbone"])
        return {name: replace(job, after=frozenset(after)) for name, (job, after) in found.items()}

    def priority(self, rule: str, wildcards: Mapping) -> int:
        """The Snakemake priority of the job of GPU rule `rule` (GPU_RULES) with these wildcards:
        the whole minutes (rounded up) of the longest chain of GPU work from it to the end, its
        own estimate plus the longest chain among the GPU jobs that wait for it
        (`config_jobs`, iisan.pipeline.schedule.chains), so that Snakemake starts the job that the most
        work waits for first. A job the config's tables and figures do not need (a target of its
        own) counts the chains of the jobs among them that wait for it. The workflow's GPU rules
        call it from `priority:` with the job's wildcards, as they call `estimate` for resources."""
        from iisan.pipeline.schedule import chains

        job = self.estimate(rule, dict(wildcards))
        if self._chains is None:
            jobs = self.config_jobs()
            self._chains = chains(jobs.values())
            self._waiting = {}
            for j in jobs.values():
                for name in j.after:
                    self._waiting.setdefault(name, set()).add(j.name)
        seconds = self._chains.get(job.name)
        if seconds is None:
            seconds = job.seconds + max((self._chains[n] for n in self._waiting.get(job.name, ())), default=0.0)
        return math.ceil(seconds / 60)

    # --- where the rates come from --------------------------------------------------------------
    def provenance(self) -> list[dict]:
        """The rates the jobs are priced from, grouped by where they come from (device, how,
        note): per group its rates (dotted keys), the jobs priced from any of them and their
        GPU hours; measured first, then extrapolated, then set by hand."""
        groups: dict[tuple, dict] = {}
        for job in self.jobs.values():
            for key in job.rates:
                p = provenance(self.rates, key)
                g = groups.setdefault((p["how"], p["device"], p["note"]), {**p, "rates": set(), "jobs": {}})
                g["rates"].add(key)
                g["jobs"][job.name] = job.seconds
        order = {h: i for i, h in enumerate(HOW)}
        out = sorted(groups.values(), key=lambda g: (order.get(g["how"], len(HOW)), str(g["device"])))
        return [{**g, "rates": sorted(g["rates"]), "jobs": len(g["jobs"]), "gpu_hours": sum(g["jobs"].values()) / 3600} for g in out]

    def scaled(self) -> list[dict]:
        """Jobs priced from a rate measured on another model than theirs (beyond shapes): per
        note, its jobs and their GPU hours."""
        out: dict[str, list] = {}
        for job in self.jobs.values():
            if job.scaled:
                out.setdefault(job.scaled, []).append(job)
        return [{"note": k, "jobs": len(v), "gpu_hours": sum(j.seconds for j in v) / 3600} for k, v in sorted(out.items())]

    # --- disk beyond models and caches ------------------------------------------------------------
    def videos(self) -> list[dict]:
        """The MicroLens videos the video captions need (rule fetch_videos, the kept items'), per
        dataset whose video captions the jobs make from fetched videos: its items
        (`dataset_stats`) and GB at VIDEO_MB each (an assumed range; a generated twin's videos
        are left out)."""
        out = []
        for dataset in sorted({j.wildcards["dataset"] for j in self.jobs.values() if j.kind == "caption" and j.wildcards.get("source") == "video"}):
            kind = kinds.KINDS.get(((self.config.get("dataset_sources") or {}).get(dataset) or {}).get("kind"))
            if not (kind and kind.fetches_videos):
                continue
            items = int(dataset_stats(self.config, dataset)["items"])
            out.append({"dataset": dataset, "items": items, "folder": plan.MICROLENS_VIDEOS.format(dataset=dataset),
                        "gb": tuple(items * mb / 1e3 for mb in VIDEO_MB)})
        return out

    # --- report -----------------------------------------------------------------------------------
    def summary(self) -> list[dict]:
        """Per group (table or figure) and in total: jobs, GPU hours (each job's hours once),
        card-hours (each job's hours times the cards it holds), largest peak memory."""
        out = []
        names = sorted({g for j in self.jobs.values() for g in j.groups}, key=_group_order)
        for name in [*names, "total"]:
            jobs = [j for j in self.jobs.values() if name == "total" or name in j.groups]
            top = max(jobs, key=lambda j: j.peak_gib)
            out.append({"group": name, "jobs": len(jobs), **{k: sum(j.kind == k for j in jobs) for k in KINDS},
                        "gpu_hours": sum(j.seconds for j in jobs) / 3600, "card_hours": sum(j.card_seconds for j in jobs) / 3600,
                        "peak_gib": top.peak_gib, "peak_job": top.name})
        return out


KINDS = ("caption", "cache", "train", "profile")


def _wildcards(template: str, path: str) -> dict | None:
    """The wildcards of `path` as an output of `template` (plan.RUN_METRICS), or None."""
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    m = re.fullmatch(pattern, path)
    return m.groupdict() if m else None


def _target_group(target: str) -> str:
    """The table or figure a target file is (results/table4.csv: table4)."""
    return Path(target).stem


def _group_order(name: str):
    m = re.match(r"(table|fig)(\d+)", name)
    return (0 if name.startswith("table") else 1, int(m.group(2)) if m else 99, name)


def render(budget: Budget) -> str:
    """The summary as a fixed-width table (shared jobs count once in the total), then where its
    rates come from (`render_provenance`)."""
    rows = budget.summary()
    w = max(14, *(len(r["group"]) + 2 for r in rows))
    head = (f"{'table/figure':<{w}}{'GPU jobs':>9}{'caption':>9}{'cache':>7}{'train':>7}{'profile':>9}{'GPU hours':>11}"
            f"{'card-hours':>12}{'peak GiB':>10}  largest job")
    lines = ["GPU-hour budget (upper bound: every run to max_epochs; where each rate comes from: below the table)", head]
    for r in rows:
        lines.append(f"{r['group']:<{w}}{r['jobs']:>9}{r['caption']:>9}{r['cache']:>7}{r['train']:>7}{r['profile']:>9}"
                     f"{r['gpu_hours']:>11.1f}{r['card_hours']:>12.1f}{r['peak_gib']:>10.1f}  {r['peak_job']}")
    lines.append("A job shared by several tables counts in each of them and once in the total. GPU hours count a job's "
                 "hours once, card-hours times the cards it holds (a 34B captioner two 80 GB cards).")
    return "\n".join([*lines, render_provenance(budget)])


def render_provenance(budget: Budget) -> str:
    """Which device each rate the jobs use was measured on, and whether measured, extrapolated
    or set by hand; and the jobs priced from another model's rate."""
    says = {"measured": "measured on {device}", "extrapolated": "extrapolated from a measurement on {device}",
            "not measured": "not measured"}
    lines = ["Rates these jobs are priced from (rates.yaml, each section's provenance; "
             "docs/benchmarks.md and docs/benchmarks-history.md name each benchmark):"]
    for g in budget.provenance():
        how = says.get(g["how"], "no provenance recorded, device {device}").format(device=g["device"] or "unknown")
        note = f" ({g['note']})" if g["note"] else (f" ({g['source']})" if g["how"] == "not measured" and g["source"] else "")
        lines.append(f"  {how}{note}, {g['jobs']} jobs: {_keys(g['rates'])}")
    for s in budget.scaled():
        lines.append(f"  scaled, {s['jobs']} jobs ({s['gpu_hours']:.1f} GPU hours): {s['note']}; that model not run")
    lines.append("  (each rate scaled to a job's backbones, dataset and batch; a job counts in each line whose rates it uses)")
    return "\n".join(lines)


def _keys(keys: list[str]) -> str:
    """Dotted keys, those of one parent together: cached.{eval_s, startup_s}."""
    parents: dict[str, list[str]] = {}
    for k in keys:
        parent, _, leaf = k.rpartition(".")
        parents.setdefault(parent, []).append(leaf)
    return ", ".join(f"{p}.{v[0]}" if len(v) == 1 else f"{p}.{{{', '.join(v)}}}" for p, v in parents.items())


def render_cards(budget: Budget) -> str:
    """Which training runs are spread over several cards of one node (`Budget.choice`), each with
    its cards and hours (and its hours on one card); or that every run takes one card, and why."""
    from iisan.pipeline.schedule import SAME_WALL

    n = budget.node_gpus()
    jobs = list(budget.jobs.values())
    spread = sorted((j for j in jobs if j.split is not None and j.gpus > 1), key=lambda j: (-j.split.seconds(1), j.name))
    if spread:
        runs = "; ".join(f"{j.name} on {j.gpus} ({j.seconds / 3600:.1f} h, {j.split.seconds(1) / 3600:.1f} h on one)" for j in spread)
        return (f"runs spread over several of the node's {n} cards (DDP; iisan.pipeline.budget.Budget.choice, as the rules ask): "
                f"{runs}; every other run takes one card")
    divisible = [j for j in jobs if j.split is not None]
    if n == 1:
        why = "a node of one card (cluster.node_gpus 1; --gpus N or cluster.node_gpus N spreads runs over up to N)"
    elif not divisible:
        why = ("no training run has its backbones in the loop (a cached run's step, about 2 ms, is one CUDA graph: "
               "more cards cannot pay for themselves)")
    else:
        ks = [k for k in CARD_CHOICES if 1 < k <= n]
        faster = [j for j in divisible if min(j.split.seconds(k) for k in ks) < j.split.seconds(1) * (1 - SAME_WALL)]
        longest = max(divisible, key=lambda j: (j.seconds, j.name))
        s = longest.split
        host_bound = all(j.split.host_s >= j.split.gpu_s for j in divisible)
        if host_bound:
            why = (f"the in-loop steps are bound by the host: {s.host_s:.2f} s a step whatever k (the longest run, {longest.name}: "
                   f"{s.step_s(1):.3f} s a step on one card, {s.step_s(2):.3f} s on two with the gradients' all-reduce; "
                   f"its kernels {s.gpu_s:.3f} s)")
        else:
            why = "the gradients' all-reduce outweighs what more cards take off the in-loop steps' kernels"
        if faster:  # not where the wall time is set (with host-bound steps, only their validation passes are shared out)
            why += (f"; the {len(faster)} runs more cards would end sooner{' (their validation passes shared out)' * host_bound} "
                    "are not where the wall time is set")
    return f"every run takes one card: {why}"


def render_videos(budget: Budget) -> str:
    """The videos' disk, per dataset (`Budget.videos`), or '' when the jobs need none."""
    rows = budget.videos()
    if not rows:
        return ""
    lo, hi = VIDEO_MB
    lines = [f"Videos the video captions are made from (rule fetch_videos, the kept items' videos; at {lo}-{hi} MB each, "
             "an assumed range, not measured):"]
    for r in rows:
        lines.append(f"  {r['dataset']}: {r['items']:,} videos, {r['gb'][0]:,.0f}-{r['gb'][1]:,.0f} GB in {r['folder']}")
    if len(rows) > 1:
        lines.append(f"  total: {sum(r['gb'][0] for r in rows):,.0f}-{sum(r['gb'][1] for r in rows):,.0f} GB")
    return "\n".join(lines)


def write_jobs(budget: Budget, path: Path) -> None:
    import csv

    from iisan.io import atomic_path

    with atomic_path(Path(path), ".csv") as tmp, open(tmp, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["kind", "output", "gpus", "gpu_hours", "card_hours", "peak_gib", "priority_min", "groups", "detail"])
        for j in sorted(budget.jobs.values(), key=lambda j: (KINDS.index(j.kind), j.name)):
            out.writerow([j.kind, j.name, j.gpus, f"{j.seconds / 3600:.4f}", f"{j.card_seconds / 3600:.4f}", f"{j.peak_gib:.2f}",
                          j.priority, " ".join(j.groups), j.detail])


FRAMES_MAX_THREADS = 8  # the most threads the frames job asks for (`frames_threads`)
FLOOR_MIN = 10  # the least minutes a job asks for (`frames_minutes`, the GPU rules' runtime)


# --- sizing the workflow's frames job ---------------------------------------------------------
def _frames_rate(rates: dict | None) -> dict:
    return (rates if rates is not None else load_rates())["frames"]


def _video_scale(config: dict, dataset: str, rate: dict) -> float:
    """The decoding work of one of `dataset`'s videos against the measured reference video of
    `rate`: 1, but for a generated MicroLens twin, whose videos are size x size pixels and at
    most max_frames long (`iisan.data.microlens_demo.VideoSpec`)."""
    source = (config.get("dataset_sources") or {}).get(dataset) or {}
    if "microlens_demo" not in source:
        return 1.0
    from iisan.data.microlens_demo import _spec

    video = _spec(source["microlens_demo"]).video
    ref = rate["video"]
    return min(1.0, video.size**2 * video.max_frames / (ref["width"] * ref["height"] * ref["fps"] * ref["seconds"]))


def frames_seconds(config: dict, dataset: str, threads: int = 1, rates: dict | None = None) -> float:
    """Estimated seconds of the frames job of `dataset` with nothing to reuse: items x (seconds
    per video / `threads` + seconds per item to write the archive), the item count from
    `dataset_stats` (MicroLens-100K's when it is not known yet), the per-video
    seconds measured on one thread (rates.yaml ``frames:``; scaled for a generated twin)."""
    rate = _frames_rate(rates)
    try:
        items = int(dataset_stats(config, dataset)["items"])
    except ValueError:
        items = int(MICROLENS_TABLE_I["items"])
        log.warning("dataset %r: item count not known yet; the frames job is sized for %d videos", dataset, items)
    video_s = float(rate["video_s"]) * _video_scale(config, dataset, rate)
    return items * (video_s / max(1, int(threads)) + float(rate.get("assemble_item_s", 0.0)))


def frames_threads(config: dict, dataset: str, rates: dict | None = None) -> int:
    """Threads of the frames job of `dataset`: one per hour of decoding on one thread
    (`frames_seconds`), at least 1, at most `FRAMES_MAX_THREADS`."""
    return min(FRAMES_MAX_THREADS, max(1, math.ceil(frames_seconds(config, dataset, 1, rates) / 3600)))


def frames_minutes(config: dict, dataset: str, threads: int | None = None, rates: dict | None = None) -> int:
    """Minutes the frames job of `dataset` asks for on `threads` threads (default
    `frames_threads`): `frames_seconds` x cluster.runtime_margin, at least `FLOOR_MIN`. Not
    capped: a job longer than a partition's limit resumes from its work folder on its next
    attempt (iisan.data.frames keeps its finished videos), so the caller caps it at cluster.max_runtime_min."""
    if threads is None:
        threads = frames_threads(config, dataset, rates)
    return asked_minutes(frames_seconds(config, dataset, threads, rates), config)


def asked_minutes(seconds: float, config: dict) -> int:
    """The minutes a job estimated at `seconds` asks for on its first attempt: x
    cluster.runtime_margin, at least `FLOOR_MIN`."""
    margin = float((config.get("cluster") or {}).get("runtime_margin", 1.5))
    return max(FLOOR_MIN, math.ceil(seconds * margin / 60))
