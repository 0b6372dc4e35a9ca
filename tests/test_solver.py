"""solver.py: parity with diffusers' schedulers, the authors' grid facts, and ODE/phase invariants."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import model
import solver

FEW = settings(max_examples=40, deadline=None)


def toy_model(x, t):
    """A smooth nonlinear stand-in for a denoiser: depends on x and t, float32 or float64 in and out."""
    tt = (t.to(x.dtype) / 1000).view(-1, *([1] * (x.dim() - 1)))  # [B] -> [B, 1, 1, 1, 1]
    return torch.tanh(x) * torch.cos(3 * tt) + 0.3 * x * tt - 0.2 * torch.sin(2 * x + tt)


def cogvideox_scheduler(snr_shift_scale):
    from diffusers import CogVideoXDDIMScheduler
    # the settings of THUDM/CogVideoX-{2b,5b} scheduler/scheduler_config.json
    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
        timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=snr_shift_scale)


# ----------------------------------------------------------------------------- flow vs diffusers

@pytest.mark.parametrize("n,shift", [(50, 7.0), (4, 17.0), (1, 7.0)])
def test_flow_sigmas_match_diffusers(n, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1])
    ours = solver.flow_sigmas(n, shift)
    assert ours.dtype == torch.float64 and ours.shape == (n + 1,) and ours[-1] == 0
    # diffusers works in float32
    assert (ours - sch.sigmas.double()).abs().max() < 1e-6
    assert torch.allclose(1000 * ours[:-1], sch.timesteps.double(), rtol=1e-6, atol=0)  # float32 ulps


@pytest.mark.parametrize("shift,wan", [(7.0, False), (17.0, True)], ids=["shift7", "wan-grid"])
def test_flow_euler_50_steps_match_diffusers(shift, wan):
    """wan-grid: the Wan teacher's 50 steps on solver.grid_for(WanConfig) (shift 17) down to sigma 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, 51)[:-1])
    x = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = x.clone()
    for t in sch.timesteps:
        ref = sch.step(toy_model(ref, t.expand(2)), t, ref).prev_sample
    if wan:
        t, alpha, s = solver.sample_points(solver.grid_for(model.PRESETS["wan2.1-t2v-1.3b"]), range(49, -1, -1))
        assert torch.allclose(s, solver.flow_sigmas(50, 17.0))  # the same points as the sampling sigmas
    else:
        s = solver.flow_sigmas(50, shift)
        t, alpha = 1000 * s, 1 - s
    seen = []
    ours = solver.sample(toy_model, x, t, alpha, s, "flow",
                         callback=lambda i, xi, x0: seen.append(i), progress=False)
    assert seen == list(range(50))
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 1e-6, (ours - ref).abs().max()
    assert (ours - x).abs().max() > 0.1  # the trajectory moved


# ----------------------------------------------------------------------------- DDIM vs diffusers

@pytest.mark.parametrize("s", [3.0, 1.0])
def test_cogvideox_alphas_cumprod_match_diffusers(s):
    ours = solver.cogvideox_alphas_cumprod(s)
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert (ours - cogvideox_scheduler(s).alphas_cumprod).abs().max() < 1e-12
    assert ours[-1] == 0  # zero terminal SNR
    assert bool((ours[1:] < ours[:-1]).all())


def test_cogvideox_reference_values():
    abar = solver.cogvideox_alphas_cumprod(3.0)
    assert abs(float(abar[0]) - 0.99745) < 5e-6
    assert abs(float(abar[499]) - 0.09597) < 5e-6


@pytest.mark.parametrize("n", [1, 3, 7, 16, 30, 50, 999, 1000])
def test_ddim_timesteps_match_diffusers(n):
    sch = cogvideox_scheduler(3.0)
    sch.set_timesteps(n)
    ours = solver.ddim_timesteps(n)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, sch.timesteps)


def test_ddim_timesteps_50():
    assert solver.ddim_timesteps(50).tolist() == list(range(999, 0, -20))


@pytest.mark.parametrize("s", [3.0, 1.0])
# float32: diffusers evaluates the algebraically equal a_t*x + b_t*x0 form in float32 (measured 2.4e-6)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_ddim_50_steps_match_diffusers(s, dtype, tol):
    sch = cogvideox_scheduler(s)
    sch.set_timesteps(50)
    x = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref = x.clone()
    for t in sch.timesteps:
        ref = sch.step(toy_model(ref, t.expand(2)), t, ref).prev_sample
    g = solver.cogvideox_grid(50, s)
    t, a, sg = solver.sample_points(g, range(49, -1, -1))
    ours = solver.sample(toy_model, x, t, a, sg, "vpred", progress=False)
    assert ours.dtype == dtype
    assert (ours - ref).abs().max() < tol, (ours - ref).abs().max()
    assert (ours - x).abs().max() > 0.1


