"""Content-addressed, on-disk storage of model repositories for the test Hub server.

Layout under the storage root::

    blobs/<sha256[:2]>/<sha256>                      file contents, shared by every repository
    repos/<namespace>/<name>/repo.json               {"private": bool, "createdAt": ISO date}
    repos/<namespace>/<name>/refs.json               {"branches": {name: commit id}, "tags": {name: commit id}}
    repos/<namespace>/<name>/commits/<commit id>.json

A commit is a JSON document holding its parents, title, message, author, date and its whole flat tree
(``path -> {sha256, oid, size}``). Its id is the SHA-1 of that document's canonical serialisation, so a commit is
immutable and addressed by a 40-hex sha like a git commit (it is *not* a git-compatible object, though). ``oid`` is
the git blob id of the content (``sha1(b"blob <size>\\0" + content)``): what the Hub reports as ``blobId`` and as the
``ETag`` of a non-LFS file, and what huggingface_hub compares with to skip unchanged files when uploading.

Every write goes through a temporary file and :func:`os.replace`. The store is not thread-safe: the server only calls
it from its event-loop thread, which serialises all requests' reads and writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

#: Content of the ``.gitattributes`` file of a new repository's initial commit, as on the real Hub (abridged).
INITIAL_GITATTRIBUTES = b"""\
*.bin filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""

DEFAULT_BRANCH = "main"

_REPO_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REF_NAME_RE = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_FULL_SHA_RE = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA_RE = re.compile(r"[0-9a-f]{7,40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------------------------------------------------
# Errors: the server's vocabulary for what it answers clients (status, optional ``X-Error-Code``, message).
# --------------------------------------------------------------------------------------------------------------------


class HubError(Exception):
    """An error reported to the client as an HTTP status, an optional ``X-Error-Code`` header and a message."""

    status: int = 400
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})


class BadRequestError(HubError):
    """Malformed or unsupported request (400)."""


class UnauthorizedError(HubError):
    """Missing or invalid credentials (401)."""

    status = 401


class ForbiddenError(HubError):
    """Authenticated, but not allowed to do this (403)."""

    status = 403


class RepoNotFoundError(HubError):
    """The repository does not exist or is not visible to the caller (404, or 401 for anonymous callers)."""

    status = 404
    code = "RepoNotFound"


class RevisionNotFoundError(HubError):
    """The repository exists but the branch, tag or commit does not (404)."""

    status = 404
    code = "RevisionNotFound"


class EntryNotFoundError(HubError):
    """The revision exists but the file or folder does not (404)."""

    status = 404
    code = "EntryNotFound"


class ConflictError(HubError):
    """The repository, branch or tag already exists (409)."""

    status = 409


class PreconditionFailedError(HubError):
    """The branch moved since the ``parentCommit`` the client based its commit on (412)."""

    status = 412


# --------------------------------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """A file's content as stored: sha256 (blob address on disk), git blob id and size in bytes."""

    sha256: str
    oid: str
    size: int


@dataclass(frozen=True)
class Commit:
    """An immutable commit: metadata plus the complete flat tree of the repository at that commit."""

    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    author: str
    date: str
    files: Mapping[str, FileEntry] = field(repr=False)


