"""Noise schedules, the teacher's N-step grid, phases, and the one multi-step sampler (DESIGN sec. 1, 3).

Notation (EDM / k-diffusion style): a point on the trajectory is x = alpha * x0 + sigma * eps.
- "flow" (HunyuanVideo): alpha = 1 - sigma, the model predicts the velocity v = eps - x0,
  model-native time t = 1000 * sigma; one solver step is Euler (DESIGN 3.2).
- "vpred" (CogVideoX): alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), the model predicts
  v = alpha * eps - sigma * x0 at the integer timestep t; one solver step is DDIM (DESIGN 3.1).

Grid index k counts teacher steps from the clean end: k = N-1 is pure noise, k = 0 the last teacher
step, k = -1 the endpoint below index 0. Everything schedule-like is float64; the updates on latents
run in float32 (or float64 when given float64 latents, for exactness tests).
"""
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

KINDS = ("flow", "vpred")
T_TRAIN = 1000  # number of training timesteps of both backbones


# ----------------------------------------------------------------------------- schedules

def shift_sigma(s, shift):
    """Timestep shift sigma' = shift*s / (1 + (shift-1)*s) (DESIGN 2, HunyuanVideo scheduler)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * s / (1 + (shift - 1) * s)


def flow_sigmas(n, shift):
    """Flow sampling sigmas [n+1] float64, noisiest first, ending in 0 (diffusers FlowMatchEuler, DESIGN 3.2)."""
    if n < 1:
        raise ValueError(f"flow_sigmas needs n >= 1 steps, got {n}")
    s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigma(s, shift), s.new_zeros(1)])


def cogvideox_alphas_cumprod(snr_shift_scale=3.0):
    """abar_t [1000] float64: scaled-linear betas, SNR shift, zero-terminal-SNR rescale (DESIGN 3.1)."""
    if snr_shift_scale <= 0:
        raise ValueError(f"snr_shift_scale must be > 0, got {snr_shift_scale}")
    beta = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T_TRAIN, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - beta, dim=0)
    abar = abar / (snr_shift_scale + (1 - snr_shift_scale) * abar)
    r = abar.sqrt()
    r = (r - r[-1]) * r[0] / (r[0] - r[-1])  # r[-1] -> 0: zero SNR at t = 999
    return r ** 2


def ddim_timesteps(n):
    """Trailing DDIM timesteps [n] long, noisiest first: round(1000 - i*1000/n) - 1 (DESIGN 3.1)."""
    if not 1 <= n <= T_TRAIN:
        raise ValueError(f"ddim_timesteps needs 1 <= n <= {T_TRAIN}, got {n}")
    # i * (1000/n) rather than arange with a float step: the length of a float arange is fragile
    t = T_TRAIN - torch.arange(n, dtype=torch.float64) * (T_TRAIN / n)
    return torch.round(t).long() - 1


# ----------------------------------------------------------------------------- the grid

@dataclass(eq=False)
class Grid:
    """The teacher's N-step grid plus its endpoint; t/alpha/sigma hold index k at position k+1."""
    kind: str
    N: int
    t: torch.Tensor      # float64 [N+1], model-native time
    alpha: torch.Tensor  # float64 [N+1]
    sigma: torch.Tensor  # float64 [N+1]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Grid kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("t", "alpha", "sigma"):
            v = getattr(self, name)
            if v.shape != (self.N + 1,):
                raise ValueError(f"Grid.{name} must have shape [N+1] = [{self.N + 1}], got {tuple(v.shape)}")
        if not bool((self.sigma[1:] > self.sigma[:-1]).all()):
            raise ValueError("Grid sigmas must increase strictly with the grid index k")

    def at(self, k):
        """(t, alpha, sigma) float64 at grid index k: an int (0-dim results) or a LongTensor [B] (k may be -1).

        Host (CPU) indices give host values: the training step keeps its indices there, so nothing here reads a
        device. A device k is gathered on its device and range-checked asynchronously (no host sync either)."""
        if isinstance(k, torch.Tensor):
            if k.dtype not in (torch.int64, torch.int32) or k.dim() > 1:
                raise ValueError(f"grid index tensor must be an integer tensor [B], got {k.dtype} {tuple(k.shape)}")
            if k.device.type != "cpu":
                torch._assert_async(((k >= -1) & (k <= self.N - 1)).all(), f"grid index out of range -1..{self.N - 1}")
                return tuple(v.to(k.device, non_blocking=True)[k.long() + 1] for v in (self.t, self.alpha, self.sigma))
            if k.numel() and (int(k.min()) < -1 or int(k.max()) > self.N - 1):
                raise ValueError(f"grid index out of range -1..{self.N - 1}: {k.tolist()}")
            i = k.long() + 1
            return tuple(v[i] for v in (self.t, self.alpha, self.sigma))
        k = int(k)
        if not -1 <= k <= self.N - 1:
            raise ValueError(f"grid index {k} out of range -1..{self.N - 1}")
        return self.t[k + 1], self.alpha[k + 1], self.sigma[k + 1]


