"""What an edit method is: a small dataclass of declared parameters with an ``edit`` hook.

A method turns one parameter's delta into an `Edit`: an encoding (SPEC §5), the stored tensors by
role, and a few statistics worth recording. It knows nothing about files, shards or the Hub; the
compressor (`delta_format.compression.pipeline`) reads the checkpoints, calls the method and writes the
result. What a method may need beyond the delta (its seed, the dtype to store values in, the
base and fine-tune tensors for a lossless check, activation statistics from calibration texts)
comes in a `TensorContext`.

Methods that choose something for the whole model at once (DAREx-q's global rescale, BitDelta's
distilled scales) do it in `EditMethod.prepare`, which the compressor calls once, with the
calibration session, before it streams the tensors.

Subclassing registers a method (``class DareMethod(EditMethod, name="dare")`` fills `METHODS`),
and its parameters are dataclass fields declared with `param`, whose help text, parser and
choices are all the command line needs to offer them (`method_parameters`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..core.encodings import Encoding, SparseEncoding
from ..core.registry import Registered, Registry
from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from .activations import ActivationStats, CalibrationSession


@dataclass
class Edit:
    """One parameter's edited delta as it will be stored."""

    encoding: Encoding
    stored: dict[str, torch.Tensor]
    stats: dict[str, Any] = field(default_factory=dict)
    lossless: bool = False
    """True when the reconstruction is bit-identical to the fine-tune (checked, not assumed)."""
    decoder: Callable[[torch.dtype], torch.Tensor] | None = None
    """Builds what a reader decodes from ``stored`` (flat, in a given dtype), where the method
    can do it more cheaply than the encoding: a sparse edit knows where its values go, which
    `SparseEncoding.decode` re-derives from the index coding (regenerating a seeded mask,
    walking gaps or bits)."""
    dropped: bool = False
    """True when the method chose to store nothing: the parameter keeps the base's value (a
    budget that gives a tensor no bits). ``encoding`` and ``stored`` are then unused."""

    @classmethod
    def nothing(cls, stats: dict[str, Any]) -> Edit:
        """An edit that stores nothing (`dropped`)."""
        from ..core.encodings import DenseEncoding

        return cls(DenseEncoding(), {}, stats, dropped=True)

    def decode(self, shape: tuple[int, ...], name: str, dtype: torch.dtype) -> torch.Tensor:
        """The edited delta as a reader decodes it from ``stored`` (what the compressor measures)."""
        if self.decoder is None:
            return self.encoding.decode(self.stored, shape, name, dtype)
        return self.decoder(dtype).view(shape)


