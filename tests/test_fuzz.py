"""A short mutation-fuzz run: every mutated delta loads identically or raises a DeltaFormatError.
The long run is `python benchmarks/fuzz_deltas.py --cases 5000`."""

from tests.fuzzing import run_cases


def test_mutated_deltas_load_correctly_or_raise_delta_format_errors(tmp_path):
    outcomes = run_cases(tmp_path, cases=300, seed=1234)
    bugs = {k: v for k, v in outcomes.items() if k.startswith("BUG")}
    assert not bugs, bugs
    assert sum(v for k, v in outcomes.items() if not k.startswith("ok")) > 100  # most mutations are caught
