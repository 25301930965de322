"""`Delta`: a delta directory as an object you can inspect, save and publish.

Returned by `delta_format.compress` and `DeltaModel.load_delta`; mirrors huggingface_hub's
``save_pretrained`` / ``push_to_hub`` verbs so publishing a delta feels like publishing a model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .reader import DeltaReader


class Delta:
    """A delta on local disk (a directory written by `DeltaWriter`)."""

    def __init__(self, directory: str | os.PathLike, repo_id: str | None = None, revision: str | None = None):
        self.directory = Path(directory)
        self.repo_id = repo_id
        self.revision = revision
        self.reader = DeltaReader(self.directory)

    @property
    def manifest(self):
        return self.reader.manifest

    def __repr__(self) -> str:
        return f"Delta({str(self.directory)!r}, method={self.manifest.method!r}, tensors={len(self.manifest.tensors)})"
