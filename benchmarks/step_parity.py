"""Two versions of the training code side by side: the same small runs through each, their
per-epoch losses and metrics compared exactly, and the cached epoch time of each.

Each version runs in its own process with its own `src` folder first on the path; both read the
same data (iisan.data.synthetic's tiny data and caches, tiny random BERT and ViT backbones from
benchmarks/baselines_speed.py) and only the library's public entry points (`Trainer(...)`,
`Trainer.fit`), so any two versions can be compared. The runs: cached IISAN-VS and IISAN-VA, a
full cache with a layer selection, fp16 and fp32 precision, with and without CUDA graphs and
compile, SASRec and GRU4Rec (IDs), IISAN uncached (frozen backbones in the loop, every slot and
distinct items) and LoRA and BitFit (trainable backbones); on CUDA also a Scientific-sized
cached IISAN-VS (12,076 users, 20,314 items, 2 x 7 x 768 fp16 caches, the workflow's speed
settings) whose steady epoch time is printed for both.

    # this tree against another version's src folder (e.g. `git archive COMMIT src | tar -x -C /tmp/old`)
    PYTHONPATH=src:benchmarks python benchmarks/step_parity.py --reference /tmp/old/src
    # record this tree's runs to a file, or compare this tree with such a file
    PYTHONPATH=src:benchmarks python benchmarks/step_parity.py --record runs.json
    PYTHONPATH=src:benchmarks python benchmarks/step_parity.py --compare runs.json

Exit status: 0 when every run's losses, best epoch and metrics are equal (==); 1 when some
differ and the reference, run again, reproduced itself (the code changed a result); 2 when they
differ only in runs that the reference does not reproduce either (nondeterministic kernels;
compiled runs on a GPU are not bit-reproducible from one process to the next: compare the loss
gaps printed for this tree and for the reference against itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (source, model settings, train settings); source: cached | full-cache | ids | frozen | frozen-distinct | <finetune>
TINY = {
    "iisan": ("cached", {}, {}),
    "iisan-eager": ("cached", {}, {"cuda_graphs": False, "compile": False}),
    "iisan-compiled": ("cached", {}, {"compile": True}),
    "iisan-fp16": ("cached", {}, {"precision": "fp16", "compile": True}),
    "iisan-fp32": ("cached", {}, {"precision": "fp32"}),
    "iisan-va": ("cached", {"method": "iisan-va", "heads": "va"}, {"compile": True}),
    "iisan-full-cache": ("full-cache", {}, {"compile": True}),
    "sasrec-id": ("ids", {"method": "sasrec-id"}, {}),
    "gru4rec": ("ids", {"method": "gru4rec"}, {}),
    "iisan-uncached": ("frozen", {}, {}),
    "iisan-uncached-distinct-compiled": ("frozen-distinct", {}, {"compile": True, "item_slots": "distinct"}),
    "lora": ("lora", {"method": "lora"}, {}),
    "bitfit-compiled": ("bitfit", {"method": "bitfit"}, {"compile": True, "item_slots": "distinct"}),
}
TINY_MODEL = {"embed_dim": 16, "bottleneck": 8}
TINY_TRAIN = {"batch_size": 16, "max_epochs": 4, "patience": 10, "lr_main": 5e-3, "lr_san": 5e-3, "lr_text_f": 5e-3,
              "lr_image_f": 5e-3, "eval_batch": 32}


def data_module():
    """This tree's iisan/data/synthetic.py, loaded by its path: whichever library version runs,
    both train on the same data."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("parity_synthetic", REPO / "src" / "iisan" / "data" / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lib(path: str):
    """The library module `path` in this tree's layout (e.g. "training.features"), or where a
    version before the subpackages kept it (iisan.features), whichever version runs."""
    import importlib

    try:
        return importlib.import_module(f"iisan.{path}")
    except ModuleNotFoundError as e:
        if not f"iisan.{path}".startswith(e.name or "-"):  # a dependency missing, not the module
            raise
        return importlib.import_module(f"iisan.{path.rpartition('.')[2]}")


