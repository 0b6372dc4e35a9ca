"""Speed work (issue 16): cached positional tables, the CD step without host reads of device values, fused AdamW,
the merged detail LoRA at sampling time, and the bench's training-step races on the tiny presets."""
import dataclasses
import warnings

import pytest
import torch
import torch._dynamo as dynamo
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from backbones import cogvideox
from storage import latents
import experts
import losses
import model as models
import solver
import train
from teacher import Teacher

CPU = torch.device("cpu")


def _tables(name, cfg):
    """(cached call, uncached call) of one table function: grid (F, h, w), dtype -> tensor or (cos, sin)."""
    if name == "sincos":
        fn = cogvideox.cogvideox_sincos_table
        return (lambda g, dt: fn(cfg, g, CPU, dt)), (lambda g, dt: fn.__wrapped__(cfg, g, CPU, dt))
    if name == "cogvideox rope":
        fn = cogvideox.cogvideox_rope
        return (lambda g, dt: fn(cfg, g, 5, CPU)), (lambda g, dt: fn.__wrapped__(cfg, g, 5, CPU))
    m = models.build_transformer(cfg, device="meta")
    if name == "wan rope":
        return (lambda g, dt: m._rope(g, CPU)), (lambda g, dt: type(m)._rope.__wrapped__(m, g, CPU))
    return (lambda g, dt: m._rope(g, 7, CPU)), (lambda g, dt: type(m)._rope.__wrapped__(m, g, 7, CPU))


CONFIGS = {"sincos": "tiny-cogvideox", "cogvideox rope": "tiny-cogvideox-rope", "hunyuan rope": "tiny-hunyuan",
           "wan rope": "tiny-wan"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_tables_are_bit_identical_constants(name):
    cfg = models.PRESETS[CONFIGS[name]]
    cached, plain = _tables(name, cfg)
    as_tuple = lambda x: x if isinstance(x, tuple) else (x,)  # noqa: E731
    for g in [(2, 3, 4), (3, 4, 4), (2, 3, 4)]:
        for dt in (torch.float32, torch.bfloat16):
            for a, b in zip(as_tuple(cached(g, dt)), as_tuple(plain(g, dt)), strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b) and not a.requires_grad
    assert cached((2, 3, 4), torch.float32) is cached((2, 3, 4), torch.float32)  # a hit: the very same tensors
    field = {"sincos": ("spatial_interpolation_scale", 3), "cogvideox rope": ("sample_height", 3),
             "hunyuan rope": ("rope_theta", 3), "wan rope": ("attention_head_dim", 12)}
    other = dataclasses.replace(cfg, **dict([field[name]]))  # another config is another key: another table
    a, b = as_tuple(_tables(name, other)[0]((2, 3, 4), torch.float32))[-1], as_tuple(cached((2, 3, 4), torch.float32))[-1]
    assert a.shape != b.shape or not torch.equal(a, b)  # not the cached table (Wan: other head dim, other width)


def test_table_cache_is_bounded_and_safe_under_inference_mode_and_autograd():
    fn, cfg = cogvideox.cogvideox_sincos_table, models.PRESETS["tiny-cogvideox"]
    fn.cache_clear()
    with torch.inference_mode():  # built while sampling ...
        tab = fn(cfg, (1, 2, 2), torch.device("cpu"), torch.float32)
    assert not tab.is_inference()
    x = torch.randn(4, 32, requires_grad=True)
    (x * tab).sum().backward()  # ... and used later in training (mul saves the table for backward)
    assert torch.equal(x.grad, tab)
    tabs = [fn(cfg, (1, 2, n), torch.device("cpu"), torch.float32) for n in range(3, 20)]
    assert fn.cache_len() == 8  # the least recently used are dropped, the recent ones kept
    assert fn(cfg, (1, 2, 19), CPU, torch.float32) is tabs[-1] and fn(cfg, (1, 2, 2), CPU, torch.float32) is not tab


def test_whole_cogvideox_forward_traces_into_one_graph_with_the_cached_table():
    m = models.build_transformer("tiny-cogvideox").eval()
    x, t, text = torch.randn(1, 4, 2, 6, 8), torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        want = m(x, t, text=text)  # fills the cache outside the compiler
        dynamo.reset()
        ex = dynamo.explain(m)(x, t, text=text)
        assert ex.graph_break_count == 0 and ex.graph_count == 1
        assert torch.equal(m(x, t, text=text), want)


# ------------------------------------------------------------------------------------------------ host syncs
class HostReads(TorchDispatchMode):
    """Counts what makes the host wait for a device: a value read (item/bool/int/tolist = _local_scalar_dense),
    a data-dependent shape (nonzero), a device -> host copy, a blocking host -> device copy (CUDA's sync debug
    mode flags that too). A "device" is anything but the CPU: run the models on "meta" and the host-side
    bookkeeping stays on the CPU, so a count of 0 proves no Python branch on a device tensor's value."""

    def __init__(self, device_only=True):
        super().__init__()
        self.device_only, self.reads = device_only, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ts = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_dev = any(t.device.type != "cpu" for t in ts) or not self.device_only
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "is_nonzero") and on_dev:
            self.reads.append(name)
        if name == "_to_copy" and ts:
            src, dst = ts[0].device, torch.device(kwargs.get("device") or ts[0].device)
            if src.type != "cpu" and dst.type == "cpu":
                self.reads.append("device->host copy")
            elif src.type == "cpu" and dst.type != "cpu" and not kwargs.get("non_blocking", False):
                self.reads.append("blocking host->device copy")
        return func(*args, **(kwargs or {}))


