"""Run one experiment (`iisan.config.Experiment`): load its feature source, train, evaluate, and
write metrics.json; or time a few steps of it (Fig. 5)."""

from __future__ import annotations

import logging
from pathlib import Path

from iisan.config import Experiment
from iisan.data.sequences import load_sequences
from iisan.encoders.backbones import resolve_source
from iisan.encoders.cache import load_cache
from iisan.encoders.cache_files import verify_cache
from iisan.io import write_json
from iisan.training import distributed
from iisan.training.features import CachedFeatures, IdFeatures, Tower, build_backbone_features
from iisan.training.train import Trainer, start_run

log = logging.getLogger(__name__)


def cached_source(exp: Experiment, data, cache_dirs: list[Path]):
    """(source, layers, cache info): the towers' caches, checked against the experiment."""
    towers = exp.towers
    if len(cache_dirs) != len(towers):
        raise ValueError(f"{len(towers)} towers but {len(cache_dirs)} caches")
    full = exp.cache == "full"
    caches, manifests, layers, index = [], [], [], []
    for t, (tower, cdir) in enumerate(zip(towers, cache_dirs)):
        spec = tower.backbone_spec()
        want = exp.tower_layers(t)
        # full cache: keep every stored state in memory and select per step; dropped: only `want`
        load = verify_cache(cdir, checksum=False)["stored_layers"] if full else want
        if full and any(layer not in load for layer in want):
            raise ValueError(f"{cdir}: the full cache lacks layers {want}")
        arr, m = load_cache(
            cdir, backbone=tower.backbone, layers=load, item_order_hash=data.item_order_hash, pooling=spec.pooling,
            field=tower.field, hidden=spec.hidden, num_layers=spec.layers, dtype=spec.cache_dtype(exp.cache_dtype), source=spec.source,
            family=spec.family, move_mismatched=True,
        )
        caches.append(arr)
        manifests.append(m)
        layers.append(want)
        index.append([load.index(layer) for layer in want] if full else None)
    info = [
        {"path": str(c), "backbone": m["backbone"], "stored_layers": m["stored_layers"], "bytes": m.get("bytes"),
         "hidden": m["hidden"], "num_layers": m["num_layers"]}
        for c, m in zip(cache_dirs, manifests)
    ]
    return CachedFeatures(caches, index), layers, info


def backbone_source(exp: Experiment, items: Path, standins: list | None, images, device, captions: dict | None = None):
    """(source, layers): the backbones in the loop over the item table `items`. `standins[t]` is
    the folder of tower t's stand-in (demo backbones; None or absent for the others, which load
    from their source); `captions[t]` the caption set tower t's caption field reads."""
    standins = list(standins or [])
    standins += [None] * (len(exp.towers) - len(standins))
    towers, layers = [], []
    for t, (tower, standin) in enumerate(zip(exp.towers, standins)):
        spec = tower.backbone_spec()
        want = exp.tower_layers(t)
        if spec.source == "demo" and not standin:
            raise ValueError(f"tower {t} ({tower.backbone}): an uncached run of a demo stand-in needs its folder")
        towers.append(Tower(spec=spec, path=resolve_source(spec, Path(standin) if standin else None), field=tower.field,
                            layers=want, store_dtype=spec.cache_dtype(exp.cache_dtype), captions=(captions or {}).get(t)))
        layers.append(want)
    source = build_backbone_features(
        towers, Path(items), exp.spec.finetune, images_archive=Path(images) if images else None,
        device=device, settings=exp.finetune, item_slots=exp.train.item_slots,
    )
    return source, layers


def make_trainer(exp: Experiment, dataset_dir: Path, cache_dirs: list[Path], device: str | None = None,
                 standins: list | None = None, images: str | None = None, items: Path | None = None,
                 captions: dict | None = None):
    """(Trainer, layers, cache info) for one experiment; the feature source follows its method
    and cache (dropped | full | none = backbones in the loop, over the item table `items`:
    by default the dataset's own, items.parquet beside its sequences; `captions` {tower: caption
    set} for its caption fields, by default beside it)."""
    import torch

    data = load_sequences(dataset_dir, exp.model.max_len)
    dev = start_run(exp.train.seed, device)
    info: list[dict] = []
    # the source's random initialisation (adapters, LoRA matrices) draws from a copy of the seeded
    # streams, so the model's starts from the seed too, whatever the source
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        if exp.spec.is_id:
            source, layers = IdFeatures(data.n_items), []
        elif exp.cache == "none":
            source, layers = backbone_source(exp, items or Path(dataset_dir) / "items.parquet", standins, images, dev, captions)
        else:
            source, layers, info = cached_source(exp, data, cache_dirs)
    log.info("experiment %s: layers %s", exp.to_dict(), layers)
    trainer = Trainer(data, source, exp.model, exp.train, dev, run_hash=exp.hash())
    return trainer, layers, info


def _cache_bytes(info: list[dict]) -> int:
    return sum(c.get("bytes") or 0 for c in info)


def run_experiment(exp: Experiment, dataset_dir: Path, cache_dirs: list[Path], out: Path, device: str | None = None,
                   standins: list | None = None, images: str | None = None, items: Path | None = None,
                   captions: dict | None = None, keep_checkpoint: bool = False, processes: int = 1) -> dict:
    """Train, evaluate and write `out` (metrics.json). Training checkpoints to `checkpoint.pt`
    beside `out` and resumes from it when restarted (a killed run continues where it stopped);
    the checkpoint is deleted once `out` is written unless `keep_checkpoint`. Its "gates" are
    the learned gate values of the best validation epoch's model (`Recommender.gate_values`,
    towers named by their item fields; {} for models without gates).

    `processes` > 1: the run spread over that many processes, one card each where there are
    cards (iisan.training.distributed; the same global batch, so the same run up to the order
    of floating-point sums); process 0 writes `out`."""
    if processes > 1 and not distributed.distributed():
        return distributed.launch(run_experiment, exp, dataset_dir, cache_dirs, out, device, standins, images, items,
                                  captions, keep_checkpoint, processes=processes)
    trainer, layers, info = make_trainer(exp, dataset_dir, cache_dirs, device, standins, images, items, captions)
    checkpoint = Path(out).parent / "checkpoint.pt"
    result = trainer.fit(checkpoint=checkpoint)
    # the model now holds the best validation epoch's weights, whose test metrics are reported
    result["gates"] = trainer.model.gate_values([t.field for t in exp.towers])
    result.update({"experiment": exp.to_dict(), "layers": layers, "caches": info, "cache_bytes": _cache_bytes(info),
                   "cache": exp.cache, "config_hash": exp.hash(), "dataset": str(dataset_dir)})
    if distributed.rank() == 0:
        write_json(out, result)
        if not keep_checkpoint:
            checkpoint.unlink(missing_ok=True)
    return result


def profile_experiment(exp: Experiment, dataset_dir: Path, cache_dirs: list[Path], out: Path, batch_size: int,
                       steps: int = 10, device: str | None = None, standins: list | None = None,
                       images: str | None = None, items: Path | None = None, captions: dict | None = None) -> dict:
    """Peak memory and time per step of one experiment at `batch_size` (Fig. 5's sweep)."""
    import dataclasses

    timed = dataclasses.replace(exp, train=dataclasses.replace(exp.train, batch_size=batch_size))
    trainer, layers, info = make_trainer(timed, dataset_dir, cache_dirs, device, standins, images, items, captions)
    result = trainer.profile(steps=steps)
    result.update({"experiment": exp.to_dict(), "layers": layers, "cache": exp.cache, "cache_bytes": _cache_bytes(info)})
    write_json(out, result)
    return result
