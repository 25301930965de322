"""Returning freed heap memory to the OS between tensors, for the streaming compressor and loader."""

from __future__ import annotations


class FreedMemory:
    """Hands freed heap memory back to the OS between tensors (glibc only).

    glibc raises its mmap threshold every time a large block is freed, so after the first few
    tensors the temporaries of the next ones come from the heap, and freed heap blocks stay in
    the process: a long stream of same-sized temporaries then looks like memory growing with the
    model's depth although at most a few tensors are alive. ``malloc_trim(0)`` returns them; it
    costs about a millisecond per call, so it runs once per ``EVERY`` bytes of tensors processed.
    """

    EVERY = 4 * 2**20

    def __init__(self):
        self._trim = None
        self._pending = 0
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            self._trim = libc.malloc_trim
        except (OSError, AttributeError):
            pass

    def __call__(self, freed: int) -> None:
        """Note ``freed`` bytes of temporaries; trim once every `EVERY` bytes (trimming scans the heap)."""
        self._pending += freed
        if self._trim is not None and self._pending >= self.EVERY:
            self._trim(0)
            self._pending = 0
