"""train.py --semantic-lora (one GPU): the teacher is the student's own base with its adapters off (bit for bit), a
fresh adapter is the teacher, one CD / GAN step equals the same weights built as separate teacher and student copies,
nothing is stored twice, resume is exact, --sp 2 and --fsdp (2 gloo ranks) equal one process, bad input."""
import copy
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import experts
import losses
from storage import checkpoint, integrity, latents
import model
import sample
import sampling
import solver
from teacher import Teacher
from test_experts import KAPPA, inputs, timesteps
from test_train import LORA, SMALL, make_dataset, run, tensors
from test_robust import train_err
from test_train_sp import assert_close, assert_losses, torchrun

ARCHS = ["tiny-cogvideox", "tiny-hunyuan", "tiny-wan"]


def randomize(*modules, seed=1):
    """A trained-looking adapter: every parameter moved off its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def stored(m):
    """The storages of every tensor a module holds (parameters and buffers), by data pointer."""
    return {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]}


@pytest.mark.parametrize("arch", ARCHS)
def test_base_view_is_the_teacher_and_a_fresh_adapter_changes_nothing(arch):
    torch.manual_seed(0)
    base = model.build_transformer(arch)
    teacher = copy.deepcopy(base)  # the same weights, a separate copy: the reference
    x, cond = inputs(base, 3)
    t, bt = timesteps(base, [45, 40, 20])
    ref = teacher(x, t, **cond)
    sem = experts.SemanticLoRA(base, 4, 8)
    trains = [p for p in sem.parameters() if p.requires_grad]
    assert {id(p) for p in trains} == {id(p) for p in [*sem.lora.parameters(), *sem.copies.parameters()]}
    assert torch.equal(sem(x, t, **cond), ref)  # B = 0 and the copies equal the base: the teacher itself
    randomize(sem.lora, sem.copies)
    assert not torch.equal(sem(x, t, **cond), ref)
    assert torch.equal(sem.base_view()(x, t, **cond), ref)  # adapters off: the teacher, bit for bit
    dual = experts.DualExpert(base, bt, 4, 8, semantic=sem)
    t_det = timesteps(base, [20, 10, 3])[0]  # all on the detail side: one sub-batch, the same GEMM shapes
    assert torch.equal(dual(x, t_det, **cond), sem(x, t_det, **cond))  # a fresh detail adapter: the semantic expert
    assert torch.equal(dual.base_view()(x, t, **cond), ref)
    randomize(dual.lora, dual.copies, seed=2)
    assert torch.equal(dual.base_view()(x, t, **cond), ref) and not torch.equal(dual(x, t_det, **cond), sem(x, t_det, **cond))
    # no hidden copy: every tensor the three trees use is stored once, in the registered modules
    used = stored(dual.detail) | stored(dual.semantic) | stored(dual.backbone)
    assert used <= stored(dual) and not stored(dual) & stored(teacher)
    n = sum(p.numel() for p in dual.parameters())
    c = dual.param_counts()
    assert n == c["total"] == c["backbone"] + c["semantic_adapter"] + c["adapter"]
    assert c["trainable"] == c["adapter"] and c["backbone"] == sum(p.numel() for p in teacher.parameters())


def one_step(arch, shared):
    """Loss terms and the trained adapter's gradients of one semantic and one detail CD step (+ GAN, FM) on a trained-
    looking LoRA semantic expert; shared: as train.py --semantic-lora builds it (one tree, the teacher its base), else
    the same weights as separate copies (teacher, the semantic expert merged into a full backbone)."""
    torch.manual_seed(0)
    base = model.build_transformer(arch)
    cfg, grid = base.config, solver.grid_for(base.config)
    bt = solver.boundary_t(grid, KAPPA)
    sem = experts.SemanticLoRA(base, 4, 8)
    randomize(sem.lora, sem.copies)
    if shared:
        student_sem, t_model = sem, sem.base_view()
    else:
        t_model, student_sem = copy.deepcopy(base), copy.deepcopy(base)
        student_sem.load_state_dict(sem.merged_state())
        student_sem.requires_grad_(True)  # a full semantic expert: every weight trains

    def detail_expert():  # built after the semantic step (it freezes the semantic adapter)
        torch.manual_seed(5)  # the detail adapter draws alike in both builds
        dual = (experts.DualExpert(base, bt, 4, 8, semantic=sem.requires_grad_(False)) if shared else
                experts.DualExpert(copy.deepcopy(student_sem).requires_grad_(False), bt, 4, 8))
        randomize(dual.lora, dual.copies, seed=3)
        return dual
    x0, cond = inputs(base, 2, seed=7)
    scond, cond = cond, {k: v for k, v in cond.items() if k != "guidance"}
    uncond = {k: torch.zeros_like(v[:1]) for k, v in cond.items()}
    teacher = Teacher(t_model, grid, 6.0, uncond)
    g = torch.Generator().manual_seed(11)
    eps, n = (torch.randn(x0.shape, generator=g) for _ in range(2))
    out = {}
    for name, k in (("sem", torch.tensor([45, 40])), ("det", torch.tensor([30, 3]))):
        student = student_sem if name == "sem" else detail_expert()
        l_cd, xhat, x_tgt, k_end = losses.consistency_step(student, student, teacher, grid, [KAPPA], x0, eps, k, cond,
                                                           scond)
        terms = {"cd": l_cd}
        if name == "det":
            torch.manual_seed(6)
            disc = losses.Discriminator.for_model(student, hidden=32)
            tok = tuple(s // p for s, p in zip(x0.shape[2:], latents.patch_of(cfg)))  # the token grid (F, h, w)
            terms["gan_g"], terms["fm"], _ = losses.adversarial_terms(teacher.model, disc, x_tgt, xhat, n, k_end,
                                                                      torch.tensor([10, 20]), grid, scond, tok)
        sum(terms.values()).backward()
        trained = (student.lora, student.copies) if name == "det" or shared else (student,)
        out[name] = ({k: v.item() for k, v in terms.items()},
                     torch.cat([p.grad.flatten() for m in trained for p in m.parameters() if p.grad is not None]))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_equals_separate_teacher_and_student_copies(arch):
    """The shared tree's losses equal the separate copies' within 1e-6 (relative), the detail adapter's gradients
    within 1e-4 of their largest (fp32 round-off: the merged weight W + BA rounds differently from W x + B A x, and
    the tiny models' gradients cancel; measured up to 7e-5)."""
    a, b = one_step(arch, True), one_step(arch, False)
    for name in ("sem", "det"):
        for k, v in a[name][0].items():
            assert v == pytest.approx(b[name][0][k], rel=1e-6, abs=1e-9), (name, k, v, b[name][0][k])
        assert a[name][0]["cd"] > 0
    ga, gb = a["det"][1], b["det"][1]
    assert ga.shape == gb.shape and float((ga - gb).abs().max() / gb.abs().max()) < 1e-4



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A random tiny CogVideoX as the teacher, a dataset for it, and a 2-step --semantic-lora semantic run."""
    root = tmp_path_factory.mktemp("one_gpu")
    torch.manual_seed(0)
    checkpoint.save_transformer(model.build_transformer("tiny-cogvideox"), root / "teacher")
    d = make_dataset(root / "data", "tiny-cogvideox", shape=(5, 6, 6))
    common = ["--teacher", root / "teacher", "--data", d, "--batch-size", 2, "--lr", 1e-3, "--semantic-lora", 4, *SMALL]
    sem = ["--stage", "semantic", *common]
    run(*sem, "--out", root / "sem", "--max-steps", 2)
    det = ["--stage", "detail", "--init", root / "sem", *common, *LORA, "--gan-real", "teacher"]  # (+ SP / FSDP below)
    return root, sem, det


def test_swapped_ema_is_an_ema_copy_of_the_adapters():
    """losses.SwappedEMA: the target's forward equals a separate EMA model's bit for bit, leaves the student's own
    weights as they were, and its update is the EMA of eq. 4 over the trained tensors only."""
    torch.manual_seed(0)
    sem = experts.SemanticLoRA(model.build_transformer("tiny-wan"), 4, 8)
    randomize(sem.lora, sem.copies)
    ema = losses.SwappedEMA(sem)
    with torch.no_grad():
        for p in sem.lora.parameters():
            p.add_(1.0)  # the online adapter moves on; the EMA keeps the old values
    ref = copy.deepcopy(sem)
    ref.load_state_dict(sem.state_dict() | ema.state_dict())
    before = {k: v.clone() for k, v in sem.state_dict().items()}
    x, cond = inputs(sem.backbone, 2)
    t = timesteps(sem.backbone, [45, 40])[0]
    with torch.no_grad():
        assert torch.equal(ema(x, t, **cond), ref(x, t, **cond)) and not torch.equal(sem(x, t, **cond), ref(x, t, **cond))
    assert all(torch.equal(v, sem.state_dict()[k]) for k, v in before.items())
    assert set(ema.state_dict()) == {n for n, p in sem.named_parameters() if p.requires_grad}
    want = {k: v.lerp(sem.state_dict()[k], 0.1) for k, v in ema.state_dict().items()}
    losses.ema_update(ema, sem, 0.9)
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in want.items())


def test_step_folders_hold_adapters_only_and_resume_is_exact(runs, tmp_path):
    root, sem, det = runs
    step = root / "sem" / "step_0000002"
    assert sorted(os.listdir(step)) == ["checksums.json", "config.json", "optimizer.safetensors", "semantic.safetensors",
                                        "train_state.pt"]
    assert run(*sem, "--out", tmp_path / "sem", "--max-steps", 1)["step"] == 1  # 1 step, then resumed: the 2-step run
    run(*sem, "--out", tmp_path / "sem", "--max-steps", 2, "--resume")
    a, b = tensors(step), tensors(tmp_path / "sem" / "step_0000002")
    assert a.keys() == b.keys() and len(a) > 50 and [k for k in a if not torch.equal(a[k], b[k])] == []
    full = run(*det, "--out", tmp_path / "det", "--max-steps", 2)
    run(*det, "--out", tmp_path / "det_res", "--max-steps", 1)
    run(*det, "--out", tmp_path / "det_res", "--max-steps", 2, "--resume")
    a, b = tensors(full["checkpoint"]), tensors(tmp_path / "det_res" / "step_0000002")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert full["losses"]["gan_g"] > 0 and full["losses"]["fm"] > 0
    assert sorted(os.listdir(full["checkpoint"])) == ["checksums.json", "config.json", "detail.safetensors",
                                                      "optimizer.safetensors", "semantic.safetensors", "train_state.pt"]
    for stage, argv in (("semantic", [*sem, "--target-ema", 0.5]), ("detail", [*det, "--target-ema", 0.5])):  # EMA
        ref = run(*argv, "--out", tmp_path / f"ema_{stage}", "--max-steps", 2)
        run(*argv, "--out", tmp_path / f"ema_{stage}_res", "--max-steps", 1)
        run(*argv, "--out", tmp_path / f"ema_{stage}_res", "--max-steps", 2, "--resume")
        a, b = tensors(ref["checkpoint"]), tensors(tmp_path / f"ema_{stage}_res" / "step_0000002")
        assert a.keys() == b.keys() and any("/ema/" in k for k in a) and [k for k in a if not torch.equal(a[k], b[k])] == []
    # the semantic adapter is trained in the semantic stage and frozen in the detail stage
    sem_file = "semantic.safetensors"
    assert [k for k in a if k.startswith(sem_file) and not torch.equal(a[k], tensors(step)[k])] == []


def test_sample_merges_the_adapters_once(runs, tmp_path):
    """sample.py on a --semantic-lora detail run: the teacher's weights + both adapters merged = the unmerged tree."""
    root, _, det = runs
    out = run(*det, "--out", tmp_path / "det", "--max-steps", 1)["checkpoint"]
    m, info = sampling.load_student(out)
    assert info["mode"] == "dual" and isinstance(m, experts.DualExpert) and m.sem is None  # merged into the base
    base = checkpoint.load_transformer(root / "teacher")
    sem = experts.SemanticLoRA.from_file(base, os.path.join(out, "semantic.safetensors"))
    ref = experts.DualExpert.from_detail(base, os.path.join(out, "detail.safetensors"), semantic=sem)
    x, cond = inputs(base, 2)
    for ks in ([45, 40], [20, 3]):
        t = timesteps(base, ks)[0]
        with torch.no_grad():
            got, want = m(x, t, **cond), ref(x, t, **cond)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    teacher, _ = sampling.load_student(out, teacher=True)  # --teacher on such a checkpoint: its base
    with torch.no_grad():
        assert torch.equal(teacher(x, t, **cond), base(x, t, **cond))


def test_sp2_and_fsdp_equal_one_process(runs, tmp_path):
    """2 gloo ranks, --sp 2 (one SP group) and --fsdp (DP 2, batch 1 each; detail: --gan-first), both stages (TC; GAN + FM through the
    shared base) -> the weights and losses of the 1-process run."""
    root, sem, det = runs
    torchrun(2, [["train", *sem, *sp, "--out", tmp_path / f"sem{i}", "--max-steps", 2]
                 for i, sp in enumerate((["--sp", 2], ["--fsdp", "--batch-size", 1]))]
             + [["train", *det, *sp, "--out", tmp_path / f"det{i}", "--max-steps", 2]
                for i, sp in enumerate((["--sp", 2], ["--fsdp", "--grad-ckpt", "--gan-first", "--batch-size", 1]))], tmp_path)
    run(*det, "--out", tmp_path / "det_one", "--max-steps", 2)
    for name, ref, keys in (("sem", root / "sem", ["loss", "cd", "tc", "grad_norm"]),
                            ("det", tmp_path / "det_one", ["loss", "cd", "gan_g", "fm", "d", "grad_norm"])):
        for i in (0, 1):
            assert_losses(tmp_path / f"{name}{i}", ref, keys)
            assert_close(tmp_path / f"{name}{i}" / "step_0000002", ref / "step_0000002", f"{name}{i}")


BAD = {  # name -> (argv after the common flags, expected part of the one-line message)
    "negative rank": (["--stage", "semantic", "--semantic-lora", -1], "--semantic-lora -1: a LoRA rank must be >= 1"),
    "with --detail-full": (["--stage", "detail", "--init", "SEM", "--semantic-lora", 4, "--detail-full"],
                           "--semantic-lora with --detail-full"),
    "detail without the init's rank": (["--stage", "detail", "--init", "SEM"],
                                       "is a LoRA semantic expert (--semantic-lora 4): pass --semantic-lora 4"),
    "detail with another rank": (["--stage", "detail", "--init", "SEM", "--semantic-lora", 8],
                                 "is a LoRA semantic expert (--semantic-lora 4): pass --semantic-lora 4"),
    "detail on a full semantic expert": (["--stage", "detail", "--init", "TEACHER", "--semantic-lora", 4],
                                         "is a fully fine-tuned semantic expert: --semantic-lora 4 builds on a LoRA one"),
    "detail with another teacher": (["--stage", "detail", "--init", "SEM", "--semantic-lora", 4, "--teacher", "OTHER"],
                                    "is not the base of the LoRA semantic expert"),
    "detail with other lora targets": (["--stage", "detail", "--init", "SEM", "--semantic-lora", 4, "--lora-targets",
                                        "all"], "was trained with --lora-targets authors"),
    "EMA target under FSDP": (["--stage", "semantic", "--semantic-lora", 4, "--target-ema", 0.9, "--fsdp"],
                              "--target-ema with --semantic-lora and --fsdp"),
    "semantic --init": (["--stage", "semantic", "--semantic-lora", 4, "--init", "TEACHER"],
                        "--init with --semantic-lora: a LoRA semantic expert starts from the teacher's weights"),
    "--lora-alpha 0": (["--stage", "semantic", "--semantic-lora", 4, "--lora-alpha", 0], "--lora-alpha 0.0 must be"),
    "semantic --lora-targets alone": (["--stage", "semantic", "--lora-targets", "all"],
                                      "--lora-targets means nothing to --stage semantic without --semantic-lora"),
    "--gan-first without GAN": (["--stage", "detail", "--init", "SEM", "--semantic-lora", 4, "--gan-first", "--w-gan", 0,
                                 "--w-fm", 0], "--gan-first with --w-gan 0 --w-fm 0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(runs, case, tmp_path, monkeypatch, capsys):
    root, sem, _ = runs
    argv, want = BAD[case]
    paths = {"SEM": root / "sem", "TEACHER": root / "teacher", "OTHER": tmp_path / "other"}
    if "OTHER" in argv:
        shutil.copytree(root / "teacher", tmp_path / "other")
    common = [a for a in sem[sem.index("--teacher"):] if a not in ("--semantic-lora", 4)]
    argv = [*common, *[paths.get(a, a) if isinstance(a, str) else a for a in argv], "--out", tmp_path / "out"]
    msg = train_err(monkeypatch, capsys, argv)
    assert msg.startswith("error: ") and want in msg and "\n" not in msg, msg
    assert not os.path.isdir(tmp_path / "out")


def test_a_checkpoint_whose_base_is_gone_is_one_line(runs, tmp_path, capsys):
    """sample.py on a --semantic-lora run whose teacher folder moved: one error line naming the missing base."""
    root, _, _ = runs
    shutil.copytree(root / "teacher", tmp_path / "teacher")
    shutil.copytree(root / "sem", tmp_path / "sem")
    step = tmp_path / "sem" / "step_0000002"
    with open(step / "config.json") as f:
        cfg = json.load(f)
    cfg["teacher"] = str(tmp_path / "teacher")
    with open(step / "config.json", "w") as f:
        json.dump(cfg, f)
    integrity.write_checksums(step)
    assert sampling.load_student(step)[1]["mode"] == "semantic"
    shutil.rmtree(tmp_path / "teacher")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.cli(["--ckpt", str(step), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --ckpt ") and "base, the run's --teacher" in err and \
        "does not exist" in err and "\n" not in err, err


@pytest.mark.parametrize("stage", ["semantic", "detail"])
def test_validation_samples_leave_training_alone_and_are_what_sample_py_samples(runs, stage, tmp_path):
    """--sample-every on a --semantic-lora run: the run is bit-identical with and without it, and the latents equal
    sample.py's sampler on the saved (merged) checkpoint from the same noise and prompts."""
    root, sem, det = runs
    argv = [*(sem if stage == "semantic" else det), "--max-steps", 1, "--target-ema", 0.5]
    plain = run(*argv, "--out", tmp_path / "plain")
    watched = run(*argv, "--out", tmp_path / "watched", "--sample-every", 1, "--sample-steps", 2, "--sample-num", 3)
    a, b = tensors(plain["checkpoint"]), tensors(watched["checkpoint"])
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    with safe_open(str(tmp_path / "watched" / "samples" / "step_0000001" / "latents_2step.safetensors"), "pt") as f:
        x = f.get_tensor("latents")
    model, info = sampling.load_student(watched["checkpoint"])
    ds = latents.LatentDataset(sem[sem.index("--data") + 1])
    cond = {"text": ds.tensors["text"][torch.linspace(0, len(ds) - 1, 3).round().long()]}
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0 + 7_000_003))
    ref = sampling.student_sample(model, noise, cond, info["grid"], info["boundaries"], 2, 6.0)
    assert torch.allclose(x, ref, atol=1e-5), (x - ref).abs().max()
