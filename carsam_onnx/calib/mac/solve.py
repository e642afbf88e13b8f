"""MatMul-Aware Compensation (MAC, CAR-SAM): closed-form weight corrections that move one attention
operand's quantization error into the other operand's projection. Pure math on torch tensors (float64
inside); the rest of calib/mac/ applies it to the attention sites of a graph.

Q.K^T (per head; the same code serves W_K with the roles of Q and K swapped)
----------------------------------------------------------------------------
Per sample s: X_s [N, p] the projection input as the quantized model sees it, augmented with a column of
ones (so the last row of W is the bias), W [p, d] the head's float weight columns, O_s [M, d] the other
operand as the QK MatMul sees it (quantized), T_s [N, M] the FP scores. Minimise

    f(D) = sum_s ||T_s - X_s (W + D) O_s^T||_F^2 + lam ||D||_F^2.

The gradient is -2 sum_s X_s^T (T_s - X_s (W + D) O_s^T) O_s + 2 lam D, so the minimiser solves

    sum_s G_s D B_s + lam D = C,   G_s = X_s^T X_s,  B_s = O_s^T O_s,  C = sum_s X_s^T (T_s - X_s W O_s^T) O_s.

With one sample (or one G shared by all samples, or one B) this is the Sylvester equation
G D B + lam D = C; multiplied by G^-1 (when it exists) it is the paper's form A D + D B = C~ with
A = lam G^-1 and C~ = G^-1 C. When T = X W K^T (the target computed from the same X) and O = K^ = K + dK,
C = -G W dK^T K^: the sign in RESEARCH.md, checked numerically by tests/calib/test_mac.py.
With G = U diag(s) U^T and B = V diag(t) V^T (eigh; both PSD), D = U [(U^T C V) / (s_i t_j + lam)] V^T,
element-wise; G is never inverted, so a rank-deficient G (few prompt tokens) is fine for lam > 0, and as
lam -> 0 D tends to the minimum-norm least-squares solution.

Several samples: two solves.
- "factored": every query of every sample against every key of every sample (the cross pairs get the FP
  target Q_s K_t^T too). Its normal equations are exactly G D B + lam D = C with G = sum_s G_s,
  B = sum_t B_t and C = (sum_s X_s^T P_s)(sum_t R_t^T O_t) - G W B for targets T_s = P_s R_s^T: the
  Sylvester form above, one eigendecomposition of G for all heads. It needs no token correspondence
  between X and O, so it also serves windowed encoder attention.
- "exact": the per-sample normal equations, solved by conjugate gradients on D -> sum_s G_s D B_s + lam D
  (applied through X_s and O_s, never forming G_s (x) B_s), preconditioned by the factored operator
  (sum_s G_s) D (sum_t B_t) / S + lam D, which is exact when all samples share B or G.

Targets are passed as factors T_s = P_s R_s^T (P_s [N, r], R_s [M, r]; Q K^T: P = Q, R = K), so both
solves work from per-sample factors and the factored one from sums.

attn.V (per head)
-----------------
minimise sum_s ||A_s V_s - Ah_s X_s (W + D)||^2 + lam ||D||^2 with A, Ah the FP and quantized
probabilities, V the FP values, X the v projection's (augmented) input: with Z_s = Ah_s X_s the ridge
solution D = (sum Z^T Z + lam I)^-1 sum Z^T (A V - Z W), solved through eigh(sum Z^T Z) (exact: the
V problem has no Kronecker structure to factor).

Regularisation: `lam_rel` r sets lam = r * mean eigenvalue of the operator: r * tr(G) tr(B) / (p d) for
Q.K^T (factored operator; per head), r * tr(Z^T Z) / p for attn.V.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPE = torch.float64


def augment(x: torch.Tensor) -> torch.Tensor:
    """[..., n, p] -> [..., n, p + 1]: a column of ones appended (the bias row of an augmented weight)."""
    x = x.to(DTYPE)
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=DTYPE, device=x.device)], dim=-1)


def augmented_weight(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """[p, out] weight and [out] bias (or None: zeros) -> [p + 1, out]."""
    w = w.to(DTYPE)
    row = torch.zeros(1, w.shape[1], dtype=DTYPE, device=w.device) if b is None else b.to(DTYPE).reshape(1, -1)
    return torch.cat([w, row], dim=0)


def _eigh_psd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = 0.5 * (m + m.transpose(-1, -2))
    s, u = torch.linalg.eigh(m)
    return s.clamp_min(0.0), u


def _null_mask(s: torch.Tensor) -> torch.Tensor:
    """Eigenvalues that are zero to rounding (relative to the largest, per leading index)."""
    return s <= s.amax(-1, keepdim=True) * s.shape[-1] * torch.finfo(DTYPE).eps * 16


def solve_sylvester(G: torch.Tensor, B: torch.Tensor, C: torch.Tensor, lam: float | torch.Tensor,
                    eig_g: tuple[torch.Tensor, torch.Tensor] | None = None, range_only: bool = False
                    ) -> torch.Tensor:
    """D with G D B + lam D = C, for symmetric PSD G [p, p] and B [..., d, d] (a leading head axis is
    broadcast), C [..., p, d], lam > 0 (a scalar or one per head, shape [...]). Never inverts G.

    range_only: C is known to lie in range(G) x range(B) (true of every MAC right side: C = X^T (..) O), so
    its components along numerically-null eigenvectors are rounding noise and are dropped; without this,
    that noise is divided by lam and grows as lam -> 0."""
    s, u = eig_g if eig_g is not None else _eigh_psd(G.to(DTYPE))
    t, v = _eigh_psd(B.to(DTYPE))
    lam = torch.as_tensor(lam, dtype=DTYPE, device=C.device)
    if lam.dim():
        lam = lam.reshape(*lam.shape, 1, 1)
    if torch.any(lam <= 0):
        raise ValueError("MAC needs lam > 0 (G can be singular)")
    rhs = u.transpose(-1, -2) @ C.to(DTYPE) @ v
    if range_only:
        rhs = rhs.masked_fill(_null_mask(s)[..., :, None] | _null_mask(t)[..., None, :], 0.0)
    y = rhs / (s[..., :, None] * t[..., None, :] + lam)
    return u @ y @ v.transpose(-1, -2)


def ridge(ZtZ: torch.Tensor, ZtR: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """(ZtZ + lam I)^-1 ZtR through eigh (ZtZ [..., p, p] PSD, ZtR [..., p, d] in range(ZtZ), lam > 0 per
    leading index); components along numerically-null eigenvectors are dropped (see solve_sylvester)."""
    s, u = _eigh_psd(ZtZ.to(DTYPE))
    lam = torch.as_tensor(lam, dtype=DTYPE, device=ZtR.device)
    if lam.dim():
        lam = lam.reshape(*lam.shape, 1)
    if torch.any(lam <= 0):
        raise ValueError("MAC needs lam > 0")
    rhs = (u.transpose(-1, -2) @ ZtR.to(DTYPE)).masked_fill(_null_mask(s)[..., :, None], 0.0)
    return u @ (rhs / (s + lam)[..., :, None])


@dataclass
class QKStats:
    """Normal-equation terms of the Q.K^T problem for all heads of one projection, summed over samples.

    add(x, p, r, o): x [N, p] augmented input (shared by the heads), p [H, N, r], r [H, M, r] the target
    factors (T_h = p_h r_h^T), o [H, M, d] the other operand as quantized. keep_samples=True also keeps the
    per-sample tensors for the exact solve.
    """

    keep_samples: bool = False
    G: torch.Tensor | None = None       # [p, p]
    B: torch.Tensor | None = None       # [H, d, d]
    XP: torch.Tensor | None = None      # [H, p, r]
    RO: torch.Tensor | None = None      # [H, r, d]
    XTO: torch.Tensor | None = None     # [H, p, d]  sum_s X_s^T T_s O_s (exact right side)
    trGB: torch.Tensor | None = None    # [H]  sum_s tr(G_s) tr(B_s,h) (scale of the exact operator)
    count: int = 0
    samples: list = field(default_factory=list)

    def add(self, x: torch.Tensor, p: torch.Tensor, r: torch.Tensor, o: torch.Tensor) -> None:
        x, p, r, o = (t.to(DTYPE) for t in (x, p, r, o))
        if x.dim() != 2 or p.dim() != 3 or r.dim() != 3 or o.dim() != 3:
            raise ValueError("QKStats.add: x [N, p], p [H, N, r], r [H, M, r], o [H, M, d]")
        terms = {"G": x.T @ x, "B": o.transpose(1, 2) @ o, "XP": x.T @ p, "RO": r.transpose(1, 2) @ o}
        terms["trGB"] = torch.trace(terms["G"]) * torch.diagonal(terms["B"], dim1=-2, dim2=-1).sum(-1)
        if self.keep_samples:
            terms["XTO"] = (x.T @ p) @ (r.transpose(1, 2) @ o)
            self.samples.append((x, o))
        for k, v in terms.items():
            cur = getattr(self, k)
            setattr(self, k, v if cur is None else cur + v)
        self.count += 1

    def lam(self, lam_rel: float, method: str = "factored") -> torch.Tensor:
        """lam per head: lam_rel * the mean eigenvalue of the solve's operator, tr(G) tr(B_h) / (p d) for
        the factored one (G, B summed over samples), sum_s tr(G_s) tr(B_s,h) / (p d) for the exact one."""
        p, d = self.G.shape[0], self.B.shape[-1]
        if method == "exact":
            scale = self.trGB
        else:
            scale = torch.trace(self.G) * torch.diagonal(self.B, dim1=-2, dim2=-1).sum(-1)
        return (lam_rel * scale / (p * d)).clamp_min(torch.finfo(DTYPE).tiny)


def solve_qk(stats: QKStats, W: torch.Tensor, lam: torch.Tensor | float, method: str = "factored",
             tol: float = 1e-10, max_iter: int = 500) -> torch.Tensor:
    """dW [H, p, d] for the head weights W [H, p, d] (see the module docstring)."""
    W = W.to(DTYPE)
    eig_g = _eigh_psd(stats.G)
    C = stats.XP @ stats.RO - stats.G @ W @ stats.B           # factored right side
    if method == "factored":
        return solve_sylvester(stats.G, stats.B, C, lam, eig_g, range_only=True)
    if method != "exact":
        raise ValueError(f"unknown MAC solve {method!r}")
    if not stats.keep_samples:
        raise ValueError("the exact solve needs QKStats(keep_samples=True)")
    lam_t = torch.as_tensor(lam, dtype=DTYPE).reshape(-1, 1, 1) if torch.as_tensor(lam).dim() else lam

    def op(D):
        out = lam_t * D
        for x, o in stats.samples:
            out = out + x.T @ ((x @ D) @ o.transpose(1, 2)) @ o
        return out

    rhs = stats.XTO - sum(x.T @ ((x @ W) @ o.transpose(1, 2)) @ o for x, o in stats.samples)
    b_mean = stats.B / stats.count

    def precond(R):
        return solve_sylvester(stats.G, b_mean, R, lam, eig_g, range_only=True)

    return pcg(op, rhs, precond, tol, max_iter)


def pcg(op, b: torch.Tensor, precond, tol: float = 1e-10, max_iter: int = 500) -> torch.Tensor:
    """Preconditioned conjugate gradients for a symmetric positive definite op on tensors; heads (the
    leading axis) are independent systems, each with its own step sizes."""
    dims = tuple(range(1, b.dim()))

    def dot(a, c):
        return (a * c).sum(dims, keepdim=True)

    x = precond(b)
    r = b - op(x)
    z = precond(r)
    p = z
    rz = dot(r, z)
    bnorm = b.flatten(1).norm(dim=1).clamp_min(torch.finfo(DTYPE).tiny)
    for _ in range(max_iter):
        if torch.all(r.flatten(1).norm(dim=1) <= tol * bnorm):
            break
        ap = op(p)
        pap = dot(p, ap)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(torch.finfo(DTYPE).tiny), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        z = precond(r)
        rz_new = dot(r, z)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(torch.finfo(DTYPE).tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return x


@dataclass
class VStats:
    """Normal-equation terms of the attn.V problem, per head, summed over samples.

    add(x, a, ah, v): x [N_k, p] augmented v-projection input, a / ah [H, N_q, N_k] FP / quantized
    probabilities, v [H, N_k, d] FP values (target A V)."""

    ZtZ: torch.Tensor | None = None   # [H, p, p]
    ZtT: torch.Tensor | None = None   # [H, p, d]
    count: int = 0

    def add(self, x: torch.Tensor, a: torch.Tensor, ah: torch.Tensor, v: torch.Tensor) -> None:
        x, a, ah, v = (t.to(DTYPE) for t in (x, a, ah, v))
        z = ah @ x                                           # [H, N_q, p]
        ztz, ztt = z.transpose(1, 2) @ z, z.transpose(1, 2) @ (a @ v)
        self.ZtZ = ztz if self.ZtZ is None else self.ZtZ + ztz
        self.ZtT = ztt if self.ZtT is None else self.ZtT + ztt
        self.count += 1

    def lam(self, lam_rel: float) -> torch.Tensor:
        p = self.ZtZ.shape[-1]
        return (lam_rel * torch.diagonal(self.ZtZ, dim1=-2, dim2=-1).sum(-1) / p).clamp_min(torch.finfo(DTYPE).tiny)


def solve_v(stats: VStats, W: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """dW_V [H, p, d] for the head weights W [H, p, d]: the ridge solution."""
    W = W.to(DTYPE)
    return ridge(stats.ZtZ, stats.ZtT - stats.ZtZ @ W, lam)


def heads_of(w_aug: torch.Tensor, cols: list[torch.Tensor]) -> torch.Tensor:
    """[p, out] augmented weight -> [H, p, d]: head h's columns cols[h] (SAM: h*d .. (h+1)*d - 1 of its slice
    of the projection output; the encoder's fused qkv adds the q / k / v offset 0, C, 2C)."""
    return torch.stack([w_aug[:, c] for c in cols])


def head_columns(heads: int, head_dim: int, offset: int = 0) -> list[torch.Tensor]:
    """Projection-output columns of each head, as SAM's attention reshapes [.., heads * head_dim] to
    [.., heads, head_dim]; `offset` selects q / k / v in a fused qkv output (0, C, 2C with C = heads * head_dim)."""
    return [torch.arange(offset + h * head_dim, offset + (h + 1) * head_dim) for h in range(heads)]


def scatter_heads(w_aug: torch.Tensor, cols: list[torch.Tensor], dw: torch.Tensor) -> torch.Tensor:
    """w_aug with dw[h] added to head h's columns (returns a new tensor)."""
    out = w_aug.to(DTYPE).clone()
    for c, d in zip(cols, dw):
        out[:, c] += d
    return out
