"""released.py: the authors' DCM layout (diffusers model + PEFT `lora1` + `*_lora` copies) <-> our DualExpert.

"Their" model is built the way their inference builds it (fastvideo/sample/inference_hy.py): diffusers'
transformer, `add_adapter(LoraConfig(...), adapter_name="lora1")`, then the add_layer() copies; its forward
is their routing (hy_forward / hy_forward_origin): semantic = adapters disabled, original modules;
detail = adapters enabled and the `*_lora` modules in place of the originals.
"""
import copy
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from storage import checkpoint
import experts
import model
from _random_weights import randomize_
from storage import released
import export

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: E402
from peft import LoraConfig  # noqa: E402

R, ALPHA = 4, 8
TINY_HY, TINY_WAN = model.PRESETS["tiny-hunyuan"], model.PRESETS["tiny-wan"]
# their threshold: int(t) <= 981 (HunyuanVideo) / 978 (Wan) -> detail; t just above and below it on each side
ARCHS = {"HunyuanVideo": dict(ref_cls=HunyuanVideoTransformer3DModel, cfg=TINY_HY, n_lora=4 + 2 * 3 + 4,
                              t_sem=[999.0, 982.0], t_det=[981.9, 912.4]),  # double, single q/k/v, refiner
         "Wan": dict(ref_cls=WanTransformer3DModel, cfg=TINY_WAN, n_lora=TINY_WAN.num_layers * 8,
                     t_sem=[999.0, 979.0], t_det=[978.9, 500.0])}  # self- and cross-attention q/k/v/out


def theirs(ref_cls, cfg, copies, seed=0):
    """Their model at a tiny size: diffusers class + PEFT lora1 on to_q/to_k/to_v/to_out.0 + copies, all random."""
    torch.manual_seed(seed)
    ref = ref_cls(**asdict(cfg)).eval()
    ref.add_adapter(LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=True,
                               target_modules=["to_k", "to_q", "to_v", "to_out.0"]), adapter_name="lora1")
    for theirs_name, ours in copies.items():  # add_layer() + init_layer(): copies of the original modules
        setattr(ref, theirs_name, copy.deepcopy(getattr(ref, ours)))
    return randomize_(ref)  # every weight random, the LoRA B too


@contextmanager
def detail_modules(ref, copies):
    """Their detail forward: adapter lora1 enabled, each `<name>_lora` module used in place of `<name>`."""
    originals = {ours: getattr(ref, ours) for ours in copies.values()}
    ref.set_adapter("lora1")
    ref.enable_adapters()
    for theirs_name, ours in copies.items():
        setattr(ref, ours, getattr(ref, theirs_name))
    try:
        yield
    finally:
        for ours, m in originals.items():
            setattr(ref, ours, m)