def tiny_backbones(finetune: str):
    """`baselines_speed.backbones(finetune, smoke=True)` through either library layout: tiny
    BERT and ViT with random weights prepared for `finetune`, and the image size."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    prepare_backbone = lib("encoders.finetune").prepare_backbone
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    bert = prepare_backbone(BertModel(BertConfig(**small), add_pooling_layer=False), "bert", finetune)
    vit = prepare_backbone(ViTModel(ViTConfig(image_size=32, **small), add_pooling_layer=False), "vit", finetune)
    return bert, vit, 32


def make_trainer(data, caches, layer_index, model_cfg, train_cfg):
    """The library's Trainer of a run, through whichever API the running version has: a
    FeatureSource and the device of `start_run` (which seeds), or before that (463fa35) the
    cached arrays with their layer index (the Trainer seeded itself). Seeded after the source is
    built in both."""
    train = lib("training.train")
    if not hasattr(train, "start_run"):
        return train.Trainer(data, caches, model_cfg, train_cfg, layer_index=layer_index)
    features = lib("training.features")
    source = caches if isinstance(caches, features.FeatureSource) else features.CachedFeatures(caches, layer_index)
    return train.Trainer(data, source, model_cfg, train_cfg, train.start_run(train_cfg.seed))


def tiny_source(kind: str, n_items: int):
    """(source, layer_index) of a tiny run; random weights seeded, so both versions build the same."""
    import torch

    IdFeatures = lib("training.features").IdFeatures
    tiny_caches = data_module().tiny_caches

    if kind == "cached":
        return tiny_caches(), None
    if kind == "full-cache":
        return tiny_caches(), [[0, 2], [1, 2]]
    if kind == "ids":
        return IdFeatures(n_items), None
    BackboneSpec = lib("encoders.backbones").BackboneSpec
    features = lib("training.features")
    BackboneFeatures, BackboneTower, Tower = features.BackboneFeatures, features.BackboneTower, features.Tower

    from baselines_speed import item_inputs

    finetune = "frozen" if kind.startswith("frozen") else kind
    torch.manual_seed(0)
    bert, vit, size = tiny_backbones(finetune)
    text, pixels = item_inputs(n_items + 1, size, torch.Generator().manual_seed(0))
    text_spec = BackboneSpec.from_config("bert-tiny", {"source": "random", "family": "bert", "modality": "text", "layers": 12, "hidden": 32})
    image_spec = BackboneSpec.from_config("vit-tiny", {"source": "random", "family": "vit", "modality": "image", "layers": 12, "hidden": 32})
    want = [0, 2, 4, 6, 8, 10, 12] if finetune == "frozen" else [12]
    towers = [BackboneTower(Tower(text_spec, "", "title", want, "float16"), bert, text),
              BackboneTower(Tower(image_spec, "", "image", want, "float16"), vit, {"pixels": pixels}, [0.5] * 3, [0.5] * 3)]
    return BackboneFeatures(towers, finetune, "distinct" if kind.endswith("distinct") else "all"), None


def scientific_run():
    """(data, caches, model settings, train settings) of the timed Scientific-sized cached run."""
    import numpy as np

    data = data_module().synthetic()
    rng = np.random.default_rng(1)
    caches = [rng.standard_normal((data.n_items + 1, 7, 768), dtype=np.float32).astype(np.float16) for _ in range(2)]
    return data, caches, {}, {"max_epochs": 3, "patience": 3, "cuda_graphs": True, "compile": True}


def child(out: Path, names: list[str]) -> None:
    """Every run of `names` through the `iisan` found first on the path; the results to `out`."""
    import time

    import torch

    import iisan

    ModelConfig, TrainConfig = lib("training.model").ModelConfig, lib("training.train").TrainConfig
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)  # one reduction order on the CPU
    runs = {}
    for name in names:
        t0 = time.perf_counter()
        if name == "scientific":
            data, caches, model, train = scientific_run()
            layer_index = None
        else:
            kind, model, train = TINY[name]
            data = data_module().tiny_data()
            model, train = {**TINY_MODEL, **model}, {**TINY_TRAIN, **train}
            caches, layer_index = tiny_source(kind, data.n_items)
        trainer = make_trainer(data, caches, layer_index, ModelConfig(**model), TrainConfig(**train))
        result = trainer.fit(progress=False)
        h = result["history"]
        runs[name] = {"losses": [e["loss"] for e in h], "valid_hr": [e["valid_hr@10"] for e in h], "best_epoch": result["best_epoch"],
                      "valid": result["valid"], "test": result["test"], "train_seconds": [e["train_seconds"] for e in h],
                      "wall_seconds": time.perf_counter() - t0}
        del trainer
        print(f"  {name}: {runs[name]['losses']}", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    out.write_text(json.dumps({"library": iisan.__file__, "device": device, "torch": torch.__version__, "runs": runs}))


def run_version(src: Path, names: list[str]) -> dict:
    """`child` in a fresh process with `src` first on the path."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (src, REPO / "benchmarks", REPO / "tests")))
        print(f"running {src} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--child", str(out), "--runs", ",".join(names)], env=env, check=True)
        got = json.loads(out.read_text())
    if not Path(got["library"]).resolve().is_relative_to(Path(src).resolve()):
        raise SystemExit(f"the run of {src} imported iisan from {got['library']}")
    return got


