"""The frozen teacher: a pretrained backbone, its guidance, and its ODE solver on the N-step grid (DESIGN sec. 1).

Guidance, per architecture:
- CFG (CogVideoX, v-prediction; Wan2.1, flow): out = u + g * (c - u), cond and uncond batched in one
  forward; the unconditional conditioning is given once with batch 1 and broadcast to the batch.
- embedded guidance (HunyuanVideo): the model takes guidance = 1000 * g (bf16-rounded, `embedded_guidance`)
  as an input, one pass.
- none: a flow model whose config has no `guidance_embeds`, or g = 1 with CFG.
"""
import torch

import solver


def _model_dtype(model, x):
    """dtype of the model's first floating parameter (x's dtype for a parameter-free model)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    for p in params:
        if p.is_floating_point():
            return p.dtype
    return x.dtype


def embedded_guidance(scale):
    """The embedded-guidance input for scale g: 1000*g rounded through bf16 (6.0 -> 6016), the value the authors
    train and sample HunyuanVideo with (its bf16 pipeline casts it); one value in every dtype, so a student is
    trained and sampled at the teacher's guidance (DESIGN sec. 2)."""
    return float(torch.tensor(1000.0 * scale, dtype=torch.float32).to(torch.bfloat16))


def uses_cfg(model):
    """True for a teacher guided by CFG: v-prediction models and backbones declaring `guidance = "cfg"` (Wan)."""
    return getattr(model, "prediction", None) == "vpred" or getattr(model, "guidance", None) == "cfg"


