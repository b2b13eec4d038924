"""One training run on several processes (iisan.training.distributed): two CPU processes over gloo
train the one-process run at the same global batch (dropout off): the same losses, gradients,
metrics and checkpoints, and a killed two-process run resumes to the uninterrupted one's result."""

import math

import pytest
import torch

from iisan.training import distributed
from iisan.training.train import Trainer

from conftest import stable, trainer

# dropout off: the processes draw their dropout masks from other streams than one process does
NO_DROPOUT = {"dropout": 0.0}
BATCH = 12  # not a multiple of the processes' rows in its last batch: 2 processes pad it


def tiny(**train) -> Trainer:
    return trainer(batch_size=BATCH, model=NO_DROPOUT, **train)


def first_steps(steps: int) -> dict:
    """The losses of the first `steps` steps and the gradients of the last one."""
    t = tiny()
    losses = []
    for ids, _ in zip(t.batches(), range(steps)):
        t.model.train()
        losses.append(float(distributed.all_sum(t.train_step(ids))))
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    return {"losses": losses, "grads": grads, "rows": int(ids.shape[0]), "processes": distributed.world()}


def fit(checkpoint=None, kill_after=None, **train) -> dict:
    """A fit of the tiny run; `kill_after` epochs: dies in the next one (after its checkpoint)."""
    t = tiny(checkpoint_every_s=0, **train)
    if kill_after is not None:
        real, done = t.train_epoch, []

        def train_epoch():
            if len(done) == kill_after:
                raise SystemExit(3)  # a process dying mid-epoch
            done.append(1)
            return real()

        t.train_epoch = train_epoch
    return t.fit(progress=False, checkpoint=checkpoint)


def test_shares_split_a_batch_and_a_count():
    assert distributed.world() == 1 and distributed.share(5) == (0, 5)
    batch = torch.arange(6).view(3, 2)
    assert distributed.shard_rows(batch) is batch


def steps_and_fit() -> dict:
    """`first_steps(4)`, then a whole fit from a fresh trainer."""
    return {"steps": first_steps(4), "fit": fit()}


@pytest.mark.slow
def test_two_processes_train_the_one_process_run_and_resume_it(tmp_path):
    one = steps_and_fit()
    both = distributed.launch(steps_and_fit, processes=2)
    # the first steps: the same losses and gradients
    steps = both["steps"]
    assert steps["processes"] == 2 and steps["rows"] == BATCH // 2
    assert one["steps"]["losses"] == pytest.approx(steps["losses"], rel=1e-5, abs=1e-6)
    assert one["steps"]["grads"].keys() == steps["grads"].keys()
    for name, g in one["steps"]["grads"].items():
        torch.testing.assert_close(steps["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the whole run: losses, validation, best epoch, test metrics
    one, two = one["fit"], both["fit"]
    assert two["processes"] == 2 and one["processes"] == 1
    assert one["epochs_run"] == two["epochs_run"] == 4 and one["best_epoch"] == two["best_epoch"]
    for a, b in zip(one["history"], two["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["valid_hr@10"] == pytest.approx(b["valid_hr@10"], abs=1e-6)
    for split in ("valid", "test"):
        for k, v in one[split].items():
            assert math.isclose(v, two[split][k], rel_tol=1e-4, abs_tol=1e-6), (split, k)
    # killed after two epochs (their checkpoint written), then rerun: the uninterrupted result
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(RuntimeError, match="processes failed"):
        distributed.launch(fit, ckpt, 2, processes=2)
    assert ckpt.exists() and isinstance(torch.load(ckpt, weights_only=True)["rng"], list)
    resumed = distributed.launch(fit, ckpt, processes=2)
    assert resumed["resumed_from_epoch"] == 2
    assert stable(resumed) == stable(two)


def fft_steps(item_slots: str) -> dict:
    """Two FFT steps over tiny BERT and ViT backbones in the loop (dropout off): a batch of
    windows, then a batch of one window (a second process holds padding only)."""
    from test_baselines import _slot_source

    from iisan.data.synthetic import N_ITEMS, tiny_data
    from iisan.training.model import ModelConfig
    from iisan.training.train import TrainConfig, start_run

    cfg = TrainConfig(batch_size=BATCH, lr_main=5e-3, item_slots=item_slots)
    device = start_run(cfg.seed, "cpu")
    t = Trainer(tiny_data(), _slot_source("fft", item_slots, N_ITEMS), ModelConfig(method="fft", dropout=0.0), cfg, device)
    t.model.train()
    windows = t.data.train[:BATCH]
    losses = [float(distributed.all_sum(t.train_step(distributed.shard_rows(w)))) for w in (windows, windows[:1])]
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    return {"losses": losses, "grads": grads}


@pytest.mark.slow
def test_two_processes_fine_tune_backbones_as_one():
    """item_slots real (the paper config's): a process holding only padding runs no backbone."""
    one = fft_steps("real")
    two = distributed.launch(fft_steps, "real", processes=2)
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    assert len(one["grads"]) > 20 and one["grads"].keys() == two["grads"].keys()
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-9, msg=name)
