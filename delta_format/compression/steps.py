"""The compressor's per-tensor step: read one (base, fine-tune) pair, edit it or store it whole,
measure what was stored, and hand it to the writer.

`TensorCompressor` is driven by `delta_format.compression.pipeline.compress` in the order of the
schedule (`delta_format.compression.plan.schedule`); it keeps only the tensors of the current step
alive, which is what lets the compressor stream a model larger than memory.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..core.constants import INDEX_GAPS, ROUNDING_NEAREST, ROUNDING_WINDOW
from ..core.dtypes import compute_dtype, torch_dtype_name
from ..core.encodings import ReplaceEncoding, SparseEncoding
from ..core.manifest import TensorEntry
from ..core.quant import sixteen_bit
from ..heap import FreedMemory
from ..io.writer import DeltaWriter
from ..methods import EditMethod, TensorContext
from ..methods.base import Edit
from ..methods.dense import same_bits
from .grown import grown_rows, new_rows_bits, padded, with_new_rows
from .measure import Totals, edit_error, measure_on_model, stored_nbytes
from .plan import Action, MethodPlan
from .sources import TensorSource

if TYPE_CHECKING:
    from ..methods.activations import CalibrationSession
    from .calibration import Calibration
    from .sensitivity import Sensitivities


WHOLE_WARNING = 0.01
"""A tensor stored whole under ``bits=`` is announced when it takes more than this share of the
budget (a resized table does; a new classifier head of a few thousand weights does not)."""


class TensorCompressor:
    """One compression's per-tensor step: read the pair, edit it or store it whole, measure, write.

    Holds what every step shares: the sources, the writer, the calibration session (None without
    texts) and the running `Totals`."""

    def __init__(
        self,
        plan: MethodPlan,
        base: TensorSource,
        finetune: TensorSource,
        writer: DeltaWriter,
        session: Calibration | None,
        *,
        alpha: float,
        seed: int,
        value_dtype: torch.dtype | None,
        rounding: str = "auto",
        sensitivities: Sensitivities | None = None,
        probe: CalibrationSession | None = None,
    ):
        self.plan, self.base, self.finetune, self.writer, self.session = plan, base, finetune, writer, session
        self.probe = probe  # without texts: a session on the built-in text, for methods that fit outputs data-free
        self.sensitivities = sensitivities
        self.alpha, self.seed, self.value_dtype, self.rounding = alpha, seed, value_dtype, rounding
        self.totals = Totals()
        self._base_rows: dict[str, int | None] = {}
        self.lookups, self.heads = finetune.lookup_names(), finetune.head_names()

    def prepare(self, edited: list[str]) -> dict[str, Any]:
        """Each method's whole-model choices on the calibration texts (`EditMethod.prepare`), by method name."""
        prepared = {}
        for m in self.plan.methods():
            if self.session is None and not m.plans_whole_model:
                continue
            names = [n for n in edited if self.plan.method_for(n) is m]
            session = self.session if self.session is not None else self.probe if m.fits_outputs_data_free else None
            found = m.prepare(self.stream(names), session)
            if found:
                prepared[m.name] = found
        self.probe = None  # its model is not needed past planning
        return prepared

    def run(self, actions: list[tuple[str, Action]], progress: bool) -> None:
        """Every tensor in schedule order, with a progress bar in bytes of the fine-tune."""
        from ..io.progress import progress_bar

        release = FreedMemory()
        sizes = [self.finetune_nbytes(name) for name, _ in actions]
        with progress_bar(total=sum(sizes), unit="B", unit_scale=True, desc="compressing", enabled=progress) as bar:
            for (name, action), nbytes in zip(actions, sizes):
                self.totals.finetune_bytes += nbytes
                self.step(name, action)
                release(nbytes)
                bar.update(nbytes)

    def step(self, name: str, action: Action) -> None:
        if action in (Action.EDIT, Action.GROW):
            self.edit(name, self.plan.method_for(name))
        elif action is Action.REPLACE:
            self.replace(name)
        elif action in (Action.TIED, Action.IGNORED):
            self.totals.counts[action.value] = self.totals.counts.get(action.value, 0) + 1
        else:
            self.totals.counts[action.value] += 1
            if action is Action.EXCLUDED and self.session is not None and name in self.base:
                self.session.set_parameter(name, self.base.get(name).float())

    def replace(self, name: str) -> None:
        """Store the fine-tuned value whole: the base has no tensor of this shape to add a delta to."""
        value = self.finetune.get(name)
        reason = "the base has another shape" if name in self.base else "the base has no such tensor"
        encoding = ReplaceEncoding()
        entry = TensorEntry(
            encoding,
            tuple(value.shape),
            torch_dtype_name(value.dtype),
            stats={"lossless": True, "rel_error": 0.0, "reason": reason},
        )
        stored = encoding.encode(value)
        budget = next((m for m in self.plan.methods() if m.name == "budget"), None)
        if budget is not None and 8 * stored_nbytes(stored) > WHOLE_WARNING * budget.bits * self.finetune_numel():
            warnings.warn(
                f"{name} is stored whole ({reason}: {stored_nbytes(stored) / 1e6:.1f} MB, "
                f"{value.element_size() * 8} bits per weight), outside the bits= budget, which covers "
                "the parameters whose delta can be edited: a tensor the base lacks, or holds in another "
                "shape than the fine-tune's (added rows aside), has no delta. Compare the delta's size with "
                "the budget (`delta-format inspect`).",
                UserWarning,
                stacklevel=2,
            )
        self.write(name, entry, stored, "replaced")

    def edit(self, name: str, method: EditMethod) -> None:
        """Hand ``Δ`` to ``method``, measure what it stored, and write it (nothing if ``Δ`` is all zero bits)."""
        pair = self.read_pair(name)
        if pair is None:
            self.totals.counts["unchanged"] += 1
            return
        delta, context = pair
        if context.finetune.dtype != context.base.dtype and not bool(delta.any()):
            # equal values in another dtype: a zero-byte entry records the dtype
            encoding = SparseEncoding(INDEX_GAPS)
            stored = encoding.encode(
                delta, name=name, positions=torch.empty(0, dtype=torch.int64), dtype=context.value_dtype
            )
            edit = Edit(encoding, stored, {"reason": "dtype change only"}, lossless=True)
        else:
            edit = method.edit(name, delta, context)
        base_rows = self.base_rows(name)
        if base_rows is not None:  # the method edited the old rows; the new rows are added to it
            delta[base_rows:] = context.finetune[base_rows:]
            edit = with_new_rows(edit, delta, base_rows, name)
            if edit is None:
                self.replace(name)
                return
        if edit.dropped:
            self.dropped(name, delta, context)
            return
        alpha = context.alpha if edit.encoding.is_delta else 1.0
        entry = TensorEntry(
            edit.encoding,
            tuple(delta.shape),
            torch_dtype_name(context.finetune.dtype),
            alpha,
            {"method": method.name, **edit.stats},
            rounding=self.entry_rounding(edit, context.finetune.dtype),
            base_rows=base_rows,
        )
        decoded = None
        if self.session is not None or not edit.lossless:  # measured on what was stored: decoded as a reader will
            decoded = edit.decode(tuple(delta.shape), name, delta.dtype)
        if self.session is not None:
            self.totals.loss_change += measure_on_model(name, entry, decoded, context, self.session) or 0.0
        error = edit_error(edit, decoded, delta)
        del decoded
        entry.stats["rel_error"] = error.relative
        self.write(name, entry, edit.stored, "edited")
        if edit.encoding.is_delta:
            self.totals.add_error(error)

    def entry_rounding(self, edit: Edit, dtype: torch.dtype) -> str:
        """SPEC §9.1's rounding for this entry: with ``"auto"``, ``"stochastic-window"`` (spec 1.6's
        cheaper dither) where a lossy delta meets a half-precision parameter (its corrections under
        the weights' spacing would round away), nearest elsewhere (a lossless entry's sum is exact:
        both give the same bits, and nearest keeps the file readable before spec 1.3)."""
        if not edit.encoding.is_delta:
            return ROUNDING_NEAREST
        if self.rounding != "auto":
            return self.rounding
        half = dtype in (torch.float16, torch.bfloat16)
        return ROUNDING_WINDOW if half and not edit.lossless else ROUNDING_NEAREST

    def dropped(self, name: str, delta: torch.Tensor, context: TensorContext) -> None:
        """The method stored nothing: the parameter keeps the base's value (error: all of ``Δ``)."""
        self.totals.counts["dropped"] = self.totals.counts.get("dropped", 0) + 1
        self.totals.add_error(edit_error(Edit.nothing({}), torch.zeros_like(delta), delta))
        if self.session is not None:
            self.session.set_parameter(name, context.base.float())

    def write(self, name: str, entry: TensorEntry, stored: dict[str, torch.Tensor], kind: str) -> None:
        self.totals.add_entry(entry, stored, kind)
        self.writer.add(name, entry, stored)

    def read_pair(self, name: str) -> tuple[torch.Tensor, TensorContext] | None:
        """(delta, context), or None when the fine-tune equals the base bit for bit. Where the
        fine-tune has more rows (`base_rows`), the base is extended with zero rows and the new
        rows' delta is zero: what a method edits."""
        base = self.base.get(name)
        base_rows = self.base_rows(name)
        if base_rows is not None:
            base = padded(base, self.finetune.info(name)[0][0])
        finetune, delta, factors = self.finetune.read(name, base)
        if delta is None and finetune.dtype == base.dtype and same_bits(finetune, base):
            return None
        arithmetic = compute_dtype(finetune.dtype)
        if delta is None:  # narrower bases are widened on the fly (exactly), without a full-size copy
            delta = finetune.to(arithmetic, copy=True)
            delta.sub_(base if base.dtype.itemsize <= arithmetic.itemsize else base.to(arithmetic))
        if base_rows is not None:
            delta[base_rows:] = 0
        return delta, self.context(name, base, finetune, factors, delta)

    def base_rows(self, name: str) -> int | None:
        """The base's row count where the fine-tune's ``name`` only adds rows (`Action.GROW`);
        asked by the read, the context and the edit of each tensor, answered once."""
        if name not in self._base_rows:
            grows = name in self.base
            self._base_rows[name] = grown_rows(self.base.info(name)[0], self.finetune.info(name)[0]) if grows else None
        return self._base_rows[name]

    def context(
        self, name: str, base: torch.Tensor, finetune: torch.Tensor, factors, delta: torch.Tensor
    ) -> TensorContext:
        activations = self.session.activations.get(name) if self.session is not None else None
        if activations is not None and activations.kind == "linear" and not len(activations.inputs):
            activations = None  # the layer never ran on the calibration texts
        factor_dtype = self.finetune.factor_dtype(name) if factors is not None else None
        # Stored values default to 16 bits whatever the fine-tune's dtype (SPEC-wise any float):
        # a 32-bit fine-tune's deltas gain nothing measurable from the other 16 bits.
        value_dtype = self.value_dtype or factor_dtype or (finetune.dtype if finetune.dtype.itemsize <= 2 else None)
        value_dtype = value_dtype or sixteen_bit(delta)
        return TensorContext(
            name,
            base=base,
            finetune=finetune,
            value_dtype=value_dtype,
            seed=self.seed,
            alpha=self.alpha,
            activations=activations,
            factors=factors,
            lookup=name in self.lookups,
            head=name in self.heads,
            fixed_bits=self.new_rows_bits(name, delta),
            sensitivity=self.sensitivities.values.get(name) if self.sensitivities is not None else None,
        )

    def new_rows_bits(self, name: str, delta: torch.Tensor) -> int:
        """What a resized table's new rows will add to its entry (`grown.new_rows_bits`), 0 elsewhere."""
        base_rows = self.base_rows(name)
        if base_rows is None:
            return 0
        return new_rows_bits(name, delta.shape[0] - base_rows, delta[0].numel())

    def stream(self, names: list[str]) -> Callable[[], Iterator[tuple[str, torch.Tensor, TensorContext]]]:
        """A re-iterable stream of (name, delta, context) over ``names``, skipping unchanged ones."""

        def stream():
            for name in names:
                pair = self.read_pair(name)
                if pair is not None:
                    yield name, pair[0], pair[1]

        return stream

    def finetune_numel(self) -> int:
        """Elements of every tensor of the fine-tune (what ``bits=`` is a share of)."""
        if not hasattr(self, "_numel"):
            self._numel = sum(math.prod(self.finetune.info(n)[0]) for n in self.finetune.names())
        return self._numel

    def finetune_nbytes(self, name: str) -> int:
        shape, dtype = self.finetune.info(name)
        return math.prod(shape) * (dtype.itemsize if isinstance(dtype, torch.dtype) else 0)

    def stats(self, prepared: dict[str, Any]) -> dict[str, Any]:
        """The manifest's ``stats``: the totals, the methods' whole-model choices, the calibration measures."""
        stats = self.totals.summary()
        if prepared:
            stats["prepare"] = prepared
        if self.sensitivities is not None:
            stats["sensitivity"] = self.sensitivities.stats()
        if self.session is not None:
            stats.update(
                output_error=self.session.output_mse(),
                calibration_texts=len(self.session.batches),
                calibration_tokens=self.session.tokens,
                **self.session.output_agreement(),
            )
            if self.session.loss is not None:
                stats.update(
                    calibration_loss=self.session.loss,
                    output_loss=self.session.output_loss(),
                    loss_change_estimate=self.totals.loss_change,
                )
        return stats
