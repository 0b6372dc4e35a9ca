"""DCM training losses: consistency (paper eq. 4) and one whole CD step, temporal coherence (eq. 8), GAN
hinge and feature matching for the detail expert (eqs. 9-10) with the re-noising that feeds the GAN, and
the teacher's own diffusion loss.

Losses are computed in float32 whatever the input dtype (bf16 autocast outputs included).
No host syncs in a step: grid indices live on the host (CPU), where their checks and the grid's per-sample
coefficients are computed; the coefficients go to the device in one non-blocking transfer per function (`on`),
and the student and target get their t on the host too, so a dual expert routes without reading the device.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from solver import ode_step, phase_end


def _same_shape(a, b, what):
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def consistency_loss(xhat, x_tgt, kind="huber", c=1e-3):
    """Consistency loss (eq. 4): pseudo-Huber mean(sqrt(d^2 + c^2) - c), or "l2" mean(d^2)."""
    _same_shape(xhat, x_tgt, "consistency_loss")
    d = xhat.float() - x_tgt.float()
    if kind == "huber":
        if not c > 0:
            raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
        d2 = d * d
        return (d2 / (torch.sqrt(d2 + c * c) + c)).mean()  # = sqrt(d^2+c^2) - c without the cancellation
    if kind == "l2":
        return (d * d).mean()
    raise ValueError(f"consistency loss kind must be 'huber' or 'l2', got {kind!r}")


def col(c, x):
    """A per-sample coefficient [B] as float32 [B, 1, 1, 1, 1] against x."""
    return c.to(device=x.device, non_blocking=x.device.type != "cpu").float().view(-1, *[1] * (x.dim() - 1))


def diffusion_time(u, kind, grid=None):
    """The teacher's random training point (t, alpha, sigma) [B] from uniforms u [B]: flow: logit-normal sigma,
    t = 1000 sigma; vpred: a uniform index on `grid` (CogVideoX: its 1000 DDIM training timesteps)."""
    if kind == "flow":
        sigma = torch.sigmoid(2 ** 0.5 * torch.erfinv(2 * u - 1))  # sigmoid(z), z ~ N(0, 1)
        return 1000 * sigma, 1 - sigma, sigma
    return grid.at((u * grid.N).long().clamp(max=grid.N - 1))


def diffusion_loss(model, x0, eps, t, alpha, sigma, kind, cond):
    """The teacher's objective: MSE of model(alpha x0 + sigma eps, t) against its target, flow: eps - x0,
    vpred: alpha eps - sigma x0 (per-sample t, alpha, sigma [B])."""
    a, s = col(alpha, x0), col(sigma, x0)
    out = model(a * x0 + s * eps, t.float().to(x0.device, non_blocking=x0.device.type != "cpu"), **cond).float()
    return F.mse_loss(out, eps - x0 if kind == "flow" else a * eps - s * x0)


def _per_sample(k, B, what):
    k = torch.as_tensor(k)
    if k.dim() == 0:
        k = k.expand(B)
    if k.shape != (B,) or k.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what} must be an int or an integer tensor [B={B}], got {k.dtype} {tuple(k.shape)}")
    return k.long()


def on(device, **rows):
    """Host per-sample rows [B] -> float64 on `device`, stacked and moved in one transfer (from pinned memory,
    non-blocking, on CUDA: the host never waits for the device)."""
    packed = torch.stack([torch.as_tensor(v).to(torch.float64) for v in rows.values()])  # [n_rows, B]
    if device.type == "cuda" and packed.device.type == "cpu":
        packed = packed.pin_memory()
    return dict(zip(rows, packed.to(device, non_blocking=True).unbind(0)))


def _host_indices(k_prev, k_end, B):
    """Per-sample host indices, checked there (a device index is read once)."""
    k_prev, k_end = _per_sample(k_prev, B, "k_prev").cpu(), _per_sample(k_end, B, "k_end").cpu()
    if bool((k_prev < k_end).any()):
        raise ValueError(f"k_prev must be >= k_end (a target lies below its endpoint): {k_prev.tolist()} vs {k_end.tolist()}")
    return k_prev, k_end


def _target(x_prev, out_target, c, kind):
    """The target from on()-moved coefficients a_p, s_p (at k-1), a_e, s_e (at k_end), at_end (k-1 == k_end)."""
    x_tgt = ode_step(x_prev, out_target, c["a_p"], c["s_p"], c["a_e"], c["s_e"], kind)
    at_end = c["at_end"].bool().view(-1, *[1] * (x_prev.dim() - 1))  # [B, 1, 1, 1, 1]
    # where(), not arithmetic: the vpred jump k -> k is only approximately the identity
    return torch.where(at_end, x_prev.to(x_tgt.dtype), x_tgt)


@torch.no_grad()
def consistency_target(x_prev, out_target, k_prev, k_end, grid):
    """Target of eq. 4: jump(x_prev, out_target, k-1 -> k_end) per sample; x_prev where k-1 == k_end (no grad)."""
    k_prev, k_end = _host_indices(k_prev, k_end, x_prev.shape[0])
    (_, a_p, s_p), (_, a_e, s_e) = grid.at(k_prev), grid.at(k_end)
    return _target(x_prev, out_target, on(x_prev.device, a_p=a_p, s_p=s_p, a_e=a_e, s_e=s_e, at_end=k_prev == k_end),
                   grid.kind)


def consistency_step(student, target, teacher, grid, boundaries, x0, eps, k, cond, scond, kind="huber", x_tgt=None):
    """One CD step at per-sample grid indices k (paper eq. 4, DESIGN sec. 1 steps 2-6) -> (loss, xhat, x_tgt, k_end).

    teacher: a Teacher (guided, given `cond`); student and target (the EMA, or the student itself) get `scond`
    (cond plus embedded guidance where the model takes it). The teacher step and the target run first, without
    grad, so the student's stored activations never coexist with the teacher's forward (lower peak memory).
    k on the host (a device k is read once); k_end comes back on the host. No host sync inside. x_tgt given (the same
    step's, computed before): the teacher and target passes are skipped."""
    k = _per_sample(k, x0.shape[0], "k").cpu()
    k_end = phase_end(k, boundaries)
    _host_indices(k - 1, k_end, len(k))
    (t, a, s), (t_p, a_p, s_p), (_, a_e, s_e) = grid.at(k), grid.at(k - 1), grid.at(k_end)
    c = on(x0.device, t=t, a=a, s=s, a_p=a_p, s_p=s_p, a_e=a_e, s_e=s_e, at_end=k - 1 == k_end)
    x_k = col(c["a"], x0) * x0 + col(c["s"], x0) * eps
    with torch.no_grad():  # the teacher's ODE step k -> k-1 (= teacher.step(x_k, k, cond))
        if x_tgt is None:
            x_prev = ode_step(x_k, teacher.guided(x_k, c["t"].float(), cond), c["a"], c["s"], c["a_p"], c["s_p"], grid.kind)
            x_tgt = _target(x_prev, target(x_prev, t_p.float(), **scond).float(), c, grid.kind)
    xhat = ode_step(x_k, student(x_k, t.float(), **scond).float(), c["a"], c["s"], c["a_e"], c["s_e"], grid.kind)
    return consistency_loss(*generated(cond, xhat, x_tgt), kind), xhat, x_tgt, k_end


def generated(cond, *xs):
    """The generated frames of each x [B, C, F, H, W]: all but the first under a first-frame image condition (TI2V:
    `image_latents` [B, C, 1, H, W], the given first frame), else all."""
    img = cond.get("image_latents")
    first = img is not None and img.shape[2] == 1 and img.shape[1] == xs[0].shape[1]
    return tuple(x[:, :, 1:] if first else x for x in xs)


class SwappedEMA:
    """The consistency target as the EMA of the trained tensors alone (eq. 4), for a student whose frozen part is
    shared with the teacher (--semantic-lora): a copy of the adapters, swapped into the student for the target's
    no-grad forward and back (exact copies both ways). One process or DDP, not FSDP2, whose root keeps its gathered
    weights from one forward to the next."""

    def __init__(self, model):
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for _, p in self.named]

    @torch.no_grad()
    def _swap(self):
        for (_, p), s in zip(self.named, self.shadow):
            held = p.detach().clone()
            p.copy_(s)
            s.copy_(held)

    def __call__(self, x, t, **kw):
        with torch.no_grad():
            self._swap()
            try:
                return self.model(x, t, **kw)
            finally:
                self._swap()

    @torch.no_grad()
    def update(self, decay):
        for (_, p), s in zip(self.named, self.shadow):
            s.lerp_(p, 1 - decay)

    def state_dict(self):
        """{parameter name: EMA tensor} of the trained parameters (the names of the student's own state dict)."""
        return {n: s.detach().clone() for (n, _), s in zip(self.named, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, sd):
        if set(sd) != {n for n, _ in self.named}:
            raise ValueError(f"EMA state keys differ from the trained parameters: {sorted(set(sd) ^ {n for n, _ in self.named})[:6]}")
        for (n, _), s in zip(self.named, self.shadow):
            s.copy_(sd[n])


@torch.no_grad()
def ema_update(ema, model, decay):
    """The consistency target as the student's EMA (eq. 4): ema <- decay * ema + (1 - decay) * model, over the
    trainable parameters. FSDP2 (both sharded alike): a no-grad forward leaves the EMA's root gathered: reshard it."""
    if isinstance(ema, SwappedEMA):
        return ema.update(decay)
    for m in ema.modules():
        getattr(m, "reshard", lambda: None)()
    for pe, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            pe.lerp_(p, 1 - decay)


TC_STRIDE = 3  # eq. 8's frame stride d (authors)


def temporal_coherence_loss(xhat, x_tgt, d=TC_STRIDE):
    """Temporal coherence (eq. 8, authors' form): MSE between frame differences at stride d."""
    _same_shape(xhat, x_tgt, "temporal_coherence_loss")
    if xhat.dim() != 5:
        raise ValueError(f"temporal_coherence_loss wants [B, C, F, H, W], got {tuple(xhat.shape)}")
    if not (isinstance(d, int) and d >= 1):
        raise ValueError(f"frame stride d must be an int >= 1, got {d!r}")
    if xhat.shape[2] <= d:
        return xhat[:, :, :0].float().sum()  # exact 0, still attached to xhat's graph
    dx = xhat[:, :, d:].float() - xhat[:, :, :-d].float()
    dt = x_tgt[:, :, d:].float() - x_tgt[:, :, :-d].float()
    return ((dx - dt) ** 2).mean()


class _ConvBlock(nn.Sequential):
    """1x1 conv, GroupNorm, LeakyReLU(0.2): the discriminator's unit."""

    def __init__(self, c_in, c_out, groups):
        super().__init__(nn.Conv2d(c_in, c_out, 1), nn.GroupNorm(groups, c_out), nn.LeakyReLU(0.2))


class DiscriminatorHead(nn.Module):
    """Per-token logits for one tapped feature map [B*F, C, h, w]."""

    def __init__(self, dim, hidden, groups):
        super().__init__()
        self.inp = _ConvBlock(dim, hidden, groups)
        self.res = _ConvBlock(hidden, hidden, groups)
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, x):
        x = self.inp(x)
        return self.out(x + self.res(x))  # [B*F, 1, h, w]


