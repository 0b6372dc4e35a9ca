"""teacher.py: guidance (CFG / embedded / none), freezing, steps and full sampling against solver.py."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import solver
from teacher import Teacher, adjacent_x0_l1, embedded_guidance


class FakeModel(nn.Module):
    """Stand-in with the backbone call signature; records every call (batch, t, guidance)."""

    def __init__(self, prediction="vpred", guidance_embeds=None, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.7, -0.3, 0.2, 0.05], dtype=dtype))
        self.prediction = prediction
        self.config = SimpleNamespace() if guidance_embeds is None else SimpleNamespace(guidance_embeds=guidance_embeds)
        self.calls = []

    def forward(self, x, t, text=None, text_mask=None, pooled=None, guidance=None):
        self.calls.append(SimpleNamespace(B=x.shape[0], t=t.clone(), guidance=guidance))
        w = self.w.float()
        view = (-1, 1, 1, 1, 1)  # [B] -> [B, 1, 1, 1, 1]
        c = text.float().mean(dim=(1, 2)).view(view)
        tt = (t.float() / 1000).view(view)
        out = w[0] * torch.tanh(x.float()) * (1 + c) + w[1] * x.float() * tt + w[2] * c
        if guidance is not None:
            out = out + w[3] * guidance.float().view(view) / 1000 * x.float()
        return out.to(x.dtype)


def data(B=3, L=5, D=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, 3, 2, 2, generator=gen)
    cond = {"text": torch.randn(B, L, D, generator=gen)}
    uncond = {"text": torch.randn(1, L, D, generator=gen)}
    return x, cond, uncond


def test_cfg_equals_two_separate_calls_in_one_forward():
    x, cond, uncond = data()
    model = FakeModel()
    grid = solver.cogvideox_grid(10)
    teacher = Teacher(model, grid, guidance_scale=6.0, uncond=uncond)
    model.calls.clear()
    got = teacher.out(x, 7, cond)
    assert [c.B for c in model.calls] == [6]  # cond + uncond batched in ONE forward
    t = torch.full((3,), float(grid.t[8]))
    c = model(x, t, **cond)
    u = model(x, t, text=uncond["text"].expand(3, -1, -1))
    assert (got - (u + 6.0 * (c - u))).abs().max() < 1e-6
    assert (c - u).abs().max() > 0.1  # guidance has an effect here


def test_guidance_one_is_the_cond_output():
    x, cond, uncond = data()
    for unc in (None, uncond):
        model = FakeModel()
        teacher = Teacher(model, solver.cogvideox_grid(10), guidance_scale=1.0, uncond=unc)
        got = teacher.out(x, 4, cond)
        assert [c.B for c in model.calls] == [3]  # no uncond pass
        assert torch.equal(got, model(x, model.calls[0].t, **cond))


def test_teacher_is_frozen():
    model = FakeModel().train()
    x, cond, uncond = data()
    teacher = Teacher(model, solver.cogvideox_grid(10), uncond=uncond)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    x = x.requires_grad_(True)
    assert not teacher.out(x, 3, cond).requires_grad
    assert not teacher.step(x, 3, cond).requires_grad


@pytest.mark.parametrize("dtype,scale,expect", [(torch.bfloat16, 6.0, 6016.0), (torch.float32, 6.0, 6016.0),
                                                (torch.float32, 3.5, 3504.0)])
def test_embedded_guidance_passed_to_model(dtype, scale, expect):
    x, cond, _ = data()
    model = FakeModel("flow", guidance_embeds=True, dtype=dtype)
    grid = solver.flow_grid(10, 7.0)
    teacher = Teacher(model, grid, guidance_scale=scale)
    got = teacher.out(x, 9, cond)
    (call,) = model.calls  # one pass, no CFG
    assert call.B == 3 and call.guidance.dtype == dtype
    assert call.guidance.tolist() == [expect] * 3  # 1000*scale rounded through bf16 in every dtype (6000 -> 6016)
    assert torch.equal(call.t, torch.full((3,), float(grid.t[10]), dtype=torch.float32))
    # a low-precision teacher is called in its own dtype (no autocast casts)
    low = {k: v.to(dtype) for k, v in cond.items()}
    assert torch.equal(got, model(x.to(dtype), call.t, guidance=call.guidance, **low).float())


def test_embedded_guidance_is_one_value_in_every_dtype():
    assert embedded_guidance(6.0) == 6016.0  # what the authors' bf16 pipeline trains and samples with (DESIGN 2)
    for g in (1.0, 3.5, 6.0, 7.5):
        v = embedded_guidance(g)
        assert abs(v - 1000 * g) <= 1000 * g / 256  # bf16's rounding, no more
        assert all(float(torch.tensor(v, dtype=d)) == v for d in (torch.bfloat16, torch.float16, torch.float32))


def test_flow_model_without_guidance_embeds_gets_no_guidance():
    x, cond, _ = data()
    for cfg in (None, False):
        model = FakeModel("flow", guidance_embeds=cfg)
        Teacher(model, solver.flow_grid(10, 7.0)).out(x, 2, cond)
        assert model.calls[0].guidance is None and model.calls[0].B == 3
    with pytest.raises(ValueError, match="guidance_embeds"):
        Teacher(FakeModel("flow"), solver.flow_grid(10, 7.0), embedded_guidance=True)


def test_flow_model_with_cfg_when_asked():
    x, cond, uncond = data()
    model = FakeModel("flow", guidance_embeds=True)
    teacher = Teacher(model, solver.flow_grid(10, 7.0), guidance_scale=2.0, uncond=uncond, embedded_guidance=False)
    teacher.out(x, 2, cond)
    assert model.calls[0].B == 6 and model.calls[0].guidance is None


def test_bad_inputs_are_named():
    x, cond, uncond = data()
    grid = solver.cogvideox_grid(10)
    with pytest.raises(ValueError, match="uncond"):
        Teacher(FakeModel(), grid, guidance_scale=6.0)
    with pytest.raises(ValueError, match="predicts 'flow'"):
        Teacher(FakeModel("flow"), grid, uncond=uncond)
    teacher = Teacher(FakeModel(), grid, uncond=uncond)
    with pytest.raises(ValueError, match="keys"):
        teacher.out(x, 1, {**cond, "pooled": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="broadcast"):
        Teacher(FakeModel(), grid, uncond={"text": torch.zeros(2, 5, 4)}).out(x, 1, cond)
    with pytest.raises(ValueError, match="guidance"):
        teacher.out(x, 1, {**cond, "guidance": torch.ones(3)})
    with pytest.raises(ValueError, match=">= 0"):
        teacher.step(x, 0 - 1, cond)


@pytest.mark.parametrize("grid", [solver.cogvideox_grid(8), solver.flow_grid(8, 17.0)], ids=["vpred", "flow"])
def test_step_is_a_solver_jump_per_sample(grid):
    x, cond, uncond = data()
    model = FakeModel(grid.kind, guidance_embeds=True if grid.kind == "flow" else None)
    teacher = Teacher(model, grid, uncond=uncond)
    k = torch.tensor([7, 0, 4])
    got = teacher.step(x, k, cond)
    assert torch.allclose(got, solver.jump(x, teacher.out(x, k, cond), k, k - 1, grid), atol=1e-6)
    for b in range(3):
        one = teacher.step(x[b:b + 1], int(k[b]), {"text": cond["text"][b:b + 1]})
        assert torch.allclose(got[b:b + 1], one, atol=1e-6)


@pytest.mark.parametrize("grid", [solver.cogvideox_grid(6), solver.flow_grid(6, 7.0)], ids=["vpred", "flow"])
def test_sample_intermediates_follow_the_steps(grid):
    x, cond, uncond = data()
    teacher = Teacher(FakeModel(grid.kind), grid, uncond=uncond)
    out, xs, x0s = teacher.sample(x, cond, return_intermediates=True, end="grid", progress=False)
    assert len(xs) == grid.N + 1 and len(x0s) == grid.N
    assert torch.equal(out, xs[-1]) and torch.equal(xs[0], x)
    xk = x
    for i, k in enumerate(range(grid.N - 1, -1, -1)):
        _, a, s = grid.at(k)
        x0, _ = solver.to_x0_eps(xk, teacher.out(xk, k, cond), a, s, grid.kind)
        assert torch.allclose(x0s[i], x0, atol=1e-5)
        xk = teacher.step(xk, k, cond)
        assert torch.allclose(xs[i + 1], xk, atol=1e-5)
    assert torch.equal(teacher.sample(x, cond, end="grid", progress=False), out)
    # default end: sigma 0 (flow_grid's eps endpoint is not 0)
    clean = teacher.sample(x, cond, progress=False)
    assert torch.allclose(clean, x0s[-1], atol=1e-5)


def test_exact_straight_teacher_has_constant_x0_and_adjacent_l1():
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 2, 2, 3, 2, 2, generator=gen).unbind(0)

    class Straight(nn.Module):
        prediction = "flow"

        def forward(self, x, t, text=None):
            return eps - x0

    teacher = Teacher(Straight(), solver.flow_grid(12, 7.0))
    out, xs, x0s = teacher.sample(eps, {"text": torch.zeros(2, 1, 1)}, return_intermediates=True, progress=False)
    assert (out - x0).abs().max() < 1e-5
    d = adjacent_x0_l1(x0s)
    assert d.shape == (11,) and d.max() < 1e-5
    assert adjacent_x0_l1([torch.zeros(2), torch.ones(2), torch.full((2,), 3.0)]).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="at least 2"):
        adjacent_x0_l1([x0])


# ----------------------------------------------------------------------------- real tiny backbones

def _preset(name):
    import model
    torch.manual_seed(0)
    return model.build_transformer(name)


def test_tiny_cogvideox_teacher_cfg():
    net = _preset("tiny-cogvideox")
    D = net.config.text_embed_dim
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, net.config.in_channels, 3, 4, 4, generator=gen)
    cond, uncond = {"text": torch.randn(2, 6, D, generator=gen)}, {"text": torch.randn(1, 6, D, generator=gen)}
    grid = solver.grid_for(net.config, n=4)
    teacher = Teacher(net, grid, uncond=uncond)
    t = torch.full((2,), float(grid.t[4]))
    c, u = net(x, t, **cond), net(x, t, text=uncond["text"].expand(2, -1, -1))
    assert (teacher.out(x, 3, cond) - (u + 6.0 * (c - u))).abs().max() < 1e-4
    out = teacher.sample(x, cond, progress=False)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_tiny_hunyuan_teacher_embedded_guidance():
    net = _preset("tiny-hunyuan")
    cfg = net.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 2, 4, 4, generator=gen)
    cond = {"text": torch.randn(2, 5, cfg.text_embed_dim, generator=gen),
            "text_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
            "pooled": torch.randn(2, cfg.pooled_projection_dim, generator=gen)}
    grid = solver.grid_for(cfg, n=4)
    teacher = Teacher(net, grid)
    t = torch.full((2,), float(grid.t[3]))
    ref = net(x, t, guidance=torch.full((2,), 6016.0), **cond)  # the authors' bf16-rounded 1000 * 6.0
    assert torch.allclose(teacher.out(x, 2, cond), ref, atol=1e-6)
    no_g = net(x, t, guidance=torch.full((2,), 1000.0), **cond)
    assert (ref - no_g).abs().max() > 0  # the guidance input reaches the output
    out = teacher.sample(x, cond, progress=False)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_flow_model_without_guidance_embeds_uses_cfg_given_uncond():
    """The toy's teacher: a flow model with no guidance input, given `uncond`, is guided by real CFG,
    v = u + g (c - u) from one batched call, and its ODE step is the Euler step with that v."""
    x, cond, uncond = data()
    grid, g, k = solver.flow_grid(10, 3.0), 3.5, 6
    for cfg in (None, False):
        model = FakeModel("flow", guidance_embeds=cfg)
        teacher = Teacher(model, grid, guidance_scale=g, uncond=uncond)
        assert teacher.mode == "cfg" and Teacher(model, grid, 1.0, uncond).mode == "none"
        t = grid.at(k)[0].float().expand(3)
        with torch.no_grad():
            c = model(x, t, text=cond["text"])
            u = model(x, t, text=uncond["text"].expand(3, -1, -1))
        model.calls.clear()
        v = teacher.out(x, k, cond)
        assert len(model.calls) == 1 and model.calls[0].B == 6 and model.calls[0].guidance is None
        torch.testing.assert_close(v, u + g * (c - u))
        ds = float(grid.sigma[k] - grid.sigma[k + 1])  # sigma at index k-1 minus sigma at k
        torch.testing.assert_close(teacher.step(x, k, cond), x + ds * (u + g * (c - u)))


def test_tiny_wan_teacher_cfg_by_default():
    """Wan (flow, no guidance embedding) guides by CFG: the authors' cond + 5 (cond - uncond) = u + 6 (c - u)."""
    net = _preset("tiny-wan")
    D = net.config.text_dim
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, net.config.in_channels, 2, 4, 4, generator=gen)
    cond, uncond = {"text": torch.randn(2, 6, D, generator=gen)}, {"text": torch.randn(1, 6, D, generator=gen)}
    grid = solver.grid_for(net.config, n=4)
    with pytest.raises(ValueError, match="needs `uncond`"):
        Teacher(net, grid)
    teacher = Teacher(net, grid, uncond=uncond)
    assert teacher.mode == "cfg"
    t = torch.full((2,), float(grid.t[4]))
    with torch.no_grad():
        c, u = net(x, t, **cond), net(x, t, text=uncond["text"].expand(2, -1, -1))
    assert (teacher.out(x, 3, cond) - (c + 5.0 * (c - u))).abs().max() < 1e-5
    assert Teacher(net, grid, guidance_scale=1.0).mode == "none"


def test_flow_teacher_without_guidance_input_takes_a_cfg_step_by_the_formula():
    """The toy's teacher kind (flow, no guidance input, trained with condition dropout): its guided output is
    u + s (c - u) from one batched call, and its step k -> k-1 is the flow Euler step x + (sigma_{k-1} - sigma_k) v
    with that v."""
    x, cond, uncond = data()
    model = FakeModel("flow", guidance_embeds=False)
    grid = solver.flow_grid(10, 3.0)
    teacher = Teacher(model, grid, guidance_scale=1.5, uncond=uncond)
    model.calls.clear()
    got = teacher.step(x, 7, cond)
    assert [(c.B, c.guidance) for c in model.calls] == [(6, None)]  # cond + uncond in one call, no guidance input
    (t7, _, s7), (_, _, s6) = grid.at(7), grid.at(6)
    t = torch.full((3,), float(t7))
    c, u = model(x, t, **cond), model(x, t, text=uncond["text"].expand(3, -1, -1))
    v = u + 1.5 * (c - u)
    want = x + (float(s6) - float(s7)) * v
    assert (got - want).abs().max() < 1e-6 and (c - u).abs().max() > 0.1
