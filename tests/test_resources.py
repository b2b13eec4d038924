"""What a job asks its scheduler for (iisan.pipeline.resources), the functions the rules' resources
call: cards (with the refusals that name both numbers), minutes on retries and at the partition's
limit, host memory from the budget's sizes."""

import dataclasses

import pytest

from iisan.errors import is_named
from iisan.pipeline import resources
from iisan.pipeline.budget import FLOOR_MIN, Budget, Job

from conftest import ROOT, workflow_config


@pytest.fixture
def paper(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dataset sizes from Table I, not a run's stats.json
    return workflow_config(ROOT, "config/paper.yaml")


def test_minutes_grow_with_the_attempt_up_to_the_partitions_limit(paper):
    assert paper["cluster"]["max_runtime_min"] == 240 and paper["cluster"]["runtime_margin"] == 1.5
    assert resources.runtime_minutes(3600, paper, 1) == 90
    assert resources.runtime_minutes(3600, paper, 2) == 180
    assert resources.runtime_minutes(3600, paper, 3) == 240  # at the limit: the job resumes on its next attempt
    assert resources.runtime_minutes(1, paper, 1) == FLOOR_MIN
    unlimited = {**paper, "cluster": {**paper["cluster"], "max_runtime_min": None}}
    assert resources.capped_minutes(100, unlimited, 4) == 400


def test_cards_follow_the_estimate_and_refuse_what_the_run_cannot_give(paper):
    budget = Budget(paper)
    job = Job("cache", "resources/cache/x/cache.npy", 60.0, 120.0, gpus=2)
    assert resources.cards(job, paper, least=1, limit=None, node_gpus=8) == 2
    assert resources.cards(job, paper, least=0, limit=None, node_gpus=8) == 0  # no CUDA here
    with pytest.raises(resources.CardError, match=r"needs 2 GPUs of 80 GiB .*this run may use 1 \(--resources gpu=1"):
        resources.cards(job, paper, least=1, limit=1, node_gpus=8)
    big = Job("train", "results/runs/x/metrics.json", 60.0, 500.0, gpus=1)
    with pytest.raises(resources.CardError, match="a card does not fit one GPU of cluster.gpu_gib = 80") as err:
        resources.cards(big, paper, least=1, limit=None, node_gpus=budget.node_gpus())
    assert is_named(err.value)  # a job prints its message alone
    stand_in = dataclasses.replace(job, gpus=0)
    assert resources.cards(stand_in, paper, least=1, limit=None, node_gpus=8) == 0


def test_host_memory_counts_the_datasets_items_and_the_retries(paper):
    towers = "title@bert-base+image@vit-base"
    one = resources.train_host_mb(paper, "Scientific", towers, "dropped")
    # 20,314 items (Table I) x (13 BERT states + 14 ViT states, its last the final LayerNorm's) of
    # 768 x 4 bytes, twice, plus 4 GB
    assert one == int(4096 + 2 * 20314 * (13 + 14) * 768 * 4 / 2**20)
    assert resources.train_host_mb(paper, "Scientific", towers, "dropped", factor=2) in (2 * one, 2 * one + 1)
    assert resources.cache_host_mb(paper, "bert-base") < resources.cache_host_mb(paper, "llama3-8b")
    assert resources.cache_threads(paper, "bert-base") == 4
