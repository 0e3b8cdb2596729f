"""TRL's DPOTrainer tokenization and summed completion log-probs of a preference file, to compare
with `kiln eval logps --json` (run by hand; not part of CI):

    python scripts/trl_dpo_logps.py testdata/hf/llama PREFS.jsonl > trl.jsonl
    kiln eval logps --model testdata/hf/llama --data PREFS.jsonl --json > kiln.jsonl
"""
import json
import sys

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

model_dir, data = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
ds = load_dataset("json", data_files=data, split="train")
args = DPOConfig(output_dir="/tmp/trl-dpo-check", report_to=[], bf16=False, max_length=None)
trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok)
model.eval()
for row in trainer.train_dataset:
    out = {}
    for side in ("chosen", "rejected"):
        ids = row["prompt_ids"] + row[f"{side}_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        logps = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        out[f"{side}_logps"] = logps[len(row["prompt_ids"]) - 1 :].sum().item()
        out[f"{side}_ids"] = ids
    print(json.dumps(out))
