import pytest
import torch

from iisan.config import TrainConfig
from iisan.training.model import SANB, Gate, InterSAN, IntraSAN, ItemEncoder, ModelConfig, Recommender


def test_sanb_initialisation():
    torch.manual_seed(0)
    block = SANB(768, 64)
    for lin in (block.down, block.up):
        assert torch.all(lin.bias == 0)
        assert abs(lin.weight.std().item() - 0.01) < 5e-4
        assert abs(lin.weight.mean().item()) < 5e-4
    x = torch.randn(3, 768)
    expected = x + torch.relu(x @ block.down.weight.T) @ block.up.weight.T
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_gate_starts_at_one_half_with_temperature():
    gate = Gate(0.1)
    assert gate.w.item() == 0.0 and gate().item() == 0.5
    with torch.no_grad():
        gate.w.fill_(0.2)
    assert torch.isclose(gate(), torch.sigmoid(torch.tensor(2.0)))


def test_intra_tower_recursion():
    torch.manual_seed(0)
    tower = IntraSAN(8, 3, 4)
    with torch.no_grad():
        tower.gates[1].w.fill_(0.1)
    h = torch.randn(5, 3, 8)
    s = torch.zeros(5, 8)
    for t in range(3):
        g = torch.sigmoid(tower.gates[t].w / 0.1)
        s = tower.blocks[t](g * h[:, t] + (1 - g) * s)
    assert torch.allclose(tower(h), s)
    plain = IntraSAN(8, 3, 4, gated=False)
    s = torch.zeros(5, 8)
    for t in range(3):
        s = plain.blocks[t](h[:, t] + s)
    assert torch.allclose(plain(h), s)


def test_inter_tower_maps_the_wider_side():
    tower = InterSAN(16, 8, 4, 4)
    assert tower.map_a is not None and tower.map_b is None
    assert tower.map_a[0].proj.in_features == 16 and tower.map_a[0].proj.out_features == 8
    assert tower(torch.randn(3, 4, 16), torch.randn(3, 4, 8)).shape == (3, 8)
    assert InterSAN(8, 8, 2, 4).map_a is None


@pytest.mark.parametrize(
    "method,dims,fusion_in",
    [
        ("iisan", [32, 32], 192),
        ("no-gate", [32, 32], 192),
        ("no-inter", [32, 32], 128),
        ("no-intra", [32, 32], 64),
        ("frozen", [32, 32], 128),
        ("iisan", [32], 64),
    ],
)
def test_item_encoder_variants(method, dims, fusion_in):
    enc = ItemEncoder(ModelConfig(method=method), dims, [7] * len(dims))
    assert enc.fusion.in_features == fusion_in
    out = enc([torch.randn(10, 7, d) for d in dims])
    assert out.shape == (10, 64)
    gates = [m for m in enc.modules() if isinstance(m, Gate)]
    assert (len(gates) == 0) == (method in ("no-gate", "frozen"))


@pytest.mark.parametrize(
    "dims,image,inter,expected",
    [
        ([32, 32], None, None, (64, 64, 64)),
        ([32, 32], 512, None, (64, 512, 64)),  # equal widths: the inter tower takes the text's r
        ([48, 32], 512, None, (64, 512, 512)),  # text wider: the image's (Code_Cached_Asym)
        ([32, 48], 512, None, (64, 512, 64)),  # image wider: the text's
        ([48, 32], 512, 16, (64, 512, 16)),
    ],
)
def test_bottleneck_per_tower(dims, image, inter, expected):
    """bottleneck sizes the text (field 0) tower's SANBs, bottleneck_image the image (field 1)
    tower's, bottleneck_inter (or the authors' rule) the inter tower's; nothing else changes."""
    enc = ItemEncoder(ModelConfig(bottleneck_image=image, bottleneck_inter=inter), dims, [7, 7])
    for tower, r, d in zip((*enc.intra, enc.inter), expected, (*dims, min(dims))):
        assert {(b.down.in_features, b.down.out_features, b.up.in_features, b.up.out_features) for b in tower.blocks} == {(d, r, r, d)}
    assert len(enc.inter.blocks) == 7 and enc.fusion.in_features == 192
    alone = ItemEncoder(ModelConfig(bottleneck_image=512), [32], [7])  # one field: field 0's r
    assert alone.intra[0].blocks[0].down.out_features == 64


def test_vs_heads_and_learning_rate_groups():
    """The authors' name rules (Code_Cached/run.py): text head F (`fc_bert`) 5e-5, image head F
    (`fc_cv`) and image gates (`side_gate_params_cv`) at the image rate 1e-4, SANBs at the adapter
    rate 1e-4; text gates, inter gates, DTLs, P maps, the inter head, the fusion and the user
    encoder at the main rate 2e-4."""
    model = Recommender(ModelConfig(), [32, 48], [7, 7])
    items = model.items
    head = items.heads[0]
    assert (head.F.in_features, head.F.out_features, head.P.out_features) == (32, 32, 64)
    groups = {g["name"]: g for g in model.param_groups(TrainConfig(lr_main=2e-4, lr_san=1e-4, lr_text_f=5e-5, lr_image_f=1e-4))}
    assert {k: g["lr"] for k, g in groups.items()} == {"main": 2e-4, "san": 1e-4, "text_f": 5e-5, "image_f": 1e-4}

    def ids(*mods):
        return {id(p) for m in mods for p in m.parameters()}

    got = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    assert got["text_f"] == ids(items.heads[0].F) and got["image_f"] == ids(items.heads[1].F)
    assert got["san"] == ids(*(t.blocks for t in items.intra), items.inter.blocks, items.intra[1].gates)
    assert ids(items.intra[0].gates, items.inter.gates, items.inter.map_b, items.fusion, model.user, items.inter_head,
               items.heads[0].P, items.heads[1].P) <= got["main"]
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_user_encoder_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    model = Recommender(ModelConfig(), [16], [3]).eval()
    e = torch.randn(2, 10, 64)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False
    out = model.user(e, valid)
    e2 = e.clone()
    e2[:, 7:] += 1.0  # the future does not change the past
    e2[1, :4] = 5.0  # padding content does not matter
    out2 = model.user(e2, valid)
    assert torch.allclose(out[:, :7][valid[:, :7]], out2[:, :7][valid[:, :7]], atol=1e-5)
