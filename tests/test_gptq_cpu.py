"""GPTQ on the CPU: the loading path of the Llama-3-70B-GPTQ caches, on a quantised stand-in.

Runs where the gptq extra is installed (envs/gptq.yaml: gptqmodel, optimum); skipped elsewhere.
gptqmodel quantises on the CPU and loads with its torch kernel (TorchAtenLinear); the cache is
built by the same `build_cache` -> `load_backbone` -> `AutoModel.from_pretrained` calls as the 70B.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")

from iisan.data.amazon import preprocess  # noqa: E402
from iisan.encoders.backbones import BackboneSpec, build_standin, load_backbone  # noqa: E402
from iisan.encoders.cache import build_cache  # noqa: E402
from iisan.encoders.cache_job import CacheJob  # noqa: E402

TITLES = [f"product number {n} with a title about tools and parts {n % 7}" for n in range(300)]
ENTRY = {"source": "demo", "family": "llama", "modality": "text", "layers": 2, "hidden": 128, "heads": 4, "pooling": "mean",
         "dtype": "float16", "vocab_size": 500}


@pytest.mark.slow
def test_gptq_standin_caches_close_to_its_unquantised_weights(tmp_path, monkeypatch):
    # gptqmodel 7.6 sizes its CPU pool at half the cores, below its model loader's 2 on a 2-core machine
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    gptq = BackboneSpec.from_config("tiny-gptq", dict(ENTRY, quantization="gptq"))
    plain = BackboneSpec.from_config("tiny", ENTRY)
    folders = {gptq.name: tmp_path / "gptq", plain.name: tmp_path / "plain"}
    for spec in (gptq, plain):  # the same seed: the same weights before quantisation
        build_standin(spec, folders[spec.name], TITLES, seed=3)
    model, _ = load_backbone(gptq, str(folders[gptq.name]), torch.device("cpu"))
    assert "TorchAtenLinear" in {type(m).__name__ for m in model.modules()}

    ids = [f"I{n}" for n in range(40)]
    (tmp_path / "items.tsv").write_text("".join(f"{i}\t{TITLES[n]}\n" for n, i in enumerate(ids)))
    (tmp_path / "users.tsv").write_text("".join(f"U{u}\t{' '.join(ids[u:u + 6])}\n" for u in range(34)))
    preprocess(tmp_path / "items.tsv", tmp_path / "users.tsv", tmp_path / "ds")
    caches = {}
    for spec in (gptq, plain):
        manifest = build_cache(CacheJob.for_spec(spec, "title", store_dtype="float32", batch_size=16), str(folders[spec.name]),
                               tmp_path / "ds/items.parquet", tmp_path / f"cache-{spec.name}", progress=False)
        caches[spec.name] = np.load(tmp_path / f"cache-{spec.name}/cache.npy")[1:]
        assert manifest["settings"]["quantization"] == spec.quantization
    q, f = caches["tiny-gptq"], caches["tiny"]
    assert q.shape == f.shape and np.isfinite(q).all()
    np.testing.assert_allclose(q[:, 0], f[:, 0], atol=1e-4)  # h[0]: embeddings not quantised, only stored in float16
    for layer in range(1, q.shape[1]):  # 4-bit blocks: close to the float weights, not equal
        cos = (q[:, layer] * f[:, layer]).sum(1) / (np.linalg.norm(q[:, layer], axis=1) * np.linalg.norm(f[:, layer], axis=1))
        assert 0.95 < cos.min() and not np.array_equal(q[:, layer], f[:, layer]), (layer, cos.min())
