"""The dataset-kind registry (iisan.data.kinds) and the backbone-family registry (iisan.encoders.families): a
kind or a family registered alone is usable without editing an if-chain of the workflow or the
library, and is gone once unregistered."""

from pathlib import Path

import pytest
import torch

from iisan import tables
from iisan.data import amazon, demo, kinds
from iisan.data.kinds import DatasetKind
from iisan.encoders import families
from iisan.encoders.backbones import FAMILIES, BackboneSpec, build_standin, load_backbone
from iisan.encoders.families import Family
from iisan.encoders.finetune import prepare_backbone
from iisan.encoders.item_inputs import backbone_states, encode_texts
from iisan.encoders.models_fetch import disk_gb
from iisan.encoders.tokenizers import train_wordpiece_tokenizer
from iisan.pipeline import plan, rehearsal
from iisan.pipeline.budget import Budget, dataset_size
from iisan.pipeline.graph import job_graph

from conftest import ROOT, workflow_config

SMALL = {"tables": ["table3"], "figures": [], "claims": False}


def test_the_schema_takes_the_kinds_from_the_registry():
    """The schema file lists no kind and no kind's required keys; the schema a run validates
    against has the registry's (`kinds.schema_keywords`, merged by `iisan.pipeline.workflow.from_code`)."""
    from iisan.pipeline import workflow

    entry = workflow.load_yaml(ROOT / workflow.SCHEMA)["properties"]["dataset_sources"]["additionalProperties"]
    assert "enum" not in entry["properties"]["kind"] and "allOf" not in entry
    merged = workflow.schema(ROOT)
    for place, keywords in kinds.schema_keywords().items():
        node = merged
        for key in place:
            node = node[key]
        assert {k: node[k] for k in keywords} == keywords


def test_a_dataset_kind_registered_alone_is_validated_planned_preprocessed_and_priced(tmp_path):
    """One register() call: Amazon-format files that the entry names on disk (no rule makes them)
    are validated, read by rule preprocess through the kind, preprocessed as the preprocess script
    does, and a run on them is planned and priced with the size the kind reads from the entry."""
    raw = demo.generate(tmp_path / "raw", demo.DemoSpec(n_items=60, n_users=80, n_groups=2, n_subgroups=2, image_size=8))
    entry = {"kind": "local-tsv", "items": str(raw["items"]), "users": str(raw["users"]), "images": str(raw["images"]),
             "demo": {"n_items": 60, "n_users": 80}}
    overrides = {**SMALL, "datasets": ["toy"], "dataset_sources": {"toy": entry}}

    def on_disk(dataset, source):
        return {"items_tsv": source["items"], "users_tsv": source["users"]}

    kinds.register(DatasetKind("local-tsv", amazon.INPUTS, on_disk, amazon.preprocess, size=kinds.spec_size("demo"),
                               required=("items", "users")))
    try:
        cfg = workflow_config(ROOT, **overrides)
        assert cfg["dataset_sources"]["toy"]["missing_images"] == "error"
        with pytest.raises(ValueError, match=r"config key dataset_sources\.toy.*users"):
            workflow_config(ROOT, **{**overrides, "dataset_sources": {"toy": {k: v for k, v in entry.items() if k != "users"}}})
        run = next(p for r, p in tables.plan_runs("table3", cfg) if r["method"] == "iisan")
        assert "/toy/" in run
        graph = job_graph(ROOT, [], overrides, [run])
        made = {n.rule for n in graph.nodes if n.wildcards.get("dataset") == "toy"}
        assert {"preprocess", "cache", "train"} <= made and not made & {"generate_demo", "fetch_amazon", "fetch_amazon_images"}
        budget = Budget(graph.config).build(graph)
        assert run in budget.jobs and dataset_size(graph.config, "toy") == (80, 60)
        assert "toy" not in rehearsal.mirrored(cfg)
        with pytest.raises(ValueError, match="'local-tsv' has no published files to rehearse"):
            rehearsal.build_mirror("toy", entry, tmp_path / "mirror")
        # what workflow/scripts/preprocess.py calls with rule preprocess's inputs
        inputs = {**on_disk("toy", entry), "images": entry["images"]}
        stats = kinds.of(cfg, "toy").preprocess_raw(inputs, tmp_path / "toy", images=Path(entry["images"]),
                                                    missing_images="error", bad_lines="error", **cfg["preprocess"])
        assert (tmp_path / "toy" / "stats.json").is_file() and 0 < stats["items"] <= 60
    finally:
        kinds.unregister("local-tsv")
    with pytest.raises(ValueError, match=r"config key dataset_sources\.toy\.kind"):
        workflow_config(ROOT, **overrides)
    with pytest.raises(ValueError, match="unknown dataset kind 'local-tsv'"):
        kinds.of({"dataset_sources": {"toy": entry}}, "toy")


