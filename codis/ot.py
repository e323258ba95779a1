"""Batched optimal transport between features and codewords, in torch.

CODIS turns each batch of N teacher features z_i and the K codewords c_j into soft codeword targets by
solving an optimal-transport problem between the uniform marginals mu = 1/N and nu = 1/K with cost
D_ij = d(z_i, c_j); the rows of the plan T (N x K) are the targets of the codebook loss. The paper
solves it with IPOT (Xie et al., "A Fast Proximal Point Method for Computing Exact Wasserstein
Distance", UAI 2020), whose plans converge to the exact, unregularised optimum: :func:`ipot`.
:func:`sinkhorn` (entropic OT, Cuturi 2013) is offered too: its plans are smoother (a blur controlled
by ``epsilon``) and it is the solver of SwAV, whose swapped-prediction loss CODIS's codebook loss
follows, so it is the natural ablation; its plain form is also the cheapest per iteration.

Both solvers take a cost of shape (..., N, K) and solve every leading batch entry at once, with a
fixed iteration count and no convergence test inside the loop (a test would synchronise the GPU on
every training step). They run under ``torch.no_grad``: the plans are targets, not a differentiable
layer. They compute in float32 (float64 if the cost is float64) whatever the input dtype, so bf16 /
fp16 features from autocast do not degrade the plan. POT (``ot.sinkhorn``, ``ot.emd``) is the
reference the tests hold them to; it is not used here because it solves one problem per call and
checks convergence on the host.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from codis.config import OTConfig

__all__ = ["ipot", "sinkhorn", "transport_plan"]

# Marginals may differ in total mass by this relative amount (float32 sums of 4096 entries stay far
# below it); beyond it the problem has no transport plan.
_MASS_RTOL = 1e-4


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _marginal(weights: Tensor | None, name: str, size: int, batch: torch.Size, dtype: torch.dtype,
              device: torch.device) -> Tensor:
    """Return ``weights`` (default uniform 1/size) as a (..., size) tensor broadcast to ``batch``."""
    if weights is None:
        return torch.full((*batch, size), 1.0 / size, dtype=dtype, device=device)
    if not isinstance(weights, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor or None, got {type(weights).__name__}")
    if weights.dim() == 0 or weights.shape[-1] != size:
        raise ValueError(f"{name}: last dimension must be {size} to match cost, got shape "
                         f"{tuple(weights.shape)}")
    try:
        shape = torch.broadcast_shapes(weights.shape[:-1], batch)
    except RuntimeError:
        shape = None
    if shape != batch:
        raise ValueError(f"{name}: leading shape {tuple(weights.shape[:-1])} does not broadcast to "
                         f"the cost's batch shape {tuple(batch)}")
    if weights.device != device:
        raise ValueError(f"{name}: on {weights.device}, but cost is on {device}")
    return weights.to(dtype).expand(*batch, size)


def _prepare(cost: Tensor, a: Tensor | None, b: Tensor | None, check_on_host: bool,
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Validate the problem and return (cost, a, b) in the compute dtype, marginals broadcast.

    Shapes are checked on the host. Values (finite, non-negative cost; finite, non-negative
    marginals of equal positive mass) are read back once and raise ValueError naming the argument
    when ``check_on_host``; otherwise they are asserted on the device (torch._assert_async: no
    host sync; a RuntimeError on the CPU, a device-side assert on CUDA)."""
    if not isinstance(cost, Tensor):
        raise ValueError(f"cost: expected a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() < 2 or cost.shape[-2] == 0 or cost.shape[-1] == 0:
        raise ValueError(f"cost: expected shape (..., N, K) with N, K >= 1, got {tuple(cost.shape)}")
    if cost.is_complex():
        raise ValueError(f"cost: must be real, got {cost.dtype}")
    dtype = _compute_dtype(cost.dtype)
    batch, (n, k) = cost.shape[:-2], cost.shape[-2:]
    cost = cost.to(dtype)
    given_a, given_b = a is not None, b is not None
    a = _marginal(a, "a", n, batch, dtype, cost.device)
    b = _marginal(b, "b", k, batch, dtype, cost.device)
    # aminmax is a single pass and propagates NaN, so non-finite costs show up in lo or hi.
    lo, hi = torch.aminmax(cost)
    checks = [(~(torch.isfinite(lo) & torch.isfinite(hi)), "cost", "contains NaN or infinite values"),
              (lo < 0, "cost", "contains negative values; OT costs must be >= 0")]
    # The default marginals are uniform by construction: only given ones need their values checked.
    if given_a:
        checks.append((~torch.isfinite(a).all() | (a < 0).any(), "a", "must be finite and non-negative"))
    if given_b:
        checks.append((~torch.isfinite(b).all() | (b < 0).any(), "b", "must be finite and non-negative"))
    if given_a or given_b:
        mass_a, mass_b = a.sum(-1), b.sum(-1)
        checks.append(((mass_a <= 0).any(), "a", "must have positive total mass"))
        checks.append((((mass_a - mass_b).abs() > _MASS_RTOL * mass_a.abs()).any(), "b",
                       "total mass differs from a's; the marginals must carry the same mass"))
    flags = torch.stack([bad for bad, _, _ in checks])
    if not check_on_host:
        torch._assert_async(~flags.any(), "OT problem: " + "; ".join(
            f"{name} {message}" for _, name, message in checks) + " (one of these failed)")
        return cost, a, b
    # One host round trip for all value checks (each check alone would synchronise the GPU).
    for bad, (_, name, message) in zip(flags.tolist(), checks):
        if bad:
            raise ValueError(f"{name}: {message}")
    return cost, a, b


def _check_positive(name: str, value: float, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not value > 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}: must be {kind}, got {value!r}")


def _matvec(matrix: Tensor, vector: Tensor) -> Tensor:
    """(..., N, K) @ (..., K) -> (..., N)."""
    if matrix.dim() == 2:
        return torch.mv(matrix, vector)
    return torch.matmul(matrix, vector.unsqueeze(-1)).squeeze(-1)


def _vecmat(vector: Tensor, matrix: Tensor) -> Tensor:
    """(..., N) @ (..., N, K) -> (..., K)."""
    if matrix.dim() == 2:
        return torch.mv(matrix.t(), vector)
    return torch.matmul(vector.unsqueeze(-2), matrix).squeeze(-2)


@torch.no_grad()
def sinkhorn(cost: Tensor, a: Tensor | None = None, b: Tensor | None = None, *, epsilon: float = 0.05,
             iterations: int = 50, log_domain: bool = True, check_on_host: bool = True) -> Tensor:
    """Entropic OT plan argmin_T <T, cost> - epsilon H(T) with T 1 = a, T^T 1 = b (Cuturi 2013).

    ``cost``: (..., N, K), non-negative; ``a``: (..., N) and ``b``: (..., K) marginals (default uniform,
    any leading shape that broadcasts to cost's). Returns the plan, shape of ``cost``, in float32
    (float64 for a float64 cost), on cost's device. The iteration is POT's (``ot.sinkhorn`` with
    ``method="sinkhorn"`` / ``"sinkhorn_log"`` and ``stopThr=0``): kernel K = exp(-cost / epsilon),
    u = 1/N (log u = 0 in the log domain: a constant factor the first update absorbs), then
    ``iterations`` rounds of v <- b / K^T u, u <- a / K v, so the plan diag(u) K diag(v) matches
    ``a`` exactly in its rows and approaches ``b`` in its columns.

    ``log_domain=False`` runs that on the scaling vectors (two mat-vecs a round, fastest); the kernel
    underflows once cost / epsilon passes ~87 in float32 (e.g. epsilon=0.005 on cosine distances)
    and the plan becomes NaN. ``log_domain=True`` keeps log u, log v and updates them with
    log-sum-exp over cost / epsilon, which stays finite for any epsilon.

    ``check_on_host`` False checks the values of cost and marginals on the device instead of
    reading them back (no host-device sync; a failure is a RuntimeError or a device-side assert,
    not a ValueError): the training step's choice.
    """
    _check_positive("epsilon", epsilon)
    _check_positive("iterations", iterations, integer=True)
    cost, a, b = _prepare(cost, a, b, check_on_host)
    if log_domain:
        return _sinkhorn_log(cost, a, b, epsilon, iterations)
    kernel = torch.exp(cost / -epsilon)
    n, k = cost.shape[-2:]
    u = torch.full_like(a, 1.0 / n)
    for _ in range(iterations):
        v = b / _vecmat(u, kernel)
        u = a / _matvec(kernel, v)
    return kernel.mul_(u.unsqueeze(-1)).mul_(v.unsqueeze(-2))


def _sinkhorn_log(cost: Tensor, a: Tensor, b: Tensor, epsilon: float, iterations: int) -> Tensor:
    """POT's ``sinkhorn_log`` iterates, with one exp over the N x K entries per iteration instead of two.

    With M = -cost / epsilon, the column update log v_j = log b_j - logsumexp_i(M_ij + log u_i) is
    computed shifted by each column's max s_j, which leaves E_ij = exp(M_ij + log u_i - s_j) in
    [0, 1] and column sums c_j >= 1. The row update's logsumexp_j(M_ij + log v_j) is then exactly
    -log u_i + log sum_j E_ij b_j / c_j: a mat-vec with E rather than a second pass of exp. That sum
    cannot underflow: after any row update the plan P = exp(M + log u + log v) has rows summing to
    a, so each row i has a P_ij >= a_i / K (with b_j > 0), and E_ij >= P_ij / mass since no column
    holds more than the total mass; the sum is thus >= a_i b_j / (N K mass). The first iteration
    starts from log u = 0, which is no such plan, so its row update is a full logsumexp.
    """
    neg_cost = cost / -epsilon
    # (..., K, N): the column reduction becomes a contiguous last-dimension one, and E^T a mat-vec operand.
    neg_cost_t = neg_cost.transpose(-1, -2).contiguous()
    work_t = torch.empty_like(neg_cost_t)
    log_a, log_b = a.log(), b.log()
    # exp of subnormal results is ~10x slower on x86 CPUs; terms below the smallest normal float are
    # under 1e-37 of their column's max term, so clamping them there changes nothing measurable.
    floor = math.log(torch.finfo(cost.dtype).tiny)
    log_u = torch.zeros_like(log_a)
    for step in range(iterations):
        torch.add(neg_cost_t, log_u.unsqueeze(-2), out=work_t)
        shift = work_t.amax(-1)
        kernel_t = work_t.sub_(shift.unsqueeze(-1)).clamp_min_(floor).exp_()
        column_sums = kernel_t.sum(-1)
        log_v = log_b - column_sums.log() - shift
        if step == 0:
            log_u = log_a - torch.logsumexp(neg_cost + log_v.unsqueeze(-2), -1)
        else:
            log_u = log_a + log_u - _vecmat(b / column_sums, kernel_t).log()
    return neg_cost.add_(log_u.unsqueeze(-1)).add_(log_v.unsqueeze(-2)).exp_()


@torch.no_grad()
def ipot(cost: Tensor, a: Tensor | None = None, b: Tensor | None = None, *, epsilon: float = 0.1,
         iterations: int = 50, inner_iterations: int = 1, check_on_host: bool = True) -> Tensor:
    """Exact-OT plan by the inexact proximal point method, IPOT (Xie et al. 2020, Algorithm 1).

    Each outer step solves min_T <T, cost> + epsilon KL(T || T_prev) inexactly; the plans converge to
    the unregularised optimum as ``iterations`` grows (``epsilon`` is the proximal step: smaller
    moves faster but is less stable). With A = exp(-cost / epsilon), T = 1 1^T and sigma = 1/K:

        repeat ``iterations`` times:
            Q = A * T                                       (elementwise)
            repeat ``inner_iterations`` times:
                delta = a / (Q sigma);  sigma = b / (Q^T delta)
            T = diag(delta) Q diag(sigma)

    This is the published algorithm with its 1/n, 1/m factors replaced by the marginals a, b
    (equal for uniform ones); sigma is carried over between outer steps as there. The plan's
    columns match ``b`` exactly, its rows approach ``a``. For stability A is built from cost minus
    each row's minimum: that multiplies row i of Q by a constant, which delta absorbs exactly, so
    the iterates are unchanged while every row of A keeps an entry of 1 and cannot underflow. A
    column of A still underflows (float32) if its costs exceed every row's minimum by more than
    ~87 epsilon; that codeword then gets no mass. The default epsilon=0.1 on cosine distances
    (at most 2) keeps A above exp(-20).

    Shapes, dtypes, devices and ``check_on_host`` as in :func:`sinkhorn`.
    """
    _check_positive("epsilon", epsilon)
    _check_positive("iterations", iterations, integer=True)
    _check_positive("inner_iterations", inner_iterations, integer=True)
    cost, a, b = _prepare(cost, a, b, check_on_host)
    shape, (n, k) = cost.shape, cost.shape[-2:]
    # Every problem of the batch in one (P, N, K) stack, delta a (P, N, 1) and sigma a (P, K, 1)
    # column, and ``plan_t`` a transposed view that follows the plan's in-place updates: each
    # product in the loop is then one bmm and each scaling one broadcast multiply, with no
    # reshaping (the loop is the training step's longest run of small kernels).
    cost = cost.reshape(-1, n, k)
    a, b = a.reshape(-1, n, 1), b.reshape(-1, k, 1)
    kernel = (cost - cost.amin(-1, keepdim=True)).div_(-epsilon).exp_()
    plan = kernel.clone()  # Q of the first step, A * ones
    plan_t = plan.mT
    sigma = torch.full_like(b, 1.0 / k)
    tiny = torch.finfo(cost.dtype).tiny
    for step in range(iterations):
        if step:
            plan.mul_(kernel)
        for _ in range(inner_iterations):
            # A zero-mass row or column stays zero in the plan; the clamp makes its 0 / 0 a 0.
            delta = a / torch.bmm(plan, sigma).clamp_min_(tiny)
            sigma = b / torch.bmm(plan_t, delta).clamp_min_(tiny)
        plan.mul_(delta)
        plan_t.mul_(sigma)
    return plan.reshape(shape)


def transport_plan(cost: Tensor, config: OTConfig) -> Tensor:
    """The plan for uniform marginals from the solver and settings that ``config`` names, for a
    cost of shape (..., N, K) (several problems in one call), its values checked on the device
    (no host-device sync: this runs every training step)."""
    if config.solver == "ipot":
        return ipot(cost, epsilon=config.epsilon, iterations=config.iterations,
                    inner_iterations=config.inner_iterations, check_on_host=False)
    if config.solver == "sinkhorn":
        return sinkhorn(cost, epsilon=config.epsilon, iterations=config.iterations,
                        log_domain=config.log_domain, check_on_host=False)
    raise ValueError(f"config.solver: must be 'ipot' or 'sinkhorn', got {config.solver!r}")
