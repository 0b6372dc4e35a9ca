"""Run under torchrun: train.main / sample.main once per entry of the JSON file given (one launch, one gloo group).

    torchrun --nproc_per_node=2 tests/_torchrun_runs.py RUNS.json   # RUNS.json: [["train"|"sample", args...], ...]

"train-opt-on-rank0": train.main where a rank other than 0 that reads the optimizer state of the checkpoint it resumes
from fails (issue 28 item 5: under FSDP rank 0 alone reads it and sends each rank its shards).
"""
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
from storage import resume  # noqa: E402
import train  # noqa: E402



class NotHere(dict):
    """The optimizer state as a rank other than 0 holds it: any read raises."""

    def _read(self, *a, **k):
        raise RuntimeError(f"rank {dist.get_rank()} read the optimizer state of the checkpoint")
    __getitem__ = __iter__ = __len__ = __contains__ = get = items = keys = values = _read


def opt_on_rank0(argv):
    read = resume.read_state  # the optimizer moments are memory-mapped: a rank that never touches them reads nothing

    def guarded(folder):
        state = read(folder)
        if dist.get_rank():
            state["opt"] = NotHere()
        return state
    resume.read_state = guarded
    try:
        return train.main(argv)
    finally:
        resume.read_state = read


with open(sys.argv[1]) as f:
    runs = json.load(f)
dist.init_process_group("gloo")  # train.main / sample.main leave a group they did not create alone
for script, *argv in runs:
    {"train": train.main, "sample": sample.main, "train-opt-on-rank0": opt_on_rank0}[script](argv)
dist.destroy_process_group()
