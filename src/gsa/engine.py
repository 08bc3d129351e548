"""Answer questions over long contexts: gist the prompt, prefill, decode with selective unfolding."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from gsa.cache import GistCache
from gsa.config import GSAConfig
from gsa.errors import InvalidInputError
from gsa.layout import GistBatch, TokenKind, collate, insert_gists
from gsa.model import enable_gsa

logger = logging.getLogger(__name__)

QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"
WORD_START_MARKERS = ("Ġ", "▁", "Ċ", "\n", " ")


@dataclass
class GenerationResult:
    """One answer and what its decoding read."""

    answer: str
    method: str
    ratio: int
    context_tokens: int
    gist_tokens: int
    decode_steps: int
    mean_unfolded_tokens_per_step: float
    mean_attended_kv_fraction: float
    seconds: float
    token_ids: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


class GistGenerator:
    """A model with GSA enabled, ready to answer questions over contexts.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer; a gist token is added to it.
    """

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.gist_ids = enable_gsa(model, tokenizer)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def build_batch(
        self, contexts: list[str], questions: list[str], config: GSAConfig, max_new_tokens: int = 0,
        template: str | None = QUESTION_TEMPLATE,
    ) -> GistBatch:
        """Tokenise each context and question, insert gists and left-pad into one batch.

        ``template`` formats each question into the suffix; ``None`` sends the question text as
        the suffix unchanged.
        """
        if len(contexts) != len(questions):
            raise InvalidInputError(f"got {len(contexts)} contexts but {len(questions)} questions; pass one question per context")
        sequences = []
        for context, question in zip(contexts, questions):
            context_ids, suffix_ids = self._tokenize(context, question, template)
            sequences.append(self._gist_sequence(context_ids, suffix_ids, config, max_new_tokens))
        return collate(sequences, config.spec, self._pad_id())

    def _gist_sequence(self, context_ids: list[int], suffix_ids: list[int], config: GSAConfig, max_new_tokens: int):
        self._check_lengths(context_ids, suffix_ids, config, max_new_tokens)
        gist_id = self._level_gist_ids(config.spec.num_levels) if config.inserts_gists else None
        starts = self._word_starts(context_ids) if config.spec.word_boundary else None
        return insert_gists(context_ids, suffix_ids, gist_id, config.spec, starts)

    def _level_gist_ids(self, levels: int) -> list[int]:
        """Gist token ids of levels 1..``levels``, adding the tokens of missing levels to the model."""
        if len(self.gist_ids) < levels:
            self.gist_ids = enable_gsa(self.model, self.tokenizer, levels)
        return self.gist_ids[:levels]

    def _pad_id(self) -> int:
        pad_id = self.tokenizer.pad_token_id
        return pad_id if pad_id is not None else self.tokenizer.eos_token_id

    def _tokenize(self, context: str, question: str, template: str | None) -> tuple[list[int], list[int]]:
        if not context.strip():
            raise InvalidInputError("the context is empty; pass a file or text with content")
        context_ids = self.tokenizer(context, add_special_tokens=True)["input_ids"]
        suffix = template.format(question=question.strip()) if template is not None else question
        suffix_ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        return context_ids, suffix_ids

    def _check_lengths(self, context_ids, suffix_ids, config: GSAConfig, max_new_tokens: int) -> None:
        total = len(context_ids) + len(suffix_ids) + max_new_tokens
        if self.max_positions and total > self.max_positions:
            raise InvalidInputError(
                f"the context has {len(context_ids)} tokens; with the question and {max_new_tokens} new tokens that "
                f"is {total}, over the model's {self.max_positions} positions; shorten the context or lower --max-new-tokens"
            )
        if config.inserts_gists and config.spec.chunk_size > len(context_ids) - config.spec.sinks:
            raise InvalidInputError(
                f"chunk size {config.spec.chunk_size} is larger than the context ({len(context_ids)} tokens, "
                f"{config.spec.sinks} of them sinks); use a smaller --ratio or a longer context"
            )

    def _word_starts(self, ids: list[int]) -> list[bool]:
        pieces = self.tokenizer.convert_ids_to_tokens(ids)
        return [p.startswith(WORD_START_MARKERS) or not p[:1].isalnum() for p in pieces]

    @torch.no_grad()
    def generate(
        self,
        contexts: list[str],
        questions: list[str],
        config: GSAConfig,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        streamer=None,
        on_layer=None,
        stop_at_newline: bool = True,
        template: str | None = QUESTION_TEMPLATE,
        probe=None,
        prefilled: GistCache | None = None,
    ) -> list[GenerationResult]:
        """Answer each question over its context with stock ``model.generate()`` and a ``GistCache``.

        ``prefilled`` is a cache from ``prefill`` for the same single context: it is forked, so the
        context is encoded once for several questions. ``probe`` collects routing diagnostics.
        """
        start = time.perf_counter()
        batch = self.build_batch(contexts, questions, config, max_new_tokens, template).to(self.model.device)
        if prefilled is not None:
            cache = prefilled.fork()
            cache.probe, cache.on_layer = probe, on_layer
        else:
            cache = GistCache(self.model.config, batch, config, on_layer=on_layer, probe=probe)
        options = {"do_sample": do_sample}
        if do_sample:
            options["temperature"] = temperature
        if stop_at_newline:
            options.update(stop_strings=["\n"], tokenizer=self.tokenizer)
        output = self.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            cache=cache,
            max_new_tokens=max_new_tokens,
            suppress_tokens=self.gist_ids,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            streamer=streamer,
            **options,
        )
        seconds = time.perf_counter() - start
        new_tokens = output[:, batch.input_ids.shape[1]:]
        results = [self._result(batch, b, new_tokens[b], cache, config, seconds) for b in range(batch.batch_size)]
        cache.close()  # removes a disk tier's files now rather than at garbage collection
        return results

    @torch.no_grad()
    def prefill(self, context: str, config: GSAConfig) -> GistCache:
        """Encode one context without a suffix; pass the cache to ``generate(prefilled=...)``."""
        batch = self.build_batch([context], [""], config, template=None).to(self.model.device)
        cache = GistCache(self.model.config, batch, config)
        self.model(input_ids=batch.input_ids, position_ids=batch.position_ids, cache=cache)
        return cache

    @torch.no_grad()
    def continuation_logprobs(self, context: str, suffix: str, continuation: str, config: GSAConfig) -> tuple:
        """Score ``continuation`` after ``context`` and ``suffix`` by teacher forcing.

        The continuation tokens are suffix queries, so they read the context through the method's
        selection. Returns ``(log_probs, targets)``: (Tc, V) log-probabilities of the token at each
        continuation position and the (Tc,) continuation token ids.
        """
        targets = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not targets:
            raise InvalidInputError("the continuation to score is empty; pass a non-empty gold answer or text")
        context_ids, suffix_ids = self._tokenize(context, suffix, None)
        sequence = self._gist_sequence(context_ids, suffix_ids + targets, config, 0)
        batch = collate([sequence], config.spec, self._pad_id()).to(self.model.device)
        cache = GistCache(self.model.config, batch, config)
        logits = self.model(input_ids=batch.input_ids, position_ids=batch.position_ids, cache=cache).logits
        predicting = logits[0, -len(targets) - 1 : -1].float()  # (Tc, V): position t predicts token t + 1
        predicting[:, self.gist_ids] = float("-inf")
        return torch.log_softmax(predicting, dim=-1), torch.tensor(targets, device=predicting.device)

    def _result(self, batch: GistBatch, row: int, tokens, cache: GistCache, config: GSAConfig, seconds: float):
        kind = batch.kind[row]
        stats = cache.stats
        pad_id = self._pad_id()
        return GenerationResult(
            answer=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
            method=config.method,
            ratio=config.ratio,
            context_tokens=int(((kind == TokenKind.SINK) | (kind == TokenKind.RAW) | (kind == TokenKind.TAIL)).sum()),
            gist_tokens=int((kind == TokenKind.GIST).sum()),
            decode_steps=stats.steps,
            mean_unfolded_tokens_per_step=stats.mean_raw_per_step,
            mean_attended_kv_fraction=stats.mean_attended_fraction,
            seconds=seconds,
            token_ids=[int(t) for t in tokens if int(t) != pad_id],
        )
