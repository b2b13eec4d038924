"""Checkpoint and resume: a killed training run continues where it stopped, with the result of
an uninterrupted one (CPU, same seed); checkpoints of other runs are discarded; writes are atomic."""

import json
import logging
import random

import numpy as np
import pytest
import torch

from iisan.data.synthetic import tiny_data, write_dataset
from iisan.training import train as train_mod
from iisan.training.train import TrainConfig, Trainer

from conftest import stable, trainer


class Killed(Exception):
    pass


def kill_after(t: Trainer, epochs: int) -> Trainer:
    """Make `t` die in its (epochs + 1)-th epoch, as a run killed mid-epoch."""
    real, done = t.train_epoch, []

    def train_epoch():
        if len(done) == epochs:
            raise Killed
        done.append(1)
        return real()

    t.train_epoch = train_epoch
    return t


def scramble_rngs():
    """Whatever the process drew in between: a resume must not depend on it."""
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)


def resumed_run(ckpt, killed_after: int, **train) -> dict:
    with pytest.raises(Killed):
        kill_after(trainer(**train), killed_after).fit(progress=False, checkpoint=ckpt)
    assert ckpt.exists()
    scramble_rngs()
    return trainer(**train).fit(progress=False, checkpoint=ckpt)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    full = trainer().fit(progress=False)
    resumed = resumed_run(tmp_path / "checkpoint.pt", killed_after=2)
    assert resumed["resumed_from_epoch"] == 2 and full["resumed_from_epoch"] == 0
    assert full["epochs_run"] == 4 and len({h["loss"] for h in full["history"]}) == 4
    assert stable(resumed) == stable(full)  # history (losses exactly), best epoch, metrics
    assert set(resumed) == set(full)


def test_early_stopping_state_survives_a_resume(tmp_path):
    """Killed while the run waits for a better epoch: the patience counter and the best epoch
    (and its weights) come back, so the run stops where the uninterrupted one stopped."""
    settings = dict(max_epochs=15, patience=2)
    full = trainer(**settings).fit(progress=False)
    stop, best = full["epochs_run"], full["best_epoch"]
    assert 3 < best and stop == best + 2 < 15, "these settings must improve a while, then stop early"
    resumed = resumed_run(tmp_path / "checkpoint.pt", killed_after=stop - 1, **settings)  # waited = 1 there
    assert resumed["resumed_from_epoch"] == stop - 1
    assert stable(resumed) == stable(full)
    # killed after the last epoch (checkpoint written, metrics not): nothing more is trained
    again = trainer(**settings).fit(progress=False, checkpoint=tmp_path / "checkpoint.pt")
    assert again["resumed_from_epoch"] == stop and stable(again) == stable(full)


@pytest.mark.parametrize("other", ["config", "dataset", "version"])
def test_a_checkpoint_of_another_run_is_discarded(tmp_path, caplog, monkeypatch, other):
    ckpt = tmp_path / "checkpoint.pt"
    kw = {"config": dict(seed=7), "dataset": dict(data=tiny_data("items-v0")), "version": {}}[other]
    if other == "version":
        monkeypatch.setattr(train_mod, "__version__", "0.0.9")
    with pytest.raises(Killed):
        kill_after(trainer(**kw), 2).fit(progress=False, checkpoint=ckpt)
    monkeypatch.undo()
    fresh = trainer().fit(progress=False)
    with caplog.at_level(logging.INFO, logger="iisan.training.train"):
        result = trainer().fit(progress=False, checkpoint=ckpt)
    assert any("discarding checkpoint" in r.getMessage() and "another run" in r.getMessage() for r in caplog.records)
    assert result["resumed_from_epoch"] == 0
    assert stable(result) == stable(fresh)


def test_the_experiment_hash_names_the_run(tmp_path, caplog):
    """Through run_hash (make_trainer passes the experiment's config_hash) two runs with equal
    TrainConfig and ModelConfig but different experiments do not share checkpoints."""
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Killed):
        kill_after(trainer(run_hash="experiment-a"), 2).fit(progress=False, checkpoint=ckpt)
    with caplog.at_level(logging.WARNING, logger="iisan.training.train"):
        result = trainer(run_hash="experiment-b").fit(progress=False, checkpoint=ckpt)
    assert result["resumed_from_epoch"] == 0 and "discarding checkpoint" in caplog.text


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    """torch.save dies half-way through the 3rd epoch's checkpoint: the 2nd epoch's stays whole
    and no partial file is left beside it."""
    ckpt = tmp_path / "checkpoint.pt"
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 3:
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        trainer().fit(progress=False, checkpoint=ckpt)
    assert len(calls) == 3 and all(str(f) != str(ckpt) for f in calls)  # always a temporary path
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    saved = torch.load(ckpt, weights_only=True)
    assert saved["fit"]["epoch"] == 2 and len(saved["fit"]["history"]) == 2
    assert saved["scaler"] is None and set(saved["rng"]) == {"python", "numpy", "torch", "cuda", "trainer"}


