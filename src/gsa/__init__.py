"""Gist Sparse Attention for Hugging Face causal language models."""

from gsa.cache import GistCache
from gsa.config import GSAConfig
from gsa.errors import InvalidInputError
from gsa.layout import GistBatch, GistSpec, TokenKind, collate, insert_gists, strip_gists
from gsa.model import enable_gsa, load_model

__all__ = [
    "GSAConfig", "GistBatch", "GistCache", "GistSpec", "InvalidInputError", "TokenKind", "collate",
    "enable_gsa", "insert_gists", "load_model", "strip_gists",
]
__version__ = "0.1.0"
