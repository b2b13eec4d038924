"""The training step made fast: where each speed setting of a step applies (speed only).

The plain step of a batch of item windows `ids` (B, S) is

    loss = model(ids, source.gather(ids.reshape(-1)))
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()

`build_step` returns that step, and the one Adam it steps (at the training config's learning
rates, `Recommender.param_groups`), with the config's arithmetic (its `precision`) and as fast
as its `Speed` settings (`iisan.config.Speed`) allow, computing the same numbers whatever they
are:

* precision (CUDA only; a CPU computes in fp32): bf16 or fp16 autocast around the forward,
  features included; fp16 scales the loss with a GradScaler (the authors'). Frozen backbones in
  the loop then hold their weights in the autocast dtype instead of casting them at every call.
* the Adam is fused on CUDA, and capturable where the step is a CUDA graph.
* `cuda_graphs`: the whole step (forward, backward, Adam; under fp16 the scaler's inf check and
  update too) captured once and replayed (`CudaGraphStep`). It needs features of fixed shapes:
  from memory (cache rows, ids) they are gathered inside the graph; frozen backbones in the loop
  run eagerly under no_grad before it and their states are copied in; trainable backbones keep
  the step eager.
* `compile`: the model's item and user encoders compiled for training (evaluation runs the plain
  ones: its varying shapes would recompile; the loss stays eager), and each transformer layer of
  backbones in the loop compiled in place (training and evaluation). A compile that fails runs
  eagerly instead (`eager_on_failure`, scoped to the step and evaluation).
* backbones in the loop on CUDA get the rows of a call (its real or distinct items) padded to a multiple of
  `BUCKET`, so they see a few shapes only.
* a run on several processes (iisan.training.distributed) steps through DDP, which sums the
  processes' gradients as the one-process step computes them: each process's loss is its rows'
  share of the batch's loss, scaled by the number of processes against DDP's average. Its
  step is not a CUDA graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util

import torch
from torch import nn

from iisan.config import Speed, TrainConfig
from iisan.encoders.finetune import compile_layers
from iisan.training import distributed
from iisan.training.features import BackboneFeatures, FeatureSource

__all__ = ["Precision", "FastStep", "CudaGraphStep", "build_step", "compile_for_training", "eager_on_failure",
           "graph_features", "on_device", "prepare_backbones", "BUCKET", "ENCODERS"]

# On CUDA the distinct items of a step are padded up to a multiple of this, so the backbones
# see a few shapes only (a new shape makes cuDNN attention and cuBLASLt plan again: twice the
# step time for BERT-base + ViT-base on an H100 without it)
BUCKET = 32
# the Recommender's submodules that `compile` compiles for training
ENCODERS = ("items", "user")


def on_device(speed: Speed, device: torch.device) -> Speed:
    """`speed` as far as `device` allows: the inductor backend compiles on CUDA with triton
    installed only (another backend, as the tests' eager, anywhere)."""
    inductor = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    if speed.compile and speed.compile_backend == "inductor" and not inductor:
        return dataclasses.replace(speed, compile=False)
    return speed


class Precision:
    """Mixed precision on CUDA: the autocast of training and of evaluation's encoders (a CPU
    computes in fp32 whatever the setting). fp16 trains with a GradScaler and evaluates in fp32
    (the authors'); bf16 evaluates its encoders in bf16 too. Ranking is fp32 either way."""

    def __init__(self, name: str, device: torch.device):
        self.device_type = device.type
        self.name = name if device.type == "cuda" else "fp32"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)
        self.eval_dtype = torch.bfloat16 if self.name == "bf16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None,
                              cache_enabled=False)

    def eval_autocast(self):
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.eval_dtype is not None, cache_enabled=False)


def eager_on_failure():
    """A context in which a torch.compile that fails runs the code eagerly instead (speed only,
    never the result): dynamo's `suppress_errors`, set only while the context is active."""
    import torch._dynamo

    return torch._dynamo.config.patch(suppress_errors=True)


def compile_for_training(module: nn.Module, backend="inductor", **options) -> nn.Module:
    """``torch.compile`` of a module for the training step (its calls fall back to eager inside
    `eager_on_failure`); the module's own state-dict keys are unchanged."""
    return torch.compile(module, backend=backend, **options)


