"""A control for the detail expert's GAN signal (issue 17): can a fresh discriminator tell the method's "real" side
from its "fake" side at all, and can it when "real" is the training videos instead?

In DCM's GAN (paper eq. 9, DESIGN sec. 1, the authors' code alike) "real" is x_tgt, the consistency target: the
stop-grad student's prediction after one teacher ODE step, and "fake" is the student's own prediction xhat; both are
re-noised with the same noise and read through the frozen teacher. Both sides are outputs of (nearly) the same network,
so their distributions can coincide and a discriminator's hinge loss then stays at 2 (the value of any constant
output). The control trains the same discriminator on the same fake features with the data videos x0 as "real".
"""
import torch

import losses
from storage import latents
from teacher import Teacher
from toy import bench


def discriminator_control(student, teach: Teacher, grid, kappa, ds, steps, batch, lr, hidden, seed, betas=(0.0, 0.999)):
    """{"target as real" | "data as real": {"d_loss", "acc_real", "acc_fake"} (means over the last fifth of `steps`),
    "start": D's loss at step 1} of a fresh discriminator trained `steps` AdamW steps at `lr` on the frozen detail
    expert `student`'s GAN features (k in 0..kappa, eq. 9's re-noising), one discriminator per choice of real side."""
    model = teach.model
    g = torch.Generator().manual_seed(seed)
    lat = ds.tensors["latents"]
    tok_grid = tuple(n // p for n, p in zip(lat.shape[2:], latents.patch_of(model.config)))  # (F, h, w) of the tokens
    out = {}
    for real_side in ("target as real", "data as real"):
        torch.manual_seed(seed)  # the same initial discriminator for both
        disc = losses.Discriminator.for_model(model, hidden)
        opt = torch.optim.AdamW(disc.parameters(), lr=lr, betas=betas, weight_decay=1e-3)
        g.manual_seed(seed)  # the same batches, noise and indices for both
        rows = []
        for _ in range(steps):
            idx = torch.randint(0, len(lat), (batch,), generator=g)
            x0 = lat[idx].float()
            cond = {k: ds.tensors[k][idx] for k in ("text", "pooled")}
            eps, n = (torch.randn(x0.shape, generator=g) for _ in range(2))
            k, k_adv = (torch.randint(0, kappa + 1, (batch,), generator=g) for _ in range(2))
            with torch.no_grad():
                _, xhat, x_tgt, k_end = losses.consistency_step(student, student, teach, grid, [kappa], x0, eps, k,
                                                                cond, cond)
                real = x_tgt if real_side == "target as real" else x0
                t_adv = grid.at(k_adv)[0].float()
                feats = [model(losses.renoise(x, n, k_end, k_adv, grid), t_adv, taps=model.default_taps(), **cond)[1]
                         for x in (xhat, real)]
            d_loss, acc_r, acc_f = losses.discriminator_stats(disc, tuple(feats), tok_grid)
            opt.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
            opt.step()
            rows.append((d_loss.item(), acc_r.item(), acc_f.item()))
        tail = rows[-max(1, steps // 5):]
        out[real_side] = {"start": rows[0][0]} | {key: sum(r[i] for r in tail) / len(tail)
                                                  for i, key in enumerate(("d_loss", "acc_real", "acc_fake"))}
    return out


def discriminator_control_from(dcm_ckpt, teacher_ckpt, guidance, data_dir, kappa, steps, batch, lr, hidden, seed):
    """discriminator_control with everything loaded from files (a worker process's job, toy/jobs.py)."""
    teach = bench.load_teacher(teacher_ckpt, guidance, data_dir)
    return discriminator_control(bench.load_model(dcm_ckpt)[0], teach, teach.grid, kappa,
                                 latents.LatentDataset(data_dir), steps, batch, lr, hidden, seed)