def flow_grid(n=50, shift=17.0, eps=0.001):
    """Authors' distillation grid: sigma[k] = sigma'((k+1)/n), endpoint sigma'(eps) or 0 (DESIGN 2)."""
    if n < 1:
        raise ValueError(f"flow_grid needs n >= 1, got {n}")
    if eps is not None and not 0 <= eps < 1 / n:
        raise ValueError(f"flow_grid eps must lie in [0, 1/n) = [0, {1 / n}), got {eps}")
    s = torch.arange(n + 1, dtype=torch.float64) / n
    s[0] = 0.0 if eps is None else eps
    sigma = shift_sigma(s, shift)
    # t as the float32 the model receives, so t-threshold routing (boundary_t) agrees in any precision
    t = (T_TRAIN * sigma).float().double()
    return Grid("flow", n, t, 1 - sigma, sigma)


def cogvideox_grid(n=50, snr_shift_scale=3.0):
    """Trailing DDIM grid on CogVideoX's abar, endpoint abar = 1 at t = 0 (DESIGN 3.1).

    The endpoint's t is 0 (the model's lowest timestep) so any model call there stays in range;
    its alpha/sigma are those of abar = 1 (diffusers' set_alpha_to_one). For n dividing 1000 every
    step equals diffusers' CogVideoXDDIMScheduler; for other n diffusers steps to t - 1000//n, which
    is not the next grid timestep, while this grid always steps to the next grid point.
    """
    abar = cogvideox_alphas_cumprod(snr_shift_scale)
    ts = ddim_timesteps(n).flip(0)  # [n], index k -> ts[k], ascending
    a = torch.cat([abar.new_ones(1), abar[ts]])
    t = torch.cat([ts.new_zeros(1), ts]).to(torch.float64)
    return Grid("vpred", n, t, a.sqrt(), (1 - a).clamp(min=0).sqrt())


def grid_for(model_config, n=50, snr_shift_scale=None):
    """Default teacher grid per architecture; duck-typed on the config class name (or diffusers `_class_name`)."""
    if isinstance(model_config, dict):
        name = model_config.get("_class_name", "")
        get = model_config.get
    else:
        name = type(model_config).__name__
        get = lambda key, default=None: getattr(model_config, key, default)  # noqa: E731
    if "Hunyuan" in name or "Wan" in name:  # the authors distil both on shift 17 (distill_wan_*.sh: --shift 17)
        if snr_shift_scale is not None:
            raise ValueError(f"snr_shift_scale applies to CogVideoX only, not to a {name} config")
        return flow_grid(n, 17.0, 0.001)
    if "CogVideoX" in name:
        if snr_shift_scale is None:
            # the transformer config holds no SNR shift: 5B-style (RoPE) models use 1.0, 2B-style 3.0
            snr_shift_scale = 1.0 if get("use_rotary_positional_embeddings", False) else 3.0
        return cogvideox_grid(n, snr_shift_scale)
    raise ValueError(f"grid_for: unknown model config {name or type(model_config).__name__!r}; "
                     "expected a CogVideoX, HunyuanVideo or Wan config")


def default_kappa(model_config, n=50):
    """The authors' cut: semantic indices randint(38, 50) -> kappa 37 (HunyuanVideo, also used for CogVideoX),
    randint(35, 50) -> kappa 34 (Wan, distill_dcm_wan_semantic_expert.py); scaled to an n-step grid."""
    name = model_config.get("_class_name", "") if isinstance(model_config, dict) else type(model_config).__name__
    first = 35 if "Wan" in name else 38  # first semantic index at N = 50
    return (first * n) // 50 - 1


