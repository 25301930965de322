"""The format core: what the bytes of a delta mean (SPEC §3-§9).

Spec constants, the manifest, the encodings, the seeded-mask generator, the base fingerprint and
the reconstruction arithmetic. Imports torch and the standard library only: no files, no Hub,
no transformers.
"""
