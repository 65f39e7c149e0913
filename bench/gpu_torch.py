"""The PyTorch side of the GPU benchmark (`bench/gpu_session.sh`): the same model shape,
dtype and batch sizes as `cal-grpo bench` on the same device, one JSON line out.

- the device's matmul rate in the dtype (the MFU normaliser, measured in this run);
- `transformers` `generate` tokens/s at each batch size (sampling, fixed length);
- one training step (forward + backward + AdamW) on BATCH x SEQ tokens: tokens/s, MFU;
- with --trl: TRL's GRPOTrainer step time (B prompts x G generations).

Random weights from a Hugging Face config (bench/configs/), so nothing is downloaded.

    python3 bench/gpu_torch.py --config bench/configs/smollm2-135m.json --device cuda \
        --dtype bf16 --batches 8,64,256 --new-tokens 128 --train-batch 8 --seq 256
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(dev, fn, repeats):
    fn()  # warm-up
    sync(dev)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return out


def matmul_tflops(dev, dtype, n, repeats):
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ts = timed(dev, lambda: a @ b, repeats)
    return 2 * n**3 / statistics.median(ts) / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--batches", default="8,64,256")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--trl", action="store_true", help="also time TRL's GRPOTrainer step")
    ap.add_argument("--tokenizer", help="tokenizer folder for --trl")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(a.config)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype).to(dev)
    params = sum(p.numel() for p in model.parameters())
    out = {"config": a.config, "device": str(dev), "dtype": a.dtype, "params": params,
           "torch": torch.__version__}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    out["matmul_tflops"] = matmul_tflops(dev, dtype, a.matmul_n, a.repeats)

    model.eval()
    gen = {}
    for b in [int(x) for x in a.batches.split(",")]:
        ids = torch.randint(10, cfg.vocab_size - 10, (b, 32), device=dev)

        def run():
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                               max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                               pad_token_id=0)
        ts = timed(dev, run, a.repeats)
        gen[str(b)] = b * a.new_tokens / statistics.median(ts)
    out["generate_tokens_per_s"] = gen

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    ids = torch.randint(10, cfg.vocab_size - 10, (a.train_batch, a.seq), device=dev)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ts = timed(dev, step, a.repeats)
    tokens = a.train_batch * a.seq
    s = statistics.median(ts)
    out["train_step_s"] = s
    out["train_tokens_per_s"] = tokens / s
    out["train_mfu"] = 6 * params * tokens / s / (out["matmul_tflops"] * 1e12)

    if a.trl:
        out["trl_grpo_step_s"] = trl_step(a, cfg, dev, dtype)
    print(json.dumps(out))


def trl_step(a, cfg, dev, dtype):
    """Median step time of TRL's GRPOTrainer (4 prompts x 4 generations, new-tokens)."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.times = None, []

        def on_step_begin(self, *args, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kw):
            self.times.append(time.perf_counter() - self.t)

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    folder = tempfile.mkdtemp()
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    data = Dataset.from_list([{"prompt": f"What is {i} plus {i + 3}?"} for i in range(64)])
    timer = Timer()
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16,
                      num_generations=4, max_completion_length=a.new_tokens, beta=0.04,
                      max_steps=a.repeats + 1, logging_steps=1, save_strategy="no",
                      report_to=[], bf16=(a.dtype == "bf16"), use_cpu=(dev.type == "cpu"))
    trainer = GRPOTrainer(model=folder, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                          args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
    trainer.train()
    return statistics.median(timer.times[1:])


if __name__ == "__main__":
    main()