def save_theirs(ref, folder):
    """Their single-file layout: the full state dict + config.json as their save_checkpoint writes it."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({k: v for k, v in dict(ref.config).items() if not k.startswith("_")}, f)
    return folder


def hy_inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg, L = TINY_HY, 7
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, 4:] = 0
    return dict(x=torch.randn(B, cfg.in_channels, 3, 4, 6, generator=g), text=torch.randn(B, L, cfg.text_embed_dim, generator=g),
                text_mask=mask, pooled=torch.randn(B, cfg.pooled_projection_dim, generator=g),
                guidance=torch.full((B,), 6016.0))


def wan_inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, TINY_WAN.in_channels, 3, 4, 6, generator=g), text=torch.randn(B, 7, TINY_WAN.text_dim, generator=g))


def hy_ref(ref, inp, t):
    with torch.no_grad():
        if "pooled" not in inp:  # Wan
            return ref(inp["x"], t, inp["text"], return_dict=False)[0]
        return ref(inp["x"], t, inp["text"], inp["text_mask"], inp["pooled"], inp["guidance"], return_dict=False)[0]


def hy_ours(expert, inp, t):
    with torch.no_grad():
        return expert(inp["x"], t, **{k: v for k, v in inp.items() if k != "x"})


def max_err(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def their_folder(arch, tmp_path_factory):
    copies = released.LAYOUTS[arch]["copies"]
    ref = theirs(ARCHS[arch]["ref_cls"], ARCHS[arch]["cfg"], copies)
    folder = save_theirs(ref, str(tmp_path_factory.mktemp(f"DCM_{arch}") / "transformer"))
    return ref, copies, folder


@pytest.fixture(scope="module")
def hy(tmp_path_factory):
    return their_folder("HunyuanVideo", tmp_path_factory)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return their_folder("Wan", tmp_path_factory)


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_loads_and_both_paths_equal_theirs(arch, request):
    ref, copies, folder = request.getfixturevalue({"HunyuanVideo": "hy", "Wan": "wan"}[arch])
    expert, info = released.load_released(os.path.dirname(folder))  # the pipeline folder itself
    assert info["folder"] == folder and (info["rank"], info["alpha"]) == (R, ALPHA)
    n_peft = sum(1 for n, _ in ref.named_modules() if n.endswith(".lora_A.lora1"))
    assert len(expert.lora_names) == n_peft == ARCHS[arch]["n_lora"]
    inp = hy_inputs() if arch == "HunyuanVideo" else wan_inputs()
    # both sides of their threshold in one batch each (ours routes per sample, theirs by t[0])
    t_sem, t_det = torch.tensor(ARCHS[arch]["t_sem"]), torch.tensor(ARCHS[arch]["t_det"])
    ref.disable_adapters()
    want_sem = hy_ref(ref, inp, t_sem)
    with detail_modules(ref, copies):
        want_det = hy_ref(ref, inp, t_det)
    err_sem, err_det = max_err(hy_ours(expert, inp, t_sem), want_sem), max_err(hy_ours(expert, inp, t_det), want_det)
    mixed = hy_ours(expert, inp, torch.tensor([t_sem[0], t_det[1]]))
    print(f"\n{arch} released layout: semantic max err {err_sem:.2e}, detail max err {err_det:.2e}")
    assert err_sem <= 1e-5 and err_det <= 1e-5
    assert max_err(mixed[:1], want_sem[:1]) <= 1e-5 and max_err(mixed[1:], want_det[1:]) <= 1e-5
    assert max_err(want_sem, want_det) > 1e-2  # the two paths really differ


@pytest.mark.parametrize("arch", ARCHS)
def test_export_roundtrip_bit_exact(arch, request, tmp_path):
    _, _, folder = request.getfixturevalue({"HunyuanVideo": "hy", "Wan": "wan"}[arch])
    expert, _ = released.load_released(folder)
    out = released.export_released(expert, str(tmp_path / "transformer"))
    a, b = (load_file(os.path.join(f, "diffusion_pytorch_model.safetensors")) for f in (folder, out))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # exactly their file back
    again, info = released.load_released(out)
    assert info["alpha"] == ALPHA and all(torch.equal(v, again.state_dict()[k]) for k, v in expert.state_dict().items())


def test_trained_here_runs_in_their_model(tmp_path, capsys):
    """A DualExpert trained here (authors' targets), exported by `export.py authors` from a step folder, loads
    with strict=True into their PEFT model, whose two routes then equal ours; the 'all' set cannot be exported."""
    copies = released.LAYOUTS["HunyuanVideo"]["copies"]
    torch.manual_seed(3)
    ours = experts.DualExpert(model.build_transformer(TINY_HY), 981.762939453125, R, ALPHA).eval()  # kappa 37
    randomize_(ours)
    step = tmp_path / "run" / "step_0000010"
    ours.save_semantic(step / "transformer")
    ours.save_detail(step / "detail.safetensors", meta={"kappa": 37})
    (step / "config.json").write_text(json.dumps({"stage": "detail", "step": 10}))
    export.main(["authors", "--ckpt", str(step.parent), "--out", str(tmp_path / "DCM_MINE" / "transformer")])
    out = capsys.readouterr()
    assert "14 LoRA linears" in out.out and "warning" not in out.err  # kappa 37 routes the grid as their 981
    import solver
    kappa36 = experts.DualExpert(model.build_transformer(TINY_HY, device="meta"), 979.7507934570312, R, ALPHA)
    assert released.routing_disagreements(kappa36, solver.flow_grid()) == [pytest.approx(981.7629, abs=1e-3)]
    ref = theirs(HunyuanVideoTransformer3DModel, TINY_HY, copies, seed=1)  # other weights, all overwritten
    ref.load_state_dict(load_file(str(tmp_path / "DCM_MINE" / "transformer" / "diffusion_pytorch_model.safetensors")),
                        strict=True)
    inp, t_sem, t_det = hy_inputs(), torch.tensor([999.0, 983.68]), torch.tensor([981.762939453125, 912.4])  # grid t
    ref.disable_adapters()
    err_sem = max_err(hy_ours(ours, inp, t_sem), hy_ref(ref, inp, t_sem))
    with detail_modules(ref, copies):
        err_det = max_err(hy_ours(ours, inp, t_det), hy_ref(ref, inp, t_det))
    assert err_sem <= 1e-5 and err_det <= 1e-5
    with pytest.raises(ValueError, match="--lora-targets authors"):
        released.released_state(experts.DualExpert(model.build_transformer(TINY_HY), 981.7, R, ALPHA, lora_targets="all"))
    # the same student in sample.py on a custom schedule: each point on the side of its boundary_t (kappa 37)
    import sample
    save_file({k: inp[k][:1] for k in ("text", "text_mask", "pooled")}, str(tmp_path / "cond.safetensors"))
    res = sample.main(["--ckpt", str(step), "--cond", str(tmp_path / "cond.safetensors"), "--frames", "2", "--height", "4",
                       "--width", "4", "--out", str(tmp_path / "s"), "--device", "cpu", "--timesteps", "1000,981.77,981.76,500"])
    assert res["experts"] == ["semantic", "semantic", "detail", "detail"] and res["grid_indices"] is None


def test_a_lora_semantic_student_runs_in_their_model(tmp_path):
    """A --semantic-lora detail step (LoRA semantic expert + detail LoRA over the teacher) exported by `export.py
    authors`: the semantic adapter merged into the base, the detail LoRA on top; their two routes equal ours."""
    copies = released.LAYOUTS["HunyuanVideo"]["copies"]
    torch.manual_seed(4)
    base = model.build_transformer(TINY_HY)
    checkpoint.save_transformer(base, tmp_path / "teacher")
    sem = experts.SemanticLoRA(base, 2, 3.0)
    randomize_(sem.lora), randomize_(sem.copies)
    ours = experts.DualExpert(base, 981.762939453125, R, ALPHA, semantic=sem.requires_grad_(False)).eval()
    randomize_(ours.lora), randomize_(ours.copies)
    step = tmp_path / "run" / "step_0000010"
    step.mkdir(parents=True)
    ours.save_parts(step, {"kappa": 37})
    (step / "config.json").write_text(json.dumps({"stage": "detail", "step": 10, "semantic_lora": 2,
                                                  "teacher": str(tmp_path / "teacher")}))
    export.main(["authors", "--ckpt", str(step), "--out", str(tmp_path / "DCM_MINE" / "transformer")])
    ref = theirs(HunyuanVideoTransformer3DModel, TINY_HY, copies, seed=1)
    ref.load_state_dict(load_file(str(tmp_path / "DCM_MINE" / "transformer" / "diffusion_pytorch_model.safetensors")),
                        strict=True)
    inp, t_sem, t_det = hy_inputs(), torch.tensor([999.0, 983.68]), torch.tensor([981.762939453125, 912.4])
    ref.disable_adapters()
    err_sem = max_err(hy_ours(ours, inp, t_sem), hy_ref(ref, inp, t_sem))
    with detail_modules(ref, copies):
        err_det = max_err(hy_ours(ours, inp, t_det), hy_ref(ref, inp, t_det))
    assert err_sem <= 1e-5 and err_det <= 1e-5, (err_sem, err_det)
    assert max_err(hy_ours(ours, inp, t_sem), hy_ours(ours.base_view(), inp, t_sem)) > 1e-3  # not the teacher


def _edit(folder, dst, change):
    sd = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    change(sd)
    os.makedirs(dst, exist_ok=True)
    save_file(sd, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return dst


def test_unknown_or_missing_key_is_one_line_error(hy, tmp_path, capsys):
    _, _, folder = hy
    extra = _edit(folder, str(tmp_path / "extra"), lambda sd: sd.update({"context_embedder_lora.w": torch.zeros(1)}))
    with pytest.raises(ValueError, match="key 'context_embedder_lora.w' is not part of the authors' HunyuanVideo layout"):
        released.load_released(extra)
    gone = "proj_out_lora.bias"
    missing = _edit(folder, str(tmp_path / "missing"), lambda sd: sd.pop(gone))
    with pytest.raises(ValueError, match=f"key '{gone}' of the authors' HunyuanVideo layout is missing"):
        released.load_released(missing)
    with pytest.raises(ValueError, match="the authors' DCM layout .* sample it with sample.py --ckpt"):
        checkpoint.load_transformer(folder)  # a plain-transformer loader names the layout, not 300 keys
    import sample
    with pytest.raises(SystemExit) as e:  # the command line: exit 2, one line naming the key, no traceback
        sample.cli(["--ckpt", missing, "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: ") and gone in err


def test_sample_py_uses_their_schedule_and_routing(hy, tmp_path):
    import sample
    import sampling
    _, _, folder = hy
    cond = tmp_path / "cond.safetensors"
    inp = hy_inputs(1)
    save_file({"text": inp["text"], "text_mask": inp["text_mask"], "pooled": inp["pooled"]}, str(cond))
    res = sample.main(["--ckpt", os.path.dirname(folder), "--cond", str(cond), "--frames", "2", "--height", "4",
                       "--width", "4", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert res["sigmas"] == pytest.approx([1.0, 0.992, 0.9818, 0.9124, 0.0], abs=1e-6)
    assert res["experts"] == ["semantic", "semantic", "detail", "detail"]
    res = sample.main(["--ckpt", folder, "--cond", str(cond), "--frames", "2", "--height", "4", "--width", "4",
                       "--out", str(tmp_path / "t"), "--device", "cpu", "--timesteps", "1000,982,981,500"])
    assert res["experts"] == ["semantic", "semantic", "detail", "detail"] and res["t"][:4] == [1000.0, 982.0, 981.0, 500.0]
    with pytest.raises(sampling.SampleError, match="not --detail / --teacher / --steps"):
        sample.main(["--ckpt", folder, "--steps", "4", "--cond", str(cond)])


def test_lora_targets_recorded_in_detail_file(tmp_path):
    """--lora-targets is in the detail file's meta; from_detail rebuilds that set; files from before the flag
    (no lora_targets) were saved with today's wider set and load as 'all'; a mismatch is an error."""
    m = model.build_transformer(TINY_HY)
    for which in ("all", "authors"):
        e = experts.DualExpert(m, 981.7, R, ALPHA, lora_targets=which)
        e.save_detail(tmp_path / f"{which}.safetensors")
        e2 = experts.DualExpert.from_detail(m, tmp_path / f"{which}.safetensors")
        assert e2.lora_targets == which and e2.lora_names == e.lora_names and e2.copy_names == e.copy_names
    old = experts.DualExpert(m, 981.7, R, ALPHA, lora_targets="all")
    meta = {k: v for k, v in old.detail_meta().items() if k != "lora_targets"}
    save_file({k: v.detach().contiguous() for k, v in old.detail_state().items()}, str(tmp_path / "old.safetensors"),
              metadata={"dcm": json.dumps(meta)})
    assert experts.DualExpert.from_detail(m, tmp_path / "old.safetensors").lora_targets == "all"
    with pytest.raises(ValueError, match="lora_targets"):
        experts.DualExpert(m, 981.7, R, ALPHA).load_detail(tmp_path / "all.safetensors")


def test_sample_py_wan_schedule(wan, tmp_path):
    import sample
    _, _, folder = wan
    save_file({"text": wan_inputs(1)["text"]}, str(tmp_path / "cond.safetensors"))
    res = sample.main(["--ckpt", folder, "--cond", str(tmp_path / "cond.safetensors"), "--frames", "2", "--height", "4",
                       "--width", "4", "--out", str(tmp_path / "s"), "--device", "cpu"])
    wan_t = [1000, 992, 982, 949, 905, 810]
    assert res["t"] == [*map(float, wan_t), 0.0] and res["schedule"] == {"timesteps": wan_t}
    assert res["experts"] == ["semantic"] * 3 + ["detail"] * 3  # int(t) <= 978


def test_custom_points_as_their_scheduler():
    """t of --sigmas / --timesteps as their InferencePCMFMScheduler.set_timesteps(sigmas) computes it (float32
    sigmas * 1000; Wan: sigmas = tensor(t) / 1000), sigmas ending in 0; bad schedules are errors."""
    import solver
    hy = [1.0, 0.9920, 0.9818, 0.9124]
    t, alpha, sigma = solver.custom_points(solver.flow_grid(), sigmas=hy)
    assert torch.equal(t[:-1].float(), torch.tensor(hy) * 1000) and t[-1] == 0 and sigma[-1] == 0
    assert torch.equal(sigma[:-1].float(), torch.tensor(hy)) and torch.equal(alpha, 1 - sigma)
    wan_t = [1000, 992, 982, 949, 905, 810]
    t, _, _ = solver.custom_points(solver.flow_grid(), timesteps=wan_t)
    assert torch.equal(t[:-1].float(), torch.tensor([(torch.tensor([x]) / 1000).item() for x in wan_t]) * 1000)
    for bad in ([900, 950], [1001, 5], [0.0], []):
        with pytest.raises(ValueError, match="strictly decreasing"):
            solver.custom_points(solver.flow_grid(), timesteps=bad)
    with pytest.raises(ValueError, match="integer timesteps"):
        solver.custom_points(solver.cogvideox_grid(1000), sigmas=[0.5])
    t, alpha, sigma = solver.custom_points(solver.cogvideox_grid(1000), timesteps=[999, 500])
    g = solver.cogvideox_grid(1000)
    assert t.tolist() == [999, 500, 0] and alpha[1] == g.alpha[501] and sigma.tolist()[-1] == 0


@pytest.mark.parametrize("argv,match", [
    (["--timesteps", "900,950"], "--timesteps: timesteps must be strictly decreasing"),
    (["--sigmas", "1.0,x"], "--sigmas '1.0,x' is not a comma-separated list"),
    (["--sigmas", "1.5,0.5"], "--sigmas: sigmas must be strictly decreasing in \\(0, 1\\]"),
    (["--timesteps", "999,500", "--teacher"], "neither with --teacher"),
])
def test_sample_py_schedule_flag_errors(argv, match, capsys):
    import sample
    with pytest.raises(SystemExit) as e:
        sample.cli(["--ckpt", "nowhere"] + argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: ")
    assert re.search(match, err), err


def their_inference(arch, ref, copies, noise, inp):
    """The authors' DCM inference loop, re-written from their code, on their diffusers + PEFT model. HunyuanVideo
    (Vchitect/DCM fastvideo/sample/inference_hy.py lines 536-554: InferencePCMFMScheduler(1000, 17, 50), `pipe.dcm(...,
    cus_sigmas=[1.000, 0.9920, 0.9818, 0.9124])` on an fp32 transformer; fastvideo/models/hunyuan_hf/pipeline_hunyuan.py
    lines 949-990: guidance = tensor([6.0], transformer dtype) * 1000.0, timestep = t.expand(B).to(latents' dtype),
    latents fp32 at first). Wan (fastvideo/sample/inference_wan.py lines 401-422: cus_timesteps [1000, 992, 982, 949,
    905, 810], cfg 1.0; fastvideo/models/wan_hf/pipeline_wan.py lines 504-559: sigmas = timesteps / 1000, the timestep
    not cast). Both: their forwards' route (hy_forward / wan_forward): adapters and *_lora modules for int(t) <= 981 /
    978; fastvideo/distill/solver.py lines 238-254: the Euler step in their denoised / derivative form, cast to the
    model output's dtype."""
    hy = arch == "HunyuanVideo"
    sigmas = torch.tensor([1.000, 0.9920, 0.9818, 0.9124]) if hy else \
        torch.tensor([x / 1000 for x in [torch.tensor([v]) for v in (1000, 992, 982, 949, 905, 810)]])
    sig, ts = torch.cat([sigmas, torch.zeros(1)]), sigmas * 1000
    g = torch.tensor([6.0] * len(noise), dtype=torch.float32) * 1000.0
    lat = noise.float()
    for i, t in enumerate(ts):
        timestep = t.expand(lat.shape[0]).to(lat.dtype) if hy else t.expand(lat.shape[0])
        args = (inp["text"], inp["text_mask"], inp["pooled"], g) if hy else (inp["text"],)
        if int(timestep[0]) <= released.LAYOUTS[arch]["threshold"]:
            with detail_modules(ref, copies), torch.no_grad():
                out = ref(lat, timestep, *args, return_dict=False)[0]
        else:
            ref.disable_adapters()
            with torch.no_grad():
                out = ref(lat, timestep, *args, return_dict=False)[0]
        sample = lat.to(torch.float32)
        denoised = sample - out * sig[i]
        derivative = (sample - denoised) / sig[i]
        lat = (sample + derivative * (sig[i + 1] - sig[i])).to(out.dtype)
    return lat


@pytest.mark.parametrize("arch", ARCHS)
def test_sample_py_runs_their_inference(arch, request, tmp_path, capsys):
    """sample.py on the authors' released students reproduces their inference loops <= 1e-5 (fp32): HunyuanVideo's
    guidance 6000.0 and t in the latents' dtype (said on stdout; --exact is our loop with the 6016 they train with,
    which differs), Wan's as our loop already is."""
    ref, copies, folder = request.getfixturevalue({"HunyuanVideo": "hy", "Wan": "wan"}[arch])
    hy = arch == "HunyuanVideo"
    inp = hy_inputs(B=1) if hy else wan_inputs(B=1)
    cond = str(tmp_path / "cond.safetensors")
    save_file({k: inp[k] for k in (("text", "text_mask", "pooled") if hy else ("text",))}, cond)
    argv = ["--ckpt", os.path.dirname(folder), "--cond", cond, "--frames", "3", "--height", "4", "--width", "6",
            "--device", "cpu", "--dtype", "fp32", "--seed", "5"]
    import sample
    got = sample.main(argv + ["--out", str(tmp_path / "theirs")])["latents"]
    assert ("the authors' inference rules" in capsys.readouterr().out) == hy
    cfg = ARCHS[arch]["cfg"]
    noise = torch.randn((1, cfg.in_channels, 3, 4, 6), generator=torch.Generator().manual_seed(5))
    want = their_inference(arch, ref, copies, noise, inp)
    err = max_err(got, want)
    msg = f"\n{arch}: sample.py vs their inference loop {err:.2e} (values up to {want.abs().max():.2f})"
    if hy:
        exact = sample.main(argv + ["--out", str(tmp_path / "ours"), "--exact"])["latents"]
        msg += f"; --exact (guidance 6016): {max_err(exact, want):.2e}"
        assert max_err(exact, want) > 1e-4
    print(msg)
    assert err <= 1e-5


def test_their_loop_under_bf16_sees_their_timesteps():
    """sampling.authors_sample with a bf16 model: after the first step the latents are bf16, so the model sees t =
    1000, 992, 980, 912 (981.8 and 912.4 rounded through bf16) and guidance 6000.0, as their bf16 runs do."""
    import sampling
    import solver
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))

        def forward(self, x, t, guidance=None, **cond):
            seen.append((t.tolist(), guidance.tolist(), x.dtype))
            return (0.1 * x).to(torch.bfloat16)
    t, _, sigma = solver.custom_points(solver.flow_grid(), sigmas=[1.0, 0.9920, 0.9818, 0.9124])
    out = sampling.authors_sample(Spy(), torch.randn(2, 4, 1, 2, 2), {}, t, sigma)
    assert [s[0][0] for s in seen] == [1000.0, 992.0, 980.0, 912.0] and all(s[1] == [6000.0] * 2 for s in seen)
    assert [s[2] for s in seen] == [torch.bfloat16] * 4 and out.dtype == torch.float32


