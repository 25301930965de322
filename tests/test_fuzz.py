"""A short mutation-fuzz run: every mutated delta loads identically or raises a DeltaFormatError.
The long runs are `python benchmarks/fuzz_deltas.py --cases 5000 [--consistent | --limited]`."""

import pytest

from tests.fuzz_limits import run_limited
from tests.fuzzing import run_cases


def test_mutated_deltas_load_correctly_or_raise_delta_format_errors(tmp_path):
    outcomes = run_cases(tmp_path, cases=300, seed=1234)
    bugs = {k: v for k, v in outcomes.items() if k.startswith("BUG")}
    assert not bugs, bugs
    assert sum(v for k, v in outcomes.items() if not k.startswith("ok")) > 100  # most mutations are caught


def test_consistent_hash_mutations_reach_decoding_and_end_in_a_correct_load_or_a_typed_error(tmp_path):
    outcomes = run_cases(tmp_path, cases=300, seed=99, consistent=True)
    bugs = {k: v for k, v in outcomes.items() if k.startswith("BUG")}
    assert not bugs, bugs
    assert outcomes["ok-content-changed"] > 0  # mutated bytes got past the integrity check


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_consistent_hash_mutations_under_memory_and_time_limits_with_swaps_and_on_the_fly(tmp_path):
    outcomes = run_limited(tmp_path, cases=30, seed=5, memory_mb=1024, seconds=60)
    failures = {k: v for k, v in outcomes.items() if k.startswith(("BUG", "LIMIT"))}
    assert not failures, failures
    assert sum(outcomes.values()) == 30
