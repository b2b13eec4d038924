"""Hub models fetched before the GPU jobs (iisan.encoders.models_fetch, rules fetch_backbone and
fetch_captioner) through huggingface_hub's real code path, without a network: a snapshot laid out
in the hub cache's format, read with HF_HUB_OFFLINE=1."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iisan.encoders.backbones import BackboneSpec, build_standin, built_by_workflow, load_backbone, resolve_source
from iisan.encoders.models_fetch import ModelFetchError, disk_gb, fetch_model, is_hub_id

REPO = "example-org/tiny-bert"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SPEC = BackboneSpec(name="tiny", source=REPO, family="bert", modality="text", layers=2, hidden=32, heads=2,
                    extra={"vocab_size": 200})
# files a PyTorch load never reads: left out of the model's folder
JUNK = {"tf_model.h5": b"tf", "original/consolidated.00.pth": b"meta", "pytorch_model.bin": b"pickled copy"}


def hub_cache(tmp_path: Path) -> tuple[Path, Path]:
    """(cache, stand-in folder): a tiny BERT saved with save_pretrained, laid out as huggingface_hub
    caches a download: blobs named by their hash, snapshots/<commit>/ of relative links, refs/main."""
    model = tmp_path / "standin"
    build_standin(SPEC, model, ["a tiny title", "another tiny title"])
    files = {p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    files.update(JUNK)
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache, model


def test_offline_snapshot_in_the_hub_cache_becomes_the_models_folder(tmp_path):
    """snapshot_download resolves refs/main to the cached snapshot with HF_HUB_CACHE and
    HF_HUB_OFFLINE=1 (a fresh process: huggingface_hub reads both at import); its files are
    hard-linked into the model's folder without the other frameworks' weights, and the backbone
    loads from it exactly as from the original."""
    cache, model = hub_cache(tmp_path)
    dest = tmp_path / "resources/backbones/tiny"
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_TOKEN="")
    code = (f"from iisan.encoders.models_fetch import fetch_model; import json; "
            f"print(json.dumps(fetch_model({REPO!r}, {str(dest)!r}, what='backbone tiny')))")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert record["commit"] == COMMIT and record["revision"] == "main" and record["repo_id"] == REPO
    assert json.loads((dest / ".fetched.json").read_text()) == record
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    want = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    assert got == sorted([*want, ".fetched.json"])  # no tf_model.h5, original/, pytorch_model.bin
    weights = dest / "model.safetensors"
    assert not weights.is_symlink() and weights.stat().st_nlink == 2  # a hard link to the cache's blob
    ids = {"input_ids": torch.tensor([[2, 7, 9, 3]])}
    states = [load_backbone(SPEC, str(p), torch.device("cpu"))[0](**ids, output_hidden_states=True).hidden_states
              for p in (model, dest)]
    assert all(torch.equal(a, b) for a, b in zip(*states))


def test_refetch_replaces_the_folder_whole(tmp_path, monkeypatch):
    import huggingface_hub

    cache, _ = hub_cache(tmp_path)
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    monkeypatch.setattr("iisan.encoders.models_fetch._repo_files", lambda repo, rev: None)
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "stale.safetensors").write_bytes(b"from another revision")
    fetch_model(REPO, dest, revision="v1")
    assert not (dest / "stale.safetensors").exists() and (dest / "config.json").is_file()
    assert json.loads((dest / ".fetched.json").read_text())["revision"] == "v1"


def _hub_error(cls, message):
    """A huggingface_hub HTTP error as the hub raises it (they carry the response)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    response = httpx.Response(403 if "Gated" in cls.__name__ else 404, request=httpx.Request("GET", "https://huggingface.co/x"))
    return cls(message, response=response)


@pytest.mark.parametrize("error, says", [
    ("GatedRepoError", r"backbone llama3-8b \(meta-llama/Meta-Llama-3-8B at revision main\) is gated: accept its licence at "
                       r"https://huggingface.co/meta-llama/Meta-Llama-3-8B .*HF_TOKEN"),
    ("RepositoryNotFoundError", r"no model at https://huggingface.co/meta-llama/Meta-Llama-3-8B, or a private one"),
    ("RevisionNotFoundError", r"has no revision 'main'; set the entry's revision"),
])
def test_hub_errors_name_the_model_and_its_page(tmp_path, monkeypatch, error, says):
    import huggingface_hub
    from huggingface_hub import errors

    def refuse(*args, **kwargs):
        raise _hub_error(getattr(errors, error), "403 Client Error. Cannot access gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr("iisan.encoders.models_fetch._repo_files", lambda repo, rev: None)
    with pytest.raises(ModelFetchError, match=says):
        fetch_model("meta-llama/Meta-Llama-3-8B", tmp_path / "m", what="backbone llama3-8b")
    assert not (tmp_path / "m").exists()


def test_uncached_model_offline_says_where_to_put_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelFetchError, match=r"not in the hub cache .* cannot be reached; .* place the model's files in .*/m"):
        fetch_model(REPO, tmp_path / "m", cache_dir=str(tmp_path / "empty"), what="backbone tiny")


def test_hub_sources_load_from_the_workflows_folder_offline(tmp_path, monkeypatch):
    """A hub backbone is one the workflow provides (resources/backbones/<name>); a local folder
    loads with local_files_only, so a compute node never reaches for the hub."""
    import transformers

    assert is_hub_id(REPO) and built_by_workflow(REPO)
    assert not is_hub_id("demo") and not is_hub_id("package:x") and not is_hub_id(str(tmp_path))
    assert resolve_source(SPEC, tmp_path) == str(tmp_path) and resolve_source(SPEC) == REPO
    build_standin(SPEC, tmp_path / "m", ["a title"])
    seen = []
    for cls in (transformers.AutoModel, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, _r=real, **k: seen.append(k) or _r(c, *a, **k)))
    load_backbone(SPEC, str(tmp_path / "m"), torch.device("cpu"))
    assert len(seen) == 2 and all(k.get("local_files_only") is True for k in seen)


