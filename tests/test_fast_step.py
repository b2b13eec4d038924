"""The step builder (iisan.training.fast_step): which speed settings apply where, and that they keep the arithmetic."""

import pytest
import torch

from iisan.config import Speed
from iisan.data.synthetic import tiny_caches
from iisan.encoders.backbones import BackboneSpec
from iisan.encoders.finetune import prepare_backbone
from iisan.training.fast_step import Precision, graph_features, on_device, prepare_backbones
from iisan.training.features import BackboneFeatures, BackboneTower, CachedFeatures, IdFeatures, Tower
from iisan.training.train import TrainConfig

from conftest import stable, trainer

N = 12


def tiny_backbones(finetune: str, item_slots: str = "distinct") -> BackboneFeatures:
    """A 2-layer BERT of width 32 with random weights over N items of 8 tokens."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100),
                     add_pooling_layer=False)
    bert = prepare_backbone(bert, "bert", finetune)
    spec = BackboneSpec.from_config("bert-tiny", {"source": "random", "family": "bert", "modality": "text", "layers": 2, "hidden": 32})
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1, 100, (N + 1, 8), generator=g), "attention_mask": torch.ones(N + 1, 8, dtype=torch.long)}
    return BackboneFeatures([BackboneTower(Tower(spec, "", "title", [0, 1, 2]), bert, inputs)], finetune, item_slots)


def test_where_a_cuda_graph_takes_the_features():
    speed = Speed(cuda_graphs=True)
    assert graph_features(CachedFeatures(tiny_caches()), speed) == "inside"
    assert graph_features(IdFeatures(N), speed) == "inside"
    assert graph_features(tiny_backbones("frozen"), speed) == "before"
    assert graph_features(tiny_backbones("bitfit"), speed) is None
    assert graph_features(tiny_backbones("bitfit"), Speed(cuda_graphs=True, graph_backbones=True)) == "inside"


def test_settings_follow_the_device():
    """A CPU neither compiles with inductor nor uses mixed precision, whatever the training config says."""
    cpu = torch.device("cpu")
    s = on_device(TrainConfig(precision="fp16", compile=True, cuda_graphs=True), cpu)
    assert (s.precision, s.compile, s.cuda_graphs) == ("fp16", False, True)
    assert on_device(Speed(compile=True, compile_backend="eager"), cpu).compile
    assert Precision("fp16", cpu).dtype is None and Precision("bf16", cpu).eval_dtype is None
    cuda = Precision("fp16", torch.device("cuda"))  # no card needed to read the choice
    assert (cuda.dtype, cuda.eval_dtype) == (torch.float16, None)
    assert Precision("bf16", torch.device("cuda")).eval_dtype == torch.bfloat16


@pytest.mark.parametrize("finetune", ["frozen", "bitfit"])
def test_prepare_backbones_lowers_only_frozen_weights_and_compiles_layers(finetune):
    source = tiny_backbones(finetune)
    prepare_backbones(source, Speed(compile=True, compile_backend="eager"), Precision("bf16", torch.device("cuda")),
                      torch.device("cpu"))
    dtypes = {p.dtype for p in source.towers[0].backbone.parameters()}
    assert dtypes == ({torch.bfloat16} if finetune == "frozen" else {torch.float32})
    assert source.pad_to == 1  # on a CPU the distinct items keep their number
    assert all(layer._compiled_call_impl is not None for layer in source.towers[0].backbone.encoder.layer)


def test_padding_the_distinct_items_keeps_the_features():
    """`pad_to` (set on CUDA) only repeats an item whose extra rows are dropped (the same
    features up to the rounding of a larger matmul)."""
    source = tiny_backbones("frozen").train()  # frozen backbones run in eval mode
    ids = torch.tensor([3, 0, 5, 3, 7, 11, 0, 5])
    plain = source.gather(ids)
    source.pad_to = 32
    padded = source.gather(ids)
    assert [f.shape for f in padded] == [(8, 3, 32)]
    for a, b in zip(plain, padded):
        torch.testing.assert_close(a, b)


def test_compiled_steps_train_exactly_as_the_plain_one():
    """Compiled encoders (dynamo's eager backend, the same operations) or the whole forward
    compiled: the same losses and metrics as the plain step."""
    plain = stable(trainer(max_epochs=1).fit(progress=False))
    for speed in ({"compile": True, "compile_backend": "eager"},
                  {"compile": True, "compile_forward": True, "compile_backend": "eager"}):
        assert stable(trainer(max_epochs=1, **speed).fit(progress=False)) == plain
