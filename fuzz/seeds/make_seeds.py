"""Writes the binary fuzz seeds with the formats' reference writers: GGUF with
llama.cpp's `gguf` package, parquet with pyarrow. Text seeds are committed as files.

    python3 -m venv /tmp/seedvenv && /tmp/seedvenv/bin/pip install gguf pyarrow
    /tmp/seedvenv/bin/python fuzz/seeds/make_seeds.py
"""
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).parent


def gguf_seed(path, arch="llama", alignment=None, bias=False):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    # A byte-level BPE vocabulary of eight tokens and one merge.
    tokens = ["a", "b", "ab", "Ġ", "1", "2", "<|im_start|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(["a b"])
    w.add_token_types([1] * 6 + [3, 3])
    w.add_eos_token_id(7)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((8, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones((8,), dtype=np.float32))
    if bias:
        w.add_tensor("blk.0.attn_q.bias", np.zeros((8,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def parquet_seed(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(rows), str(path), compression="snappy")


def main():
    g = HERE / "gguf_header"
    g.mkdir(exist_ok=True)
    gguf_seed(g / "llama.gguf")
    gguf_seed(g / "qwen2-aligned.gguf", arch="qwen2", alignment=64, bias=True)
    p = HERE / "dataset_parquet"
    p.mkdir(exist_ok=True)
    parquet_seed(
        p / "gsm8k.parquet",
        {
            "question": ["Tom has 3 apples and buys 4 more. How many?", "What is 6 * 7?"],
            "answer": ["3 + 4 = <<3+4=7>>7\n#### 7", "6 * 7 = 42\n#### 42"],
        },
    )
    parquet_seed(p / "with-idx.parquet", {"idx": [5], "question": ["q"], "answer": ["#### 1,000"]})
    parquet_seed(p / "missing-answer.parquet", {"question": ["q"]})


if __name__ == "__main__":
    main()
