use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (n, k) in [(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let wt = w.t()?.contiguous()?;
        let x = Tensor::randn(0f32, 1.0, (8, k), &dev)?;
        let mut a = vec![];
        let mut b = vec![];
        for _ in 0..20 {
            let t = Instant::now();
            let _ = x.matmul(&w.t()?)?;
            a.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let _ = x.matmul(&wt)?;
            b.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (xv, wv) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            w.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut c = vec![];
        for _ in 0..20 {
            let t = Instant::now();
            let _ = small_linear(&xv, 8, k, &wv, n);
            c.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let r = small_linear(&xv, 8, k, &wv, n);
        let e = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let err = r
            .iter()
            .zip(&e)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        c.sort_by(f64::total_cmp);
        println!(
            "  custom {:.3} ms ({:.1} GB/s) max err {err:e}",
            c[10],
            (n * k * 4) as f64 / c[10] / 1e6
        );
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        println!(
            "n={n} k={k}: w.t() {:.3} ms, wt contiguous {:.3} ms, bytes/ms-> {:.1} GB/s",
            a[10],
            b[10],
            (n * k * 4) as f64 / b[10] / 1e6
        );
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_dot8(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    out: &mut [f32],
    n0: usize,
    nn: usize,
    n_total: usize,
) {
    use std::arch::x86_64::*;
    // out[mi * n_total + n0 + j] = dot(x[mi], w[j])
    for j in 0..nn {
        let wr = &w[j * k..(j + 1) * k];
        let mut mi = 0;
        while mi < m {
            let mb = (m - mi).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut kk = 0;
            while kk + 8 <= k {
                let wv = _mm256_loadu_ps(wr.as_ptr().add(kk));
                for r in 0..mb {
                    let xv = _mm256_loadu_ps(x.as_ptr().add((mi + r) * k + kk));
                    acc[r] = _mm256_fmadd_ps(xv, wv, acc[r]);
                }
                kk += 8;
            }
            for r in 0..mb {
                let mut buf = [0f32; 8];
                _mm256_storeu_ps(buf.as_mut_ptr(), acc[r]);
                let mut s: f32 = buf.iter().sum();
                for t in kk..k {
                    s += x[(mi + r) * k + t] * wr[t];
                }
                *out.as_mut_ptr().add((mi + r) * n_total + n0 + j) = s;
            }
            mi += mb;
        }
    }
}

pub fn small_linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let threads = 2;
    let chunk = n.div_ceil(threads);
    let outp = out.as_mut_ptr() as usize;
    std::thread::scope(|s| {
        for t in 0..threads {
            let n0 = t * chunk;
            let nn = chunk.min(n - n0);
            s.spawn(move || unsafe {
                let o = std::slice::from_raw_parts_mut(outp as *mut f32, m * n);
                rows_dot8(x, m, k, &w[n0 * k..(n0 + nn) * k], o, n0, nn, n);
            });
        }
    });
    out
}
