"""Text utilities shared by the tweet DataModule and the text backbones (public vocabularies, word hashing)."""
