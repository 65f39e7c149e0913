#!/usr/bin/env python3
"""Writes crates/cal-model/tests/fixtures/qwen2-tiny-attention.json: transformers'
attention maps (eager attention, every layer, every head) and the residual stream after
each layer of the committed qwen2-tiny model on one text, for the maps and states that
`Transformer::forward_probe` returns (what distillation's attention and feature
strategies read) to be checked against. Run by hand (needs torch and transformers):

    /tmp/refvenv/bin/python scripts/make_attention_fixture.py
"""
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "crates/cal-model/tests/fixtures")
TEXT = "Question: Mia has 12 apples. She buys 7 more. How many apples does she have?\nAnswer:"

model = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "qwen2-tiny"), dtype=torch.float32,
                                             attn_implementation="eager")
tok = AutoTokenizer.from_pretrained(os.path.join(FIX, "qwen2-tiny"))
ids = tok(TEXT)["input_ids"][:16]
with torch.no_grad():
    out = model(input_ids=torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
n = model.config.num_hidden_layers
with open(os.path.join(FIX, "qwen2-tiny-attention.json"), "w") as f:
    json.dump({
        "ids": ids,
        # [layer][head][query][key]
        "attention": [a[0].tolist() for a in out.attentions],
        # the residual stream after layer l (hidden_states[l + 1]); the last layer's is
        # normed by transformers, so it is left out
        "layers": [out.hidden_states[l + 1][0].tolist() for l in range(n - 1)],
    }, f)
print("wrote", os.path.join(FIX, "qwen2-tiny-attention.json"), len(ids), "tokens")
