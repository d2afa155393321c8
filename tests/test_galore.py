"""owlore_ds.galore against galore_torch.GaLoreAdamW 1.0, plus resume and numerics."""

import io
import logging
import pickle

import pytest
import torch
from galore_torch import GaLoreAdamW
from galore_torch.galore_projector import GaLoreProjector

from owlore_ds.galore import (
    ProjectorError,
    compute_projector,
    galore_adamw_step,
    optimizer_state_bytes_for_shape,
    project,
    project_back,
    state_bytes,
)

PROJ_TYPES = ["std", "reverse_std", "left", "right"]
SHAPES = [(48, 32), (32, 48), (40, 40)]
HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
GALORE = dict(update_proj_gap=3, scale=0.25)


def grads(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def init_weight(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(123))


def run_ours(weight, seq, state, rank, proj_type, svd="exact"):
    for g in seq:
        galore_adamw_step(weight, g, state, rank=rank, proj_type=proj_type, svd=svd, **HP, **GALORE)


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_galore_torch(shape, rank, proj_type):
    seq = grads(shape, 10)  # gap 3: refreshes before steps 1, 4, 7, 10
    p = torch.nn.Parameter(init_weight(shape))
    ref = GaLoreAdamW(
        [{"params": [p], "rank": rank, "proj_type": proj_type, **GALORE}],
        no_deprecation_warning=True, **HP,
    )
    ours, state = init_weight(shape), {}
    proj_steps = []
    for g in seq:
        p.grad = g.clone()
        ref.step()
        galore_adamw_step(ours, g, state, rank=rank, proj_type=proj_type, **HP, **GALORE)
        proj_steps.append(state["proj_step"])

    assert proj_steps == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]
    ref_state = ref.state[p]
    assert state["step"] == ref_state["step"] == 10
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["projector"], ref_state["projector"].ortho_matrix, **tol)
    torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"], **tol)
    torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], **tol)
    torch.testing.assert_close(ours, p.detach(), **tol)
    # The update must be visible at all, or the comparison above proves little.
    assert (ours - init_weight(shape)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_projector_dtype_as_galore_torch(dtype, proj_type):
    grad = torch.randn(24, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = GaLoreProjector(4, proj_type=proj_type)
    ref_low = ref.project(grad, 0)
    proj = compute_projector(grad, 4, proj_type)
    assert proj.dtype == dtype
    assert torch.equal(proj, ref.ortho_matrix)
    assert torch.equal(project(grad, proj, proj_type), ref_low)
    assert torch.equal(project_back(ref_low, proj, proj_type), ref.project_back(ref_low))


def test_rank_above_min_dim_is_clamped():
    grad = torch.randn(6, 48)
    proj = compute_projector(grad, 8, "std")
    assert proj.shape == (6, 6)
    state, w = {}, torch.zeros(6, 48)
    galore_adamw_step(w, grad, state, rank=8, proj_type="std", **HP, **GALORE)
    assert state["exp_avg"].shape == (6, 48)


def test_reverse_std_wide_full_rank_projects_back():
    # galore-torch's project_back crashes here (P @ R with P 4x10, R 4x4).
    grad = torch.randn(4, 10)
    proj = compute_projector(grad, 4, "reverse_std")
    low = project(grad, proj, "reverse_std")
    torch.testing.assert_close(project_back(low, proj, "reverse_std"), grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_state_roundtrip_and_resume_bitwise(svd):
    shape, rank, proj_type = (48, 32), 8, "std"
    seq = grads(shape, 10, seed=7)
    full, full_state = init_weight(shape), {}
    run_ours(full, seq, full_state, rank, proj_type, svd)

    half, half_state = init_weight(shape), {}
    run_ours(half, seq[:5], half_state, rank, proj_type, svd)
    buf = io.BytesIO()
    torch.save({"weight": half, "state": half_state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["state"].keys() == half_state.keys()
    for k, v in half_state.items():
        assert torch.equal(torch.as_tensor(loaded["state"][k]), torch.as_tensor(v)), k
    resumed, resumed_state = loaded["weight"], loaded["state"]
    run_ours(resumed, seq[5:], resumed_state, rank, proj_type, svd)  # crosses refresh at 6, 9

    assert torch.equal(resumed, full)
    for k in ("projector", "exp_avg", "exp_avg_sq"):
        assert torch.equal(resumed_state[k], full_state[k]), k
    assert resumed_state["step"] == full_state["step"] == 10


def test_galore_torch_state_does_not_load_weights_only():
    # The reason this module exists; if galore-torch fixes it, revisit.
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = GaLoreAdamW([{"params": [p], "rank": 2, "proj_type": "std", **GALORE}],
                      no_deprecation_warning=True)
    p.grad = torch.randn(8, 6)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf, weights_only=True)


def low_rank_matrix(m, n, r, noise, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    s = torch.linspace(10.0, 5.0, r)
    return u @ torch.diag(s) @ v.T + noise * torch.randn(m, n, generator=g)


def basis_columns(proj, side_right):
    return proj.T if side_right else proj


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
def test_randomized_svd_finds_exact_subspace(shape, proj_type):
    rank = 8
    a = low_rank_matrix(*shape, rank, noise=1e-3, seed=3)
    exact = compute_projector(a, rank, proj_type)
    rand = compute_projector(a, rank, proj_type, svd="randomized",
                             generator=torch.Generator().manual_seed(11))
    assert rand.shape == exact.shape and rand.dtype == exact.dtype
    right = exact.shape[1] == shape[1] and exact.shape[0] == rank
    q_exact, q_rand = basis_columns(exact, right), basis_columns(rand, right)
    torch.testing.assert_close(q_rand.T @ q_rand, torch.eye(rank), rtol=0, atol=1e-5)
    cos_angles = torch.linalg.svdvals(q_exact.T @ q_rand)
    assert cos_angles.min() > 1 - 1e-6  # largest principal angle < ~1.4e-3 rad

    again = compute_projector(a, rank, proj_type, svd="randomized",
                              generator=torch.Generator().manual_seed(11))
    other = compute_projector(a, rank, proj_type, svd="randomized",
                              generator=torch.Generator().manual_seed(12))
    assert torch.equal(rand, again)
    assert not torch.equal(rand, other)


def exact_float64_projector(grad, rank, side):
    u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    return (vh[:rank] if side == "right" else u[:, :rank]).float()


@pytest.mark.parametrize("failure", ["raise", "nan"])
@pytest.mark.parametrize("proj_type, side", [("std", "right"), ("left", "left")])
def test_float64_retry(monkeypatch, failure, proj_type, side):
    real_svd = torch.linalg.svd
    dtypes = []

    def flaky_svd(a, *args, **kwargs):
        dtypes.append(a.dtype)
        if len(dtypes) == 1:
            if failure == "raise":
                raise torch.linalg.LinAlgError("injected: did not converge")
            u, s, vh = real_svd(a, *args, **kwargs)
            return torch.full_like(u, float("nan")), s, torch.full_like(vh, float("nan"))
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    grad = torch.randn(30, 20, generator=torch.Generator().manual_seed(5))
    proj = compute_projector(grad, 4, proj_type)
    assert dtypes == [torch.float32, torch.float64]
    assert proj.dtype == torch.float32
    assert torch.equal(proj, exact_float64_projector(grad, 4, side))


def test_projector_error_when_both_precisions_fail(monkeypatch):
    def broken_svd(a, *args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(torch.linalg, "svd", broken_svd)
    with pytest.raises(ProjectorError, match="float64"):
        compute_projector(torch.randn(8, 6), 2, "std")


def test_non_finite_gradient_raises():
    grad = torch.randn(8, 6)
    grad[2, 3] = float("nan")
    with pytest.raises(ProjectorError):
        compute_projector(grad, 2, "std")
    with pytest.raises(ProjectorError):
        compute_projector(grad, 2, "std", svd="randomized")


def test_step_failed_refresh_keeps_projector(caplog):
    shape = (12, 8)
    seq = grads(shape, 4)
    w, state = init_weight(shape), {}

    bad = torch.full(shape, float("nan"))
    w0 = w.clone()
    with pytest.raises(ProjectorError):  # no projector to fall back on yet
        galore_adamw_step(w, bad, state, rank=2, proj_type="std", **HP, **GALORE)
    assert state == {} and torch.equal(w, w0)

    run_ours(w, seq[:3], state, 2, "std")
    old = state["projector"].clone()
    refresh_grad = seq[3].clone()
    refresh_grad[0, 0] = float("inf")  # step 3 is a refresh step
    with caplog.at_level(logging.WARNING, logger="owlore_ds.galore"):
        galore_adamw_step(w, refresh_grad, state, rank=2, proj_type="std", **HP, **GALORE)
    assert "keeping the one from step 0" in caplog.text
    assert torch.equal(state["projector"], old)
    assert state["proj_step"] == 0 and state["step"] == 4


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape, rank", [((48, 32), 8), ((32, 48), 8), ((40, 40), 4), ((6, 48), 8)])
def test_state_bytes_model(shape, rank, proj_type):
    state = {}
    galore_adamw_step(torch.zeros(shape), torch.randn(shape), state,
                      rank=rank, proj_type=proj_type, **HP, **GALORE)
    assert state_bytes(state) == optimizer_state_bytes_for_shape(shape, rank, proj_type)
    # No tensor may pin a larger storage (e.g. a slice of the full U).
    held = sum(t.untyped_storage().nbytes() for t in state.values() if torch.is_tensor(t))
    assert held == state_bytes(state)

    half = {}
    galore_adamw_step(torch.zeros(shape, dtype=torch.bfloat16), torch.randn(shape), half,
                      rank=rank, proj_type=proj_type, **HP, **GALORE)
    assert state_bytes(half) == optimizer_state_bytes_for_shape(shape, rank, proj_type, 2)


@pytest.mark.parametrize("shape,proj_type", [((48, 32), "std"), ((32, 48), "std"), ((40, 40), "left")])
def test_canonical_signs_are_stable_under_sign_flips(shape, proj_type):
    """LAPACK may return -v for v; the canonical projector is the same either way."""
    from owlore_ds.galore import _canonical_signs, _side

    torch.manual_seed(3)
    grad = torch.randn(shape)
    projector = compute_projector(grad, 6, proj_type, canonical_signs=True)
    side = _side(shape, proj_type)
    vectors = projector if side == "right" else projector.mT
    assert (vectors.gather(1, vectors.abs().argmax(1, keepdim=True)) > 0).all()
    flips = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    flipped = projector * (flips[:, None] if side == "right" else flips[None, :])
    torch.testing.assert_close(_canonical_signs(flipped, side), projector)
    raw = compute_projector(grad, 6, proj_type)
    torch.testing.assert_close(raw.abs(), projector.abs())  # the same vectors, signs aside


def test_refresh_offset_staggers_refreshes():
    """Offset 0 is galore-torch's schedule (steps 0, T, 2T); offset k moves it to T-k, 2T-k."""
    torch.manual_seed(0)
    refreshes = {}
    for offset in (0, 2):
        param, state, steps = torch.randn(12, 10), {}, []
        for step in range(9):
            before = state.get("proj_step")
            galore_adamw_step(param, torch.randn(12, 10), state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.0, rank=4, update_proj_gap=4, scale=1.0, proj_type="std",
                              refresh_offset=offset)
            if state["proj_step"] != before:
                steps.append(step)
        refreshes[offset] = steps
    assert refreshes == {0: [0, 4, 8], 2: [0, 2, 6]}
