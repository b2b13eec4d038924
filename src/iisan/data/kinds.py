"""The dataset-kind registry: every kind of ``dataset_sources`` entry (its ``kind``), defined once.

A kind says which raw files its preprocessing reads (their names, where the workflow keeps them,
the function that preprocesses them), where its covers are, which rules of
workflow/rules/data.smk (and captions.smk) make its raw files, whether they are downloads the
``fetch`` target gathers, how its size is known before it is preprocessed, how the rehearsal
makes a twin of its published files, and the keys its entry must have. The workflow's input
functions and wildcard constraints (workflow/rules/common.smk), the preprocess script, the budget
(`iisan.pipeline.budget`) and the rehearsal (`iisan.pipeline.rehearsal`) read it from here. Adding a kind is one
`register(DatasetKind(...))` call plus the functions it names (in its own module), and a rule
only when its raw files come from somewhere no rule serves yet (a kind whose entry names files
on disk needs none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from iisan.data import amazon, demo, microlens, microlens_demo
from iisan.registry import Registry


def given_images(dataset: str, source: dict) -> str | None:
    """The cover archive that the entry's ``images`` names on disk (None: none)."""
    images = source.get("images")
    return images if isinstance(images, str) and images else None


def no_size(source: dict) -> None:
    return None


def spec_size(key: str) -> Callable[[dict], dict | None]:
    """A kind's `size`: users and items of the generator settings under `key` of its entry (a
    generated dataset, or the rehearsal's twin), before preprocessing drops some; None without."""

    def size(source: dict) -> dict | None:
        spec = source.get(key)
        return {"users": spec["n_users"], "items": spec["n_items"]} if spec else None

    return size


@dataclass(frozen=True)
class DatasetKind:
    name: str  # the entry's `kind`
    inputs: tuple[str, ...]  # names of the raw files its preprocessing reads, in the order `preprocess` takes them
    raw: Callable[[str, dict], dict[str, str]]  # raw(dataset, entry) -> {input: path}: where the workflow finds them
    preprocess: Callable[..., dict]  # preprocess(*raw files, out_dir, **options) -> stats (`amazon.preprocess`'s options)
    images: Callable[[str, dict], str | None] = given_images  # images(dataset, entry): its cover archive (None: none)
    # the rules that make its raw files, covers and videos (none: the entry names files on disk);
    # each rule's wildcard constraint is the datasets of the kinds that list it
    rules: tuple[str, ...] = ()
    fetch: bool = False  # its rules download published files: the `fetch` target gathers them
    size: Callable[[dict], dict | None] = no_size  # {users, items} from its entry before preprocessing (None: not known)
    # twin(tmp, entry, mirror) -> {relative path: sha256, or a folder's file count}: the rehearsal's
    # stand-in of its published files, written into the mirror (None: nothing to rehearse)
    twin: Callable[[Path, dict, Path], dict] | None = None
    required: tuple[str, ...] = ()  # keys its entry must have (the config schema)

    @property
    def fetches_videos(self) -> bool:
        """Video captions read videos that rule fetch_videos downloads (else a generated folder)."""
        return "fetch_videos" in self.rules

    def preprocess_raw(self, raw: Mapping[str, str | Path], out_dir: Path, **options) -> dict:
        """Preprocess the raw files `raw` (by input name, as rule preprocess names them) into `out_dir`."""
        return self.preprocess(*(Path(raw[k]) for k in self.inputs), Path(out_dir), **options)


NAME = r"[a-z0-9-]+"
KINDS: Registry[DatasetKind] = Registry("dataset kind", NAME, "lower-case letters, digits and '-'")
register, unregister = KINDS.register, KINDS.unregister


def get(name: str, where: str = "dataset kind") -> DatasetKind:
    return KINDS.lookup(name, where)


def names() -> list[str]:
    return list(KINDS)


def of(config: dict, dataset: str) -> DatasetKind:
    """The kind of `dataset`'s ``dataset_sources`` entry."""
    sources = config.get("dataset_sources") or {}
    if dataset not in sources:
        raise ValueError(f"dataset {dataset!r} has no entry under dataset_sources in the config (known: {sorted(sources)})")
    return get(sources[dataset].get("kind"), f"config key dataset_sources.{dataset}.kind")


def datasets(config: dict, test: Callable[[DatasetKind], object]) -> list[str]:
    """The ``dataset_sources`` names whose kind passes `test` (e.g. ``lambda k: "fetch_amazon" in k.rules``)."""
    return [n for n, s in (config.get("dataset_sources") or {}).items() if s.get("kind") in KINDS and test(KINDS[s["kind"]])]


def fetch_rules() -> list[str]:
    """The rules that download published dataset files, in registry order."""
    return list(dict.fromkeys(r for k in KINDS.values() if k.fetch for r in k.rules))


def schema_keywords() -> dict[tuple[str, ...], dict]:
    """The config schema's keywords that come from this registry, by their place in the schema
    (for `iisan.pipeline.workflow.from_code`): the kinds an entry may name, and the keys each kind requires."""
    entry = ("properties", "dataset_sources", "additionalProperties")
    return {
        (*entry, "properties", "kind"): {"enum": names()},
        entry: {"allOf": [{"if": {"properties": {"kind": {"const": k.name}}}, "then": {"required": list(k.required)}}
                          for k in KINDS.values() if k.required]},
    }


for _k in (
    # the generated demo: Amazon-format files with planted groups (rule generate_demo)
    DatasetKind("demo", amazon.INPUTS, amazon.raw_files, amazon.preprocess, images=demo.images, rules=("generate_demo",),
                size=spec_size("demo")),
    # an Amazon dataset as the authors publish it (items and users TSVs, a cover archive); its
    # rehearsal twin is generated by iisan.data.demo with the entry's `demo` settings
    DatasetKind("amazon", amazon.INPUTS, amazon.raw_files, amazon.preprocess, images=amazon.images,
                rules=("fetch_amazon", "fetch_amazon_images"), fetch=True, size=spec_size("demo"), twin=amazon.twin, required=("items", "users")),
    # MicroLens-100k as published; its videos are fetched for video captions only
    DatasetKind("microlens", microlens.INPUTS, microlens.raw_files, microlens.preprocess, images=microlens.images,
                rules=("fetch_microlens", "fetch_videos"), fetch=True, size=spec_size("microlens_demo"), twin=microlens_demo.twin,
                required=("pairs", "titles")),
    # the generated MicroLens-format twin (pairs TSV, titles CSV, covers, short H.265 videos)
    DatasetKind("microlens-demo", microlens.INPUTS, microlens.raw_files, microlens.preprocess, images=microlens.covers,
                rules=("generate_microlens_demo",), size=spec_size("microlens_demo")),
):
    register(_k)
