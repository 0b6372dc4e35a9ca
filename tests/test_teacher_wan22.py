"""Wan2.2 and image-to-video teachers on tiny random models, fp32: our N-step teacher sampling equals diffusers'
WanPipeline (two experts, boundary_ratio, guidance_scale_2; expand_timesteps) and WanImageToVideoPipeline (a
Wan2.1-I2V-style model with image embeds, a Wan2.2-I2V-style pair of experts, the TI2V first-frame path).

Both sides step on the pipeline's own points (its FlowMatchEulerDiscreteScheduler.set_timesteps(N)): the schedules
themselves are compared in tests/test_solver.py; this compares the experts' switch, the guidance and the condition.
"""
import numpy as np
import pytest
import torch

import model
import solver
from _random_weights import randomize_
from teacher import Teacher, with_image_frame

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler  # noqa: E402

N, SHIFT, TEXT = 6, 5.0, 512  # 6 steps cross a boundary of 0.875 / 0.9 with both experts used


def experts(preset, n, seed=0):
    """n pairs (ours, diffusers') of the same random weights."""
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        ref = randomize_(diffusers.WanTransformer3DModel(**vars(model.PRESETS[preset]))).eval()
        ours = model.build_transformer(preset).eval()
        ours.load_state_dict(ref.state_dict())
        out.append((ours, ref))
    return out


def vae(z_dim):
    torch.manual_seed(5)
    return AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[True, True], latents_mean=[0.1] * z_dim, latents_std=[1.5] * z_dim,
                            scale_factor_spatial=4, scale_factor_temporal=4).eval()


def ours_sample(teacher, noise, cond, sch):
    """Our teacher's guided output stepped on the pipeline's points; the TI2V first frame put in at the end."""
    t, alpha, sigma = solver.custom_points(teacher.grid, sigmas=sch.sigmas[:-1].tolist())
    x = solver.sample(lambda x, tt: teacher.guided(x, tt, cond), noise, t, alpha, sigma, "flow", progress=False)
    return with_image_frame(x, cond)


def texts(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TEXT, cfg.text_dim, generator=g), torch.randn(1, TEXT, cfg.text_dim, generator=g)


def check(ours, want, what):
    err = float((ours - want).abs().max() / want.abs().max())
    print(f"{what}: max rel err {err:.2e}")
    assert ours.shape == want.shape and err <= 1e-5


def test_two_expert_teacher_equals_wanpipeline():
    """Wan2.2-A14B-style: `transformer` for t >= 875, `transformer_2` below, CFG 4.0 / 3.0."""
    (hi, hi_ref), (lo, lo_ref) = experts("tiny-wan", 2)
    text, neg = texts(hi.config)
    sch = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sch, transformer=hi_ref,
                                 transformer_2=lo_ref, boundary_ratio=0.875)
    noise = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(2))
    want = pipe(prompt_embeds=text, negative_prompt_embeds=neg, latents=noise, num_inference_steps=N, height=32,
                width=48, num_frames=5, guidance_scale=4.0, guidance_scale_2=3.0, output_type="latent").frames
    ts = sch.timesteps
    assert (ts >= 875).any() and (ts < 875).any()  # both experts used
    teacher = Teacher(hi, solver.flow_grid(N, SHIFT), 4.0, {"text": neg}, model_2=lo, boundary_t=875.0,
                      guidance_scale_2=3.0)
    check(ours_sample(teacher, noise, {"text": text}, sch), want, "two experts")
    one = Teacher(hi, solver.flow_grid(N, SHIFT), 4.0, {"text": neg})  # a single expert differs: the switch is seen
    assert float((ours_sample(one, noise, {"text": text}, sch) - want).abs().max()) > 1e-3


def test_two_expert_teacher_routes_a_mixed_batch_per_sample():
    (hi, _), (lo, _) = experts("tiny-wan", 2)
    text, neg = texts(hi.config)
    teacher = Teacher(hi, solver.flow_grid(N, SHIFT), 4.0, {"text": neg}, model_2=lo, boundary_t=875.0,
                      guidance_scale_2=3.0)
    x, t = torch.randn(2, 16, 2, 4, 6), torch.tensor([900.0, 500.0])
    both = teacher.guided(x, t, {"text": text.expand(2, -1, -1)})
    for i in range(2):
        assert torch.allclose(both[i:i + 1], teacher.guided(x[i:i + 1], t[i:i + 1], {"text": text}), atol=1e-6)


