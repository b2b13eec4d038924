"""Learned gate values: what `Recommender.gate_values` reports, and metrics.json's "gates"."""

import json
import math

import pytest
import torch

import iisan.training.experiment as experiment_mod
from iisan.config import Experiment, TowerConfig, TrainConfig
from iisan.data.synthetic import tiny_caches, tiny_data, write_dataset
from iisan.training.features import CachedFeatures
from iisan.training.model import Gate, ItemEncoder, ModelConfig, Recommender
from iisan.training.train import MEASURED_FIELDS


def set_gates(gates, ws):
    with torch.no_grad():
        for gate, w in zip(gates, ws):
            gate.w.fill_(w)


def test_gate_value_is_the_forward_value():
    gate = Gate(0.1)
    assert gate.value() == 0.5
    set_gates([gate], [0.05])
    assert gate.value() == gate().detach().item() == pytest.approx(1 / (1 + math.exp(-0.5)))
    hot = Gate(0.5)
    set_gates([hot], [0.05])
    assert hot.value() == pytest.approx(1 / (1 + math.exp(-0.1)))


def test_reported_gates_are_the_coefficients_the_towers_use():
    """Recomputing each tower with the reported g_t gives its forward pass."""
    torch.manual_seed(0)
    enc = ItemEncoder(ModelConfig(), [8, 8], [3, 3])
    set_gates(enc.intra[0].gates, [0.1, -0.2, 0.3])
    set_gates(enc.intra[1].gates, [-0.1, 0.05, 0.2])
    set_gates(enc.inter.gates, [-0.3, 0.1, -0.05])
    got = enc.gate_values(["title", "image"])
    assert set(got) == {"title", "image", "inter"}
    h = [torch.randn(4, 3, 8), torch.randn(4, 3, 8)]
    for f, name in enumerate(("title", "image")):
        tower, s = enc.intra[f], torch.zeros(4, 8)
        for t, g in enumerate(got[name]["values"]):
            s = tower.blocks[t](g * h[f][:, t] + (1 - g) * s)
        assert torch.allclose(tower(h[f]), s)
    z = torch.zeros(4, 8)
    for t, g in enumerate(got["inter"]["values"]):  # g weighs the image (field 1) side
        z = enc.inter.blocks[t](z + g * h[1][:, t] + (1 - g) * h[0][:, t])
    assert torch.allclose(enc.inter(h[0], h[1]), z)
    assert got["inter"]["g_weighs"] == "image" and got["inter"]["1-g_weighs"] == "title"
    assert got["title"]["values"][1] == pytest.approx(1 / (1 + math.exp(2.0)))


@pytest.mark.parametrize(
    "method,heads,n_layers,expect",
    [
        ("iisan", "vs", [7, 7], {"title": 7, "image": 7, "inter": 7}),
        ("iisan-va", "va", [5, 3], {"title": 5, "image": 3, "inter": 3}),  # inter pairs the top 3
        ("no-inter", "vs", [7, 7], {"title": 7, "image": 7}),
        ("no-intra", "vs", [7, 7], {"inter": 7}),
    ],
)
def test_gated_models_report_every_block(method, heads, n_layers, expect):
    model = Recommender(ModelConfig(method=method, heads=heads), [16, 8], n_layers)
    got = model.gate_values(["title", "image"])
    assert {k: len(v["values"]) for k, v in got.items()} == expect
    for v in got.values():
        assert all(isinstance(g, float) and g == 0.5 for g in v["values"]) and v["mean"] == 0.5
    json.dumps(got)  # plain values


def test_one_field_and_a_field_fed_twice():
    assert set(Recommender(ModelConfig(), [8], [3]).gate_values(["title"])) == {"title"}
    got = Recommender(ModelConfig(), [8, 8], [3, 3]).gate_values(["title", "title"])
    assert set(got) == {"title[0]", "title[1]", "inter"} and got["inter"]["g_weighs"] == "title[1]"
    assert set(Recommender(ModelConfig(), [8, 8], [3, 3]).gate_values()) == {"field0", "field1", "inter"}


@pytest.mark.parametrize("method", ["no-gate", "frozen", "sasrec-id", "gru4rec"])
def test_models_without_gates_report_none(method):
    model = Recommender(ModelConfig(method=method), [8, 8], [3, 3], n_items=5)
    assert model.gate_values(["title", "image"]) == {}


def tower(field, modality):
    return TowerConfig(field, f"demo-{modality}", {"source": "demo", "family": "bert" if modality == "text" else "vit",
                                                    "modality": modality, "layers": 2, "hidden": 16})


def test_tiny_run_writes_the_best_epochs_gates(tmp_path, monkeypatch):
    """metrics.json carries the gates of the loaded best-validation model, and every other
    result equals a plain fit of the same run (recording them changes nothing)."""
    data = tiny_data()
    write_dataset(tmp_path / "ds", data)
    caches = tiny_caches()
    monkeypatch.setattr(experiment_mod, "cached_source",
                        lambda exp, data, dirs: (CachedFeatures(caches), [[0, 1, 2], [0, 1, 2]], []))
    model = ModelConfig(embed_dim=16, bottleneck=8)
    train = TrainConfig(batch_size=16, max_epochs=3, patience=10, lr_main=5e-3, lr_san=5e-3, lr_text_f=5e-3,
                        lr_image_f=5e-3, eval_batch=32)
    exp = Experiment("ds", [tower("title", "text"), tower("image", "image")], "iisan", "blocks2", "dropped", True, None,
                     model=model, train=train)
    out = tmp_path / "run" / "metrics.json"
    result = experiment_mod.run_experiment(exp, tmp_path / "ds", [], out, device="cpu", keep_checkpoint=True)
    gates = json.loads(out.read_text())["gates"]
    assert gates == result["gates"] and set(gates) == {"title", "image", "inter"}
    best = torch.load(out.parent / "checkpoint.pt", weights_only=True)["fit"]["best_state"]  # the best epoch's model
    for name, prefix in (("title", "items.intra.0"), ("image", "items.intra.1"), ("inter", "items.inter")):
        want = [float(torch.sigmoid(best[f"{prefix}.gates.{t}.w"] / 0.1)) for t in range(3)]
        assert gates[name]["values"] == want and gates[name]["mean"] == pytest.approx(sum(want) / 3)
    assert any(g != 0.5 for v in gates.values() for g in v["values"])  # they trained
    plain = experiment_mod.make_trainer(exp, tmp_path / "ds", [], device="cpu")[0].fit(progress=False)
    strip = lambda r: {k: ([{a: b for a, b in h.items() if a not in MEASURED_FIELDS} for h in v] if k == "history" else v)  # noqa: E731
                       for k, v in r.items() if k in plain and k not in MEASURED_FIELDS}
    assert strip(result) == strip(plain)