def test_disk_of_a_model_as_published():
    assert disk_gb({"family": "llama", "params_b": 70.6, "quantization": "gptq"}) == pytest.approx(38.8, abs=0.1)
    assert disk_gb({"family": "mixtral", "params_b": 46.7, "quantization": "bnb-4bit"}) == pytest.approx(93.4)
    assert disk_gb({"family": "bert", "params_b": 0.11}) == pytest.approx(0.44)
    assert disk_gb({"source": "llava-hf/llava-v1.6-34b-hf", "params_b": 34.8}) == pytest.approx(69.6)


@pytest.mark.slow
def test_paper_config_fetches_every_model_and_archive_on_the_submit_host(root, tmp_path):
    """The paper's Table IV from a clean checkout: the image archive and the 16 backbones are
    fetched by local rules, each cache job reads its backbone's fetched folder, and the GPTQ
    backbones cache in the conda environment that has gptqmodel."""
    from test_workflow import SNAKEMAKE, copy_workflow, run

    wd = copy_workflow(root, tmp_path)
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/paper.yaml", "--", "results/table4.csv"], wd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    stats = out[out.index("Job stats"):]
    for rule, n in (("fetch_backbone", 16), ("fetch_amazon_images", 1), ("cache", 16)):
        assert re.search(rf"^{rule}\s+{n}$", stats, re.M), (rule, stats)
    code = """
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings import types as t
with SnakemakeApi(t.OutputSettings()) as api:
    w = api.workflow(resource_settings=t.ResourceSettings(), storage_settings=t.StorageSettings(), snakefile=Path('Snakefile'),
                     config_settings=t.ConfigSettings(configfiles=[Path('config/paper.yaml')]), workdir=Path('.'))._workflow
    print(sorted(r.name for r in w.rules if w.is_local(r)))
    for b in ('llama3-70b-gptq', 'bert-base'):
        print(b, Path(w.get_rule('cache').expand_conda_env({'dataset': 'Scientific', 'field': 'title', 'backbone': b}).file).name)
"""
    res = run([sys.executable, "-c", code], wd)
    assert res.returncode == 0, res.stderr[-3000:]
    local, gptq, bert = res.stdout.strip().splitlines()[-3:]
    assert (gptq, bert) == ("llama3-70b-gptq gptq.yaml", "bert-base iisan.yaml")  # the 70B caches where gptqmodel is
    assert all(f"'{r}'" in local for r in ("fetch_backbone", "fetch_captioner", "fetch_amazon_images", "fetch_amazon")), local
    assert re.search(r"input: resources/Scientific/items.parquet, resources/backbones/llama3-70b-gptq/config.json\n"
                     r"\s+output: resources/cache/Scientific/title/llama3-70b-gptq/cache.npy", out), out[-3000:]


def test_plan_reports_the_disk_of_every_model_and_cache(paper_graph):
    """`iisan plan`'s disk table for the paper: each fetched model at its published size, the
    caches each backbone's runs read (full and pruned), and the totals."""
    from iisan.encoders.models_fetch import disk_report
    from iisan.pipeline.budget import Budget

    report = disk_report(Budget(paper_graph.config).build(paper_graph))
    rows = {line.split()[0]: line.split() for line in report.splitlines()[2:] if len(line.split()) == 5}
    assert rows["llama3-70b-gptq"][1:3] == ["TechxGenus/Meta-Llama-3-70B-GPTQ", "38.8"]
    assert rows["llava-34b"][2:4] == ["69.6", "0"] and rows["mixtral-8x7b"][2] == "93.4"
    assert int(rows["bert-base"][3]) > 3  # full and pruned caches on every dataset
    total = report.splitlines()[-2].split()
    assert total[0] == "total" and 400 < float(total[1]) < 500 and float(total[3]) > 100
    assert report.splitlines()[-1].startswith("18 of the fetched models have no revision")


@pytest.mark.slow
def test_fetch_keeps_going_past_a_model_it_cannot_fetch_and_lists_it(root, tmp_path):
    """`snakemake --keep-going ... -- fetch` (README, Reproducing the paper): a model missing from
    the hub (a licence not accepted, a misspelt id) does not stop the others, and the run ends with
    the list of what was not fetched, each with its error and log."""
    from conftest import SNAKEMAKE, copy_workflow, run

    cache, _ = hub_cache(tmp_path)
    (tmp_path / "wd").mkdir()
    wd = copy_workflow(root, tmp_path / "wd")
    entry = "{family: bert, modality: text, layers: 2, hidden: 32, heads: 2, pooling: cls, dtype: float32}"
    (wd / "fetch.yaml").write_text(
        f"model_cache: {cache}\ndatasets: [demo]\ntables: []\nfigures: []\n"
        f"backbones:\n  present: {{source: {REPO}, {entry[1:]}\n  refused: {{source: example-org/gated-model, {entry[1:]}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="")
    res = run(SNAKEMAKE + ["--cores", "2", "--keep-going", "--configfile", "fetch.yaml", "--", "fetch"], wd, env=env)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert (wd / "resources/backbones/present/config.json").exists(), out[-3000:]
    tail = out[out.index("fetch: 1 of 2 not fetched:"):]
    assert re.search(r"resources/backbones/refused/config.json: (?:\S*ModelFetchError|error): backbone refused "
                     r"\(example-org/gated-model at revision main\).*\(log: logs/backbones/refused.log\)", tail), tail
