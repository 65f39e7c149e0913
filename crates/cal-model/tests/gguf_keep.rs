//! QLoRA's `keep`: a GGUF file's layer weights and embedding held as its own quantized
//! blocks. The
//! blocks kept (q/k rows put back in order) dequantize to exactly the weights the
//! ordinary load dequantizes, and the kept model computes the same logits, to f32
//! summation order.

use cal_model::load::{load_gguf, load_gguf_keep};
use candle_core::{DType, Device, Tensor};

#[test]
#[ignore = "needs assets: bash scripts/fetch-assets.sh --with-model"]
fn kept_blocks_are_the_weights_the_plain_load_dequantizes() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dev = Device::Cpu;
    let plain = load_gguf(&path, DType::F32, &dev).unwrap().model;
    let kept = load_gguf_keep(&path, DType::F32, &dev).unwrap().model;
    assert_eq!(
        kept.quantized.len(),
        30 * 7 + 1,
        "every layer's seven projections kept, and the (tied) embedding"
    );
    assert!(kept.quantized.contains_key("model.embed_tokens.weight"));
    for (name, q) in &kept.quantized {
        assert!(!kept.params.contains_key(name), "{name} also in f32");
        let d = (q.dequantize().unwrap() - &plain.params[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
    let ids = Tensor::new(&[[1u32, 504, 2115, 314, 9589, 28]], &dev).unwrap();
    let mask = vec![vec![1u8; 6]];
    let logits = |m: &cal_model::Transformer| m.forward(&ids, &mask).unwrap().squeeze(0).unwrap();
    let (a, b) = (logits(&plain), logits(&kept));
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // the sequence forward multiplies by the dequantized tiles: f32 summation order only
    assert!(d < 1e-4 * scale, "logits differ by {d} (largest {scale})");
}
