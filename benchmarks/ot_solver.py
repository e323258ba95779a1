"""Time codis.ot's solvers against POT's torch backend on codebook-sized problems.

    python benchmarks/ot_solver.py [--repeats N] [--device cpu|cuda] [--iterations I] [--epsilon E]
                                   [--threads T]

Costs are cosine distances between random unit vectors (N features x K codewords), solved between
uniform marginals with the same regulariser and iteration count on both sides; POT runs with
stopThr=0 so it does exactly ``iterations`` rounds. Each timing is the median of ``repeats`` runs
after one warm-up, ours and POT's called in turn so that load from other processes hits both alike
(on a busy machine with few cores, ``--threads 1`` avoids OpenMP threads stalling each other). ratio = POT ms / ours ms (> 1: ours is faster); max|dP| is the largest absolute
difference between the two plans (plan entries are about 1 / (N K)). IPOT has no POT counterpart:
its row reports the time and the largest row-marginal error |T 1 - a|.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch

import codis  # noqa: F401  - applies the torchvision/timm compat shim before anything else
import ot
from codis.ot import ipot, sinkhorn

SHAPES = ((256, 1024), (256, 4096))


def cosine_cost(n: int, k: int, dim: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(k, dim, generator=generator), dim=-1)
    return (1.0 - z @ c.T).clamp_min_(0.0).to(device)


def timed(fns: Sequence[Callable[[], torch.Tensor]], repeats: int,
          device: torch.device) -> list[tuple[float, torch.Tensor]]:
    """Median wall time in ms of each of ``fns`` and its last result.

    One warm-up call each, then ``repeats`` rounds that call the functions in turn, so a change in the
    load of a shared machine hits all of them alike.
    """
    def run(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3, result

    results = [run(fn)[1] for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            ms, results[i] = run(fn)
            times[i].append(ms)
    return [(statistics.median(t), r) for t, r in zip(times, results)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 gives steadier CPU timings on a busy machine")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension of the random vectors")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reg, iters = args.epsilon, args.iterations
    print(f"device={device} torch={torch.__version__} pot={ot.__version__} threads={torch.get_num_threads()} "
          f"epsilon={reg} iterations={iters} repeats={args.repeats} (median ms)")
    header = f"{'shape':>10}  {'solver':<22} {'ours ms':>9} {'POT ms':>9} {'POT/ours':>9} {'max|dP|':>10}"
    print(header)
    print("-" * len(header))
    for n, k in SHAPES:
        cost = cosine_cost(n, k, args.dim, device)
        a = torch.full((n,), 1.0 / n, device=device)
        b = torch.full((k,), 1.0 / k, device=device)
        shape = f"{n}x{k}"
        pairs = (
            ("sinkhorn (plain)", False, "sinkhorn"),
            ("sinkhorn (log)", True, "sinkhorn_log"),
        )
        for label, log_domain, method in pairs:
            def ours() -> torch.Tensor:
                return sinkhorn(cost, epsilon=reg, iterations=iters, log_domain=log_domain)

            def reference() -> torch.Tensor:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return ot.sinkhorn(a, b, cost, reg, method=method, numItermax=iters, stopThr=0.0,
                                       warn=False)

            (ours_ms, plan), (pot_ms, pot_plan) = timed((ours, reference), args.repeats, device)
            diff = (plan - pot_plan).abs().max().item()
            print(f"{shape:>10}  {label + ' vs ' + method:<22} {ours_ms:9.2f} {pot_ms:9.2f} "
                  f"{pot_ms / ours_ms:9.2f} {diff:10.2e}")
        [(ipot_ms, plan)] = timed([lambda: ipot(cost, iterations=iters)], args.repeats, device)
        row_error = (plan.sum(-1) - a).abs().max().item()
        print(f"{shape:>10}  {'ipot (eps=0.1)':<22} {ipot_ms:9.2f} {'-':>9} {'-':>9} "
              f"{'|T1-a|=' + format(row_error, '.1e'):>10}")


if __name__ == "__main__":
    main()
