"""The toy study's rules and analyses (toy/run.py): kappa from the Fig. 10 curve, the CFG scale and the students'
target chosen on the validation split, Fig. 5's per-group parameter difference, the per-term gradient ratios."""
import os
import re

from storage import checkpoint
from lora import TARGETS
from tools import plot


def choose_kappa(l1, q, N, min_semantic=4, min_detail=4):
    """kappa from the Fig. 10 curve: the cut where the semantic phase (from the noisy end) holds a fraction `q`
    of the teacher's total adjacent-step x0 change. A cumulative share barely moves when the curve is re-measured
    or the teacher retrained, where a threshold crossing on the curve's tail jumps (the issue-7 rule did).

    l1[i] is the change between sampling steps i and i+1, i.e. between grid indices N-1-i and N-2-i; the semantic
    phase kappa+1..N-1 ends at x_kappa, so it holds l1[0..N-2-kappa]. kappa is clamped so both phases keep at least
    `min_semantic` / `min_detail` grid points (8-step sampling gives each expert 4).
    """
    l1 = [float(v) for v in l1]
    total, acc, i = sum(l1), 0.0, len(l1) - 1
    for j, v in enumerate(l1):
        acc += v
        if acc >= q * total:
            i = j
            break
    kappa = N - 2 - i
    info = {"q": q, "cross_step": i, "raw_kappa": kappa, "sigma": None}
    return max(min_detail - 1, min(kappa, N - 1 - min_semantic)), info


def choose_guidance(rows, fd_factor=2.0):
    """CFG scale from the validation split: the best 50-step class accuracy among the scales whose FD is within
    `fd_factor` x the sweep's lowest (guidance buys recognisability until it wrecks the sample distribution)."""
    ok = [g for g, r in rows.items() if r["fd"] <= fd_factor * min(r["fd"] for r in rows.values())]
    return max(ok, key=lambda g: (rows[g]["cond_acc"], -g))


def choose_target(curves):
    """(EMA decay, lr) candidate with the lowest validation trajectory MSE at 4 steps at the end of its run."""
    return min(curves, key=lambda c: curves[c][-1]["traj_mse"])


def param_groups(name):
    """Fig. 5 group of a HunyuanVideo parameter name: the DualExpert's layer kinds (lora.TARGETS)."""
    spec = TARGETS["HunyuanVideo"]
    kinds = (("timestep embeddings + out head", "copy"), ("attention linears", "lora"), ("AdaLN modulation", "adaln"))
    for group, key in kinds:
        for pat in spec[key]:
            if re.match(re.escape(pat).replace(r"\*", r"[^.]+") + r"\.", name):
                return group
    return "other (MLPs, patch/text embed, norms)"


def expert_difference(sem_dir, det_dir):
    """Per group and per tensor: ||theta_det - theta_sem|| / ||theta_sem|| between two full experts (Fig. 5)."""
    a = checkpoint.load_transformer(sem_dir).state_dict()
    b = checkpoint.load_transformer(det_dir).state_dict()
    groups, tensors = {}, []
    for k, va in a.items():
        d2, n2 = (b[k] - va).double().square().sum().item(), va.double().square().sum().item()
        g = groups.setdefault(param_groups(k), {"diff2": 0.0, "norm2": 0.0, "numel": 0})
        g["diff2"] += d2
        g["norm2"] += n2
        g["numel"] += va.numel()
        tensors.append({"name": k, "group": param_groups(k), "rel_diff": (d2 / max(n2, 1e-30)) ** 0.5})
    for g in groups.values():
        g["rel_diff"] = (g["diff2"] / max(g["norm2"], 1e-30)) ** 0.5
    return groups, tensors


def grad_ratios(run_out):
    """Median over probe steps of each term's gradient norm at the student's output over CD's (train.py log)."""
    rows = [r for r in plot.read_jsonl(os.path.join(run_out, "log.jsonl")) if r.get("gn_cd")]
    names = sorted({k[3:] for r in rows for k in r if k.startswith("gn_") and k != "gn_cd"})
    med = lambda v: sorted(v)[len(v) // 2] if v else None  # noqa: E731
    return {n: med([r[f"gn_{n}"] / r["gn_cd"] for r in rows if f"gn_{n}" in r]) for n in names}
