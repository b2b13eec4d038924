"""bitsandbytes 4-bit on the CPU: both of its kernel paths, whatever CPU runs the suite.

On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in eval mode for a fused kernel
(`_convert_weight_packed_for_cpu`); elsewhere it dequantises on a reference path. The repacking
is plain torch code, so it is exercised here on every 4-bit stand-in shape on any CPU; the fused
kernel itself only runs where the CPU has the instructions.
"""

import copy
import dataclasses

import pytest
import torch
import yaml

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import (  # noqa: E402
    _convert_weight_packed_for_cpu,
    _convert_weight_packed_for_cpu_inverse,
    dequantize_4bit,
    has_avx512bf16,
)

from iisan.encoders.backbones import BackboneSpec, bnb_cpu_repackable, build_standin, keep_bnb_cpu_reference_path, load_backbone  # noqa: E402

from conftest import ROOT  # noqa: E402

TITLES = ["red round lamp", "blue square lamp", "green round cup", "small blue cup"]


def four_bit_standins():
    """(config file, name, registry entry) of every 4-bit stand-in the workflow ships."""
    out = []
    for cfg in ("config/config.yaml", "tests/configs/tiny.yaml"):
        for name, entry in yaml.safe_load((ROOT / cfg).read_text())["backbones"].items():
            if entry.get("source") == "demo" and entry.get("quantization") in ("4bit", "bnb-4bit"):
                out.append(pytest.param(cfg, name, entry, id=f"{cfg}:{name}"))
    assert out, "no 4-bit stand-in found"
    return out


def _linear4bit(in_features, out_features, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features)
    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # quantises


def _reference(layer, x):
    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return x @ w.T + layer.bias


@pytest.mark.parametrize("cfg,name,entry", four_bit_standins())
def test_every_4bit_standin_layer_repacks_for_the_avx512_kernel(cfg, name, entry, tmp_path):
    """One block of the stand-in has every layer shape it has; each must survive the repacking
    (and its inverse, used when saving) on any CPU."""
    spec = dataclasses.replace(BackboneSpec.from_config(name, entry), layers=1, quantization="bnb-4bit")
    build_standin(spec, tmp_path / name, TITLES)
    model, _ = load_backbone(spec, str(tmp_path / name), torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        assert bnb_cpu_repackable(layer), (
            f"{cfg}: backbones.{name}: a {layer.in_features}->{layer.out_features} 4-bit layer cannot take "
            "bitsandbytes' AVX512-BF16 CPU path (in_features must be a multiple of 64, out_features of 32)"
        )
        data, state = layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
        packed, packed_state = _convert_weight_packed_for_cpu(data.clone(), copy.deepcopy(state))
        assert packed.shape == (layer.out_features, layer.in_features // 2)
        assert packed_state.absmax.shape == (layer.in_features // state.blocksize, layer.out_features)
        restored, _ = _convert_weight_packed_for_cpu_inverse(packed, packed_state)
        assert torch.equal(restored.view(torch.uint8), data.view(torch.uint8))


@pytest.mark.parametrize("fast_path", [False, True], ids=["reference", "avx512bf16"])
def test_4bit_eval_forward_on_both_cpu_paths(fast_path):
    if fast_path and not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes' fused CPU kernel cannot run here")
    layer = _linear4bit(128, 64)
    x = torch.randn(5, 128)
    expected = _reference(layer, x)
    layer.support_avx512bf16_for_cpu = fast_path
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) is fast_path
    tol = 0.05 if fast_path else 1e-4  # the fused kernel computes in bf16
    assert torch.allclose(y, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(32, 32), (96, 32), (64, 48), (4096, 8)])
def test_layers_too_narrow_for_the_fused_kernel_use_the_reference_path(shape):
    """A 32-wide stand-in or a Mixtral router (8 outputs) fails the repacking; the loader keeps
    such layers on the reference path, whatever the CPU."""
    layer = _linear4bit(*shape)
    assert not bnb_cpu_repackable(layer)
    layer.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on an AVX512-BF16 CPU
    with pytest.raises((RuntimeError, AssertionError)):
        _convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
    model = torch.nn.Sequential(layer)
    assert keep_bnb_cpu_reference_path(model) == 1
    model.eval()
    x = torch.randn(3, shape[0])
    with torch.no_grad():
        assert torch.allclose(model(x), _reference(layer, x), atol=1e-4)
