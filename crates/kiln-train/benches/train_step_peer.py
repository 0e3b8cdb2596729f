"""The peer measurement for benches/train_step.rs: the same pre-training step in PyTorch eager.

Not part of kiln or its CI. Run by hand with torch and transformers installed:

    python3 crates/kiln-train/benches/train_step_peer.py [THREADS]   # default 2
"""

import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SEQ, BATCH = 256, 8
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=SEQ,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
cfg._attn_implementation = "eager"
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.tensor([[(i * 131 + r * 17) % 2048 for i in range(SEQ + 1)] for r in range(BATCH)])


def step():
    out = model(ids[:, :-1], labels=ids[:, :-1])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


step()
times = []
for _ in range(14):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
times.sort()
med = times[len(times) // 2]
best = times[0]
print(f"torch {torch.__version__} eager: {sum(p.numel() for p in model.parameters())} params, "
      f"step median {med * 1e3:.0f} ms = {BATCH * SEQ / med:.0f} tokens/s, "
      f"best {best * 1e3:.0f} ms = {BATCH * SEQ / best:.0f} tokens/s")
