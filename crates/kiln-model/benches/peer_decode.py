"""The peer measurement for benches/decode.rs: the same 26.1M-parameter Llama in transformers.

Not part of kiln or its CI. Run by hand in an environment with torch and transformers:

    python3 crates/kiln-model/benches/peer_decode.py

Prints decode tokens/s for 64 greedy steps after a 32-token prefill (KV cache on, eager
attention and sdpa), and a 128-token prefill, with 2 threads, f32, CPU.
"""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

PROMPT, DECODE, REPEATS = 32, 64, 10

torch.set_num_threads(2)
torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
)
for attn in ["eager", "sdpa"]:
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    prompt = torch.tensor([[(i * 97 + 13) % 8192 for i in range(PROMPT)]])
    rates = []
    with torch.inference_mode():
        for _ in range(REPEATS):
            cache = DynamicCache()
            out = model(prompt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(DECODE):
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            rates.append(DECODE / (time.perf_counter() - start))
        ids = torch.arange(128).unsqueeze(0)
        t = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            model(ids, use_cache=True)
            t.append(time.perf_counter() - start)
    rates.sort()
    t.sort()
    print(f"transformers {attn}: {params} params, decode median {rates[len(rates)//2]:.1f} tokens/s "
          f"(best {rates[-1]:.1f}); prefill 128 tokens median {t[len(t)//2]*1e3:.2f} ms "
          f"= {128 / t[len(t)//2]:.0f} tokens/s")
