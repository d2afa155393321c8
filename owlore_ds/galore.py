"""GaLore (Zhao et al., 2024) update rule for one 2-D matrix, on plain tensors.

Reimplements galore_torch.GaLoreAdamW 1.0 (``AdamW`` + ``GaLoreProjector``)
as a functional core, because that optimizer

* cannot run under DeepSpeed ZeRO: it sees flattened 1-D partitions, while the
  projection needs the whole m x n gradient;
* keeps a Python ``GaLoreProjector`` object in its state, which
  ``torch.load(weights_only=True)`` (the default since torch 2.6) refuses.

Here the state is a dict of tensors and Python ints only:

    step        int            Adam steps taken by this matrix
    proj_step   int            value of ``step`` when ``projector`` was computed
    projector   P              right: r x n (Vh[:r]),  left: m x r (U[:, :r])
    exp_avg     M              right: m x r,           left: r x n   (shape of R)
    exp_avg_sq  V              same shape as exp_avg

With G the m x n gradient, one step is (paper, Alg. 2, plus AdamW):

    if step % T == 0:  U, S, Vh = svd(G);  P = Vh[:r]  or  U[:, :r]
    R = G P^T  (right)  or  P^T G  (left)
    step += 1
    M = b1 M + (1 - b1) R;   V = b2 V + (1 - b2) R^2
    W -= lr * sqrt(1 - b2^step) / (1 - b1^step) * alpha * back(M / (sqrt(V) + eps))
    W -= lr * wd * W                 (decoupled, on the already updated W)

with back(N) = N P (right) or P N (left). M and V are not rotated into the new
basis when P changes, as in galore-torch 1.0.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

__all__ = [
    "ProjectorError",
    "compute_projector",
    "project",
    "project_back",
    "galore_adamw_step",
    "state_bytes",
    "optimizer_state_bytes_for_shape",
]

logger = logging.getLogger(__name__)

PROJ_TYPES = ("std", "reverse_std", "left", "right")

# Halko, Martinsson & Tropp (2011): a few extra sample columns and power
# iterations make the range finder accurate even when the spectrum decays slowly.
OVERSAMPLE = 8
_POWER_ITERS = 2


class ProjectorError(RuntimeError):
    """The SVD of a gradient failed in float32 and in float64.

    Raised before any state is changed, so the caller can keep the previous
    projector (``galore_adamw_step`` does so when one exists) and log it.
    """


def _side(shape: tuple[int, ...] | torch.Size, proj_type: str) -> str:
    """Which side of an m x n gradient the projector acts on ("left"/"right").

    ``std`` projects the larger dimension away (keeps min(m, n) x r moments
    small); galore-torch breaks the tie m == n towards "right".
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    # galore-torch's "full" keeps two projectors; nobody in this project uses it.
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def _top_singular_vectors(
    matrix: Tensor, rank: int, side: str, omega: Tensor | None
) -> Tensor:
    if omega is None:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        # Randomized range finder: Q spans the range of A (A A^T)^q Omega.
        # Re-orthonormalising after every product keeps small singular
        # directions from being lost to rounding.
        q = torch.linalg.qr(matrix @ omega.to(matrix.dtype)).Q
        for _ in range(_POWER_ITERS):
            q = torch.linalg.qr(matrix.mT @ q).Q
            q = torch.linalg.qr(matrix @ q).Q
        ub, _, vh = torch.linalg.svd(q.mT @ matrix, full_matrices=False)
        u = q @ ub
    # clone: a slice would keep the whole U / Vh storage alive in the state.
    return (vh[:rank, :] if side == "right" else u[:, :rank]).clone()


