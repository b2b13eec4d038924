"""Table III / Fig. 5 efficiency on a GPU: FFT, Adapter, LoRA, BitFit, IISAN uncached and IISAN
cached with BERT-base and ViT-base architectures at Scientific size.

Random weights and synthetic data with the real shapes (speed and memory do not depend on the
values): 12,076 users, 20,314 items, 30-token titles, 224x224 images, batch 32, bf16 autocast,
the library's training step (`Trainer.profile`). Each method runs in its own process so peak
memory (`torch.cuda.max_memory_allocated`) is its own. Time per epoch = mean step time over
`--steps` timed steps (after 3 warm-up steps) x 378 steps; IISAN cached is timed over a whole
epoch. One validation pass (every item through the backbones for the uncached methods) is timed
too, for the "including validation" column.

    PYTHONPATH=src:benchmarks python benchmarks/baselines_speed.py --all [--steps 40] [--item-slots all]

`--profile N` profiles N more steps (`gpu_profile.timeline`): GPU time by kernel family, the
GPU's idle time, and the host's time blocked in synchronising calls and its launches.
`--host-slots` (an experiment, with `--item-slots real`): the slots holding an item are found on
the host from the batch's windows before they go to the GPU, so the step does not wait for the
GPU to count them (the library's `BackboneFeatures._real` calls `torch.nonzero` on the GPU ids,
which blocks the host until the previous step's queued work has run).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import time

import numpy as np
import torch

METHODS = ["fft", "adapter", "lora", "bitfit", "iisan-uncached", "iisan"]


SMOKE = False  # --smoke: tiny widths on the CPU, to check the script before spending GPU time


def backbones(finetune: str, smoke: bool = False):
    """BERT-base and ViT-base with random weights (tiny widths with `smoke`) prepared for
    `finetune`, and the image size."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    from iisan.encoders.finetune import prepare_backbone

    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64) if smoke else {}
    size = 32 if smoke else 224
    bert = prepare_backbone(BertModel(BertConfig(**small), add_pooling_layer=False), "bert", finetune)
    vit = prepare_backbone(ViTModel(ViTConfig(image_size=size, **small), add_pooling_layer=False), "vit", finetune)
    return bert, vit, size


def item_inputs(n: int, size: int, g: torch.Generator):
    """Synthetic inputs of n items: 30-token titles of 8-30 real tokens, uint8 images."""
    lengths = torch.randint(8, 31, (n,), generator=g)
    ids = torch.randint(1000, 30000, (n, 30), generator=g)
    mask = (torch.arange(30).unsqueeze(0) < lengths.unsqueeze(1)).long()
    text = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return text, pixels


def build(method: str, data, device, item_slots: str = "distinct"):
    from iisan.encoders.backbones import BackboneSpec
    from iisan.training.features import BackboneFeatures, BackboneTower, CachedFeatures, Tower
    from iisan.training.layerdrop import scheme_layers

    n = data.n_items + 1
    layers = scheme_layers("blocks6", 12)
    if method == "iisan":
        rng = np.random.default_rng(1)
        d = 32 if SMOKE else 768
        caches = [rng.standard_normal((n, len(layers), d), dtype=np.float32).astype(np.float16) for _ in range(2)]
        return CachedFeatures(caches), "iisan"
    finetune = "frozen" if method == "iisan-uncached" else method
    g = torch.Generator().manual_seed(0)
    text_spec = BackboneSpec.from_config("bert-base", {"source": "random", "family": "bert", "modality": "text", "layers": 12, "hidden": 768})
    image_spec = BackboneSpec.from_config("vit-base", {"source": "random", "family": "vit", "modality": "image", "layers": 12, "hidden": 768})
    want = layers if finetune == "frozen" else [12]
    text_spec.hidden = image_spec.hidden = 32 if SMOKE else 768
    bert, vit, size = backbones(finetune, SMOKE)
    text_inputs, pixels = item_inputs(n, size, g)
    towers = [
        BackboneTower(Tower(text_spec, "", "title", want, "float16"), bert, text_inputs),
        BackboneTower(Tower(image_spec, "", "image", want, "float16"), vit, {"pixels": pixels}, [0.5] * 3, [0.5] * 3),
    ]
    model_method = "iisan" if finetune == "frozen" else method
    return BackboneFeatures(towers, finetune, item_slots), model_method


