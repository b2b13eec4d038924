"""`CacheJob`: what one cache job computes, as one typed object (no torch: the workflow's
planning imports it).

The workflow's cache rule passes it as its one param (`CacheJob.from_config(...).to_dict()`)
and the budget prices a cache job from the same object, so that a setting is derived in one
place; the job's files are the rule's input and output."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from iisan.config import backbone_entry
from iisan.encoders.backbones import BackboneSpec

STORE_DTYPES = ("float16", "float32")  # what a cache stores (config cache.dtype, resolved per backbone)


@dataclass(frozen=True)
class CacheJob:
    """One cache job: backbone `backbone` (its registry entry `entry`, as configured) over item
    field `field`, `batch_size` items per batch, states stored as `store_dtype`.

    The job holds the entry, not a `BackboneSpec`: `spec` builds the spec where it is read, so
    an entry's `quantization: 4bit` is resolved (GPTQ or bitsandbytes) in the environment that
    loads the model, as for the stand-in and training jobs."""

    backbone: str
    entry: dict[str, Any]
    field: str
    batch_size: int = 64  # the default of config cache.batch_size
    store_dtype: str = "float16"

    def __post_init__(self):
        object.__setattr__(self, "entry", dict(self.entry))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"cache.batch_size: {self.batch_size!r} is not a positive integer")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"cache job {self.backbone}/{self.field}: store dtype {self.store_dtype!r} is not one of "
                             f"{', '.join(STORE_DTYPES)}")
        self.spec  # noqa: B018 (an entry the registry rejects stops the job's construction, at planning)

    @cached_property
    def spec(self) -> BackboneSpec:
        """The backbone's spec, built from its entry."""
        return BackboneSpec.from_config(self.backbone, self.entry)

    @classmethod
    def from_config(cls, config: dict, field: str, backbone: str) -> CacheJob:
        """The cache job of backbone `backbone` over `field` under a workflow config: its registry
        entry and config `cache` (batch_size; dtype, resolved for the backbone by
        `BackboneSpec.cache_dtype`)."""
        entry = backbone_entry(config, backbone)
        section = config.get("cache") or {}
        spec = BackboneSpec.from_config(backbone, entry)
        return cls(backbone, entry, field, batch_size=section.get("batch_size", cls.batch_size),
                   store_dtype=spec.cache_dtype(section.get("dtype", "auto")))

    @classmethod
    def for_spec(cls, spec: BackboneSpec, field: str, **settings) -> CacheJob:
        """The cache job of a `BackboneSpec` made in code (tests, benchmarks): its entry is the
        spec's fields and extras, from which `spec` builds an equal spec."""
        entry = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in ("name", "extra")}
        return cls(spec.name, {**entry, **spec.extra}, field, **settings)

    def to_dict(self) -> dict:
        return {"backbone": self.backbone, "entry": dict(self.entry), "field": self.field,
                "batch_size": self.batch_size, "store_dtype": self.store_dtype}

    @classmethod
    def from_dict(cls, d: dict) -> CacheJob:
        return cls(**d)
