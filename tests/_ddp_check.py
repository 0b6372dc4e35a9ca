"""Run under `torchrun --nproc_per_node=2`: train.main twice in one gloo group (DDP, then --fsdp).

    torchrun --nproc_per_node=2 tests/_ddp_check.py OUT <train.py args...>

Writes OUT/ddp/ and OUT/fsdp/ runs; each rank also saves its own (unsharded, DDP) student weights
to OUT/ddp/rank{r}.pt so the test can check that the ranks end identical.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

out, argv = sys.argv[1], sys.argv[2:]
dist.init_process_group("gloo")  # train.main leaves a group it did not create alone
students, build = [], train.build_student


def spy(*a, **k):
    m = build(*a, **k)
    if k.get("device") != "meta":  # not the unsharded copy FSDP writes from
        students.append(m)
    return m


train.build_student = spy
train.main(argv + ["--out", os.path.join(out, "ddp")])
state = {k: v.detach().clone() for k, v in students[0].state_dict().items()}
torch.save(state, os.path.join(out, "ddp", f"rank{dist.get_rank()}.pt"))
train.main(argv + ["--out", os.path.join(out, "fsdp"), "--fsdp"])
dist.barrier()  # both ranks past the last exchange before either tears the group down (a gloo abort seen once in CI)
dist.destroy_process_group()