def step_flops(trainer, n: int = 3) -> float:
    """Mean FLOPs (matmuls, attention; torch's FlopCounterMode) of one training step's forward
    and backward over n batches, counted eagerly before any timing (no weight changes)."""
    from torch.utils.flop_counter import FlopCounterMode

    batches, total = trainer.batches(), 0
    for _ in range(n):
        ids = next(batches)
        with FlopCounterMode(display=False) as fc:
            with trainer.step.precision.autocast():
                loss = trainer.model(ids, trainer.source.gather(ids.reshape(-1)))
            loss.backward()
        trainer.step.optimiser.zero_grad(set_to_none=False)
        total += fc.get_total_flops()
    return total / n


def host_slots(trainer) -> None:
    """Experiment (`--host-slots`, item_slots real): the trainer's batches made on the host, each
    with the positions of its slots that hold an item (`nonzero` on the host copy), both copied
    to the GPU without blocking; the source's `_real` takes those positions instead of counting
    on the GPU, so nothing in the step waits for the device. Same rows, same order as the
    library's path (the same shuffling generator, the same windows)."""
    from iisan.training.features import BackboneFeatures

    src = trainer.source
    if not isinstance(src, BackboneFeatures) or src.item_slots != "real":
        raise SystemExit("--host-slots needs backbones in the loop and --item-slots real")
    if trainer.step.graphs:
        raise SystemExit("--host-slots: not with a CUDA-graph step")
    train_cpu, B, dev = trainer.data.train.cpu(), trainer.cfg.batch_size, trainer.device
    pending = {}
    library_real = src._real

    def batches():
        perm = torch.randperm(train_cpu.shape[0], generator=trainer.gen)
        for start in range(0, perm.shape[0], B):
            ids = train_cpu[perm[start : start + B]]
            where = torch.nonzero(ids.reshape(-1) != 0).squeeze(1)
            pin = (lambda t: t.pin_memory()) if dev.type == "cuda" else (lambda t: t)
            on_dev = pin(ids).to(dev, non_blocking=True)
            pending.clear()
            pending[on_dev.data_ptr()] = pin(where).to(dev, non_blocking=True)
            yield on_dev

    def real(ids):
        where = pending.get(ids.data_ptr())
        if where is None:  # not a batch of these (the library's path)
            return library_real(ids)
        out = [torch.zeros(ids.shape[0], len(t.layers), t.spec.hidden, device=ids.device) for t in src.towers]
        if where.numel():  # a host-side count: no sync
            out = [o.index_put((where,), f.to(o.dtype)) for o, f in zip(out, src._padded_states(ids[where]))]
        return out

    trainer.batches = batches
    src._real = real


