"""Training and evaluation of a cached side-network recommender (docs/method.md §5-8)."""

from __future__ import annotations

import itertools
import logging
import math
import platform
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from iisan import __version__
from iisan.config import ModelConfig, TrainConfig, config_hash
from iisan.data.sequences import SequenceData
from iisan.io import DamagedFileError, atomic_path, read_or_set_aside
from iisan.training import distributed
from iisan.training.fast_step import build_step
from iisan.training.features import FeatureSource
from iisan.training.metrics import hr_ndcg, rank_of_target
from iisan.training.model import Recommender

__all__ = ["Trainer", "FitState", "ModelConfig", "TrainConfig", "MEASURED_FIELDS", "config_hash", "popularity_baseline",
           "start_run", "rng_states", "set_rng_states"]

log = logging.getLogger(__name__)


# fields of a fit result (and of its history's epochs) that measure time or memory: two runs of
# one experiment differ in these and nothing else
MEASURED_FIELDS = frozenset({"train_seconds", "epoch_seconds", "time_per_epoch_train_s",
                             "time_per_epoch_with_eval_s", "peak_memory_mb", "processes"})


@dataclass
class FitState:
    """What `fit` carries from one epoch to the next: a checkpoint restores it."""

    epoch: int = 0  # last finished epoch
    best: float = -1.0  # best validation HR@k so far
    best_epoch: int = -1
    best_state: dict | None = None  # the model's tensors at best_epoch (see Trainer._model_state)
    waited: int = 0  # epochs since the best one (early-stopping patience)
    history: list = field(default_factory=list)


