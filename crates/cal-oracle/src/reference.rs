//! The offline reference oracle: the first step of the response whose result is not a
//! value of the reference solution.
//!
//! Values = every number written in the reference worked solution (its `<<a*b=c>>`
//! notes carry all intermediate results) and in the question. A step is an arithmetic
//! claim (`a op b = c`); its result is `c`. Unlike the calculator, this catches a
//! correct computation on a wrong quantity ("12 * 3 = 36" where the problem needed
//! 12 * 4), at the price of flagging a valid alternative route through values the
//! reference does not write. A response without claims is checked number by number,
//! sentence by sentence.
//!
//! ```
//! use cal_oracle::reference::check;
//! use cal_oracle::Verdict;
//! let question = "Tom has 12 boxes of 4 pens. He gives away 5 pens. How many are left?";
//! let reference = "12 * 4 = <<12*4=48>>48 pens.\n48 - 5 = <<48-5=43>>43\n#### 43";
//! let v = check(question, reference, "12 * 3 = 36 pens. 36 - 5 = 31.\n#### 31");
//! assert!(matches!(v, Verdict::Segment { ref text, .. } if text == "12 * 3 = 36"));
//! assert_eq!(check(question, reference, "12 * 4 = 48, 48 - 5 = 43.\n#### 43"), Verdict::NoError);
//! ```

use crate::arith::{claims, numbers, same_value};
use crate::{Oracle, OracleOutcome, OracleRequest, Verdict};
use std::time::Instant;

#[derive(Debug, Clone, Copy, Default)]
pub struct ReferenceOracle;

/// The verdict on `response`, synchronously.
pub fn check(question: &str, reference: &str, response: &str) -> Verdict {
    let known: Vec<f64> = numbers(reference)
        .into_iter()
        .chain(numbers(question))
        .map(|(v, _)| v)
        .collect();
    let is_known = |v: f64| known.iter().any(|k| same_value(*k, v));
    let segment = |r: std::ops::Range<usize>| Verdict::Segment {
        text: response[r.clone()].to_string(),
        range: Some(r),
    };
    let steps = claims(response);
    if !steps.is_empty() {
        return match steps.into_iter().find(|c| !c.holds || !is_known(c.rhs)) {
            Some(c) => segment(c.range),
            None => Verdict::NoError,
        };
    }
    // No arithmetic written out: the sentence holding the first unknown number.
    match numbers(response).into_iter().find(|(v, _)| !is_known(*v)) {
        Some((_, r)) => {
            let start = response[..r.start]
                .rfind(['.', '\n', '!', '?'])
                .map_or(0, |i| i + 1);
            let end = response[r.end..]
                .find(['\n', '!', '?'])
                .map_or(response.len(), |i| r.end + i);
            let end = response[r.end..end]
                .find(". ")
                .map_or(end, |i| r.end + i + 1);
            let s = start + (response[start..end].len() - response[start..end].trim_start().len());
            let e = s + response[s..end].trim().len();
            segment(s..e)
        }
        None => Verdict::NoError,
    }
}

#[async_trait::async_trait]
impl Oracle for ReferenceOracle {
    fn provider(&self) -> &str {
        "reference"
    }

    fn model(&self) -> &str {
        "reference"
    }

    async fn first_error(&self, req: &OracleRequest) -> OracleOutcome {
        let t0 = Instant::now();
        crate::offline_reply(check(&req.question, &req.reference, &req.response), t0)
    }
}