def test_cogvideox_grid_layout():
    g = solver.cogvideox_grid(50, 3.0)
    abar = solver.cogvideox_alphas_cumprod(3.0)
    assert g.kind == "vpred" and g.N == 50
    assert g.t[1:].long().tolist() == solver.ddim_timesteps(50).flip(0).tolist()
    t, a, s = g.at(49)
    assert t == 999 and a == 0 and s == 1  # pure noise
    t, a, s = g.at(-1)
    assert t == 0 and a == 1 and s == 0  # clean end, abar = 1
    t, a, s = g.at(0)
    assert t == 19 and abs(float(a) ** 2 - float(abar[19])) < 1e-15
    assert torch.allclose(g.alpha ** 2 + g.sigma ** 2, torch.ones(51, dtype=torch.float64))


# ----------------------------------------------------------------------------- the authors' grid

def test_flow_grid_authors_facts():
    g = solver.flow_grid(50, 17.0, 0.001)
    assert g.kind == "flow" and g.N == 50
    assert abs(float(g.at(49)[2]) - 1.0) < 1e-15
    assert abs(float(g.at(37)[2]) - 0.98176) < 5e-6  # semantic endpoint, kappa = 37
    assert abs(float(g.at(-1)[2]) - 0.01673) < 5e-6  # detail endpoint sigma'(0.001)
    # grid indices 0..49 are the sampling sigmas, reversed
    assert torch.allclose(g.sigma[1:], solver.flow_sigmas(50, 17.0)[:-1].flip(0), atol=0, rtol=1e-15)
    assert torch.allclose(g.alpha, 1 - g.sigma)
    assert (g.t - 1000 * g.sigma).abs().max() < 1e-4  # t is 1000*sigma, rounded to float32
    assert torch.equal(g.t.float().double(), g.t)
    assert float(solver.flow_grid(50, 17.0, eps=None).at(-1)[2]) == 0


def test_authors_four_step_sigmas():
    g = solver.flow_grid(50, 17.0)
    ks = solver.student_schedule(g, [37], 4)
    assert ks == [49, 43, 37, 18]
    t, a, s = solver.sample_points(g, ks)
    assert [round(float(v), 4) for v in s] == [1.0, 0.9920, 0.9818, 0.9124, 0.0]
    assert float(a[-1]) == 1 and float(t[-1]) == 0
    # "grid" end keeps the distillation endpoint
    assert abs(float(solver.sample_points(g, ks, end="grid")[2][-1]) - 0.01673) < 5e-6


def test_student_schedule_uneven_and_one_step():
    g = solver.flow_grid(50, 17.0)
    assert solver.student_schedule(g, [37], 1) == [49]  # one jump to the clean end, semantic expert
    assert solver.student_schedule(g, [37], 2) == [49, 37]
    assert solver.student_schedule(g, [37], 3) == [49, 43, 37]  # the extra step goes to the semantic phase
    assert solver.student_schedule(g, [], 4) == [49, 37, 24, 12]
    with pytest.raises(ValueError, match="do not fit"):
        solver.student_schedule(g, [37], 26)
    with pytest.raises(ValueError, match="steps >= 1"):
        solver.student_schedule(g, [37], 0)


def test_boundary_t_routes_grid_points_in_any_precision():
    g = solver.flow_grid(50, 17.0)
    b = solver.boundary_t(g, 37)
    t = g.at(torch.arange(50))[0]
    for dtype in (torch.float64, torch.float32):
        detail = (t.to(dtype).double() <= b).nonzero().flatten().tolist()
        assert detail == list(range(38))
    assert solver.boundary_t(solver.cogvideox_grid(50), 37) == 759
    with pytest.raises(ValueError, match="kappa"):
        solver.boundary_t(g, 49)


class CogVideoXConfig:  # duck-typed stand-ins: grid_for looks at the class name only
    def __init__(self, rope):
        self.use_rotary_positional_embeddings = rope


class HunyuanVideoConfig:
    pass


def test_grid_for():
    assert torch.equal(solver.grid_for(HunyuanVideoConfig()).sigma, solver.flow_grid(50, 17.0, 0.001).sigma)
    assert torch.equal(solver.grid_for(CogVideoXConfig(False)).alpha, solver.cogvideox_grid(50, 3.0).alpha)
    assert torch.equal(solver.grid_for(CogVideoXConfig(True)).alpha, solver.cogvideox_grid(50, 1.0).alpha)
    assert torch.equal(solver.grid_for(CogVideoXConfig(True), snr_shift_scale=3.0).alpha,
                       solver.cogvideox_grid(50, 3.0).alpha)
    d = {"_class_name": "CogVideoXTransformer3DModel", "use_rotary_positional_embeddings": True}
    assert torch.equal(solver.grid_for(d, n=10).alpha, solver.cogvideox_grid(10, 1.0).alpha)
    with pytest.raises(ValueError, match="unknown model config"):
        solver.grid_for(object())