def _canonical_signs(projector: Tensor, side: str) -> Tensor:
    """Flips each singular vector so that its largest-magnitude entry is positive.

    An SVD fixes singular vectors only up to sign, and LAPACK's choice flips with
    rounding-level changes of the input (another reduction order, another GPU).
    GaLore keeps its moments unrotated when the projector is refreshed, so a flipped
    vector flips the sign of that coordinate's old moment: without a canonical sign,
    the update after a refresh depends on arbitrary signs, not on the gradient.
    """
    vectors = projector if side == "right" else projector.mT  # one vector per row
    index = vectors.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(vectors.gather(1, index))
    signs[signs == 0] = 1
    vectors = vectors * signs
    return vectors if side == "right" else vectors.mT.contiguous()


def compute_projector(
    grad: Tensor,
    rank: int,
    proj_type: str,
    svd: str = "exact",
    generator: torch.Generator | None = None,
    canonical_signs: bool = False,
) -> Tensor:
    """Orthonormal projector from the top-``rank`` singular vectors of ``grad``.

    Same side, slice and dtype as galore-torch 1.0: right -> Vh[:rank] (r x n),
    left -> U[:, :rank] (m x r), with r = min(rank, m, n); the SVD runs in
    float32 and the result is cast back to ``grad.dtype``.  A float32 failure
    (LinAlgError or a non-finite result) is retried in float64.

    ``svd="randomized"`` draws its Gaussian test matrix from ``generator``
    (a CPU generator seeded with 0 when None, so the global RNG is untouched
    and the result is reproducible).

    ``canonical_signs`` fixes the sign of every singular vector (see
    `_canonical_signs`); off, the signs are LAPACK's, as in galore-torch.
    """
    if grad.dim() != 2:
        raise ValueError(f"GaLore needs a 2-D gradient, got shape {tuple(grad.shape)}")
    if svd not in ("exact", "randomized"):
        raise ValueError(f"svd must be 'exact' or 'randomized', got {svd!r}")
    side = _side(grad.shape, proj_type)
    # No precision can make a NaN/Inf gradient decomposable: fail fast.
    if not torch.isfinite(grad).all():
        raise ProjectorError("gradient has non-finite entries")

    omega = None
    if svd == "randomized":
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        m, n = grad.shape
        width = min(rank + OVERSAMPLE, m, n)
        # Drawn once, so the float64 retry samples the same subspace.
        omega = torch.randn(
            n, width, generator=generator, device=generator.device, dtype=torch.float32
        ).to(grad.device)

    errors = []
    for dtype in (torch.float32, torch.float64):
        try:
            proj = _top_singular_vectors(grad.to(dtype), rank, side, omega)
        except torch.linalg.LinAlgError as exc:
            errors.append(f"{dtype}: {exc}")
            continue
        if torch.isfinite(proj).all():
            if canonical_signs:
                proj = _canonical_signs(proj, side)
            return proj.to(grad.dtype)
        errors.append(f"{dtype}: non-finite singular vectors")
    raise ProjectorError(
        f"SVD of {tuple(grad.shape)} gradient failed: " + "; ".join(errors)
    )


def project(grad: Tensor, projector: Tensor, proj_type: str) -> Tensor:
    """R = G P^T (right) or P^T G (left); the side follows ``grad.shape``."""
    if _side(grad.shape, proj_type) == "right":
        return grad @ projector.t()
    return projector.t() @ grad


def project_back(low_rank: Tensor, projector: Tensor, proj_type: str) -> Tensor:
    """Inverse map of ``project`` (unscaled): N P (right) or P N (left).

    Only R and P are known here, so the side is read from R's shape as in
    galore-torch (``std``: right iff R.shape[0] >= R.shape[1], exact because
    r <= min(m, n)).  For ``reverse_std`` galore-torch's rule
    (left iff R.shape[0] <= R.shape[1]) crashes on a wide matrix with
    rank >= m; matching P's inner dimension instead agrees with it everywhere
    else and is right there too.
    """
    if proj_type == "std":
        right = low_rank.shape[0] >= low_rank.shape[1]
    elif proj_type == "reverse_std":
        right = projector.shape[1] != low_rank.shape[0]
    elif proj_type in ("left", "right"):
        right = proj_type == "right"
    else:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    return low_rank @ projector if right else projector @ low_rank


