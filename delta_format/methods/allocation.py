"""Rate-distortion allocation of a bit budget across tensors: what the ``budget`` method chooses.

Every tensor gets a *menu* of ways to store it, each with its size in bits and its error:

* ``drop``: nothing stored (the base's value), error ``||Δ||²``;
* ``float16``: the delta as 16-bit floats (vectors, small tensors), error its rounding;
* ``dense-q`` at 2, 3, 4 bits, ``sign`` with float16 row scales, and ``sparse-q`` (DARE's seeded
  mask, 2-bit values) at a few drop rates, each error measured by encoding;
* ``lowrank-q``: the truncated SVD with a bit width chosen *per singular vector* among
  `VECTOR_BITS` (0 = not kept). A vector's error at ``b`` bits, ``||â b̂ᵀ - a bᵀ||²``, is measured
  by quantising it; the matrix's error is the sum over vectors (the truncated ones count
  ``σ_i²``, exactly, by orthogonality; the rounding errors of different vectors are treated as
  uncorrelated). Vectors then sort into bands by bit width: Delta-CoMe's schedule, chosen by the
  data instead of fixed.

The error of every option is multiplied by the tensor's ``weight`` (`priors.error_weight`: less
for a vocabulary-sized lookup table, more for a bias, 1 for the rest; where the output
sensitivity is measured the budget replaces it by the parameter's sensitivity relative to the
typical matrix's, to the power `priors.SENSITIVITY_POWER`).
DARE's error has two parts, priced apart (`dare_options`): the rounding of the kept values,
amplified by the rescale, counts in full; the sampling noise (zero-mean: every dropped entry is
paid back, on average, by the rescaled kept ones) counts at ``noise_weight``, because networks
tolerate random noise far better than the same squared error as a coherent loss of the delta, as
long as the noise is small beside the weights themselves (`priors.noise_price`).

`allocate` minimises the summed error under the total size by Lagrangian relaxation: for a
price ``λ`` per bit, each tensor (and inside low rank, each vector) independently picks the option
minimising ``error + λ·bits``; ``λ`` is bisected until the total fits. Every stored tensor's
header entry (`header_bits`: its name's length plus an upper bound on the rest) and each file's
fixed header (`FILE_BITS`) count, so the budget is met on disk, not only in payload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.encodings import SparseEncoding
from ..core.quant import default_clip as clip_for
from ..core.quant import dequantize, group_count, half_range, packed_bytes, quantize, scale_dtype
from .sign import DEFAULT_SCALE_BITS, SCALE_GROUP
from .svd import MAX_RANK, truncated_svd

HEADER_BITS = 8 * 96
"""One stored tensor's share of the safetensors header when its name is unknown."""
FILE_BITS = 8 * 64
"""A tensor file's fixed header: its length (8 bytes), ``{"__metadata__":{"format":"pt"}}`` and
the padding to 8 bytes."""


def header_bits(name: str) -> int:
    """An upper bound on the header entry of one stored tensor of ``name``:
    ``"NAME:SUFFIX":{"dtype":"F16","shape":[…],"data_offsets":[…,…]},``, which is the name plus
    at most ~76 bytes for files below 100 GB (measured: 62-76)."""
    return 8 * (len(name.encode()) + 80)


FP16_NORMAL = (2.0**-14, 65504.0)
"""float16's normal range: scales outside it are stored in float32."""
VECTOR_BITS = (1, 2, 3, 4, 8)
DENSE_BITS = (2, 3, 4)
DARE_RATES = (0.9, 0.95, 0.98, 0.99)
DARE_BITS = (2, 4, 8)
GROUP = 64


@dataclass
class Option:
    """One way to store one tensor: ``spec`` says how (`delta_format.methods.budget` builds it)."""

    label: str
    bits: int
    error: float
    spec: tuple


