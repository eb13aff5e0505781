"""cqkd's distillation losses against torchdistill 1.1.5's own: values and gradients on random cases.

For each pair below, ``--cases`` random cases (batch 2-64, 2-100 classes, logit scales 0.1-10,
temperatures 0.5-10, weights in [0, 1]; for AT 1-3 stages of random feature maps) are fed to
both; the line per method gives the largest relative difference of the loss and of its gradient
with respect to the student's logits (or features), in float32 (goal <= 1e-5):

* ``kd``: cqkd ``kd`` (loss = (1-α)·CE + α·T²·KL) against ``KDLoss(temperature=T, alpha=1-α, beta=α)``:
  torchdistill's ``alpha`` weighs the cross-entropy, the opposite of cqkd's;
* ``kd,standardize=true`` against ``LogitStdKDLoss`` (the same alpha convention);
* ``dist`` (CE + β·inter + γ·intra) against ``CE + DISTLoss(beta, gamma, tau)``;
* ``at`` (CE + β/2·Σ at terms) against ``CE + β/2·ATLoss(mode="code")`` on maps of equal size
  (torchdistill does not pool; cqkd's pooling of mismatched maps is tested in tests/test_methods.py).

torchdistill is installed with ``--no-deps`` in a virtual environment of its own that this script
makes (as benchmarks/vs_torchdistill.py does), with this environment's torch through a ``.pth``.
Usage::

    PYTHONPATH=src python benchmarks/vs_torchdistill_losses.py [--cases 60] [--env /tmp/cqkd-torchdistill]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def rel(a, b) -> float:
    """max |a - b| / max |b| (the scale of the reference), 0 where both are 0."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def cases(n: int, seed: int):
    """Random (z_s, z_t, labels, T, alpha) cases."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        b = int(torch.randint(2, 65, (1,), generator=g))
        c = int(torch.randint(2, 101, (1,), generator=g))
        scale = float(10 ** (torch.rand(1, generator=g) * 2 - 1))
        z_s = torch.randn(b, c, generator=g) * scale
        z_t = torch.randn(b, c, generator=g) * scale * 2
        y = torch.randint(0, c, (b,), generator=g)
        t = float(0.5 + torch.rand(1, generator=g) * 9.5)
        a = float(torch.rand(1, generator=g))
        yield z_s, z_t, y, t, a


def compare(n: int) -> list[str]:
    """One line per method: the largest relative difference of loss and gradient over ``n`` cases."""
    import torch
    import torch.nn.functional as F
    import torchdistill
    from torchdistill.losses.mid_level import ATLoss, DISTLoss, KDLoss, LogitStdKDLoss

    from cqkd.distill.methods import Outputs, Progress, Settings, make_method

    def io(z):
        return {".": {"output": z}}

    worst: dict[str, list[float]] = {}

    def record(name: str, ours, ref, z_ours, z_ref) -> None:
        g1, = torch.autograd.grad(ours, z_ours)
        g2, = torch.autograd.grad(ref, z_ref)
        w = worst.setdefault(name, [0.0, 0.0])
        w[0], w[1] = max(w[0], rel(ours.detach(), ref.detach())), max(w[1], rel(g1, g2))

    for i, (z_s, z_t, y, t, a) in enumerate(cases(n, 0)):
        for std in (False, True):
            name = "kd,standardize=true" if std else "kd"
            m = make_method(name, Settings(temperature=t, alpha=a))
            zs1, zs2 = z_s.clone().requires_grad_(), z_s.clone().requires_grad_()
            ours = m.loss(Outputs(zs1), Outputs(z_t), y, Progress())["loss"]
            cls = LogitStdKDLoss if std else KDLoss
            ref = cls(".", "output", ".", "output", temperature=t, alpha=1 - a, beta=a)(io(zs2), io(z_t), y)
            record(name, ours, ref, zs1, zs2)
        beta, gamma, tau = 2 * a, 2 * (1 - a), t
        m = make_method(f"dist,beta={beta},gamma={gamma},tau={tau}", Settings())
        zs1, zs2 = z_s.clone().requires_grad_(), z_s.clone().requires_grad_()
        ours = m.loss(Outputs(zs1), Outputs(z_t), y, Progress())["loss"]
        ref = F.cross_entropy(zs2, y) + DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=tau)(
            io(zs2), io(z_t))
        record("dist", ours, ref, zs1, zs2)
        # attention transfer: 1-3 stages of maps of one size per stage
        g = torch.Generator().manual_seed(1000 + i)
        n_b = int(torch.randint(2, 17, (1,), generator=g))
        stages = int(torch.randint(1, 4, (1,), generator=g))
        shapes = [(int(torch.randint(1, 65, (1,), generator=g)), int(torch.randint(1, 65, (1,), generator=g)),
                   int(torch.randint(2, 15, (1,), generator=g))) for _ in range(stages)]
        f_s = [torch.relu(torch.randn(n_b, cs, h, h, generator=g)) for cs, _, h in shapes]
        f_t = [torch.relu(torch.randn(n_b, ct, h, h, generator=g)) * 3 for _, ct, h in shapes]
        zs = torch.randn(n_b, 10, generator=g)
        yy = torch.randint(0, 10, (n_b,), generator=g)
        beta = 1000.0
        m = make_method("at", Settings())
        fs1 = [f.clone().requires_grad_() for f in f_s]
        fs2 = [f.clone().requires_grad_() for f in f_s]
        ours = m.loss(Outputs(zs, fs1), Outputs(zs, f_t), yy, Progress())["loss"]
        pairs = {f"p{j}": {"student": {"io": "output", "path": f"s{j}"}, "teacher": {"io": "output", "path": f"t{j}"},
                           "weight": 1} for j in range(stages)}
        s_io = {f"s{j}": {"output": f} for j, f in enumerate(fs2)}
        t_io = {f"t{j}": {"output": f} for j, f in enumerate(f_t)}
        ref = F.cross_entropy(zs, yy) + beta / 2 * ATLoss(pairs, mode="code")(s_io, t_io)
        g1 = torch.autograd.grad(ours, fs1)
        g2 = torch.autograd.grad(ref, fs2)
        w = worst.setdefault("at", [0.0, 0.0])
        w[0] = max(w[0], rel(ours.detach(), ref.detach()))
        w[1] = max(w[1], max(rel(a1, b1) for a1, b1 in zip(g1, g2)))
    lines = [f"torchdistill {torchdistill.__version__}, torch {torch.__version__}, {n} random cases per method, float32"]
    for name, (loss_d, grad_d) in worst.items():
        ok = "ok" if max(loss_d, grad_d) <= 1e-5 else "ABOVE 1e-5"
        lines.append(f"{name:22s} max rel. diff: loss {loss_d:.2e}, gradient {grad_d:.2e}  [{ok}]")
    return lines


def main() -> int:
    """Make (or reuse) torchdistill's environment and run the comparison in it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--env", default=os.path.join(tempfile.gettempdir(), "cqkd-torchdistill"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("\n".join(compare(args.cases)))
        return 0
    from vs_torchdistill import make_env

    python = make_env(Path(args.env))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([str(python), __file__, "--worker", "--cases", str(args.cases)], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
