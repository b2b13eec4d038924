"""One experiment: dataset x towers (field, backbone) x method x LayerDrop scheme x seed."""

from __future__ import annotations

import logging
from pathlib import Path

from .cache import load_cache
from .data.sequences import load_sequences
from .io import read_json, write_json
from .layerdrop import scheme_layers
from .model import ModelConfig
from .train import Trainer, TrainConfig, config_hash

log = logging.getLogger(__name__)


def tower_layers(experiment: dict, num_layers: int) -> list[int]:
    scheme = "last" if experiment["method"] == "frozen" else experiment["scheme"]
    return scheme_layers(scheme, num_layers, include_h0=experiment.get("include_h0", True))


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
    caches, manifests, layers = [], [], []
    for tower, cdir in zip(towers, cache_dirs):
        m = read_json(Path(cdir) / "manifest.json")
        want = tower_layers(experiment, m["num_layers"])
        arr, m = load_cache(
            cdir, backbone=tower["backbone"], layers=want, item_order_hash=data.item_order_hash,
            pooling=tower.get("pooling"), field=tower["field"],
        )
        caches.append(arr)
        manifests.append(m)
        layers.append(want)
    model_cfg = ModelConfig(method=experiment["method"], **experiment.get("model", {}))
    train_cfg = TrainConfig(**experiment.get("train", {}), **(speed or {}))
    log.info("experiment %s: layers %s", experiment, layers)
    trainer = Trainer(data, caches, model_cfg, train_cfg, device=device)
    result = trainer.fit()
    result.update(
        {
            "experiment": experiment,
            "layers": layers,
            "caches": [{"path": str(c), "backbone": m["backbone"], "stored_layers": m["stored_layers"]} for c, m in zip(cache_dirs, manifests)],
            "config_hash": config_hash(experiment),
            "dataset": str(dataset_dir),
        }
    )
    write_json(out, result)
    return result
