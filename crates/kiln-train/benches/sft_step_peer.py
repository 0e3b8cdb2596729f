"""The peer measurement for benches/sft_step.rs: the same steps in PyTorch eager with PEFT.

Not part of kiln or its CI. Run by hand with torch, transformers and peft installed:

    python3 crates/kiln-train/benches/sft_step_peer.py [THREADS]   # default 2
"""

import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SEQ, BATCH = 256, 8
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
ids = torch.tensor([[(i * 131 + r * 17) % 2048 for i in range(SEQ + 1)] for r in range(BATCH)])


def build(targets):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=SEQ,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg)
    if targets is not None:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    return model


def measure(name, targets):
    model = build(targets)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()

    step()
    times = []
    for _ in range(12):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"| {name} | {sum(p.numel() for p in params)} | {times[len(times) // 2] * 1e3:.0f} ms "
          f"| {times[0] * 1e3:.0f} ms |")


print(f"torch {torch.__version__} eager, {torch.get_num_threads()} threads")
print("| method | trainable params | step median | step best |\n|---|---|---|---|")
measure("full, AdamW", None)
measure("LoRA r16 all-linear (PEFT)", "all-linear")
measure("LoRA r16 q_proj+v_proj (PEFT)", ["q_proj", "v_proj"])
