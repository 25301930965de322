"""`Delta`: a delta directory as an object you can inspect, save and publish.

Returned by `delta_format.compress` and `DeltaModel.load_delta`; mirrors huggingface_hub's
``save_pretrained`` / ``push_to_hub`` verbs so publishing a delta feels like publishing a model.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from ..core.constants import MODEL_CARD_NAME
from .card import render_model_card
from .delta_files import safe_member
from .reader import DeltaReader
from .staging import StagingDirectory, output_guard


class Delta:
    """A delta on local disk (a directory written by `DeltaWriter`), validated on opening.

    Example:
        >>> delta = delta_format.compress("base", "finetune", "out", method="dare", p=0.9)  # doctest: +SKIP
        >>> delta.push_to_hub("user/ft-delta", private=True)                               # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        repo_id: str | None = None,
        revision: str | None = None,
        *,
        verify_checksums: bool = True,
    ):
        self.directory = Path(directory)
        self.repo_id = repo_id
        self.revision = revision
        self.reader = DeltaReader(self.directory, verify_checksums=verify_checksums)

    @property
    def manifest(self):
        return self.reader.manifest

    def renamed(self, names: dict[str, str]) -> Delta:
        """This delta seen with its parameters renamed (`DeltaReader.renamed`), sharing its files."""
        view = copy.copy(self)
        view.reader = self.reader.renamed(names)
        return view

    def files(self) -> list[Path]:
        """Every file of the delta, subfolders included: the manifest, tensor files, index, the
        side files its manifest lists (config, tokenizer, ``1_Pooling/config.json``, ...) and the
        model card. Files the manifest does not vouch for are not part of the delta (SPEC §3.5):
        they are never copied or uploaded. Each is a regular file inside the directory."""
        members = self.reader.member_files()
        card = safe_member(self.directory, MODEL_CARD_NAME, "the model card", missing_ok=True)
        return sorted([*members.values(), *([card] if card is not None else [])])

    def relative_files(self) -> dict[str, Path]:
        """`files` by relative POSIX path (what ``save_pretrained`` and ``push_to_hub`` write)."""
        return {path.relative_to(self.directory).as_posix(): path for path in self.files()}

    def model_card(self, repo_id: str | None = None, name: str | None = None) -> str:
        """The README.md text for publishing under ``repo_id`` (titled ``name``, default the
        directory's name, when there is no repo)."""
        return render_model_card(self.manifest, repo_id=repo_id or self.repo_id, name=name or self.directory.name)

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Delta:
        """Copy the delta to ``save_directory`` atomically, with a fresh model card."""
        staging = StagingDirectory(save_directory, overwrite=overwrite, inputs=[self.directory])
        try:
            with output_guard(staging.out_dir):
                for name, path in self.relative_files().items():
                    target = staging.path / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                card = self.model_card(name=Path(save_directory).name)
                (staging.path / MODEL_CARD_NAME).write_text(card, encoding="utf-8")
            out = staging.publish()
        except BaseException:
            staging.discard()
            raise
        return Delta(out)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Publish the delta to the Hub in one commit (the model card written for ``repo_id``).

        Returns:
            The commit URL (or pull-request URL with ``create_pr=True``).
        """
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
            for name, path in self.relative_files().items()
            if name != MODEL_CARD_NAME
        ]
        operations.append(
            CommitOperationAdd(path_in_repo=MODEL_CARD_NAME, path_or_fileobj=self.model_card(repo_id).encode("utf-8"))
        )
        info = api.create_commit(
            repo_id,
            operations,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload {self.manifest.method} delta with delta-format",
        )
        return info.pr_url if create_pr and info.pr_url else info.commit_url

    def __repr__(self) -> str:
        return f"Delta({str(self.directory)!r}, method={self.manifest.method!r}, tensors={len(self.manifest.tensors)})"
