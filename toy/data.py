"""Synthetic videos with known structure for the toy study: textured shapes moving at constant velocity.

Each video shows one shape (square, disc or cross) in one of two colours, filled with a 2-pixel
checker texture (the "detail" a blurry sample loses), sliding at 1 pixel per frame in one of four
directions over a dark background with a smooth random gradient. The class is (shape, colour,
direction); it is turned into a small fixed "text" embedding (one token per attribute plus one for
the whole class, each a fixed random projection of a one-hot) and a pooled vector, so the
conditioning really decides what must be drawn and guidance matters.

The videos are used directly as the latents (no VAE): [C, F, H, W] channels-first, values in
[-1, 1]. `make_batch` generates in memory; `write_dataset` writes the repo's dataset format
(latents.write_shard / latents.write_manifest) with per-sample "label" [n] and "velocity" [n, 2] tensors.
"""
from dataclasses import asdict, dataclass

import torch

from storage import latents  # the repo's dataset format

SHAPES = ("square", "disc", "cross")
COLOURS = (("orange", (0.95, 0.35, -0.6)), ("cyan", (-0.6, 0.75, 0.95)))
# (dy, dx) in pixels per frame
DIRECTIONS = (("right", (0, 1)), ("left", (0, -1)), ("down", (1, 0)), ("up", (-1, 0)))
BACKGROUND = (-0.7, -0.7, -0.5)  # base colour; a per-sample gradient of at most +-GRADIENT is added
GRADIENT = 0.15
CHECKER = 0.35  # brightness modulation of the texture: dark squares are (1 - CHECKER) * colour
NUM_CLASSES = len(SHAPES) * len(COLOURS) * len(DIRECTIONS)


@dataclass(frozen=True)
class ToySpec:
    """Sizes of the toy videos and of their fixed conditioning embedding."""
    frames: int = 6
    size: int = 16          # H = W in pixels
    shape_size: int = 8     # bounding box of a shape, pixels
    speed: int = 1          # pixels per frame
    text_len: int = 4       # tokens: shape, colour, direction, whole class
    text_dim: int = 32
    pooled_dim: int = 32
    embed_seed: int = 1234  # seed of the fixed projections; the same for every run

    @property
    def latent_shape(self):
        return (3, self.frames, self.size, self.size)

    def check(self):
        travel = (self.frames - 1) * self.speed
        if self.shape_size + travel > self.size:
            raise ValueError(f"ToySpec: a shape of {self.shape_size} px moving {travel} px does not fit "
                             f"in {self.size} px; use fewer frames, a lower speed or a larger size")
        if self.text_len != 4:
            raise ValueError(f"ToySpec: text_len must be 4 (shape, colour, direction, class), got {self.text_len}")


def split_label(label):
    """class index -> (shape, colour, direction) indices; works on ints and LongTensors."""
    nd, nc = len(DIRECTIONS), len(COLOURS)
    return label // (nc * nd), (label // nd) % nc, label % nd


def join_label(shape, colour, direction):
    return (shape * len(COLOURS) + colour) * len(DIRECTIONS) + direction


def velocity_of(label):
    """Known per-frame displacement (dy, dx) in pixels of class `label` [n] -> float [n, 2] (speed 1)."""
    table = torch.tensor([d for _, d in DIRECTIONS], dtype=torch.float32)
    return table[split_label(torch.as_tensor(label))[2]]


def _projections(spec):
    g = torch.Generator().manual_seed(spec.embed_seed)
    sizes = (len(SHAPES), len(COLOURS), len(DIRECTIONS), NUM_CLASSES)
    tokens = [torch.randn(n, spec.text_dim, generator=g) for n in sizes]
    pooled = torch.randn(sum(sizes[:3]), spec.pooled_dim, generator=g) / 3 ** 0.5
    return tokens, pooled


