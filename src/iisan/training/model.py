"""The IISAN side network, its ablations and the SASRec user encoder (docs/method.md §4-5).

Names follow the paper: `SANB` (side adapted network block), `Gate`, `IntraSAN` (one modality's
tower), `InterSAN` (the cross-modal tower), `DimensionTransform` (DTL, IISAN-VA), `UserEncoder`.
Towers are generic over item *fields*: field 0 plays the paper's "text" role and field 1 the
"image" role; with one field the model is that field's intra tower alone.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from iisan.config import ModelConfig, TrainConfig
from iisan.training import distributed, methods
from iisan.training.loss import inbatch_debiased_ce

if TYPE_CHECKING:
    from iisan.training.features import BackboneFeatures, FeatureSource

__all__ = ["ModelConfig", "Recommender", "ItemEncoder", "UserEncoder"]


# Weight initialisation, one function per module family. Each runs on modules already built (so
# the default initialisations draw first, in construction order: a seed gives the same weights).


def init_side_linear(lin: nn.Linear) -> None:
    """Side network (SANB) linears: weights N(0, 0.01^2), biases 0."""
    nn.init.normal_(lin.weight, std=0.01)
    nn.init.zeros_(lin.bias)


def init_xavier(mod: nn.Linear | nn.Embedding, parts: int = 1) -> None:
    """Recommender linears and embeddings: Xavier-normal weights, zero biases, and a zero
    padding row for an embedding with a `padding_idx`. `parts`: a fused linear of that many
    stacked maps (Q/K/V) is drawn as that many separate linears, each with its own fans."""
    for w in mod.weight.chunk(parts, dim=0):
        nn.init.xavier_normal_(w)
    if isinstance(mod, nn.Linear) and mod.bias is not None:
        nn.init.zeros_(mod.bias)
    if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
        with torch.no_grad():
            mod.weight[mod.padding_idx].zero_()


class SANB(nn.Module):
    """x + W_up ReLU(W_down x + b_down) + b_up; weights N(0, 0.01^2), biases 0."""

    def __init__(self, d: int, r: int = 64):
        super().__init__()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        init_side_linear(self.down)
        init_side_linear(self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (M, d) -> (M, d)
        return x + self.up(F.relu(self.down(x)))


class Gate(nn.Module):
    """g = sigmoid(w / temperature), w = 0 at start (g = 0.5)."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.temperature = temperature

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.w / self.temperature)

    @torch.no_grad()
    def value(self) -> float:
        """g as a plain float: `forward()`'s value, the one the towers multiply by."""
        return float(self())


def gate_record(gates: nn.ModuleList) -> dict:
    """{"values": [g_t per block], "mean": their mean} of one tower's gates."""
    values = [gate.value() for gate in gates]
    return {"values": values, "mean": sum(values) / len(values)}


class IntraSAN(nn.Module):
    """s = 0; for t: s = SANB_t(g_t h[l_t] + (1 - g_t) s)   (without gates: SANB_t(h[l_t] + s))."""

    def __init__(self, d: int, n_blocks: int, r: int, gated: bool = True, temperature: float = 0.1):
        super().__init__()
        self.blocks = nn.ModuleList(SANB(d, r) for _ in range(n_blocks))
        self.gates = nn.ModuleList(Gate(temperature) for _ in range(n_blocks)) if gated else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (M, K, d) -> (M, d)
        s = torch.zeros_like(h[:, 0])
        for t, block in enumerate(self.blocks):
            if self.gates is None:
                s = block(h[:, t] + s)
            else:
                g = self.gates[t]()
                s = block(g * h[:, t] + (1 - g) * s)
        return s


