"""Writes the reference fixtures that crates/cal-model/tests/parity.rs compares against.

Run by hand, never in CI (it needs torch):

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch transformers safetensors gguf tokenizers
    bash scripts/fetch-assets.sh --with-model
    /tmp/refvenv/bin/python scripts/make_parity_fixtures.py

Outputs (small, committed) under crates/cal-model/tests/fixtures/:
  qwen2-tiny/            a random Qwen2 (q/k/v bias) saved with save_pretrained + a tiny BPE tokenizer
  qwen2-tiny.json        token ids, last-position logits and greedy continuations from transformers
  smollm2.json           token ids, last-position logits (top-64 + a checksum of all) and greedy
                         continuation from transformers loading the SmolLM2 GGUF
"""
import json
import os
import sys
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "crates/cal-model/tests/fixtures")
TEXTS = [
    "Natalia sold 48/2 = 24 clips in May.",
    "Question: Mia has 12 apples. She buys 7 more. How many apples does she have?\nAnswer:",
    "Café costs €5 × 3 = €15; 日本 🍎",
]


def qwen2_tiny():
    out = os.path.join(FIX, "qwen2-tiny")
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so differences show
            p.normal_(0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return model, fast


def record(model, tok, texts, new_tokens, top=None):
    rows = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            t0 = time.time()
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
            secs = time.time() - t0
        row = {"text": text, "ids": ids, "greedy": gen[0, len(ids):].tolist(), "generate_seconds": secs}
        if top is None:
            row["last_logits"] = logits.tolist()
        else:
            vals, idx = torch.topk(logits, top)
            row["top_ids"] = idx.tolist()
            row["top_logits"] = vals.tolist()
            row["logits_sum"] = float(logits.double().sum())
            row["logits_abs_sum"] = float(logits.double().abs().sum())
        rows.append(row)
    return rows


def main():
    model, tok = qwen2_tiny()
    with open(os.path.join(FIX, "qwen2-tiny.json"), "w") as f:
        json.dump({"rows": record(model, tok, TEXTS, 12)}, f)
    gguf_dir = os.path.join(ROOT, "assets/smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(gguf_dir, name)):
        print("SmolLM2 GGUF not fetched (bash scripts/fetch-assets.sh --with-model); skipping", file=sys.stderr)
        return
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, torch_dtype=torch.float32).eval()
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False,
                                   add_generation_prompt=True)
    texts = TEXTS + [chat, "12345 + 67890 = 80235\n#### 80235"]
    rows = record(model, tok, texts, 24, top=64)
    # batch-of-8 generation timing (128 new tokens) for the benchmark comparison
    ids = tok([chat] * 8, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        t0 = time.time()
        model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=tok.eos_token_id)
        secs = time.time() - t0
    with open(os.path.join(FIX, "smollm2.json"), "w") as f:
        json.dump({"rows": rows, "chat_prompt": chat, "torch_threads": torch.get_num_threads(),
                   "hf_generate_batch8_128_seconds": secs}, f)
    print("hf generate batch 8 x 128 tokens:", secs, "s")


if __name__ == "__main__":
    main()
