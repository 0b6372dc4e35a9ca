"""experts.py: LoRA, per-sample dual-expert routing, trainable sets, adapter files, merged export."""
import copy
import json

import pytest
import torch

from storage import checkpoint
import model
import solver
from storage.latents import atomic_save_file
from experts import DualExpert
from lora import LoRALinear

ARCHS = ["tiny-cogvideox", "tiny-hunyuan", "tiny-wan"]
KAPPA = 37


def inputs(m, B, seed=0):
    """Random latents + conditioning for a tiny backbone (Hunyuan: right-padded text mask, guidance)."""
    g = torch.Generator().manual_seed(seed)
    cfg = m.config
    if isinstance(cfg, model.CogVideoXConfig):
        x = torch.randn(B, cfg.in_channels, 3, 4, 4, generator=g)
        return x, dict(text=torch.randn(B, 5, cfg.text_embed_dim, generator=g))
    if isinstance(cfg, model.WanConfig):
        return torch.randn(B, cfg.in_channels, 2, 4, 4, generator=g), dict(text=torch.randn(B, 6, cfg.text_dim, generator=g))
    x = torch.randn(B, cfg.in_channels, 2, 4, 4, generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([6, 4, 2, 5, 3, 1])[:B, None]).long()  # [B, 6] right padding
    return x, dict(text=torch.randn(B, 6, cfg.text_embed_dim, generator=g), text_mask=mask,
                   pooled=torch.randn(B, cfg.pooled_projection_dim, generator=g), guidance=torch.full((B,), 6016.0))


def timesteps(m, ks):
    """Model-native t (float32, as a training loop feeds it) at grid indices ks; and boundary_t at KAPPA."""
    grid = solver.grid_for(m.config)
    return grid.at(torch.tensor(ks))[0].float(), solver.boundary_t(grid, KAPPA)


def build(arch, seed=0, random_adapter=False, **kw):
    torch.manual_seed(seed)
    m = model.build_transformer(arch)
    _, bt = timesteps(m, [0])
    e = DualExpert(m, bt, **{"rank": 4, "alpha": 8, **kw})
    if random_adapter:  # a trained-looking adapter: nonzero B, copies moved off the semantic weights
        with torch.no_grad():
            for p in [*e.lora.parameters(), *e.copies.parameters()]:
                p.add_(0.1 * torch.randn_like(p))
    return m, e


# --- LoRALinear ---------------------------------------------------------------------------------

def test_lora_linear_zero_init_merge_unmerge():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    lin, x = LoRALinear(base, rank=3, alpha=6), torch.randn(4, 5, 12)
    assert lin.lora.scale == 2.0 and torch.equal(lin(x), base(x))  # B = 0: changes nothing
    torch.nn.init.normal_(lin.lora.B)
    w0, y = base.weight.detach().clone(), lin(x)
    assert not torch.allclose(y, base(x))
    lin.merge()
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)  # merged == unmerged (round-off)
    lin.unmerge()
    assert torch.equal(base.weight, w0)  # restored bit for bit (original kept while merged)
    assert torch.equal(lin(x), y)


def test_lora_linear_bf16_autocast_and_activation_checkpointing_give_grads():
    torch.manual_seed(0)
    lin = LoRALinear(torch.nn.Linear(16, 16), rank=4, alpha=8)
    lin.base.requires_grad_(False)
    torch.nn.init.normal_(lin.lora.B)  # with B = 0 the gradient of A is exactly 0
    x = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=False)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    for p in (lin.lora.A, lin.lora.B):
        assert p.grad is not None and p.grad.abs().sum() > 0 and p.grad.dtype == torch.float32


# --- routing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_is_the_semantic_expert_bit_for_bit(arch):
    m, e = build(arch)
    x, cond = inputs(m, 2)
    for ks in ([KAPPA, 0], [KAPPA + 1, 49]):  # both sides of the boundary, boundary index included
        t, _ = timesteps(m, ks)
        with torch.no_grad():
            assert torch.equal(e(x, t, **cond), m(x, t, **cond))


