"""Progress bars for the long steps (compress, calibration, load, apply, verify; push uses
huggingface_hub's own upload bars).

They are huggingface_hub's bars, so everything that silences the Hub's silences them:
``HF_HUB_DISABLE_PROGRESS_BARS=1`` in the environment, ``huggingface_hub.utils.disable_progress_bars()``,
or ``disable_progress_bars("delta_format")`` for this package's alone (they form the group `PROGRESS_GROUP`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PROGRESS_GROUP = "delta_format"
"""The huggingface_hub progress-bar group name of this package's bars."""


def progress_bar(iterable: Iterable | None = None, *, desc: str, unit: str, enabled: bool = True, **kwargs: Any):
    """A huggingface_hub ``tqdm`` in `PROGRESS_GROUP`; ``enabled=False`` hides it whatever the settings."""
    from huggingface_hub.utils import tqdm

    return tqdm(iterable, desc=desc, unit=unit, disable=not enabled, name=PROGRESS_GROUP, **kwargs)
