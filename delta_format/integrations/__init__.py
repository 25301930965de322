"""Deltas loaded by other libraries' own model classes, one module per library.

The layer above ``loaders``: each module turns what `DeltaModel.from_pretrained` returns into that
library's object (``sentence_transformers``: a `SentenceTransformer`), importing the library
lazily, so it stays an optional extra (``pip install "delta-format[st]"``).
"""