def k_between(u, lo, hi):
    """Uniform grid index in lo..hi from u in [0, 1)."""
    return (lo + (u * (hi - lo + 1)).long()).clamp(max=hi)


def kappa_below(grid, t):
    """The last grid index whose t lies below t (a two-expert teacher's boundary: indices 0..kappa all call its
    low-noise expert, kappa+1..N-1 its high-noise one)."""
    below = (grid.t[1:grid.N - 1].float() < t).nonzero()  # t at indices 0..N-2, as the model receives it
    if not len(below):
        raise ValueError(f"no grid point below t = {t:g} (t at index 0: {float(grid.t[1]):g})")
    return int(below[-1])


def boundary_t(grid, kappa):
    """Model-native t at grid index kappa; the dual expert routes t <= boundary_t to the detail expert."""
    if not 0 <= kappa <= grid.N - 2:
        raise ValueError(f"kappa must lie in 0..N-2 = 0..{grid.N - 2}, got {kappa}")
    return float(grid.t[kappa + 1])


# ----------------------------------------------------------------------------- one solver step

def _bcast(c, x):
    """A scalar or per-sample [B] coefficient as a tensor broadcastable against x [B, ...]."""
    c = torch.as_tensor(c, dtype=torch.float64).to(device=x.device, non_blocking=x.device.type != "cpu")  # no sync
    if c.dim() == 1:
        if c.shape[0] != x.shape[0]:
            raise ValueError(f"per-sample coefficient has {c.shape[0]} entries for a batch of {x.shape[0]}")
        c = c.view(-1, *([1] * (x.dim() - 1)))  # [B] -> [B, 1, ..., 1]
    elif c.dim() != 0:
        raise ValueError(f"coefficient must be a scalar or [B], got shape {tuple(c.shape)}")
    return c