def test_grid_for_model_presets():
    import model
    for name, s in [("cogvideox-2b", 3.0), ("cogvideox-5b", 1.0), ("tiny-cogvideox", 3.0),
                    ("tiny-cogvideox-rope", 1.0)]:
        assert torch.equal(solver.grid_for(model.PRESETS[name]).alpha, solver.cogvideox_grid(50, s).alpha)
    for name in ("hunyuan-video", "tiny-hunyuan"):
        assert solver.grid_for(model.PRESETS[name]).kind == "flow"


def test_grid_at_and_errors():
    g = solver.flow_grid(10, 7.0)
    k = torch.tensor([9, 0, -1, 4])
    t, a, s = g.at(k)
    assert t.shape == (4,) and t.dtype == torch.float64
    for i, ki in enumerate(k.tolist()):
        assert (t[i], a[i], s[i]) == tuple(g.at(ki))
    for bad in (10, -2, torch.tensor([0, 10])):
        with pytest.raises(ValueError, match="out of range"):
            g.at(bad)
    with pytest.raises(ValueError, match="integer tensor"):
        g.at(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="kind"):
        solver.Grid("eps", 1, g.t[:2], g.alpha[:2], g.sigma[:2])
    with pytest.raises(ValueError, match="increase"):
        solver.Grid("flow", 1, g.t[:2].flip(0), g.alpha[:2].flip(0), g.sigma[:2].flip(0))
    with pytest.raises(ValueError, match="kind"):
        solver.to_x0_eps(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "edm")
    with pytest.raises(ValueError, match="shape"):
        solver.jump(torch.zeros(2, 3), torch.zeros(2, 4), 1, 0, g)


# ----------------------------------------------------------------------------- ODE invariants

grids = st.one_of(
    st.builds(solver.flow_grid, st.integers(1, 60), st.floats(1.0, 20.0), st.sampled_from([None, 0.0, 0.001])),
    st.builds(solver.cogvideox_grid, st.integers(1, 60), st.sampled_from([1.0, 3.0])))


@FEW
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12), st.integers(0, 2 ** 31 - 1))
def test_straight_flow_integrated_exactly(sigmas, seed):
    """x_s = s*eps + (1-s)*x0 has the constant velocity eps - x0: Euler is exact on any sigma sequence."""
    gen = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 3, 2, 2, 2, generator=gen, dtype=torch.float64).unbind(0)
    x0, eps = x0[None], eps[None]  # [1, 3, 2, 2, 2]
    s = torch.tensor(sigmas, dtype=torch.float64)
    x = s[0] * eps + (1 - s[0]) * x0
    out = solver.sample(lambda x, t: eps - x0, x, 1000 * s, 1 - s, s, "flow", progress=False)
    assert (out - (s[-1] * eps + (1 - s[-1]) * x0)).abs().max() < 1e-12


@FEW
@given(st.lists(st.floats(0.0, 0.999), min_size=1, max_size=12, unique=True), st.integers(0, 2 ** 31 - 1))
def test_ddim_with_exact_x0_lands_on_x0(abars, seed):
    """v from the true x0 (any abar schedule, incl. abar = 0): every DDIM step lands on alpha*x0 + sigma*eps."""
    gen = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 1, 3, 2, 2, 2, generator=gen, dtype=torch.float64).unbind(0)
    abar = torch.tensor(sorted(abars) + [1.0], dtype=torch.float64)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x = a[0] * x0 + s[0] * eps
    seen = []

    def exact_v(x, t):
        i = len(seen)
        e = (x - a[i] * x0) / s[i]  # the noise this point holds
        return a[i] * e - s[i] * x0

    def check(i, xi, x0_pred):
        seen.append(i)
        assert (x0_pred - x0).abs().max() < 1e-9
        assert (xi - (a[i + 1] * x0 + s[i + 1] * eps)).abs().max() < 1e-9

    out = solver.sample(exact_v, x, 1000 * s, a, s, "vpred", callback=check, progress=False)
    assert (out - x0).abs().max() < 1e-9


@FEW
@given(grids, st.integers(0, 10 ** 6), st.integers(0, 2 ** 31 - 1))
def test_jump_to_same_point_is_identity(grid, kk, seed):
    k = kk % (grid.N + 1) - 1  # any index incl. the endpoint -1
    gen = torch.Generator().manual_seed(seed)
    x, out = torch.randn(2, 2, 3, 1, 2, 2, generator=gen, dtype=torch.float64).unbind(0)
    assert (solver.jump(x, out, k, k, grid) - x).abs().max() < 1e-12


