"""What the compressor will do to each tensor: which method edits it (`MethodPlan`), and whether
it is edited, stored whole, left to the base, or excluded (`schedule`).

Both are decided before a byte is written, from names, shapes and dtypes only (plus a comparison
for non-float tensors), so a bad rule or an undeletable base tensor fails fast.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core.dtypes import TORCH_DTYPES, torch_dtype_name
from ..errors import InvalidArgumentError
from ..methods import EditMethod, get_method
from ..methods.dense import same_bits
from .grown import grown_rows
from .sources import TensorSource

Rule = tuple
"""``(pattern, method)`` or ``(pattern, method, params)``: a glob or compiled regex, a method
name or `EditMethod`, and that rule's own parameters."""


def matches(pattern: str | re.Pattern, name: str) -> bool:
    """A glob matches like ``fnmatchcase``; a compiled regex must match the whole name."""
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _pattern_text(pattern: str | re.Pattern) -> str:
    return pattern.pattern if isinstance(pattern, re.Pattern) else pattern


def check_patterns(what: str, patterns: Any) -> list[str | re.Pattern]:
    """``patterns`` (None, one pattern, or several) as a list, refusing anything but globs and regexes."""
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    patterns = list(patterns) if isinstance(patterns, (list, tuple, set, frozenset)) else [patterns]
    if not all(isinstance(p, (str, re.Pattern)) for p in patterns):
        raise InvalidArgumentError(
            f"{what} must be glob patterns or compiled regular expressions",
            expected='e.g. ["*embed_tokens*"]',
            found=repr(patterns)[:200],
        )
    return patterns


class MethodPlan:
    """The default method, per-name rules (first match wins) and include/exclude patterns.

    The shared ``method_params`` go to every method that declares them (``p`` to ``dare`` and
    ``magnitude`` alike); a parameter no method in use declares is an error. Methods with equal
    parameters are one instance, so a whole-model `EditMethod.prepare` runs once for all the
    tensors it edits.
    """

    def __init__(
        self,
        method: str | EditMethod,
        method_params: Mapping[str, Any],
        rules: Sequence[Rule] | None,
        include: Any,
        exclude: Any,
    ):
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        used: set[str] = set()
        self._instances: dict[tuple, EditMethod] = {}
        self.default = self._build(method, {}, method_params, used)
        self.rules: list[tuple[Any, EditMethod]] = []
        for rule in rules or []:
            if (
                not isinstance(rule, (tuple, list))
                or len(rule) not in (2, 3)
                or not isinstance(rule[0], (str, re.Pattern))
            ):
                raise InvalidArgumentError(
                    "a rule is (pattern, method) or (pattern, method, params)",
                    expected='e.g. ("*norm*", "dense")',
                    found=repr(rule)[:200],
                )
            own = dict(rule[2]) if len(rule) == 3 else {}
            self.rules.append((rule[0], self._build(rule[1], own, method_params, used)))
        unused = set(method_params) - used
        if unused:
            names = sorted({m.name for m in self.methods()})
            raise InvalidArgumentError(
                f"{sorted(unused)} is not a parameter of {', '.join(names)}",
                expected=f"parameters of the methods in use: "
                f"{sorted(set().union(*(type(m).param_names() for m in self.methods())))}",
                found=sorted(unused),
                fix="check the spelling, or the method name",
            )

    def _build(
        self, method: str | EditMethod, own: Mapping[str, Any], shared: Mapping[str, Any], used: set[str]
    ) -> EditMethod:
        if isinstance(method, EditMethod):
            if own:
                raise InvalidArgumentError(
                    "a rule with a method instance takes no params",
                    expected="(pattern, instance)",
                    found=f"params {sorted(own)}",
                )
            return method
        if not isinstance(method, str):
            raise InvalidArgumentError(
                "a method is a name or an EditMethod", expected="e.g. 'dare'", found=repr(method)
            )
        from ..methods import METHODS

        cls = METHODS.get(method)
        accepted = cls.param_names() if cls is not None else set()
        params = {k: v for k, v in shared.items() if k in accepted}
        used.update(params)
        params.update(own)
        key = (method, tuple(sorted((k, repr(v)) for k, v in params.items())))
        if key not in self._instances:
            self._instances[key] = get_method(method, **params)
        return self._instances[key]

    def methods(self) -> list[EditMethod]:
        """Every distinct method in use, the default first."""
        return list({id(m): m for m in [self.default, *(m for _, m in self.rules)]}.values())

    def included(self, name: str) -> bool:
        if self.include and not any(matches(p, name) for p in self.include):
            return False
        return not any(matches(p, name) for p in self.exclude)

    def method_for(self, name: str) -> EditMethod:
        for pattern, method in self.rules:
            if matches(pattern, name):
                return method
        return self.default

    def describe(self) -> dict[str, Any]:
        """The plan as the manifest records it (``method.params``)."""
        out: dict[str, Any] = dict(self.default.params())
        if self.rules:
            out["rules"] = [[_pattern_text(p), m.name, m.params()] for p, m in self.rules]
        if self.include:
            out["include"] = [_pattern_text(p) for p in self.include]
        if self.exclude:
            out["exclude"] = [_pattern_text(p) for p in self.exclude]
        return out

    def check_calibration(self, has_texts: bool) -> None:
        """Refuse settings that cannot run without calibration texts when there are none."""
        needing = sorted({m.name for m in self.methods() if m.needs_calibration()})
        if needing and not has_texts:
            raise InvalidArgumentError(
                f"{', '.join(needing)} with these parameters needs calibration texts",
                expected="calibration_texts=[...] (a few representative texts)",
                found="none",
                fix="pass calibration texts, or a data-free setting (e.g. a number for q)",
            )

    def check_finetune(self, finetune: TensorSource) -> None:
        """Refuse methods that store an adapter's factors when the fine-tune has none."""
        if not finetune.provides_factors() and any(m.needs_adapter_factors for m in self.methods()):
            raise InvalidArgumentError(
                "the lora method stores a LoRA adapter's factors",
                expected="a PEFT adapter (adapter_config.json + adapter_model.safetensors) as the fine-tune",
                found="a full checkpoint",
                fix="use lowrank with rank= or energy=",
            )


