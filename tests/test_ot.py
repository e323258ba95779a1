"""codis.ot against POT: Sinkhorn against ot.sinkhorn, IPOT against the exact plan of ot.emd."""

from __future__ import annotations

import warnings

import pytest
import torch

import codis  # noqa: F401  - compat shim first
import ot
from codis.config import OTConfig
from codis.ot import ipot, sinkhorn, transport_plan


def cosine_cost(*shape: int, dim: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Cosine distances (..., N, K) between random unit vectors, the cost CODIS solves."""
    *batch, n, k = shape
    generator = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(*batch, n, dim, generator=generator, dtype=dtype), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(*batch, k, dim, generator=generator, dtype=dtype), dim=-1)
    return (1.0 - z @ c.transpose(-1, -2)).clamp_min(0.0)


def random_marginal(size: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    weights = torch.rand(size, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.2
    return weights / weights.sum()


def uniform(size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.full((size,), 1.0 / size, dtype=dtype)


def pot_sinkhorn(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, iterations: int,
                 method: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns when it stops at numItermax, which is the point
        return ot.sinkhorn(a, b, cost, reg, method=method, numItermax=iterations, stopThr=0.0, warn=False)


# IPOT's columns match b at every step; its rows converge more slowly (rarely better than 1e-4 after
# 300 steps), hence its larger iteration count here.
SOLVERS = {
    "sinkhorn_plain": lambda c, a=None, b=None: sinkhorn(c, a, b, epsilon=0.1, iterations=300, log_domain=False),
    "sinkhorn_log": lambda c, a=None, b=None: sinkhorn(c, a, b, epsilon=0.1, iterations=300, log_domain=True),
    "ipot": lambda c, a=None, b=None: ipot(c, a, b, epsilon=0.1, iterations=3000),
}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("marginals", ["uniform", "random"])
def test_plan_marginals(solver: str, marginals: str) -> None:
    n, k = 12, 20
    cost = cosine_cost(n, k, seed=1)
    a, b = (uniform(n), uniform(k)) if marginals == "uniform" else (random_marginal(n, 2), random_marginal(k, 3))
    plan = SOLVERS[solver](cost, a, b)
    assert plan.shape == cost.shape
    assert (plan >= 0).all()
    torch.testing.assert_close(plan.sum(-1), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(plan.sum(-2), b, rtol=0, atol=1e-6)
    torch.testing.assert_close(plan.sum(), torch.tensor(1.0, dtype=plan.dtype), rtol=0, atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_equals_separate(solver: str) -> None:
    n, k = 7, 11
    cost = cosine_cost(2, 3, n, k, seed=4)
    a = torch.stack([torch.stack([random_marginal(n, 10 * i + j) for j in range(3)]) for i in range(2)])
    b = random_marginal(k, 99)  # (K,) broadcast over the batch
    plan = SOLVERS[solver](cost, a, b)
    assert plan.shape == (2, 3, n, k)
    for i in range(2):
        for j in range(3):
            separate = SOLVERS[solver](cost[i, j], a[i, j], b)
            torch.testing.assert_close(plan[i, j], separate, rtol=1e-10, atol=1e-12)
    # Default marginals are uniform per problem, also with batch dims.
    torch.testing.assert_close(SOLVERS[solver](cost).sum(-1), torch.full((2, 3, n), 1.0 / n, dtype=cost.dtype),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("log_domain,method", [(False, "sinkhorn"), (True, "sinkhorn_log")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("marginals", ["uniform", "random"])
def test_sinkhorn_matches_pot(log_domain: bool, method: str, dtype: torch.dtype, marginals: str) -> None:
    n, k, reg, iterations = 32, 48, 0.05, 30  # few iterations: POT and we must agree before convergence too
    cost = cosine_cost(n, k, seed=5, dtype=dtype)
    a, b = (uniform(n, dtype), uniform(k, dtype)) if marginals == "uniform" else (
        random_marginal(n, 6, dtype), random_marginal(k, 7, dtype))
    ours = sinkhorn(cost, a, b, epsilon=reg, iterations=iterations, log_domain=log_domain)
    for pot_method in ("sinkhorn", "sinkhorn_log"):  # both of POT's solvers give the same plan here
        reference = pot_sinkhorn(a, b, cost, reg, iterations, pot_method)
        scale = reference.abs().max().item()
        tolerance = 1e-5 if dtype == torch.float32 else 1e-10
        assert (ours - reference).abs().max().item() <= tolerance * scale, pot_method
    assert ours.dtype == dtype


def test_log_domain_small_epsilon_stays_finite_and_matches_pot() -> None:
    # float32 cosine distances of random vectors are about 1, so exp(-cost / 0.005) ~ exp(-200) underflows.
    n, k, reg, iterations = 64, 96, 0.005, 50
    cost = cosine_cost(n, k, dim=64, seed=8, dtype=torch.float32)
    plain = sinkhorn(cost, epsilon=reg, iterations=iterations, log_domain=False)
    assert not torch.isfinite(plain).all()  # the regime that needs the log domain
    ours = sinkhorn(cost, epsilon=reg, iterations=iterations, log_domain=True)
    assert torch.isfinite(ours).all()
    a, b = uniform(n, torch.float32), uniform(k, torch.float32)
    reference = pot_sinkhorn(a, b, cost, reg, iterations, "sinkhorn_log")
    exact = pot_sinkhorn(a.double(), b.double(), cost.double(), reg, iterations, "sinkhorn_log")
    scale = exact.max().item()
    # At small epsilon float32 rounding of the potentials is magnified by 1 / epsilon in the plan:
    # ours must agree with POT's float32 plan and be about as close as it to the float64 one.
    assert (ours - reference).abs().max().item() <= 1e-4 * scale
    pot_error = (reference - exact).abs().max().item()
    assert (ours.double() - exact).abs().max().item() <= 3 * pot_error + 1e-7 * scale
    torch.testing.assert_close(ours.sum(-1), a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_zero_mass_entries(solver: str) -> None:
    cost = cosine_cost(6, 5, seed=9)
    a = torch.tensor([0.2, 0.2, 0.0, 0.2, 0.2, 0.2], dtype=torch.float64)
    b = torch.tensor([0.0, 0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    plan = SOLVERS[solver](cost, a, b)
    assert torch.isfinite(plan).all()
    assert plan[:, 0].abs().max().item() == 0.0 and plan[2].abs().max().item() == 0.0
    torch.testing.assert_close(plan.sum(-1), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(plan.sum(-2), b, rtol=0, atol=1e-6)


def test_log_domain_uneven_marginals_match_pot() -> None:
    # Marginal entries spanning six orders of magnitude: the row update must not lose the small rows.
    n, k = 20, 30
    cost = cosine_cost(n, k, seed=17, dtype=torch.float32)
    a = torch.logspace(-6, 0, n, dtype=torch.float32)
    b = torch.logspace(0, -6, k, dtype=torch.float32)
    a, b = a / a.sum(), b / b.sum()
    ours = sinkhorn(cost, a, b, epsilon=0.01, iterations=200)
    exact = pot_sinkhorn(a.double(), b.double(), cost.double(), 0.01, 200, "sinkhorn_log")
    reference = pot_sinkhorn(a, b, cost, 0.01, 200, "sinkhorn_log")
    pot_error = (reference.double() - exact).abs().max().item()
    assert (ours.double() - exact).abs().max().item() <= 3 * pot_error + 1e-7 * exact.max().item()
    torch.testing.assert_close(ours.sum(-1), a, rtol=1e-4, atol=0)


def emd_plans(cost: torch.Tensor) -> torch.Tensor:
    n, k = cost.shape[-2:]
    return torch.stack([ot.emd(uniform(n), uniform(k), problem) for problem in cost.reshape(-1, n, k)])


def test_ipot_matches_emd() -> None:
    # Random continuous costs: the exact optimal plan is unique, so the plans themselves must agree.
    cost = cosine_cost(6, 8, 12, seed=1)
    exact = emd_plans(cost)
    plan = ipot(cost, iterations=2000)
    exact_cost = (exact * cost).sum((-1, -2))
    ipot_cost = (plan * cost).sum((-1, -2))
    assert ((ipot_cost - exact_cost).abs() / exact_cost).max().item() < 1e-3
    assert (plan - exact).abs().max().item() < 1e-3 / 12  # plan entries are up to 1/12


def test_ipot_cost_decreases_towards_emd() -> None:
    cost = cosine_cost(8, 8, 12, seed=2)
    exact_cost = (emd_plans(cost) * cost).sum((-1, -2))
    gaps = [((ipot(cost, iterations=t) * cost).sum((-1, -2)) - exact_cost).abs().mean().item()
            for t in (5, 20, 100, 500)]
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-4 * exact_cost.mean().item()
    # Entropic Sinkhorn at the same epsilon stays blurred: IPOT's point is to get below its cost.
    blurred = (sinkhorn(cost, epsilon=0.1, iterations=500) * cost).sum((-1, -2))
    assert (blurred - exact_cost).mean().item() > 10 * gaps[-1]


def test_ipot_is_the_published_algorithm() -> None:
    # Algorithm 1 of Xie et al. (2020) written out for uniform marginals, with its 1/n and 1/m factors
    # and no stabilising shift; ours must give the same iterates.
    cost = cosine_cost(9, 13, seed=15) * 2
    beta, outer, inner = 0.3, 25, 2
    n, m = cost.shape
    sigma = torch.ones(m, dtype=cost.dtype) / m
    transport = torch.ones_like(cost)
    kernel = torch.exp(-cost / beta)
    for _ in range(outer):
        q = kernel * transport
        for _ in range(inner):
            delta = 1 / (n * (q @ sigma))
            sigma = 1 / (m * (q.T @ delta))
        transport = delta[:, None] * q * sigma[None, :]
    torch.testing.assert_close(ipot(cost, epsilon=beta, iterations=outer, inner_iterations=inner), transport,
                               rtol=1e-10, atol=1e-14)


def test_ipot_invariant_to_row_constants() -> None:
    # Adding c_i to row i changes no plan's relative cost; the solver must not see it either.
    cost = cosine_cost(5, 9, 13, seed=16)
    shift = torch.rand(5, 9, 1, generator=torch.Generator().manual_seed(0), dtype=cost.dtype)
    torch.testing.assert_close(ipot(cost + shift, iterations=40), ipot(cost, iterations=40), rtol=1e-9, atol=1e-14)


def test_ipot_more_inner_iterations_fit_row_marginals_better() -> None:
    cost = cosine_cost(16, 24, seed=3)
    errors = [(ipot(cost, iterations=10, inner_iterations=m).sum(-1) - 1 / 16).abs().max().item() for m in (1, 10)]
    assert errors[1] < errors[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", SOLVERS)
def test_low_precision_input_gives_float32_plan(dtype: torch.dtype, solver: str) -> None:
    cost = cosine_cost(10, 14, seed=11, dtype=torch.float32).to(dtype)
    plan = SOLVERS[solver](cost)
    assert plan.dtype == torch.float32 and plan.device == cost.device
    torch.testing.assert_close(plan, SOLVERS[solver](cost.float()), rtol=0, atol=0)
    torch.testing.assert_close(plan.sum(-1), torch.full((10,), 0.1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_input_untouched_and_no_autograd(solver: str) -> None:
    cost = cosine_cost(5, 7, seed=12, dtype=torch.float32).requires_grad_()
    before = cost.detach().clone()
    plan = SOLVERS[solver](cost)
    assert not plan.requires_grad
    assert torch.equal(cost.detach(), before)


GOOD = cosine_cost(4, 6, seed=13)


def _with(index: tuple[int, int], value: float) -> torch.Tensor:
    cost = GOOD.clone()
    cost[index] = value
    return cost


@pytest.mark.parametrize("call,argument", [
    (lambda f: f(GOOD, uniform(5)), "a"),
    (lambda f: f(GOOD, None, uniform(4)), "b"),
    (lambda f: f(GOOD.expand(2, 4, 6), torch.full((3, 4), 0.25, dtype=torch.float64)), "a"),
    (lambda f: f(_with((1, 2), float("nan"))), "cost"),
    (lambda f: f(_with((0, 0), float("inf"))), "cost"),
    (lambda f: f(_with((3, 5), -0.5)), "cost"),
    (lambda f: f(GOOD[0]), "cost"),
    (lambda f: f(GOOD, uniform(4), uniform(6) * 2), "b"),
    (lambda f: f(GOOD, torch.tensor([0.5, 0.5, 0.5, -0.5], dtype=torch.float64)), "a"),
    (lambda f: f(GOOD, None, torch.tensor([float("nan")] * 6, dtype=torch.float64)), "b"),
    (lambda f: f(GOOD, epsilon=0.0), "epsilon"),
    (lambda f: f(GOOD, iterations=0), "iterations"),
])
@pytest.mark.parametrize("solver", [sinkhorn, ipot])
def test_invalid_input_names_argument(solver, call, argument: str) -> None:
    with pytest.raises(ValueError, match=f"^{argument}:"):
        call(solver)


def test_ipot_validates_inner_iterations() -> None:
    with pytest.raises(ValueError, match="^inner_iterations:"):
        ipot(GOOD, inner_iterations=0)


@pytest.mark.parametrize("config", [
    OTConfig(solver="ipot", epsilon=0.2, iterations=7, inner_iterations=2),
    OTConfig(solver="sinkhorn", epsilon=0.05, iterations=9, log_domain=True),
    OTConfig(solver="sinkhorn", epsilon=0.05, iterations=9, log_domain=False),
])
def test_transport_plan_dispatches_on_config(config: OTConfig) -> None:
    cost = cosine_cost(3, 9, 13, seed=14)
    if config.solver == "ipot":
        expected = ipot(cost, epsilon=config.epsilon, iterations=config.iterations,
                        inner_iterations=config.inner_iterations)
        other = sinkhorn(cost, epsilon=config.epsilon, iterations=config.iterations)
    else:
        expected = sinkhorn(cost, epsilon=config.epsilon, iterations=config.iterations,
                            log_domain=config.log_domain)
        other = ipot(cost, epsilon=config.epsilon, iterations=config.iterations)
    plan = transport_plan(cost, config)
    torch.testing.assert_close(plan, expected, rtol=0, atol=0)
    assert not torch.allclose(plan, other)


# ---- the training step's call: both modalities at once, no host sync, fp32 cost ------------------
def test_transport_plan_solves_stacked_problems_as_separate_ones_and_as_pot() -> None:
    config = OTConfig(solver="ipot", epsilon=0.1, iterations=2000)
    image_cost, text_cost = cosine_cost(10, 12, seed=21), cosine_cost(10, 12, seed=22)
    plans = transport_plan(torch.stack([image_cost, text_cost]), config)
    for plan, cost in zip(plans, (image_cost, text_cost)):
        torch.testing.assert_close(plan, transport_plan(cost, config), rtol=1e-10, atol=1e-14)
        assert (plan - emd_plans(cost)[0]).abs().max().item() < 1e-3 / 12


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_transport_plan_checks_values_on_the_device_without_a_sync(solver: str) -> None:
    from codis.train.syncs import count_syncs

    config = OTConfig(solver=solver, epsilon=0.1, iterations=5)
    with count_syncs() as report:
        plan = transport_plan(GOOD, config)
    assert report.count == 0, dict(report.sites)
    assert torch.isfinite(plan).all()
    with count_syncs() as report:
        ipot(GOOD, iterations=5)  # called directly, a solver reads the checks back to raise ValueError
    assert report.count == 1
    for bad in (_with((1, 2), float("nan")), _with((3, 5), -0.5)):
        with pytest.raises(RuntimeError, match="OT problem"):
            transport_plan(bad, config)


def test_codeword_distance_is_float32_under_bf16_autocast() -> None:
    from codis.losses import codeword_distance

    generator = torch.Generator().manual_seed(23)
    features = torch.randn(6, 16, generator=generator).bfloat16()
    codewords = torch.randn(5, 16, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = codeword_distance(features, codewords)
        # what autocast alone would have done: the matmul in bf16
        rounded = 1 - (torch.nn.functional.normalize(features, dim=-1)
                       @ torch.nn.functional.normalize(codewords, dim=-1).t())
    assert cost.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    torch.testing.assert_close(cost, codeword_distance(features.float(), codewords), rtol=0, atol=0)
    assert (cost - rounded.float()).abs().max() > 1e-4