@FEW
@given(grids, st.integers(0, 2 ** 31 - 1))
def test_per_sample_jump_equals_scalar_jumps(grid, seed):
    gen = torch.Generator().manual_seed(seed)
    B = 5
    k_src = torch.randint(0, grid.N, (B,), generator=gen)
    k_dst = torch.randint(-1, grid.N, (B,), generator=gen)
    x, out = torch.randn(2, B, 2, 1, 2, 2, generator=gen).unbind(0)
    batched = solver.jump(x, out, k_src, k_dst, grid)
    assert batched.dtype == torch.float32
    for b in range(B):
        one = solver.jump(x[b:b + 1], out[b:b + 1], int(k_src[b]), int(k_dst[b]), grid)
        assert torch.equal(batched[b:b + 1], one)


@FEW
@given(grids, st.integers(0, 2 ** 31 - 1))
def test_jumps_compose_along_the_exact_trajectory(grid, seed):
    """With the exact output of x_t = alpha*x0 + sigma*eps, any jump lands on that trajectory."""
    gen = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 1, 2, 2, 2, 2, generator=gen, dtype=torch.float64).unbind(0)
    k_src = int(torch.randint(0, grid.N, (1,), generator=gen))
    k_dst = int(torch.randint(-1, k_src, (1,), generator=gen)) if k_src > -1 else -1
    _, a, s = grid.at(k_src)
    out = eps - x0 if grid.kind == "flow" else a * eps - s * x0
    got = solver.jump(a * x0 + s * eps, out, k_src, k_dst, grid)
    _, a2, s2 = grid.at(k_dst)
    assert (got - (a2 * x0 + s2 * eps)).abs().max() < 1e-9


# ----------------------------------------------------------------------------- phases

boundary_sets = st.integers(2, 60).flatmap(lambda N: st.tuples(
    st.just(N), st.lists(st.integers(0, N - 2), unique=True, max_size=min(6, N - 1)).map(
        lambda b: sorted(b, reverse=True))))


@FEW
@given(boundary_sets)
def test_phases_partition_the_grid(nb):
    N, b = nb
    ranges = solver.phase_ranges(N, b)
    assert len(ranges) == len(b) + 1
    covered = [k for lo, hi, _ in ranges for k in range(lo, hi + 1)]
    assert sorted(covered) == list(range(N))
    assert len(covered) == N and len(set(covered)) == N  # no gap, no overlap
    assert ranges[0][1] == N - 1 and ranges[-1][2] == -1
    k = torch.arange(N)
    ends = solver.phase_end(k, b)
    for lo, hi, end in ranges:
        assert end == lo - 1
        for kk in range(lo, hi + 1):
            assert solver.phase_end(kk, b) == end == int(ends[kk])


@FEW
@given(boundary_sets, st.integers(1, 30))
def test_student_schedule_properties(nb, steps):
    N, b = nb
    grid = solver.flow_grid(N, 7.0)
    ranges = solver.phase_ranges(N, b)
    try:
        ks = solver.student_schedule(grid, b, steps)
    except ValueError as e:
        assert "do not fit" in str(e)
        return
    assert len(ks) == steps and ks[0] == N - 1
    assert all(k0 > k1 for k0, k1 in zip(ks, ks[1:])) and ks[-1] >= 0
    per_phase = [sum(lo <= k <= hi for k in ks) for lo, hi, _ in ranges]
    assert max(per_phase) - min(per_phase) <= 1 and per_phase == sorted(per_phase, reverse=True)
    for (lo, hi, _), m in zip(ranges, per_phase):
        if m:
            assert hi in ks  # each used phase starts at its own first point


def test_phase_examples_and_errors():
    assert solver.phase_end(38, [37]) == 37 and solver.phase_end(37, [37]) == -1
    assert solver.phase_ranges(50, [37]) == [(38, 49, 37), (0, 37, -1)]
    assert solver.phase_ranges(50, [36, 24, 12]) == [(37, 49, 36), (25, 36, 24), (13, 24, 12), (0, 12, -1)]
    with pytest.raises(ValueError, match="descending"):
        solver.phase_ranges(50, [12, 24])
    with pytest.raises(ValueError, match="0..N-2"):
        solver.phase_ranges(50, [49])
    with pytest.raises(ValueError, match=">= 0"):
        solver.phase_end(-1, [37])
    with pytest.raises(ValueError, match="descending"):
        solver.sample_points(solver.flow_grid(), [18, 37])
