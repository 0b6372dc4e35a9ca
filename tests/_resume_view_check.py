"""Run under `torchrun --nproc_per_node=2`: rank 0 decides the resume for every rank. A 1-step run; its resume to step
2, counting the verifications (sha256 of every file) of the run's own checkpoint per rank; then a resume to step 3 in which rank 1
cannot read the checkpoint rank 0 chose (a per-rank view of --out, monkeypatched).

    torchrun --nproc_per_node=2 tests/_resume_view_check.py OUT <train.py args...>

Writes OUT/rank{r}.json: {"verified": verifications in the good resume, "error": the broken resume's message}.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from storage import integrity  # noqa: E402

out, argv = sys.argv[1], sys.argv[2:]
dist.init_process_group("gloo")
rank, result = dist.get_rank(), {}
run = os.path.join(out, "run")
train.main(argv + ["--out", run, "--max-steps", "1"])
verify, calls = integrity.verify, []
integrity.verify = lambda *a, **k: calls.append(a[0]) or verify(*a, **k)
train.main(argv + ["--out", run, "--max-steps", "2", "--resume"])
result["verified"] = len([c for c in calls if str(c).startswith(run)])  # (the --teacher is verified by all)
integrity.verify, load = verify, torch.load
if rank == 1:  # this rank's view of the storage lacks the step folder rank 0 picks
    def hidden(path, *a, **k):
        if "train_state.pt" in str(path):
            raise FileNotFoundError(path)
        return load(path, *a, **k)
    torch.load = hidden
try:
    train.main(argv + ["--out", run, "--max-steps", "3", "--resume"])
    result["error"] = None
except ValueError as e:
    result["error"] = str(e)
torch.load = load
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.barrier()  # both ranks past the failed run's last exchange before either tears the group down
dist.destroy_process_group()
