"""The Starlette application of the test Hub server: the part of the Hugging Face Hub HTTP API that huggingface_hub
and transformers use for model repositories.

Endpoints (``{repo}`` is ``{namespace}/{name}``; revisions and branch/tag names are URL-encoded, ``/`` as ``%2F``):

* ``GET /api/whoami-v2``: the token's user (401 without a valid token).
* ``POST /api/repos/create`` ``{name, organization?, visibility?|private?, type?}``: 409 if it exists, with the
  repo ``url`` in the body (``create_repo(exist_ok=True)`` relies on it). ``DELETE /api/repos/delete``.
* ``GET /api/models/{repo}`` and ``.../revision/{rev}``: model info with ``sha``, ``siblings`` (with sizes and blob
  ids if ``?blobs=true``, i.e. ``files_metadata=True``), ``private``, dates; ``?expand=`` filters the keys.
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``?recursive=true``), ``POST .../paths-info/{rev}``.
* ``GET /api/models/{repo}/refs`` (branches and tags with ``targetCommit``), ``GET .../commits/{rev}``
  (first-parent history, newest first).
* ``POST /api/models/{repo}/preupload/{rev}``: every file is ``"regular"`` (never LFS/Xet), with the ``oid`` of the
  file currently at that path so that huggingface_hub skips unchanged files.
* ``POST /api/models/{repo}/commit/{rev}``: NDJSON, a ``header`` line (``summary``, ``description``,
  ``parentCommit``) then ``file`` (base64 content), ``deletedFile``, ``deletedFolder`` lines (and ``lfsFile`` for
  content the server already has). A ``parentCommit`` other than the branch head answers 412.
* ``POST|DELETE /api/models/{repo}/branch/{branch}`` (``{startingPoint?}``), ``POST .../tag/{rev}``
  (``{tag, message?}``), ``DELETE .../tag/{tag}``, ``PUT .../settings`` (``{private}`` or ``{visibility}``).
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (the quoted git blob id),
  ``Content-Length`` and ``Range`` support (``FileResponse``); no redirects.
* ``POST /api/validate-yaml`` (always valid; called when a ``README.md`` is committed) and
  ``GET /api/agent-harnesses`` (an empty registry; huggingface_hub fetches it once per process for its user agent).

Errors carry the ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and ``X-Error-Message``
headers from which huggingface_hub builds its exceptions; a missing file's 404 also carries ``X-Repo-Commit`` so the
client can cache the file's absence. Like the real Hub, a repository that does not exist or is private and not the
caller's answers 401 to anonymous callers and 404 to authenticated ones, both ``RepoNotFound`` (so the client raises
``RepositoryNotFoundError``), and an unknown token answers 401 ``Invalid credentials in Authorization header``.
Pull requests (``create_pr``), LFS/Xet uploads, gated repos, datasets and spaces are not supported (clear 400/404).

Routing is done on the raw (still percent-encoded) request path, since revisions such as ``refs%2Fpr%2F1`` or branch
names with slashes must not be split at their decoded ``/``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import mimetypes
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .storage import (
    DEFAULT_BRANCH,
    AddFile,
    BadRequestError,
    CommitOperation,
    ConflictError,
    DeleteFile,
    DeleteFolder,
    EntryNotFoundError,
    ForbiddenError,
    HubError,
    HubStore,
    RepoMeta,
    RepoNotFoundError,
    TreeEntry,
    UnauthorizedError,
    list_tree,
    path_info,
    validate_path_in_repo,
)

_NO_PULL_REQUESTS = "Pull requests (create_pr=True) are not supported by the test Hub server"
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE"]
_ALL_METHODS = " ".join(_HTTP_METHODS)

Handler = Callable[..., Awaitable[Response]]


@dataclass(frozen=True)
class _Route:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: Handler


def _is_true(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def _header_safe(text: str) -> str:
    """``text`` on one line, in ASCII: HTTP header values must be latin-1 and must not contain newlines."""
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode("ascii")


def _error_response(error: HubError, **extra_body: Any) -> JSONResponse:
    headers = {"X-Error-Message": _header_safe(error.message), **error.headers}
    if error.code is not None:
        headers["X-Error-Code"] = error.code
    return JSONResponse({"error": error.message, **extra_body}, status_code=error.status, headers=headers)


async def _json_body(request: Request, *, default: dict[str, Any] | None = None) -> dict[str, Any]:
    body = await request.body()
    if not body.strip() and default is not None:
        return default
    try:
        value = json.loads(body)
    except ValueError as e:
        raise BadRequestError(f"Request body is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise BadRequestError("Request body must be a JSON object")
    return value


def _tree_entry_json(entry: TreeEntry) -> dict[str, Any]:
    return {"type": entry.type, "oid": entry.oid, "size": entry.size, "path": entry.path}


def _decode_file_content(value: Mapping[str, Any]) -> bytes:
    content = value.get("content")
    if not isinstance(content, str):
        raise BadRequestError(f"Missing content for file {value.get('path')!r}")
    encoding = value.get("encoding", "base64")
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except binascii.Error as e:
            raise BadRequestError(f"Invalid base64 content for file {value.get('path')!r}: {e}") from e
    if encoding in ("utf-8", "utf8"):
        return content.encode()
    raise BadRequestError(f"Unsupported content encoding {encoding!r}")


class HubApp:
    """The HTTP layer: authentication, visibility rules and the JSON shapes huggingface_hub expects.

    Args:
        store: where repositories live.
        tokens: token -> user name. Each user can write to its own namespace.
        orgs: organization name -> member user names; members can write to the organization's namespace.
    """

    def __init__(self, store: HubStore, tokens: Mapping[str, str], orgs: Mapping[str, Iterable[str]] | None = None):
        self.store = store
        self.users_by_token = dict(tokens)
        self.org_members = {org: frozenset(members) for org, members in (orgs or {}).items()}
        repo = r"/api/models/(?P<namespace>[^/]+)/(?P<name>[^/]+)"
        resolve = r"/(?P<namespace>[^/]+)/(?P<name>[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)"
        table: list[tuple[str, str, Handler]] = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("GET", r"/api/agent-harnesses", self.agent_harnesses),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", r"/api/repos/create", self.create_repo),
            ("DELETE", r"/api/repos/delete", self.delete_repo),
            ("GET", repo, self.model_info),
            ("GET", repo + r"/revision/(?P<revision>[^/]+)", self.model_info),
            ("GET", repo + r"/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", self.tree),
            ("POST", repo + r"/paths-info/(?P<revision>[^/]+)", self.paths_info),
            ("GET", repo + r"/refs", self.refs),
            ("GET", repo + r"/commits/(?P<revision>[^/]+)", self.commits),
            ("POST", repo + r"/preupload/(?P<revision>[^/]+)", self.preupload),
            ("POST", repo + r"/commit/(?P<revision>[^/]+)", self.commit),
            ("POST", repo + r"/branch/(?P<branch>[^/]+)", self.create_branch),
            ("DELETE", repo + r"/branch/(?P<branch>[^/]+)", self.delete_branch),
            ("POST", repo + r"/tag/(?P<revision>[^/]+)", self.create_tag),
            ("DELETE", repo + r"/tag/(?P<tag>[^/]+)", self.delete_tag),
            ("PUT", repo + r"/settings", self.settings),
            ("GET HEAD", resolve, self.resolve),
            # Other repository types do not exist here: say so the way huggingface_hub understands.
            (_ALL_METHODS, r"/api/(?:datasets|spaces|kernels)/.*", self.unsupported_repo_type),
            (_ALL_METHODS, r"/(?:datasets|spaces|kernels)/[^/]+/[^/]+/resolve/.*", self.unsupported_repo_type),
        ]
        self.routes = [_Route(frozenset(m.split()), re.compile(p), h) for m, p, h in table]

    # ---- plumbing ---------------------------------------------------------------------------------------------------

    async def dispatch(self, request: Request) -> Response:
        """Route on the raw path, authenticate, call the handler and turn :class:`HubError` into Hub-style errors."""
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        path = raw_path.decode("latin-1")
        allowed: set[str] = set()
        for route in self.routes:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            if request.method not in route.methods:
                allowed |= route.methods
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            try:
                user = self._authenticate(request)
                return await route.handler(request, user, **params)
            except HubError as error:
                return _error_response(error)
        if allowed:
            return _error_response(HubError(f"Method {request.method} not allowed", status=405))
        return _error_response(HubError(f"No such endpoint: {request.method} {path}", status=404))

    def _authenticate(self, request: Request) -> str | None:
        """The user owning the request's bearer token; ``None`` without ``Authorization``; 401 for a bad token."""
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        user = self.users_by_token.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise UnauthorizedError(_INVALID_CREDENTIALS)
        return user

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.org_members.get(namespace, ()))

    def _readable_repo(self, user: str | None, namespace: str, name: str) -> RepoMeta:
        meta = self.store.find_repo(namespace, name)
        if meta is None or (meta.private and not self._can_write(user, namespace)):
            raise RepoNotFoundError("Repository not found", status=401 if user is None else 404)
        return meta

    def _writable_repo(self, user: str | None, namespace: str, name: str) -> RepoMeta:
        meta = self._readable_repo(user, namespace, name)
        if user is None:
            raise UnauthorizedError("You must be authenticated to write to a repository")
        if not self._can_write(user, namespace):
            raise ForbiddenError(f"You don't have the rights to write to {meta.repo_id}")
        return meta

    @staticmethod
    def _base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    # ---- account ----------------------------------------------------------------------------------------------------

    async def whoami(self, request: Request, user: str | None) -> Response:
        if user is None:
            raise UnauthorizedError(_INVALID_CREDENTIALS)
        orgs = sorted(org for org, members in self.org_members.items() if user in members)
        return JSONResponse(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "canPay": False,
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "hubserver", "role": "write"}},
            }
        )

    async def agent_harnesses(self, request: Request, user: str | None) -> Response:
        return JSONResponse({"standardEnvVars": [], "harnesses": {}})

    async def validate_yaml(self, request: Request, user: str | None) -> Response:
        return JSONResponse({"errors": [], "warnings": []})

    async def unsupported_repo_type(self, request: Request, user: str | None, **_: str) -> Response:
        raise RepoNotFoundError(
            "Repository not found (the test Hub server only hosts model repositories)",
            status=401 if user is None else 404,
        )

    # ---- repositories -----------------------------------------------------------------------------------------------

    async def create_repo(self, request: Request, user: str | None) -> Response:
        body = await _json_body(request)
        if body.get("type") not in (None, "model"):
            raise BadRequestError("Only model repositories are supported by the test Hub server")
        if user is None:
            raise UnauthorizedError("You must be authenticated to create a repository")
        name = body.get("name")
        namespace = body.get("organization") or user
        if not isinstance(name, str) or not isinstance(namespace, str):
            raise BadRequestError("Missing or invalid repository name")
        if not self._can_write(user, namespace):
            raise ForbiddenError(f"You don't have the rights to create a model under the namespace {namespace!r}")
        visibility = body.get("visibility")
        private = visibility == "private" if visibility is not None else bool(body.get("private"))
        url = f"{self._base_url(request)}/{namespace}/{name}"
        try:
            self.store.create_repo(namespace, name, private=private, author=user)
        except ConflictError:
            return _error_response(ConflictError("You already created this model repo"), url=url)
        return JSONResponse({"url": url, "name": f"{namespace}/{name}", "id": f"{namespace}/{name}"})

    async def delete_repo(self, request: Request, user: str | None) -> Response:
        body = await _json_body(request)
        name = body.get("name")
        namespace = body.get("organization") or user
        if body.get("type") not in (None, "model") or not isinstance(name, str) or not isinstance(namespace, str):
            raise RepoNotFoundError("Repository not found", status=401 if user is None else 404)
        self._writable_repo(user, namespace, name)
        self.store.delete_repo(namespace, name)
        return JSONResponse({})

    async def settings(self, request: Request, user: str | None, namespace: str, name: str) -> Response:
        self._writable_repo(user, namespace, name)
        body = await _json_body(request)
        if body.get("gated") not in (None, False, "false"):
            raise BadRequestError("Gated repositories are not supported by the test Hub server")
        if "visibility" in body:
            if body["visibility"] not in ("public", "private"):
                raise BadRequestError(f"Unsupported visibility {body['visibility']!r}")
            self.store.set_private(namespace, name, body["visibility"] == "private")
        elif "private" in body:
            self.store.set_private(namespace, name, bool(body["private"]))
        return JSONResponse({})

    async def model_info(
        self, request: Request, user: str | None, namespace: str, name: str, revision: str = DEFAULT_BRANCH
    ) -> Response:
        meta = self._readable_repo(user, namespace, name)
        commit = self.store.resolve(namespace, name, revision)
        with_blobs = _is_true(request.query_params.get("blobs"))
        siblings = [
            {"rfilename": path, **({"size": entry.size, "blobId": entry.oid} if with_blobs else {})}
            for path, entry in sorted(commit.files.items())
        ]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(meta.repo_id.encode()).hexdigest()[:24],
            "id": meta.repo_id,
            "modelId": meta.repo_id,
            "author": namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": meta.created_at,
            "private": meta.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        }
        expand = request.query_params.getlist("expand") + request.query_params.getlist("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        return JSONResponse(info)

    # ---- browsing ---------------------------------------------------------------------------------------------------

    async def tree(
        self, request: Request, user: str | None, namespace: str, name: str, revision: str, path: str = ""
    ) -> Response:
        self._readable_repo(user, namespace, name)
        commit = self.store.resolve(namespace, name, revision)
        recursive = _is_true(request.query_params.get("recursive"))
        return JSONResponse([_tree_entry_json(e) for e in list_tree(commit, path, recursive=recursive)])

    async def paths_info(
        self, request: Request, user: str | None, namespace: str, name: str, revision: str
    ) -> Response:
        self._readable_repo(user, namespace, name)
        commit = self.store.resolve(namespace, name, revision)
        if request.headers.get("content-type", "").startswith("application/json"):
            paths = (await _json_body(request)).get("paths", [])
        else:  # huggingface_hub sends a form: paths=a&paths=b&expand=False
            paths = parse_qs((await request.body()).decode(), keep_blank_values=True).get("paths", [])
        entries = [path_info(commit, p) for p in paths if isinstance(p, str)]
        return JSONResponse([_tree_entry_json(e) for e in entries if e is not None])

    async def refs(self, request: Request, user: str | None, namespace: str, name: str) -> Response:
        self._readable_repo(user, namespace, name)

        def as_refs(kind: str, refs: Mapping[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(refs.items())]

        result: dict[str, Any] = {
            "branches": as_refs("heads", self.store.branches(namespace, name)),
            "converts": [],
            "tags": as_refs("tags", self.store.tags(namespace, name)),
        }
        if _is_true(request.query_params.get("include_prs")):
            result["pullRequests"] = []
        return JSONResponse(result)

    async def commits(self, request: Request, user: str | None, namespace: str, name: str, revision: str) -> Response:
        self._readable_repo(user, namespace, name)
        head = self.store.resolve(namespace, name, revision)
        formatted = "formatted" in request.query_params.getlist("expand[]")
        items = []
        for commit in self.store.history(namespace, name, head):
            item: dict[str, Any] = {
                "id": commit.id,
                "title": commit.title,
                "message": commit.message,
                "date": commit.date,
                "authors": [{"user": commit.author, "avatar": None}],
            }
            if formatted:
                item["formatted"] = {"title": html.escape(commit.title), "message": html.escape(commit.message)}
            items.append(item)
        return JSONResponse(items)

    # ---- uploads ----------------------------------------------------------------------------------------------------

    async def preupload(self, request: Request, user: str | None, namespace: str, name: str, revision: str) -> Response:
        self._writable_repo(user, namespace, name)
        if _is_true(request.query_params.get("create_pr")):
            raise BadRequestError(_NO_PULL_REQUESTS)
        commit = self.store.resolve(namespace, name, revision)
        files = (await _json_body(request)).get("files")
        if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) for f in files
        ):
            raise BadRequestError("Expected {'files': [{'path': ..., 'size': ..., 'sample': ...}, ...]}")
        answers = []
        for file in files:
            existing = commit.files.get(file["path"])
            answers.append(
                {
                    "path": file["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing is not None else None,
                }
            )
        return JSONResponse({"files": answers, "commitOid": commit.id})

    async def commit(self, request: Request, user: str | None, namespace: str, name: str, revision: str) -> Response:
        self._writable_repo(user, namespace, name)
        if _is_true(request.query_params.get("create_pr")):
            raise BadRequestError(_NO_PULL_REQUESTS)
        try:
            items = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        except ValueError as e:
            raise BadRequestError(f"Commit payload is not valid NDJSON: {e}") from e
        if not items or not isinstance(items[0], dict) or items[0].get("key") != "header":
            raise BadRequestError("Commit payload must start with a 'header' line")
        header = items[0].get("value") or {}
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary:
            raise BadRequestError("Commit summary (commit message) is required")
        operations = [self._commit_operation(item) for item in items[1:]]
        commit = self.store.commit(
            namespace,
            name,
            revision,
            operations,
            title=summary,
            message=header.get("description") or "",
            author=user or "",
            parent_commit=header.get("parentCommit"),
        )
        return JSONResponse(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{self._base_url(request)}/{namespace}/{name}/commit/{commit.id}",
                "pullRequestUrl": None,
                "hookOutput": "",
            }
        )

    def _commit_operation(self, item: Any) -> CommitOperation:
        """Turn one NDJSON line of a commit payload into a commit operation (storing added content right away)."""
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise BadRequestError(f"Malformed commit payload line: {item!r}")
        key, value = item.get("key"), item["value"]
        path = value.get("path")
        if not isinstance(path, str):
            raise BadRequestError(f"Missing path in commit payload line: {item!r}")
        if key == "file":
            validate_path_in_repo(path)
            return AddFile(path, self.store.put_blob(_decode_file_content(value)))
        if key == "lfsFile":
            entry = self.store.find_blob(str(value.get("oid", "")))
            if entry is None:
                raise BadRequestError(
                    f"LFS upload of {path!r} is not supported by the test Hub server (preupload answers 'regular')"
                )
            return AddFile(validate_path_in_repo(path), entry)
        if key == "deletedFile":
            return DeleteFile(path)
        if key == "deletedFolder":
            return DeleteFolder(path)
        raise BadRequestError(f"Unsupported commit operation {key!r}")

    # ---- refs -------------------------------------------------------------------------------------------------------

    async def create_branch(
        self, request: Request, user: str | None, namespace: str, name: str, branch: str
    ) -> Response:
        self._writable_repo(user, namespace, name)
        body = await _json_body(request, default={})
        if body.get("emptyBranch"):
            raise BadRequestError("Empty branches are not supported by the test Hub server")
        start = self.store.resolve(namespace, name, body.get("startingPoint") or DEFAULT_BRANCH)
        self.store.create_branch(namespace, name, branch, start.id)
        return JSONResponse({})

    async def delete_branch(
        self, request: Request, user: str | None, namespace: str, name: str, branch: str
    ) -> Response:
        self._writable_repo(user, namespace, name)
        self.store.delete_branch(namespace, name, branch)
        return JSONResponse({})

    async def create_tag(
        self, request: Request, user: str | None, namespace: str, name: str, revision: str
    ) -> Response:
        self._writable_repo(user, namespace, name)
        body = await _json_body(request)
        tag = body.get("tag")
        if not isinstance(tag, str):
            raise BadRequestError("Missing tag name")
        target = self.store.resolve(namespace, name, revision)
        self.store.create_tag(namespace, name, tag, target.id)
        return JSONResponse({})

    async def delete_tag(self, request: Request, user: str | None, namespace: str, name: str, tag: str) -> Response:
        self._writable_repo(user, namespace, name)
        self.store.delete_tag(namespace, name, tag)
        return JSONResponse({})

    # ---- downloads --------------------------------------------------------------------------------------------------

    async def resolve(
        self, request: Request, user: str | None, namespace: str, name: str, revision: str, path: str
    ) -> Response:
        self._readable_repo(user, namespace, name)
        commit = self.store.resolve(namespace, name, revision)
        headers = {"X-Repo-Commit": commit.id}
        entry = commit.files.get(path)
        if entry is None:
            raise EntryNotFoundError("Entry not found", headers=headers)
        headers["ETag"] = f'"{entry.oid}"'
        return FileResponse(
            self.store.blob_path(entry.sha256),
            headers=headers,
            media_type=mimetypes.guess_type(path)[0] or "application/octet-stream",
        )


def create_app(
    storage: str | Path,
    tokens: Mapping[str, str],
    orgs: Mapping[str, Iterable[str]] | None = None,
) -> Starlette:
    """Build the ASGI application serving the repositories stored under ``storage``.

    Args:
        storage: storage directory (created if missing); reusing it keeps the repositories across restarts.
        tokens: token -> user name.
        orgs: organization name -> member user names.
    """
    hub = HubApp(HubStore(storage), tokens, orgs)
    app = Starlette(routes=[Route("/{path:path}", hub.dispatch, methods=_HTTP_METHODS)])
    app.state.hub = hub
    return app