@dataclass(frozen=True)
class RepoMeta:
    """A repository's mutable settings."""

    namespace: str
    name: str
    private: bool
    created_at: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a tree listing: a file (with its size and blob id) or a directory (with a synthetic tree id)."""

    type: Literal["file", "directory"]
    path: str
    oid: str
    size: int = 0


@dataclass(frozen=True)
class AddFile:
    """Commit operation: create or overwrite ``path`` with an already stored blob."""

    path: str
    entry: FileEntry


@dataclass(frozen=True)
class DeleteFile:
    """Commit operation: delete the file ``path`` (which must exist)."""

    path: str


@dataclass(frozen=True)
class DeleteFolder:
    """Commit operation: delete every file under the folder ``path`` (which must contain at least one file)."""

    path: str


CommitOperation = AddFile | DeleteFile | DeleteFolder


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def utc_now_iso() -> str:
    """The current time as the Hub formats dates, e.g. ``2024-05-01T12:34:56.789Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def git_blob_oid(content: bytes) -> str:
    """The git blob id of ``content``, as huggingface_hub's ``utils.sha.git_hash`` computes it."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new content, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_valid_repo_part(value: str) -> bool:
    """Whether ``value`` is acceptable as a namespace or repository name (Hub rules, simplified)."""
    return bool(_REPO_PART_RE.fullmatch(value)) and "--" not in value and ".." not in value and value[-1] not in ".-"


def validate_ref_name(name: str, what: str = "branch") -> str:
    """Return ``name`` if it is acceptable as a branch or tag name, else raise :class:`BadRequestError`."""
    if (
        not _REF_NAME_RE.fullmatch(name)
        or ".." in name
        or name.endswith(".lock")
        or name.startswith("refs/")
        or _FULL_SHA_RE.fullmatch(name)
    ):
        raise BadRequestError(f"Invalid {what} name: {name!r}")
    return name


def validate_path_in_repo(path: str) -> str:
    """Return ``path`` if it is a clean relative POSIX path inside a repository, else raise :class:`BadRequestError`."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise BadRequestError(f"Invalid path in repo: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise BadRequestError(f"Invalid path in repo: {path!r}")
    return path


def _tree_oid(files: Mapping[str, FileEntry], directory: str) -> str:
    """A deterministic id for the directory ``directory``: the SHA-1 of its (relative path -> blob id) map."""
    prefix = directory + "/"
    content = {path[len(prefix) :]: entry.oid for path, entry in files.items() if path.startswith(prefix)}
    return hashlib.sha1(_canonical_json(content)).hexdigest()


def list_tree(commit: Commit, path: str = "", *, recursive: bool = False) -> list[TreeEntry]:
    """List the folder ``path`` ("" for the root) of ``commit``: direct children, or every descendant if recursive.

    Raises :class:`EntryNotFoundError` if ``path`` is not a folder of the commit.
    """
    path = path.strip("/")
    prefix = f"{path}/" if path else ""
    below = sorted(p for p in commit.files if p.startswith(prefix))
    if path and not below:
        raise EntryNotFoundError(f"Folder {path!r} not found at revision {commit.id}")
    directories: set[str] = set()
    entries: list[TreeEntry] = []
    for file_path in below:
        parts = file_path[len(prefix) :].split("/")
        depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
        for i in range(1, depth + 1):
            directories.add(prefix + "/".join(parts[:i]))
        if recursive or len(parts) == 1:
            entry = commit.files[file_path]
            entries.append(TreeEntry("file", file_path, entry.oid, entry.size))
    entries.extend(TreeEntry("directory", d, _tree_oid(commit.files, d)) for d in directories)
    return sorted(entries, key=lambda e: e.path)


def path_info(commit: Commit, path: str) -> TreeEntry | None:
    """The tree entry for ``path`` in ``commit`` (file or directory), or ``None`` if there is nothing there."""
    path = path.strip("/")
    entry = commit.files.get(path)
    if entry is not None:
        return TreeEntry("file", path, entry.oid, entry.size)
    if path and any(p.startswith(path + "/") for p in commit.files):
        return TreeEntry("directory", path, _tree_oid(commit.files, path))
    return None


# --------------------------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------------------------


