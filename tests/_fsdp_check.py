"""Run under `torchrun --nproc_per_node=2`: train.py --fsdp with the meta start-up and with the full-copy one
(DCM_FSDP_FULL_COPY=1), for each case of CASES.

    torchrun --nproc_per_node=2 tests/_fsdp_check.py OUT TEACHER INIT DATA

Writes OUT/<case>/<mode>/ (the run) and OUT/<case>/<mode>/rank{r}.pt: every rank's local shards of the student,
EMA and teacher right after start-up, with its peak host memory.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scale import fsdp  # noqa: E402
import train  # noqa: E402

out, teacher, init, data = sys.argv[1:5]
COMMON = ["--teacher", teacher, "--data", data, "--batch-size", "2", "--lr", "1e-3", "--target-ema", "0.5",
          "--lora-rank", "4", "--disc-hidden", "32", "--probe-every", "0", "--device", "cpu", "--fsdp"]
CASES = {  # name: (extra flags, resumes the run of this case); bf16: the teacher is stored in bf16
    "detail": (["--stage", "detail", "--init", init, "--dtype", "bf16", "--max-steps", "1"], None),
    "detail_resume": (["--stage", "detail", "--init", init, "--dtype", "bf16", "--max-steps", "2", "--resume"],
                      "detail"),
}
dist.init_process_group("gloo")
rank, start_up = dist.get_rank(), fsdp.start_up


def spy(*a, **k):
    models = start_up(*a, **k)
    local = {f"{i}/{n}": getattr(p, "to_local", lambda p=p: p)().detach().clone()
             for i, m in enumerate(models) if m is not None for n, p in m.named_parameters()}
    torch.save({"shards": local, "peak_gib": fsdp.host_peak_gib()}, os.path.join(spy.run, f"rank{rank}.pt"))
    return models


fsdp.start_up = spy
for name, (extra, resumes) in CASES.items():
    for mode in ("meta", "full"):
        os.environ.pop("DCM_FSDP_FULL_COPY", None)
        if mode == "full":
            os.environ["DCM_FSDP_FULL_COPY"] = "1"
        run = os.path.join(out, resumes or name, mode)
        spy.run = os.path.join(out, name, mode) if resumes else run
        os.makedirs(spy.run, exist_ok=True)
        train.main(COMMON + extra + ["--out", run])
dist.destroy_process_group()
