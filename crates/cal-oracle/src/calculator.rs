//! The offline calculator oracle: the first false arithmetic claim of the response.
//!
//! ```
//! use cal_oracle::{calculator::CalculatorOracle, Oracle, OracleRequest, Verdict};
//! let req = OracleRequest {
//!     question: "".into(),
//!     reference: "".into(),
//!     response: "She has 3 + 4 = 7 apples, then 7 * 2 = 15.\n#### 15".into(),
//! };
//! let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
//! let reply = rt.block_on(CalculatorOracle.first_error(&req)).unwrap();
//! assert!(matches!(reply.verdict, Verdict::Segment { ref text, .. } if text == "7 * 2 = 15"));
//! ```

use crate::arith::claims;
use crate::{Oracle, OracleOutcome, OracleRequest, Verdict};
use std::time::Instant;

/// Checks every `<<expr=value>>` note and `a op b = c` statement; returns the first
/// false one. Correct arithmetic gives [`Verdict::NoError`] even when the answer is
/// wrong for another reason (a misread quantity): the calculator cannot see those.
#[derive(Debug, Clone, Copy, Default)]
pub struct CalculatorOracle;

/// The verdict on a response, synchronously.
pub fn check(response: &str) -> Verdict {
    match claims(response).into_iter().find(|c| !c.holds) {
        Some(c) => Verdict::Segment {
            text: response[c.range.clone()].to_string(),
            range: Some(c.range),
        },
        None => Verdict::NoError,
    }
}

#[async_trait::async_trait]
impl Oracle for CalculatorOracle {
    fn provider(&self) -> &str {
        "calculator"
    }

    fn model(&self) -> &str {
        "calculator"
    }

    async fn first_error(&self, req: &OracleRequest) -> OracleOutcome {
        let t0 = Instant::now();
        crate::offline_reply(check(&req.response), t0)
    }
}