@dataclass
class Menu:
    """Every option of one tensor; ``vectors`` (low rank only) holds per-vector ``(cost, error)``
    tables ``[r, len(VECTOR_BITS) + 1]``, column 0 meaning "not kept"."""

    name: str
    numel: int
    options: list[Option] = field(default_factory=list)
    vector_cost: torch.Tensor | None = None
    vector_error: torch.Tensor | None = None
    vector_tail: float = 0.0
    """Error of the singular directions past the tables (never kept): ``||Δ||² - Σ σ_i²``."""
    header: int = HEADER_BITS
    """One stored tensor's header entry (`header_bits` of the name)."""
    vector_wide: torch.Tensor | None = None
    """``[r, len(VECTOR_BITS) + 1]`` bool: that vector at that width may have a scale outside
    float16's normal range, which makes the encoder store every scale of the tensor in float32."""
    vector_scales: int = 0
    """Scales per kept vector (16 more bits each when they are float32)."""

    def scale(self, factor: float) -> None:
        """Multiply every error by ``factor`` (a weight known only after every menu is built)."""
        for option in self.options:
            option.error *= factor
        if self.vector_error is not None:
            self.vector_error = self.vector_error * factor
        self.vector_tail *= factor

    def best(self, price: float) -> Option:
        """The option minimising ``error + price * bits``."""
        best = min(self.options, key=lambda o: o.error + price * o.bits)
        if self.vector_cost is None:
            return best
        total = self.vector_error + price * self.vector_cost
        pick = total.argmin(1)
        kept = pick > 0
        if not bool(kept.any()):
            return best
        bits = int(self.vector_cost.gather(1, pick[:, None]).sum(dtype=torch.float64)) + 2 * self.header
        if self.vector_wide is not None and bool(self.vector_wide.gather(1, pick[:, None]).any()):
            bits += 16 * self.vector_scales * int(kept.sum())  # float32 scales, all of them
        error = float(self.vector_error.gather(1, pick[:, None]).sum()) + self.vector_tail
        if error + price * bits >= best.error + price * best.bits:
            return best
        widths = torch.tensor((0, *VECTOR_BITS))[pick]
        ranked = torch.argsort(-widths, stable=True)  # widest first, then by singular value
        ranked = ranked[widths[ranked] > 0]
        order = ranked.tolist()
        values, counts = torch.unique_consecutive(widths[ranked], return_counts=True)
        bands = [[c, b] for c, b in zip(counts.tolist(), values.tolist())]
        label = f"lowrank-q r={len(order)} " + "+".join(f"{c}x{b}b" for c, b in bands)
        return Option(label, bits, error, ("lowrank-q", tuple(order), tuple(map(tuple, bands))))


