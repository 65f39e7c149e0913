//! The estimators of `cal_core::advantage` against fixtures written by an independent
//! numpy transcription of verl's formulas (`scripts/make_advantage_fixtures.py`).

use cal_core::advantage::{gae, masked_whiten, reinforce_plus_plus, TokenMatrix};
use serde_json::Value;

fn matrix(v: &Value) -> TokenMatrix {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    TokenMatrix::from_rows(&rows)
}

fn assert_close(got: &TokenMatrix, want: &TokenMatrix, what: &str, case: usize) {
    assert_eq!((got.rows, got.cols), (want.rows, want.cols), "{what} shape");
    for (k, (a, b)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(
            (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
            "case {case} {what}[{k}]: {a} vs numpy {b}"
        );
    }
}

#[test]
fn estimators_match_the_numpy_reference() {
    let text = include_str!("fixtures/advantage.json");
    let doc: Value = serde_json::from_str(text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for (i, c) in cases.iter().enumerate() {
        let (gamma, lambda) = (c["gamma"].as_f64().unwrap(), c["lambda"].as_f64().unwrap());
        let rewards = matrix(&c["rewards"]);
        let values = matrix(&c["values"]);
        let mask: Vec<bool> = serde_json::from_value::<Vec<Vec<bool>>>(c["mask"].clone())
            .unwrap()
            .concat();
        let (adv, ret) = gae(&rewards, &values, &mask, gamma, lambda);
        assert_close(&adv, &matrix(&c["gae_advantages"]), "gae", i);
        assert_close(&ret, &matrix(&c["gae_returns"]), "returns", i);
        assert_close(
            &masked_whiten(&adv, &mask),
            &matrix(&c["gae_whitened"]),
            "whitened",
            i,
        );
        // only for right-padded rows (see the script)
        if !c["reinforce_pp"].is_null() {
            let rpp = reinforce_plus_plus(&rewards, &mask, gamma);
            assert_close(&rpp, &matrix(&c["reinforce_pp"]), "reinforce++", i);
        }
    }
}