def _work_dtype(*xs):
    """float32 for half/float inputs, float64 when any input is float64."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def to_x0_eps(x, out, alpha, sigma, kind):
    """(x0, eps) from the model output: flow v = eps - x0; vpred v = alpha*eps - sigma*x0 (DESIGN 3.1)."""
    _check_kind(kind)
    if x.shape != out.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} != x shape {tuple(x.shape)}")
    dt = _work_dtype(x, out)
    x, out = x.to(dt), out.to(dt)
    a, s = _bcast(alpha, x).to(dt), _bcast(sigma, x).to(dt)
    if kind == "flow":
        return x - s * out, x + (1 - s) * out
    return a * x - s * out, a * out + s * x  # uses alpha^2 + sigma^2 = 1


def ode_step(x, out, alpha, sigma, alpha_dst, sigma_dst, kind):
    """Move x from (alpha, sigma) to (alpha_dst, sigma_dst) with model output `out`: Euler or DDIM (DESIGN 3)."""
    _check_kind(kind)
    if kind == "flow":
        if x.shape != out.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} != x shape {tuple(x.shape)}")
        dt = _work_dtype(x, out)
        ds = (_bcast(sigma_dst, x) - _bcast(sigma, x)).to(dt)  # difference in float64, then cast
        return x.to(dt) + ds * out.to(dt)
    x0, eps = to_x0_eps(x, out, alpha, sigma, kind)
    return _bcast(alpha_dst, x0).to(x0.dtype) * x0 + _bcast(sigma_dst, x0).to(x0.dtype) * eps


def jump(x, out, k_src, k_dst, grid):
    """Point at grid index k_dst from x at k_src using model output `out` (per-sample [B] indices ok).

    One teacher step is jump(x, out, k, k-1, grid); the student's consistency function
    is jump(x, out_student, k, k_end, grid) (DESIGN sec. 1, step 3).
    """
    _, a, s = grid.at(k_src)
    _, a_dst, s_dst = grid.at(k_dst)
    return ode_step(x, out, a, s, a_dst, s_dst, grid.kind)


# ----------------------------------------------------------------------------- phases

def _check_boundaries(boundaries, N=None):
    b = [int(v) for v in boundaries]
    if any(b0 <= b1 for b0, b1 in zip(b, b[1:])):
        raise ValueError(f"boundaries must be strictly descending grid indices, got {b}")
    hi = N - 2 if N is not None else None
    if b and (b[-1] < 0 or (hi is not None and b[0] > hi)):
        raise ValueError(f"boundaries must lie in 0..N-2{'' if N is None else f' = 0..{hi}'}, got {b}")
    return b


def phase_end(k, boundaries):
    """Endpoint index of the phase holding k: the largest boundary below k, else -1 (DESIGN sec. 1)."""
    b = _check_boundaries(boundaries)
    if isinstance(k, torch.Tensor):
        if k.device.type != "cpu":  # checked on the device: no host sync
            torch._assert_async((k >= 0).all(), "phase_end: grid indices must be >= 0 (k = -1 is an endpoint)")
        elif k.numel() and int(k.min()) < 0:
            raise ValueError(f"phase_end: grid indices must be >= 0 (k = -1 is an endpoint), got {k.tolist()}")
        end = torch.full_like(k, -1)
        for v in reversed(b):  # ascending: the last boundary below k wins
            end = torch.where(k > v, torch.full_like(k, v), end)
        return end
    k = int(k)
    if k < 0:
        raise ValueError(f"phase_end: grid index must be >= 0 (k = -1 is an endpoint), got {k}")
    return next((v for v in b if v < k), -1)


def phase_ranges(N, boundaries):
    """[(lo, hi, end)] per phase, noisy to clean; lo..hi partition 0..N-1 and end = lo - 1."""
    b = _check_boundaries(boundaries, N)
    tops = [N - 1] + b
    ends = b + [-1]
    return [(e + 1, h, e) for h, e in zip(tops, ends)]


POINTS = ("even", "proportional")  # student_schedule's step splits; or explicit grid indices


def student_schedule(grid, boundaries, steps, points="even"):
    """Student sampling indices, noisiest first, clean end excluded (paper supp. 6).

    points = "even" (the authors'): steps split evenly between phases, the remainder to the noisiest phases first,
    so with fewer steps than phases the cleaner phases get none (1 step = one jump from k = N-1 to the clean end
    through the first phase's expert). "proportional": steps split in proportion to each phase's number of grid
    points (largest remainder; the noisiest phase gets at least one), so a short semantic phase gets few.
    Inside a phase (lo, hi, end) with m steps the points are hi - floor(j * (hi - end) / m), j = 0..m-1: uniform
    from the phase's start down towards its end. A list of grid indices is taken as it is (checked: strictly
    descending, starting at N-1 where the noise is, `steps` long).
    """
    if steps < 1:
        raise ValueError(f"student_schedule needs steps >= 1, got {steps}")
    if not isinstance(points, str):
        ks = [int(k) for k in points]
        if len(ks) != steps or not ks or ks[0] != grid.N - 1 or any(a <= b for a, b in zip(ks, ks[1:])) or ks[-1] < 0:
            raise ValueError(f"explicit points must be {steps} strictly descending grid indices from N-1 = {grid.N - 1} "
                             f"down to >= 0, got {ks}")
        return ks
    if points not in POINTS:
        raise ValueError(f"points must be one of {POINTS} or a list of grid indices, got {points!r}")
    ranges = phase_ranges(grid.N, boundaries)
    P = len(ranges)
    if points == "even":
        ms = [steps // P + (1 if p < steps % P else 0) for p in range(P)]
    else:
        lengths = [hi - end for _, hi, end in ranges]
        share = [steps * n / sum(lengths) for n in lengths]
        ms = [int(v) for v in share]
        for p in sorted(range(P), key=lambda p: ms[p] - share[p])[:steps - sum(ms)]:  # largest remainders first
            ms[p] += 1
        if ms[0] == 0:  # sampling starts from noise at k = N-1: the noisiest phase needs a point
            ms[max(range(P), key=ms.__getitem__)] -= 1
            ms[0] = 1
    ks = []
    for p, ((lo, hi, end), m) in enumerate(zip(ranges, ms)):
        if m > hi - end:
            raise ValueError(f"{m} steps do not fit phase {p} (grid indices {lo}..{hi}, {hi - end} points)")
        ks += [hi - (j * (hi - end)) // m for j in range(m)]
    return ks


def parse_points(text):
    """--points value: "even", "proportional" or comma-separated grid indices "49,45,20" -> a student_schedule points."""
    if text in POINTS:
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--points {text!r}: expected {' or '.join(POINTS)} or comma-separated grid indices") from None


def sample_points(grid, ks, end="zero"):
    """(t, alpha, sigma) float64 [len(ks)+1] at grid indices ks plus the clean end ("zero": sigma 0; "grid": k=-1)."""
    ks = [int(k) for k in ks]
    if not ks or any(a <= b for a, b in zip(ks, ks[1:])) or ks[-1] < 0 or ks[0] > grid.N - 1:
        raise ValueError(f"sample_points needs strictly descending grid indices in 0..{grid.N - 1}, got {ks}")
    if end not in ("zero", "grid"):
        raise ValueError(f"end must be 'zero' or 'grid', got {end!r}")
    idx = torch.tensor(ks + [-1]) + 1
    t, alpha, sigma = grid.t[idx].clone(), grid.alpha[idx].clone(), grid.sigma[idx].clone()
    if end == "zero":
        t[-1], alpha[-1], sigma[-1] = 0.0, 1.0, 0.0
    return t, alpha, sigma


# ----------------------------------------------------------------------------- the sampler

def sample(model_fn, x, t, alpha, sigma, kind, callback=None, progress=True):
    """Multi-step sampler: at each point call model_fn(x, t[B]) and Euler/DDIM-step to the next (DESIGN 3).

    The running state is float32 (float64 if x is); model_fn sees it in x's dtype, with t as
    float32 [B]. callback(i, x_next, x0_pred) after step i. Returns the last point in x's dtype.
    """
    _check_kind(kind)
    n = len(t) - 1
    if n < 1 or len(alpha) != n + 1 or len(sigma) != n + 1:
        raise ValueError(f"sample needs t, alpha, sigma of equal length >= 2, got {len(t)}, {len(alpha)}, {len(sigma)}")
    in_dtype, B = x.dtype, x.shape[0]
    x = x.to(_work_dtype(x))
    for i in tqdm(range(n), disable=not progress, desc="sampling"):
        tb = torch.full((B,), float(t[i]), dtype=torch.float32, device=x.device)
        out = model_fn(x.to(in_dtype), tb)
        x0, _ = to_x0_eps(x, out, alpha[i], sigma[i], kind)
        x = ode_step(x, out, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1], kind).to(x.dtype)
        if callback is not None:
            callback(i, x, x0)
    return x.to(in_dtype)


def custom_points(grid, sigmas=None, timesteps=None):
    """(t, alpha, sigma) float64 [n+1] of a given schedule plus the clean end, built as the authors' samplers
    do. flow: sigma in float32 (timesteps / 1000), t = float32(1000 * sigma); vpred: integer timesteps,
    looked up on `grid`, which must hold every one (grid_for(config, 1000): t[k + 1] = k)."""
    if (sigmas is None) == (timesteps is None):
        raise ValueError("give exactly one of sigmas and timesteps")
    vals, name = (list(sigmas), "sigmas") if timesteps is None else (list(timesteps), "timesteps")
    top = 1.0 if timesteps is None else T_TRAIN
    if not vals or any(a <= b for a, b in zip(vals, vals[1:])) or not all(0 < v <= top for v in vals):
        raise ValueError(f"{name} must be strictly decreasing in (0, {top:g}], got {vals}")
    if grid.kind == "flow":
        s = torch.tensor(vals, dtype=torch.float32) / (1 if timesteps is None else T_TRAIN)
        sigma = torch.cat([s.double(), torch.zeros(1, dtype=torch.float64)])
        return torch.cat([(s * T_TRAIN).double(), sigma[-1:]]), 1 - sigma, sigma
    if timesteps is None or any(v != int(v) or v > T_TRAIN - 1 for v in vals) or grid.N != T_TRAIN:
        raise ValueError(f"v-prediction models take integer timesteps in 1..{T_TRAIN - 1} (on a {T_TRAIN}-point grid), "
                         f"got {name} {vals}")
    return sample_points(grid, [int(v) for v in vals])