def menu_rank(delta: torch.Tensor) -> int:
    """How many singular vectors a matrix's menu offers; `truncated_svd` at this rank is what
    `vector_tables` measured, so an edit recomputes exactly the planned vectors."""
    return min(delta.shape[0], delta.numel() // delta.shape[0], MAX_RANK)


def vector_tables(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Per singular vector, cost (bits) and error of storing it at each of `VECTOR_BITS` (column 0:
    not stored, error ``σ²``), and the SVD they were measured on."""
    cost, error, _, svd = _vector_tables(delta)
    return cost, error, svd


def _vector_tables(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """`vector_tables` and `Menu.vector_wide`."""
    rows, cols = delta.shape[0], delta.numel() // delta.shape[0]
    rank = menu_rank(delta)
    u, s, vh = truncated_svd(delta, rank)
    a, b = (u * s).T.contiguous(), vh  # [r, rows], [r, cols]: vector i is a[i] b[i]ᵀ
    cost = torch.zeros(rank, len(VECTOR_BITS) + 1)
    wide = torch.zeros(rank, len(VECTOR_BITS) + 1, dtype=torch.bool)
    error = torch.zeros(rank, len(VECTOR_BITS) + 1, dtype=torch.float64)
    sigma2 = s.double().square()
    error[:, 0] = sigma2
    scales = 16 * (group_count(rows, GROUP) + group_count(cols, GROUP))
    for j, bits in enumerate(VECTOR_BITS, start=1):
        qa2, qaa, wide_a = _quantized_terms(a, bits)
        qb2, qbb, wide_b = _quantized_terms(b, bits)
        error[:, j] = (qa2 * qb2 - 2 * qaa * qbb + sigma2).clamp(min=0)
        cost[:, j] = bits * (rows + cols) + scales
        wide[:, j] = wide_a | wide_b
    return cost, error, wide, (u, s, vh)


def _wide_scales(scales: torch.Tensor) -> torch.Tensor:
    """Per row of float32 ``scales``, whether one is outside float16's normal range (nonzero), which
    makes `delta_format.core.quant.scale_dtype` store float32."""
    return (((scales < FP16_NORMAL[0]) & (scales > 0)) | (scales > FP16_NORMAL[1])).any(1)


SAMPLE_VECTOR_GROUPS = 64
"""Groups of a singular vector over which its rounding is measured when it is longer than twice
that (the vectors of a vocabulary-sized side: 768 groups of a 49152-long one)."""


def _quantized_terms(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``x``, ``||q(x)||²`` and ``q(x)·x`` (float64) with ``q`` the ``bits``-bit
    quantisation in groups of `GROUP`, and whether its scales need float32 (`_wide_scales`). Long
    rows are measured on every ``step``-th group: the rounding error ``e = q(x) - x`` enters as
    ``||e||²`` and ``e·x``, each scaled from the sample by the row's energy over the sample's, then
    ``||q(x)||² = ||x||² + 2 e·x + ||e||²``; their scales' range is bounded from every group's
    absmax (exact for absmax scales, 16x margins for the MSE-clipped and 1-bit ones)."""
    energy = x.square().sum(1, dtype=torch.float64)
    groups = x.shape[1] // GROUP
    sample, ratio = x, torch.ones_like(energy)
    if groups > 2 * SAMPLE_VECTOR_GROUPS:
        sample = x[:, : groups * GROUP].reshape(x.shape[0], groups, GROUP)[:, :: groups // SAMPLE_VECTOR_GROUPS]
        sample = sample.reshape(x.shape[0], -1)
        ratio = energy / sample.square().sum(1, dtype=torch.float64).clamp(min=1e-300)
    codes, scales = quantize(sample, bits, GROUP, clip_for(bits), torch.float32)
    rounding = dequantize(codes, scales, bits, GROUP) - sample
    wide = _wide_scales(scales)
    if sample is not x:
        amax = torch.nn.functional.pad(x, (0, -x.shape[1] % GROUP)).view(x.shape[0], -1, GROUP).abs().amax(2)
        amax = amax / half_range(bits)
        if bits == 1 or clip_for(bits) != "absmax":
            wide |= _wide_scales(amax / 16) | _wide_scales(amax * 4)
        else:
            wide |= _wide_scales(amax)
    e2 = rounding.square().sum(1, dtype=torch.float64) * ratio
    ex = (rounding * sample).sum(1, dtype=torch.float64) * ratio
    return energy + 2 * ex + e2, energy + ex, wide


SAMPLE_GROUPS = 1 << 15
"""Groups over which ``dense-q``'s error is measured on a large tensor (2M values; a stride through
all of them, the measured relative error scaled to the tensor's energy)."""


def sampled_groups(flat: torch.Tensor, cols: int) -> tuple[torch.Tensor, float]:
    """Every ``step``-th quantisation group of ``flat`` (all of them up to 2 ``SAMPLE_GROUPS``) and
    the tensor's energy over theirs: each group is quantised on its own, so the sample's relative
    error, times the tensor's energy, estimates the error (rows of different magnitudes cancel).
    The step is prime to the groups of a row, so every column position is sampled."""
    groups = flat.numel() // GROUP
    if groups <= 2 * SAMPLE_GROUPS:
        return flat, 1.0
    step, per_row = groups // SAMPLE_GROUPS, max(cols // GROUP, 1)
    while math.gcd(step, per_row) != 1:
        step += 1
    sample = flat[: groups * GROUP].view(groups, GROUP)[::step].reshape(-1)
    energy = float(flat.square().sum(dtype=torch.float64))
    sample_energy = float(sample.square().sum(dtype=torch.float64))
    return sample, energy / sample_energy if sample_energy > 0 else 1.0


def dense_q_options(delta: torch.Tensor, header: int = HEADER_BITS) -> list[Option]:
    """``dense-q`` at each of `DENSE_BITS`: codes in groups of `GROUP`, the error measured on
    `sampled_groups`. The size is exact or an upper bound: the scales' dtype (float16 or float32,
    `delta_format.core.quant.scale_dtype`) is that of the whole tensor's absmax scales, and
    float32 for the MSE-clipped ones when the sample's need it or the whole tensor's could (a
    clipped scale within 64x of float16's limits)."""
    flat = delta.reshape(-1).float()
    sample, factor = sampled_groups(flat, delta.numel() // max(delta.shape[0], 1))
    amax = group_absmax(flat) if sample is not flat else None  # the whole tensor's scales, one cheap pass
    options = []
    for bits in DENSE_BITS:
        error, dtype = quantized_error(sample, bits, amax)
        size = 8 * packed_bytes(flat.numel(), bits) + group_count(flat.numel(), GROUP) * 8 * dtype.itemsize
        options.append(Option(f"dense-q {bits}b", size + 2 * header, error * factor, ("dense-q", bits)))
    return options


def group_absmax(flat: torch.Tensor) -> torch.Tensor:
    """Every group of `GROUP` consecutive values' largest magnitude (the last group zero-padded)."""
    return torch.nn.functional.pad(flat, (0, -flat.numel() % GROUP)).view(-1, GROUP).abs().amax(1)


def quantized_error(sample: torch.Tensor, bits: int, amax: torch.Tensor | None) -> tuple[float, torch.dtype]:
    """The squared rounding error of ``sample`` (1-D) at ``bits`` in groups of `GROUP`, and the
    scales' dtype of the whole sequence it was drawn from: the sample's, or, given every group's
    absmax ``amax`` of the whole, that of its absmax scales (float32 for the MSE-clipped ones when
    the sample's need it or the whole's could: a clipped scale within 64x of float16's limits)."""
    codes, scales = quantize(sample, bits, GROUP, clip_for(bits))
    error = float((dequantize(codes, scales, bits, GROUP) - sample).square().sum(dtype=torch.float64))
    dtype = scales.dtype
    if amax is not None:
        full = amax / half_range(bits)
        if clip_for(bits) == "absmax":
            dtype = scale_dtype(full)
        elif torch.float32 in (dtype, scale_dtype(full), scale_dtype(full / 64)):
            dtype = torch.float32
    return error, dtype


def rounding_error(error: torch.Tensor, value: torch.Tensor, noise_weight: float) -> float:
    """A rounding ``error`` of ``value``, priced: its part along ``value`` (a shrinkage or growth of
    the delta, coherent) in full, the rest (independent per element, like DARE's sampling noise)
    at ``noise_weight``."""
    error, value = error.reshape(-1).double(), value.reshape(-1).double()
    total = float(error.square().sum())
    along = float(error @ value) ** 2 / max(float(value.square().sum()), 1e-300)
    return along + (total - along) * noise_weight


def sign_option(delta: torch.Tensor, header: int = HEADER_BITS) -> Option:
    """Sign bits, row scales mean |Δ_r| coded as the ``sign`` method codes them (SPEC 1.7); the
    error in one pass: ``Σx² - 2 ŝ Σ|x| + cols·ŝ²`` per row, ``ŝ`` the decoded scale."""
    matrix = delta.reshape(delta.shape[0], -1).float()
    absolute = matrix.abs().sum(1, dtype=torch.float64)
    codes, scales = quantize((absolute / matrix.shape[1]).float(), DEFAULT_SCALE_BITS, SCALE_GROUP, "absmax")
    scale = dequantize(codes, scales, DEFAULT_SCALE_BITS, SCALE_GROUP).reshape(-1).double()
    squares = matrix.square().sum(1, dtype=torch.float64)
    error = float((squares - 2 * scale * absolute + matrix.shape[1] * scale.square()).clamp(min=0).sum())
    size = 8 * (packed_bytes(matrix.numel(), 1) + packed_bytes(matrix.shape[0], DEFAULT_SCALE_BITS) + scales.nbytes)
    return Option("sign row", size + 3 * header, error, ("sign",))


def dare_options(
    name: str,
    delta: torch.Tensor,
    seed: int,
    noise_weight: float,
    positions: dict[float, torch.Tensor] | None = None,
    columns: torch.Tensor | None = None,
    split_rounding: bool = False,
) -> list[Option]:
    """DARE at each of `DARE_RATES` with kept values at each of `DARE_BITS`: the sampling noise
    ``||M⊙Δ/(1-p) - Δ||²`` priced at ``noise_weight``, the kept values' rounding
    ``||M⊙(q(Δ) - Δ)||² / (1-p)²`` in full (clipped low-bit codes shrink exactly the entries that
    carry the delta: a coherent error), or with ``split_rounding`` only its part along the kept
    values in full and the rest at ``noise_weight`` (`rounding_error`). ``columns`` weighs each
    element's noise by its column's weight (`priors.column_weights`). ``positions`` caches the
    seeded masks by rate (one tensor's masks serve every delta of that tensor: its own and the
    residuals of `delta_format.methods.hybrid`)."""
    rounding_price = noise_weight if split_rounding else 1.0
    flat = delta.reshape(-1).float()
    squares = flat.double().square()
    if columns is not None:  # each element's squared error weighs its column's weight
        squares = squares.view(-1, columns.numel()).mul_(columns.double()).view(-1)
    energy = float(squares.sum())
    options = []
    positions = {} if positions is None else positions
    for p in DARE_RATES:
        if p not in positions:
            positions[p] = SparseEncoding("seeded", seed=seed, p=p).positions(flat.numel(), name)
        kept = flat[positions[p]]
        kept_energy = float(squares[positions[p]].sum())
        # ||M⊙Δ/(1-p) - Δ||² = Σ_kept (Δ p/(1-p))² + Σ_dropped Δ²
        noise = kept_energy * (p / (1 - p)) ** 2 + (energy - kept_energy)
        for bits in DARE_BITS:
            codes, scales = quantize(kept, bits, GROUP, clip_for(bits))
            rounding = rounding_error(dequantize(codes, scales, bits, GROUP).view(-1) - kept, kept, rounding_price)
            error = noise * noise_weight + rounding / (1 - p) ** 2
            size = 8 * packed_bytes(kept.numel(), bits) + scales.numel() * 8 * scales.element_size()
            options.append(Option(f"dare p={p:g} {bits}b", size + 2 * header_bits(name), error, ("sparse-q", p, bits)))
    return options


def float16_option(delta: torch.Tensor, header: int = HEADER_BITS) -> Option:
    """The delta in 16-bit floats: float16 where every value fits, else bfloat16."""
    dtype = torch.float16 if float(delta.abs().max()) <= 65504 else torch.bfloat16
    error = float((delta.to(dtype).double() - delta.double()).square().sum())
    return Option(f"dense {str(dtype)[6:]}", 16 * delta.numel() + header, error, ("dense", dtype))


def menu_for(
    name: str,
    delta: torch.Tensor,
    *,
    weight: float = 1.0,
    seed: int = 0,
    noise_weight: float | None = None,
    masks: dict[float, torch.Tensor] | None = None,
    columns: torch.Tensor | None = None,
    split_rounding: bool = False,
) -> tuple[Menu, Any]:
    """The menu of one tensor (errors times ``weight``) and what its low-rank option needs later
    (the SVD), or None. DARE options are offered only with a ``noise_weight`` (`priors.noise_price`);
    their seeded masks are left in ``masks``, and ``columns``/``split_rounding`` go to `dare_options`."""
    energy = float(delta.double().square().sum())
    header = header_bits(name)
    menu = Menu(name, delta.numel(), [Option("drop", 0, energy * weight, ("drop",))], header=header)
    if delta.dim() < 2 or min(delta.shape[0], delta.numel() // max(delta.shape[0], 1)) < 2:
        menu.options.append(weighted(float16_option(delta, header), weight))
        return menu, None
    for option in dense_q_options(delta, header):
        menu.options.append(weighted(option, weight))
    menu.options.append(weighted(sign_option(delta, header), weight))
    if noise_weight is not None:
        for option in dare_options(name, delta, seed, noise_weight, masks, columns, split_rounding):
            menu.options.append(weighted(option, weight))
    cost, error, wide, svd = _vector_tables(delta)
    menu.vector_cost, menu.vector_error, menu.vector_wide = cost, error * weight, wide
    menu.vector_scales = group_count(delta.shape[0], GROUP) + group_count(delta.numel() // delta.shape[0], GROUP)
    menu.vector_tail = max(energy - float(error[:, 0].sum()), 0.0) * weight
    return menu, svd


def weighted(option: Option, weight: float) -> Option:
    option.error *= weight
    return option


def allocate(menus: list[Menu], budget_bits: float) -> tuple[dict[str, Option], float]:
    """Each tensor's option minimising the total error with the total bits at most
    ``budget_bits`` (Lagrangian: bisection of the price per bit on a log scale). Returns the
    choices by name and the price."""

    def choose(price: float) -> dict[str, Option]:
        return {m.name: m.best(price) for m in menus}

    def total(choice: dict[str, Option]) -> int:
        return sum(o.bits for o in choice.values())

    low, high = 1e-30, 1e30  # a low price buys many bits
    if total(choose(low)) <= budget_bits:
        return choose(low), low
    for _ in range(100):
        mid = math.sqrt(low * high)
        if total(choose(mid)) > budget_bits:
            low = mid
        else:
            high = mid
        if high / low < 1 + 1e-6:
            break
    return choose(high), high
