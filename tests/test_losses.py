"""losses.py: consistency / temporal-coherence / GAN / feature-matching losses and re-noising."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import latents
import losses
import model
import solver
from losses import (Discriminator, consistency_loss, consistency_target, d_hinge_loss, feature_matching_loss,
                    g_hinge_loss, renoise, temporal_coherence_loss)
from teacher import Teacher


def test_pseudo_huber_is_quadratic_for_small_and_linear_for_large_errors():
    c, x = 1e-3, torch.zeros(2, 3, 4, 5, 6)
    small = torch.full_like(x, 1e-5)
    assert consistency_loss(x + small, x, c=c).item() == pytest.approx(1e-10 / (2 * c), rel=1e-4)  # ~ d^2 / 2c (exact: 4.999875e-8)
    large = torch.full_like(x, 10.0)
    assert consistency_loss(x + large, x, c=c).item() == pytest.approx(10.0 - c, rel=1e-6)  # ~ |d| - c
    d = torch.randn_like(x)
    assert consistency_loss(x + d, x, kind="l2").item() == pytest.approx(d.square().mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        consistency_loss(x, x, kind="l1")


@pytest.mark.parametrize("grid", [solver.flow_grid(50, 17.0), solver.cogvideox_grid(50)], ids=["flow", "vpred"])
def test_consistency_target_is_per_sample_with_boundary_identity(grid):
    torch.manual_seed(0)
    x, out = torch.randn(4, 2, 3, 2, 2), torch.randn(4, 2, 3, 2, 2)
    k_prev, k_end = torch.tensor([37, 20, 45, 37]), torch.tensor([-1, -1, 37, 37])  # last: k-1 is the end
    tgt = consistency_target(x, out, k_prev, k_end, grid)
    assert torch.equal(tgt[3], x[3])
    for i in range(3):
        torch.testing.assert_close(tgt[i:i + 1], solver.jump(x[i:i + 1], out[i:i + 1], int(k_prev[i]), int(k_end[i]), grid))
    assert not torch.allclose(tgt[:3], x[:3])


def test_temporal_coherence_zero_for_frame_constant_offset_positive_otherwise():
    torch.manual_seed(0)
    x_tgt = torch.randn(2, 3, 7, 4, 4)
    offset = torch.randn(2, 3, 1, 4, 4)  # the same in every frame
    assert temporal_coherence_loss(x_tgt + offset, x_tgt).item() < 1e-12
    ramp = torch.arange(7.0).view(1, 1, 7, 1, 1) * 0.1  # grows frame by frame
    assert temporal_coherence_loss(x_tgt + ramp, x_tgt, d=3).item() == pytest.approx(0.09, rel=1e-4)
    short = torch.randn(1, 2, 3, 2, 2, requires_grad=True)  # F <= d: exactly 0, backward still works
    loss = temporal_coherence_loss(short, short.detach() + 1, d=3)
    loss.backward()
    assert loss.item() == 0 and torch.equal(short.grad, torch.zeros_like(short))


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), F=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5))
def test_discriminator_heads_accept_any_token_grid(B, F, h, w):
    # GroupNorm(groups) needs hidden % groups == 0: the authors' hidden 1024 / 32 groups; tiny: 32 / 8
    D = Discriminator(dim=8, n_taps=2, hidden=32, groups=8)
    feats = [torch.randn(B, F * h * w, 8) for _ in range(2)]
    logits = D(feats, (F, h, w))
    assert [tuple(lg.shape) for lg in logits] == [(B, F * h * w)] * 2
    # token order kept: changing the last token's feature moves only its own frame's logits
    # (GroupNorm mixes the tokens of one frame), never another frame's
    feats2 = [f.clone() for f in feats]
    feats2[0][:, -1] += 1
    diff = (D(feats2, (F, h, w))[0] - logits[0]).abs()
    assert bool((diff[:, : (F - 1) * h * w] == 0).all()) and diff[:, -1].min() > 0
    with pytest.raises(ValueError, match="token grid"):
        D(feats, (F, h, w + 1))


def test_discriminator_rejects_bad_groups():
    with pytest.raises(ValueError, match="hidden % 32"):
        Discriminator(dim=8, n_taps=1, hidden=48)


def test_hinge_losses_send_grads_to_the_right_side():
    torch.manual_seed(0)
    gen = torch.nn.Linear(8, 8)  # stands in for the student + frozen teacher feature path
    D = Discriminator(dim=8, n_taps=2, hidden=32, groups=8)
    z, real = torch.randn(2, 12, 8), [torch.randn(2, 12, 8) for _ in range(2)]
    grid = (3, 2, 2)
    # D step: fake features detached
    fake = [gen(z) for _ in range(2)]
    d_loss = d_hinge_loss(D(real, grid), D([f.detach() for f in fake], grid))
    d_loss.backward()
    # (not every single grad is nonzero: the out bias gets mean(1[fake>-1]) - mean(1[real<1]) = 0 here)
    assert all(p.grad is not None for p in D.parameters()) and sum(p.grad.abs().sum() for p in D.parameters()) > 0
    assert all(p.grad is None for p in gen.parameters())
    # G step: D frozen
    D.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    g_loss = g_hinge_loss(D([gen(z) for _ in range(2)], grid))
    g_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert all(p.grad is None for p in D.parameters())
    # values: hinge at logits +-1 margins
    assert d_hinge_loss([torch.full((1, 4), 2.0)], [torch.full((1, 4), -2.0)]).item() == 0
    assert d_hinge_loss([torch.zeros(1, 4)] * 3, [torch.zeros(1, 4)] * 3).item() == 2.0  # averaged over heads
    assert g_hinge_loss([torch.full((1, 4), -1.0)]).item() == 2.0


@pytest.mark.parametrize("preset", ["tiny-cogvideox", "tiny-wan"])
def test_feature_matching_zero_for_identical_and_positive_otherwise(preset):
    torch.manual_seed(0)
    m = model.build_transformer(preset)
    grid, D = (3, 4, 4), 32
    feats = [torch.randn(2, 3 * 2 * 2, D) for _ in range(2)]
    temb = m.time_embed(torch.tensor([500.0, 900.0]))
    assert feature_matching_loss(m, feats, [f.clone() for f in feats], temb, grid).item() == 0
    fake = [(f + 0.1 * torch.randn_like(f)).requires_grad_() for f in feats]
    loss = feature_matching_loss(m, fake, feats, temb, grid)
    loss.backward()
    assert loss.item() > 0 and all(f.grad.abs().sum() > 0 for f in fake)


def test_renoise_flow_matches_authors_formula():
    grid = solver.flow_grid(50, 17.0)
    torch.manual_seed(0)
    x, n = torch.randn(3, 2, 2, 2, 2), torch.randn(3, 2, 2, 2, 2)
    k_end, k_adv = torch.tensor([-1, -1, 37]), torch.tensor([10, -1, 45])
    out = renoise(x, n, k_end, k_adv, grid)
    for i in range(3):
        s_e, s_a = float(grid.at(int(k_end[i]))[2]), float(grid.at(int(k_adv[i]))[2])
        torch.testing.assert_close(out[i], ((1 - s_a) * x[i] + (s_a - s_e) * n[i]) / (1 - s_e))
    assert torch.equal(out[1], x[1])  # k_adv == k_end: unchanged


def test_renoise_vpred_is_the_exact_gaussian_transition():
    grid = solver.cogvideox_grid(50, 3.0)
    g = torch.Generator().manual_seed(0)
    x0, eps, n = (torch.randn(2, 1, 64, 64, 64, generator=g) for _ in range(3))
    k_end, k_adv = torch.tensor([5, -1]), torch.tensor([30, 20])
    _, a_e, s_e = grid.at(k_end)
    x_end = a_e.float().view(-1, 1, 1, 1, 1) * x0 + s_e.float().view(-1, 1, 1, 1, 1) * eps
    out = renoise(x_end, n, k_end, k_adv, grid)
    _, a_a, s_a = grid.at(k_adv)
    # x_adv must be a_adv * x0 + (Gaussian noise of std sigma_adv)
    resid = out - a_a.float().view(-1, 1, 1, 1, 1) * x0
    for i in range(2):
        assert resid[i].std().item() == pytest.approx(float(s_a[i]), rel=0.01)
    with pytest.raises(ValueError, match="k_adv must be >= k_end"):
        renoise(x_end, n, k_adv, k_end, grid)


class Linear(torch.nn.Module):
    """v = w0 x + w1 t / 1000 + w2 mean(text): a stand-in backbone that logs (name, grad enabled) per call."""

    def __init__(self, name, log, prediction, seed):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(seed)))
        self.name, self.log, self.prediction, self.config = name, log, prediction, None

    def forward(self, x, t, text):
        self.log.append((self.name, torch.is_grad_enabled()))
        view = (-1, 1, 1, 1, 1)  # [B] -> [B, 1, 1, 1, 1]
        return self.w[0] * x + self.w[1] * (t / 1000).view(view) + self.w[2] * text.mean(dim=(1, 2)).view(view)


@pytest.mark.parametrize("grid", [solver.flow_grid(10, 3.0), solver.cogvideox_grid(10)], ids=["flow", "vpred"])
def test_consistency_step_targets_per_sample_and_grads_reach_only_the_student(grid):
    log = []
    student, target, tmodel = (Linear(n, log, grid.kind, i) for i, n in enumerate(("student", "target", "teacher")))
    teacher = Teacher(tmodel, grid, guidance_scale=1.0)  # frozen, no guidance
    g = torch.Generator().manual_seed(0)
    x0, eps, cond = torch.randn(3, 2, 3, 2, 2, generator=g), torch.randn(3, 2, 3, 2, 2, generator=g), \
        {"text": torch.randn(3, 4, 5, generator=g)}
    k = torch.tensor([6, 5, 2])  # boundary 5: k = 6 ends at 5 = k-1 (target = the teacher's point), 5 and 2 at -1
    loss, xhat, x_tgt, k_end = losses.consistency_step(student, target, teacher, grid, [5], x0, eps, k, cond, cond)
    # the teacher step and the target run first, without grad; then the student, with grad
    assert log == [("teacher", False), ("target", False), ("student", True)]
    assert k_end.tolist() == [5, -1, -1]
    with torch.no_grad():  # DESIGN sec. 1 steps 2-5 written out
        t, a, s = grid.at(k)
        x_k = a.float().view(-1, 1, 1, 1, 1) * x0 + s.float().view(-1, 1, 1, 1, 1) * eps
        x_prev = solver.jump(x_k, tmodel(x_k, t.float(), **cond), k, k - 1, grid)
        want = solver.jump(x_prev, target(x_prev, grid.at(k - 1)[0].float(), **cond), k - 1, k_end, grid)
        torch.testing.assert_close(xhat, solver.jump(x_k, student(x_k, t.float(), **cond), k, k_end, grid))
    assert torch.equal(x_tgt[0], x_prev[0].to(x_tgt.dtype))
    torch.testing.assert_close(x_tgt[1:], want[1:])
    assert loss.item() == pytest.approx(consistency_loss(xhat, x_tgt).item())
    loss.backward()
    assert student.w.grad.abs().sum() > 0 and target.w.grad is None and tmodel.w.grad is None
    assert xhat.requires_grad and not x_tgt.requires_grad


@pytest.mark.parametrize("preset", ["tiny-cogvideox", "tiny-wan"])
def test_adversarial_terms_send_gradients_to_xhat_only_and_d_loss_is_the_hinge(preset):
    torch.manual_seed(0)
    m = model.build_transformer(preset).requires_grad_(False)  # the frozen teacher
    cfg, grid = m.config, solver.grid_for(m.config, 10)
    disc = Discriminator.for_model(m, hidden=32)
    assert disc.n_taps == len(m.default_taps())
    x_tgt, n = torch.randn(2, cfg.in_channels, 3, 4, 6), torch.randn(2, cfg.in_channels, 3, 4, 6)
    xhat = (x_tgt + 0.3 * torch.randn_like(x_tgt)).requires_grad_(True)
    cond, tok = {"text": torch.randn(2, 8, latents.text_width(cfg))}, (3, 2, 3)  # latent (3, 4, 6) in 2x2 patches
    k_end, k_adv = torch.tensor([-1, -1]), torch.tensor([3, 7])
    g_loss, fm_loss, (fake_f, real_f) = losses.adversarial_terms(m, disc, x_tgt, xhat, n, k_end, k_adv, grid, cond, tok)
    (g_loss + fm_loss).backward()
    assert xhat.grad.abs().sum() > 0 and fm_loss > 0
    assert all(p.grad is None for p in [*m.parameters(), *disc.parameters()])
    assert all(p.requires_grad for p in disc.parameters())  # D trains again in its own step
    assert not any(f.requires_grad for f in fake_f + real_f)
    d = losses.discriminator_loss(disc, (fake_f, real_f), tok)  # one batched forward of fake and real
    torch.testing.assert_close(d, d_hinge_loss(disc(real_f, tok), disc(fake_f, tok)))
    d.backward()
    assert all(p.grad is not None for p in disc.parameters())
    # xhat on the target: the same re-noised input, so feature matching is exactly 0
    same = losses.adversarial_terms(m, disc, x_tgt, x_tgt.clone().requires_grad_(True), n, k_end, k_adv, grid, cond, tok)
    assert same[1].item() == 0


@pytest.mark.parametrize("kind", ["flow", "vpred"])
def test_diffusion_time_and_loss(kind):
    grid = solver.cogvideox_grid(1000) if kind == "vpred" else None
    u = torch.tensor([0.0, 0.5, 0.999999], dtype=torch.float64)
    t, a, s = losses.diffusion_time(u, kind, grid)
    if kind == "flow":  # logit-normal: the median sigma is 1/2
        assert s[1] == 0.5 and torch.equal(t, 1000 * s) and torch.equal(a, 1 - s) and s[0] == 0 and s[2] > 0.99
    else:  # every one of the 1000 training timesteps, ends included
        assert t.tolist() == [float(grid.t[1]), float(grid.t[501]), float(grid.t[1000])]
    # a model that outputs the loss's target recovers x0 and eps through the solver's own conversion: loss 0
    x0, eps = torch.randn(3, 2, 2, 2, 2), torch.randn(3, 2, 2, 2, 2)
    u = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    t, a, s = losses.diffusion_time(u, kind, grid)

    ac, sc = a.float().view(-1, 1, 1, 1, 1), s.float().view(-1, 1, 1, 1, 1)  # [B] -> [B, 1, 1, 1, 1]

    def oracle(x, tt, **cond):
        return eps - x0 if kind == "flow" else ac * eps - sc * x0
    assert losses.diffusion_loss(oracle, x0, eps, t, a, s, kind, {}).item() == 0
    x_t = ac * x0 + sc * eps
    x0_back, eps_back = solver.to_x0_eps(x_t, oracle(x_t, t), a, s, kind)
    torch.testing.assert_close(x0_back, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_back, eps, atol=1e-5, rtol=1e-5)


def test_ema_update_moves_trainable_parameters_only():
    ema, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    student.bias.requires_grad_(False)
    w0, b0 = ema.weight.detach().clone(), ema.bias.detach().clone()
    losses.ema_update(ema, student, 0.9)
    torch.testing.assert_close(ema.weight, 0.9 * w0 + 0.1 * student.weight)
    assert torch.equal(ema.bias, b0)


def test_output_grad_norms_are_each_weighted_terms_gradient_at_the_output():
    g = torch.Generator().manual_seed(0)
    xhat = torch.randn(2, 3, 4, 2, 2, generator=g).requires_grad_()
    y = torch.randn(2, 3, 4, 2, 2, generator=g)
    terms = {"cd": losses.consistency_loss(xhat, y, "l2"), "tc": losses.temporal_coherence_loss(xhat, y, d=1)}
    got = losses.output_grad_norms(xhat, terms, {"cd": 1.0, "tc": 3.0}, into={})
    assert got["gn_cd"] == pytest.approx((2 * (xhat - y) / xhat.numel()).norm().item(), rel=1e-5)  # d mean(d^2)
    ref = torch.autograd.grad(3.0 * losses.temporal_coherence_loss(xhat, y, d=1), xhat)[0]
    assert got["gn_tc"] == pytest.approx(ref.norm().item(), rel=1e-5)
    sum(terms.values()).backward()  # the graph is kept for the training step's backward
    assert xhat.grad is not None and losses.output_grad_norms(xhat, terms, {"cd": 1.0, "tc": 1.0}) is None


def test_discriminator_stats_accuracy_and_loss():
    real = [torch.tensor([[2.0, -1.0, 0.5, 3.0]])]  # 3 of 4 real tokens scored > 0
    fake = [torch.tensor([[-2.0, 1.0, 0.5, 3.0]])]  # 1 of 4 fake tokens scored < 0
    disc = lambda feats, grid: feats  # noqa: E731 - the logits are its input: [fake; real] per head
    loss, acc_real, acc_fake = losses.discriminator_stats(disc, ([fake[0]], [real[0]]), None)
    assert acc_real.item() == 0.75 and acc_fake.item() == 0.25
    assert loss.item() == pytest.approx(losses.d_hinge_loss(real, fake).item())


@pytest.mark.parametrize("grid", [solver.flow_grid(10, 3.0), solver.cogvideox_grid(10)], ids=["flow", "vpred"])
def test_teacher_endpoint_is_each_samples_own_teacher_solution(grid):
    """losses.teacher_endpoint (train.py --gan-real teacher): every sample of the batch ends where the teacher's ODE
    from its own x_k ends, solved alone one step per index down to the clean end (k + 1 steps)."""
    log = []
    tmodel = Linear("teacher", log, grid.kind, 3)
    teacher = Teacher(tmodel, grid, guidance_scale=1.0)
    g = torch.Generator().manual_seed(0)
    x0, eps, cond = torch.randn(3, 2, 3, 2, 2, generator=g), torch.randn(3, 2, 3, 2, 2, generator=g), \
        {"text": torch.randn(3, 4, 5, generator=g)}
    k = torch.tensor([6, 0, 3])
    got = losses.teacher_endpoint(teacher, x0, eps, k, cond, grid)
    assert len(log) == 7  # one batched call per index from max(k) = 6 down to 0
    for i in range(3):
        _, a, s = grid.at(k[i:i + 1])
        x = float(a) * x0[i:i + 1] + float(s) * eps[i:i + 1]
        for j in range(int(k[i]), -1, -1):
            x = teacher.step(x, j, {"text": cond["text"][i:i + 1]})
        torch.testing.assert_close(got[i:i + 1], x, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, x0)  # the teacher's solution, not the data
