"""The optional C extension is built wherever a C compiler is present.

It is optional so that an install without a compiler still works (the torch path gives the same
bits), which also means a build that fails, for a broken source file say, would only print a
warning during ``pip install`` and leave every native test skipped. This test turns that into a
failure wherever the extension should have been built."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

from delta_format.core import native

USED = (
    "reconstruct_bf16",
    "cast_window_bf16",
    "seeded_positions",
    "seeded_checkpoints",
    "all_finite",
    "sign_product",
    "sparse_product",
)


def test_the_extension_is_built_where_a_compiler_is():
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler!r}) here: the extension is optional and the torch path runs")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        pytest.skip(f"no Python headers ({headers}) here: the extension is optional and the torch path runs")
    assert native._native is not None, (
        "delta_format.core._native was not built although a C compiler is present; "
        "`pip install -e .` prints the compiler's error"
    )
    missing = [name for name in USED if not hasattr(native._native, name)]
    assert not missing, f"the built extension lacks {missing}: it is stale; reinstall the package (pip install -e .)"
