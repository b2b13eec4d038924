"""Fetching the Hugging Face hub models a config needs before any GPU job runs, and their disk.

Rules ``fetch_backbone`` and ``fetch_captioner`` (local rules: they run on the host that runs
Snakemake, so compute nodes need no internet) call `fetch_model` for every registry entry whose
``source`` is a hub id (`is_hub_id`): `huggingface_hub.snapshot_download` at the entry's
``revision`` (a branch, tag or commit; ``main`` when unset) into the hub cache (config key
``model_cache``), then every file of the snapshot is hard-linked (copied across filesystems)
into the model's folder, ``resources/backbones/<name>`` or ``resources/captioners/<name>``, which
the GPU jobs load with ``local_files_only`` and ``HF_HUB_OFFLINE=1``. The token for gated
models (Llama, Gemma, Mistral, Mixtral) is huggingface_hub's own: ``HF_TOKEN`` or
``hf auth login``. Only the PyTorch weights are fetched: TensorFlow, Flax, ONNX, GGUF and Meta's
``original/`` checkpoints are left out, and ``.bin`` weights when the snapshot has safetensors.

`disk_gb` estimates a model's download and `disk_report` the disk of every model and cache a
config's jobs need (`iisan plan`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from iisan.encoders import families
from iisan.encoders.backbones import is_hub_id

log = logging.getLogger(__name__)

# files no PyTorch load reads: other frameworks' weights, Meta's original checkpoints, GGUF
IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.gguf", "*.mlmodel", "*.mlpackage/*",
          "coreml/*", "onnx/*", "openvino/*", "original/*", "flax_model*", "tf_model*"]
# PyTorch pickles, left out when the snapshot has the same weights as safetensors
PICKLED = ["*.bin", "*.pt", "*.pth"]
RECORD = ".fetched.json"  # in the model's folder: repo, revision, commit (dot files stay out of weights fingerprints)


class ModelFetchError(RuntimeError):
    """A model that cannot be fetched; the message names it, its page and what to do."""


def hub_names(registry: dict) -> list[str]:
    """The names of a registry's entries (backbones or captioners) whose source is a hub id."""
    return [name for name, entry in registry.items() if is_hub_id(str(entry.get("source", "")))]


def ignore_patterns(files: list[str] | None) -> list[str]:
    """What `fetch_model` leaves out of a snapshot whose files are `files` (None: not known)."""
    if files is not None and any(f.endswith(".safetensors") for f in files):
        return IGNORE + PICKLED
    return list(IGNORE)


def _repo_files(repo_id: str, revision: str) -> list[str] | None:
    """The snapshot's file names from the hub; None when the hub cannot be reached (offline)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().list_repo_files(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except Exception as err:  # offline, no connection: the cached snapshot decides
        log.info("cannot list %s@%s on the hub (%s); using the cached snapshot", repo_id, revision, err)
        return None


def _link_tree(snapshot: Path, files: list[str], dest: Path) -> tuple[int, int]:
    """Hard-link (across filesystems: copy) `files` of `snapshot` into `dest`; (bytes, copied bytes)."""
    total = copied = 0
    for rel in files:
        src = Path(os.path.realpath(snapshot / rel))  # the hub cache's blob behind the snapshot's link
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        size = src.stat().st_size
        try:
            os.link(src, out)
        except OSError:
            shutil.copyfile(src, out)
            copied += size
        total += size
    return total, copied


def fetch_model(repo_id: str, dest: Path, *, revision: str | None = None, cache_dir: str | None = None, what: str = "model") -> dict:
    """Download hub model `repo_id` at `revision` (``main`` when None) into the hub cache
    `cache_dir` (None: huggingface_hub's own) and link its files into folder `dest`, replacing
    it whole. `what` names the model in errors (``backbone llama3-8b``). A gated, missing or
    private model, an unknown revision, or a model neither cached nor reachable stops with
    `ModelFetchError`. Returns the record written to ``dest/.fetched.json``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    revision = revision or "main"
    dest = Path(dest)
    page = f"https://huggingface.co/{repo_id}"
    label = f"{what} ({repo_id} at revision {revision})"
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                          ignore_patterns=ignore_patterns(_repo_files(repo_id, revision))))
    except GatedRepoError as err:
        raise ModelFetchError(
            f"{label} is gated: accept its licence at {page} with your Hugging Face account, then give this run a token "
            f"with access (export HF_TOKEN=... or `hf auth login`) ({err})") from err
    except RevisionNotFoundError as err:
        raise ModelFetchError(f"{label}: the model at {page} has no revision {revision!r}; set the entry's revision to one of "
                              f"its branches, tags or commits ({err})") from err
    except RepositoryNotFoundError as err:
        raise ModelFetchError(f"{label}: no model at {page}, or a private one your token cannot read (HF_TOKEN) ({err})") from err
    except LocalEntryNotFoundError as err:
        raise ModelFetchError(f"{label}: not in the hub cache ({cache_dir or 'HF_HUB_CACHE'}) and the hub cannot be reached; "
                              f"fetch it on a host with internet, or place the model's files in {dest} ({err})") from err
    names = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    files = list(filter_repo_objects(names, ignore_patterns=ignore_patterns(names)))
    if "config.json" not in files:
        raise ModelFetchError(f"{label}: the snapshot {snapshot} has no config.json, so transformers cannot load it")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total, copied = _link_tree(snapshot, files, tmp)
    record = {"repo_id": repo_id, "revision": revision, "commit": snapshot.name, "files": len(files), "bytes": total}
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log.info("%s: commit %s, %d files, %.1f GB in %s (%s)", label, snapshot.name, len(files), total / 1e9, dest,
             f"{copied / 1e9:.1f} GB copied: the hub cache is on another filesystem" if copied else "hard links into the hub cache")
    return record