def test_checkpoint_loads_into_a_compiled_trainer(tmp_path):
    """With `compile` a training step calls compiled wrappers of the item and user encoders
    (state-dict keys gain `_orig_mod.` there), while checkpoints read and write the plain model: a
    checkpoint moves between compiled and plain trainers either way, and the compiled trainer
    trains exactly as the plain one (dynamo's eager backend: the same operations)."""
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Killed):
        kill_after(trainer(), 1).fit(progress=False, checkpoint=ckpt)
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in saved)
    compiled = trainer(compile=True, compile_backend="eager")
    encoders = compiled.step.encoders
    assert set(encoders) == {"items", "user"} and all(any("_orig_mod" in k for k in e.state_dict()) for e in encoders.values())
    assert compiled.load_checkpoint(ckpt).epoch == 1
    got = compiled.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items())
    loss = compiled.train_epoch()  # through the compiled wrappers
    assert compiled.model.items is not encoders["items"]  # swapped in for the step only
    plain = trainer()
    plain.load_checkpoint(ckpt)
    assert plain.train_epoch() == loss
    compiled.save_checkpoint(ckpt, train_mod.FitState(epoch=2))  # and back: plain keys again
    resaved = torch.load(ckpt, weights_only=True)["model"]
    assert resaved.keys() == saved.keys() and any(not torch.equal(resaved[k], saved[k]) for k in saved)
    assert all(torch.equal(plain.model.state_dict()[k], v) for k, v in resaved.items())
    plain = trainer()
    assert plain.load_checkpoint(ckpt).epoch == 2
    assert all(torch.equal(plain.model.state_dict()[k], v) for k, v in resaved.items())


@pytest.mark.parametrize("keep", [0, 1])
def test_run_experiment_deletes_the_checkpoint_unless_kept(tmp_path, monkeypatch, keep):
    """`run_experiment` (the train rule's job) saves checkpoint.pt beside metrics.json every
    epoch, and deletes it once metrics.json is written unless keep_checkpoint (config key
    keep_checkpoints)."""
    import iisan.training.experiment as experiment_mod
    from iisan.config import Experiment, ModelConfig, TrainConfig

    write_dataset(tmp_path / "ds", tiny_data())
    out = tmp_path / "run" / "metrics.json"
    ckpt = out.parent / "checkpoint.pt"
    seen = []
    real_write = experiment_mod.write_json
    monkeypatch.setattr(experiment_mod, "write_json", lambda p, obj: (seen.append(ckpt.exists()), real_write(p, obj)))
    exp = Experiment("ds", [], "sasrec-id", "none", "none", True, None, model=ModelConfig(method="sasrec-id", embed_dim=16),
                     train=TrainConfig(batch_size=16, max_epochs=2, patience=2))

    def run():
        return experiment_mod.run_experiment(exp, tmp_path / "ds", [], out, device="cpu", keep_checkpoint=bool(keep))

    run()
    result = json.loads(out.read_text())
    assert seen == [True] and result["epochs_run"] == 2 and result["resumed_from_epoch"] == 0
    assert ckpt.exists() == bool(keep)
    if keep:  # the kept checkpoint is the finished run's: rerunning resumes it and trains nothing
        assert torch.load(ckpt, weights_only=True)["fit"]["epoch"] == 2
        run()
        again = json.loads(out.read_text())
        assert again["resumed_from_epoch"] == 2 and stable(again) == stable(result)


def test_checkpoint_interval_saves_less_often_and_resumes_the_same(tmp_path, monkeypatch):
    """`checkpoint_every_s` (speed only) skips saves after short epochs; a run killed after a
    later epoch resumes from the last save and still equals an uninterrupted run."""
    clock = {"t": 0.0}
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: clock.__setitem__("t", clock["t"] + 1.0) or clock["t"])
    saves = []
    real = Trainer.save_checkpoint
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self, path, state: saves.append(state.epoch) or real(self, path, state))
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Killed):
        kill_after(trainer(checkpoint_every_s=1e9), 3).fit(progress=False, checkpoint=ckpt)
    assert saves == [] and not ckpt.exists()
    # each epoch reads the clock 4 times (4 s); a save needs 10 s since the last: epochs 3, 5, ...
    with pytest.raises(Killed):
        kill_after(trainer(checkpoint_every_s=10), 3).fit(progress=False, checkpoint=ckpt)
    assert saves == [3]
    resumed = trainer(checkpoint_every_s=10).fit(progress=False, checkpoint=ckpt)
    assert resumed["resumed_from_epoch"] == 3
    assert stable(resumed) == stable(trainer().fit(progress=False))


def test_precision_is_checked_and_a_cpu_computes_in_fp32():
    """`train.precision` is bf16 | fp16 | fp32 and applies on CUDA only: on a CPU every setting
    trains the same fp32 model, and no GradScaler is made (it would scale fp32 losses)."""
    with pytest.raises(ValueError, match=r"train.precision: 'fp8' is not one of bf16, fp16, fp32"):
        TrainConfig(precision="fp8")
    runs = {}
    for precision in ("bf16", "fp16", "fp32"):
        t = trainer(precision=precision, max_epochs=2)
        assert t.step.precision.name == "fp32" and t.step.precision.dtype is None and t.step.scaler is None
        runs[precision] = stable(t.fit(progress=False))
    assert runs["bf16"] == runs["fp16"] == runs["fp32"]


def test_a_damaged_checkpoint_is_set_aside_and_the_run_starts_fresh(tmp_path, caplog):
    """A truncated checkpoint (torch's reader fails without naming the file) is moved aside with
    a warning naming it; the run starts from scratch with the result of a fresh run."""
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Killed):
        kill_after(trainer(), 2).fit(progress=False, checkpoint=ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="iisan.training.train"):
        result = trainer().fit(progress=False, checkpoint=ckpt)
    assert f"{ckpt}: unreadable (" in caplog.text and "moved aside to" in caplog.text and "starts from scratch" in caplog.text
    assert result["resumed_from_epoch"] == 0 and stable(result) == stable(trainer().fit(progress=False))
    assert [p.read_bytes() for p in tmp_path.glob("checkpoint.pt.damaged-*")] == [data[: len(data) // 2]]
