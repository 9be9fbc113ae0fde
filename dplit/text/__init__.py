"""Text utilities shared by the text DataModules and backbones (public vocabularies, word hashing, CDA)."""

from dplit.text.cda import WordSwapper

__all__ = ["WordSwapper"]
