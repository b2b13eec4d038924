"""One experiment: dataset x towers (field, backbone) x method x LayerDrop scheme x seed."""

from __future__ import annotations

import logging
from pathlib import Path

from .backbones import BackboneSpec, resolve_source
from .cache import load_cache, read_manifest
from .data.sequences import load_sequences
from .features import CachedFeatures, IdFeatures, Tower, build_backbone_features
from .io import read_json, write_json
from .layerdrop import scheme_layers, tower_schemes
from .model import ModelConfig
from .train import Trainer, TrainConfig, config_hash, set_seed

log = logging.getLogger(__name__)


# method name -> (ModelConfig.method, heads, backbone fine-tuning)
METHODS = {
    "iisan": ("iisan", "vs", "frozen"),
    "iisan-va": ("iisan", "va", "frozen"),
    "no-gate": ("no-gate", None, "frozen"),
    "no-inter": ("no-inter", None, "frozen"),
    "no-intra": ("no-intra", None, "frozen"),
    "frozen": ("frozen", None, "frozen"),
    # embedded fine-tuning baselines (Table III): last-layer state through a linear head
    "fft": ("frozen", None, "fft"),
    "adapter": ("frozen", None, "adapter"),
    "lora": ("frozen", None, "lora"),
    "bitfit": ("frozen", None, "bitfit"),
    # ID-based recommenders
    "sasrec-id": ("sasrec-id", None, None),
    "gru4rec": ("gru4rec", None, None),
}
# methods whose backbones train: they read titles and images, never a cache
UNCACHED_ONLY = {m for m, (_, _, ft) in METHODS.items() if ft not in ("frozen", None)}
ID_METHODS = {m for m, (_, _, ft) in METHODS.items() if ft is None}
LAST_STATE = {m for m, (mm, _, _) in METHODS.items() if mm == "frozen"}  # read h[L] only


def check_method(method: str, cache: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {sorted(METHODS)})")
    if method in UNCACHED_ONLY and cache != "none":
        raise ValueError(f"method {method!r} fine-tunes its backbones, so it runs uncached (cache 'none'), not {cache!r}")
    if method in ID_METHODS and cache != "none":
        raise ValueError(f"method {method!r} is ID-based and reads no backbone states (cache 'none'), not {cache!r}")


def tower_layers(experiment: dict, tower: int, num_layers: int) -> list[int]:
    if experiment["method"] in LAST_STATE:
        return scheme_layers("last", num_layers)
    schemes = tower_schemes(experiment["scheme"], len(experiment["towers"]))
    return scheme_layers(schemes[tower], num_layers, include_h0=experiment.get("include_h0", True))


def _model_config(experiment: dict) -> ModelConfig:
    method, heads, _ = METHODS[experiment["method"]]
    model_kw = dict(experiment.get("model", {}))
    if heads:
        model_kw["heads"] = heads
    return ModelConfig(method=method, **model_kw)


def _cached_source(experiment, data, cache_dirs):
    towers = experiment["towers"]
    if len(cache_dirs) != len(towers):
        raise ValueError(f"{len(towers)} towers but {len(cache_dirs)} caches")
    full = experiment.get("cache", "dropped") == "full"
    caches, manifests, layers, index = [], [], [], []
    for t, (tower, cdir) in enumerate(zip(towers, cache_dirs)):
        m = read_manifest(cdir)
        want = tower_layers(experiment, t, tower.get("layers", m["num_layers"]))
        # full cache: keep every stored state in memory and select per step; dropped: only `want`
        load = m["stored_layers"] if full else want
        if full and any(l not in load for l in want):
            raise ValueError(f"{cdir}: the full cache lacks layers {want}")
        arr, m = load_cache(
            cdir, backbone=tower["backbone"], layers=load, item_order_hash=data.item_order_hash,
            pooling=tower.get("pooling"), field=tower["field"], hidden=tower.get("hidden"), num_layers=tower.get("layers"),
            dtype=experiment.get("cache_dtype"), source=tower.get("source"), family=tower.get("family"),
        )
        caches.append(arr)
        manifests.append(m)
        layers.append(want)
        index.append([load.index(l) for l in want] if full else None)
    info = [
        {"path": str(c), "backbone": m["backbone"], "stored_layers": m["stored_layers"], "bytes": m.get("bytes"),
         "hidden": m["hidden"], "num_layers": m["num_layers"]}
        for c, m in zip(cache_dirs, manifests)
    ]
    return CachedFeatures(caches, index), layers, info


