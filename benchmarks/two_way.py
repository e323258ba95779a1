"""How the side-by-side benchmarks (``vision_init_step.py``, ``example_cache.py``, ``conv_stem.py``,
``frozen_vit.py``) time two ways of doing one thing, and the table they print: a baseline row,
then the other way, each with its seconds, a rate and the ratio of the baseline's seconds to its
own. tests/test_benchmarks.py reads it back."""

from __future__ import annotations

import statistics
from typing import Callable


def alternating_medians(rounds: int, run: Callable[[int, bool], float]) -> tuple[float, float]:
    """Median seconds of the baseline and of the other way, each round running
    ``run(round, False)`` (the baseline) then ``run(round, True)``, which return the seconds they
    measured: alternating spreads the machine's drift over both."""
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds):
        for other in (False, True):
            seconds[other].append(run(round_, other))
    return statistics.median(seconds[False]), statistics.median(seconds[True])


def print_two_way_table(subject: str, rate: str, rates: Callable[[float], float],
                        baseline: tuple[str, float], other: tuple[str, float],
                        digits: int = 1) -> None:
    """``baseline`` and ``other`` are (name, seconds); ``rates(seconds)`` gives the ``rate``
    column (e.g. steps/s, ms per batch), printed with ``digits`` decimals."""
    print(f"| {subject} | seconds | {rate} | ratio to {baseline[0]} |")
    print("|---|---|---|---|")
    for name, seconds in (baseline, other):
        print(f"| {name} | {seconds:.3f} | {rates(seconds):.{digits}f} | {baseline[1] / seconds:.2f} |")
