"""The method registry: every method of the paper and its baselines, defined once.

A method says what its item encoder is, which parts of the side network it has, which backbone
tensors train and how it may read the backbones' states. The model (`iisan.training.model`), the planning
of runs and tables (`iisan.pipeline.plan`), the tables' row labels (`iisan.tables`) and the workflow's
config checks read it from here. Adding a method is one `register(Method(...))` call plus the
code of whatever new part it needs.

Table III and Fig. 5 name their rows by *row tokens*: a method's name (its default way of reading
states, `caches[0]`) or, for a method that can also run with the backbones in the training loop,
``<name>-uncached``.
"""

from __future__ import annotations

from dataclasses import dataclass

from iisan.registry import Registry

ITEM_ENCODERS = ("side", "last", "id")
FINETUNE = ("frozen", "fft", "adapter", "lora", "bitfit")
CACHES = ("dropped", "full", "none")  # none: the backbones run inside the training loop
UNCACHED_SUFFIX = "-uncached"
NAME = r"[a-z0-9-]+"  # a method's name: a path component and the workflow's {method} wildcard


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # row label in the tables
    # side: the IISAN side network over the states a LayerDrop scheme keeps; last: one head per
    # field on the backbone's output state (h[L]; for ViT after its final LayerNorm); id: a
    # learned embedding per item (no content)
    items: str = "side"
    intra: bool = True  # side network: per-field (intra-modal) towers
    inter: bool = True  # side network: the cross-modal tower (with two fields)
    gated: bool = True  # side network: learned gates (else plain sums)
    heads: str | None = None  # vs | va; None: the config's model.heads
    user: str = "sasrec"  # user encoder: sasrec | gru4rec
    finetune: str | None = "frozen"  # backbone tensors that train (None: no backbone at all)
    caches: tuple[str, ...] = ("dropped", "full", "none")  # ways to read states; the first is the default
    # asymmetric towers (IISAN-VA): in Table III its text tower is `table3.va_text_encoder`, and
    # its LayerDrop scheme gives both towers as many blocks (iisan.pipeline.plan.va_scheme)
    asymmetric: bool = False

    def __post_init__(self):
        if self.items not in ITEM_ENCODERS:
            raise ValueError(f"method {self.name}: items {self.items!r} is not one of {', '.join(ITEM_ENCODERS)}")
        if self.finetune is not None and self.finetune not in FINETUNE:
            raise ValueError(f"method {self.name}: finetune {self.finetune!r} is not one of {', '.join(FINETUNE)}")
        if not self.caches or any(c not in CACHES for c in self.caches):
            raise ValueError(f"method {self.name}: caches {self.caches!r} must be some of {', '.join(CACHES)}")
        if self.finetune not in ("frozen",) and self.caches != ("none",):
            raise ValueError(f"method {self.name}: a method whose backbones train (or with none) runs uncached only")

    @property
    def is_id(self) -> bool:
        return self.items == "id"

    @property
    def reads_last(self) -> bool:
        """Reads the output state only: its runs use the LayerDrop scheme "last" whatever is asked."""
        return self.items == "last"

    @property
    def default_cache(self) -> str:
        return self.caches[0]

    def scheme(self, default: str) -> str:
        """The LayerDrop scheme of this method's runs when the table's default is `default`."""
        return "none" if self.is_id else "last" if self.reads_last else default


def _check(method: Method) -> None:
    if method.name.endswith(UNCACHED_SUFFIX):
        raise ValueError(f"method {method.name!r}: names ending in {UNCACHED_SUFFIX!r} are row tokens")


METHODS: Registry[Method] = Registry("method", NAME, "lower-case letters, digits and '-'",
                                     ", as it names the run's folder and the workflow's {method} wildcard", _check)
register, unregister = METHODS.register, METHODS.unregister


def get(name: str, where: str = "method") -> Method:
    return METHODS.lookup(name, where)


def row_tokens() -> list[str]:
    """Every Table III / Fig. 5 row token."""
    out = []
    for m in METHODS.values():
        out.append(m.name)
        if m.default_cache != "none" and "none" in m.caches:
            out.append(m.name + UNCACHED_SUFFIX)
    return out


def row(token: str, where: str = "row") -> tuple[Method, str, str]:
    """(method, label, cache) of a row token."""
    if token.endswith(UNCACHED_SUFFIX) and token not in METHODS:
        m = get(token[: -len(UNCACHED_SUFFIX)], where)
        if "none" not in m.caches or m.default_cache == "none":
            raise ValueError(f"{where}: method {m.name!r} has no uncached variant")
        return m, f"{m.label} (uncached)", "none"
    if token not in METHODS:
        raise ValueError(f"{where}: unknown row {token!r} (known: {', '.join(row_tokens())})")
    m = METHODS[token]
    return m, m.label, m.default_cache


def check_cache(name: str, cache: str) -> Method:
    m = get(name)
    if cache not in m.caches:
        why = ("it is ID-based and reads no backbone states" if m.is_id
               else "it fine-tunes its backbones, so they run in the loop" if m.finetune != "frozen" else "")
        raise ValueError(f"method {name!r} runs with cache {' | '.join(m.caches)}, not {cache!r}" + (f": {why}" if why else ""))
    return m


for _m in (
    # IISAN-VS takes model.heads (vs unless a dataset_model entry says otherwise: the authors ran
    # it on MicroLens with their asymmetric code's heads, docs/method.md §4)
    Method("iisan", "IISAN-VS"),
    Method("iisan-va", "IISAN-VA", heads="va", asymmetric=True),
    Method("no-gate", "w/o gate", gated=False),
    Method("no-inter", "w/o inter", inter=False),
    Method("no-intra", "w/o intra", intra=False),
    Method("frozen", "frozen backbone", items="last"),
    # the ablations of IISAN-VA (Table VI): its heads and asymmetric towers
    Method("no-gate-va", "w/o gate", gated=False, heads="va", asymmetric=True),
    Method("no-inter-va", "w/o inter", inter=False, heads="va", asymmetric=True),
    Method("no-intra-va", "w/o intra", intra=False, heads="va", asymmetric=True),
    # embedded fine-tuning baselines (Table III): the backbones train inside the loop
    Method("fft", "FFT", items="last", finetune="fft", caches=("none",)),
    Method("adapter", "Adapter", items="last", finetune="adapter", caches=("none",)),
    Method("lora", "LoRA", items="last", finetune="lora", caches=("none",)),
    Method("bitfit", "BitFit", items="last", finetune="bitfit", caches=("none",)),
    # ID-based recommenders
    Method("sasrec-id", "SASRec (ID)", items="id", finetune=None, caches=("none",)),
    Method("gru4rec", "GRU4Rec (ID)", items="id", user="gru4rec", finetune=None, caches=("none",)),
):
    register(_m)