def same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("losses", "valid_hr", "best_epoch", "valid", "test"))


def loss_gap(a: dict, b: dict) -> float:
    """The largest relative difference of two runs' per-epoch losses."""
    return max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a["losses"], b["losses"])), default=0.0)


def steady(seconds: list[float]) -> float:
    rest = sorted(seconds[1:] or seconds)
    return rest[len(rest) // 2]


def report(ref: dict, new: dict) -> list[str]:
    """Print both versions' runs; the names of the runs that differ."""
    print(f"reference: {ref['library']} ({ref['device']}, torch {ref['torch']})")
    print(f"this tree: {new['library']} ({new['device']}, torch {new['torch']})")
    differ = []
    for name, r in ref["runs"].items():
        n = new["runs"].get(name)
        if n is None:
            continue
        ok = same(r, n)
        differ += [] if ok else [name]
        print(f"\n{name}: {'equal' if ok else f'DIFFERENT (losses up to {loss_gap(r, n):.2e} apart)'}")
        for label, run in (("reference", r), ("this tree", n)):
            print(f"  {label:9} losses {run['losses']}")
            print(f"  {'':9} best epoch {run['best_epoch']} valid {run['valid']} test {run['test']}")
            print(f"  {'':9} train seconds per epoch {[round(s, 4) for s in run['train_seconds']]} (steady {steady(run['train_seconds']):.4f})")
    return differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, help="another version's src folder, run side by side with this tree's")
    ap.add_argument("--record", type=Path, help="write this tree's runs to this file")
    ap.add_argument("--compare", type=Path, help="compare this tree's runs with a file --record wrote")
    ap.add_argument("--runs", default=None, help="comma-separated run names (default: every tiny run, and on CUDA 'scientific')")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.runs.split(","))
        return
    import torch

    names = args.runs.split(",") if args.runs else list(TINY) + (["scientific"] if torch.cuda.is_available() else [])
    unknown = [n for n in names if n not in TINY and n != "scientific"]
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {unknown}; known: {', '.join(TINY)}, scientific")
    if not (args.reference or args.record or args.compare):
        ap.error("give --reference, --record or --compare")
    new = run_version(REPO / "src", names)
    if args.record:
        args.record.write_text(json.dumps(new, indent=1))
    ref = json.loads(args.compare.read_text()) if args.compare else run_version(args.reference, names) if args.reference else None
    if ref is None:
        return
    differ = report(ref, new)
    if not differ:
        print("\nevery run is equal")
        return
    print(f"\nDIFFERENT: {', '.join(differ)}")
    if not args.reference:
        sys.exit(1)
    again = run_version(args.reference, differ)
    for n in differ:
        print(f"{n}: the reference against itself: {'equal' if same(again['runs'][n], ref['runs'][n]) else 'different'}, "
              f"losses up to {loss_gap(again['runs'][n], ref['runs'][n]):.2e} apart (this tree: {loss_gap(new['runs'][n], ref['runs'][n]):.2e})")
    real = [n for n in differ if same(again["runs"][n], ref["runs"][n])]
    if real:
        print(f"the reference reproduces itself in {', '.join(real)}: the code changed their results")
        sys.exit(1)
    print("the reference does not reproduce itself in these runs either (nondeterministic kernels): inconclusive")
    sys.exit(2)


if __name__ == "__main__":
    main()