# The __init__ arguments of their model classes, read from their source (Vchitect/DCM at c7039e8):
# fastvideo/models/hunyuan_hf/modeling_hunyuan.py lines 678-696, fastvideo/models/wan_hf/modeling_wan.py lines 387-404.
# Their inference builds `cls(**json.load(config.json))` (inference_hy.py 473-475, inference_wan.py 335-337): any
# other key is a TypeError there.
THEIR_INIT = {
    "HunyuanVideo": {"in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
                     "num_single_layers", "num_refiner_layers", "mlp_ratio", "patch_size", "patch_size_t", "qk_norm",
                     "guidance_embeds", "text_embed_dim", "pooled_projection_dim", "rope_theta", "rope_axes_dim"},
    "Wan": {"patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
            "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim", "added_kv_proj_dim",
            "rope_max_seq_len"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_export_config_is_what_their_classes_take(arch, tmp_path):
    """export.py authors writes a config.json their classes accept (only their __init__ keys), loads back with its
    LoRA alpha (from the weights' metadata), and refuses a setting their class cannot express."""
    torch.manual_seed(0)
    expert = experts.DualExpert(model.build_transformer(ARCHS[arch]["cfg"]), 981.7, R, 3.0)
    out = released.export_released(expert, str(tmp_path / "transformer"))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert set(cfg) <= THEIR_INIT[arch] and set(cfg) == THEIR_INIT[arch] & set(model.config_to_dict(expert.config))
    again, info = released.load_released(out)
    assert info["alpha"] == 3.0 and again.config == expert.config
    import types  # a field their class lacks, set (our models refuse these I2V fields themselves; the check is general)
    field, value = ("image_condition_type", "token_replace") if arch == "HunyuanVideo" else ("pos_embed_seq_len", 514)
    cfg = copy.copy(ARCHS[arch]["cfg"])
    object.__setattr__(cfg, field, value)  # past the config's own validation
    odd = types.SimpleNamespace(arch=arch, config=cfg)
    with pytest.raises(released.ReleasedError, match=f"class has no {field}"):
        released.their_config(odd)