def _uncached_source(experiment, dataset_dir, backbones, images, device):
    """Backbones in the loop: `backbones[t]` = {"spec": registry entry, "path": what
    from_pretrained loads} for tower t."""
    towers = experiment["towers"]
    if backbones is None or len(backbones) != len(towers):
        raise ValueError(f"an uncached run needs one backbone per tower ({len(towers)}), got {0 if backbones is None else len(backbones)}")
    _, _, finetune = METHODS[experiment["method"]]
    specs, layers = [], []
    for t, (tower, b) in enumerate(zip(towers, backbones)):
        spec = BackboneSpec.from_config(tower["backbone"], b["spec"])
        want = tower_layers(experiment, t, spec.layers)
        # a stand-in's folder as given; hub ids and package:<module> sources resolved here
        path = b["path"] if spec.source == "demo" else resolve_source(spec)
        specs.append(Tower(spec=spec, path=path, field=tower["field"], layers=want))
        layers.append(want)
    ft = experiment.get("finetune", {})
    source = build_backbone_features(
        specs, Path(dataset_dir) / "items.parquet", finetune, images_archive=Path(images) if images else None,
        round_to=experiment.get("cache_dtype", "float16"), device=device,
        adapter_bottleneck=ft.get("adapter_bottleneck", 64), lora_rank=ft.get("lora_rank", 8), lora_alpha=ft.get("lora_alpha", 8),
        item_slots=experiment.get("train", {}).get("item_slots", "all"),
    )
    return source, layers


def make_trainer(experiment: dict, dataset_dir: Path, cache_dirs: list[Path], device: str | None = None,
                 speed: dict | None = None, backbones: list[dict] | None = None, images: str | None = None):
    """(Trainer, layers, cache info) for one experiment; the feature source follows the
    experiment's method and `cache` (dropped | full | none = backbones in the loop)."""
    import torch

    method, cache = experiment["method"], experiment.get("cache", "dropped")
    check_method(method, cache)
    data = load_sequences(dataset_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info: list[dict] = []
    train_cfg = TrainConfig(**experiment.get("train", {}), **(speed or {}))
    set_seed(train_cfg.seed)  # adapters and LoRA matrices are initialised while the source is built
    if method in ID_METHODS:
        source, layers = IdFeatures(data.n_items), []
    elif cache == "none":
        source, layers = _uncached_source(experiment, dataset_dir, backbones, images, dev)
    else:
        source, layers, info = _cached_source(experiment, data, cache_dirs)
    log.info("experiment %s: layers %s", experiment, layers)
    trainer = Trainer(data, source, _model_config(experiment), train_cfg, device=str(dev), run_hash=config_hash(experiment))
    return trainer, layers, info


def run_experiment(
    experiment: dict, dataset_dir: Path, cache_dirs: list[Path], out: Path, device: str | None = None, speed: dict | None = None,
    backbones: list[dict] | None = None, images: str | None = None, keep_checkpoint: bool = False,
) -> dict:
    """Train, evaluate and write `out` (metrics.json). `experiment` keys: towers (list of
    {field, backbone, pooling}), method, scheme, cache (dropped | full | none), include_h0,
    model (ModelConfig fields), train (TrainConfig fields). `speed` holds TrainConfig fields that
    change speed, not results (cuda_graphs, eval_batch); they are kept out of the experiment so
    that changing them reruns nothing. Uncached runs (cache none) take `backbones` (one
    {spec, path} per tower) and the dataset's image archive.
    Training checkpoints every epoch to `checkpoint.pt` beside `out` and resumes from it when
    restarted (a killed run continues where it stopped); the checkpoint is deleted once `out` is
    written unless `keep_checkpoint`."""
    trainer, layers, info = make_trainer(experiment, dataset_dir, cache_dirs, device, speed, backbones, images)
    checkpoint = Path(out).parent / "checkpoint.pt"
    result = trainer.fit(checkpoint=checkpoint)
    result.update(
        {
            "experiment": experiment,
            "layers": layers,
            "caches": info,
            "cache_bytes": sum(c.get("bytes") or 0 for c in info),
            "cache": experiment.get("cache", "dropped"),
            "config_hash": config_hash(experiment),
            "dataset": str(dataset_dir),
        }
    )
    write_json(out, result)
    if not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)
    return result


def profile_experiment(experiment: dict, dataset_dir: Path, cache_dirs: list[Path], out: Path, batch_size: int, steps: int = 10,
                       device: str | None = None, speed: dict | None = None, backbones: list[dict] | None = None,
                       images: str | None = None) -> dict:
    """Peak memory and time per step of one experiment at `batch_size` (Fig. 5's sweep)."""
    exp = dict(experiment, train=dict(experiment.get("train", {}), batch_size=batch_size))
    trainer, layers, info = make_trainer(exp, dataset_dir, cache_dirs, device, speed, backbones, images)
    result = trainer.profile(steps=steps)
    result.update({"experiment": experiment, "layers": layers, "cache": exp.get("cache", "dropped"),
                   "cache_bytes": sum(c.get("bytes") or 0 for c in info)})
    write_json(out, result)
    return result
