"""The cache job (iisan.encoders.cache_job.CacheJob): the cache rule's one param, built from a
config in one place for the rule and the budget."""

import dataclasses
import json
import pickle

import pytest

from iisan.encoders.backbones import BackboneSpec
from iisan.encoders.cache_job import CacheJob
from iisan.pipeline.budget import Budget

from conftest import workflow_config

BERT = {"source": "demo", "family": "bert", "modality": "text", "layers": 2, "hidden": 16, "heads": 2, "group": "PLM",
        "params_b": 0.1, "vocab_size": 200}
LLAMA_4BIT = {"source": "demo", "family": "llama", "modality": "text", "layers": 2, "hidden": 16, "pooling": "mean",
              "quantization": "bnb-4bit"}


def config(**cache):
    return {"backbones": {"bert": BERT, "llama": LLAMA_4BIT}, "cache": cache}


@pytest.mark.parametrize("dtype,bert,llama", [("auto", "float32", "float16"), ("float16", "float16", "float16"),
                                              ("float32", "float32", "float32")])
def test_the_store_dtype_is_config_cache_dtype_resolved_per_backbone(dtype, bert, llama):
    cfg = config(dtype=dtype, batch_size=8)
    assert CacheJob.from_config(cfg, "title", "bert").store_dtype == bert
    assert CacheJob.from_config(cfg, "title", "llama").store_dtype == llama


def test_a_job_holds_the_entry_field_and_batch_size():
    job = CacheJob.from_config(config(dtype="auto", batch_size=8), "title", "bert")
    assert (job.backbone, job.entry, job.field, job.batch_size) == ("bert", BERT, "title", 8)
    assert job.spec == BackboneSpec.from_config("bert", BERT)
    # a config without a cache section: the schema's defaults
    assert CacheJob.from_config({"backbones": {"bert": BERT}}, "title", "bert").batch_size == 64


def test_a_job_round_trips_through_its_dict():
    job = CacheJob.from_config(config(dtype="auto", batch_size=8), "title", "llama")
    d = job.to_dict()
    assert json.loads(json.dumps(d)) == d  # what Snakemake records of a param
    assert CacheJob.from_dict(d) == job and pickle.loads(pickle.dumps(job)) == job
    assert CacheJob.from_dict(d).spec == job.spec


def test_a_job_of_a_spec_made_in_code_rebuilds_that_spec():
    spec = BackboneSpec.from_config("v", {"source": "demo", "family": "vit", "modality": "image", "layers": 2, "hidden": 8,
                                          "patch_size": 8, "image_size": 16})
    spec.pooling = "mean"
    job = CacheJob.for_spec(spec, "image", batch_size=4, store_dtype="float32")
    assert job.spec == spec and CacheJob.from_dict(job.to_dict()).spec == spec
    assert job.spec is not spec and dataclasses.replace(job, batch_size=5).batch_size == 5


@pytest.mark.parametrize("change,message", [({"batch_size": 0}, "cache.batch_size"),
                                            ({"store_dtype": "bfloat16"}, "store dtype 'bfloat16'"),
                                            ({"entry": dict(BERT, family="gpt9")}, "unknown family")])
def test_a_bad_setting_stops_the_job_at_construction(change, message):
    with pytest.raises(ValueError, match=message):
        CacheJob(**{**CacheJob.from_config(config(), "title", "bert").to_dict(), **change})


def test_the_budget_prices_a_cache_with_the_rules_job(root, monkeypatch):
    import iisan.pipeline.budget as budget_mod

    cfg = workflow_config(root)
    w = next({"dataset": d, "field": t["field"], "backbone": t["backbone"]} for d in cfg["dataset_sources"]
             for t in cfg["towers"] if cfg["backbones"][t["backbone"]]["modality"] == "text")
    before = Budget(cfg).cache(w).peak_gib
    real = CacheJob.from_config
    monkeypatch.setattr(budget_mod.CacheJob, "from_config",
                        lambda config, field, backbone: dataclasses.replace(real(config, field, backbone), batch_size=10**6))
    assert Budget(cfg).cache(w).peak_gib > before  # its batch is the job's, not read from the config again
