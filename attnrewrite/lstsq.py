"""Sketch-and-precondition least squares for tall matrices.

Problem. Given a tall A (m × n, m ≫ n, full column rank) and B (m × k, or a vector), find
X = argmin ‖A X − B‖_F, i.e. one independent least-squares problem per column of B. Here A
is a rewritten attention site's output (tokens × head dim: up to millions of rows, n = 16..128)
and B the original site's output; X is the linear correction applied after the rewrite.

Algorithm (Rokhlin–Tygert, Blendenpik, LSRN).
  1. Draw a random sketch S with s ≈ oversample·n rows (s ≪ m) and form S·A, S·B.
     * CountSketch: every row of A goes to one of s buckets, multiplied by a random ±1.
       S·A is a single `index_add_` over the rows: O(nnz(A)) work, S is never stored.
     * SRHT: S = sqrt(M/s) · P H D with D random ±1 signs, H the orthonormal Walsh–Hadamard
       transform of size M = 2^⌈log2 m⌉ (A zero-padded to M rows; butterflies written with
       reshapes, O(M n log M)) and P a uniform choice of s of the M rows.
  2. QR of the small s × n matrix: S·A = Q R.
  3. Solve the right-preconditioned problem min_y ‖(A R⁻¹) y − b‖ by LSQR, with A R⁻¹
     applied as "triangular solve, then A" (and its transpose as "Aᵀ, then a triangular
     solve with Rᵀ"); R⁻¹ is never formed. Then X = R⁻¹ y.
  By default LSQR starts from the solution of the normal equations of A R⁻¹, formed and
  Cholesky-factored explicitly (safe because A R⁻¹ is well conditioned; two matrix–matrix
  passes over A, the same order of work as one LSQR iteration with many right-hand sides),
  and usually stops at once; `start="sketch"` starts it instead from the sketch-and-solve
  answer y0 = Qᵀ S b (x0 = R⁻¹ Qᵀ S b), whose residual
  is within a factor (1 + ε)/(1 − ε) of the optimum. It costs one pass over A and pays when B
  is nearly in range(A) (the calibration case, Ô ≈ O): measured 21 instead of 31 iterations at
  ‖r‖/‖b‖ ≈ 1e-6, and a consistent system is solved exactly by it. Started from 0, a consistent
  system stops at ‖r‖ ≈ tol·‖b‖, which leaves a forward error up to κ(A)·tol.

Why A R⁻¹ is well conditioned. S is a subspace embedding for range(A) with high probability
once s is a small multiple of n (s ≳ 2n..4n): (1 − ε)‖A z‖ ≤ ‖S A z‖ ≤ (1 + ε)‖A z‖ for
every z. As S A R⁻¹ = Q has orthonormal columns, every singular value of A R⁻¹ lies in
[1/(1 + ε), 1/(1 − ε)], so κ(A R⁻¹) ≤ (1 + ε)/(1 − ε) = O(1) however ill conditioned A is
(measured: ≈ 2.7 at s = 4n, 1.6 at 16n). LSQR (mathematically CG on the normal equations)
shrinks the error by about (κ − 1)/(κ + 1) per iteration, so the iteration count depends on
the tolerance and s, not on κ(A). For SRHT the embedding holds for any A (H·D spreads every
row's weight over all rows first). CountSketch needs s ~ n² in the worst case: when a few
rows carry part of range(A), two of them can share a bucket and κ(A R⁻¹) grows (LSQR still
converges, in more iterations); on incoherent data s = 4n behaves like SRHT.

Cost. Sketch: O(m n) (CountSketch) or O(m n log m) (SRHT); QR: O(s n²); each LSQR iteration
one product with A and one with Aᵀ, O(m n k) for k right-hand sides, plus two n × n triangular
solves. A direct QR of A costs O(m n²); the iterative solve wins when the number of iterations
times the (memory-bound) cost of a pass over A is below that.

Multiple right-hand sides: the k columns run k independent LSQR recurrences in lockstep, all
scalars being length-k vectors, so each iteration is one (m × n)·(n × k) product instead of k
matrix–vector products. A column that meets its stopping rule is frozen (its x stops changing)
and counted as converged at that iteration; the loop ends when every column has stopped.

Stopping rules (Paige & Saunders, with atol = btol = tol), on the LSQR estimates of the
preconditioned problem:  ‖r‖ ≤ tol·‖b‖ + tol·‖Ā‖·‖y‖  (a consistent system is solved), or
‖Āᵀ r‖ / (‖Ā‖ ‖r‖) ≤ tol  (a least-squares solution is reached); Ā is the operator LSQR sees
and ‖Ā‖ its running Frobenius-norm estimate.

All work is done in float64 whatever A's dtype; X is returned in A's dtype.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


# ----------------------------------------------------------------------------- LSQR

def _lsqr(A, b, R, x0, tol, max_iter):
    """Batched LSQR: independent recurrences for the columns of b (m × k), in lockstep.

    Ā = A R⁻¹ (R upper triangular, or None: Ā = A); x0 a start or None (zero).
    Returns (x, iterations per column, stopped per column: a stopping rule was met).
    """
    k = b.shape[1]
    if R is None:
        solve_R = solve_Rt = lambda z: z
    else:
        solve_R = lambda y: torch.linalg.solve_triangular(R, y, upper=True)          # R⁻¹ y
        solve_Rt = lambda z: torch.linalg.solve_triangular(R.mT, z, upper=False)    # R⁻ᵀ z
    bnorm = torch.linalg.vector_norm(b, dim=0)

    def normalize(z):                    # in place: z / ‖z‖ per column (a zero column stays 0)
        nrm = torch.linalg.vector_norm(z, dim=0)
        return z.div_(torch.where(nrm > 0, nrm, 1.0)), nrm

    u, beta = normalize(b.clone() if x0 is None else b - A @ solve_R(x0))
    v, alpha = normalize(solve_Rt(A.mT @ u))
    x = torch.zeros_like(v) if x0 is None else x0.clone()
    w = v.clone()
    phibar, rhobar = beta.clone(), alpha.clone()
    anorm2 = torch.zeros(k, dtype=F64, device=b.device)
    iters = torch.zeros(k, dtype=torch.long, device=b.device)
    # nothing to do where b − A x0 = 0 (zero rhs, exact start) or Āᵀ r = 0 (x0 already optimal)
    active = (beta > 0) & (alpha > 0)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        # bidiagonalization step: β u = Ā v − α u,  α v = Āᵀ u − β v
        # (in place; the m × k update is fused into the product: u ← A (R⁻¹ v) − α u)
        u, beta = normalize(u.mul_(-alpha).addmm_(A, solve_R(v)))
        anorm2 += alpha ** 2 + beta ** 2
        v, alpha = normalize(v.mul_(-beta).add_(solve_Rt(A.mT @ u)))
        # plane rotation eliminating β from the lower bidiagonal
        rho = torch.hypot(rhobar, beta)
        rho_safe = torch.where(rho > 0, rho, 1.0)
        c, s = rhobar / rho_safe, beta / rho_safe
        theta, rhobar = s * alpha, -c * alpha
        phi, phibar = c * phibar, s * phibar
        step = torch.where(active, phi / rho_safe, 0.0)
        x += step * w
        w = v - (theta / rho_safe) * w
        iters += active.long()
        # stopping rules on the estimates ‖r‖ = φ̄ and ‖Āᵀr‖ = φ̄ α |c|
        anorm = anorm2.sqrt()
        xnorm = torch.linalg.vector_norm(x, dim=0)
        rnorm, arnorm = phibar, phibar * alpha * c.abs()
        consistent = rnorm <= tol * bnorm + tol * anorm * xnorm
        optimal = arnorm <= tol * anorm * rnorm
        active &= ~(consistent | optimal)
    return x, iters.tolist(), (~active).tolist()


def _as_2d(b):
    return (b.unsqueeze(1), True) if b.dim() == 1 else (b, False)


def _check(A, B):
    if A.dim() != 2:
        raise ValueError(f"A must be a matrix (m × n), got shape {tuple(A.shape)}")
    if B.dim() not in (1, 2):
        raise ValueError(f"B must be a vector (m) or a matrix (m × k), got shape {tuple(B.shape)}")
    m, n = A.shape
    if B.shape[0] != m:
        raise ValueError(f"A has {m} rows but B has {B.shape[0]}: shapes {tuple(A.shape)} and {tuple(B.shape)} do not match")
    if m < n or n == 0:
        raise ValueError(f"A must be tall (m ≥ n ≥ 1), got m = {m}, n = {n}")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise ValueError(f"A and B must be floating point, got {A.dtype} and {B.dtype}")


def lsqr(A, b, tol=1e-10, max_iter=None):
    """Plain LSQR (no preconditioner) for min ‖A x − b‖, from x = 0.

    b may be a vector or an m × k matrix (columns solved independently, in lockstep).
    Returns (x in A's dtype, iterations): an int for a vector b, a list per column otherwise.
    """
    _check(A, b)
    A64 = A.to(F64)
    b64, vec = _as_2d(b.to(F64))
    max_iter = 4 * A.shape[1] if max_iter is None else max_iter
    x, iters, _ = _lsqr(A64, b64, None, None, tol, max_iter)
    return (x[:, 0] if vec else x).to(A.dtype), (iters[0] if vec else iters)


# ----------------------------------------------------------------------------- sketches

def _countsketch(A, B, s, gen):
    """S·A and S·B for a CountSketch with s buckets: row i goes to bucket h(i) with sign σ(i).

    One `index_add_` per matrix into 2s rows (negative rows land in bucket h(i) + s), then
    S·A = top − bottom: no signed copy of A, no s × m matrix.
    """
    m = A.shape[0]
    bucket = torch.randint(s, (m,), generator=gen, device=A.device)
    bucket += s * torch.randint(2, (m,), generator=gen, device=A.device)   # σ(i) = −1 ↦ second half

    def apply(Z):
        T = Z.new_zeros(2 * s, Z.shape[1]).index_add_(0, bucket, Z)
        return T[:s] - T[s:]

    return apply(A), apply(B)


def fwht(x):
    """Unnormalized Walsh–Hadamard transform along dim 0 (length a power of two), y = H x.

    log2(M) butterfly stages; stage h views x as (M/2h, 2, h, ·) and maps the pair (a, b) to
    (a + b, a − b), ping-ponging between two buffers.
    """
    M = x.shape[0]
    if M & (M - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {M}")
    x = x.reshape(M, -1).clone()
    y = torch.empty_like(x)
    h = 1
    while h < M:
        xv, yv = x.view(M // (2 * h), 2, h, -1), y.view(M // (2 * h), 2, h, -1)
        torch.add(xv[:, 0], xv[:, 1], out=yv[:, 0])
        torch.sub(xv[:, 0], xv[:, 1], out=yv[:, 1])
        x, y = y, x
        h *= 2
    return x


def _srht(A, B, s, gen):
    """S·A and S·B for S = sqrt(M/s)·P·(H/√M)·D on [A B] zero-padded to M = 2^⌈log2 m⌉ rows."""
    m, n = A.shape
    M = 1 << max(0, (m - 1).bit_length())
    sign = torch.randint(2, (m,), generator=gen, device=A.device).to(F64) * 2 - 1
    AB = A.new_zeros(M, n + B.shape[1])
    torch.mul(A, sign[:, None], out=AB[:m, :n])
    torch.mul(B, sign[:, None], out=AB[:m, n:])
    rows = torch.randperm(M, generator=gen, device=A.device)[:s]
    SAB = fwht(AB)[rows] / math.sqrt(s)          # sqrt(M/s) · (1/√M)
    return SAB[:, :n], SAB[:, n:]


# ----------------------------------------------------------------------------- solver

def sketch_qr(A, B, *, sketch="countsketch", oversample=4, seed=0):
    """Q, R = qr(S·A) and S·B for the sketch the solver uses; also (kind, s) actually used.

    A (m × n) and B (m × k) in float64. s = ⌈oversample·n⌉; if m ≤ s the sketch is the
    identity (kind "identity", s = m). Raises ValueError if A or B is not finite, or if R is
    singular to working precision.
    """
    if sketch not in ("countsketch", "srht"):
        raise ValueError(f"sketch must be 'countsketch' or 'srht', got {sketch!r}")
    if not oversample >= 1:
        raise ValueError(f"oversample must be ≥ 1, got {oversample}")
    m, n = A.shape
    s = int(math.ceil(oversample * n))
    if m <= s:
        SA, SB, s, sketch = A, B, m, "identity"
    else:
        gen = torch.Generator(device=A.device).manual_seed(seed)
        SA, SB = (_countsketch if sketch == "countsketch" else _srht)(A, B, s, gen)
    if not (bool(torch.isfinite(SA).all()) and bool(torch.isfinite(SB).all())):   # a NaN/inf anywhere reaches S·A, S·B
        raise ValueError("A and B must be finite (found NaN or inf)")
    Q, R = torch.linalg.qr(SA)
    d = R.diagonal().abs()
    if not bool(d.min() > n * torch.finfo(F64).eps * d.max()):
        raise ValueError("A is rank deficient to working precision (the sketched R is singular); "
                         "use torch.linalg.lstsq(A, B, driver='gelsd') for rank-deficient problems")
    return Q, R, SB, sketch, s


def _residuals(A, B, X):
    """r = B − A X and Aᵀ r: two passes over A."""
    r = torch.addmm(B, A, X, beta=1, alpha=-1)
    return r, A.mT @ r


def _cholesky_start(A, R, B):
    """y0 = argmin ‖Ā y − B‖ by the normal equations of Ā = A R⁻¹, formed explicitly.

    Ā is well conditioned (κ(Ā) = O(1), see above), so ĀᵀĀ is too (κ², still O(1)) and a
    Cholesky solve of it is as accurate as a QR of Ā, at the cost of one triangular solve
    and one Gram product over A — both matrix–matrix work, unlike LSQR's passes. Returns
    (y0, ‖Ā‖_F), or None when the sketch was too poor for Cholesky (then LSQR does it all).
    """
    Abar = torch.linalg.solve_triangular(R, A, upper=True, left=False)
    L, bad = torch.linalg.cholesky_ex(Abar.mT @ Abar)
    if int(bad):
        return None
    return torch.cholesky_solve(Abar.mT @ B, L), torch.linalg.matrix_norm(Abar)


def sketch_precondition_lstsq(A, B, *, tol=1e-10, max_iter=None, sketch="countsketch", oversample=4, seed=0,
                              start="cholesky"):
    """X = argmin ‖A X − B‖_F for tall, full-column-rank A (m × n) and B (m × k or m).

    start: where LSQR starts on the preconditioned problem min ‖Ā y − b‖, Ā = A R⁻¹.
      "cholesky" (default): the normal equations of Ā solved directly (`_cholesky_start`);
        when that point already meets LSQR's stopping rules — the usual case — LSQR takes
        0 iterations, and the solve costs about two Gram-sized products over A.
      "sketch": the sketch-and-solve answer y0 = Qᵀ S b; LSQR then iterates (≈ 20–25
        iterations at tol = 1e-10 for s = 4n, whatever κ(A)).
    Returns (X, info), X in A's dtype (a vector if B is one). info: "iterations" (LSQR
    iterations per column), "converged" (per column: stopped by a rule before max_iter),
    "relative_residual" ‖AX − B‖_F/‖B‖_F, "normal_residual" max over columns of
    ‖Aᵀ(Ax − b)‖/(‖A‖_F ‖Ax − b‖) (0 for an exact column), "sketch", "sketch_size" s, "start".
    max_iter defaults to 100. If m ≤ s the sketch is the identity (R from the QR of A itself).
    """
    _check(A, B)
    if start not in ("cholesky", "sketch"):
        raise ValueError(f"start must be 'cholesky' or 'sketch', got {start!r}")
    max_iter = 100 if max_iter is None else max_iter
    A64 = A.to(F64)
    B64, vec = _as_2d(B.to(F64))
    Q, R, SB, sketch, s = sketch_qr(A64, B64, sketch=sketch, oversample=oversample, seed=seed)
    k = B64.shape[1]
    bnorm_cols = torch.linalg.vector_norm(B64, dim=0)

    direct = _cholesky_start(A64, R, B64) if start == "cholesky" else None
    if direct is not None:
        y, abar_norm = direct
        X = torch.linalg.solve_triangular(R, y, upper=True)
        r, atr = _residuals(A64, B64, X)
        rn = torch.linalg.vector_norm(r, dim=0)
        # LSQR's own stopping rules, on Ā: Āᵀ r = R⁻ᵀ Aᵀ r (an n × k solve)
        abar_tr = torch.linalg.vector_norm(torch.linalg.solve_triangular(R.mT, atr, upper=False), dim=0)
        done = (rn <= tol * bnorm_cols + tol * abar_norm * torch.linalg.vector_norm(y, dim=0)) | \
               (abar_tr <= tol * abar_norm * rn)
        iters, stopped = [0] * k, [True] * k
        todo = (~done).nonzero().flatten().tolist()
        if todo:                                        # refine the columns the rules did not accept
            y_t, it_t, st_t = _lsqr(A64, B64[:, todo], R, y[:, todo], tol, max_iter)
            y[:, todo] = y_t
            for j, it, st in zip(todo, it_t, st_t):
                iters[j], stopped[j] = it, st
            X = torch.linalg.solve_triangular(R, y, upper=True)
            r, atr = _residuals(A64, B64, X)
    else:
        y0 = Q.mT @ SB                       # sketch-and-solve start: x0 = R⁻¹ Qᵀ S b
        y, iters, stopped = _lsqr(A64, B64, R, y0, tol, max_iter)
        X = torch.linalg.solve_triangular(R, y, upper=True)
        r, atr = _residuals(A64, B64, X)
        start = "sketch"

    rn = torch.linalg.vector_norm(r, dim=0)
    arn = torch.linalg.vector_norm(atr, dim=0)
    anorm = torch.linalg.matrix_norm(A64)
    bnorm = torch.linalg.matrix_norm(B64)
    normal = torch.where(rn > 0, arn / (anorm * torch.where(rn > 0, rn, 1.0)), 0.0)
    info = {
        "iterations": iters,
        "converged": stopped,
        "relative_residual": float(rn.norm() / bnorm) if bnorm > 0 else 0.0,
        "normal_residual": float(normal.max()),
        "sketch": sketch,
        "sketch_size": s,
        "start": start,
    }
    return (X[:, 0] if vec else X).to(A.dtype), info
