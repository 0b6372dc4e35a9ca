"""Every transformer block traces into one torch.compile graph: no graph breaks inside a block (bench issue).

The HunyuanVideo forward itself breaks the graph on purpose, outside the blocks: it checks the text
mask and drops text padding shared by the whole batch, both data-dependent (see hunyuan_video.py)."""
import pytest
import torch
import torch._dynamo as dynamo

import model
from teacher import embedded_guidance


def block_inputs(name):
    """(block, args, kwargs) of the first call of every block class in one forward of a tiny preset."""
    m = model.build_transformer(name).eval()
    cfg, B = m.config, 2
    x, t = torch.randn(B, cfg.in_channels, 2, 8, 8), torch.tensor([500.0, 20.0])
    cond = {"text": torch.randn(B, 5, getattr(cfg, "text_dim", None) or cfg.text_embed_dim)}
    if "hunyuan" in name:
        cond |= {"text_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]),
                 "pooled": torch.randn(B, cfg.pooled_projection_dim),
                 "guidance": torch.full((B,), embedded_guidance(6.0))}
    seen = {}

    def grab(block, args, kwargs):
        seen.setdefault(type(block).__name__, (block, args, kwargs))

    hooks = [mod.register_forward_pre_hook(grab, with_kwargs=True)
             for mod in m.modules() if type(mod).__name__.endswith("Block")]
    with torch.no_grad():
        m(x, t, **cond)
    for h in hooks:
        h.remove()
    return seen


BLOCKS = {"tiny-cogvideox": ["CogVideoXBlock"], "tiny-cogvideox-rope": ["CogVideoXBlock"],
          "tiny-hunyuan": ["HunyuanDoubleBlock", "HunyuanRefinerBlock", "HunyuanSingleBlock"], "tiny-wan": ["WanBlock"]}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_blocks_compile_without_graph_breaks(name):
    blocks = block_inputs(name)
    assert sorted(blocks) == BLOCKS[name]
    for cls, (block, args, kwargs) in blocks.items():
        dynamo.reset()
        with torch.no_grad():
            ex = dynamo.explain(block)(*args, **kwargs)
        assert ex.graph_break_count == 0, f"{cls}: {[str(r.reason)[:200] for r in ex.break_reasons]}"
        assert ex.graph_count == 1, cls


def test_backbones_do_not_import_model():
    """The backbone files import layers.py only; model.py imports them (no import cycle)."""
    import ast
    import pathlib
    import model
    for mod in model._ARCH_MODULES:
        tree = ast.parse(pathlib.Path(mod.__file__).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "model" not in names, mod.__name__


def test_compile_runs_through_train_and_equals_eager(tmp_path, monkeypatch):
    """train.py --compile (issue 28: it had never run through the training loop): the semantic stage and the detail
    stage (DualExpert routing, GAN + FM) run compiled and give the eager run's weights. The backend is aot_eager
    (dynamo's capture and AOT autograd, as inductor gets them; no C++ compiler needed on a CPU)."""
    import train
    from storage import checkpoint
    from test_train import LORA, SMALL, make_dataset, run, tensors
    torch.manual_seed(0)
    checkpoint.save_transformer(model.build_transformer("tiny-wan"), tmp_path / "t")
    d = make_dataset(tmp_path / "d", "tiny-wan", shape=(4, 4, 4))
    common = ["--teacher", tmp_path / "t", "--data", d, "--batch-size", 2, "--lr", 1e-3, "--max-steps", 2, *SMALL]
    plain = torch.nn.Module.compile
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **k: compiled.append(type(self).__name__) or plain(
        self, backend="aot_eager"))
    for stage, extra in (("semantic", []), ("detail", ["--init", tmp_path / "semantic_eager", *LORA])):
        run("--stage", stage, *common, *extra, "--out", tmp_path / f"{stage}_eager")
        run("--stage", stage, *common, *extra, "--out", tmp_path / f"{stage}_compiled", "--compile")
        a, b = tensors(tmp_path / f"{stage}_eager" / "step_0000002"), tensors(tmp_path / f"{stage}_compiled" / "step_0000002")
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())
        assert a.keys() == b.keys() and worst < 1e-5, (stage, worst)
    assert compiled == ["WanTransformer", "DualExpert"] and train  # the student itself was compiled, each stage