def scattered(
    encoding: SparseEncoding,
    values: torch.Tensor,
    shape: tuple[int, ...],
    where: Any,
    laid_out: tuple[int, ...] = (-1,),
) -> Callable[[torch.dtype], torch.Tensor]:
    """Decoder of a sparse edit whose kept entries are known: zeros of ``shape`` with the scaled
    stored ``values`` (viewed as ``laid_out``) at ``where`` (flat positions into a 1-D ``shape``,
    or whole slices of a matrix, e.g. ``(rows,)`` or ``(slice(None), columns)``): what
    `SparseEncoding.decode` gives, without re-deriving the positions."""

    def decode(dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(shape, dtype=dtype, device=values.device)
        out[where] = encoding.scaled_values(values, dtype).view(laid_out)
        return out.view(-1)

    return decode


@dataclass
class TensorContext:
    """Everything about one parameter a method may use besides its delta."""

    name: str
    base: torch.Tensor | None = None
    """The base tensor in its own dtype (None for a LoRA source without a base read)."""
    finetune: torch.Tensor | None = None
    """The fine-tuned tensor in its own dtype: what a lossless edit must reproduce."""
    value_dtype: torch.dtype = torch.float32
    """dtype for stored floating values (kept entries, factors): the fine-tune's by default."""
    seed: int = 0
    alpha: float = 1.0
    """The coefficient the entry will carry (methods that search on outputs must use it)."""
    activations: ActivationStats | None = None
    """What this parameter's layer saw on the calibration texts, when there are any."""
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    """``(u, v)`` with ``u @ v`` equal to the delta (as a matrix), when the source is a LoRA adapter."""
    lookup: bool = False
    """The model reads the parameter as a lookup table (an embedding, or a language model's head):
    a token uses one row of it, not all of it."""
    head: bool = False
    """The parameter is the model's output embeddings (a language model's head) or tied to them:
    its rows also weigh in every token's output."""
    fixed_bits: int = 0
    """Bits stored for the parameter besides the method's edit (a resized vocabulary's new rows,
    SPEC §9.2): a method that plans a size counts them."""
    sensitivity: float | None = None
    """The model's output sensitivity to the parameter, when measured (for methods that
    `uses_sensitivity`): the mean per element of the diagonal Fisher information of its output,
    on the calibration texts or on random tokens (`delta_format.compression.sensitivity`): the
    expected output change, in KL (a model with logits) or in embedding cosine (an encoder), per
    unit of random squared error in the parameter."""


TensorStream = Callable[[], Iterator[tuple[str, torch.Tensor, TensorContext]]]
"""Re-iterable stream of (name, float32 delta, context) over the parameters a method edits."""


@dataclass(frozen=True)
class Param:
    """What the command line needs to offer a method parameter (see `param`)."""

    help: str
    parse: Callable[[str], Any]
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


_PARAM = "delta_format.param"


def param(
    default: Any,
    *,
    help: str,
    parse: Callable[[str], Any] | None = None,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A method parameter: a dataclass field with its command-line description.

    ``parse`` turns the flag's text into the value (default: the default's type, ``str`` with
    ``choices``) and raises ``ValueError`` on bad text; ``help`` says what it does.

    Example::

        @dataclass
        class StructuralMethod(EditMethod, name="structural"):
            axis: str = param("row", help="prune whole rows or columns", choices=("row", "column"))
    """
    if parse is None:
        if choices is None and default is None:
            raise InvalidArgumentError(
                "param() needs parse= when the default is None",
                expected="parse=int, float, ...",
                found="no parser and no default to take one from",
            )
        parse = str if choices is not None else type(default)
    spec = Param(help, parse, None if choices is None else tuple(choices), metavar)
    return field(default=default, metadata={_PARAM: spec})


def number_or(*words: str) -> Callable[[str], float | str]:
    """A parser of a positive number or one of ``words`` (e.g. DAREx-q's ``q``)."""

    def parse(text: str) -> float | str:
        if text in words:
            return text
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"expected a positive number or one of {', '.join(words)}, got {text!r}")
        return value

    return parse


def drop_rate(default: float, what: str = "delta entries") -> Any:
    """The parameter ``p`` of the pruning methods, checked by `check_drop_rate`."""
    return param(default, help=f"drop rate: fraction of {what} dropped")


METHODS: Registry[EditMethod] = Registry("edit method")
"""Every registered method by name, filled by subclassing `EditMethod` with a name."""


class EditMethod(Registered):
    """Base class: subclasses are dataclasses whose fields are the method's parameters.

    ``class X(EditMethod, name="x")`` registers ``X`` in `METHODS` (a name already taken is
    refused). Subclasses implement `edit`, declare parameters with `param`, validate them in
    ``__post_init__`` (raising `InvalidArgumentError`), and may override `prepare` and
    `needs_calibration`. ``summary`` is the few words the command line's help shows.
    """

    registry = METHODS
    summary: ClassVar[str] = ""
    tags: ClassVar[tuple[str, ...]] = ()
    """Hub tags the model card adds for this method (besides ``delta-format:<name>``)."""
    uses_seed: ClassVar[bool] = False
    """True if the method draws seeded masks: the compressor then records its seed."""
    needs_adapter_factors: ClassVar[bool] = False
    """True if the method stores a LoRA adapter's own factors, so the fine-tune must be one."""
    plans_whole_model: ClassVar[bool] = False
    """True if `prepare` must run even without calibration texts (then with ``calibration=None``):
    a method that allocates a budget across tensors sees them all before editing any."""
    uses_sensitivity: ClassVar[bool] = False
    """True if the method reads `TensorContext.sensitivity`: the compressor then spends the
    backward passes that measure it (`compress`'s ``sensitivity=``)."""
    fits_outputs_data_free: ClassVar[bool] = False
    """True if `prepare`, without calibration texts, takes a session on the built-in text
    (`delta_format.compression.probe.DataFreeProbe`; random token ids without a tokenizer) instead
    of None (built only when the method first asks it anything)."""

    def edit(self, name: str, delta: torch.Tensor, context: TensorContext) -> Edit:
        """The edited delta of one parameter. ``delta`` is ``finetune - base`` in float32 (float64
        for float64 parameters); it must not be modified in place."""
        raise NotImplementedError

    def needs_calibration(self) -> bool:
        """True if the method cannot run without calibration texts with these parameters."""
        return False

    def prepare(self, tensors: TensorStream, calibration: CalibrationSession | None) -> dict[str, Any]:
        """Whole-model choices made on calibration texts before streaming; returns statistics
        for the manifest. Called only when there are calibration texts, or always (with
        ``calibration=None`` when there are none) for methods that `plans_whole_model`."""
        return {}

    def params(self) -> dict[str, Any]:
        """The parameters as recorded in the manifest (``method.params``)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        return {key: value for key, value in values.items() if value is not None}

    @classmethod
    def param_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}

    @classmethod
    def declared_params(cls) -> dict[str, Param]:
        """The parameters declared with `param`, by name."""
        return {f.name: f.metadata[_PARAM] for f in dataclasses.fields(cls) if _PARAM in f.metadata}


def method_parameters() -> dict[str, tuple[Param, dict[str, list[str]]]]:
    """Every declared parameter across the registered methods: its `Param` (the first
    declaration's parser, choices and metavar) and the methods taking it, grouped by help text.

    Raises:
        InvalidArgumentError: two methods parse one parameter name differently (one flag cannot
            serve both).
    """
    out: dict[str, tuple[Param, dict[str, list[str]]]] = {}
    for method, cls in METHODS.items():
        for pname, spec in cls.declared_params().items():
            first, helps = out.setdefault(pname, (spec, {}))
            if (spec.parse, spec.choices, spec.metavar) != (first.parse, first.choices, first.metavar):
                raise InvalidArgumentError(
                    f"methods declare the parameter {pname!r} differently",
                    expected="one parser and one set of choices per parameter name",
                    found=f"{method} and {next(iter(helps.values()))[0]}",
                    fix="rename the parameter of one of them",
                )
            helps.setdefault(spec.help, []).append(method)
    return out


def check_drop_rate(method: str, p: float, *, allow_zero: bool = True) -> float:
    """``p`` is a fraction of entries to drop: a number in [0, 1)."""
    if (
        isinstance(p, bool)
        or not isinstance(p, (int, float))
        or not math.isfinite(p)
        or not (0.0 <= p < 1.0)
        or (p == 0.0 and not allow_zero)
    ):
        raise InvalidArgumentError(
            f"{method}: invalid drop rate p",
            expected="0 <= p < 1",
            found=repr(p),
            fix="p is the fraction of delta entries dropped, e.g. p=0.9 keeps 10%",
        )
    return float(p)


def check_positive(method: str, what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"{method}: {what} must be a positive number", expected="> 0", found=repr(value))
    return float(value)


def kept_count(numel: int, p: float) -> int:
    """How many of ``numel`` entries a deterministic pruning keeps at drop rate ``p``."""
    return min(numel, max(0, round((1.0 - p) * numel)))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in float64 (0 when both are zero)."""
    exact64 = exact.double()
    norm = float(torch.linalg.vector_norm(exact64))
    err = float(torch.linalg.vector_norm(approx.double() - exact64))
    return err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
