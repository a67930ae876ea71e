"""EigenScore (INSIDE) and two stochastic estimators of it: Chebyshev moments (SeND's EES) and SLQ.

EigenScore measures how far apart K sampled answers to one prompt lie in the model's hidden space
(DESIGN.md §6): ES = (1/K) Σ_i log λ_i(C + αI), C the K×K covariance of the K embeddings, α = 1e-3.
C follows INSIDE's code (alibaba/eigenscore, func/metric.py, `getEigenIndicator_v0`, the function its
pipeline calls): `torch.cov(Z)` on Z (K, d) treats each embedding as a variable observed over its d
features, so C = Z J_d Zᵀ / (d − 1) with J_d = I_d − 11ᵀ/d (each embedding is centred over its own
features). INSIDE takes log10; exatrain takes the natural log, so ES here = ln(10) · ES of INSIDE.

Everything works on X (K, d) with C = X Xᵀ (`prepare`):
- `exact_eigenscore`: eigvalsh of the smaller Gram matrix. X Xᵀ (K×K) and Xᵀ X (d×d) share their
  non-zero eigenvalues, so for K > d: log det(C + αI_K) = log det(XᵀX + αI_d) + (K − d)·log α.
- `chebyshev_eigenscore`: the paper's Algorithm 1 (Efficient EigenScore), with the three defects of
  the authors' code fixed (see the function).
- `slq_eigenscore`: stochastic Lanczos quadrature with the same number of products per probe.
The two estimators touch X only through block products X (Xᵀ V): O(K·d) per probe and step, and never
form a K×K or d×d matrix. They are seeded (`seed`) and deterministic; with at least K probes they
probe with the K unit vectors, an exact trace (`probe_vectors`). At the paper's budget (20
products × 20 probes) on LLM-like spectra (λmax/α ≥ 1e4) Chebyshev is biased by most of a nat
while SLQ errs by a few hundredths (tests/test_eigenscore.py, benchmarks/eigenscore.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

METHODS = ("exact", "chebyshev", "slq")


def prepare(z: Tensor, standardize: bool = False) -> Tensor:
    """Embeddings Z (K, d) -> X (K, d), float64, with X Xᵀ = INSIDE's covariance Z J_d Zᵀ / (d − 1).

    `standardize` first z-scores every feature over the K samples (population std), as step 1 of the
    paper's Algorithm 1 does; a feature that is constant over the samples becomes zero.
    """
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(f"embeddings must be (K, d) with d >= 2, got {tuple(z.shape)}")
    z = z.detach().to(torch.float64)
    if standardize:
        std = z.std(0, unbiased=False)
        z = (z - z.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    return (z - z.mean(1, keepdim=True)) / math.sqrt(z.shape[1] - 1)


def exact_eigenscore(x: Tensor, alpha: float = 1e-3) -> float:
    """(1/K) Σ log λ_i(X Xᵀ + αI_K) by eigvalsh of the smaller of the two Gram matrices."""
    K, d = x.shape
    x = x.to(torch.float64)
    gram = x @ x.T if K <= d else x.T @ x
    lam = torch.linalg.eigvalsh(gram).clamp_min(0.0) + alpha  # round-off can make a zero eigenvalue -1e-17
    return float((lam.log().sum() + max(K - d, 0) * math.log(alpha)) / K)


def _products(x: Tensor):
    """v (K, n) -> X Xᵀ v, the only access the estimators have to C."""
    return lambda v: x @ (x.T @ v)


def probe_vectors(K: int, n: int, kind: str, seed: int) -> Tensor:
    """The (K, n) float64 probes the estimators draw for `seed`: E[z zᵀ] = I.

    Rademacher (±1) probes have ‖z‖² = K exactly, so the many eigenvalues of C + αI that sit at α
    (rank(C) < K) add no variance; Gaussian ones (the paper's choice) do. When n >= K the K unit
    vectors times √K are returned instead (still E[z zᵀ] = I over the K of them): the trace is then
    exact, with fewer products (INSIDE's K = 10).
    """
    if kind not in ("gaussian", "rademacher"):
        raise ValueError(f"probe kind must be gaussian or rademacher, got {kind!r}")
    if n >= K:
        return torch.eye(K, dtype=torch.float64) * math.sqrt(K)
    g = torch.Generator().manual_seed(seed + 1)  # not the stream `largest_eigenvalue` draws from
    if kind == "gaussian":
        return torch.randn(K, n, generator=g, dtype=torch.float64)
    return torch.randint(0, 2, (K, n), generator=g).to(torch.float64) * 2 - 1


def chebyshev_log_coefficients(a: float, b: float, moments: int) -> Tensor:
    """c_0..c_M of log λ on [a, b] (0 < a < b) in Chebyshev polynomials of x = (2λ − a − b)/(b − a).

    Closed form: with ρ = (√b + √a)/(√b − √a), log λ = log((b − a)ρ/4) + Σ_{m≥1} 2(−1)^{m+1} ρ^{−m}/m · T_m(x).
    (The paper computes the same integrals c_m = (2 − δ_m0)/π ∫ log λ(x) T_m(x)/√(1 − x²) dx by
    quadrature; the tests check the closed form against Gauss–Chebyshev quadrature.) The tail decays
    like ρ^{−M} ≈ exp(−2M·√(a/b)): slowly when b/a is large, which is what limits the Chebyshev estimator.
    """
    if not 0 < a < b:
        raise ValueError(f"need 0 < a < b, got a={a}, b={b}")
    rho = (math.sqrt(b) + math.sqrt(a)) / (math.sqrt(b) - math.sqrt(a))
    m = torch.arange(1, moments + 1, dtype=torch.float64)
    tail = 2 * (-1.0) ** (m + 1) * torch.exp(-m * math.log(rho)) / m
    return torch.cat([torch.tensor([math.log((b - a) * rho / 4)], dtype=torch.float64), tail])


def chebyshev_eigenscore(x: Tensor, alpha: float = 1e-3, moments: int = 20, probes: int = 20, *,
                         probe: str = "gaussian", bound_steps: int = 20, margin: float = 0.01,
                         seed: int = 0) -> float:
    """Efficient EigenScore, SeND's Algorithm 1: Chebyshev moments of C + αI with a Hutchinson trace.

    As in the paper: the spectrum is bounded by σ_max² (`largest_eigenvalue`), d_m = (1/N_z) Σ_j z_jᵀ T_m z_j
    with Gaussian probes z_j (a trace estimate of T_m), c_m the Chebyshev coefficients of log, and
    EES = (1/K) Σ_{m=0}^{M} c_m d_m. Unlike the authors' code (SEND repo, sensitivity/efficient_eigenscore/
    efficient.py): T_m is the Chebyshev polynomial, not cos(m·λ); the m = 0 term is kept; and the
    spectrum [α, (1 + margin)·σ_max² + α] of C + αI is mapped affinely onto [−1, 1] (the code leaves
    it in [0, 1], where log has its singularity at the end of the interval). The σ_max scaling and α
    are undone in the result, so this estimates exactly what `exact_eigenscore` computes. `margin`
    widens the interval over the σ_max² estimate. Cost: `bound_steps` + `moments`·`probes` products.
    """
    if moments < 1 or probes < 1:
        raise ValueError(f"need moments >= 1 and probes >= 1, got {moments}, {probes}")
    K = x.shape[0]
    x = x.to(torch.float64)
    matvec = _products(x)
    a = alpha
    b = max((1 + margin) * largest_eigenvalue(x, bound_steps, seed) + alpha, alpha * (1 + margin))
    c = chebyshev_log_coefficients(a, b, moments)

    def mapped(v: Tensor) -> Tensor:  # (2(C + αI) − (a + b)I)/(b − a) with a = α
        return (2 / (b - a)) * matvec(v) - v

    z = probe_vectors(K, probes, probe, seed).to(x.device)
    t_prev, t = z, mapped(z)
    total = c[0] * (z * z).sum() + c[1] * (z * t).sum()
    for m in range(2, moments + 1):
        t_prev, t = t, 2 * mapped(t) - t_prev
        total = total + c[m] * (z * t).sum()
    return float(total / (z.shape[1] * K))


def _lanczos(matvec, q: Tensor, steps: int, residual: bool = False) -> list[tuple[Tensor, Tensor]]:
    """Lanczos with full re-orthogonalisation for the columns of q (K, n), unit norm.

    Returns per column its tridiagonal (diagonal, off-diagonal), cut at the step where the Krylov
    space became invariant (then the quadrature is exact for that probe). `residual`: the
    off-diagonal also carries the last β (the norm of the residual), one longer than the diagonal.
    """
    K, n = q.shape
    basis = q.new_zeros(n, steps + 1, K)  # per probe its Lanczos vectors as rows: projections are bmm
    basis[:, 0] = q.T
    diag, off = [], []
    length = torch.full((n,), steps, dtype=torch.long)
    scale = torch.zeros(n, dtype=q.dtype, device=q.device)
    prev, beta = torch.zeros_like(q), torch.zeros(n, dtype=q.dtype, device=q.device)
    for j in range(steps):
        w = matvec(q)
        a = (q * w).sum(0)
        w = w - a * q - beta * prev
        done = basis[:, :j + 1]
        for _ in range(2):  # re-orthogonalise; a second pass only if the first removed much (Kahan-Parlett)
            before = w.norm(dim=0)
            w = w - torch.bmm(done.transpose(1, 2), torch.bmm(done, w.T.unsqueeze(-1))).squeeze(-1).T
            if bool((w.norm(dim=0) > 0.7 * before).all()):
                break
        beta = w.norm(dim=0)
        diag.append(a)
        off.append(beta)
        scale = torch.maximum(scale, a.abs() + beta)
        broke = (beta <= 1e-10 * scale) & (length == steps)
        length[broke.cpu()] = j + 1
        active = (length == steps).to(q.dtype)
        prev, q = q, w / beta.clamp_min(torch.finfo(q.dtype).tiny) * active
        beta = beta * active
        basis[:, j + 1] = q.T
    diag_t, off_t = torch.stack(diag), torch.stack(off)
    extra = 0 if residual else 1
    return [(diag_t[:length[i], i], off_t[:length[i] - extra, i]) for i in range(n)]


def largest_eigenvalue(x: Tensor, steps: int = 20, seed: int = 0) -> float:
    """Upper estimate of λ_max(X Xᵀ): the top Ritz value of `steps` Lanczos steps plus its residual.

    The paper bounds the spectrum by power iteration. That converges like (λ₂/λ₁)^{2n} and stops
    short when the top eigenvalues cluster (measured: 8% low after 30 iterations at λ₂/λ₁ = 0.9),
    and an eigenvalue above the Chebyshev interval makes T_m grow like cosh(m·acosh x): the EES
    then explodes (−1.9 and −1.6e4 nats at M = 20 and 40 in that case). Lanczos finds λ_max from the
    same kind of products in far fewer steps; the residual |β_k·y_k| of the Ritz pair is added so
    that a not-yet-converged Ritz value still errs upwards.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(x.shape[0], 1, generator=g, dtype=torch.float64).to(x.device)
    (d, e), = _lanczos(_products(x.to(torch.float64)), q / q.norm(), min(steps, x.shape[0]), residual=True)
    tri = torch.diag(d) + torch.diag(e[:-1], 1) + torch.diag(e[:-1], -1)
    theta, vecs = torch.linalg.eigh(tri)
    return float(theta[-1] + e[-1] * vecs[-1, -1].abs())


def slq_eigenscore(x: Tensor, alpha: float = 1e-3, steps: int = 20, probes: int = 20, *,
                   probe: str = "rademacher", seed: int = 0) -> float:
    """Stochastic Lanczos quadrature: tr log(C + αI) ≈ (1/N_z) Σ_j ‖z_j‖² Σ_k τ_jk log(θ_jk + α).

    θ_jk, τ_jk are the nodes and weights of the `steps`-point Gauss quadrature that Lanczos builds
    from z_j (Ritz values, squared first components of the eigenvectors of the tridiagonal matrix). A
    k-point Gauss rule is exact for polynomials of degree 2k − 1, against degree M for M Chebyshev
    moments, so at the same number of products SLQ is far more accurate on ill-conditioned spectra.
    Rademacher probes by default, as in Ubaru, Chen & Saad (2017). Cost: `steps`·`probes` products.
    """
    if steps < 1 or probes < 1:
        raise ValueError(f"need steps >= 1 and probes >= 1, got {steps}, {probes}")
    K = x.shape[0]
    x = x.to(torch.float64)
    z = probe_vectors(K, probes, probe, seed).to(x.device)
    norms = z.norm(dim=0)
    total = 0.0
    for i, (d, e) in enumerate(_lanczos(_products(x), z / norms, min(steps, K))):
        tri = torch.diag(d) + torch.diag(e, 1) + torch.diag(e, -1)
        theta, vecs = torch.linalg.eigh(tri)
        total += float(norms[i] ** 2 * (vecs[0] ** 2 * (theta.clamp_min(0.0) + alpha).log()).sum())
    return total / (z.shape[1] * K)


def eigenscore(z: Tensor, alpha: float = 1e-3, method: str = "exact", *, standardize: bool = False,
               moments: int = 20, probes: int = 20, probe: str | None = None, seed: int = 0) -> float:
    """EigenScore of K embeddings Z (K, d) by `method` (exact | chebyshev | slq); natural log.

    `moments` is the Chebyshev degree M and the number of Lanczos steps, so both estimators use
    `moments`·`probes` products (Chebyshev adds 20 Lanczos steps for its bound). `probe` None: each
    method's default (Gaussian for Chebyshev as in the paper, Rademacher for SLQ).
    """
    x = prepare(z, standardize)
    if method == "exact":
        return exact_eigenscore(x, alpha)
    if method == "chebyshev":
        return chebyshev_eigenscore(x, alpha, moments, probes, probe=probe or "gaussian", seed=seed)
    if method == "slq":
        return slq_eigenscore(x, alpha, moments, probes, probe=probe or "rademacher", seed=seed)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