class Discriminator(nn.Module):
    """GAN discriminator on the frozen teacher's tapped video tokens (eq. 9): one head per tap.

    GroupNorm(groups) needs hidden % groups == 0 (authors: hidden 1024, groups 32); tiny test
    discriminators pass e.g. hidden=32, groups=8.
    """

    def __init__(self, dim, n_taps, hidden=1024, groups=32):
        super().__init__()
        if hidden % groups:
            raise ValueError(f"GroupNorm({groups}) needs hidden % {groups} == 0, got hidden={hidden}")
        self.dim, self.n_taps = dim, n_taps
        self.heads = nn.ModuleList([DiscriminatorHead(dim, hidden, groups) for _ in range(n_taps)])
        # train.py --grad-ckpt: each head recomputed in the backward, so one tap's hidden-wide tensors are alive at a
        # time, not all of them (Wan2.1-1.3B at 21x60x104: 15 taps, ~20 GiB -> ~1.4)
        self.gradient_checkpointing = False

    @classmethod
    def for_model(cls, model, hidden=1024):
        """One head per tap of model.default_taps(), on the model's token width."""
        cfg = model.config
        return cls(cfg.num_attention_heads * cfg.attention_head_dim, len(model.default_taps()), hidden)

    def forward(self, feats, grid):
        """feats: n_taps tensors [B, L, C] of tokens in (F, h, w) order, grid=(F, h, w) -> logits [B, L] each."""
        if len(feats) != self.n_taps:
            raise ValueError(f"Discriminator has {self.n_taps} heads, got {len(feats)} features")
        n_f, h, w = grid

        def run(feat, head):
            B, L, C = feat.shape
            x = feat.to(head.out.weight.dtype).view(B, n_f, h, w, C)  # [B, F, h, w, C]
            x = x.permute(0, 1, 4, 2, 3).reshape(B * n_f, C, h, w)  # [B*F, C, h, w]
            return head(x).view(B, L)  # [B*F, 1, h, w] -> [B, L], same token order as feat
        logits = []
        for feat, head in zip(feats, self.heads):
            if feat.shape[1] != n_f * h * w or feat.shape[2] != self.dim:
                raise ValueError(f"feature [B, L, C] = {tuple(feat.shape)} does not match the token grid "
                                 f"(F, h, w) = {tuple(grid)} (L = {n_f * h * w}) and dim = {self.dim}")
            ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
            logits.append(checkpoint(run, feat, head, use_reentrant=False) if ckpt else run(feat, head))
        return logits


