//! The preference losses against TRL's formulas transcribed to numpy
//! (`scripts/make_preference_fixtures.py` writes `fixtures/preference.json`): values,
//! gradients with respect to the policy's sequence log-probs, and the logged rewards;
//! and micro-batches that add up to the batch exactly.

use cal_train::preference::{preference_loss, reward_metrics, PairLogps, PrefLoss};
use candle_core::{Device, Tensor, Var};
use serde_json::Value;

fn vec(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn kind(name: &str) -> PrefLoss {
    match name {
        "sigmoid" => PrefLoss::Sigmoid,
        "ipo" => PrefLoss::Ipo,
        "orpo" => PrefLoss::Orpo,
        other => panic!("unknown loss {other}"),
    }
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
        "{what}: {a} vs {b}"
    );
}

#[test]
fn losses_gradients_and_rewards_match_trls_formulas() {
    let text = include_str!("fixtures/preference.json");
    let fixture: Value = serde_json::from_str(text).unwrap();
    let dev = Device::Cpu;
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let k = kind(case["loss_type"].as_str().unwrap());
        let beta = case["beta"].as_f64().unwrap();
        let t = |key: &str| Tensor::new(vec(case, key), &dev).unwrap();
        let (c, r) = (
            Var::from_tensor(&t("chosen")).unwrap(),
            Var::from_tensor(&t("rejected")).unwrap(),
        );
        let (rc, rr, nc, nr) = (
            t("ref_chosen"),
            t("ref_rejected"),
            t("chosen_tokens"),
            t("rejected_tokens"),
        );
        let p = c.as_tensor().dim(0).unwrap() as f64;
        let n_chosen: f64 = vec(case, "chosen_tokens").iter().sum();
        let out = preference_loss(
            k,
            beta,
            &PairLogps {
                chosen: c.as_tensor(),
                rejected: r.as_tensor(),
                ref_chosen: k.uses_reference().then_some(&rc),
                ref_rejected: k.uses_reference().then_some(&rr),
                chosen_tokens: &nc,
                rejected_tokens: &nr,
            },
            p,
            n_chosen,
        )
        .unwrap();
        let what = format!("{k:?} β={beta}");
        close(
            out.loss.to_scalar::<f64>().unwrap(),
            case["loss"].as_f64().unwrap(),
            &what,
        );
        let grads = out.loss.backward().unwrap();
        for (var, key) in [(&c, "grad_chosen"), (&r, "grad_rejected")] {
            let got = grads
                .get(var.as_tensor())
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (g, w) in got.iter().zip(vec(case, key)) {
                close(*g, w, &format!("{what} {key}"));
            }
        }
        for (got, key) in [
            (&out.chosen_rewards, "rewards_chosen"),
            (&out.rejected_rewards, "rewards_rejected"),
        ] {
            for (g, w) in got.iter().zip(vec(case, key)) {
                close(*g, w, &format!("{what} {key}"));
            }
        }
        let m = reward_metrics(&out.chosen_rewards, &out.rejected_rewards);
        close(
            m[3].1,
            case["rewards_accuracies"].as_f64().unwrap(),
            "accuracies",
        );
        close(m[2].1, case["rewards_margins"].as_f64().unwrap(), "margins");

        // the same batch as two micro-batches (pairs 0..2 and 2..5): losses add up
        let split = |x: &Tensor, a: usize, n: usize| x.narrow(0, a, n).unwrap();
        let mut total = 0.0;
        for (a, n) in [(0, 2), (2, 3)] {
            let (cc, rj, rcc, rrj, ncc, nrj) = (
                split(c.as_tensor(), a, n),
                split(r.as_tensor(), a, n),
                split(&rc, a, n),
                split(&rr, a, n),
                split(&nc, a, n),
                split(&nr, a, n),
            );
            let part = preference_loss(
                k,
                beta,
                &PairLogps {
                    chosen: &cc,
                    rejected: &rj,
                    ref_chosen: k.uses_reference().then_some(&rcc),
                    ref_rejected: k.uses_reference().then_some(&rrj),
                    chosen_tokens: &ncc,
                    rejected_tokens: &nrj,
                },
                p,
                n_chosen,
            )
            .unwrap();
            total += part.loss.to_scalar::<f64>().unwrap();
        }
        close(
            total,
            case["loss"].as_f64().unwrap(),
            &format!("{what} in two micro-batches"),
        );
    }
}