class HubStore:
    """Repositories, refs, commits and blobs under one storage directory (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self._commit_cache: dict[tuple[str, str], Commit] = {}

    # ---- blobs ------------------------------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Where the content with this sha256 is (or would be) stored."""
        if not _SHA256_RE.fullmatch(sha256):
            raise BadRequestError(f"Invalid sha256: {sha256!r}")
        return self.root / "blobs" / sha256[:2] / sha256

    def put_blob(self, content: bytes) -> FileEntry:
        """Store ``content`` (once, whatever the number of files having it) and describe it."""
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.blob_path(sha256)
        if not path.exists():
            _write_atomic(path, content)
        return FileEntry(sha256=sha256, oid=git_blob_oid(content), size=len(content))

    def find_blob(self, sha256: str) -> FileEntry | None:
        """Describe the stored content with this sha256, or return ``None`` if it was never stored."""
        path = self.blob_path(sha256)
        if not path.is_file():
            return None
        content = path.read_bytes()
        return FileEntry(sha256=sha256, oid=git_blob_oid(content), size=len(content))

    # ---- repositories -----------------------------------------------------------------------------------------------

    def _repo_dir(self, namespace: str, name: str) -> Path | None:
        if not (is_valid_repo_part(namespace) and is_valid_repo_part(name)):
            return None  # never build a path from an unchecked name
        return self.root / "repos" / namespace / name

    def find_repo(self, namespace: str, name: str) -> RepoMeta | None:
        """The repository's settings, or ``None`` if it does not exist."""
        repo_dir = self._repo_dir(namespace, name)
        if repo_dir is None or not (repo_dir / "repo.json").is_file():
            return None
        meta = json.loads((repo_dir / "repo.json").read_text())
        return RepoMeta(namespace, name, private=bool(meta["private"]), created_at=meta["createdAt"])

    def get_repo(self, namespace: str, name: str) -> RepoMeta:
        """The repository's settings; raises :class:`RepoNotFoundError` if it does not exist."""
        meta = self.find_repo(namespace, name)
        if meta is None:
            raise RepoNotFoundError(f"Repository {namespace}/{name} not found")
        return meta

    def create_repo(self, namespace: str, name: str, *, private: bool, author: str) -> RepoMeta:
        """Create a repository whose ``main`` branch holds an initial commit with a ``.gitattributes`` file."""
        for part in (namespace, name):
            if not is_valid_repo_part(part):
                raise BadRequestError(f"Invalid repository name part: {part!r}")
        if self.find_repo(namespace, name) is not None:
            raise ConflictError(f"Repository {namespace}/{name} already exists")
        repo_dir = self._repo_dir(namespace, name)
        assert repo_dir is not None
        created_at = utc_now_iso()
        initial = self._write_commit(
            namespace,
            name,
            parents=(),
            title="initial commit",
            message="",
            author=author,
            files={".gitattributes": self.put_blob(INITIAL_GITATTRIBUTES)},
        )
        self._write_refs(namespace, name, {"branches": {DEFAULT_BRANCH: initial.id}, "tags": {}})
        # repo.json last: a repository only "exists" once it is complete.
        _write_atomic(repo_dir / "repo.json", _canonical_json({"private": private, "createdAt": created_at}))
        return RepoMeta(namespace, name, private=private, created_at=created_at)

    def set_private(self, namespace: str, name: str, private: bool) -> RepoMeta:
        """Change the repository's visibility."""
        meta = self.get_repo(namespace, name)
        repo_dir = self._repo_dir(namespace, name)
        assert repo_dir is not None
        _write_atomic(repo_dir / "repo.json", _canonical_json({"private": private, "createdAt": meta.created_at}))
        return RepoMeta(namespace, name, private=private, created_at=meta.created_at)

    def delete_repo(self, namespace: str, name: str) -> None:
        """Delete the repository (its blobs stay in the shared blob store)."""
        self.get_repo(namespace, name)
        repo_dir = self._repo_dir(namespace, name)
        assert repo_dir is not None
        (repo_dir / "repo.json").unlink()  # first, so that a half-deleted repository does not exist
        shutil.rmtree(repo_dir)
        self._commit_cache = {k: v for k, v in self._commit_cache.items() if k[0] != f"{namespace}/{name}"}

    # ---- refs -------------------------------------------------------------------------------------------------------

    def _read_refs(self, namespace: str, name: str) -> dict[str, dict[str, str]]:
        self.get_repo(namespace, name)
        repo_dir = self._repo_dir(namespace, name)
        assert repo_dir is not None
        return json.loads((repo_dir / "refs.json").read_text())

    def _write_refs(self, namespace: str, name: str, refs: dict[str, dict[str, str]]) -> None:
        repo_dir = self._repo_dir(namespace, name)
        assert repo_dir is not None
        _write_atomic(repo_dir / "refs.json", _canonical_json(refs))

    def branches(self, namespace: str, name: str) -> dict[str, str]:
        """Branch name -> head commit id."""
        return dict(self._read_refs(namespace, name)["branches"])

    def tags(self, namespace: str, name: str) -> dict[str, str]:
        """Tag name -> commit id."""
        return dict(self._read_refs(namespace, name)["tags"])

    def resolve(self, namespace: str, name: str, revision: str) -> Commit:
        """The commit a revision designates: a branch, a tag (optionally as ``refs/heads/...``/``refs/tags/...``),
        a full commit id or an unambiguous commit id prefix of at least 7 characters."""
        refs = self._read_refs(namespace, name)
        if revision.startswith("refs/heads/"):
            commit_id = refs["branches"].get(revision.removeprefix("refs/heads/"))
        elif revision.startswith("refs/tags/"):
            commit_id = refs["tags"].get(revision.removeprefix("refs/tags/"))
        else:
            commit_id = refs["branches"].get(revision) or refs["tags"].get(revision)
            if commit_id is None and _SHORT_SHA_RE.fullmatch(revision):
                commit_id = self._find_commit_id(namespace, name, revision)
        if commit_id is None:
            raise RevisionNotFoundError(f"Invalid rev id: {revision}")
        return self.get_commit(namespace, name, commit_id)

    def _find_commit_id(self, namespace: str, name: str, prefix: str) -> str | None:
        repo_dir = self._repo_dir(namespace, name)
        assert repo_dir is not None
        if len(prefix) == 40:
            return prefix if (repo_dir / "commits" / f"{prefix}.json").is_file() else None
        matches = [p.stem for p in (repo_dir / "commits").glob(f"{prefix}*.json")]
        return matches[0] if len(matches) == 1 else None

    def create_branch(self, namespace: str, name: str, branch: str, commit_id: str) -> None:
        """Create ``branch`` pointing at ``commit_id``; raises :class:`ConflictError` if it exists."""
        validate_ref_name(branch, "branch")
        refs = self._read_refs(namespace, name)
        if branch in refs["branches"]:
            raise ConflictError(f"Reference already exists: refs/heads/{branch}")
        refs["branches"][branch] = commit_id
        self._write_refs(namespace, name, refs)

    def delete_branch(self, namespace: str, name: str, branch: str) -> None:
        """Delete ``branch`` (not the default branch)."""
        refs = self._read_refs(namespace, name)
        if branch == DEFAULT_BRANCH:
            raise BadRequestError(f"Cannot delete the default branch {DEFAULT_BRANCH!r}")
        if refs["branches"].pop(branch, None) is None:
            raise RevisionNotFoundError(f"Invalid rev id: {branch}")
        self._write_refs(namespace, name, refs)

    def create_tag(self, namespace: str, name: str, tag: str, commit_id: str) -> None:
        """Create ``tag`` pointing at ``commit_id``; raises :class:`ConflictError` if it exists."""
        validate_ref_name(tag, "tag")
        refs = self._read_refs(namespace, name)
        if tag in refs["tags"]:
            raise ConflictError(f"Reference already exists: refs/tags/{tag}")
        refs["tags"][tag] = commit_id
        self._write_refs(namespace, name, refs)

    def delete_tag(self, namespace: str, name: str, tag: str) -> None:
        """Delete ``tag``."""
        refs = self._read_refs(namespace, name)
        if refs["tags"].pop(tag, None) is None:
            raise RevisionNotFoundError(f"Invalid rev id: {tag}")
        self._write_refs(namespace, name, refs)

    # ---- commits ----------------------------------------------------------------------------------------------------

    def get_commit(self, namespace: str, name: str, commit_id: str) -> Commit:
        """Load a commit by its full id (cached in memory: commits never change)."""
        key = (f"{namespace}/{name}", commit_id)
        cached = self._commit_cache.get(key)
        if cached is not None:
            return cached
        repo_dir = self._repo_dir(namespace, name)
        path = None if repo_dir is None else repo_dir / "commits" / f"{commit_id}.json"
        if path is None or not _FULL_SHA_RE.fullmatch(commit_id) or not path.is_file():
            raise RevisionNotFoundError(f"Invalid rev id: {commit_id}")
        doc = json.loads(path.read_bytes())
        commit = Commit(
            id=commit_id,
            parents=tuple(doc["parents"]),
            title=doc["title"],
            message=doc["message"],
            author=doc["author"],
            date=doc["date"],
            files={p: FileEntry(**e) for p, e in doc["files"].items()},
        )
        self._commit_cache[key] = commit
        return commit

    def history(self, namespace: str, name: str, commit: Commit) -> list[Commit]:
        """``commit`` and its first-parent ancestors, newest first."""
        result = [commit]
        while result[-1].parents:
            result.append(self.get_commit(namespace, name, result[-1].parents[0]))
        return result

    def _write_commit(
        self,
        namespace: str,
        name: str,
        *,
        parents: tuple[str, ...],
        title: str,
        message: str,
        author: str,
        files: Mapping[str, FileEntry],
    ) -> Commit:
        date = utc_now_iso()
        doc = {
            "parents": list(parents),
            "title": title,
            "message": message,
            "author": author,
            "date": date,
            "files": {p: {"sha256": e.sha256, "oid": e.oid, "size": e.size} for p, e in files.items()},
        }
        data = _canonical_json(doc)
        commit_id = hashlib.sha1(data).hexdigest()
        repo_dir = self._repo_dir(namespace, name)
        assert repo_dir is not None
        path = repo_dir / "commits" / f"{commit_id}.json"
        if not path.exists():
            _write_atomic(path, data)
        return self.get_commit(namespace, name, commit_id)

    def commit(
        self,
        namespace: str,
        name: str,
        branch: str,
        operations: Iterable[CommitOperation],
        *,
        title: str,
        message: str,
        author: str,
        parent_commit: str | None = None,
    ) -> Commit:
        """Apply ``operations`` (in order) on top of the head of ``branch``, record the commit and move the branch.

        ``parent_commit`` (a full id or a prefix of at least 5 hex characters) must designate the current head of
        the branch, otherwise :class:`PreconditionFailedError` is raised and nothing changes.
        """
        branch = branch.removeprefix("refs/heads/")
        refs = self._read_refs(namespace, name)
        head_id = refs["branches"].get(branch)
        if head_id is None:
            if _SHORT_SHA_RE.fullmatch(branch) or branch in refs["tags"]:
                raise BadRequestError(f"Can only commit to a branch, not to {branch!r}")
            raise RevisionNotFoundError(f"Invalid rev id: {branch}")
        if parent_commit is not None and not head_id.startswith(parent_commit.lower()):
            raise PreconditionFailedError(
                f"A commit has happened since. Please refresh and try again. (parentCommit {parent_commit} is not"
                f" the head {head_id} of branch {branch!r})"
            )
        head = self.get_commit(namespace, name, head_id)
        files = dict(head.files)
        for op in operations:
            path = validate_path_in_repo(op.path.strip("/") if isinstance(op, DeleteFolder) else op.path)
            if isinstance(op, AddFile):
                files[path] = op.entry
            elif isinstance(op, DeleteFile):
                if files.pop(path, None) is None:
                    raise EntryNotFoundError(f"A file with this name doesn't exist: {path}")
            else:
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise EntryNotFoundError(f"A folder with this name doesn't exist: {path}")
                for p in doomed:
                    del files[p]
        for path in files:  # a path cannot be both a file and a folder
            parts = path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in files:
                    raise BadRequestError(f"{'/'.join(parts[:i])!r} is a file, it cannot contain {path!r}")
        commit = self._write_commit(
            namespace,
            name,
            parents=(head_id,),
            title=title,
            message=message,
            author=author,
            files=dict(sorted(files.items())),
        )
        refs["branches"][branch] = commit.id
        self._write_refs(namespace, name, refs)
        return commit