class Teacher:
    """Frozen teacher v_T(x, t, cond) with guidance and one solver step per grid index (DESIGN sec. 1, step 4)."""

    def __init__(self, model, grid, guidance_scale=6.0, uncond=None, embedded_guidance=None):
        """embedded_guidance: None = by model (`uses_cfg`: CFG; other flow models: embedded if
        config.guidance_embeds, else none), True = embedded (the config must have guidance_embeds), False = CFG."""
        pred = getattr(model, "prediction", None)
        if pred is not None and pred != grid.kind:
            raise ValueError(f"model predicts {pred!r} but the grid is {grid.kind!r}")
        has_embeds = bool(getattr(getattr(model, "config", None), "guidance_embeds", False))
        if embedded_guidance and not has_embeds:
            raise ValueError("embedded_guidance=True but the model's config has no guidance_embeds")
        if embedded_guidance is None:
            # flow models guide through their embedding when they have one; v-pred models and Wan use CFG
            embedded_guidance = grid.kind == "flow" and not uses_cfg(model)
        if embedded_guidance:
            self.mode = "embedded" if has_embeds else "none"
        else:
            self.mode = "cfg" if guidance_scale != 1 else "none"
        if self.mode == "cfg" and uncond is None:
            raise ValueError(f"CFG with guidance_scale={guidance_scale} needs `uncond` (dict of batch-1 "
                             "cond tensors); pass guidance_scale=1 for no guidance")
        if isinstance(model, torch.nn.Module):
            model.eval().requires_grad_(False)
        self.model = model
        self.grid = grid
        self.guidance_scale = float(guidance_scale)
        self.uncond = uncond

    def _cond2(self, cond, B):
        """cond and broadcast uncond concatenated on the batch dim: each [B, ...] -> [2B, ...]."""
        if set(cond) != set(self.uncond):
            raise ValueError(f"cond keys {sorted(cond)} != uncond keys {sorted(self.uncond)}")
        out = {}
        for key, c in cond.items():
            u = self.uncond[key]
            if u.shape[0] not in (1, B) or u.shape[1:] != c.shape[1:]:
                raise ValueError(f"uncond[{key!r}] shape {tuple(u.shape)} does not broadcast to cond "
                                 f"shape {tuple(c.shape)} (needs batch 1 or {B}, same trailing dims)")
            u = u.to(device=c.device, dtype=c.dtype).expand(B, *c.shape[1:])
            out[key] = torch.cat([c, u])
        return out

    def _call(self, x, t, **cond):
        """The model in its own dtype: a bf16/fp16 teacher runs without autocast, which would only add
        fp32 casts around its norms (H100, CogVideoX-2B CFG call at the training shape: 0.36 -> 0.31 s)."""
        dtype = _model_dtype(self.model, x)
        if dtype not in (torch.bfloat16, torch.float16):
            return self.model(x, t, **cond)
        cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        with torch.autocast(x.device.type, enabled=False):
            return self.model(cast(x), t, **{k: cast(v) for k, v in cond.items()})

    @torch.no_grad()
    def guided(self, x, t, cond):
        """Guided model output at model-native times t [B] (float32 result)."""
        B = x.shape[0]
        if "guidance" in cond:
            raise ValueError("cond must not hold 'guidance': the teacher sets it from guidance_scale")
        if self.mode == "cfg":
            out = self._call(torch.cat([x, x]), torch.cat([t, t]), **self._cond2(cond, B)).float()
            c, u = out[:B], out[B:]  # [2B, ...] -> cond [B, ...], uncond [B, ...]
            return u + self.guidance_scale * (c - u)
        if self.mode == "embedded":
            g = torch.full((B,), embedded_guidance(self.guidance_scale), device=x.device,
                           dtype=_model_dtype(self.model, x))
            return self._call(x, t, guidance=g, **cond).float()
        return self._call(x, t, **cond).float()

    def _t(self, x, k):
        """Model-native t [B] float32 at grid index k (int or LongTensor [B])."""
        t, _, _ = self.grid.at(k)
        return t.to(device=x.device, dtype=torch.float32, non_blocking=x.device.type != "cpu").expand(x.shape[0]).contiguous()

    @torch.no_grad()
    def out(self, x, k, cond):
        """Guided model output at grid index k."""
        return self.guided(x, self._t(x, k), cond)

    @torch.no_grad()
    def step(self, x_k, k, cond):
        """One teacher ODE step: the point at grid index k-1 (DESIGN sec. 1, step 4)."""
        if isinstance(k, torch.Tensor) and k.device.type != "cpu":  # device indices: checked without a host sync
            torch._assert_async((k >= 0).all(), "Teacher.step needs grid indices >= 0")
        elif (k < 0).any() if isinstance(k, torch.Tensor) else k < 0:
            raise ValueError("Teacher.step needs grid indices >= 0 (k = -1 is the endpoint)")
        return solver.jump(x_k, self.out(x_k, k, cond), k, k - 1, self.grid)

    @torch.no_grad()
    def sample(self, x, cond, return_intermediates=False, end="zero", progress=True, callback=None):
        """Full N-step sampling from x at k = N-1 down to the clean end (`end` as in solver.sample_points).

        With return_intermediates: (x, xs, x0s), xs = the N+1 points x_{N-1} .. x_end,
        x0s = the N per-step x0 predictions (paper Fig. 10). callback(i, x_next, x0) as in solver.sample.
        """
        t, alpha, sigma = solver.sample_points(self.grid, range(self.grid.N - 1, -1, -1), end=end)
        xs, x0s = [x], []

        def keep(i, x_next, x0):
            if return_intermediates:
                xs.append(x_next)
                x0s.append(x0)
            if callback is not None:
                callback(i, x_next, x0)

        x = solver.sample(lambda xx, tt: self.guided(xx, tt, cond), x, t, alpha, sigma, self.grid.kind,
                          callback=keep, progress=progress)
        return (x, xs, x0s) if return_intermediates else x


def adjacent_x0_l1(x0_preds):
    """Mean |x0_{i+1} - x0_i| between adjacent steps' x0 predictions -> float [len-1] (paper Fig. 10)."""
    if len(x0_preds) < 2:
        raise ValueError(f"adjacent_x0_l1 needs at least 2 predictions, got {len(x0_preds)}")
    return torch.stack([(b.float() - a.float()).abs().mean() for a, b in zip(x0_preds, x0_preds[1:])])
