"""Run under `torchrun --nproc_per_node=2`: train.py --fsdp --grad-accum 2, counting the gradient elements each rank
holds between micro-steps (FSDP2's sharded .grad and any unsharded gradient it keeps) against its local shards.

    torchrun --nproc_per_node=2 tests/_fsdp_accum_check.py OUT <train.py args...>

Writes OUT/rank{r}.json: {"held": max elements held at a micro-step's start, "shard": trainable local elements}.
"""
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from storage import latents  # noqa: E402
import train  # noqa: E402

out, argv = sys.argv[1], sys.argv[2:]
dist.init_process_group("gloo")
students, build, draws, seen = [], train.build_student, latents.draws, {"held": 0}


def spy_build(*a, **k):
    m = build(*a, **k)
    if k.get("device") != "meta":
        students.append(m)
    return m


def held(model):
    """Gradient elements this rank holds: each FSDP2 parameter's sharded .grad and its unsharded parameter's .grad."""
    n = 0
    for mod in model.modules():
        group = getattr(mod, "_get_fsdp_state", lambda: None)()
        for fp in getattr(getattr(group, "_fsdp_param_group", None), "fsdp_params", ()):
            up = getattr(fp, "_unsharded_param", None)
            n += up.grad.numel() if up is not None and up.grad is not None else 0
            n += fp.sharded_param.grad.to_local().numel() if fp.sharded_param.grad is not None else 0
    return n


def spy_draws(*a, **k):  # called at the start of every micro-step: the previous micro-steps' gradients are held
    if students:
        seen["held"] = max(seen["held"], held(students[0]))
    return draws(*a, **k)


train.build_student, latents.draws = spy_build, spy_draws
train.main(argv + ["--out", os.path.join(out, "run")])
shard = sum(p.to_local().numel() for p in students[0].parameters() if p.requires_grad)
with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump({"held": seen["held"], "shard": shard}, f)
dist.destroy_process_group()
