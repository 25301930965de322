"""Bytes on disk and on the Hub: the delta reader and writer, base and fine-tune checkpoints,
Hub resolution, and the `Delta` object with its model card. Built on the format core; knows
nothing about edit methods or models."""
