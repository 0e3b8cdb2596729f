"""Reference fixtures for the architectures and RoPE variants that testdata/hf/llama lacks.

Not part of kiln or its CI: run by hand, with torch and transformers installed, from the
repository root:

    python3 testdata/hf/tools/make_arch_fixtures.py

Each model is tiny and random (seeded), saved with transformers' own `save_pretrained` (so its
config.json uses transformers 5's spelling), shares the byte-level BPE tokenizer of
testdata/hf/llama, and gets an expected.json with `last_logits[]` (full vocabulary) and
`greedy[]` (16 new ids by argmax over a full recompute, EOS ignored, with the smallest top-2
margin seen) computed in float32 on CPU with eager attention.
"""

import json
import shutil
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

ROOT = Path("testdata/hf")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
PROMPTS = [
    [0, 407, 404, 385],
    [0, 37, 353, 361, 360, 383, 266, 395, 288],
    [0, 407, 381, 396, 372, 374, 357, 359, 382, 355, 406, 266, 401, 400, 18],
]
COMMON = dict(vocab_size=445, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=0, eos_token_id=3, pad_token_id=4, rms_norm_eps=1e-5)


def randomize(model, seed):
    """Every parameter, biases and norms included, from N(0, 0.2²) (norms around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if "norm" in name else noise)


def greedy(model, prompt, n=16):
    ids = list(prompt)
    new, margin = [], float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            margin = min(margin, float(top2[0] - top2[1]))
            nxt = int(logits.argmax())
            new.append(nxt)
            ids.append(nxt)
    return new, margin


def build(name, model_cls, config, seed):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    randomize(model, seed)
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copy(ROOT / "llama" / f, out / f)
    expected = {"last_logits": [], "greedy": []}
    with torch.no_grad():
        for prompt in PROMPTS:
            logits = model(torch.tensor([prompt])).logits[0, -1]
            expected["last_logits"].append({"prompt_ids": prompt, "logits": logits.tolist()})
            new, margin = greedy(model, prompt)
            expected["greedy"].append({"prompt_ids": prompt, "new_ids": new, "min_top2_margin": margin})
    (out / "expected.json").write_text(json.dumps(expected, indent=1))
    print(name, "margins", [round(g["min_top2_margin"], 4) for g in expected["greedy"]])


build("qwen2", Qwen2ForCausalLM, Qwen2Config(**COMMON, tie_word_embeddings=True), 11)
# A 4-token window, so the 9- and 15-token prompts exercise it.
build("mistral", MistralForCausalLM, MistralConfig(**COMMON, sliding_window=4), 12)
build("llama-rope-llama3", LlamaForCausalLM, LlamaConfig(**COMMON, rope_parameters={
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), 13)
build("llama-rope-linear", LlamaForCausalLM, LlamaConfig(**COMMON, rope_parameters={
    "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}), 14)