def d_hinge_loss(real_logits, fake_logits):
    """Discriminator hinge loss (eq. 9): mean(relu(1 + D(fake))) + mean(relu(1 - D(real))), averaged over heads."""
    if len(real_logits) != len(fake_logits) or not real_logits:
        raise ValueError(f"need the same, non-zero number of real and fake heads, got {len(real_logits)}, {len(fake_logits)}")
    per_head = [F.relu(1 + f.float()).mean() + F.relu(1 - r.float()).mean() for r, f in zip(real_logits, fake_logits)]
    return torch.stack(per_head).mean()


def g_hinge_loss(fake_logits):
    """Generator hinge loss (eq. 9): mean(relu(1 - D(fake))), averaged over heads."""
    if not fake_logits:
        raise ValueError("g_hinge_loss needs at least one head's logits")
    return torch.stack([F.relu(1 - f.float()).mean() for f in fake_logits]).mean()


def feature_matching_loss(model, fake_feats, real_feats, temb, grid, ckpt=False):
    """Feature matching (eq. 10): MSE of model.head(fake_i) vs model.head(real_i), mean over taps;
    grid = latent (F, H, W). The real side is the target (no gradient)."""
    if len(fake_feats) != len(real_feats) or not fake_feats:
        raise ValueError(f"need the same, non-zero number of fake and real features, got {len(fake_feats)}, {len(real_feats)}")
    losses = []
    for f, r in zip(fake_feats, real_feats):
        _same_shape(f, r, "feature_matching_loss")
        with torch.no_grad():
            r_out = model.head(r, temb, grid)
        if ckpt and torch.is_grad_enabled():  # one tap's head tensors alive at a time (train.py --grad-ckpt)
            out = checkpoint(lambda f: model.head(f, temb, grid).float(), f, use_reentrant=False)
        else:
            out = model.head(f, temb, grid).float()
        losses.append(F.mse_loss(out, r_out.float()))
    return torch.stack(losses).mean()