class DimensionTransform(nn.Module):
    """DTL: Linear(d_in -> d_out) with bias, one per inter block (IISAN-VA)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class InterSAN(nn.Module):
    """z = 0; for t: z = SANB_t(z + g_t x_b[t] + (1 - g_t) X_a[t]) over raw backbone states,
    X_a = DTL_t(x_a) when the widths differ (the wider side is mapped to the narrower one)."""

    def __init__(self, d_a: int, d_b: int, n_blocks: int, r: int, gated: bool = True, temperature: float = 0.1):
        super().__init__()
        self.d = min(d_a, d_b)
        self.map_a = nn.ModuleList(DimensionTransform(d_a, self.d) for _ in range(n_blocks)) if d_a != self.d else None
        self.map_b = nn.ModuleList(DimensionTransform(d_b, self.d) for _ in range(n_blocks)) if d_b != self.d else None
        self.blocks = nn.ModuleList(SANB(self.d, r) for _ in range(n_blocks))
        self.gates = nn.ModuleList(Gate(temperature) for _ in range(n_blocks)) if gated else None

    def forward(self, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:  # (M, K, d_a), (M, K, d_b) -> (M, d)
        z = torch.zeros(h_a.shape[0], self.d, dtype=h_a.dtype, device=h_a.device)
        for t, block in enumerate(self.blocks):
            xa = self.map_a[t](h_a[:, t]) if self.map_a is not None else h_a[:, t]
            xb = self.map_b[t](h_b[:, t]) if self.map_b is not None else h_b[:, t]
            if self.gates is None:
                z = block(z + xb + xa)
            else:
                g = self.gates[t]()
                z = block(z + g * xb + (1 - g) * xa)
        return z


class Head(nn.Module):
    """P(F x): VS F = Linear(d, d), P = Linear(d, D); VA F = Linear(d, D), P = Linear(D, D).
    PyTorch's default initialisation, except the image head's P of the VS heads (`xavier_p`):
    Xavier-normal weights and a zero bias, as the authors' symmetric code (Code_Cached) reuses
    ViT's replaced classifier; their asymmetric code, the VA heads', draws a new Linear."""

    def __init__(self, d: int, out: int, kind: str = "vs", xavier_p: bool = False):
        super().__init__()
        mid = d if kind == "vs" else out
        self.F = nn.Linear(d, mid)
        self.P = nn.Linear(mid, out)
        if xavier_p:
            init_xavier(self.P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.P(self.F(x))


class OutputHead(nn.Module):
    """GELU(Linear(d -> D)) on a backbone's output state: the item head of the baselines and of
    the frozen backbone, as the authors' uncached code (the text `fc`, PyTorch's default
    initialisation; for images ViT's replaced classifier, Xavier-normal with a zero bias)."""

    def __init__(self, d: int, out: int, xavier: bool = False):
        super().__init__()
        self.proj = nn.Linear(d, out)
        if xavier:
            init_xavier(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class ItemEncoder(nn.Module):
    """Cached backbone states of 1 or 2 fields -> one D-dimensional item embedding."""

    def __init__(self, cfg: ModelConfig, dims: list[int], n_layers: list[int]):
        super().__init__()
        if not 1 <= len(dims) <= 2:
            raise ValueError(f"1 or 2 item fields are supported, got {len(dims)}")
        self.cfg = cfg
        m = methods.get(cfg.method, "model.method")
        self.last_only = m.reads_last
        D, tau = cfg.embed_dim, cfg.gate_temperature
        # SANB bottleneck per tower and of the inter tower (ModelConfig.bottlenecks)
        rs, r_inter = cfg.bottlenecks(dims)
        self.intra = nn.ModuleList()
        self.heads = nn.ModuleList()
        self.inter = None
        self.inter_head = None
        if m.reads_last:
            # no side network: one GELU head per field on the backbone's output state
            self.heads.extend(OutputHead(d, D, xavier=f == 1) for f, d in enumerate(dims))
        else:
            if m.intra or len(dims) == 1:
                self.intra.extend(IntraSAN(d, k, r_f, m.gated, tau) for d, k, r_f in zip(dims, n_layers, rs))
                self.heads.extend(Head(d, D, cfg.heads, xavier_p=f == 1 and cfg.heads == "vs") for f, d in enumerate(dims))
            if len(dims) == 2 and m.inter:
                # towers with different block counts: the top blocks are aligned (docs/method.md §3)
                k = min(n_layers)
                self.inter = InterSAN(dims[0], dims[1], k, r_inter, m.gated, tau)
                # the inter head is Linear(d, d) then Linear(d, D) for VS and VA alike (the
                # authors' fc_mm and fc_mm_down, Code_Cached_Asym)
                self.inter_head = Head(self.inter.d, D, "vs")
        n_parts = len(self.heads) + (self.inter is not None)
        self.fusion = nn.Linear(n_parts * D, D)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:  # [(M, K_f, d_f)] -> (M, D)
        parts = []
        if self.last_only:
            parts = [head(h[:, -1]) for head, h in zip(self.heads, feats)]
        else:
            parts = [head(tower(h)) for tower, head, h in zip(self.intra, self.heads, feats)]
        if self.inter is not None:
            k = len(self.inter.blocks)
            # the top k blocks of each field are aligned; the rest run in their intra tower only
            parts.append(self.inter_head(self.inter(feats[0][:, -k:], feats[1][:, -k:])))
        # paper order: [e_image ; e_text ; e_inter]
        if len(parts) >= 2 and len(self.heads) == 2:
            parts[0], parts[1] = parts[1], parts[0]
        return self.fusion(torch.cat(parts, dim=-1))

    def gate_values(self, fields: list[str] | None = None) -> dict[str, dict]:
        """The learned gates g_t = sigmoid(w_t / temperature), as plain floats, per block.

        `{name: {"values": [g_0, g_1, ...], "mean": m}}` for each intra tower, named by its item
        field (`fields[f]`, default `field<f>`; a field that feeds both towers is `<field>[f]`),
        and for the inter tower under "inter", which also says which field g weighs
        (`"g_weighs"`: field 1) and which 1 - g weighs (`"1-g_weighs"`: field 0). Blocks run in
        order, block 0 on h[0] (or the lowest kept state). Empty for a model without gates
        (no-gate) or without a side network (frozen backbone, fine-tuning baselines).

        The two kinds of gate mean different things. An intra gate mixes one modality with
        itself: g_t weighs the backbone state h[l_t], 1 - g_t the tower's running side state.
        Only the inter gate weighs one modality against the other: z = SANB_t(z + g_t x_img[t]
        + (1 - g_t) X_txt[t]) (the authors' `side_gate_params_mm`: `gate * hidden_states_cv +
        (1 - gate) * hidden_states_text`), so it is the paper's "visual modality gate weight"
        (RQ5, Gated Fusion: above 0.5 leans to the image side; the paper reports 0.2-0.4): the
        inter tower's values, with field 1 the image field."""
        names = list(fields) if fields is not None else ["field0", "field1"]
        if len(names) < max(len(self.intra), 2 if self.inter is not None else 0):
            raise ValueError(f"gate_values: {len(names)} field names for a model of more fields")
        if len(names) == 2 and names[0] == names[1]:
            names = [f"{n}[{f}]" for f, n in enumerate(names)]
        out: dict[str, dict] = {}
        for name, tower in zip(names, self.intra):
            if tower.gates is not None:
                out[name] = gate_record(tower.gates)
        if self.inter is not None and self.inter.gates is not None:
            out["inter"] = {**gate_record(self.inter.gates), "g_weighs": names[1], "1-g_weighs": names[0]}
        return out

    def lr_groups(self) -> dict[int, str]:
        """The learning-rate group of each parameter that does not train at the main rate, by
        the authors' name rules (docs/method.md §8): the text (field 0) head's F `text_f`, the
        image (field 1) head's F `image_f`; SANBs (intra and inter) and the image tower's gates
        `san`. Text and inter gates, DTLs, the P maps, the inter head and the fusion: main. The
        output heads of the last-state methods (baselines, frozen backbone): main."""
        out = {}
        if self.last_only:
            return out
        for f, tower in enumerate(self.intra):
            out.update({id(p): "san" for p in tower.blocks.parameters()})
            if tower.gates is not None and f == 1:
                out.update({id(p): "san" for p in tower.gates.parameters()})
        if self.inter is not None:
            out.update({id(p): "san" for p in self.inter.blocks.parameters()})
        for f, head in enumerate(self.heads[:2]):
            out.update({id(p): ("text_f", "image_f")[f] for p in head.F.parameters()})
        return out


class TransformerBlock(nn.Module):
    """Post-LN block: bias-free Q/K/V/O (Q, K, V fused into one linear, initialised as three),
    FFN Dropout(W2 ReLU(W1 x)) with D -> 4D -> D (no dropout between ReLU and W2)."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.ln1 = nn.LayerNorm(d, eps=1e-6)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)
        self.ln2 = nn.LayerNorm(d, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, T, D), (B, 1, T, T)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=self.dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, T, D)
        x = self.ln1(x + self.drop(self.out(a)))
        return self.ln2(x + self.drop(self.ff2(F.relu(self.ff1(x)))))


class UserEncoder(nn.Module):
    """SASRec: x = Dropout(LayerNorm(e + P[pos])), 2 post-LN blocks, causal + key-padding mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.embed_dim
        self.pos = nn.Embedding(cfg.max_len, D)
        self.ln = nn.LayerNorm(D, eps=1e-6)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(D, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_blocks))
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                init_xavier(mod, parts=3 if any(mod is b.qkv for b in self.blocks) else 1)
        causal = torch.tril(torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, e: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # (B, T, D), (B, T) bool
        B, T, _ = e.shape
        x = self.drop(self.ln(e + self.pos.weight[:T]))
        allowed = self.causal[:T, :T].unsqueeze(0) & valid.unsqueeze(1)  # (B, T, T)
        mask = torch.where(allowed, 0.0, -1e4).unsqueeze(1)  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)
        return x