@pytest.mark.parametrize("arch", ARCHS)
def test_straddling_batch_equals_halves_run_separately(arch):
    m, e = build(arch, random_adapter=True)
    x, cond = inputs(m, 4)
    ks = [KAPPA + 1, 3, 49, KAPPA]  # semantic, detail, semantic, detail (mixed order)
    t, _ = timesteps(m, ks)
    assert e.detail_mask(t, 4).tolist() == [False, True, False, True]
    taps = {"tiny-cogvideox": [0], "tiny-hunyuan": [0, 2], "tiny-wan": [0, 1]}[arch]
    with torch.no_grad():
        v, feats = e(x, t, taps=taps, **cond)
        for idx, tree in (([1, 3], e.detail), ([0, 2], m)):
            sub = {k: c[idx] for k, c in cond.items()}
            v_half, f_half = e(x[idx], t[idx], taps=taps, **sub)
            v_tree, _ = tree(x[idx], t[idx], taps=taps, **sub)
            assert torch.equal(v[idx], v_half) and torch.equal(v_half, v_tree)
            assert all(torch.equal(f[idx], fh) for f, fh in zip(feats, f_half))
        assert not torch.allclose(v[[1, 3]], m(x[[1, 3]], t[[1, 3]], **{k: c[[1, 3]] for k, c in cond.items()}))
        # time_embed / head are routed the same way
        temb = e.time_embed(t, **({} if arch != "tiny-hunyuan" else
                                  {"pooled": cond["pooled"], "guidance": cond["guidance"]}))
        assert torch.equal(temb[[1, 3]], e.detail.time_embed(t[[1, 3]], **(
            {} if arch != "tiny-hunyuan" else {"pooled": cond["pooled"][[1, 3]], "guidance": cond["guidance"][[1, 3]]})))
    with pytest.raises(ValueError, match="needs t"):
        e.head(feats[0], temb, x.shape[2:])


@pytest.mark.parametrize("arch", ARCHS)
def test_detail_mode_grads_reach_only_adapter_and_copies(arch, capsys):
    m, e = build(arch, random_adapter=True)
    x, cond = inputs(m, 3)
    t, _ = timesteps(m, [KAPPA + 2, 10, KAPPA])
    e.set_mode("detail")
    e(x, t, **cond).square().mean().backward()
    adapter = {id(p) for p in [*e.lora.parameters(), *e.copies.parameters()]}
    for name, p in e.named_parameters():
        if id(p) in adapter:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    c = e.param_counts()
    assert c["trainable"] == c["adapter"] == c["lora"] + c["copies"] and c["total"] == c["backbone"] + c["adapter"]
    e.set_mode("semantic")
    assert e.param_counts()["trainable"] == c["backbone"]
    with capsys.disabled():
        print(f"\n{arch} rank 4: backbone {c['backbone']}, adapter {c['adapter']} "
              f"(lora {c['lora']}, copies {c['copies']}), trainable share {c['trainable'] / c['total']:.1%}")


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_keeps_each_sample_on_its_path(arch):
    # the backward re-runs checkpointed blocks after a no-grad forward on the other path: the
    # recomputation must still see the LoRA of the detail samples (a global flag would not)
    m, e = build(arch, random_adapter=True)
    x, cond = inputs(m, 3)
    t, _ = timesteps(m, [KAPPA + 2, 10, KAPPA])
    grads = []
    for gc in (False, True):
        e.zero_grad(set_to_none=True)
        e.gradient_checkpointing = gc
        loss = e(x, t, **cond).square().mean()
        with torch.no_grad():
            e(x[:1], t[:1], **{k: c[:1] for k, c in cond.items()})  # semantic-only call in between
        loss.backward()
        grads.append([p.grad.clone() for p in [*e.lora.parameters(), *e.copies.parameters()]])
    assert m.gradient_checkpointing and e.detail.gradient_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_trees_share_weights_through_deepcopy_and_dtype_conversion():
    # EMA targets are deep copies; .double()/.to() must keep both trees on the same tensors
    m, e = build("tiny-cogvideox", random_adapter=True)
    e2 = copy.deepcopy(e)
    for ex in (e, e2):
        blk_d, blk_s = ex.detail.transformer_blocks[0], ex.backbone.transformer_blocks[0]
        assert blk_d is not blk_s and blk_d.ff is blk_s.ff and blk_d.norm1 is blk_s.norm1
        assert blk_d.attn1.to_q.base is blk_s.attn1.to_q
        assert blk_d.attn1.to_q.lora is ex.lora["transformer_blocks__0__attn1__to_q"]
        assert ex.detail.proj_out is ex.copies["proj_out"]
    assert e2.backbone.transformer_blocks[0].ff is not m.transformer_blocks[0].ff
    e2.double()
    x, cond = inputs(m, 2)
    t, _ = timesteps(m, [3, KAPPA + 1])
    with torch.no_grad():
        v64 = e2(x.double(), t, **{k: c.double() for k, c in cond.items()})
        torch.testing.assert_close(v64.float(), e(x, t, **cond), rtol=1e-4, atol=1e-5)
    assert v64.dtype == torch.float64


