"""The planner against a measured step under FSDP2 with 2 gloo ranks (a script, not part of the suite: ~3 min).

    torchrun --nproc_per_node=2 tests/plan_fsdp_measure.py OUT_DIR

Per case: rank 0's peak allocated bytes during train.py's 2nd step (test_plan.measured) against the dry run's
activations + grads + latents for --fsdp --world-size 2 (docs/training.md, "Does it fit?").
"""
import contextlib
import io
import os
import pathlib
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from storage import latents, resume  # noqa: E402
import train  # noqa: E402
from test_plan import CONFIGS, make_run, measured  # noqa: E402


class Patch:
    """The one monkeypatch method `measured` uses, outside pytest."""

    def setattr(self, obj, name, value):
        setattr(obj, name, value)


torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, root, draws, save = dist.get_rank(), pathlib.Path(sys.argv[1]), latents.draws, resume.save_step
for arch in ("cogvideox", "hunyuan"):
    folder = root / arch
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        make_run(folder, CONFIGS[arch])
    dist.barrier()
    base = ["--teacher", str(folder / "t"), "--init", str(folder / "t"), "--data", str(folder / "d"), "--batch-size",
            "1", "--probe-every", "0", "--save-every", "0", "--device", "cpu",
            "--fsdp"]
    for stage, ckpt in (("semantic", True), ("semantic", False), ("detail", True)):
        argv = base + ["--stage", stage, "--dtype", "bf16"] + ["--grad-ckpt"] * ckpt + (
            ["--lora-rank", "8", "--disc-hidden", "64"] if stage == "detail" else [])
        got = measured(argv + ["--out", str(folder / f"{stage}{ckpt}")], Patch())
        latents.draws, resume.save_step = draws, save
        if rank == 0:
            with contextlib.redirect_stdout(io.StringIO()):
                p = train.main(argv + ["--dry-run", "--world-size", "2"])["plan"]
            want = p["total"] - sum(p["static"].values())
            print(f"{arch} {stage} ckpt {'on' if ckpt else 'off'} bf16: measured {got / 2**20:.2f} MiB, planner "
                  f"{want / 2**20:.2f} MiB ({want / got - 1:+.1%})", flush=True)
        dist.barrier()
dist.destroy_process_group()
