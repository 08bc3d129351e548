"""Routing diagnostics: does a method recall the chunks dense attention would read?

``RouterProbe`` is attached to a ``GistCache``; every selective attention call reports its
choice to it. Per layer it accumulates

- recall@k: the share of the oracle's chunks (the top-k chunks by dense attention mass, merged
  over the GQA group like the method's choice) that the method recalled;
- selected mass: the share of the dense attention mass on chunks outside the local window that
  falls on the recalled chunks.

It also keeps, for row 0, which chunks were unfolded at each generation step, averaged over KV
heads and layers, for ``gsa explain``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gsa.methods import Oracle, SelectionInputs
from gsa.ops.select import select_chunks


@dataclass
class RouterProbe:
    """Accumulated routing statistics of one generation."""

    record_trace: bool = False
    recall_sum: dict[int, float] = field(default_factory=dict)
    mass_sum: dict[int, float] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    trace: list[torch.Tensor] = field(default_factory=list)  # per step: (N,) unfolded share
    _step_sum: torch.Tensor | None = None
    _step_layers: int = 0

    def observe(self, layer_idx: int, inputs: SelectionInputs, chosen, candidate, k, merge: str) -> None:
        """Compare a (B, Hk, T, N) choice with the oracle's at the same budget ``k`` (B, T)."""
        mass = Oracle().scores(inputs)  # (B, Hk, G, T, N) dense attention mass per chunk
        oracle = select_chunks(mass, candidate, k, merge)  # (B, Hk, T, N)
        picked = chosen & candidate[:, None]
        oracle_count = oracle.sum(-1)
        valid = oracle_count > 0  # queries with at least one candidate chunk
        if not bool(valid.any()):
            return
        recall = (picked & oracle).sum(-1).float() / oracle_count.clamp(min=1)
        head_mass = mass.mean(dim=2)  # (B, Hk, T, N)
        outside = (head_mass * candidate[:, None]).sum(-1)
        selected = (head_mass * picked).sum(-1) / outside.clamp(min=1e-12)
        self.recall_sum[layer_idx] = self.recall_sum.get(layer_idx, 0.0) + float(recall[valid].sum())
        self.mass_sum[layer_idx] = self.mass_sum.get(layer_idx, 0.0) + float(selected[valid].sum())
        self.count[layer_idx] = self.count.get(layer_idx, 0) + int(valid.sum())

    def record_unfolded(self, layer_idx: int, chunk_on: torch.Tensor) -> None:
        """Add one layer's (B, Hk, T, N) unfolded chunks of the last query of row 0 to the trace."""
        if not self.record_trace:
            return
        if layer_idx == 0 and self._step_sum is not None:
            self.flush_step()
        share = chunk_on[0, :, -1].float().mean(0).cpu()  # (N,)
        self._step_sum = share if self._step_sum is None else self._step_sum + share
        self._step_layers += 1

    def flush_step(self) -> None:
        if self._step_sum is not None and self._step_layers:
            self.trace.append(self._step_sum / self._step_layers)
        self._step_sum, self._step_layers = None, 0

    def summary(self) -> dict:
        """Mean recall@k and selected mass over layers, and per layer."""
        layers = sorted(self.count)
        per_layer = {
            layer: {"router_recall": self.recall_sum[layer] / self.count[layer],
                    "selected_mass": self.mass_sum[layer] / self.count[layer]}
            for layer in layers
        }
        if not layers:
            return {"router_recall": None, "selected_mass": None, "per_layer": {}}
        return {
            "router_recall": sum(v["router_recall"] for v in per_layer.values()) / len(layers),
            "selected_mass": sum(v["selected_mass"] for v in per_layer.values()) / len(layers),
            "per_layer": per_layer,
        }