def full_size_expert(preset, capsys, lora_targets):
    """The authors' detail expert (rank 128, alpha 256) on a full-size preset, on the meta device; prints its share."""
    e = DualExpert(model.build_transformer(preset, device="meta"), 980.0, lora_targets=lora_targets)
    c = e.param_counts()
    with capsys.disabled():
        print(f"\n{preset} --lora-targets {lora_targets}: backbone {c['backbone'] / 1e9:.3f} B, adapter {c['adapter'] / 1e6:.1f} M "
              f"(lora {c['lora'] / 1e6:.1f} M, copies {c['copies'] / 1e6:.1f} M) = "
              f"{c['adapter'] / c['backbone']:.2%} of the backbone; {len(e.lora_names)} LoRA linears")
    return e, c


def test_hunyuan_video_detail_expert_adds_under_3_percent(capsys):
    e, c = full_size_expert("hunyuan-video", capsys, "all")
    assert c["adapter"] / c["backbone"] < 0.03
    assert len(e.lora_names) == 20 * 8 + 40 * 3 + 2 * 4  # double (incl. text stream), single q/k/v, refiner
    a, ca = full_size_expert("hunyuan-video", capsys, "authors")  # PEFT suffix match: no add_*_proj / to_add_out
    assert len(a.lora_names) == 20 * 4 + 40 * 3 + 2 * 4 and a.copy_names == ["time_text_embed", "norm_out", "proj_out"]
    assert set(a.lora_names) < set(e.lora_names) and ca["adapter"] < c["adapter"]


def test_cogvideox_2b_detail_expert_targets(capsys):
    for which in ("all", "authors"):  # the same set: CogVideoX's attention linears are all named to_q/k/v/out.0
        e, _ = full_size_expert("cogvideox-2b", capsys, which)
        assert len(e.lora_names) == 4 * 30 and e.copy_names == ["time_embedding", "norm_out", "proj_out"]


def test_wan_detail_expert_authors_targets(capsys):
    """Authors' Wan targets: to_q/k/v/to_out.0 of self- and cross-attention, copies of the timestep layers."""
    for which in ("all", "authors"):  # the same set: every Wan attention linear is named to_q/k/v/out.0
        e, c = full_size_expert("wan2.1-t2v-1.3b", capsys, which)
        assert len(e.lora_names) == 30 * 8 and e.copy_names == ["condition_embedder", "norm_out", "proj_out"]
        assert c["lora"] == 30 * 8 * 128 * (1536 + 1536)  # every attention linear is 1536 -> 1536
        assert "scale_shift_table" not in dict(e.copies.named_parameters())  # shared, as in the authors' forward


def test_hunyuan_targets_and_copy_adaln():
    torch.manual_seed(0)
    m = model.build_transformer("tiny-hunyuan")
    e = DualExpert(m, 980.0, rank=2, alpha=2, copy_adaln=True, lora_targets="all")
    assert len(e.lora_names) == 8 * 1 + 3 * 2 + 4 * 1  # double (incl. text stream), single q/k/v, refiner
    assert "single_transformer_blocks.0.proj_out" not in e.lora_names
    assert {"context_embedder.time_text_embed", "transformer_blocks.0.norm1_context.linear",
            "single_transformer_blocks.1.norm.linear",
            "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear"} <= set(e.copy_names)
    with pytest.raises(ValueError, match="matches no module"):
        DualExpert(m, 980.0, targets={"lora": ["transformer_blocks.*.attn1.to_q"], "copy": []})


