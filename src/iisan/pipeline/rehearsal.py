"""The rehearsal of a real config on a CPU (config/rehearsal.yaml over config/paper.yaml): every
job of the real run's DAG, with each published file and each hub model swapped for a small twin
served from local folders in the real formats, so that the fetch rules run their real code paths
without a network.

`build_mirror` writes a dataset's twin into the mirror (config key ``mirror``) under the names
the config's ``dataset_sources.<name>`` gives, as its kind's ``twin`` makes it (iisan.data.kinds):
an Amazon dataset's items and users TSVs from `iisan.data.demo.generate` and its image archive as
the authors publish it (``am_image_is.zip`` holding ``am_image_is/<item_id>.jpg``,
`iisan.data.amazon.twin`); a MicroLens dataset's pairs TSV, titles CSV, covers zip and H.265
videos from `iisan.data.microlens_demo.generate` (`iisan.data.microlens.twin`). The generator
settings are the entry's ``demo`` (Amazon) or ``microlens_demo`` (MicroLens) keys.

`build_hub_snapshot` lays out a model folder as huggingface_hub caches a download (config key
``model_cache``): ``models--<org>--<name>/blobs/<sha256>``, ``snapshots/<commit>/`` of relative
links to the blobs, and ``refs/<revision>`` (none when the revision is a commit itself), so that
`huggingface_hub.snapshot_download` with ``HF_HUB_OFFLINE=1`` resolves it as it would a real
download. `build_backbone_standin` and `build_captioner_standin` make the folder: a same-family
stand-in of the registry entry (its real layer count, its configured width), stored as the hub
stores the real model: unquantised for bitsandbytes entries (quantised at load time), GPTQ-packed
for GPTQ entries where gptqmodel is installed.

Each builder writes a record (JSON) last: the rules' output, which the fetch rules take as an
input when the config says ``rehearsal: true`` (`mirror_record`, `hub_record`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path

from iisan.data.twins import file_sha256
from iisan.io import current_umask, write_json

log = logging.getLogger(__name__)

RECORDS = "resources/rehearsal/records"  # beside, not inside, the mirror and hub cache config/rehearsal.yaml names
MIRROR_RECORD = f"{RECORDS}/mirror/{{dataset}}.json"
HUB_RECORD = f"{RECORDS}/{{section}}/{{name}}.json"  # section: backbones | captioners
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def mirror_record(dataset: str) -> str:
    return MIRROR_RECORD.format(dataset=dataset)


def hub_record(section: str, name: str) -> str:
    return HUB_RECORD.format(section=section, name=name)


def mirrored(config: dict) -> list[str]:
    """The datasets of `config` whose kind has published files to rehearse (a ``twin``)."""
    from iisan.data import kinds

    return kinds.datasets(config, lambda k: k.twin is not None)


def build_mirror(dataset: str, source: dict, mirror: str | os.PathLike) -> dict:
    """Write the twin of dataset `dataset` (its ``dataset_sources`` entry `source`, of a kind with
    a ``twin``: amazon or microlens) into `mirror` under the entry's file names; returns
    {relative path: sha256} of the files written (a videos folder: its file count)."""
    from iisan.data import kinds

    kind = kinds.get(source["kind"], f"dataset_sources.{dataset}.kind")
    if kind.twin is None:
        known = " or ".join(k.name for k in kinds.KINDS.values() if k.twin is not None)
        raise ValueError(f"dataset_sources.{dataset}.kind: {kind.name!r} has no published files to rehearse ({known})")
    mirror = Path(mirror)
    mirror.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dataset}.", dir=mirror) as tmp:
        files = kind.twin(Path(tmp), source, mirror)
    log.info("dataset %s: twin of %d files or folders in %s", dataset, len(files), mirror)
    return files


# --- the hub cache ----------------------------------------------------------------------------
def repo_folder(cache: str | os.PathLike, repo_id: str) -> Path:
    """A model's folder in a hub cache, as huggingface_hub names it."""
    return Path(cache) / f"models--{repo_id.replace('/', '--')}"


def build_hub_snapshot(model_dir: str | os.PathLike, repo_id: str, cache: str | os.PathLike, revision: str | None = None) -> dict:
    """Store the files of folder `model_dir` in hub cache `cache` as the snapshot of `repo_id` at
    `revision` (None: main), replacing the repo's cached snapshots. The commit is the given
    revision when it is a 40-digit commit, else a hash of the files' names and contents. Returns
    {repo_id, revision, commit, files}."""
    model_dir = Path(model_dir)
    revision = revision or "main"
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    if not any(p.name == "config.json" for p in files):
        raise ValueError(f"{model_dir}: no config.json, so the snapshot of {repo_id} could not be loaded")
    blobs = {p.relative_to(model_dir).as_posix(): file_sha256(p) for p in files}
    commit = revision if COMMIT.match(revision) else hashlib.sha1(json.dumps(blobs, sort_keys=True).encode()).hexdigest()
    final = repo_folder(cache, repo_id)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "blobs").mkdir(parents=True)
    for rel, digest in blobs.items():
        blob = tmp / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(model_dir / rel, blob)
            os.chmod(blob, 0o666 & ~current_umask())
        link = tmp / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(final / "blobs" / digest, final / "snapshots" / commit / Path(rel).parent))
    if revision != commit:
        ref = tmp / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return {"repo_id": repo_id, "revision": revision, "commit": commit, "files": len(blobs)}


def build_backbone_standin(name: str, entry: dict, titles: list[str], out_dir: str | os.PathLike) -> None:
    """A same-family stand-in of backbone registry entry `name` in `out_dir`, stored as the hub
    stores the real model: bitsandbytes entries unquantised (transformers quantises them at load
    time), GPTQ entries packed (needs gptqmodel; `quantization: 4bit` means bitsandbytes without it)."""
    from iisan.encoders.backbones import BackboneSpec, build_standin

    spec = BackboneSpec.from_config(name, entry)
    if spec.quantization in ("bnb-4bit", "bnb-8bit"):
        spec.quantization = None
    build_standin(spec, Path(out_dir), titles, seed=zlib.crc32(name.encode()) % 2**31)


def build_captioner_standin(name: str, entry: dict, texts: list[str], out_dir: str | os.PathLike) -> None:
    """A tiny LLaVA-NeXT of captioner registry entry `name` (its ``text_family``, default mistral)."""
    from iisan.captions import build_captioner_standin as build

    build(out_dir, texts, seed=zlib.crc32(name.encode()) % 2**31, text_family=entry.get("text_family", "mistral"))


def build_hub_model(section: str, name: str, entry: dict, texts: list[str], cache: str | os.PathLike, record: str | os.PathLike) -> dict:
    """The stand-in of registry entry `name` of `section` (backbones | captioners) as the hub
    snapshot of its ``source`` at its ``revision`` in hub cache `cache`; writes `record` last."""
    build = build_backbone_standin if section == "backbones" else build_captioner_standin
    Path(cache).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".standin.", dir=Path(cache).parent) as tmp:
        folder = Path(tmp) / name
        build(name, entry, texts, folder)
        out = build_hub_snapshot(folder, entry["source"], cache, entry.get("revision"))
    write_json(Path(record), out)
    log.info("%s %s: stand-in stored as %s at commit %s in %s", section, name, entry["source"], out["commit"], cache)
    return out