def galore_adamw_step(
    param: Tensor,
    grad: Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: str,
    svd: str = "exact",
    generator: torch.Generator | None = None,
    canonical_signs: bool = False,
    refresh_offset: int = 0,
) -> bool:
    """One GaLore-AdamW step on ``param`` in place, as galore_torch.GaLoreAdamW 1.0;
    returns whether the projector was computed anew.

    ``state`` starts as ``{}`` and is filled lazily.  The projector is
    refreshed when the matrix's own step count (read before it is incremented,
    so on calls 1, T+1, 2T+1, ...) is a multiple of ``update_proj_gap``.  That
    count is ``state["lifetime_step"]``, which a state reduced to its projector
    (a layer that left the active set and came back) keeps while ``step``, the
    moments' bias-correction count, starts again; otherwise the two agree.  If a
    refresh fails and a projector exists, the old one is kept and a warning
    logged; if none exists, ``ProjectorError`` propagates with ``state`` and
    ``param`` untouched.  For ``svd="randomized"`` without a generator, the
    sketch is seeded with the step so a resumed run draws the same one.
    """
    beta1, beta2 = betas
    # galore-torch works in p.grad's dtype, which autograd makes p's dtype;
    # with an fp32 master ``param`` this keeps projector and moments in fp32.
    grad = grad.to(param.dtype)
    step = int(state.get("step", 0))
    lifetime = int(state.get("lifetime_step", step))

    projector = state.get("projector")
    refreshed = False
    # refresh_offset > 0 moves this matrix's refreshes to steps T-offset, 2T-offset, ...
    # so that not every matrix runs its SVD at the same step (galore-torch: offset 0).
    if projector is None or (lifetime + refresh_offset) % update_proj_gap == 0:
        if svd == "randomized" and generator is None:
            generator = torch.Generator().manual_seed(lifetime)
        try:
            projector = compute_projector(grad, rank, proj_type, svd, generator, canonical_signs)
        except ProjectorError as exc:
            if projector is None:
                raise
            logger.warning(
                "GaLore projector refresh at step %d failed, keeping the one from "
                "step %d: %s", lifetime, state["proj_step"], exc,
            )
        else:
            state["projector"] = projector
            state["proj_step"] = lifetime
            refreshed = True

    low_rank = project(grad, projector, proj_type)
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(low_rank)
        state["exp_avg_sq"] = torch.zeros_like(low_rank)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

    step += 1
    state["step"] = step
    state["lifetime_step"] = lifetime + 1

    exp_avg.mul_(beta1).add_(low_rank, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low_rank, low_rank, value=1.0 - beta2)
    # eps goes outside the sqrt of the *uncorrected* V; the bias corrections
    # are folded into the scalar step size instead (galore-torch / HF AdamW).
    denom = exp_avg_sq.sqrt().add_(eps)
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)

    norm_grad = project_back(exp_avg / denom, projector, proj_type) * scale
    param.add_(norm_grad, alpha=-step_size)
    # Decoupled decay on the already updated weights, with the plain lr.
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)
    return refreshed


def state_bytes(state: dict) -> int:
    """Bytes held by the tensors of one matrix's state."""
    return sum(
        t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor)
    )


def optimizer_state_bytes_for_shape(
    shape: tuple[int, int] | torch.Size, rank: int, proj_type: str, dtype_bytes: int = 4
) -> int:
    """Bytes of the state ``galore_adamw_step`` keeps for an m x n matrix.

    Two moments of R's shape plus the projector; r is clamped to min(m, n)
    as the SVD slice is.
    """
    m, n = shape
    r = min(rank, m, n)
    if _side(shape, proj_type) == "right":
        moment, projector = m * r, r * n
    else:
        moment, projector = r * n, m * r
    return dtype_bytes * (2 * moment + projector)