def adversarial_terms(teacher_model, disc, x_tgt, xhat, n, k_end, k_adv, grid, cond, tok_grid):
    """Detail-expert GAN terms (eqs. 9-10, DESIGN sec. 1): x_tgt (real: the paper's target, or what train.py
    --gan-real puts there) and xhat (fake) re-noised to k_adv with the shared noise n, the frozen teacher's tapped
    features of both at t_adv (cond: with embedded guidance) -> (generator hinge loss, feature matching loss, (fake
    features detached, real features) for the D step).
    Gradients reach xhat only; tok_grid = the token grid (F, h, w) of the features. k_end, k_adv on the host."""
    taps = teacher_model.default_taps()
    c = on(xhat.device, t_adv=grid.at(_per_sample(k_adv, len(xhat), "k_adv").cpu())[0],
           **_renoise_coefs(k_end, k_adv, grid, len(xhat)))
    t_adv = c["t_adv"].float()
    real, fake = (_renoise(x, n, c) for x in (x_tgt, xhat))
    with torch.no_grad():
        real_f = teacher_model(real, t_adv, taps=taps, **cond)[1]
    fake_f = teacher_model(fake, t_adv, taps=taps, **cond)[1]
    disc.requires_grad_(False)  # the generator's loss leaves no gradient in D
    g_loss = g_hinge_loss(disc(fake_f, tok_grid))
    disc.requires_grad_(True)
    grid_kw = {"grid": tuple(xhat.shape[2:])} if cond.get("image_latents") is not None else {}  # TI2V: per-token
    temb = teacher_model.time_embed(t_adv, **grid_kw, **cond)
    fm_loss = feature_matching_loss(teacher_model, fake_f, real_f, temb, tuple(xhat.shape[2:]), disc.gradient_checkpointing)
    return g_loss, fm_loss, ([f.detach() for f in fake_f], real_f)


