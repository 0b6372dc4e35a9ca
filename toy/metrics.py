"""The toy bench: what a few-step student keeps or loses of the teacher, measured on synthetic videos.

Every metric takes videos [n, 3, F, H, W] in [-1, 1] (the toy's latents; see toy/data.py):
- `trajectory_fidelity`: distance to the teacher's 50-step sample from the same noise and prompt;
- `frechet_distance` of `VideoClassifier` features: distribution distance to real videos;
- `condition_accuracy`: does the classifier recognise the class the sample was asked for;
- `motion_error`: per-frame displacement of the shape's centroid vs the class's known velocity;
- `hf_fraction` / `hf_ratio`: high-frequency spectral energy, sample vs real (detail, blur);
`evaluate` computes all of them; `aggregate` turns per-seed dicts into mean / std.
"""
import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from toy import data as toy_data


def trajectory_fidelity(x, x_ref):
    """Mean squared and absolute error between samples and the teacher's samples from the same noise.

    Consistency distillation promises to reproduce the teacher's ODE trajectory (the endpoint of
    the PF-ODE started at the same noise), so this is the quantity CD optimises most directly.
    """
    if x.shape != x_ref.shape:
        raise ValueError(f"trajectory_fidelity: shapes differ {tuple(x.shape)} vs {tuple(x_ref.shape)}")
    d = x.float() - x_ref.float()
    return {"mse": d.square().mean().item(), "l1": d.abs().mean().item()}


