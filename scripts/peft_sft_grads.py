#!/usr/bin/env python3
"""Writes the PEFT reference for kiln's SFT loss and LoRA gradients (local only, not CI).

    python scripts/peft_sft_grads.py testdata/hf/llama testdata/hf/llama-lora testdata/trl/sft_labels.json

Batches the `prompt_completion` rows of the TRL reference (right-padded, labels -100 on pads),
computes transformers' mean loss for the base model and, with the adapter loaded trainable by
PEFT, the loss and the gradient of every adapter tensor (its L2 norm and first six values).
Prints JSON; testdata/trl/sft_labels.json holds it under `peft`, which
crates/kiln-train/tests/sft_trl_parity.rs checks. Needs `pip install torch transformers peft`.
"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, adapter, ref_path = sys.argv[1], sys.argv[2], sys.argv[3]
ref = json.load(open(ref_path))
items = ref["cases"]["prompt_completion"]
n = max(len(i["input_ids"]) for i in items)
pad = 4  # <pad> id of the fixture; masked out of the loss anyway
ids = torch.tensor([i["input_ids"] + [pad] * (n - len(i["input_ids"])) for i in items])
labels = torch.tensor([i["labels"] + [-100] * (n - len(i["labels"])) for i in items])
attn = torch.tensor([[1] * len(i["input_ids"]) + [0] * (n - len(i["input_ids"])) for i in items])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
out = {}
with torch.no_grad():
    out["base_loss"] = model(input_ids=ids, attention_mask=attn, labels=labels).loss.item()
model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
model.train()
loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
loss.backward()
out["adapter_loss"] = loss.item()
grads = {}
for name, p in model.named_parameters():
    if p.requires_grad:
        key = name.replace(".default", "")
        g = p.grad.flatten()
        grads[key] = {"norm": g.norm().item(), "first": g[:6].tolist()}
out["adapter_grads"] = grads
print(json.dumps(out, indent=1))
