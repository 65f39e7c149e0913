#!/usr/bin/env python3
"""Checks that a Hugging Face folder cal-grpo wrote (`sft`, `dpo`, `distill`, `export`)
loads in transformers and gives the log-probs cal-grpo gives.

`cal-grpo generate --model FOLDER --prompt TEXT --greedy --json` prints the prompt ids,
the completion ids and each completion token's log-prob under our model; transformers
loads FOLDER, runs the same ids and gathers the same log-probs. They must agree to
1e-4 (f32).

Needs torch and transformers (a throwaway venv; CI does not install them):

    python3 -m venv /tmp/hf-venv && /tmp/hf-venv/bin/pip install torch transformers
    cal-grpo generate --model runs/distill --prompt "Question: 2 + 3" --greedy --json > out.json
    /tmp/hf-venv/bin/python scripts/check_hf_logprobs.py runs/distill out.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    folder, ours = sys.argv[1], json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt, completion = ours["prompt_ids"], ours["ids"]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    theirs = [logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(completion)]
    diff = max(abs(a - b) for a, b in zip(theirs, ours["logprobs"]))
    print(f"{folder}: {len(completion)} tokens, largest log-prob difference {diff:.2e}")
    if diff > 1e-4:
        sys.exit(f"log-probs differ by {diff:.2e} (> 1e-4): ours {ours['logprobs']}, transformers {theirs}")


if __name__ == "__main__":
    main()
