"""Reading a delta directory (SPEC §2, §4, §8): validate everything, then decode on demand.

Opening a `DeltaReader` reads the manifest and the safetensors headers only, and checks that
every stored tensor the manifest implies exists, in the dtype and shape its encoding expects, in
a file inside the delta directory. Tensor bytes are read lazily, one parameter at a time, straight
onto the requested device (safetensors loads onto CUDA without a CPU copy).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.constants import (
    MANIFEST_NAME,
    MAX_ELEMENTS_WITHOUT_BASE,
    MAX_INDEX_BYTES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from ..core.dtypes import TORCH_DTYPES, compute_dtype
from ..core.manifest import Manifest, TensorEntry, stored_key
from ..core.strict_json import loads_strict
from ..errors import CorruptDeltaError, ManifestError
from .delta_files import allowed_roots, check_listed, safe_member  # noqa: F401  (allowed_roots re-exported)
from .key_map import check_unique
from .tensor_reads import read_range, tensor_ranges


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise ManifestError(
            f"{what} is too large",
            expected=f"at most {limit} bytes",
            found=f"{size} bytes",
            fix="this is not a delta file, or a hostile one",
        )
    return path.read_bytes()


class DeltaReader:
    """An opened, validated delta directory.

    Example:
        >>> reader = DeltaReader("path/to/delta")                    # doctest: +SKIP
        >>> delta = reader.decode("model.layers.0.mlp.up_proj.weight")  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike, *, verify_checksums: bool = True):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ManifestError(
                f"no {MANIFEST_NAME} in {self.directory}",
                expected="a delta-format directory",
                found="no manifest",
                fix="point at a directory written by delta-format compress",
            )
        safe_member(self.directory, MANIFEST_NAME, "the manifest")
        self.side_files: dict[str, Path] = {}
        """Files the manifest vouches for besides the tensor files and the index (config,
        tokenizer files, ...), by relative path: present and checked when the delta was opened."""
        self.manifest = Manifest.from_json_bytes(read_bounded(manifest_path, MAX_INDEX_BYTES, MANIFEST_NAME))
        self._handles: dict[tuple[Path, str], object] = {}
        self._ranges: dict[Path, dict] = {}
        self._sources: dict[str, str] = {}
        self._key_to_file = self._read_weight_map()
        self._check_files(verify_checksums)
        self._validate_stored()

    def _read_weight_map(self) -> dict[str, Path]:
        index_path = self.directory / WEIGHTS_INDEX_NAME
        if index_path.exists() or index_path.is_symlink():
            safe_member(self.directory, WEIGHTS_INDEX_NAME, "the index")
            index = loads_strict(read_bounded(index_path, MAX_INDEX_BYTES, WEIGHTS_INDEX_NAME), WEIGHTS_INDEX_NAME)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise ManifestError(
                    f"{WEIGHTS_INDEX_NAME} lacks a weight_map", expected="an object", found=repr(weight_map)[:100]
                )
            checked: dict[str, Path] = {}
            for key, file in weight_map.items():
                if not isinstance(file, str) or file not in checked:
                    checked[file] = safe_member(self.directory, file, f"index entry {key!r}", plain=True)
            return {key: checked[file] for key, file in weight_map.items()}
        path = safe_member(self.directory, WEIGHTS_NAME, "the delta weights", plain=True)
        return {key: path for key in self._keys_of(path)}

    def _check_files(self, verify_checksums: bool) -> None:
        """Every tensor file is listed in the manifest with its size and SHA-256, and matches; so
        does every other listed file that is present (the index, config and tokenizer files).
        A listed side file that is absent is left out (a download may have filtered it)."""
        recorded = self.manifest.files
        tensor_files = {path.name for path in self._key_to_file.values()}
        for name in sorted(tensor_files - recorded.keys()):
            raise CorruptDeltaError(
                f"{name} is not listed in the manifest's files",
                expected=sorted(recorded),
                found=name,
                fix="re-create the delta",
            )
        for name, info in sorted(recorded.items()):
            path = safe_member(self.directory, name, f"the file {name!r}", missing_ok=name not in tensor_files)
            if path is None:
                continue
            check_listed(path, name, info, verify_checksums or name not in tensor_files)  # side files: always
            if name not in tensor_files and name != WEIGHTS_INDEX_NAME:
                self.side_files[name] = path

    def _open(self, path: Path, device: str = "cpu"):
        handle = self._handles.get((path, device))
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt", device=device)
            except (SafetensorError, OSError, ValueError) as exc:
                raise CorruptDeltaError(
                    f"{path.name} is not a valid safetensors file",
                    expected="a complete safetensors file",
                    found=str(exc)[:200],
                    fix="re-download or re-create the delta",
                ) from None
            self._handles[(path, device)] = handle
        return handle

    def _keys_of(self, path: Path) -> list[str]:
        return list(self._open(path).keys())

    def _validate_stored(self) -> None:
        expected_keys: dict[str, tuple[str, str, object]] = {}
        for name, entry in self.manifest.tensors.items():
            for role, exp in entry.encoding.expected(entry.shape).items():
                expected_keys[stored_key(name, role)] = (name, role, exp)
        missing = expected_keys.keys() - self._key_to_file.keys()
        extra = self._key_to_file.keys() - expected_keys.keys()
        if missing or extra:
            raise CorruptDeltaError(
                "stored tensors disagree with the manifest",
                expected=f"{len(expected_keys)} tensors named by the manifest",
                found=f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}",
                fix="re-download or re-create the delta",
            )
        by_file: dict[Path, list[str]] = {}
        for key, path in self._key_to_file.items():
            by_file.setdefault(path, []).append(key)
        for path, keys in by_file.items():
            handle = self._open(path)
            present = set(handle.keys())
            for key in keys:
                if key not in present:
                    raise CorruptDeltaError(
                        f"{path.name} lacks {key!r}",
                        expected="the tensor the index names",
                        found="no such tensor",
                        fix="re-download or re-create the delta",
                    )
                view = handle.get_slice(key)
                expected_keys[key][2].check(key, view.get_dtype(), tuple(view.get_shape()))

    def member_files(self) -> dict[str, Path]:
        """Every file of the delta that it vouches for, by relative POSIX path: the manifest, the
        index, the tensor files and the side files listed in ``files``; each was checked when
        the delta was opened (SPEC §3.5). The model card is not among them (`Delta.files`)."""
        members = {MANIFEST_NAME: self.directory / MANIFEST_NAME}
        members.update({path.name: path for path in self._key_to_file.values()})
        if (self.directory / WEIGHTS_INDEX_NAME).is_file():
            members[WEIGHTS_INDEX_NAME] = self.directory / WEIGHTS_INDEX_NAME
        members.update(self.side_files)
        return dict(sorted(members.items()))

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.tensors)

    def entry(self, name: str) -> TensorEntry:
        return self.manifest.tensors[name]

    def renamed(self, names: dict[str, str]) -> DeltaReader:
        """A view of this reader whose parameters carry other names (``{name in the delta: new
        name}``, e.g. what transformers renames a checkpoint's keys to on loading), sharing its open
        files. `source_name` gives a parameter's name in the delta back: the name its seeded masks
        and rounding are drawn from (SPEC §6, §9.1)."""
        check_unique(names, self.manifest.tensors, f"the delta at {self.directory}")
        view = copy.copy(self)
        view.manifest = dataclasses.replace(
            self.manifest, tensors={names.get(n, n): e for n, e in self.manifest.tensors.items()}
        )
        view._sources = {names.get(n, n): self.source_name(n) for n in self.manifest.tensors if names.get(n, n) != n}
        return view

    def source_name(self, name: str) -> str:
        """``name``'s parameter name in the delta's files (itself unless this is a `renamed` view)."""
        return self._sources.get(name, name)

    def stored(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The stored tensors of one parameter, by role, loaded onto ``device``."""
        entry = self.manifest.tensors[name]
        device = str(torch.device(device))
        out = {}
        for role in entry.encoding.expected(entry.shape):
            key = stored_key(self.source_name(name), role)
            path = self._key_to_file[key]
            if path not in self._ranges:
                self._ranges[path] = tensor_ranges(path)
            out[role] = read_range(path, self._ranges[path][key], device)  # no per-call leak (tensor_reads)
        return out

    def decode(
        self,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        max_elements: int | None = MAX_ELEMENTS_WITHOUT_BASE,
    ) -> torch.Tensor:
        """The parameter's decoded delta (or replacement value) on ``device``, in the arithmetic
        dtype of SPEC §9 (float32, or float64 for float64 parameters) unless ``dtype`` is given.

        A declared shape is refused before anything is allocated when it holds more than
        ``max_elements`` (SPEC §8.7); pass ``None`` once the shape was checked against the base."""
        entry = self.check_elements(name, max_elements)
        dtype = dtype or compute_dtype(TORCH_DTYPES[entry.dtype])
        return entry.encoding.decode(self.stored(name, device), entry.shape, self.source_name(name), dtype)

    def check_elements(self, name: str, max_elements: int | None = MAX_ELEMENTS_WITHOUT_BASE) -> TensorEntry:
        """``name``'s entry, refused when its declared shape holds more than ``max_elements``
        (SPEC §8.7) — checked before anything of that size is allocated."""
        entry = self.manifest.tensors[name]
        numel = math.prod(entry.shape)
        if max_elements is not None and numel > max_elements:
            raise CorruptDeltaError(
                f"{name!r} declares more elements than a reader decodes without a base",
                expected=f"at most {max_elements} elements, or a base to check the shape against",
                found=f"shape {list(entry.shape)} ({numel} elements)",
                fix="give the base (base_model= / --base) so the shape can be checked first",
            )
        return entry

    def stored_bytes(self) -> int:
        return sum(e.stats.get("stored_bytes", 0) for e in self.manifest.tensors.values())

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> DeltaReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
