#!/usr/bin/env python3
"""Writes the bitsandbytes reference for kiln's 8-bit AdamW (local only, not CI).

    python scripts/bnb_adamw8bit_reference.py > testdata/bnb/adamw8bit.json

bitsandbytes runs on the CPU since 0.45. Records its dynamic quantization maps, the block-wise
quantization of a fixed vector, and five `bnb.optim.AdamW8bit` steps on a 64×64 parameter
(4096 elements: the smallest with 8-bit state) with gradients given by a formula, so kiln's test
(crates/kiln-train/tests/bnb_parity.rs) reproduces the inputs without a random generator.
Needs `pip install torch bitsandbytes`.
"""

import json
import math

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

ROWS, COLS, STEPS = 64, 64, 5
KEPT = 512  # the first two blocks are recorded element by element


def param0():
    return torch.tensor([0.1 * math.sin(0.37 * i + 0.1) for i in range(ROWS * COLS)],
                        dtype=torch.float32).reshape(ROWS, COLS)


def grad(t):
    return torch.tensor([0.05 * math.sin(0.61 * i + 1.3 * t) + 0.01 * math.cos(0.11 * i * t)
                         for i in range(ROWS * COLS)], dtype=torch.float32).reshape(ROWS, COLS)


out = {"bitsandbytes": bnb.__version__}
signed, unsigned = F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False)
signed_map = signed.clone()
out["map_signed"] = signed.tolist()
out["map_unsigned"] = unsigned.tolist()

x = torch.tensor([math.sin(0.3 * i) * (1 + (i // 256)) for i in range(1000)], dtype=torch.float32)
codes, state = F.quantize_blockwise(x, code=signed.clone(), blocksize=256)
out["blockwise"] = {"input_formula": "sin(0.3 i) * (1 + i // 256), i < 1000",
                    "codes": codes.tolist(), "absmax": state.absmax.tolist()}

for wd in (0.0, 0.01):
    p = torch.nn.Parameter(param0())
    opt = bnb.optim.AdamW8bit([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    for t in range(1, STEPS + 1):
        p.grad = grad(t)
        opt.step()
        # The CPU quantizer sets code[0] = -1.0 in the map it is given (csrc/cpu_ops.cpp, for its
        # search), so the next step would dequantize the most negative first moment with -1
        # instead of the map's -0.99297. Restored, the run is what the CUDA kernel computes.
        opt.state[p]["qmap1"][0] = signed_map[0]
    s = opt.state[p]
    out[f"adamw8bit_wd{wd}"] = {
        "lr": 1e-2, "weight_decay": wd, "steps": STEPS,
        "param_head": p.detach().flatten()[:KEPT].tolist(),
        "param_sum": p.detach().double().sum().item(),
        "param_norm": p.detach().double().norm().item(),
        "state1_head": s["state1"].flatten()[:KEPT].tolist(), "absmax1": s["absmax1"].tolist(),
        "state2_head": s["state2"].flatten()[:KEPT].tolist(), "absmax2": s["absmax2"].tolist(),
    }
print(json.dumps(out))
