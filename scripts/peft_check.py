#!/usr/bin/env python3
"""Peer check of kiln's adapter and merge output against PEFT and transformers (local only).

    python scripts/peft_check.py BASE_DIR ADAPTER_DIR [MERGED_DIR] [--compare KILN_LOGITS.json]

Loads BASE_DIR with transformers, applies ADAPTER_DIR with `PeftModel.from_pretrained` and fails
if PEFT reports any missing or unexpected adapter key (its warnings are captured and asserted
empty), then prints the logits of every position for a few prompts as JSON
(`{"prompts": [{"text", "ids", "logits": [[...], ...]}]}`, the shape kiln's adapter tests write as
`kiln_logits.json`). With MERGED_DIR, also loads that directory with `AutoModelForCausalLM` (no
PEFT) and checks it against the PEFT model. With --compare, reports the largest difference to
kiln's logits. Summary lines go to stderr; exit status 1 on any failure.

Needs `pip install torch transformers peft` (CPU is enough). Not part of CI. To produce the
inputs from kiln:

    KILN_SAVE_ADAPTER_TO=/tmp/kiln-peft cargo test -p kiln-model --test adapters
    python scripts/peft_check.py testdata/hf/llama /tmp/kiln-peft/adapter /tmp/kiln-peft/merged \\
        --compare /tmp/kiln-peft/adapter/kiln_logits.json
"""

import argparse
import json
import logging
import sys
import warnings

PROMPTS = [
    "The model learns",
    "A small cat sits near the window and",
    "42 + 17 =",
]

# Differences above these fail the check (float32 on CPU).
TOL_KILN = 1e-4
TOL_MERGED = 1e-4


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def logits_for(model, tokenizer, torch):
    out = []
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        out.append({"text": text, "ids": ids, "logits": logits.tolist()})
    return out


def max_diff(a, b):
    return max(
        abs(x - y)
        for ra, rb in zip(a, b, strict=True)
        for x, y in zip(ra, rb, strict=True)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("adapter")
    parser.add_argument("merged", nargs="?")
    parser.add_argument("--compare", help="kiln_logits.json to compare the PEFT logits with")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)

    capture = _Capture()
    for name in ("peft", "transformers"):
        logging.getLogger(name).addHandler(capture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, args.adapter, is_trainable=False)
    model.eval()
    problems = [
        m
        for m in capture.messages + [str(w.message) for w in caught]
        if "missing" in m.lower() or "unexpected" in m.lower() or "not found" in m.lower()
    ]
    failures = []
    if problems:
        failures.append("PEFT reported key problems:\n  " + "\n  ".join(problems))
    # PEFT drops keys it has no place for without a word: compare the file's key set with the
    # state dict PEFT itself would save for the model it built.
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(f"{args.adapter}/adapter_model.safetensors", framework="pt") as f:
        in_file = set(f.keys())
    expected = set(get_peft_model_state_dict(model).keys())
    if in_file - expected:
        failures.append(f"unexpected adapter keys (PEFT ignores them): {sorted(in_file - expected)}")
    if expected - in_file:
        failures.append(f"missing adapter keys: {sorted(expected - in_file)}")
    peft_cfg = model.peft_config["default"]
    print(
        f"loaded {args.adapter}: r={peft_cfg.r} alpha={peft_cfg.lora_alpha} "
        f"targets={sorted(peft_cfg.target_modules) if not isinstance(peft_cfg.target_modules, str) else peft_cfg.target_modules} "
        f"modules_to_save={peft_cfg.modules_to_save}",
        file=sys.stderr,
    )

    peft_logits = logits_for(model, tokenizer, torch)
    print(json.dumps({"prompts": peft_logits}))

    if args.compare:
        with open(args.compare) as f:
            kiln = json.load(f)["prompts"]
        worst = 0.0
        for ours, theirs in zip(kiln, peft_logits, strict=True):
            if ours["ids"] != theirs["ids"]:
                failures.append(f"{ours['text']!r}: kiln ids {ours['ids']} vs {theirs['ids']}")
                continue
            worst = max(worst, max_diff(ours["logits"], theirs["logits"]))
        print(f"kiln vs PEFT ({args.adapter}): max |dlogit| = {worst:.3e}", file=sys.stderr)
        if worst > TOL_KILN:
            failures.append(f"kiln vs PEFT: {worst:.3e} > {TOL_KILN}")

    if args.merged:
        merged = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32)
        merged.eval()
        merged_logits = logits_for(merged, AutoTokenizer.from_pretrained(args.merged), torch)
        worst = max(
            max_diff(m["logits"], p["logits"]) for m, p in zip(merged_logits, peft_logits, strict=True)
        )
        print(f"merged dir ({args.merged}) vs PEFT: max |dlogit| = {worst:.3e}", file=sys.stderr)
        if worst > TOL_MERGED:
            failures.append(f"merged vs PEFT: {worst:.3e} > {TOL_MERGED}")
        # And PEFT's own merge agrees with the saved one.
        own = model.merge_and_unload()
        own_logits = logits_for(own, tokenizer, torch)
        worst = max(
            max_diff(m["logits"], o["logits"]) for m, o in zip(merged_logits, own_logits, strict=True)
        )
        print(f"merged dir vs PEFT merge_and_unload: max |dlogit| = {worst:.3e}", file=sys.stderr)
        if worst > TOL_MERGED:
            failures.append(f"merged vs merge_and_unload: {worst:.3e} > {TOL_MERGED}")

    if failures:
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
        sys.exit(1)
    print("ok", file=sys.stderr)


if __name__ == "__main__":
    main()
