"""``bitdiff`` (SPEC §5.6): bit-exact for every dtype and bit pattern, against bases of the same or
another dtype; every check a reader must make refuses its corruption; the ``dense`` method stores
it where it is smaller and is never larger than the fine-tune; deltas of it load bit for bit
through ``apply_delta``, ``DeltaModel.from_pretrained``, ``swap_delta`` and ``verify_delta``."""

from __future__ import annotations

import struct
import sys
import warnings

import pytest
import torch
import zstandard

import delta_format
from delta_format import DeltaModel
from delta_format.core.encodings import BitdiffEncoding, encoding_from_dict
from delta_format.core.manifest import TensorEntry
from delta_format.core.reconstruct import reconstruct_stored
from delta_format.errors import (
    BaseMismatchError,
    CorruptDeltaError,
    InvalidArgumentError,
    ManifestError,
    MissingDependencyError,
    UnknownEncodingError,
)
from delta_format.loaders.apply import apply_delta, verify_delta
from delta_format.methods import TensorContext, get_method
from delta_format.methods import dense as dense_method
from delta_format.methods.dense import same_bits
from tests.models import save, state_dict_on_disk, structured_perturbation, tiny_llama

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def any_bits(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``n`` uniformly random bit patterns: NaNs with payloads, infinities, -0.0, subnormals."""
    g = torch.Generator().manual_seed(seed)
    size = torch.finfo(dtype).bits // 8
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g).view(dtype)


def round_trip(value: torch.Tensor, base: torch.Tensor, chunk: int = 1 << 17) -> torch.Tensor:
    enc = BitdiffEncoding(chunk)
    stored = enc.encode(value, base=base)
    return enc.decode(stored, tuple(value.shape), "w", value.dtype, base=base.to(value.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 7, 1 << 17])
def test_any_bit_patterns_round_trip_bit_for_bit(dtype, chunk):
    value, base = any_bits(1000, dtype, 1), any_bits(1000, dtype, 2)
    assert same_bits(round_trip(value, base, chunk), value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_and_one_ulp_steps_round_trip(dtype):
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -1.0], dtype=dtype)
    nan_payload = special.clone()
    nan_payload.view(INT[special.element_size()])[4] += 1  # another NaN bit pattern
    near = special.clone()
    near.view(INT[special.element_size()]).add_(1)  # +1 in every pattern (wrapping at the top)
    for value, base in ((special.flip(0), special), (nan_payload, special), (near, special)):
        assert same_bits(round_trip(value, base, 3), value)


def test_an_empty_parameter_stores_no_frames():
    enc = BitdiffEncoding()
    stored = enc.encode(torch.zeros(0, 4, dtype=torch.bfloat16), base=torch.zeros(0, 4, dtype=torch.bfloat16))
    assert stored["planes"].shape == (0,) and stored["frames"].shape == (0, 2)
    out = enc.decode(stored, (0, 4), "w", torch.bfloat16, base=torch.zeros(0, 4, dtype=torch.bfloat16))
    assert out.shape == (0, 4)


@pytest.mark.parametrize(
    "value_dtype, base_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)], ids=str
)
def test_a_base_of_another_dtype_is_rounded_first_and_the_value_is_exact(value_dtype, base_dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 50, generator=g).to(base_dtype)
    value = (base.float() + 1e-3 * torch.randn(64, 50, generator=g)).to(value_dtype)
    enc = BitdiffEncoding(1000)
    entry = TensorEntry(enc, (64, 50), str(value_dtype).removeprefix("torch."))
    got = reconstruct_stored("w", [(entry, enc.encode(value, base=base), 1.0)], base, dtype=value_dtype)
    assert same_bits(got, value)


def test_writer_refuses_a_nan_base_of_another_dtype_and_another_shape():
    enc = BitdiffEncoding()
    with pytest.raises(InvalidArgumentError, match="NaN"):
        enc.encode(torch.zeros(3, dtype=torch.bfloat16), base=torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(InvalidArgumentError):
        enc.encode(torch.zeros(3), base=torch.zeros(4))


def test_alpha_other_than_one_follows_replaces_rule():
    base = torch.tensor([1.0, 2.0, -4.0])
    value = torch.tensor([1.5, 2.0, -3.0])
    enc = BitdiffEncoding()
    entry = TensorEntry(enc, (3,), "float32", alpha=1.0)
    got = reconstruct_stored("w", [(entry, enc.encode(value, base=base), 0.5)], base, dtype=torch.float32)
    assert got.tolist() == [1.25, 2.0, -3.5]  # base + 0.5 (value - base)


def test_decoding_needs_the_base_of_the_parameters_shape():
    enc = BitdiffEncoding()
    stored = enc.encode(torch.ones(4), base=torch.zeros(4))
    entry = TensorEntry(enc, (4,), "float32")
    with pytest.raises(BaseMismatchError):
        reconstruct_stored("w", [(entry, stored, 1.0)], None, dtype=torch.float32)
    with pytest.raises(BaseMismatchError):
        reconstruct_stored("w", [(entry, stored, 1.0)], torch.zeros(5), dtype=torch.float32)
    with pytest.raises(BaseMismatchError):
        enc.decode(stored, (4,), "w", torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_decodes_on_the_bases_device_with_the_same_bits():
    value, base = any_bits(300_000, torch.bfloat16, 4), any_bits(300_000, torch.bfloat16, 5)
    enc = BitdiffEncoding()
    stored = enc.encode(value, base=base)
    got = enc.decode({k: t.cuda() for k, t in stored.items()}, (300_000,), "w", torch.bfloat16, base=base.cuda())
    assert got.device.type == "cuda" and same_bits(got.cpu(), value)


# -- config ---------------------------------------------------------------------------------------


def test_config_round_trips_and_is_closed():
    enc = encoding_from_dict("bitdiff", {"codec": "zstd", "chunk_elements": 4096})
    assert enc.to_dict() == {"codec": "zstd", "chunk_elements": 4096} and enc.label() == "bitdiff(zstd)"
    with pytest.raises(UnknownEncodingError):
        encoding_from_dict("bitdiff", {"codec": "lz4", "chunk_elements": 4096})
    for bad in (
        {"codec": "zstd"},
        {"codec": "zstd", "chunk_elements": 0},
        {"codec": "zstd", "chunk_elements": 2**22 + 1},
    ):
        with pytest.raises(ManifestError):
            encoding_from_dict("bitdiff", bad)
    with pytest.raises(ManifestError):
        encoding_from_dict("bitdiff", {"codec": "zstd", "chunk_elements": 8, "level": 3})


# -- what a reader refuses (SPEC §5.6) ------------------------------------------------------------

L = 4  # elements per chunk in these cases: 10 bf16 elements = chunks of 4, 4, 2, two planes each


def frame(payload: bytes, descriptor: bytes = bytes([0x20, L])) -> bytes:
    """A hand-made zstd frame: magic, header descriptor (single segment, 1-byte content size by
    default), then one raw last block holding ``payload``."""
    return b"\x28\xb5\x2f\xfd" + descriptor + bytes([(len(payload) << 3) | 1, 0, 0]) + payload


def valid() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    base = torch.linspace(-2, 2, 10).to(torch.bfloat16)
    value = (base.float() * 1.01).to(torch.bfloat16)
    return BitdiffEncoding(L).encode(value, base=base), base, value


def with_first_frame(replacement: bytes) -> dict[str, torch.Tensor]:
    stored, _, _ = valid()
    planes, frames = bytes(stored["planes"].tolist()), stored["frames"].clone()
    planes = replacement + planes[int(frames[0, 0]) :]
    frames[0, 0] = len(replacement)
    return {"planes": torch.tensor(list(planes), dtype=torch.uint8), "frames": frames}


def streamed(raw: bytes) -> bytes:
    """A frame without a content size in its header, as a streaming compressor writes it."""
    compressor = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    return compressor.compress(raw) + compressor.flush()


def corrupted(case: str) -> dict[str, torch.Tensor]:
    stored, _, _ = valid()
    planes, frames = stored["planes"], stored["frames"].clone()
    if case == "trailing byte after the last frame":
        return {"planes": torch.cat([planes, torch.zeros(1, dtype=torch.uint8)]), "frames": frames}
    if case == "frame boundary moved by one byte":
        frames[0, 0] += 1
        frames[0, 1] -= 1
        return {"planes": planes, "frames": frames}
    if case == "frames table of the wrong shape":
        return {"planes": planes, "frames": frames[:-1]}
    if case == "a zero frame size":
        frames[0, 1] += frames[0, 0]
        frames[0, 0] = 0
        return {"planes": planes, "frames": frames}
    if case == "a negative frame size":
        frames[0, 1] += frames[0, 0] + 1
        frames[0, 0] = -1
        return {"planes": planes, "frames": frames}
    if case == "frames as I32":
        return {"planes": planes, "frames": frames.to(torch.int32)}
    first = int(frames[0, 0])
    raw = zstandard.ZstdDecompressor().decompress(bytes(planes[:first].tolist()))
    replacements = {
        "content size one too large": lambda: zstandard.ZstdCompressor().compress(raw + b"\0"),
        "no content size": lambda: streamed(raw),
        "a 1 MiB bomb": lambda: zstandard.ZstdCompressor(level=19).compress(bytes(1 << 20)),
        "a dictionary id": lambda: frame(raw, bytes([0x21, 7, L])),
        "a 16 MiB window": lambda: frame(raw, bytes([0x80, 0x70]) + struct.pack("<I", L)),
        "a skippable frame": lambda: b"\x50\x2a\x4d\x18" + struct.pack("<I", L) + raw,
        "a truncated frame": lambda: frame(raw)[:-1],
        "two frames in one slice": lambda: frame(raw) + frame(raw),
        "a corrupt block": lambda: frame(raw)[:-5] + bytes([(L << 3) | 0b111, 0, 0]) + raw,
    }
    return with_first_frame(replacements[case]())


CORRUPTIONS = [
    "trailing byte after the last frame",
    "frame boundary moved by one byte",
    "frames table of the wrong shape",
    "a zero frame size",
    "a negative frame size",
    "frames as I32",
    "content size one too large",
    "no content size",
    "a 1 MiB bomb",
    "a dictionary id",
    "a 16 MiB window",
    "a skippable frame",
    "a truncated frame",
    "two frames in one slice",
    "a corrupt block",
]


def test_the_hand_made_frames_are_valid_when_not_corrupted():
    stored, base, value = valid()
    raw = zstandard.ZstdDecompressor().decompress(bytes(stored["planes"][: int(stored["frames"][0, 0])].tolist()))
    good = with_first_frame(frame(raw))
    assert same_bits(BitdiffEncoding(L).decode(good, (10,), "w", torch.bfloat16, base=base), value)


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_reader_refuses(case):
    _, base, _ = valid()
    with pytest.raises(CorruptDeltaError):
        BitdiffEncoding(L).decode(corrupted(case), (10,), "w", torch.bfloat16, base=base)


def test_reader_refuses_frames_of_another_element_size():
    stored, base, _ = valid()
    with pytest.raises(CorruptDeltaError):
        BitdiffEncoding(L).decode(stored, (10,), "w", torch.float32, base=base.float())


# -- without zstandard ----------------------------------------------------------------------------


@pytest.fixture
def no_zstandard(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    monkeypatch.setattr(dense_method, "_warned_without_zstd", False)


def test_a_bitdiff_manifest_without_zstandard_says_what_to_install(no_zstandard):
    with pytest.raises(MissingDependencyError, match=r"delta-format\[zstd\]"):
        encoding_from_dict("bitdiff", {"codec": "zstd", "chunk_elements": 4096})


def test_dense_without_zstandard_warns_once_and_stays_no_larger_than_the_finetune(no_zstandard):
    base = torch.randn(64, 64).to(torch.bfloat16)
    ft = (base.float() + 1e-3 * torch.randn(64, 64)).to(torch.bfloat16)
    method = get_method("dense")
    with pytest.warns(UserWarning, match="zstandard"):
        edit = method.edit("w", ft.float() - base.float(), TensorContext("w", base=base, finetune=ft))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.edit("w", ft.float() - base.float(), TensorContext("w", base=base, finetune=ft))
    assert edit.encoding.name == "replace" and edit.lossless and "zstandard" in edit.stats["reason"]


# -- the dense method -----------------------------------------------------------------------------


def test_dense_stores_bitdiff_where_smaller_and_the_value_where_nothing_is():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, 256, generator=g).to(torch.bfloat16)
    ft = (base.float() + 1e-3 * torch.randn(256, 256, generator=g)).to(torch.bfloat16)
    edit = get_method("dense").edit("w", ft.float() - base.float(), TensorContext("w", base=base, finetune=ft))
    stored = sum(t.numel() * t.element_size() for t in edit.stored.values())
    assert edit.encoding.name == "bitdiff" and edit.lossless and stored < 0.5 * ft.numel() * 2
    unrelated = any_bits(4096, torch.bfloat16, 7).nan_to_num()  # no better than its own bytes
    edit = get_method("dense").edit(
        "w",
        unrelated.float() - base.view(-1)[:4096].float(),
        TensorContext("w", base=base.view(-1)[:4096], finetune=unrelated),
    )
    assert edit.encoding.name == "replace" and edit.stored["value"].numel() * 2 == unrelated.numel() * 2


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bitdiff")
    base = tiny_llama(dtype=torch.bfloat16)
    save(base, root / "base"), save(structured_perturbation(base, rel=1e-2, seed=5), root / "ft")
    delta = delta_format.compress(root / "base", root / "ft", root / "delta", method="dense", progress=False)
    return root, delta


def test_a_bf16_dense_delta_is_bitdiff_and_a_fraction_of_the_finetune(bf16_pair):
    _, delta = bf16_pair
    encodings = {entry.encoding.name for entry in delta.manifest.tensors.values()}
    assert "bitdiff" in encodings and "dense" not in encodings
    stats = delta.manifest.stats
    assert stats["stored_bytes"] < 0.6 * stats["finetune_bytes"]


def test_bitdiff_delta_loads_bit_identical_to_the_finetune(bf16_pair):
    root, delta = bf16_pair
    expected = state_dict_on_disk(root / "ft")
    model = DeltaModel.from_pretrained(delta.directory, base_model=root / "base")
    state = model.state_dict()
    assert all(same_bits(state[name], expected[name]) for name in expected)
    model.swap_delta(delta.directory)
    state = model.state_dict()
    assert all(same_bits(state[name], expected[name]) for name in expected)


def test_bitdiff_delta_applies_and_verifies(bf16_pair, tmp_path):
    root, delta = bf16_pair
    apply_delta(delta.directory, tmp_path / "full", base_model=root / "base")
    expected, got = state_dict_on_disk(root / "ft"), state_dict_on_disk(tmp_path / "full")
    assert all(same_bits(got[name], expected[name]) for name in expected)
    report = verify_delta(delta.directory, base_model=root / "base")
    assert report.ok, report
