"""Peak anonymous memory of a block of code, sampled from /proc/self/status.

Anonymous RSS (``RssAnon``) is what runs a machine out of RAM; memory-mapped checkpoint pages
(counted in VmRSS/VmHWM) are page cache the kernel can drop. Linux only.
"""

from __future__ import annotations

import threading
import time


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (0 where absent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PeakAnonSampler:
    """``with PeakAnonSampler() as s: ...`` then ``s.baseline``/``s.peak`` in bytes."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib("RssAnon") * 1024)
            time.sleep(self.interval)

    def __enter__(self) -> PeakAnonSampler:
        self.baseline = self.peak = status_kib("RssAnon") * 1024
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib("RssAnon") * 1024)