def graph_features(source: FeatureSource, speed: Speed) -> str | None:
    """How a CUDA-graph step takes the source's features: "inside" (from memory, cache rows or
    ids: gathered in the graph), "before" (frozen backbones in the loop: computed eagerly under
    no_grad and copied into the graph) or None (trainable backbones: no graph).

    Trainable backbones are not captured even where the shapes are fixed (every item slot):
    capturing the step made transformers 5.17 build a full attention mask for ViT where it
    otherwise passes none (it treated a capture as tracing), so attention left the flash kernels
    (docs/benchmarks-history.md; transformers 5.25 skips the mask-free case even in a capture: not yet
    measured on a GPU). `graph_backbones` captures them anyway (an experiment)."""
    if not isinstance(source, BackboneFeatures) or speed.graph_backbones:
        return "inside"
    return "before" if source.finetune == "frozen" else None


def prepare_backbones(source: FeatureSource, speed: Speed, precision: Precision, device: torch.device) -> None:
    """Backbones in the loop, for speed: on CUDA the rows of a call (its real or distinct items)
    padded to a multiple of `BUCKET`; with `compile` each transformer layer compiled in place; under mixed
    precision frozen backbones hold their weights in the autocast dtype (trainable ones keep fp32
    master weights)."""
    if not isinstance(source, BackboneFeatures):
        return
    if device.type == "cuda":
        source.pad_to = BUCKET
    for tower in source.towers:
        if speed.compile:
            options = {"mode": speed.layer_mode} if speed.layer_mode else {}
            compile_layers(tower.backbone, backend=speed.compile_backend, **options)
        if precision.dtype is not None and source.finetune == "frozen" and not getattr(tower.backbone, "is_quantized", False):
            tower.backbone.to(precision.dtype)


@contextlib.contextmanager
def _swapped(model: nn.Module, modules: dict[str, nn.Module]):
    """`model`'s submodules replaced by `modules` (compiled wrappers sharing their parameters)
    while the context is active."""
    plain = {name: getattr(model, name) for name in modules}
    for name, m in modules.items():
        setattr(model, name, m)
    try:
        yield
    finally:
        for name, m in plain.items():
            setattr(model, name, m)


def data_parallel(model: nn.Module, device: torch.device, source: FeatureSource) -> nn.Module:
    """`model` wrapped in DDP for a run on several processes: the trainable tensors start from
    process 0's and their gradients are averaged at each backward; frozen tensors and buffers
    (identical everywhere: loaded from the same files) are neither broadcast nor reduced. With
    backbones in the loop a process may hold no item of a batch's last rows (they are padding),
    and its backbones then take no part in its loss."""
    from torch.nn.parallel import DistributedDataParallel

    fixed = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, fixed)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=isinstance(source, BackboneFeatures))


class CudaGraphStep:
    """A whole training step (forward, backward, Adam) replayed as one CUDA graph.

    `step(ids, feats)` is the eager step; `features(ids)`, when given, computes the features
    outside the graph (frozen backbones in the loop) and they are copied into it. The first
    `WARMUP` calls run eagerly on a side stream, the next one captures the step on static
    buffers, and every call from then on copies its inputs in and replays."""

    WARMUP = 3

    def __init__(self, step, features, device: torch.device):
        self.step, self.features, self.device = step, features, device
        self.graph, self.warm = None, 0
        self.ids = self.feats = self.loss = None  # static buffers of the captured step

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        feats = self.features(ids) if self.features is not None else None
        if self.graph is None:
            if self.warm < self.WARMUP:
                return self._warm_up(ids, feats)
            self._capture(ids, feats)
        self.ids.copy_(ids)
        if feats is not None:
            for buf, f in zip(self.feats, feats):
                buf.copy_(f)
        self.graph.replay()
        return self.loss.clone()

    def _warm_up(self, ids, feats) -> torch.Tensor:
        self.warm += 1
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            loss = self.step(ids, feats)
        torch.cuda.current_stream(self.device).wait_stream(s)
        return loss

    def _capture(self, ids, feats) -> None:
        self.ids = ids.clone()
        self.feats = None if feats is None else [f.clone() for f in feats]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self.step(self.ids, self.feats)