class IdItemEncoder(nn.Module):
    """ID-based models: a learned embedding per item (row 0 = padding, kept at zero)."""

    def __init__(self, n_rows: int, D: int):
        super().__init__()
        self.table = nn.Embedding(n_rows, D, padding_idx=0)
        init_xavier(self.table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, D)
        return self.table(ids)

    def lr_groups(self) -> dict[int, str]:
        return {}  # the embedding trains at the main rate

    def gate_values(self, fields: list[str] | None = None) -> dict[str, dict]:
        return {}  # no side network, no gates


class GRU4RecEncoder(nn.Module):
    """GRU4Rec user encoder: embedding dropout, one GRU layer (hidden D), a linear output layer;
    one output per position, like the SASRec encoder, so the loss and evaluation are shared."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.embed_dim
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(D, D, num_layers=1, batch_first=True)
        self.out = nn.Linear(D, D)
        init_xavier(self.out)

    def forward(self, e: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # (B, T, D), (B, T) bool
        x = self.drop(e) * valid.unsqueeze(-1).to(e.dtype)
        h, _ = self.gru(x)
        return self.out(h)


class Recommender(nn.Module):
    """Item encoder (side network over backbone states, or ID embeddings) + user encoder.

    `forward(ids, feats)` is the training loss of a batch; `item_table` and `score` rank every
    item for evaluation. `backbones` (uncached runs) is the feature source's module that
    computes the states; its trainable tensors (FFT, Adapter, LoRA, BitFit) are optimised with
    the rest. `log_pop` (N+1,) is the log popularity the loss debiases by (training only)."""

    def __init__(self, cfg: ModelConfig, dims: list[int], n_layers: list[int], n_items: int | None = None,
                 backbones: BackboneFeatures | None = None, log_pop: torch.Tensor | None = None):
        super().__init__()
        m = methods.get(cfg.method, "model.method")
        if m.items == "side" and not m.intra and not m.inter:
            raise ValueError(f"method {m.name}: a side network needs intra or inter towers")
        self.cfg = cfg
        if m.is_id:
            if n_items is None:
                raise ValueError(f"{cfg.method} needs the number of items")
            self.items = IdItemEncoder(n_items + 1, cfg.embed_dim)
        else:
            self.items = ItemEncoder(cfg, dims, n_layers)
        self.user = GRU4RecEncoder(cfg) if m.user == "gru4rec" else UserEncoder(cfg)
        self.backbones = backbones
        self.register_buffer("log_pop", log_pop, persistent=False)  # data, not a model tensor

    def forward(self, ids: torch.Tensor, feats) -> torch.Tensor:
        """Training loss of left-padded item windows `ids` (B, S) whose features `feats` the
        feature source gathered for `ids.reshape(-1)`."""
        B, S = ids.shape
        E = self.items(feats).view(B, S, -1)  # (B, S, D)
        U = self.user(E[:, :-1], ids[:, :-1] != 0)  # (B, T, D)
        if not distributed.distributed():
            return inbatch_debiased_ce(U, E, ids, self.log_pop)
        # one of several processes (iisan.training.distributed): these B users' share of the
        # loss of the whole batch, whose items are every process's
        every = distributed.gather_with_grad(E)
        return inbatch_debiased_ce(U, every, distributed.gather(ids), self.log_pop, first_row=distributed.rank() * B)

    def item_table(self, source: FeatureSource, chunk: int,
                   autocast: Callable[[], AbstractContextManager] = nullcontext,
                   start: int = 0, end: int | None = None) -> torch.Tensor:
        """Embeddings of every item (row 0 = padding), (N+1, D) in fp32, or of rows start..end-1;
        `chunk` items per pass, each under `autocast()`."""
        n = source.n_rows if end is None else end
        out = []
        with autocast():
            for s in range(start, n, chunk):
                out.append(self.items(source.rows(s, min(s + chunk, n))).float())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.embed_dim, device=next(self.parameters()).device)

    def score(self, inputs: torch.Tensor, table: torch.Tensor,
              autocast: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
        """Scores (b, N+1) of every item for the users whose left-padded histories are `inputs`
        (b, T); `table` is `item_table`'s. The user encoder runs under `autocast()`, the dot
        products in fp32."""
        with autocast():
            u = self.user(table[inputs], inputs != 0)[:, -1].float()  # (b, D)
        return u @ table.T

    def gate_values(self, fields: list[str] | None = None) -> dict[str, dict]:
        """The item encoder's learned gates as plain floats (`ItemEncoder.gate_values`; {} for
        models without gates), from the model's current weights."""
        return self.items.gate_values(fields)

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        """Adam groups at the training config's learning rates: the item encoder's
        (`ItemEncoder.lr_groups`: text head F lr_text_f, image head F lr_image_f, SANBs and image
        gates lr_san) and everything else of the recommender at lr_main (docs/method.md §8).
        Backbone tensors (uncached baselines), by the backbone's modality: pretrained tensors that
        train (FFT's weights, BitFit's biases, LoRA's Q/V biases: the authors' name rules put them
        with the backbone) lr_backbone_text|image; inserted adapter and LoRA matrices
        lr_peft_text|image. Frozen tensors are left out."""
        roles = self.items.lr_groups()
        if self.backbones is not None:
            for tower in self.backbones.towers:
                side = "text" if tower.spec.modality == "text" else "image"
                for n, p in tower.backbone.named_parameters():
                    inserted = "lora_" in n or ".adapter_" in n
                    roles[id(p)] = f"{'peft' if inserted else 'backbone'}_{side}"
        lrs = {"main": cfg.lr_main, "san": cfg.lr_san, "text_f": cfg.lr_text_f, "image_f": cfg.lr_image_f,
               "backbone_text": cfg.lr_backbone_text, "backbone_image": cfg.lr_backbone_image,
               "peft_text": cfg.lr_peft_text, "peft_image": cfg.lr_peft_image}
        groups = {k: [] for k in lrs}
        for p in self.parameters():
            if p.requires_grad:
                groups[roles.get(id(p), "main")].append(p)
        return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]