def slot_graphs(trainer) -> None:
    """Experiment (`--slot-graphs`, item_slots real, trainable backbones): the whole step (forward,
    backward, Adam) captured as one CUDA graph per bucket of the number of slots holding an item
    (a multiple of BUCKET) and replayed, so the host launches one graph a step instead of ~2,000
    kernels. The host finds the slots (one sync a step) and pads their positions to the bucket
    with a trash slot (its rows are computed and dropped). The same model and loss; with dropout
    the random numbers fall on other rows, as between item_slots real and all."""
    from iisan.training.fast_step import BUCKET, CudaGraphStep
    from iisan.training.features import BackboneFeatures

    src, step, dev = trainer.source, trainer.step, trainer.device
    if not isinstance(src, BackboneFeatures) or src.item_slots != "real" or src.finetune == "frozen" or dev.type != "cuda":
        raise SystemExit("--slot-graphs needs trainable backbones in the loop, --item-slots real and CUDA")
    step.optimiser = torch.optim.Adam(trainer.model.param_groups(trainer.cfg), fused=True, capturable=True)

    def real_at(ids, where):
        """The features of the flat slots `ids` (M,) whose items sit at `where` (P,), padded with M."""
        m = ids.shape[0]
        feats = src._states(torch.cat([ids, ids.new_ones(1)])[where])
        return [torch.zeros(m + 1, len(t.layers), t.spec.hidden, device=ids.device).index_put((where,), f.float())[:m]
                for t, f in zip(src.towers, feats)]

    def eager(ids, where):
        with step.precision.autocast(), step._compiling():
            loss = step._forward(ids, real_at(ids.reshape(-1), where[0]))
        step.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        step.optimiser.step()
        return loss.detach()

    graphs, slots = {}, {}

    def run(ids):
        flat = ids.reshape(-1)
        where = torch.nonzero(flat != 0).squeeze(1)
        n = where.shape[0]  # the one sync of the step
        bucket = max(BUCKET, -(-n // BUCKET) * BUCKET)
        slots["where"] = torch.cat([where, where.new_full((bucket - n,), flat.shape[0])])
        key = (tuple(ids.shape), bucket)  # an epoch's last batch has fewer rows
        if key not in graphs:
            graphs[key] = CudaGraphStep(eager, lambda _ids: [slots["where"]], dev)
        return graphs[key](ids)

    step.run = run
    trainer.graph_buckets = graphs


def run_one(method: str, steps: int, compile_: bool = False, item_slots: str = "distinct", validation: bool = True,
            graphs: bool = True, profile: int = 0, graphs_in_loop: bool = False, layer_mode: str = "default",
            host_slots_: bool = False, slot_graphs_: bool = False) -> dict:
    from caption_speed import matmul_tflops

    from iisan.data.synthetic import synthetic
    from iisan.training.model import ModelConfig
    from iisan.training.train import TrainConfig, Trainer, start_run

    device = torch.device("cpu" if SMOKE else "cuda")
    data = synthetic(users=300, items=500, interactions=2000) if SMOKE else synthetic()
    source, model_method = build(method, data, device, item_slots)
    cfg = TrainConfig(batch_size=32, max_epochs=1, patience=1, precision="bf16", cuda_graphs=graphs, compile=compile_,
                      item_slots=item_slots)
    # experiments: trainable backbones inside the step's CUDA graph (fixed shapes: every item
    # slot); another torch.compile mode for each backbone layer (reduce-overhead: CUDA graph trees
    # around each layer's forward and backward; max-autotune-no-cudagraphs: Triton matmul
    # templates with fused epilogues where faster)
    cfg = dataclasses.replace(cfg, graph_backbones=graphs_in_loop, layer_mode=None if layer_mode == "default" else layer_mode)
    trainer = Trainer(data, source, ModelConfig(method=model_method), cfg, start_run(cfg.seed, device))
    if host_slots_:
        host_slots(trainer)
    if slot_graphs_:
        slot_graphs(trainer)
    steps_per_epoch = -(-data.n_users // cfg.batch_size)
    with torch.compiler.set_stance("force_eager"):  # count the eager ops
        flops = step_flops(trainer)
    peak_tflops = matmul_tflops(device, torch.bfloat16, n=256 if SMOKE else 8192)
    timed = steps_per_epoch if method == "iisan" else steps
    prof = trainer.profile(steps=timed, warmup=40 if slot_graphs_ else 4)  # every bucket captured first
    eval_s = None
    if validation:
        trainer.sync()
        t0 = time.perf_counter()
        trainer.evaluate("valid")
        trainer.sync()
        eval_s = round(time.perf_counter() - t0, 2)
    achieved = flops / prof["seconds_per_step"] / 1e12
    kernel_profile = None
    if profile:
        from gpu_profile import timeline

        batches = trainer.batches()
        kernel_profile = timeline(lambda: [trainer.train_step(next(batches)) for _ in range(profile)], device, profile, top=15)
    return {
        "method": method,
        "compile": compile_,
        "layer_mode": layer_mode,
        "host_slots": host_slots_,
        "slot_graphs": sorted(b for _, b in getattr(trainer, "graph_buckets", {})) if slot_graphs_ else None,
        "cuda_graph_step": trainer.step.graphs,
        "item_slots": item_slots,
        "device": prof["device"],
        "torch": torch.__version__,
        "batch": cfg.batch_size,
        "steps_timed": timed,
        "steps_per_epoch": steps_per_epoch,
        "seconds_per_step": round(prof["seconds_per_step"], 5),
        "step_tflop": round(flops / 1e12, 3),
        "achieved_tflops": round(achieved, 1),
        "matmul_tflops": round(peak_tflops, 1),
        "fraction_of_matmul_rate": round(achieved / peak_tflops, 3),
        "epoch_train_s": round(prof["time_per_epoch_train_s"], 2),
        "validation_s": eval_s,
        "epoch_with_validation_s": None if eval_s is None else round(prof["time_per_epoch_train_s"] + eval_s, 2),
        "peak_memory_gib": round(prof["peak_memory_mb"] / 1024, 2),
        "peak_memory_kind": prof["peak_memory_kind"],
        "trainable_params": prof["trainable_params"],
        "total_params": prof["total_params"],
        "profile": kernel_profile,
        "dynamo": _dynamo_counters() if compile_ else None,
    }


def _dynamo_counters() -> dict:
    """What torch.compile did in this process: graphs compiled, graph breaks and their reasons,
    recompiles, and compiles that failed and ran eagerly (speed.compile falls back silently)."""
    from torch._dynamo.utils import counters

    return {k: dict(v.most_common(8)) for k, v in counters.items() if v and k in ("stats", "graph_break", "recompiles",
                                                                               "unimplemented", "frames", "inductor")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=METHODS)
    ap.add_argument("--all", action="store_true", help="every method, each in its own process")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile as the workflow's speed.compile does: the item and user encoders, each backbone layer")
    ap.add_argument("--methods", default=",".join(METHODS), help="with --all: which methods")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="after timing, profile N steps (GPU time by kernel family)")
    ap.add_argument("--no-validation", action="store_true", help="skip the timed validation pass")
    ap.add_argument("--no-graphs", action="store_true", help="no CUDA graph step even where shapes are fixed")
    ap.add_argument("--graphs-in-loop", action="store_true",
                    help="experimental: capture trainable backbones in the step's CUDA graph (needs --item-slots all)")
    ap.add_argument("--layer-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                    help="experimental, with --compile: torch.compile mode for each backbone layer")
    ap.add_argument("--host-slots", action="store_true",
                    help="experiment, with --item-slots real: the slots holding an item found on the host (no sync in the step)")
    ap.add_argument("--slot-graphs", action="store_true",
                    help="experiment, with --item-slots real: the whole step one CUDA graph per bucket of slots holding an item")
    ap.add_argument("--item-slots", choices=["all", "real", "distinct"], default="distinct",
                    help="backbones in the loop run every item slot (the authors' code), every slot holding an item, "
                         "or each distinct item once (train.item_slots)")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    if args.all:
        rows = []
        for m in args.methods.split(","):
            flags = [f for f, on in (("--smoke", SMOKE), ("--compile", args.compile), ("--no-validation", args.no_validation),
                                     ("--no-graphs", args.no_graphs), ("--graphs-in-loop", args.graphs_in_loop),
                                     ("--host-slots", args.host_slots), ("--slot-graphs", args.slot_graphs)) if on]
            flags += ["--item-slots", args.item_slots, "--profile", str(args.profile), "--layer-mode", args.layer_mode]
            out = subprocess.run([sys.executable, __file__, "--method", m, "--steps", str(args.steps)] + flags, capture_output=True, text=True)
            if out.returncode != 0:
                print(json.dumps({"method": m, "error": out.stderr[-1500:]}), flush=True)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        by = {r["method"]: r for r in rows}
        if "fft" in by and "iisan" in by:
            fft, cached = by["fft"], by["iisan"]
            summary = {"cached_speedup_vs_fft": round(fft["epoch_train_s"] / cached["epoch_train_s"], 1),
                       "cached_memory_reduction_vs_fft": round(fft["peak_memory_gib"] / cached["peak_memory_gib"], 1)}
            if "iisan-uncached" in by:
                summary["uncached_speedup_vs_fft"] = round(fft["epoch_train_s"] / by["iisan-uncached"]["epoch_train_s"], 2)
            print(json.dumps(summary), flush=True)
        return
    print(json.dumps(run_one(args.method, args.steps, args.compile, args.item_slots, not args.no_validation,
                             not args.no_graphs, args.profile, args.graphs_in_loop, args.layer_mode, args.host_slots,
                             args.slot_graphs)), flush=True)
    gc.collect()


if __name__ == "__main__":
    main()