def rng_states(gen: torch.Generator) -> dict:
    """Every random stream training draws from (numpy's as plain lists, so that the checkpoint
    loads with torch.load(weights_only=True))."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "trainer": gen.get_state(),
    }


def set_rng_states(states: dict, gen: torch.Generator) -> None:
    random.setstate(states["python"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    gen.set_state(states["trainer"])


def start_run(seed: int, device: str | torch.device | None = None) -> torch.device:
    """What a run does first, once, before anything draws a random number: seed every random
    stream (python, numpy, torch, CUDA) with `seed` and pick its device (`device`, else CUDA
    where there is one, else the CPU), which it returns. Each process of a run on several
    CUDA cards takes its own card (iisan.training.distributed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None and distributed.local_device() is not None:
        dev = distributed.local_device()
    return dev


class Trainer:
    """Trains a recommender: shuffled batches of item windows -> loss -> backward -> Adam step,
    an evaluation after every epoch, early stopping and checkpoints (`fit`).

    The step itself (`iisan.training.fast_step.build_step`) applies the training config's precision and
    speed settings (CUDA graph, compile) and owns the one Adam. The features of a batch come from a feature source
    (`iisan.training.features`): cache rows held in accelerator (or host) memory, backbones in the loop,
    or item ids.

    In a run on several processes (iisan.training.distributed) each process trains on its share
    of every batch's rows, evaluates a share of the items and users, and process 0 alone writes
    checkpoints; the losses, metrics and checkpoints are the run's, as on one process."""

    ITEM_CHUNK = 2048  # items per forward pass when embedding every item for evaluation

    def __init__(self, data: SequenceData, source: FeatureSource, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 device: str | torch.device, run_hash: str | None = None):
        """`source` gives the items' features: `CachedFeatures` (cached states; arrays of them
        wrap as `CachedFeatures(caches)`), `BackboneFeatures` (uncached runs) or `IdFeatures`
        (ID-based models).
        `device`: the run's, from `start_run`, whose seeded random streams initialise the model.
        `run_hash` names what the run computes (the experiment's config_hash); a checkpoint
        written under another one is not resumed. Default: a hash of the model config and the
        result-affecting train config."""
        self.device = torch.device(device)
        self.cfg = train_cfg
        self.processes = distributed.world()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.source = source.to(self.device)
        self.data = data.to(self.device)
        if self.source.n_rows != data.n_items + 1:
            raise ValueError(f"the item features have {self.source.n_rows} rows, the dataset {data.n_items} items + padding")
        self.model = Recommender(model_cfg, self.source.dims, self.source.layers, n_items=data.n_items,
                                 backbones=self.source.module, log_pop=self.data.log_pop).to(self.device)
        self.step = build_step(self.model, self.source, train_cfg, self.device)
        self.gen = torch.Generator(device="cpu").manual_seed(train_cfg.seed)  # the batches' shuffling
        if run_hash is None:
            run_hash = config_hash({"model": asdict(model_cfg), "train": train_cfg.result_settings()})
        self.fingerprint = {"config_hash": run_hash, "item_order_hash": data.item_order_hash, "version": __version__}

    def batches(self):
        """One epoch's shuffled batches of training windows (B, S). With a CUDA-graph step every
        batch has B rows: the last one is padded with all-padding users, which add no loss rows
        and only masked columns, so the step is unchanged. A process of several gets its rows of
        each batch (`distributed.shard_rows`)."""
        train = self.data.train
        B = self.cfg.batch_size
        perm = torch.randperm(train.shape[0], generator=self.gen).to(self.device)
        if self.step.graphs:  # the same batches gathered at once, (steps, B, S)
            ids = train[perm]
            yield from torch.cat([ids, ids.new_zeros(-ids.shape[0] % B, ids.shape[1])]).view(-1, B, ids.shape[1])
            return
        for start in range(0, perm.shape[0], B):
            yield distributed.shard_rows(train[perm[start : start + B]])

    def train_step(self, ids: torch.Tensor) -> torch.Tensor:
        """Train on one batch of windows `ids` (B, S): loss, backward, Adam step. Returns the loss
        (a process of several: its rows' share of the batch's loss)."""
        return self.step(ids)

    def train_on(self, batches) -> float:
        """Train on each batch of windows of `batches`; the mean batch loss."""
        self.model.train()
        total, steps = torch.zeros((), device=self.device), 0
        for ids in batches:
            total += self.train_step(ids)
            steps += 1
        return float(distributed.all_sum(total)) / max(steps, 1)

    def train_epoch(self) -> float:
        """One pass over the training windows; the mean batch loss."""
        return self.train_on(self.batches())

    @torch.no_grad()
    def item_table(self) -> torch.Tensor:
        """Embeddings of every item (row 0 = padding), (N+1, D); each process of several embeds
        its share of the items, and every process gets the whole table."""
        self.model.eval()
        chunk = min(self.ITEM_CHUNK, self.source.chunk_size)
        if self.processes == 1:
            return self.model.item_table(self.source, chunk, self.step.evaluation)
        start, end = distributed.share(self.source.n_rows)
        rows = self.model.item_table(self.source, chunk, self.step.evaluation, start, end)
        return distributed.gather_rows(rows, self.source.n_rows)

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> dict[str, float]:
        self.model.eval()
        inp = getattr(self.data, f"{split}_input")
        tgt = getattr(self.data, f"{split}_target")
        hist = getattr(self.data, f"{split}_history")
        table = self.item_table()
        first, last = distributed.share(inp.shape[0])  # a process of several ranks its share of the users
        hits, ndcgs = [], []
        for s in range(first, last, self.cfg.eval_batch):
            e = min(s + self.cfg.eval_batch, last)
            scores = self.model.score(inp[s:e], table, self.step.evaluation)  # (b, N+1)
            h, n = hr_ndcg(rank_of_target(scores, tgt[s:e], hist[s:e]), self.cfg.k)
            hits.append(h)
            ndcgs.append(n)
        k = self.cfg.k
        if self.processes == 1:
            return {f"hr@{k}": float(torch.cat(hits).mean()), f"ndcg@{k}": float(torch.cat(ndcgs).mean())}
        sums = [torch.cat(x).double().sum() if x else torch.zeros((), dtype=torch.float64, device=self.device) for x in (hits, ndcgs)]
        hr, ndcg = (distributed.all_sum(torch.stack(sums)) / inp.shape[0]).tolist()
        return {f"hr@{k}": hr, f"ndcg@{k}": ndcg}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def total_parameters(self) -> int:
        """Every parameter of the modules this run holds (cached runs hold no backbone)."""
        return sum(p.numel() for p in self.model.parameters())

    def _peak_memory(self) -> tuple[float, str, str]:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_memory_allocated",
                    torch.cuda.get_device_name(self.device))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return peak, "cpu_peak_rss", platform.processor() or platform.machine()

    def sync(self) -> None:
        """Wait for the accelerator's queued work (to time it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def profile(self, steps: int = 10, warmup: int = 4) -> dict:
        """Time `steps` training steps after `warmup` ones (with CUDA graphs the 4th step is the
        capture) and read the peak memory: the memory sweep and time estimate of Fig. 5 without
        a full epoch."""
        batches = (ids for _ in itertools.count() for ids in self.batches())  # epoch after epoch
        self.train_on(itertools.islice(batches, warmup))
        self.sync()
        t0 = time.perf_counter()
        self.train_on(itertools.islice(batches, steps))
        self.sync()
        per_step = (time.perf_counter() - t0) / steps
        steps_per_epoch = math.ceil(self.data.train.shape[0] / self.cfg.batch_size)
        peak, kind, name = self._peak_memory()
        return {
            "batch_size": self.cfg.batch_size,
            "steps_timed": steps,
            "seconds_per_step": per_step,
            "steps_per_epoch": steps_per_epoch,
            "time_per_epoch_train_s": per_step * steps_per_epoch,
            "time_source": f"{steps} steps x {steps_per_epoch} steps per epoch",
            "peak_memory_mb": peak,
            "peak_memory_kind": kind,
            "device": name,
            "device_type": self.device.type,
            "trainable_params": self.trainable_parameters(),
            "total_params": self.total_parameters(),
        }

    def _model_state(self) -> dict:
        """The model's tensors that training can change, on the CPU (the plain model's keys,
        whether or not training runs compiled); frozen parameters (backbones in the loop) are
        rebuilt from the source, not stored."""
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        return {n: v.detach().to("cpu", copy=True) for n, v in self.model.state_dict().items() if n not in frozen}

    def _load_model_state(self, state: dict) -> None:
        """Load a `_model_state`."""
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise KeyError(f"the saved model state has tensors this model lacks: {sorted(unexpected)[:5]}")
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        if set(missing) - frozen:
            raise KeyError(f"the saved model state lacks {sorted(set(missing) - frozen)[:5]}")

    def save_checkpoint(self, path: Path, state: FitState) -> None:
        """Everything needed to continue after `state.epoch` exactly as if never stopped,
        written atomically (a kill mid-write leaves the previous checkpoint). Every process of
        a run on several calls it: process 0 writes, with each process's random streams."""
        rng = rng_states(self.gen)
        if self.processes > 1:
            rng = distributed.all_objects(rng)
            if distributed.rank() != 0:
                return
        ckpt = {
            "fingerprint": self.fingerprint,
            "model": self._model_state(),
            "optimizer": self.step.optimiser.state_dict(),
            "scaler": None if self.step.scaler is None else self.step.scaler.state_dict(),
            "rng": rng,  # a list, one per process, for a run on several
            "fit": vars(state),  # not asdict: that would deep-copy best_state
        }
        with atomic_path(path, ".pt") as tmp:
            torch.save(ckpt, tmp)

    def load_checkpoint(self, path: Path) -> FitState:
        """Restore a checkpoint of this run (same fingerprint) and return its fit state; a
        missing checkpoint, or one of another run, gives a fresh start, and so does a damaged one
        (moved aside, with a warning naming it). In a run on several processes process 0 reads
        (and sets aside) first, the others after it."""
        if self.processes == 1:
            return self._load_checkpoint(Path(path))
        if distributed.rank() == 0:
            state = self._load_checkpoint(Path(path))
        torch.distributed.barrier()
        if distributed.rank() != 0:
            state = self._load_checkpoint(Path(path))
        return state

    def _load_checkpoint(self, path: Path) -> FitState:
        if not path.exists():
            return FitState()
        try:
            ckpt = read_or_set_aside(path, lambda p: torch.load(p, map_location="cpu", weights_only=True),
                                     "this run starts from scratch (only time is lost)")
        except DamagedFileError as err:
            log.warning("%s", err)
            return FitState()
        if ckpt.get("fingerprint") != self.fingerprint:
            log.warning("discarding checkpoint %s: written by another run (fingerprint %s, this run %s); starting fresh",
                        path, ckpt.get("fingerprint"), self.fingerprint)
            return FitState()
        self._load_model_state(ckpt["model"])
        self.step.optimiser.load_state_dict(ckpt["optimizer"])
        if self.step.scaler is not None and ckpt["scaler"] is not None:
            self.step.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        if isinstance(rng, list):  # written by a run on several processes
            if len(rng) != self.processes:
                log.warning("checkpoint %s was written by %d processes, this run has %d: process %d takes the random "
                            "streams of process %d", path, len(rng), self.processes, distributed.rank(),
                            distributed.rank() % len(rng))
            rng = rng[distributed.rank() % len(rng)]
        set_rng_states(rng, self.gen)
        state = FitState(**ckpt["fit"])
        log.info("resuming from checkpoint %s after epoch %d (best epoch %d, waited %d)",
                 path, state.epoch, state.best_epoch, state.waited)
        return state

    def _epoch(self, epoch: int, state: FitState) -> None:
        """Train one epoch, validate, and update `state` (history, best model, patience)."""
        k = self.cfg.k
        t0 = time.perf_counter()
        loss = self.train_epoch()
        self.sync()
        t1 = time.perf_counter()
        val = self.evaluate("valid")
        t2 = time.perf_counter()
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at epoch {epoch}")
        state.history.append(
            {"epoch": epoch, "loss": loss, f"valid_hr@{k}": val[f"hr@{k}"], f"valid_ndcg@{k}": val[f"ndcg@{k}"],
             "train_seconds": t1 - t0, "epoch_seconds": t2 - t0}
        )
        log.info("epoch %d loss %.4f valid HR@%d %.4f", epoch, loss, k, val[f"hr@{k}"])
        if val[f"hr@{k}"] > state.best:
            state.best, state.best_epoch, state.waited = val[f"hr@{k}"], epoch, 0
            state.best_state = self._model_state()
        else:
            state.waited += 1
        state.epoch = epoch

    def fit(self, progress: bool | None = None, checkpoint: str | Path | None = None) -> dict:
        """Train until `max_epochs` or `patience` epochs without a better validation HR@k, then
        evaluate the best epoch's model. With `checkpoint`, the state is saved there after an
        epoch (every epoch, or once `checkpoint_every_s` have passed since the last save), and a
        checkpoint of this run found there is resumed."""
        cfg = self.cfg
        state = self.load_checkpoint(checkpoint) if checkpoint else FitState()
        resumed = state.epoch
        saved = time.perf_counter()
        bar = tqdm(range(resumed + 1, cfg.max_epochs + 1), desc="epochs", initial=resumed, total=cfg.max_epochs,
                   disable=None if progress is None else not progress)
        for epoch in bar:
            if state.waited >= cfg.patience:  # early stop (also when resuming a stopped run)
                break
            self._epoch(epoch, state)
            due = time.perf_counter() - saved >= cfg.checkpoint_every_s
            if checkpoint and distributed.all_objects(due)[0]:  # process 0's clock decides for all
                self.save_checkpoint(checkpoint, state)
                saved = time.perf_counter()
            last = state.history[-1]
            bar.set_postfix(loss=f"{last['loss']:.3f}", hr=f"{last[f'valid_hr@{cfg.k}']:.4f}")
        self._load_model_state(state.best_state)
        return self._result(state, resumed)

    def _result(self, state: FitState, resumed: int) -> dict:
        """The run's record (metrics.json): the loaded best model's metrics, history, costs."""
        history = state.history
        valid = self.evaluate("valid")
        test = self.evaluate("test")
        peak, peak_kind, device_name = self._peak_memory()
        return {
            "valid": valid,
            "test": test,
            "best_epoch": state.best_epoch,
            "epochs_run": len(history),
            "history": history,
            "trainable_params": self.trainable_parameters(),
            "total_params": self.total_parameters(),
            "time_per_epoch_train_s": float(np.mean([h["train_seconds"] for h in history])),
            "time_per_epoch_with_eval_s": float(np.mean([h["epoch_seconds"] for h in history])),
            "peak_memory_mb": peak,
            "peak_memory_kind": peak_kind,
            "device": device_name,
            "device_type": self.device.type,
            "processes": self.processes,
            "seed": self.cfg.seed,
            "resumed_from_epoch": resumed,  # epochs restored from a checkpoint (0: a fresh run)
        }


@torch.no_grad()
def popularity_baseline(data: SequenceData, split: str = "test", k: int = 10) -> dict[str, float]:
    """Rank every item by its training count (history masked as for the models)."""
    inp_t = getattr(data, f"{split}_target")
    hist = getattr(data, f"{split}_history")
    scores = data.pop_count.float().unsqueeze(0).expand(inp_t.shape[0], -1)
    # break ties by item id so the ranking is deterministic
    scores = scores + torch.linspace(0, 0.5, scores.shape[1]).unsqueeze(0)
    h, n = hr_ndcg(rank_of_target(scores, inp_t, hist), k)
    return {f"hr@{k}": float(h.mean()), f"ndcg@{k}": float(n.mean())}
