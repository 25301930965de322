"""The consistent-hash fuzz mode under resource limits, with a model target.

Each case runs in a worker process whose address space is capped (``resource.setrlimit``) and
whose answer must come within a time limit; a case over either limit counts as a failure
(``LIMIT:memory``, ``LIMIT:time``), as does any outcome but a correct load or a
`DeltaFormatError`. Cases alternate between two targets:

* ``synthetic``: a small delta with every encoding and index coding, validated, shape-checked,
  decoded and put on its base (`tests.fuzzing.load_all`);
* ``model``: a delta of a tiny Llama, mutated, then hot-swapped into a loaded model
  (``swap_delta``) and attached on the fly to the base (``attach_deltas``) and served (a forward);
  after a swap the model must hold finite weights, an attached adapter must give finite logits.
"""

from __future__ import annotations

import multiprocessing
import random
import resource
import shutil
import warnings
from collections import Counter
from pathlib import Path

import torch

from delta_format.errors import DeltaFormatError
from tests.crafting import rehash
from tests.fuzzing import classify, load_all, make_base, mutate, write_valid_delta

_STATE: dict = {}


def _limit_memory(extra_bytes: int) -> None:
    """Cap the worker's address space at what it uses now plus ``extra_bytes``."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + extra_bytes, size + extra_bytes))


def _prepare_model_target(workdir: Path) -> None:
    """A tiny Llama base and a delta of it (sign, sparse, low-rank and dense parts) on disk."""
    import delta_format
    from tests.models import save, structured_perturbation, tiny_llama

    base = tiny_llama(hidden=32, layers=1)
    save(base, workdir / "model-base")
    save(structured_perturbation(base, 0.05, seed=1), workdir / "model-ft")
    delta_format.compress(
        workdir / "model-base",
        workdir / "model-ft",
        workdir / "model-valid",
        method="sign",
        rules=[("*mlp*", "dare", {"p": 0.5}), ("*self_attn.o_proj*", "lowrank", {"rank": 2}), ("*norm*", "dense", {})],
        progress=False,
        max_shard_size=8_000,
    )


def _worker_init(workdir: str, extra_bytes: int) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from delta_format import DeltaModel

    root = Path(workdir)
    _STATE.update(root=root, base=make_base())
    _STATE["expected"] = load_all(root / "valid", _STATE["base"])
    _STATE["model"] = DeltaModel.from_pretrained(root / "model-valid")
    _STATE["plain"] = AutoModelForCausalLM.from_pretrained(root / "model-base").eval()
    _limit_memory(extra_bytes)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(8).unsqueeze(0)).logits


def _model_target(case: Path) -> str:
    """Swap the case in (materialised), then attach it on the fly: both must agree on whether
    the result is usable. Finite but huge weights may overflow the logits of a materialised
    load as well (SPEC §9 asks for finite weights, not finite activations), so on-the-fly logits
    must be finite exactly when the materialised model's are."""
    from delta_format import attach_deltas, detach_deltas, set_active_delta

    model, plain, root = _STATE["model"], _STATE["plain"], _STATE["root"]
    try:
        model.swap_delta(case)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            return "BUG:model:swap left non-finite weights"
        materialised = bool(torch.isfinite(_logits(model)).all())
    finally:
        model.swap_delta(root / "model-valid")  # the next case starts from the same state
    attach_deltas(plain, {"case": case}, base_model=root / "model-base")
    try:
        set_active_delta(plain, "case")
        if bool(torch.isfinite(_logits(plain)).all()) != materialised:
            return "BUG:model:on-the-fly logits disagree with the materialised model's on finiteness"
    finally:
        detach_deltas(plain)
    return "ok"


def _ready() -> bool:
    return True


def _run_case(index: int, seed: int) -> str:
    rng = random.Random(seed * 1_000_003 + index)
    root = _STATE["root"]
    target = "model" if index % 2 else "synthetic"
    case = root / f"case-{index}"
    shutil.copytree(root / ("model-valid" if target == "model" else "valid"), case)
    kind = mutate(case, rng, deep=True)
    rehash(case)
    try:
        if target == "model":
            return _model_target(case)
        return classify(kind, load_all(case, _STATE["base"]), _STATE["expected"], consistent=True)
    except DeltaFormatError as exc:
        return type(exc).__name__
    except MemoryError:
        return f"LIMIT:memory:{target}:{kind}"
    except Exception as exc:  # noqa: BLE001 - the point is to catch everything else
        if "allocate" in str(exc) or "memory" in str(exc).lower():
            return f"LIMIT:memory:{target}:{kind}"
        return f"BUG:{target}:{kind}:{type(exc).__name__}:{str(exc)[:80]}"
    finally:
        shutil.rmtree(case, ignore_errors=True)
        for stray in root.glob("outside-*"):
            stray.unlink(missing_ok=True)


def run_limited(
    workdir: Path, cases: int, seed: int = 0, *, memory_mb: int = 1024, seconds: float = 20.0, workers: int = 1
) -> Counter:
    """Run ``cases`` consistent-hash mutations under the limits; returns outcome counts. Keys
    starting with ``BUG`` or ``LIMIT`` are failures."""
    write_valid_delta(workdir / "valid", make_base())
    _prepare_model_target(workdir)
    context = multiprocessing.get_context("spawn")
    outcomes: Counter = Counter()

    def new_pool():
        fresh = context.Pool(workers, _worker_init, (str(workdir), memory_mb << 20))
        fresh.apply(_ready)  # starting a worker (imports, a model) is not part of any case's time
        return fresh

    pool = new_pool()
    try:
        for i in range(cases):
            try:
                outcomes[pool.apply_async(_run_case, (i, seed)).get(timeout=seconds)] += 1
            except multiprocessing.TimeoutError:
                outcomes[f"LIMIT:time:case {i}"] += 1
                pool.terminate()
                pool = new_pool()
    finally:
        pool.terminate()
    return outcomes