def cd_step(preset, stage, device, dtype=torch.float32, B=2):
    """Build tiny models on `device`; return step(): one CD training step of `stage` (semantic: CD + TC; detail:
    dual expert CD + GAN + FM + D step) with backward, clipping and AdamW; host indices as train.py draws them."""
    torch.manual_seed(0)
    cfg = models.PRESETS[preset]
    grid, kappa = solver.grid_for(cfg, 10), 6
    backbone = models.build_transformer(preset, device=device, dtype=dtype)
    tmodel = models.build_transformer(preset, device=device, dtype=dtype)
    student = experts.DualExpert(backbone, solver.boundary_t(grid, kappa), 4, 8) if stage == "detail" else backbone
    disc = losses.Discriminator.for_model(tmodel, hidden=32).to(device) if stage == "detail" else None
    hv = "hunyuan" in preset
    cond = {"text": torch.randn(B, 5, latents.text_width(cfg))}
    cond |= {"pooled": torch.randn(B, cfg.pooled_projection_dim)} if hv else {}  # no text mask: see docs/speed.md
    cond = {k: v.to(device, dtype) for k, v in cond.items()}
    scond = cond | ({"guidance": torch.full((B,), 6016.0, device=device, dtype=dtype)} if hv else {})
    uncond = None if hv else {"text": torch.zeros(1, 5, latents.text_width(cfg), device=device, dtype=dtype)}
    teacher = Teacher(tmodel, grid, 6.0, uncond)
    shape, tok = (B, cfg.in_channels, 2, 4, 4), ((2 // getattr(cfg, "patch_size_t", None)) if hv else 2, 2, 2)
    x0, eps, n = (torch.randn(shape).to(device, dtype) for _ in range(3))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    lo, hi = (0, kappa) if stage == "detail" else (kappa + 1, grid.N - 1)
    u = torch.tensor([[0.1, 0.7], [0.9, 0.2]], dtype=torch.float64)[:B]  # latents.draws' host uniforms

    def step(update=True):
        k = solver.k_between(u[:, 0], lo, hi)
        loss, xhat, x_tgt, k_end = losses.consistency_step(student, student, teacher, grid, [kappa], x0, eps, k,
                                                           cond, scond)
        if stage == "detail":
            g, fm, feats = losses.adversarial_terms(tmodel, disc, x_tgt, xhat, n, k_end, solver.k_between(u[:, 1], 0, kappa),
                                                    grid, scond, tok)
            loss = loss + 0.5 * g + 0.1 * fm
            losses.discriminator_loss(disc, feats, tok).backward()
        else:
            loss = loss + losses.temporal_coherence_loss(xhat, x_tgt)
        loss.backward()
        if update:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss
    return step


STEPS = [("tiny-cogvideox", "semantic"), ("tiny-cogvideox", "detail"), ("tiny-hunyuan", "detail"), ("tiny-wan", "detail")]


def test_host_read_counter_sees_reads():
    x = torch.ones(3)
    with HostReads(device_only=False) as all_reads, HostReads() as dev_reads:
        bool(x.sum() > 0), x.nonzero(), x.to("meta"), x.to("meta", non_blocking=True)
    assert all_reads.reads == ["_local_scalar_dense", "nonzero", "blocking host->device copy"]
    assert dev_reads.reads == ["blocking host->device copy"]


@pytest.mark.parametrize("preset,stage", STEPS)
def test_cd_step_reads_no_device_value(preset, stage):
    """The whole step runs with every model and latent on the meta device (which has no values to read)."""
    step = cd_step(preset, stage, torch.device("meta"))
    with HostReads() as reads:
        loss = step()
    assert loss.device.type == "meta" and reads.reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset,stage", STEPS)
def test_cd_step_has_no_cuda_sync(preset, stage):
    step = cd_step(preset, stage, torch.device("cuda"), torch.float32)
    step()  # warm-up: lazy CUDA initialisation (handles, allocator) may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")  # every synchronizing CUDA call warns: count them
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    print(f"{preset} {stage}: {len(syncs)} CUDA syncs in one training step")
    assert syncs == []
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------ LoRA merge
def test_merging_the_detail_lora_leaves_the_semantic_tree_alone():
    torch.manual_seed(0)
    backbone = models.build_transformer("tiny-cogvideox").eval()
    e = experts.DualExpert(backbone, 500.0, rank=4, alpha=8).eval()
    with torch.no_grad():
        for p in e.lora.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, text = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 5, 32)
    t = torch.tensor([800.0, 100.0])  # one sample per expert
    with torch.no_grad():
        before, sem = e(x, t, text=text), backbone(x, t, text=text)
        w = [p.clone() for p in backbone.parameters()]
        e.merge_lora()
        merged, sem_after = e(x, t, text=text), backbone(x, t, text=text)
        assert all(torch.equal(a, b) for a, b in zip(w, backbone.parameters()))
        assert torch.equal(sem_after, sem) and torch.equal(merged[0], before[0])  # the semantic path: bit for bit
        torch.testing.assert_close(merged, before, rtol=0, atol=1e-5)  # the detail path: round-off
        assert not torch.equal(merged[1], before[1])  # ... really the merged weights
        e.merge_lora(False)
        assert torch.equal(e(x, t, text=text), before)


# ------------------------------------------------------------------------------------------------ bench races
def test_diffusers_adapter_equals_our_model_in_every_hook_the_losses_use():
    from tools import bench_train
    torch.manual_seed(0)
    ours = models.build_transformer("tiny-cogvideox-rope").eval()
    ref = bench_train.DiffusersCogVideoX.twin_of(ours).eval()
    x, t, text = torch.randn(2, 4, 3, 6, 8), torch.tensor([900.0, 10.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        (v, feats), (v_ref, feats_ref) = ours(x, t, text=text, taps=[0, 1]), ref(x, t, text=text, taps=[0, 1])
        torch.testing.assert_close(v_ref, v, rtol=1e-5, atol=1e-5)
        for a, b in zip(feats_ref, feats, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        temb = ours.time_embed(t)
        torch.testing.assert_close(ref.time_embed(t), temb)
        torch.testing.assert_close(ref.head(feats[1], temb, (3, 6, 8)), ours.head(feats[1], temb, (3, 6, 8)),
                                   rtol=1e-5, atol=1e-5)
    assert ref.default_taps() == ours.default_taps() and ref._sink is None


def test_bench_training_races_run_on_cpu(tmp_path):
    """The new rows at tiny size: both stages, ours vs diffusers-built, the same draws (losses agree)."""
    from tools import bench
    r = bench.main(["--device", "cpu", "--rows", "train,detail", "--repeat", "1", "--warmup", "0",
                    "--out", str(tmp_path / "b.json")])
    assert [x["stage"] for x in r["train_race"]] == ["semantic", "detail"]
    for x in r["train_race"]:
        assert x["model_flops"] > 0 and x["ratio"] == x["ours"]["s"] / x["diffusers"]["s"]
        assert x["ours"]["loss"] == pytest.approx(x["diffusers"]["loss"], rel=1e-4)  # the same step on both
    assert "| detail (tiny-cogvideox" in bench.table(r)


# ------------------------------------------------------------------------------------------------ fused AdamW
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_train_uses_fused_adamw_on_cuda_only(device, tmp_path, monkeypatch):
    from test_train import make_dataset
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            made.append(kw.get("fused"))
            super().__init__(params, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    ds = make_dataset(tmp_path / "ds", "tiny-cogvideox", n=2)
    train.main(["--config", "tiny-cogvideox", "--stage", "teacher", "--data", ds, "--out", str(tmp_path / "run"),
                "--max-steps", "1", "--device", device, "--probe-every", "0", "--save-every", "0"])
    assert made == [True if device == "cuda" else None]  # CPU: the default implementation, as before