def i2v_pipe(preset, n_experts, boundary, z_dim, expand=False):
    pairs = experts(preset, n_experts)
    sch = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae(z_dim), scheduler=sch, image_processor=None, image_encoder=None,
        transformer=pairs[0][1], transformer_2=pairs[1][1] if n_experts > 1 else None, boundary_ratio=boundary,
        expand_timesteps=expand)
    return pairs, pipe


@pytest.mark.parametrize("preset,n_experts,boundary", [("tiny-wan-i2v", 1, None), ("tiny-wan2.2-i2v", 2, 0.9)],
                         ids=["wan2.1-i2v-embeds", "wan2.2-i2v-two-experts"])
def test_i2v_teacher_equals_wanimagetovideopipeline(preset, n_experts, boundary):
    from PIL import Image
    pairs, pipe = i2v_pipe(preset, n_experts, boundary, 16)
    cfg, (text, neg) = pairs[0][0].config, texts(pairs[0][0].config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    embeds = torch.randn(1, 7, cfg.image_dim) if cfg.image_dim else None
    if embeds is not None:  # its CLIP encoder's output (data.py encode is tested against encode_image itself)
        pipe.encode_image = lambda image, device: embeds
    noise = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(height=32, width=32, num_frames=5)
    pixels = pipe.video_processor.preprocess(image, height=32, width=32).float()
    _, condition = pipe.prepare_latents(pixels, 1, 16, **kw, dtype=torch.float32, device="cpu", latents=noise)
    want = pipe(image, prompt_embeds=text, negative_prompt_embeds=neg, latents=noise, num_inference_steps=N,
                guidance_scale=3.5, output_type="latent", **kw).frames
    cond = {"text": text, "image_latents": condition, **({"image_embeds": embeds} if embeds is not None else {})}
    two = dict(model_2=pairs[1][0], boundary_t=1000 * boundary) if n_experts > 1 else {}
    teacher = Teacher(pairs[0][0], solver.flow_grid(N, SHIFT), 3.5, {"text": neg}, **two)
    assert condition.shape == (1, 20, 2, 8, 8)
    check(ours_sample(teacher, noise, cond, pipe.scheduler), want, preset)


def test_ti2v_teacher_equals_both_pipelines_with_expand_timesteps():
    """TI2V-5B-style: text-to-video through WanPipeline(expand_timesteps) = our teacher without an image (per-token
    timesteps all equal t); image-to-video through WanImageToVideoPipeline(expand_timesteps) = our teacher with the
    encoded first frame as `image_latents` (replaced in, its tokens at t = 0, put back after the last step)."""
    from PIL import Image
    pairs, pipe = i2v_pipe("tiny-wan2.2-ti2v", 1, None, 48, expand=True)
    ours, ref = pairs[0]
    text, neg = texts(ours.config)
    noise = torch.randn(1, 48, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    teacher = Teacher(ours, solver.flow_grid(N, SHIFT), 5.0, {"text": neg})

    t2v = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=pipe.scheduler, transformer=ref,
                                expand_timesteps=True)
    want = t2v(prompt_embeds=text, negative_prompt_embeds=neg, latents=noise, num_inference_steps=N, height=32,
               width=32, num_frames=5, guidance_scale=5.0, output_type="latent").frames
    check(ours_sample(teacher, noise, {"text": text}, t2v.scheduler), want, "ti2v text-to-video")

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    kw = dict(height=32, width=32, num_frames=5)
    pixels = pipe.video_processor.preprocess(image, height=32, width=32).float()
    _, first, _ = pipe.prepare_latents(pixels, 1, 48, **kw, dtype=torch.float32, device="cpu", latents=noise)
    want = pipe(image, prompt_embeds=text, negative_prompt_embeds=neg, latents=noise, num_inference_steps=N,
                guidance_scale=5.0, output_type="latent", **kw).frames
    assert first.shape == (1, 48, 1, 8, 8)
    got = ours_sample(teacher, noise, {"text": text, "image_latents": first}, pipe.scheduler)
    check(got, want, "ti2v image-to-video")
    assert torch.equal(got[:, :, :1], first)
