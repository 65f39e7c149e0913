//! candle's backward pass as patched in `vendor/candle-core` (the first gradient that
//! reaches a node is stored as it is instead of being added into fresh zeros; see
//! vendor/README.md), checked against f64 central differences on a graph that goes
//! through every rewritten arm that a model can use: fan-in onto one node, first
//! contributions that are strided views (transpose, permute, narrow, broadcast), and the
//! arms that subtract (`Sub`'s right side, `Neg`, `Recip`, `Cos`), whose first
//! contribution must be stored negated.

use candle_core::{DType, Device, Tensor, Var, D};

fn var(data: &[f64], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(data, shape, &Device::Cpu).unwrap()).unwrap()
}

/// Every input is used more than once, through different arms, so that each gets its
/// first contribution from one arm and later ones added.
fn f(x: &Tensor, y: &Tensor, z: &Tensor) -> Tensor {
    let xt = x.t().unwrap(); // [4, 3], strided view
                             // Sub (right side negated) and Mul with fan-in on both x and y
    let a = ((&xt - y).unwrap() * (y - &xt).unwrap().neg().unwrap()).unwrap();
    // Matmul, Broadcast, Reduce(Sum), Reduce(Max)
    let b = x
        .matmul(y)
        .unwrap()
        .broadcast_add(&z.narrow(0, 0, 3).unwrap())
        .unwrap();
    let c = b.max_keepdim(D::Minus1).unwrap().sum_all().unwrap();
    // overlapping narrows of x, concatenated (Narrow, Cat)
    let cat = Tensor::cat(
        &[&x.narrow(0, 0, 2).unwrap(), &x.narrow(0, 1, 2).unwrap()],
        0,
    )
    .unwrap();
    // unary arms, on values kept in their domains
    let pos = (x.sqr().unwrap() + 1.0).unwrap();
    let u = (pos.sqrt().unwrap()
        + pos.log().unwrap()
        + pos.recip().unwrap()
        + x.exp().unwrap()
        + x.cos().unwrap()
        + x.sin().unwrap()
        + x.tanh().unwrap()
        + x.affine(0.5, 0.25).unwrap()
        + x.powf(3.0).unwrap())
    .unwrap();
    // Div with fan-in on both sides, Permute, Reshape, Transpose of the result
    let d = (x.sqr().unwrap() / (&pos * 2.0).unwrap()).unwrap();
    let p = z
        .reshape((2, 2))
        .unwrap()
        .permute((1, 0))
        .unwrap()
        .broadcast_mul(&y.narrow(1, 0, 2).unwrap().narrow(0, 0, 2).unwrap())
        .unwrap();
    let weights = |t: &Tensor| {
        let n = t.elem_count();
        let w: Vec<f64> = (0..n).map(|i| 0.3 + (i % 7) as f64 * 0.11).collect();
        (t * Tensor::from_vec(w, t.shape(), t.device()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
    };
    [
        weights(&a),
        c,
        weights(&cat),
        weights(&u),
        weights(&d),
        weights(&p),
    ]
    .iter()
    .fold(Tensor::new(0f64, x.device()).unwrap(), |s, t| {
        (s + t).unwrap()
    })
}

#[test]
fn patched_backward_matches_central_differences() {
    let xs: Vec<f64> = (0..12)
        .map(|i| ((i * 7 % 12) as f64 - 5.5) * 0.13)
        .collect();
    let ys: Vec<f64> = (0..12)
        .map(|i| ((i * 5 % 12) as f64 - 6.0) * 0.11)
        .collect();
    let zs = [0.4, -0.3, 0.9, -0.7];
    let (x, y, z) = (var(&xs, &[3, 4]), var(&ys, &[4, 3]), var(&zs, &[4]));
    let grads = f(&x, &y, &z).backward().unwrap();
    let eval = |xs: &[f64], ys: &[f64], zs: &[f64]| {
        let t = |d: &[f64], s: &[usize]| Tensor::from_slice(d, s, &Device::Cpu).unwrap();
        f(&t(xs, &[3, 4]), &t(ys, &[4, 3]), &t(zs, &[4]))
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-6;
    let mut checked = 0;
    for which in 0..3 {
        let v = [&x, &y, &z][which];
        let g = grads.get(v).expect("every input gets a gradient");
        assert_eq!(g.dims(), v.dims(), "gradient shape of input {which}");
        assert!(g.is_contiguous(), "gradient of input {which} is contiguous");
        assert_eq!(g.dtype(), DType::F64);
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..g.len() {
            let mut plus = [xs.clone(), ys.clone(), zs.to_vec()];
            let mut minus = plus.clone();
            plus[which][i] += h;
            minus[which][i] -= h;
            let fd = (eval(&plus[0], &plus[1], &plus[2]) - eval(&minus[0], &minus[1], &minus[2]))
                / (2.0 * h);
            assert!(
                (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "input {which}[{i}]: backward {} vs central difference {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 28);
}

/// A node reached by one path only keeps its gradient's values exactly: the stored
/// first contribution is the incoming gradient itself, not a sum with zeros that could
/// differ (it cannot for finite values, but a NaN or an infinity must survive too).
#[test]
fn first_contribution_is_stored_as_is() {
    let x = var(&[1.0, -2.0, 3.0], &[3]);
    let w = Tensor::new(&[f64::INFINITY, -0.5, 2.0], &Device::Cpu).unwrap();
    let grad_of_x = |y: Tensor| -> Vec<f64> {
        let g = y.sum_all().unwrap().backward().unwrap();
        g.get(&x).unwrap().to_vec1().unwrap()
    };
    let xw = (x.as_tensor() * &w).unwrap();
    assert_eq!(grad_of_x(xw.clone()), vec![f64::INFINITY, -0.5, 2.0]);
    // and a subtracting arm stores it negated
    let got = grad_of_x(xw.neg().unwrap());
    assert_eq!(got, vec![f64::NEG_INFINITY, 0.5, -2.0]);
}