def electra_standin(spec, folder, titles):
    """ELECTRA's discriminator encoder (no pooler; h[L] is its output) with a WordPiece tokenizer."""
    from transformers import ElectraConfig, ElectraModel

    tokenizer = train_wordpiece_tokenizer(titles, vocab_size=200)
    model = ElectraModel(ElectraConfig(vocab_size=len(tokenizer), embedding_size=spec.hidden, hidden_size=spec.hidden,
                                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                                       intermediate_size=2 * spec.hidden, max_position_embeddings=64))
    tokenizer.save_pretrained(folder)
    return model


def test_a_backbone_family_registered_alone_is_validated_built_cached_and_fine_tuned(tmp_path):
    """One register() call: a backbone of the new family passes the config schema, its stand-in
    and cache jobs are planned and priced, its stand-in is built and loaded, its output state is
    the last the cache stores, and LoRA, adapters and BitFit find their modules."""
    entry = {"source": "demo", "family": "electra", "modality": "text", "layers": 2, "hidden": 16, "heads": 2, "params_b": 0.01}
    overrides = {**SMALL, "backbones": {"electra-demo": entry}}
    families.register(Family("electra", "text", electra_standin, weight_bytes=4, lora=("query", "value"),
                             adapter=(r"layer\.\d+\.attention\.output\.dropout", r"layer\.\d+\.output\.dropout")))
    try:
        cfg = workflow_config(ROOT, **overrides)
        assert FAMILIES["electra"] == "text" and cfg["backbones"]["electra-demo"]["family"] == "electra"
        cache = plan.CACHE_ARRAY.format(dataset="demo", field="title", backbone="electra-demo")
        graph = job_graph(ROOT, [], overrides, [cache])
        assert {"build_standin", "cache"} <= {n.rule for n in graph.nodes if n.wildcards.get("backbone") == "electra-demo"}
        assert cache in Budget(graph.config).build(graph).jobs
        assert disk_gb({"family": "electra", "params_b": 0.01}) == pytest.approx(0.04)  # float32 weights

        spec = BackboneSpec.from_config("electra-demo", entry)
        assert spec.pooling == "cls" and not spec.is_decoder and spec.output_layer == 2
        titles = ["red apple pie", "blue sky", "green field of grass"]
        build_standin(spec, tmp_path / "electra", titles, seed=1)
        model, tok = load_backbone(spec, str(tmp_path / "electra"), torch.device("cpu"))
        with torch.no_grad():
            out = model(**encode_texts(spec, tok, titles, torch.device("cpu")), output_hidden_states=True)
        states = backbone_states(spec, out)
        assert len(states) == spec.output_layer + 1 and torch.equal(states[spec.output_layer], out.last_hidden_state)

        lora = prepare_backbone(model, "electra", "lora")
        assert any("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
        model, _ = load_backbone(spec, str(tmp_path / "electra"), torch.device("cpu"))
        adapted = prepare_backbone(model, "electra", "adapter")
        assert sum(".adapter_down.weight" in n for n, _ in adapted.named_parameters()) == 2 * spec.layers
        model, _ = load_backbone(spec, str(tmp_path / "electra"), torch.device("cpu"))
        assert all(n.endswith("bias") for n, p in prepare_backbone(model, "electra", "bitfit").named_parameters() if p.requires_grad)
    finally:
        families.unregister("electra")
    assert "electra" not in FAMILIES
    with pytest.raises(ValueError, match=r"config key backbones\.electra-demo\.family"):
        workflow_config(ROOT, **overrides)
    with pytest.raises(ValueError, match="unknown family 'electra'"):
        BackboneSpec.from_config("electra-demo", entry)
