"""Router distillation: pull gist scores towards the attention mass a dense teacher puts on each chunk.

For every selecting layer and every suffix query, the teacher is the same model run without gists
under plain causal attention (no gradient). Its softmax attention of that query is summed over
the raw keys of each chunk and renormalised over the chunks the router chooses from (valid chunks
outside the local window), giving a target distribution p over chunks. The student distribution q
is the softmax of the gist scores q . k_gist * scale / temperature over the same chunks, taken from
the gisted forward pass. The loss is KL(p || q), averaged over layers, heads and suffix queries.

With several gist levels the same loss applies to level 1 only. Then p is the teacher mass per
level-1 chunk and q the softmax of the level-1 gist scores over every level-1 chunk outside the
window, although top-down selection scores only some of them. Gists above level 1 get no
distillation target, and the teacher pass drops them like every other gist.

Shape legend: B batch, H query heads, Hk KV heads, G = H / Hk, Tq suffix queries, S keys,
N chunks, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gsa.config import GSAConfig
from gsa.layout import GistBatch, GistedSequence, TokenKind, collate
from gsa.sparse import selects_in_layer
from gsa.tiers import gather_columns


MASKED_LOGIT = -1e9


@dataclass
class Recorder:
    """Per selecting layer, the suffix queries (B, H, Tq, D), the keys (B, Hk, S, D) and the softmax scale."""

    layers: set[int]
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: float = 1.0

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, batch: GistBatch, scaling: float) -> None:
        if layer_idx not in self.layers:
            return
        self.scaling = scaling
        self.queries[layer_idx] = gather_columns(query, batch.suffix_index)
        self.keys[layer_idx] = key


def teacher_batch(batch: GistBatch) -> tuple[GistBatch, torch.Tensor]:
    """Drop the gists of a batch: the layout of plain causal attention over the same tokens.

    Returns the batch and the (B, S) chunk index of each of its columns (-1 for sinks and padding,
    N for the tail and the suffix), copied from the gisted layout.
    """
    sequences, chunks = [], []
    for b in range(batch.batch_size):
        keep = (batch.kind[b] != TokenKind.GIST) & (batch.kind[b] != TokenKind.PAD)
        kinds = batch.kind[b, keep].tolist()
        sequence = GistedSequence(
            input_ids=batch.input_ids[b, keep].tolist(), position_ids=batch.position_ids[b, keep].tolist(),
            kind=[TokenKind.SUFFIX if k == TokenKind.SUFFIX else TokenKind.TAIL for k in kinds],
            chunk=[0] * len(kinds), num_chunks=0, level=[0] * len(kinds),
        )
        sequences.append(sequence)
        chunks.append(batch.chunk[b, keep])
    pad = int(batch.input_ids[batch.kind == TokenKind.PAD][0]) if (batch.kind == TokenKind.PAD).any() else 0
    plain = collate(sequences, batch.spec, pad)
    width = plain.input_ids.shape[1]
    chunk = torch.full((batch.batch_size, width), -1, dtype=torch.long)
    for b, row in enumerate(chunks):
        chunk[b, width - len(row):] = row
    return plain.to(batch.input_ids.device), chunk.to(batch.input_ids.device)


def teacher_chunk_mass(
    query: torch.Tensor, key: torch.Tensor, plain: GistBatch, chunk: torch.Tensor, num_chunks: int, scaling: float,
) -> torch.Tensor:
    """Sum each suffix query's causal softmax attention over the keys of each chunk: (B, H, Tq, N)."""
    batch, heads, _, _ = query.shape
    group = heads // key.shape[1]
    keys = key.repeat_interleave(group, dim=1)  # (B, H, S, D)
    scores = torch.einsum("bhtd,bhsd->bhts", query.float(), keys.float()) * scaling  # (B, H, Tq, S)

    # A suffix query at column c attends the keys at columns <= c that are not padding.
    columns = torch.arange(key.shape[2], device=key.device)
    visible = (columns[None, None, :] <= plain.suffix_index[:, :, None]) & (plain.kind != TokenKind.PAD)[:, None, :]
    scores = scores.masked_fill(~visible[:, None], MASKED_LOGIT)  # padded query slots stay finite
    probs = torch.softmax(scores, dim=-1)

    # Scatter the probabilities onto chunk ids; sinks, tail and suffix fall outside [0, N).
    in_chunk = (chunk >= 0) & (chunk < num_chunks)  # (B, S)
    index = torch.where(in_chunk, chunk, num_chunks)[:, None, None, :].expand_as(probs)
    mass = torch.zeros(batch, heads, probs.shape[2], num_chunks + 1, device=probs.device)
    mass.scatter_add_(-1, index, probs)
    return mass[..., :num_chunks]


def distill_loss(
    student: Recorder, teacher: Recorder, batch: GistBatch, plain: GistBatch, chunk: torch.Tensor,
    config: GSAConfig, temperature: float,
) -> torch.Tensor:
    """KL(teacher chunk mass || student gist-score softmax), averaged over layers, heads and queries."""
    num_chunks = batch.gist_index.shape[1]
    chunk_ids = torch.arange(num_chunks, device=chunk.device)
    window_start = batch.num_chunks - config.spec.window_chunks  # (B,)
    candidate = (batch.gist_index >= 0) & (chunk_ids[None, :] < window_start[:, None])  # (B, N)
    valid_query = (batch.suffix_index >= 0)[:, None, :]  # (B, 1, Tq)
    scaling = student.scaling

    losses = []
    for layer in sorted(student.queries):
        gist_keys = gather_columns(student.keys[layer], batch.gist_index)  # (B, Hk, N, D)
        group = student.queries[layer].shape[1] // gist_keys.shape[1]
        gist_keys = gist_keys.repeat_interleave(group, dim=1)  # (B, H, N, D)
        logits = torch.einsum("bhtd,bhnd->bhtn", student.queries[layer].float(), gist_keys.float())
        # A finite fill keeps rows without candidates finite, so their (masked) gradient is not NaN.
        logits = (logits * scaling / temperature).masked_fill(~candidate[:, None, None], MASKED_LOGIT)
        log_q = torch.log_softmax(logits, dim=-1)

        with torch.no_grad():
            mass = teacher_chunk_mass(teacher.queries[layer], teacher.keys[layer], plain, chunk, num_chunks, scaling)
            mass = mass * candidate[:, None, None]
            p = mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)
            p = p * valid_query[..., None]  # padded query slots contribute nothing, forward or backward
        terms = p * (torch.log(p.clamp(min=1e-12)) - log_q)  # zero where p is zero, log_q being finite
        per_query = terms.sum(-1)  # (B, H, Tq)
        rows = valid_query & candidate.any(-1)[:, None, None]
        losses.append(per_query.masked_select(rows.expand_as(per_query)).mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def selecting_layers(num_layers: int, config: GSAConfig) -> set[int]:
    return {layer for layer in range(num_layers) if selects_in_layer(config, layer)}


def router_distill_loss(model, batch: GistBatch, config: GSAConfig, student: Recorder, temperature: float) -> torch.Tensor:
    """Run the teacher pass (no gists, no gradient) and return the distillation term for ``student``."""
    plain, chunk = teacher_batch(batch)
    teacher = Recorder(student.layers)
    with torch.no_grad():
        model(
            input_ids=plain.input_ids, position_ids=plain.position_ids, gist_batch=plain,
            gsa_config=GSAConfig(spec=config.spec, method="full"), gsa_recorder=teacher, use_cache=False,
        )
    return distill_loss(student, teacher, batch, plain, chunk, config, temperature)
