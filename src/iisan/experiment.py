"""One experiment: dataset x towers (field, backbone) x method x LayerDrop scheme x seed."""

from __future__ import annotations

import logging
from pathlib import Path

from .cache import load_cache
from .data.sequences import load_sequences
from .io import read_json, write_json
from .layerdrop import scheme_layers, tower_schemes
from .model import ModelConfig
from .train import Trainer, TrainConfig, config_hash

log = logging.getLogger(__name__)


# method name -> (ModelConfig.method, heads)
METHODS = {
    "iisan": ("iisan", "vs"),
    "iisan-va": ("iisan", "va"),
    "no-gate": ("no-gate", None),
    "no-inter": ("no-inter", None),
    "no-intra": ("no-intra", None),
    "frozen": ("frozen", None),
}


def tower_layers(experiment: dict, tower: int, num_layers: int) -> list[int]:
    if experiment["method"] == "frozen":
        return scheme_layers("last", num_layers)
    schemes = tower_schemes(experiment["scheme"], len(experiment["towers"]))
    return scheme_layers(schemes[tower], num_layers, include_h0=experiment.get("include_h0", True))


def run_experiment(
    experiment: dict, dataset_dir: Path, cache_dirs: list[Path], out: Path, device: str | None = None, speed: dict | None = None
) -> dict:
    """Train, evaluate and write `out` (metrics.json). `experiment` keys: towers (list of
    {field, backbone, pooling}), method, scheme, include_h0, model (ModelConfig fields),
    train (TrainConfig fields). `speed` holds TrainConfig fields that change speed, not results
    (cuda_graphs, eval_batch); they are kept out of the experiment so that changing them reruns
    nothing."""
    towers = experiment["towers"]
    if len(cache_dirs) != len(towers):
        raise ValueError(f"{len(towers)} towers but {len(cache_dirs)} caches")
    data = load_sequences(dataset_dir)
    full = experiment.get("cache", "dropped") == "full"
    caches, manifests, layers, index = [], [], [], []
    for t, (tower, cdir) in enumerate(zip(towers, cache_dirs)):
        m = read_json(Path(cdir) / "manifest.json")
        want = tower_layers(experiment, t, m["num_layers"])
        # full cache: keep every stored state in memory and select per step; dropped: only `want`
        load = m["stored_layers"] if full else want
        if full and any(l not in load for l in want):
            raise ValueError(f"{cdir}: the full cache lacks layers {want}")
        arr, m = load_cache(
            cdir, backbone=tower["backbone"], layers=load, item_order_hash=data.item_order_hash,
            pooling=tower.get("pooling"), field=tower["field"],
        )
        caches.append(arr)
        manifests.append(m)
        layers.append(want)
        index.append([load.index(l) for l in want] if full else None)
    if experiment["method"] not in METHODS:
        raise ValueError(f"unknown method {experiment['method']!r} (known: {sorted(METHODS)})")
    method, heads = METHODS[experiment["method"]]
    model_kw = dict(experiment.get("model", {}))
    if heads:
        model_kw["heads"] = heads
    model_cfg = ModelConfig(method=method, **model_kw)
    train_cfg = TrainConfig(**experiment.get("train", {}), **(speed or {}))
    log.info("experiment %s: layers %s", experiment, layers)
    trainer = Trainer(data, caches, model_cfg, train_cfg, device=device, layer_index=index)
    result = trainer.fit()
    result.update(
        {
            "experiment": experiment,
            "layers": layers,
            "caches": [
                {"path": str(c), "backbone": m["backbone"], "stored_layers": m["stored_layers"], "bytes": m.get("bytes"),
                 "hidden": m["hidden"], "num_layers": m["num_layers"]}
                for c, m in zip(cache_dirs, manifests)
            ],
            "cache": "full" if full else "dropped",
            "config_hash": config_hash(experiment),
            "dataset": str(dataset_dir),
        }
    )
    write_json(out, result)
    return result
