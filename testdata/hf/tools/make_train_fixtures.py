"""Reference values for kiln-train's optimizer, schedules and clipping (testdata/train/reference.json).

Not part of kiln or its CI: run by hand from the repository root with torch and transformers:

    python3 testdata/hf/tools/make_train_fixtures.py

- `adamw`: torch.optim.AdamW on two parameters with fixed gradients per step, with and without
  weight decay, parameters after each of 5 steps;
- `schedules`: transformers.get_scheduler learning rates for 20 steps (base lr 1.0);
- `clip`: torch.nn.utils.clip_grad_norm_ on fixed gradients: the returned norm and clipped grads.
"""

import json
import math

import torch
from transformers import get_scheduler

torch.manual_seed(0)
out = {}

p0 = [[0.5, -1.0, 2.0], [0.1, 0.0, -0.3]]
b0 = [0.25, -0.75]
grads = [([[0.1 * (s + 1), -0.2, 0.05 * s], [0.3, -0.1 * s, 0.2]], [0.5 - 0.1 * s, 0.01]) for s in range(5)]
cases = []
for lr, wd, betas, eps in [(1e-2, 0.0, (0.9, 0.999), 1e-8), (3e-2, 0.1, (0.8, 0.95), 1e-6)]:
    w = torch.tensor(p0, requires_grad=True)
    b = torch.tensor(b0, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=wd, betas=betas, eps=eps)
    traj = []
    for gw, gb in grads:
        w.grad = torch.tensor(gw)
        b.grad = torch.tensor(gb)
        opt.step()
        traj.append({"w": w.detach().tolist(), "b": b.detach().tolist()})
    cases.append({"lr": lr, "weight_decay": wd, "betas": betas, "eps": eps, "steps": traj})
out["adamw"] = {"w0": p0, "b0": b0, "grads": [{"w": gw, "b": gb} for gw, gb in grads], "cases": cases}

sched = {}
for name, warmup in [("constant", 0), ("constant_with_warmup", 5), ("linear", 5), ("cosine", 5), ("linear", 0), ("cosine", 0)]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    sched[f"{name}/{warmup}"] = lrs
out["schedules"] = {"total_steps": 20, "lrs": sched}

clip = []
for max_norm in [1.0, 100.0]:
    a = torch.nn.Parameter(torch.zeros(2, 2))
    c = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    c.grad = torch.tensor([0.7, -0.1, 1.5])
    norm = torch.nn.utils.clip_grad_norm_([a, c], max_norm)
    clip.append({"max_norm": max_norm, "norm": float(norm), "a": a.grad.tolist(), "c": c.grad.tolist()})
out["clip"] = clip

open("testdata/train/reference.json", "w").write(json.dumps(out, indent=1))
print("ok", {k: (len(v) if isinstance(v, list) else len(v)) for k, v in out.items()})