def test_cogvideox_copy_adaln_copies_every_block_modulation():
    m, e = build("tiny-cogvideox", copy_adaln=True)
    n = m.config.num_layers
    assert e.copy_names == ["time_embedding"] + [f"transformer_blocks.{i}.norm{j}.linear" for i in range(n) for j in (1, 2)] \
        + ["norm_out", "proj_out"]
    x, cond = inputs(m, 2)
    t, _ = timesteps(m, [0, 0])  # build() puts the boundary at k = 0: both samples take the detail path
    with torch.no_grad():
        assert torch.equal(e(x, t, **cond), m(x, t, **cond))  # fresh copies: still the semantic expert
    e(x, t, **cond).square().mean().backward()
    copy = e.copies["transformer_blocks__0__norm1__linear"].weight
    assert copy.grad is not None and copy.grad.abs().sum() > 0
    assert m.transformer_blocks[0].norm1.linear.weight.grad is None


# --- files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_and_merged_export(arch, tmp_path):
    m, e = build(arch, random_adapter=True)
    x, cond = inputs(m, 2)
    t, _ = timesteps(m, [KAPPA, 5])
    e.save_semantic(tmp_path / "semantic")
    e.save_detail(tmp_path / "detail.safetensors", meta={"kappa": KAPPA, "grid": "default"})

    m2 = checkpoint.load_transformer(tmp_path / "semantic")
    e2 = DualExpert.from_detail(m2, tmp_path / "detail.safetensors")
    for a, b in ((e.semantic_state(), e2.semantic_state()), (e.detail_state(), e2.detail_state())):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(e(x, t, **cond), e2(x, t, **cond))
    assert e2.read_detail_meta(tmp_path / "detail.safetensors")["kappa"] == KAPPA

    e.export_merged(tmp_path / "merged")
    merged = checkpoint.load_transformer(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, **cond), e(x, t, **cond), rtol=1e-4, atol=1e-5)


def test_load_detail_is_strict(tmp_path):
    m, e = build("tiny-cogvideox", random_adapter=True)
    path = tmp_path / "d.safetensors"
    e.save_detail(path)
    _, other_rank = build("tiny-cogvideox", rank=2)
    with pytest.raises(ValueError, match="rank"):
        other_rank.load_detail(path)
    sd = {k: v.detach() for k, v in e.detail_state().items()}
    del sd["proj_out.bias"]
    atomic_save_file(sd, tmp_path / "bad.safetensors", metadata={"dcm": json.dumps(e.detail_meta())})
    with pytest.raises(ValueError, match="proj_out.bias"):
        e.load_detail(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="boundary_t"):
        DualExpert(m, 123.0, rank=4, alpha=8).load_detail(path)


class _OnDevice(torch.Tensor):
    """A t that FSDP2's root hook has moved to a GPU, stood in for on a CPU: reading its values on the host (what
    would sync a CUDA stream) raises."""
    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero,
             torch.Tensor.is_nonzero, torch.Tensor.__index__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS:
            raise RuntimeError(f"host sync: {func.__name__} read a device t")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("arch", ARCHS)
def test_routing_reads_no_device_t(arch):
    """Issue 28 item 8: under FSDP2 on CUDA the root's pre-forward hook moves t to the GPU, and deciding the route
    from it synced the host every call. The decision is taken from the caller's host t before any hook (a hook
    registered first, as FSDP2's is, stands a t whose host reads raise in for the device one): every split of the
    batch gives the plain call's output and no read of the moved t happens (the old routing raised here)."""
    m, e = build(arch, random_adapter=True)
    x, cond = inputs(m, 4)
    moved = []

    def move(mod, args, kwargs):  # what FSDP2's root pre-forward does to a tensor input
        moved.append(args[1].as_subclass(_OnDevice))
        return (args[0], moved[-1], *args[2:]), kwargs
    for ks in ([KAPPA + 1, 3, 49, KAPPA], [3, 0, KAPPA, 7], [KAPPA + 1, 40, 49, 45]):  # mixed, detail, semantic
        t, _ = timesteps(m, ks)
        with torch.no_grad():
            want = e(x, t, **cond)
            handle = e.register_forward_pre_hook(move, prepend=True, with_kwargs=True)
            try:
                got = e(x, t, **cond)
            finally:
                handle.remove()
        assert isinstance(moved[-1], _OnDevice) and torch.equal(torch.Tensor(got), want), ks
    with pytest.raises(RuntimeError, match="host sync"):  # the stand-in does catch a host read of t
        bool(moved[-1].max() > 0)
