"""The table that the side-by-side benchmarks print (``vision_init_step.py``, ``example_cache.py``,
``conv_stem.py``, ``frozen_vit.py``): a baseline row, then the other way, each with its seconds, a rate and the ratio
of the baseline's seconds to its own. tests/test_benchmarks.py reads it back."""

from __future__ import annotations

from typing import Callable


def print_two_way_table(subject: str, rate: str, rates: Callable[[float], float],
                        baseline: tuple[str, float], other: tuple[str, float],
                        digits: int = 1) -> None:
    """``baseline`` and ``other`` are (name, seconds); ``rates(seconds)`` gives the ``rate``
    column (e.g. steps/s, ms per batch), printed with ``digits`` decimals."""
    print(f"| {subject} | seconds | {rate} | ratio to {baseline[0]} |")
    print("|---|---|---|---|")
    for name, seconds in (baseline, other):
        print(f"| {name} | {seconds:.3f} | {rates(seconds):.{digits}f} | {baseline[1] / seconds:.2f} |")
