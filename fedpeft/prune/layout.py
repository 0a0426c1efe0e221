"""The prunable layout of a model, kept-structure masks on the wire, and LoRA factor indices.

A :class:`PruneLayout` describes a model's decoder layers (attention groups, query heads per
group, head size, FFN channels) without holding the model, so the coordinator can slice and
scatter LoRA factors of pruned clients and check what they send. A client's kept structure
(one :class:`~fedpeft.prune.structure.Keep` per layer) travels as a bitmask, one bit per
attention group and FFN channel, layer after layer (``np.packbits``): 5.8 KB for SmolLM2-135M.

:meth:`PruneLayout.factor_index` says which rows of ``B`` (output features) and columns of
``A`` (input features) of an adapted module survive a pruning: ``q/k/v`` (and GPT-2's
``c_attn``) lose the output rows of removed heads, ``o_proj`` (GPT-2 ``attn.c_proj``) the
input columns; ``gate/up`` (``c_fc``) lose output rows of removed channels, ``down``
(``mlp.c_proj``) the input columns. Modules outside the decoder layers keep everything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.errors import ProtocolError
from fedpeft.prune.structure import (
    Keep,
    LayerShape,
    arch_of,
    attn_sizes,
    decoder_layers,
    ffn_width,
)
from fedpeft.wire.types import LoraFactors

__all__ = ["LayerLayout", "PruneLayout", "Role", "cut_adapter", "full_keeps"]

Index = tuple[int, ...] | None  # kept indices, None for all


@dataclass(frozen=True)
class LayerLayout:
    """One decoder layer: ``groups`` attention groups of ``per_group`` query heads of
    ``head_dim``, and ``ffn`` intermediate channels."""

    groups: int
    per_group: int
    head_dim: int
    ffn: int


@dataclass(frozen=True)
class Role:
    """Where a module sits: its layer, which group kind it belongs to, and along which side."""

    layer: int
    kind: str  # q (query-head rows), kv (one head per group), qkv (GPT-2 c_attn), ffn
    side: str  # out: B rows are pruned; in: A columns are pruned


_LLAMA_ROLES = {
    "q_proj": ("q", "out"),
    "k_proj": ("kv", "out"),
    "v_proj": ("kv", "out"),
    "o_proj": ("q", "in"),
    "gate_proj": ("ffn", "out"),
    "up_proj": ("ffn", "out"),
    "down_proj": ("ffn", "in"),
}
_GPT2_ROLES = {
    "attn.c_attn": ("qkv", "out"),
    "attn.c_proj": ("q", "in"),
    "mlp.c_fc": ("ffn", "out"),
    "mlp.c_proj": ("ffn", "in"),
}
_LAYER = {
    "llama": re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$"),
    "gpt2": re.compile(r"(?:^|\.)h\.(\d+)\.(.+)$"),
}


def full_keeps(shapes: Sequence[LayerShape]) -> list[Keep]:
    """A :class:`Keep` that keeps everything, for every layer."""
    return [
        Keep(attn=tuple(range(s.attn_groups)), ffn=tuple(range(s.ffn_channels))) for s in shapes
    ]


@dataclass(frozen=True)
class PruneLayout:
    """The prunable structure of a model (see the module docstring)."""

    arch: str  # llama | gpt2
    layers: tuple[LayerLayout, ...]

    @classmethod
    def of(cls, model: Any) -> PruneLayout:
        """The layout of a LLaMA-family or GPT-2 model (``ModelError`` for others)."""
        arch = arch_of(model)
        layers = tuple(
            LayerLayout(*attn_sizes(model, layer, arch), ffn=ffn_width(layer, arch))
            for layer in decoder_layers(model, arch)
        )
        return cls(arch=arch, layers=layers)

    # ------------------------------------------------------------------ structure
    def shapes(self) -> list[LayerShape]:
        """Prunable sizes per layer."""
        return [LayerShape(attn_groups=x.groups, ffn_channels=x.ffn) for x in self.layers]

    def full(self) -> list[Keep]:
        """Everything kept."""
        return full_keeps(self.shapes())

    def pruned(self, keeps: Sequence[Keep]) -> PruneLayout:
        """The layout of the model that keeps ``keeps`` (indices become positions)."""
        return PruneLayout(
            self.arch,
            tuple(
                LayerLayout(len(k.attn), x.per_group, x.head_dim, len(k.ffn))
                for x, k in zip(self.layers, keeps, strict=True)
            ),
        )

    def removed_share(self, keeps: Sequence[Keep]) -> float:
        """Share of all attention groups and FFN channels that ``keeps`` removes."""
        total = sum(x.groups + x.ffn for x in self.layers)
        kept = sum(len(k.attn) + len(k.ffn) for k in keeps)
        return 1.0 - kept / total

    # ------------------------------------------------------------------ wire
    def encode(self, keeps: Sequence[Keep]) -> bytes:
        """The bitmask of ``keeps`` (one bit per group and channel, layer after layer)."""
        bits = []
        for x, k in zip(self.layers, keeps, strict=True):
            for idx, n in ((k.attn, x.groups), (k.ffn, x.ffn)):
                mask = np.zeros(n, dtype=bool)
                mask[list(idx)] = True
                bits.append(mask)
        return np.packbits(np.concatenate(bits)).tobytes()

    def decode(self, blob: bytes) -> list[Keep]:
        """Inverse of :meth:`encode`; ``ProtocolError`` for a wrong size or an emptied layer."""
        nbits = sum(x.groups + x.ffn for x in self.layers)
        if len(blob) != (nbits + 7) // 8:
            raise ProtocolError(
                f"kept-structure mask has {len(blob)} bytes, the layout needs {(nbits + 7) // 8}"
            )
        bits = np.unpackbits(np.frombuffer(blob, dtype=np.uint8))
        if bits[nbits:].any():
            raise ProtocolError("kept-structure mask has bits set past its last channel")
        out, pos = [], 0
        for i, x in enumerate(self.layers):
            attn = tuple(int(j) for j in np.flatnonzero(bits[pos : pos + x.groups]))
            pos += x.groups
            ffn = tuple(int(j) for j in np.flatnonzero(bits[pos : pos + x.ffn]))
            pos += x.ffn
            if not attn or not ffn:
                raise ProtocolError(f"kept-structure mask empties layer {i} (keep >= 1 of each)")
            out.append(Keep(attn=attn, ffn=ffn))
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain data for a record or a state dict."""
        return {
            "arch": self.arch,
            "layers": [[x.groups, x.per_group, x.head_dim, x.ffn] for x in self.layers],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PruneLayout:
        """Inverse of :meth:`to_json` (``ProtocolError`` if malformed)."""
        try:
            layers = tuple(LayerLayout(*(int(v) for v in row)) for row in data["layers"])
            arch = str(data["arch"])
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"malformed pruning layout: {err}") from None
        if (
            arch not in ("llama", "gpt2")
            or not layers
            or any(min(x.groups, x.per_group, x.head_dim, x.ffn) < 1 for x in layers)
        ):
            raise ProtocolError(f"invalid pruning layout: arch {arch!r}, {len(layers)} layers")
        return cls(arch=arch, layers=layers)

    # ------------------------------------------------------------------ modules
    def role(self, module: str) -> Role | None:
        """The pruning role of an adapted module (``None``: not touched by pruning)."""
        match = _LAYER[self.arch].search(module)
        if match is None:
            return None
        layer, leaf = int(match.group(1)), match.group(2)
        table = _LLAMA_ROLES if self.arch == "llama" else _GPT2_ROLES
        for suffix, (kind, side) in table.items():
            if leaf == suffix or leaf.endswith("." + suffix):
                return Role(layer, kind, side) if layer < len(self.layers) else None
        return None

    def feature_index(self, role: Role, keep: Keep) -> torch.Tensor:
        """Kept feature indices (rows of an ``out`` module, columns of an ``in`` module)."""
        x = self.layers[role.layer]
        if role.kind == "ffn":
            return torch.tensor(keep.ffn, dtype=torch.long)
        per = 1 if role.kind == "kv" else x.per_group
        heads = torch.tensor([g * per + j for g in keep.attn for j in range(per)])
        rows = (heads[:, None] * x.head_dim + torch.arange(x.head_dim)).reshape(-1)
        if role.kind == "qkv":  # GPT-2: [q | k | v] blocks of groups * head_dim
            width = x.groups * x.head_dim
            rows = torch.cat([rows + j * width for j in range(3)])
        return rows

    def factor_index(self, module: str, keeps: Sequence[Keep]) -> tuple[Index, Index]:
        """Kept rows of ``B`` (out) and kept columns of ``A`` (in) of ``module``."""
        role = self.role(module)
        if role is None:
            return None, None
        idx = tuple(int(i) for i in self.feature_index(role, keeps[role.layer]))
        return (idx, None) if role.side == "out" else (None, idx)

    def group_scores(self, role: Role, imp: torch.Tensor) -> tuple[str, torch.Tensor]:
        """Reduce an ``(out, in)`` importance map of a module to ``("attn"|"ffn", scores)``."""
        x = self.layers[role.layer]
        per_feature = imp.sum(dim=1) if role.side == "out" else imp.sum(dim=0)
        if role.kind == "ffn":
            return "ffn", per_feature
        if role.kind == "qkv":  # (3 * groups * hd,) -> (groups,)
            return "attn", per_feature.reshape(3, x.groups, x.head_dim).sum(dim=(0, 2))
        return "attn", per_feature.reshape(x.groups, -1).sum(dim=1)


def cut_adapter(
    adapter: Mapping[str, LoraFactors],
    layout: PruneLayout,
    have: Sequence[Keep],
    want: Sequence[Keep],
) -> dict[str, LoraFactors]:
    """Cut factors that belong to structure ``have`` down to structure ``want`` (a subset).

    ``B`` keeps the rows and ``A`` the columns of the features ``want`` still has.
    """
    out: dict[str, LoraFactors] = {}
    for m, f in adapter.items():
        rows_h, cols_h = layout.factor_index(m, have)
        rows_w, cols_w = layout.factor_index(m, want)
        a, b = f.a, f.b
        if rows_h is not None and rows_w is not None:
            pos = {g: p for p, g in enumerate(rows_h)}
            b = b.index_select(0, torch.tensor([pos[g] for g in rows_w], dtype=torch.long))
        if cols_h is not None and cols_w is not None:
            pos = {g: p for p, g in enumerate(cols_h)}
            a = a.index_select(1, torch.tensor([pos[g] for g in cols_w], dtype=torch.long))
        out[m] = LoraFactors(a=a.clone(), b=b.clone(), alpha=f.alpha)
    return out