class Action(str, enum.Enum):
    """What the compressor does to one fine-tune tensor."""

    EDIT = "edit"
    """``Δ = ft - base`` goes to the tensor's method (and is skipped if it is all zero bits)."""
    GROW = "grow"
    """The fine-tune only adds rows to the base's tensor (a resized vocabulary): the old rows'
    delta goes to the tensor's method, the new rows are stored beside it (SPEC §9.2)."""
    REPLACE = "replace"
    """The base lacks the tensor or has another shape: the fine-tuned value is stored whole."""
    IGNORED = "ignored"
    """The fine-tune's checkpoint holds it but its architecture does not load it (an unexpected
    key, e.g. a rotary ``inv_freq`` buffer an older transformers saved): transformers ignores it
    when loading the fine-tune, and so does the delta (``stats.ignored_finetune_tensors``)."""
    TIED = "tied"
    """A copy, bit for bit, of a tensor the fine-tune's model ties it to (a head saved beside its
    embedding): transformers loads the kept one for both, so the delta does not mention it. (A
    copy that differs makes transformers load the two untied: it stays in the delta.)"""
    UNCHANGED = "unchanged"
    """Equal to the base (known from the source, or a non-float tensor compared bit for bit)."""
    EXCLUDED = "excluded"
    """Not included, or excluded: the delta does not mention it, so it keeps the base's value."""


def schedule(plan: MethodPlan, base: TensorSource, finetune: TensorSource) -> list[tuple[str, Action]]:
    """``(name, action)`` for every fine-tune tensor, in the fine-tune's order.

    Refuses base tensors the fine-tune lacks but its architecture loads (a delta cannot delete a
    parameter) unless excluded, and non-float tensors that changed (no encoding stores them).
    Base tensors the architecture does not load are `ignored_base_tensors`, not an error; fine-tune
    tensors it does not load are ignored as transformers ignores them, and a bit-identical copy of
    a tensor the model ties it to is left out (transformers loads the one it keeps for both)."""
    tied = getattr(finetune, "tied_copies", dict)()
    tied = {n for n, kept in tied.items() if same_bits(finetune.get(n), finetune.get(kept))}
    unloaded = set(ignored_finetune_tensors(finetune))

    def action(name: str) -> Action:
        if name in tied:
            return Action.TIED
        return Action.IGNORED if name in unloaded else _action(name, plan, base, finetune)

    out = [(name, action(name)) for name in finetune.names()]
    ignored = set(ignored_base_tensors(plan, base, finetune))
    ft_names = set(finetune.names())
    orphans = [n for n in base.names() if n not in ft_names and n not in ignored and plan.included(n)]
    if orphans:
        raise InvalidArgumentError(
            "the base has tensors the fine-tune lacks but its architecture loads, and a delta cannot "
            "delete a parameter",
            expected="every base tensor the fine-tune's architecture loads, in the fine-tune",
            found=orphans[:5],
            fix="check the pair (a base of another architecture?); to keep the base's value anyway, pass "
            "exclude=[...] with their names",
        )
    return out


def ignored_finetune_tensors(finetune: TensorSource) -> list[str]:
    """Fine-tune tensors its architecture does not load (transformers' unexpected keys), where the
    architecture can be told (`TensorSource.architecture_names`)."""
    loaded = finetune.architecture_names()
    return [] if loaded is None else [n for n in finetune.names() if n not in loaded]


def ignored_base_tensors(plan: MethodPlan, base: TensorSource, finetune: TensorSource) -> list[str]:
    """Base tensors the fine-tune lacks and its architecture does not load: what transformers calls
    unexpected keys (e.g. an int64 ``embeddings.position_ids`` buffer an older transformers saved,
    persistent then, non-persistent now). Loading the fine-tune ignores them, so the delta does
    too; the compressor reports them in the manifest's ``stats`` (SPEC §3.6)."""
    ft_names = set(finetune.names())
    orphans = [n for n in base.names() if n not in ft_names and plan.included(n)]
    if not orphans:
        return []
    loaded = finetune.architecture_names()
    return [] if loaded is None else [n for n in orphans if n not in loaded]


def _action(name: str, plan: MethodPlan, base: TensorSource, finetune: TensorSource) -> Action:
    if not plan.included(name):
        return Action.EXCLUDED
    shape, dtype = finetune.info(name)
    in_base = name in base
    same_shape = in_base and base.info(name)[0] == shape
    if same_shape and finetune.changed(name) is False:
        return Action.UNCHANGED
    if not (isinstance(dtype, torch.dtype) and torch_dtype_name(dtype) is not None):
        if in_base and base.info(name) == (shape, dtype) and same_bits(base.get(name), finetune.get(name)):
            return Action.UNCHANGED
        raise InvalidArgumentError(
            f"{name!r} is a {dtype} tensor that differs from the base",
            expected="changed tensors in float64, float32, float16 or bfloat16",
            found=str(dtype),
            fix=f"exclude it (exclude=[{name!r}]) to keep the base's value",
        )
    if same_shape:
        return Action.EDIT
    grows = in_base and grown_rows(base.info(name)[0], shape) is not None
    return Action.GROW if grows and base.info(name)[1] in TORCH_DTYPES.values() else Action.REPLACE
