"""Generation throughput of `transformers`' `generate` against `cal-grpo bench generate`,
measured alternately in one run on the same machine, model, prompt and batch.

Kept out of CI (it needs torch). Usage:

    bash scripts/fetch-assets.sh --with-model
    cargo build --release -p cal-cli
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch transformers gguf
    /tmp/refvenv/bin/python bench/hf_generate.py --rounds 3

Both sides: SmolLM2-135M-Instruct from the same Q4_1 GGUF dequantized to f32, batch 8 of
the same prompt, exactly 128 new tokens per row (EOS ignored), plain temperature-1
sampling (top-k and top-p off), as many threads as CPUs. Each round runs transformers
once (after one warm-up generation at start) and then one `cal-grpo bench generate
--repeats 1` process (which warms up once itself); the table reports each side's median
over the rounds and their ratio. Model loading is excluded on both sides.
"""
import argparse
import os
import re
import statistics
import subprocess
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The prompt of cal-train/src/bench.rs (GEN_PROMPT).
PROMPT = "Question: Mia has 12 apples. She buys 7 more. How many apples does she have?\nAnswer:"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gguf", default=os.path.join(ROOT, "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--cal-grpo", default=os.path.join(ROOT, "target/release/cal-grpo"))
    a = ap.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    folder, name = os.path.split(a.gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # Like cal-grpo's tokenizer for a plain prompt: no BOS is added by SmolLM2's template.
    ids = tok([PROMPT] * a.batch, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def hf_once():
        torch.manual_seed(0)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                 pad_token_id=tok.eos_token_id)
            secs = time.perf_counter() - t0
        n = (out.shape[1] - ids.shape[1]) * out.shape[0]
        return n / secs

    def cal_once():
        out = subprocess.run([a.cal_grpo, "bench", "generate", "--model", a.gguf, "--repeats", "1",
                              "--new-tokens", str(a.new_tokens)], check=True, capture_output=True, text=True).stdout
        return float(re.search(r"([0-9.]+) tok/s", out).group(1))

    load = open("/proc/loadavg").read().split()[:3]
    hf_once()  # warm-up
    hf, cal = [], []
    for r in range(a.rounds):
        hf.append(hf_once())
        cal.append(cal_once())
        print(f"round {r + 1}: transformers {hf[-1]:.1f} tok/s, cal-grpo {cal[-1]:.1f} tok/s", flush=True)
    mh, mc = statistics.median(hf), statistics.median(cal)
    print()
    print(f"| generation, batch {a.batch} x {a.new_tokens} new tokens (SmolLM2-135M, f32) | median tok/s | runs |")
    print("|---|---|---|")
    print(f"| transformers {__import__('transformers').__version__} generate (torch {torch.__version__}) "
          f"| {mh:.1f} | {', '.join(f'{x:.1f}' for x in hf)} |")
    print(f"| cal-grpo | {mc:.1f} | {', '.join(f'{x:.1f}' for x in cal)} |")
    print(f"\ncal-grpo / transformers = {mc / mh:.2f}x; {threads} threads each; {a.rounds} alternating rounds; "
          f"load average before: {' '.join(load)}")


if __name__ == "__main__":
    main()
