#!/usr/bin/env python3
"""Checks a LoRA run's PEFT adapter with Python's own `peft`.

PEFT loads `RUN/adapter` onto the base model and computes the logits of a fixed
sequence; transformers loads `RUN/model` (the adapters merged into the weights by
cal-grpo) and computes the same logits. They must agree to 1e-4: that is PEFT's reading
of our key names, shapes and `lora_alpha / r` scaling against our own merge.

Needs torch, transformers and peft (a throwaway venv; CI does not install them):

    python3 -m venv /tmp/peft-venv && /tmp/peft-venv/bin/pip install torch transformers peft
    /tmp/peft-venv/bin/python scripts/check_peft_adapter.py BASE_HF_FOLDER RUN_FOLDER

`train` writes the merged model to RUN/model, `sft` to RUN itself; both are read. For a
QLoRA run the base is the one the adapter was trained over, the quantized base written
back dequantized: `cal-grpo export --model M --quantize-base q4_0 --output-dir BASE`.
"""
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    base_dir, run_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (2, 12))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, f"{run_dir}/adapter")
        adapted = peft_model(input_ids=ids).logits
        # `train` writes the merged model to RUN/model, `sft` to RUN itself
        merged_dir = f"{run_dir}/model" if os.path.isdir(f"{run_dir}/model") else run_dir
        merged = AutoModelForCausalLM.from_pretrained(
            merged_dir, dtype=torch.float32
        )(input_ids=ids).logits
    moved = (adapted - plain).abs().max().item()
    diff = (adapted - merged).abs().max().item()
    print(f"adapter moves the logits by up to {moved:.3e}; PEFT vs cal-grpo's merge: {diff:.3e}")
    if moved == 0.0:
        sys.exit("the adapter changes nothing: train with a learning rate that moves it")
    if diff > 1e-4:
        sys.exit(f"PEFT's adapter and cal-grpo's merged model differ by {diff:.3e} (> 1e-4)")
    print("ok")


if __name__ == "__main__":
    main()