def discriminator_loss(disc, feats, tok_grid):
    """D's hinge loss (eq. 9) on adversarial_terms' (fake, real) features, both in one batched forward."""
    return discriminator_stats(disc, feats, tok_grid)[0]


def discriminator_stats(disc, feats, tok_grid):
    """(D's hinge loss (eq. 9), its accuracy on real, on fake tokens): the fraction of real tokens it scores > 0 and
    of fake ones it scores < 0, detached; 0.5 / 0.5 is a discriminator that learned nothing."""
    fake_f, real_f = feats
    B = fake_f[0].shape[0]
    logits = disc([torch.cat([f, r]) for f, r in zip(fake_f, real_f)], tok_grid)  # [2B, L] each: fake, real
    real, fake = [lg[B:] for lg in logits], [lg[:B] for lg in logits]
    acc = [torch.stack([(s * lg.detach().float() > 0).float().mean() for lg in side]).mean()
           for s, side in ((1, real), (-1, fake))]
    return d_hinge_loss(real, fake), acc[0], acc[1]


@torch.no_grad()
def teacher_endpoint(teacher, x0, eps, k, cond, grid, top=None):
    """The teacher's own solution from each sample's x_k (its ODE, one solver step per grid index from k down to the
    clean end): the 'teacher' real side of train.py --gan-real. One batched teacher call per index from `top` (default
    max(k); train.py passes the phase's top index, the same on every rank, as FSDP's collectives need) down, each
    sample stepping only from its own k (k on the host)."""
    k = _per_sample(k, x0.shape[0], "k").cpu()
    _, a, s = grid.at(k)
    c = on(x0.device, a=a, s=s)
    x = col(c["a"], x0) * x0 + col(c["s"], x0) * eps
    for j in range(int(k.max()) if top is None else int(top), -1, -1):
        live = col((k >= j).to(x0.device), x0).bool()  # [B, 1, 1, 1, 1]
        x = torch.where(live, teacher.step(x, torch.full_like(k, j), cond), x)
    return x


def renoise(x_end, n, k_end, k_adv, grid):
    """Re-noise the endpoint from k_end up to k_adv with shared noise n (eq. 9 inputs), per sample.

    flow (authors): ((1 - s_adv) x + (s_adv - s_end) n) / (1 - s_end);
    vpred: the exact Gaussian forward transition, (a_adv / a_end) x + sqrt(s_adv^2 - (a_adv s_end / a_end)^2) n.
    """
    _same_shape(x_end, n, "renoise")
    return _renoise(x_end, n, on(x_end.device, **_renoise_coefs(k_end, k_adv, grid, x_end.shape[0])))


def _renoise_coefs(k_end, k_adv, grid, B):
    """renoise's per-sample (c_x, c_n) float64 on the host, from host indices (checked there)."""
    k_end, k_adv = _per_sample(k_end, B, "k_end").cpu(), _per_sample(k_adv, B, "k_adv").cpu()
    if bool((k_adv < k_end).any()):
        raise ValueError(f"renoise goes up in noise: k_adv must be >= k_end, got {k_adv.tolist()} vs {k_end.tolist()}")
    (_, a_e, s_e), (_, a_a, s_a) = grid.at(k_end), grid.at(k_adv)
    if grid.kind == "flow":
        return {"c_x": (1 - s_a) / (1 - s_e), "c_n": (s_a - s_e) / (1 - s_e)}
    c_x = a_a / a_e
    return {"c_x": c_x, "c_n": (s_a ** 2 - (c_x * s_e) ** 2).clamp(min=0).sqrt()}  # clamp: round-off at k_adv == k_end


def _renoise(x_end, n, c):
    """c_x x_end + c_n n in float32 with on()-moved coefficients, back in x_end's dtype."""
    c_x, c_n = col(c["c_x"], x_end), col(c["c_n"], x_end)
    return (c_x * x_end.float() + c_n * n.float()).to(x_end.dtype)


def output_grad_norms(xhat, terms, weights, into=None):
    """{"gn_<term>": ||d (w_term * term) / d xhat||} for every generator term: how hard each loss pulls the student's
    output (e.g. TC vs CD), one autograd.grad per term that keeps the graph; nothing when `into` is None."""
    if into is None or not xhat.requires_grad:
        return into
    for name, term in terms.items():
        g = torch.autograd.grad(weights[name] * term, xhat, retain_graph=True, allow_unused=True)[0]
        into[f"gn_{name}"] = 0.0 if g is None else g.float().norm().item()
    return into