class FastStep:
    """`build_step`'s step: `step(ids)` trains on one batch of windows (B, S) and returns its loss.

    `optimiser` (the model's one Adam) and `scaler` (None unless fp16) are what a checkpoint
    saves; `graphs` says whether the step is a CUDA graph (then every batch must have the same
    shape); `precision` gives the autocast of training, and `evaluation()` the context
    evaluation's encoders run in."""

    def __init__(self, model: nn.Module, source: FeatureSource, cfg: TrainConfig, device: torch.device):
        self.model, self.source, self.device = model, source, device
        self.speed = speed = on_device(cfg, device)
        self.precision = Precision(cfg.precision, device)
        placement = graph_features(source, speed)
        self.processes = distributed.world()
        self.graphs = device.type == "cuda" and speed.cuda_graphs and placement is not None and self.processes == 1
        self.optimiser = torch.optim.Adam(model.param_groups(cfg), fused=device.type == "cuda", capturable=self.graphs)
        # the loss's function; compiled encoders swapped in for training
        self.forward = data_parallel(model, device, source) if self.processes > 1 else model
        self.encoders = {}
        if speed.compile and speed.compile_forward:
            self.forward = compile_for_training(self.forward, speed.compile_backend)
        elif speed.compile:
            self.encoders = {name: compile_for_training(model.get_submodule(name), speed.compile_backend) for name in ENCODERS}
        prepare_backbones(source, speed, self.precision, device)
        # fp16 scales the loss (the authors' GradScaler); with the fused Adam its inf check and
        # update are tensor operations, so they are captured in the CUDA graph with the step
        self.scaler = torch.amp.GradScaler(device.type) if self.precision.name == "fp16" else None
        # graph trees of compiled backbone layers (a layer mode with CUDA graphs) need each step marked
        self.mark_steps = speed.compile and speed.layer_mode is not None and "cudagraphs" not in speed.layer_mode
        self.run = self._step
        if self.graphs:
            self.run = CudaGraphStep(self._step, self._features if placement == "before" else None, device)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.run(ids)

    def _compiling(self):
        return eager_on_failure() if self.speed.compile else contextlib.nullcontext()

    def _features(self, ids: torch.Tensor):
        """Features of the windows `ids` (B, S), computed under autocast."""
        with self.precision.autocast(), self._compiling():
            return self.source.gather(ids.reshape(-1))  # [(B*S, K, d)] (ids for ID-based models)

    def _forward(self, ids: torch.Tensor, feats) -> torch.Tensor:
        with _swapped(self.model, self.encoders):
            return self.forward(ids, feats)

    def _step(self, ids: torch.Tensor, feats=None) -> torch.Tensor:
        """The step on windows `ids`; `feats`: their features when computed before the step (a
        CUDA graph's frozen backbones)."""
        if self.mark_steps:
            torch.compiler.cudagraph_mark_step_begin()
        with self.precision.autocast(), self._compiling():
            loss = self._forward(ids, self._features(ids) if feats is None else feats)
        self.optimiser.zero_grad(set_to_none=True)  # no zeroing kernels, no accumulation adds: backward writes each gradient
        scaled = loss * self.processes if self.processes > 1 else loss  # DDP averages: the sum of the shares' gradients
        if self.scaler is None:
            scaled.backward()
            self.optimiser.step()
        else:
            self.scaler.scale(scaled).backward()
            self.scaler.step(self.optimiser)
            self.scaler.update()
        return loss.detach()

    @contextlib.contextmanager
    def evaluation(self):
        """What evaluation's encoders run under: bf16 autocast under bf16 precision (else none),
        and compiled backbone layers falling back to eager if their compile fails."""
        with self.precision.eval_autocast(), self._compiling():
            yield


def build_step(model: nn.Module, source: FeatureSource, cfg: TrainConfig, device: torch.device) -> FastStep:
    """The training step of `model` over `source`'s features at the training config `cfg`
    (module docstring)."""
    return FastStep(model, source, cfg, device)