def cond_for_labels(label, spec=ToySpec()):
    """The fixed conditioning of classes `label` [n]: {"text": [n, 4, D_text], "pooled": [n, D_pool]}."""
    label = torch.as_tensor(label, dtype=torch.long)
    if label.dim() != 1 or (label < 0).any() or (label >= NUM_CLASSES).any():
        raise ValueError(f"labels must be a 1-D tensor of class indices in [0, {NUM_CLASSES}), got {label}")
    tokens, pooled = _projections(spec)
    parts = (*split_label(label), label)
    text = torch.stack([tok[i] for tok, i in zip(tokens, parts)], dim=1)  # [n, 4, D_text]
    offsets = (0, len(SHAPES), len(SHAPES) + len(COLOURS))
    pool = sum(pooled[i + o] for i, o in zip(parts[:3], offsets))  # [n, D_pool]
    return {"text": text, "pooled": pool}


def uncond(spec=ToySpec()):
    """The 'empty prompt': all-zero text tokens and pooled vector, batch 1."""
    return {"text": torch.zeros(1, spec.text_len, spec.text_dim), "pooled": torch.zeros(1, spec.pooled_dim)}


def _masks(spec):
    """Boolean [3, S, S] masks of the shapes inside their bounding box."""
    s = spec.shape_size
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    c = (s - 1) / 2
    square = torch.ones(s, s, dtype=torch.bool)
    disc = (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2 - 0.25) ** 2
    w = max(2, s // 3)
    arm = (torch.arange(s) >= (s - w) // 2) & (torch.arange(s) < (s - w) // 2 + w)
    cross = arm[:, None] | arm[None, :]
    return torch.stack([square, disc, cross])


def make_batch(n, seed, spec=ToySpec(), labels=None):
    """n videos, deterministic in `seed`: {"latents" [n,3,F,H,W], "text", "pooled", "label" [n], "velocity" [n,2]}."""
    spec.check()
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    F, H, S = spec.frames, spec.size, spec.shape_size
    shape_i, colour_i, dir_i = split_label(labels)
    vel = velocity_of(labels) * spec.speed  # [n, 2]
    # background: base colour plus a random linear gradient in y and x
    grad = (torch.rand(n, 2, generator=g) * 2 - 1) * GRADIENT / 2
    ramp = torch.linspace(-1, 1, H)
    bg = (torch.tensor(BACKGROUND)[None, :, None, None]
          + (grad[:, 0, None, None] * ramp[:, None] + grad[:, 1, None, None] * ramp[None, :])[:, None])  # [n, 3, H, W]
    video = bg[:, :, None].repeat(1, 1, F, 1, 1)  # [n, 3, F, H, W]
    masks = _masks(spec)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    checker = 1 - CHECKER * ((yy + xx) % 2).float()  # texture fixed to the shape, moves with it
    colours = torch.tensor([c for _, c in COLOURS])
    for i in range(n):
        dy, dx = int(vel[i, 0]), int(vel[i, 1])
        # start so the whole path stays inside the frame
        lo_y, hi_y = max(0, -dy * (F - 1)), H - S - max(0, dy * (F - 1))
        lo_x, hi_x = max(0, -dx * (F - 1)), H - S - max(0, dx * (F - 1))
        y0 = int(torch.randint(lo_y, hi_y + 1, (1,), generator=g))
        x0 = int(torch.randint(lo_x, hi_x + 1, (1,), generator=g))
        m = masks[shape_i[i]]
        patch = colours[colour_i[i]][:, None, None] * checker  # [3, S, S]
        for f in range(F):
            y, x = y0 + dy * f, x0 + dx * f
            region = video[i, :, f, y:y + S, x:x + S]
            video[i, :, f, y:y + S, x:x + S] = torch.where(m, patch, region)
    cond = cond_for_labels(labels, spec)
    return {"latents": video.clamp(-1, 1), **cond, "label": labels, "velocity": vel}


def write_dataset(dir, n, seed, spec=ToySpec(), shard_size=1024):
    """Write n videos in the repo's dataset format (manifest + shards + uncond); returns the manifest."""
    shards = []
    for i, start in enumerate(range(0, n, shard_size)):
        batch = make_batch(min(shard_size, n - start), seed * 100003 + i, spec)
        num = latents.write_shard(dir, i, batch)
        shards.append({"file": latents.shard_name(i), "num": num})
    return latents.write_manifest(dir, model="toy", latent_shape=spec.latent_shape, vae_scaling_factor=1.0,
                                  shards=shards, uncond=uncond(spec),
                                  extra={"toy_spec": asdict(spec), "num_classes": NUM_CLASSES})
