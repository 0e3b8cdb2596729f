"""Reference renderings for the chat-template tests (testdata/chat_templates/expected.json).

Not part of kiln or its CI: run by hand from the repository root with transformers installed:

    python3 testdata/hf/tools/make_chat_fixtures.py

Each case renders one template from testdata/chat_templates/ with transformers'
`apply_chat_template(..., tokenize=False)` on testdata/hf/llama's tokenizer (bos `<|begin_of_text|>`,
eos `<|im_end|>`); a case whose template raises records the error message instead.
"""

import json
from pathlib import Path

from transformers import AutoTokenizer

DIR = Path("testdata/chat_templates")
tok = AutoTokenizer.from_pretrained("testdata/hf/llama")

CHAT = [
    {"role": "system", "content": "  You are terse.  "},
    {"role": "user", "content": "What is 42 + 17?"},
    {"role": "assistant", "content": " 59. "},
    {"role": "user", "content": "stop and explain the cat"},
    {"role": "assistant", "content": "never reached"},
]
TOOLS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris", "units": ["c", 1, 2.5, None, True], "note": "l'été <b>"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "tool", "content": "{\"wind\": 3}"},
    {"role": "assistant", "content": "21 °C."},
]
CASES = [
    ("llama3", CHAT[:3], True),
    ("llama3", CHAT[1:2], False),
    ("mistral", CHAT[1:4], False),
    ("mistral", CHAT[:2], True),
    ("qwen2", CHAT[1:4], True),
    ("qwen2", CHAT[:3], False),
    ("qwen2", TOOLS, True),
    ("blocks", CHAT, True),
    ("blocks", CHAT[:2], False),
]

out = []
for name, messages, gen in CASES:
    template = (DIR / f"{name}.jinja").read_text()
    case = {"template": name, "messages": messages, "add_generation_prompt": gen}
    try:
        case["text"] = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                               add_generation_prompt=gen)
    except Exception as e:  # a template's raise_exception
        case["error"] = str(e)
    out.append(case)
    print(name, "error" if "error" in case else repr(case["text"][:80]))
(DIR / "expected.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))
