#!/usr/bin/env python3
"""Writes the TRL reference for kiln's SFT tokenization and loss masks (local only, not CI).

    python scripts/trl_sft_labels.py testdata/hf/llama > /tmp/trl.json

Runs TRL's SFTTrainer dataset preparation on a few rows of each format with the fixture's
tokenizer and prints `input_ids` and `labels` (-100 where no loss) per row. Needs
`pip install torch transformers trl datasets`. testdata/trl/sft_labels.json holds its output
(trimmed to `row`, `input_ids`, `labels`), which crates/kiln-train/tests/sft_trl_parity.rs checks.
"""
import json, sys, tempfile
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

base = sys.argv[1]
tok = AutoTokenizer.from_pretrained(base)
cases = {
    "prompt_completion": [
        {"prompt": "What is 2+2?", "completion": " 4, of course."},
        {"prompt": "The capital of France is", "completion": " Paris."},
    ],
    "conversational_prompt_completion": [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
         "completion": [{"role": "assistant", "content": "4."}]},
    ],
    "text": [
        {"text": "A small cat sits near the window."},
    ],
}
out = {"trl_version": __import__("trl").__version__, "cases": {}}
for name, rows in cases.items():
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=128, report_to=[], completion_only_loss=None, bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    ds = trainer.train_dataset
    items = []
    for i, row in enumerate(rows):
        r = ds[i]
        items.append({"row": row, "input_ids": r["input_ids"],
                      "labels": r.get("labels"), "columns": list(r.keys())})
    out["cases"][name] = items
json.dump(out, sys.stdout, indent=1)