# --- disk -------------------------------------------------------------------------------------
def disk_gb(entry: dict) -> float:
    """GB a hub model's fetched files take: GPTQ checkpoints at their packed size, others at
    their family's bytes per published parameter (iisan.encoders.families: encoders (BERT, MPNet, ViT) in
    float32, decoder LLMs in 16 bits), captioners (no ``family``) in 16 bits, as published;
    bitsandbytes quantises at load time, so those are fetched in 16 bits too."""
    from iisan.pipeline.budget import QUANTIZED_BYTES, params_b

    if "family" not in entry:  # a captioner
        return 2 * float(entry.get("params_b", 8))
    if entry.get("quantization") == "gptq":
        return params_b(entry) * QUANTIZED_BYTES["gptq"]
    return params_b(entry) * families.get(entry["family"]).weight_bytes


def _wildcards(template: str, path: str) -> dict | None:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    m = re.fullmatch(pattern, path)
    return m.groupdict() if m else None


def disk_report(budget) -> str:
    """The disk of every hub model and every hidden-state cache (full and pruned) the jobs of
    `budget` (iisan.pipeline.budget.Budget, built) need, per model: a fixed-width table."""
    from iisan.config import backbone_entry
    from iisan.encoders.backbones import BackboneSpec
    from iisan.pipeline import plan
    from iisan.pipeline.budget import dataset_size
    from iisan.training.layerdrop import scheme_layers

    config = budget.config
    models: dict[str, dict] = {}  # name -> {entry, kind, caches: {folder: GB}}

    def need(name: str, entry: dict, kind: str) -> dict:
        return models.setdefault(name, {"entry": entry, "kind": kind, "caches": {}})

    def cache_gb(folder: str) -> float:
        w = _wildcards(plan.PRUNED_DIR, folder) or _wildcards(plan.CACHE_DIR, folder)
        entry = backbone_entry(config, w["backbone"])
        spec = BackboneSpec.from_config(w["backbone"], entry)
        states = (len(scheme_layers(w["tscheme"], spec.layers, config["include_h0"], spec.output_layer))
                  if "tscheme" in w else spec.output_layer + 1)
        width = 2 if spec.cache_dtype((config.get("cache") or {}).get("dtype", "auto")) == "float16" else 4
        return (dataset_size(config, w["dataset"])[1] + 1) * states * spec.hidden * width / 1e9

    for job in budget.jobs.values():
        w = job.wildcards
        if job.kind == "caption":
            name = config["captions"][w["source"]]
            need(name, config["captioners"][name], "captioner")
            continue
        if job.kind == "cache":
            folder = plan.cache_dir(w["dataset"], w["field"], w["backbone"])
            need(w["backbone"], backbone_entry(config, w["backbone"]), "backbone")["caches"][folder] = 0
            continue
        if w["towers"] == "id":
            continue
        folders = plan.run_caches(config, w["dataset"], w["towers"], w["method"], w["scheme"], w["cache"])
        for t, tower in enumerate(plan.parse_towers(config, w["towers"])):
            m = need(tower.backbone, backbone_entry(config, tower.backbone), "backbone")
            if folders:
                m["caches"][folders[t]] = 0
    rows = []
    for name, m in sorted(models.items(), key=lambda kv: (kv[1]["kind"], kv[0])):
        source = str(m["entry"].get("source", ""))
        fetched = is_hub_id(source)
        caches = {f: cache_gb(f) for f in m["caches"]}
        rows.append((name, source, disk_gb(m["entry"]) if fetched else None, len(caches), sum(caches.values())))
    w = max([20, *(len(r[0]) + 2 for r in rows)])
    s = max([20, *(len(r[1]) + 2 for r in rows)])
    fetched_gb = sum(r[2] or 0 for r in rows)
    cached_gb = sum(r[4] for r in rows)
    cache_dir = config.get("model_cache") or "the hub cache (HF_HUB_CACHE)"
    lines = [f"Disk (estimates): hub models fetched into {cache_dir} and linked into resources/ (no second copy on one "
             "filesystem), hidden-state caches in resources/cache",
             f"{'model':<{w}}{'source':<{s}}{'fetched GB':>11}{'caches':>8}{'cache GB':>10}"]
    for name, source, gb, n, cgb in rows:
        lines.append(f"{name:<{w}}{source:<{s}}{'-' if gb is None else f'{gb:.1f}':>11}{n:>8}{cgb:>10.1f}")
    lines.append(f"{'total':<{w}}{'':<{s}}{fetched_gb:>11.1f}{sum(r[3] for r in rows):>8}{cached_gb:>10.1f}")
    unpinned = [r[0] for r in rows if r[2] is not None and not models[r[0]]["entry"].get("revision")]
    if unpinned:
        lines.append(f"{len(unpinned)} of the fetched models have no revision in the registry and are fetched at main (its latest "
                     "commit on the day); pin one with `revision: <commit>` for a run you can repeat.")
    return "\n".join(lines)
