"""Memory planner for train.py --dry-run."""
import os

import torch

import losses
import model as models


def dry_run(args, cfg, build):
    """Parameter counts and per-GPU memory of weights/grads/AdamW/EMA/teacher/discriminator (meta device)."""
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    count = lambda m, train=False: sum(p.numel() for p in m.parameters() if p.requires_grad or not train)  # noqa: E731
    student = build()
    total, train = count(student), count(student, True)
    teach = 0 if args.stage == "teacher" else count(models.build_transformer(cfg, device="meta"))
    gan = args.stage == "detail" and (args.w_gan or args.w_fm)
    with torch.device("meta"):
        disc = count(losses.Discriminator.for_model(student, args.disc_hidden)) if gan else 0
    sh = world if args.fsdp else 1
    mem = {"student weights (fp32)": 4 * total / sh, "grads (fp32)": 4 * train / sh,
           "AdamW states (fp32)": 8 * train / sh, "EMA target (fp32)": 4 * total / sh * (args.target_ema > 0 and args.stage != "teacher"),
           f"teacher ({args.dtype})": (2 if args.dtype == "bf16" else 4) * teach / sh,
           "discriminator + grads + AdamW": 16 * disc}
    print(f"stage {args.stage}, {type(cfg).__name__}, world {world}{' FSDP' if args.fsdp else ''}, {args.dtype}")
    print(f"params: student {total / 1e9:.3f} B ({train / 1e9:.4f} B trainable), teacher {teach / 1e9:.3f} B, "
          f"discriminator {disc / 1e6:.1f} M")
    for k, v in mem.items():
        print(f"  {k:32s} {v / 2**30:9.2f} GiB per GPU")
    print(f"  {'total (without activations)':32s} {sum(mem.values()) / 2**30:9.2f} GiB per GPU")
    print(f"global batch {args.batch_size} x {args.grad_accum} x {world} = {args.batch_size * args.grad_accum * world}")
    return {"params": total, "trainable": train, "teacher": teach, "disc": disc, "memory": mem, "world": world}
