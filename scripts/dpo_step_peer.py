"""Seconds per DPO step of TRL's DPOTrainer (LoRA, PEFT) on a model directory, for comparison
with `kiln dpo` on the same model, data and settings (run by hand; not part of CI):

    python scripts/dpo_step_peer.py MODEL_DIR PREFS.jsonl [STEPS]
"""
import sys
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

model_dir, data = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 20
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
ds = load_dataset("json", data_files=data, split="train")


class Timer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t)


timer = Timer()
args = DPOConfig(
    output_dir="/tmp/trl-dpo-peer",
    per_device_train_batch_size=4,
    max_steps=steps,
    max_length=64,
    learning_rate=1e-5,
    bf16=False,
    gradient_checkpointing=False,
    report_to=[],
    logging_steps=1000,
    save_strategy="no",
)
peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft, callbacks=[timer])
trainer.train()
warm = timer.times[2:]
print(f"TRL DPO LoRA: {sum(warm) / len(warm):.3f} s/step over {len(warm)} steps (after 2 warm-up)")
