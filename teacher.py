"""The frozen teacher: a pretrained backbone, its guidance, and its ODE solver on the N-step grid (DESIGN sec. 1).

Guidance, per architecture:
- CFG (CogVideoX, v-prediction; Wan2.1, flow): out = u + g * (c - u), cond and uncond batched in one
  forward; the unconditional conditioning is given once with batch 1 and broadcast to the batch.
- embedded guidance (HunyuanVideo): the model takes guidance = 1000 * g (bf16-rounded, `embedded_guidance`)
  as an input, one pass.
- CFG also for a flow model whose config has no `guidance_embeds` when it is given `uncond` (the toy's teacher,
  trained with condition dropout);
- none: such a flow model without `uncond`, or g = 1 with CFG.
The image condition of an image-to-video model (`image_latents`, `image_embeds`) goes to both CFG branches, as
WanImageToVideoPipeline does: only the text differs between them.

Two experts (Wan2.2-A14B, DESIGN.md section 12): `model` answers t >= boundary_t (the high-noise expert, scale g),
`model_2` the rest (the low-noise expert, scale g2), per sample, exactly as WanPipeline switches at
boundary_ratio * 1000.
"""
import torch

import solver

IMAGE_KEYS = ("image_latents", "image_embeds")  # an image-to-video model's condition: the same in both CFG branches


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

    def __init__(self, model, grid, guidance_scale=6.0, uncond=None, embedded_guidance=None, model_2=None,
                 boundary_t=None, guidance_scale_2=None):
        """embedded_guidance: None = by model (`uses_cfg`: CFG; other flow models: embedded if
        config.guidance_embeds, else CFG when `uncond` is given, else none), True = embedded (the config must have
        guidance_embeds), False = CFG. model_2, boundary_t, guidance_scale_2 (default g): a second expert for
        t < bound_t (CFG teachers only)."""
        pred = getattr(model, "prediction", None)
        if pred is not None and pred != grid.kind:
            raise ValueError(f"model predicts {pred!r} but the grid is {grid.kind!r}")
        has_embeds = bool(getattr(getattr(model, "config", None), "guidance_embeds", False))
        if embedded_guidance and not has_embeds:
            raise ValueError("embedded_guidance=True but the model's config has no guidance_embeds")
        if embedded_guidance is None:
            # flow models guide through their embedding when they have one, else by CFG if given `uncond`;
            # v-pred models and Wan use CFG
            embedded_guidance = grid.kind == "flow" and not uses_cfg(model) and (has_embeds or uncond is None)
        if embedded_guidance:
            self.mode = "embedded" if has_embeds else "none"
        else:
            self.mode = "cfg" if guidance_scale != 1 else "none"
        if self.mode == "cfg" and uncond is None:
            raise ValueError(f"CFG with guidance_scale={guidance_scale} needs `uncond` (dict of batch-1 "
                             "cond tensors); pass guidance_scale=1 for no guidance")
        if (model_2 is None) != (boundary_t is None) or (model_2 is not None and self.mode == "embedded"):
            raise ValueError("a second expert needs boundary_t (and CFG, as Wan2.2), and boundary_t a second expert")
        for m in (model, model_2):
            if isinstance(m, torch.nn.Module):
                m.eval().requires_grad_(False)
        self.model, self.model_2 = model, model_2
        self.boundary_t = None if boundary_t is None else float(boundary_t)
        self.grid = grid
        self.guidance_scale = float(guidance_scale)
        self.guidance_scale_2 = self.guidance_scale if guidance_scale_2 is None else float(guidance_scale_2)
        self.uncond = uncond
        if self.mode == "none" and model_2 is not None and self.guidance_scale_2 != 1:
            self.mode = "cfg"
            if uncond is None:
                raise ValueError(f"CFG with guidance_scale_2={guidance_scale_2} needs `uncond`")

    def experts(self):
        """The frozen models this teacher calls."""
        return [m for m in (self.model, self.model_2) if m is not None]

    def _cond2(self, cond, B):
        """cond and broadcast uncond concatenated on the batch dim: each [B, ...] -> [2B, ...] (the image condition
        in both halves)."""
        if set(cond) - set(IMAGE_KEYS) != set(self.uncond) - set(IMAGE_KEYS):
            raise ValueError(f"cond keys {sorted(cond)} != uncond keys {sorted(self.uncond)}")
        out = {}
        for key, c in cond.items():
            if key in IMAGE_KEYS:
                out[key] = torch.cat([c, c])
                continue
            u = self.uncond[key]
            if u.shape[0] not in (1, B) or u.shape[1:] != c.shape[1:]:
                raise ValueError(f"uncond[{key!r}] shape {tuple(u.shape)} does not broadcast to cond "
                                 f"shape {tuple(c.shape)} (needs batch 1 or {B}, same trailing dims)")
            u = u.to(device=c.device, dtype=c.dtype).expand(B, *c.shape[1:])
            out[key] = torch.cat([c, u])
        return out

    def _call(self, model, x, t, **cond):
        """The model in its own dtype: a bf16/fp16 teacher runs without autocast, which would only add
        fp32 casts around its norms (H100, CogVideoX-2B CFG call at the training shape: 0.36 -> 0.31 s)."""
        dtype = _model_dtype(model, x)
        if dtype not in (torch.bfloat16, torch.float16):
            return model(x, t, **cond)
        cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        with torch.autocast(x.device.type, enabled=False):
            return model(cast(x), t, **{k: cast(v) for k, v in cond.items()})

    def _guided_by(self, model, scale, x, t, cond):
        B = x.shape[0]
        if self.mode == "cfg":
            out = self._call(model, torch.cat([x, x]), torch.cat([t, t]), **self._cond2(cond, B)).float()
            c, u = out[:B], out[B:]  # [2B, ...] -> cond [B, ...], uncond [B, ...]
            return u + scale * (c - u)
        if self.mode == "embedded":
            g = torch.full((B,), embedded_guidance(scale), device=x.device, dtype=_model_dtype(model, x))
            return self._call(model, x, t, guidance=g, **cond).float()
        return self._call(model, x, t, **cond).float()

    @torch.no_grad()
    def guided(self, x, t, cond):
        """Guided model output at model-native times t [B] (float32 result); two experts: each sample by its t."""
        if "guidance" in cond:
            raise ValueError("cond must not hold 'guidance': the teacher sets it from guidance_scale")
        if self.model_2 is None:
            return self._guided_by(self.model, self.guidance_scale, x, t, cond)
        high = (t.float() >= self.boundary_t).cpu()  # WanPipeline: t >= boundary_ratio * 1000 -> `transformer`
        if bool(high.all()) or not bool(high.any()):
            on_high = bool(high.all())
            return self._guided_by(self.model if on_high else self.model_2,
                                   self.guidance_scale if on_high else self.guidance_scale_2, x, t, cond)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for model, scale, rows in ((self.model, self.guidance_scale, high), (self.model_2, self.guidance_scale_2, ~high)):
            idx = rows.nonzero()[:, 0].to(x.device)
            sub = {k: v[idx] if torch.is_tensor(v) and v.dim() and v.shape[0] == x.shape[0] else v
                   for k, v in cond.items()}
            out[idx] = self._guided_by(model, scale, x[idx], t[idx], sub)
        return out

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
        x = with_image_frame(x, cond)
        return (x, xs, x0s) if return_intermediates else x


def with_image_frame(x, cond):
    """x [B, C, F, H, W] with a first-frame image condition (TI2V: `image_latents` [B, C, 1, H, W]) put in as its
    first frame, as WanImageToVideoPipeline does after its last step; x itself otherwise."""
    img = cond.get("image_latents")
    if img is None or img.shape[1] != x.shape[1] or img.shape[2] != 1:
        return x
    return torch.cat([img.to(x.dtype), x[:, :, 1:]], dim=2)


def adjacent_x0_l1(x0_preds):
    """Mean |x0_{i+1} - x0_i| between adjacent steps' x0 predictions -> float [len-1] (paper Fig. 10)."""
    if len(x0_preds) < 2:
        raise ValueError(f"adjacent_x0_l1 needs at least 2 predictions, got {len(x0_preds)}")
    return torch.stack([(b.float() - a.float()).abs().mean() for a, b in zip(x0_preds, x0_preds[1:])])
