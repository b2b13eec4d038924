"""What a job asks its scheduler for (Snakemake's resources): cards, minutes, host memory and
threads, from its budget estimate (iisan.pipeline.budget) and the config's `cluster` section.

The rule files' resource functions (workflow/rules/common.smk) pass the wildcards, the attempt
and what only Snakemake knows (the least cards a GPU job takes, the run's card limit, whether an
earlier attempt was stopped by its time limit: the memory `factor`) and compute nothing
themselves. A retry asks for `attempt` times the minutes (at most `cluster.max_runtime_min`) and
`factor` times the host memory.
"""

from __future__ import annotations

from iisan.config import backbone_entry
from iisan.encoders.backbones import output_layer
from iisan.errors import NamedError
from iisan.pipeline import plan
from iisan.pipeline.budget import asked_minutes, captioner_host_gb, dataset_size, usable_gib, weight_gb

__all__ = ["CardError", "cards", "runtime_minutes", "capped_minutes", "train_host_mb", "cache_host_mb",
           "caption_host_mb", "cache_threads"]


class CardError(NamedError):
    """A job needs more cards, or more memory a card, than the run may give it (the message names
    the job, both numbers and the config key to change)."""


def cards(job, config: dict, least: int, limit: int | None, node_gpus: int) -> int:
    """The cards a GPU job asks for: none where `least` is 0 (a machine without CUDA) or its
    estimate takes none (a stand-in captioner), else its estimate's (`job.gpus`: the cards its
    peak needs, or the k cards of one node a training run is spread over), at least `least`.
    A training or profile job whose per-card peak does not fit `cluster.gpu_gib`, or a job asking
    more than `limit` (a local run's cards or `--resources gpu=N`; None: no limit), is refused."""
    if least == 0:
        return 0
    if job.kind in ("train", "profile") and job.peak_gib > usable_gib(config):
        raise CardError(
            f"{job.name}: estimated peak {job.peak_gib:.1f} GiB a card does not fit one GPU of cluster.gpu_gib = "
            f"{config['cluster']['gpu_gib']} GiB on {max(job.gpus, 1)} card(s) (each holds the whole model; "
            f"cluster.node_gpus = {node_gpus} is the most a run is spread over); set cluster.gpu_gib to your cards' "
            f"memory or leave this run out")
    need = 0 if job.gpus == 0 else max(least, job.gpus)
    if limit is not None and need > limit and job.split is not None and job.gpus > 1:
        raise CardError(
            f"{job.name}: spread over {need} GPUs (cluster.node_gpus = {node_gpus}, as `iisan plan` chose), but this "
            f"run may use {limit} (--resources gpu={limit}, or the cards of this machine); set cluster.node_gpus to "
            f"the cards one job may hold")
    if limit is not None and need > limit:
        raise CardError(
            f"{job.name}: needs {need} GPUs of {config['cluster']['gpu_gib']} GiB (estimated peak "
            f"{job.peak_gib:.1f} GiB), but this run may use {limit} (--resources gpu={limit}, or the cards of this "
            f"machine); raise the limit, run it on a machine with {need} cards, or set cluster.gpu_gib to larger cards")
    return need


def capped_minutes(minutes: int, config: dict, attempt: int) -> int:
    """`minutes` times the attempt, at most cluster.max_runtime_min (a longer job resumes where
    it stopped on its next attempt)."""
    limit = config["cluster"]["max_runtime_min"]
    return min(minutes * attempt, limit) if limit else minutes * attempt


def runtime_minutes(seconds: float, config: dict, attempt: int) -> int:
    """The minutes a GPU job of estimated `seconds` asks for: budget.asked_minutes, then
    `capped_minutes`."""
    return capped_minutes(asked_minutes(seconds, config), config, attempt)


def train_host_mb(config: dict, dataset: str, towers: str, cache: str, factor: int = 1) -> int:
    """Host memory of a train or profile job: the caches it loads (the dataset's items, from the
    budget's `dataset_size`, x states x width x 4 bytes, float32 in memory on a CPU, for every
    tower; every stored state for a full cache, at most 25 of them otherwise) twice over, plus
    4 GB."""
    items = dataset_size(config, dataset)[1]
    total = 0
    for t in plan.parse_towers(config, towers):
        stored = output_layer(t.spec["family"], t.spec["layers"]) + 1
        states = stored if cache == "full" else min(stored, 25)
        total += items * states * t.spec["hidden"] * 4
    return int((4096 + 2 * total / 2**20) * factor)


def cache_host_mb(config: dict, backbone: str, factor: int = 1) -> int:
    """Host memory of a cache job: its backbone's weights (budget.weight_gb) x 1.2, plus 8 GB."""
    return int((8 + 1.2 * weight_gb(backbone_entry(config, backbone))) * 1024 * factor)


def caption_host_mb(captioner: dict, factor: int = 1) -> int:
    """Host memory of a caption job (budget.captioner_host_gb of its captioner's entry)."""
    return int(captioner_host_gb(captioner) * 1024 * factor)


def cache_threads(config: dict, backbone: str) -> int:
    """Threads of a cache job: stand-ins are tiny, one thread each lets two run side by side on a
    small CPU; 4 for the others."""
    return 1 if backbone_entry(config, backbone)["source"] == "demo" else 4