class VideoClassifier(nn.Module):
    """Small 3D conv net predicting the toy class (shape, colour, direction) of a video.

    Its 64-d penultimate features are the embedding for the Frechet distance (the toy's FVD) and its
    predictions give the condition accuracy. Direction needs temporal convolutions, shape and
    colour spatial ones, so all three facets of the class live in these features.
    """

    def __init__(self, num_classes=toy_data.NUM_CLASSES, width=16):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv3d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv3d(w, 2 * w, 3, stride=(1, 2, 2), padding=1), nn.ReLU(),
            nn.Conv3d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def features(self, x):
        """[n, 3, F, H, W] -> [n, 4*width] globally pooled features."""
        return self.body(x).mean(dim=(2, 3, 4))

    def forward(self, x):
        return self.fc(self.features(x))


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op thread count set to `n` inside the block, the caller's restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_classifier(spec=toy_data.ToySpec(), steps=160, batch=32, seed=0, lr=6e-3, noise_max=0.2):
    """Train a VideoClassifier on fresh synthetic videos (new batch every step, so it cannot overfit).

    Inputs get Gaussian noise of a random std up to `noise_max`, so slightly imperfect samples are
    still classified by their content rather than by pixel-exact statistics.

    Every FD and class accuracy of the toy comes from these weights, so they must not depend on the machine's or the
    run's thread count: a multi-threaded conv backward sums in another order, and over 300 steps that moved the
    teacher's FD 56 -> 66 between two machines (issue 27). So: one thread, whatever the caller uses; a fixed seed
    for the initial weights and the input noise, in a forked RNG (the caller's global RNG state is left as it was).
    """
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = VideoClassifier()
        opt = torch.optim.Adam(clf.parameters(), lr=lr)
        for step in range(steps):
            b = toy_data.make_batch(batch, seed=10_000_000 + seed * 100_003 + step, spec=spec)
            x = b["latents"]
            x = x + torch.randn_like(x) * torch.rand(batch, 1, 1, 1, 1) * noise_max
            loss = F.cross_entropy(clf(x), b["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf.eval().requires_grad_(False)


def load_or_train_classifier(path, spec=toy_data.ToySpec(), **train_kw):
    """The bench classifier cached at `path` (a .pt state dict); trained and saved there if missing."""
    clf = VideoClassifier()
    if os.path.isfile(path):
        clf.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return clf.eval().requires_grad_(False)
    clf = train_classifier(spec, **train_kw)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(clf.state_dict(), f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    return clf


@torch.no_grad()
def classifier_features(clf, x, batch=256):
    """Features and logits of videos x [n, 3, F, H, W], in chunks."""
    feats = [clf.features(x[i:i + batch].float()) for i in range(0, len(x), batch)]
    feats = torch.cat(feats)
    return feats, clf.fc(feats)


def frechet_distance(feat_a, feat_b):
    """Frechet distance between Gaussians fitted to two feature sets [n, d] (the FID/FVD formula).

    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 via symmetric
    eigendecompositions. Here the features are the toy classifier's, so this is the toy's FVD:
    0 for identical distributions, growing as the samples' content statistics drift from the data.
    """
    a, b = feat_a.double(), feat_b.double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs two [n>=2, d] feature sets, got {tuple(a.shape)}, {tuple(b.shape)}")
    with torch_threads(1):  # the same FD at any thread count (a multi-threaded BLAS orders its sums by threads)
        mu_a, mu_b = a.mean(0), b.mean(0)
        cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
        w, v = torch.linalg.eigh(cov_a)
        sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
        inner = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0)
        fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * inner.sqrt().sum()
    return max(fd.item(), 0.0)


def condition_accuracy(logits, labels):
    """Fraction of samples the classifier assigns to the class they were conditioned on.

    Chance is 1/24; it is the toy's text-alignment score (VBench's semantic side).
    """
    return (logits.argmax(-1) == labels).float().mean().item()


def attribute_accuracy(logits, labels):
    """Accuracy of each class attribute (shape, colour, direction) of the classifier's prediction."""
    pred = toy_data.split_label(logits.argmax(-1))
    true = toy_data.split_label(labels)
    return {f"{n}_acc": (p == t).float().mean().item() for n, p, t in zip(("shape", "colour", "dir"), pred, true)}


def foreground(x, threshold=0.5, ramp=0.3):
    """Soft mask [n, F, H, W] of pixels far from the background colour (the moving shape)."""
    bg = torch.tensor(toy_data.BACKGROUND, dtype=x.dtype)[None, :, None, None, None]
    dev = (x - bg).abs().amax(dim=1)  # [n, F, H, W]
    return ((dev - threshold) / ramp).clamp(0, 1)


def centroids(x, min_mass=1.0):
    """Centroid (y, x) in pixels of the foreground per frame -> [n, F, 2], and a [n, F] 'found' flag.

    Frames with less than `min_mass` pixels of foreground have no shape: their centroid is set to the
    frame centre (so an empty video is penalised by its true velocity, never silently skipped).
    """
    w = foreground(x)
    n, f, h, wd = w.shape
    yy = torch.arange(h, dtype=x.dtype)[:, None].expand(h, wd)
    xx = torch.arange(wd, dtype=x.dtype)[None, :].expand(h, wd)
    mass = w.sum(dim=(2, 3))  # [n, F]
    found = mass >= min_mass
    safe = mass.clamp(min=1e-6)
    c = torch.stack([(w * yy).sum(dim=(2, 3)) / safe, (w * xx).sum(dim=(2, 3)) / safe], dim=-1)  # [n, F, 2]
    centre = torch.tensor([(h - 1) / 2, (wd - 1) / 2], dtype=x.dtype)
    c = torch.where(found[..., None], c, centre)
    return c, found


def motion_error(x, velocity):
    """Mean over videos and frame pairs of |(c_{f+1} - c_f) - v| in pixels (Euclidean).

    c_f is the shape's centroid in frame f (see `centroids`), v the constant velocity of the
    conditioning class ([n, 2], (dy, dx) pixels per frame). 0 on real data; large for frozen, jittering,
    wrong-direction or shuffled motion: the toy's temporal-consistency / motion-quality score.
    """
    c, _ = centroids(x.float())
    disp = c[:, 1:] - c[:, :-1]  # [n, F-1, 2]
    return (disp - velocity[:, None].to(disp)).norm(dim=-1).mean().item()


def hf_fraction(x, cutoff=0.25):
    """Per-video fraction of spatial spectral energy above `cutoff` cycles/pixel (Nyquist = 0.5) -> [n].

    The per-frame, per-channel mean is removed first (DC carries no detail). The toy's shapes carry
    a 2-pixel checker texture and sharp edges, so blurry samples lose exactly this energy.
    """
    x = x.float()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().square()  # [n, C, F, H, W]
    fy = torch.fft.fftfreq(x.shape[-2])[:, None]
    fx = torch.fft.fftfreq(x.shape[-1])[None, :]
    high = (fy.square() + fx.square()).sqrt() > cutoff
    total = power.sum(dim=(1, 2, 3, 4)).clamp(min=1e-12)
    return (power * high).sum(dim=(1, 2, 3, 4)) / total


def hf_ratio(x, x_real, cutoff=0.25):
    """mean hf_fraction(samples) / mean hf_fraction(real): ~1 keeps the data's detail, <1 blurry, >1 noisy."""
    return (hf_fraction(x, cutoff).mean() / hf_fraction(x_real, cutoff).mean()).item()


def evaluate(x, labels, velocity, real, clf, x_ref=None, real_feats=None):
    """All toy metrics of samples x conditioned on `labels` (velocity = their true motion).

    `real` are data videos (for FD and the HF ratio); `x_ref` the teacher's samples from the same
    noise (for trajectory fidelity; omitted when None, e.g. for the teacher itself).
    """
    feats, logits = classifier_features(clf, x)
    if real_feats is None:
        real_feats, _ = classifier_features(clf, real)
    out = {
        "fd": frechet_distance(feats, real_feats),
        "cond_acc": condition_accuracy(logits, labels),
        **attribute_accuracy(logits, labels),
        "motion_err": motion_error(x, velocity),
        "hf_ratio": hf_ratio(x, real),
    }
    if x_ref is not None:
        fid = trajectory_fidelity(x, x_ref)
        out["traj_mse"], out["traj_l1"] = fid["mse"], fid["l1"]
    return out


def mean_std(values):
    """(mean, sample std) of a list of numbers; std is 0.0 for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std of an empty list")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def aggregate(per_seed):
    """[{metric: value}, ...] over seeds -> {metric: {"mean", "std", "n"}} (metrics present in all seeds)."""
    if not per_seed:
        raise ValueError("aggregate of no seeds")
    keys = [k for k in per_seed[0] if all(k in d for d in per_seed)]
    out = {}
    for k in keys:
        m, s = mean_std([d[k] for d in per_seed])
        out[k] = {"mean": m, "std": s, "n": len(per_seed)}
    return out
