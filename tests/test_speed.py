"""Speed work (issue 16): cached positional tables, the CD step without host reads of device values, fused AdamW,
the merged detail LoRA at sampling time, and the bench's training-step races on the tiny presets."""
import dataclasses

import pytest
import torch
import torch._dynamo as dynamo

import cogvideox
import model as models

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
    return (lambda g, dt: m._rope(g, 7, CPU)), (lambda g, dt: type(m)._rope.__wrapped__(m, g, 7, CPU))


CONFIGS = {"sincos": "tiny-cogvideox", "cogvideox rope": "tiny-cogvideox-rope", "hunyuan rope": "tiny-hunyuan"}


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
    field = {"sincos": "spatial_interpolation_scale", "cogvideox rope": "sample_height", "hunyuan rope": "rope_theta"}
    other = dataclasses.replace(cfg, **{field[name]: 3})  # another config is another key: another table
    a, b = as_tuple(_tables(name, other)[0]((2, 3, 4), torch.float32))[-1], as_tuple(cached((2, 3, 4), torch.float32))[-1]
    assert a.shape == b.shape and not torch.equal(a, b)


def test_table_cache_is_bounded_and_safe_under_inference_mode_and_autograd():
    fn, cfg = cogvideox.cogvideox_sincos_table, models.PRESETS["tiny-cogvideox"]
    fn.cache_clear()
    with torch.inference_mode():  # built while sampling ...
        tab = fn(cfg, (1, 2, 2), torch.device("cpu"), torch.float32)
    assert not tab.is_inference()
    x = torch.randn(4, 32, requires_grad=True)
    (x * tab).sum().backward()  # ... and used later in training (mul saves the table for backward)
    assert torch.equal(x.grad, tab)
    for n in range(1, 20):
        fn(cfg, (1, 2, n), torch.device("cpu"), torch.float32)
    assert fn.cache_len() == 8  # least recently used dropped


def test_whole_cogvideox_forward_traces_into_one_graph_with_the_cached_table():
    m = models.build_transformer("tiny-cogvideox").eval()
    x, t, text = torch.randn(1, 4, 2, 6, 8), torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        want = m(x, t, text=text)  # fills the cache outside the compiler
        dynamo.reset()
        ex = dynamo.explain(m)(x, t, text=text)
        assert ex.graph_break_count == 0 and ex.graph_count == 1
        assert torch.equal(m(x, t, text=text), want)
