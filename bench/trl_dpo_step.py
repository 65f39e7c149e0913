"""Wall time of DPO steps with TRL's DPOTrainer on SmolLM2-135M-Instruct with LoRA, for
comparison with `cal-grpo dpo` on the same pairs and settings (8 pairs a step, LoRA rank
16 / alpha 32 on q,k,v,o, β 0.1, sigmoid loss, learning rate 5e-5, f32, CPU, the
reference's log-probs computed per batch). `bench/alternate_trl_dpo.sh` runs it in turn
with `cal-grpo dpo`. Kept out of CI (it needs torch, TRL and peft):

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch transformers trl peft datasets accelerate gguf
    /tmp/trlvenv/bin/python bench/trl_dpo_step.py --pairs runs/pairs.jsonl --steps 3
"""
import argparse
import copy
import json
import os
import statistics
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

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
    ap.add_argument("--pairs", required=True, help="TRL-format JSONL (what make-pairs writes)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()
    gguf_dir, name = os.path.join(ROOT, "assets/smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, torch_dtype=torch.float32)
    # Trainer refuses models loaded from GGUF ("quantized"): the dequantized f32 weights
    # go into a plain model built from the same config.
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    rows = [json.loads(l) for l in open(a.pairs)][: a.batch_size * a.steps]
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(output_dir="/tmp/trl-dpo-bench", per_device_train_batch_size=a.batch_size,
                     max_steps=a.steps, logging_steps=1, report_to=[], use_cpu=True, beta=0.1,
                     loss_type=["sigmoid"], learning_rate=5e-5, save_strategy="no", bf16=False,
                     gradient_checkpointing=False, max_length=1024, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = DPOTrainer(model=plain, args=args, processing_class=tok, train_dataset=ds, peft_config=lora,
                         callbacks=[timer])
    trainer.train()
    print(json.dumps({"trl_step_seconds": timer.times, "median": statistics.median(timer.times),
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
