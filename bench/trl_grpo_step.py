"""Wall time of GRPO steps with TRL's GRPOTrainer on SmolLM2-135M-Instruct, for comparison
with `cal-grpo train` on the same settings (B = 4 prompts x G = 4, 128 new tokens, CPU).

Kept out of CI (it installs torch + TRL). Usage:

    bash scripts/fetch-assets.sh --with-model
    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch transformers trl datasets accelerate gguf
    /tmp/trlvenv/bin/python bench/trl_grpo_step.py --steps 3

and, on the same machine right after it, the cal-grpo side:

    cal-grpo train --model assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --dataset assets/gsm8k/train.jsonl --eval-dataset assets/gsm8k/test.jsonl --eval-samples 1 \
        --prompts-per-step 4 --num-generations 4 --max-new-tokens 128 --steps 3 --output-dir /tmp/cal-bench

(compare the median of `perf/step_seconds` in /tmp/cal-bench/metrics.jsonl with this
script's median step time).
"""
import argparse
import copy
import json
import os
import statistics
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.time()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.time() - self.t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    # TRL 1.x defaults to bf16 autocast and gradient checkpointing. cal-grpo's step is
    # f32 without recomputation, so the like-for-like default here is f32 without
    # checkpointing; on a CPU without bf16 instructions TRL's defaults are many times
    # slower (a 2-step run here did not finish in 25 minutes), which would flatter us.
    ap.add_argument("--bf16", action="store_true", help="TRL's default bf16 autocast")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default")
    a = ap.parse_args()
    gguf_dir, name = os.path.join(ROOT, "assets/smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, torch_dtype=torch.float32)
    # Trainer refuses models loaded from GGUF ("quantized"): copy the dequantized f32
    # weights into a plain model built from the same config.
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    # TRL builds its reference model from the path, so hand it a real folder.
    folder = "/tmp/trl-bench-smollm2"
    plain.save_pretrained(folder)
    tok.save_pretrained(folder)
    model = folder
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "assets/gsm8k/train.jsonl"))][: 4 * a.steps]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                             "answer": r["answer"].split("####")[-1].strip()} for r in rows])

    def reward(completions, answer, **kw):
        return [1.0 if ans in c[0]["content"].split("####")[-1] else 0.0 for c, ans in zip(completions, answer)]

    cfg = GRPOConfig(output_dir="/tmp/trl-bench", per_device_train_batch_size=16, num_generations=4,
                     max_completion_length=128, max_steps=a.steps, logging_steps=1, report_to=[], use_cpu=True,
                     beta=0.04, learning_rate=1e-6, save_strategy="no",
                     bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=reward, args=cfg, train_dataset=ds,
                          callbacks=[timer])
    trainer.train()
    print(json.dumps({"trl_step_seconds": timer.times, "median": statistics.median(timer.times),
                      "torch_threads": torch.get_num_threads(), "bf16": a.bf16,
                      "gradient_checkpointing": a.gradient_checkpointing}))


if __name__ == "__main__":
    main()
