"""The reward-model fixture testdata/hf/llama-reward, and a check that transformers loads a
reward model kiln wrote.

Not part of kiln or its CI: run by hand, with torch and transformers installed, from the
repository root.

    python3 scripts/reward_fixture.py make
        Builds `LlamaForSequenceClassification` (num_labels=1, pad_token_id 4) from
        testdata/hf/llama's weights with a seeded random `score` head, saves it with
        `save_pretrained` (safetensors) plus llama's tokenizer files in
        testdata/hf/llama-reward/, and writes expected.json: transformers' scores for a few
        texts one at a time (`texts[]`: text, ids, score) and for a right-padded batch
        (`batch`: input_ids, attention_mask, scores).

    python3 scripts/reward_fixture.py check DIR DATA.jsonl KILN_SCORES.jsonl
        Loads DIR (a reward model `kiln reward` wrote) with AutoModelForSequenceClassification,
        fails on any missing or unexpected weight, scores DATA.jsonl's rows ({"text"} or
        {"prompt","completion"}, encoded as tokenizer(text)) and compares with the
        `kiln eval reward --json` output in KILN_SCORES.jsonl (1e-4 absolute).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                          LlamaForSequenceClassification)

SRC = Path("testdata/hf/llama")
OUT = Path("testdata/hf/llama-reward")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    # Ends with the pad token itself: transformers reads the score before it.
    "hello world<pad>",
    "Reward models read one number at the last token that is not padding.",
]
BATCH = [0, 2, 1, 4]  # indices into TEXTS, padded on the right to the longest


def score_one(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


def make():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(SRC, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = 4
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        # Larger than transformers' N(0, 0.02²) init, so scores are O(1) and a wrong token
        # position shows.
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g) * 0.5)
    model.eval()
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(SRC / name, OUT / name)

    tok = AutoTokenizer.from_pretrained(OUT)
    texts = []
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        texts.append({"text": text, "ids": ids, "score": score_one(model, ids)})
    batch_texts = [TEXTS[i] for i in BATCH]
    enc = tok(batch_texts, padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        scores = model(**enc).logits[:, 0].tolist()
    expected = {
        "pad_token_id": 4,
        "texts": texts,
        "batch": {
            "texts": batch_texts,
            "input_ids": enc["input_ids"].tolist(),
            "attention_mask": enc["attention_mask"].tolist(),
            "scores": scores,
        },
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {OUT}: scores {[round(t['score'], 4) for t in texts]}, batch {scores}")


def row_text(row):
    if "text" in row:
        return row["text"]
    return row["prompt"] + row["completion"]


def check(model_dir, data, kiln_scores):
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification"), config["architectures"]
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                          "mismatched_keys")}
    assert not bad, f"loading {model_dir}: {bad}"
    assert model.config.num_labels == 1, model.config.num_labels
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    theirs = [json.loads(line)["score"] for line in Path(kiln_scores).read_text().splitlines()
              if line.strip()]
    assert len(rows) == len(theirs), (len(rows), len(theirs))
    worst = 0.0
    for row, kiln in zip(rows, theirs):
        ours = score_one(model, tok(row_text(row))["input_ids"])
        worst = max(worst, abs(ours - kiln))
    print(f"{type(model).__name__} loaded from {model_dir} with no missing or unexpected "
          f"weights; {len(rows)} rows, max |transformers - kiln| = {worst:.2e}")
    assert worst < 1e-4, worst


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:
        make()
    elif sys.argv[1:2] == ["check"] and len(sys.argv) == 5:
        check(*sys.argv[2:5])
    else:
        sys.exit(__doc__)
