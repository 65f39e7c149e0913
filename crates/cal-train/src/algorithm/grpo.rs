//! GRPO and the other critic-free estimators: the step's advantages come from the
//! rollouts alone.
//!
//! - `grpo`, `dr-grpo`, `rloo`: a group advantage per rollout, spread over its tokens,
//!   the credit mode overriding the tokens of an incorrect rollout with a span
//!   ([`crate::score::credit`]);
//! - `reinforce++`: discounted returns of the token rewards (so CAL's span rewards
//!   enter as rewards), whitened over the batch.

use super::{advantage_matrix, Algorithm, Scored};
use crate::config::RunConfig;
use crate::optimize::{Loss, MicroBatch};
use crate::policy::Policy;
use crate::score;
use anyhow::{bail, Result};
use cal_core::advantage::discounted_returns;
use cal_core::credit::{AdvantageMatrix, Estimator};

pub struct Grpo;

impl Loss for Grpo {}

impl Algorithm for Grpo {
    fn advantages(
        &mut self,
        s: &Scored,
        _policy: &Policy,
        _micro: &mut [MicroBatch],
        cfg: &RunConfig,
    ) -> Result<AdvantageMatrix> {
        let c = &cfg.credit;
        match c.group {
            e if e.is_group() => score::credit(s.rollouts, s.graded, s.spans, c),
            Estimator::ReinforcePlusPlus => {
                let (rewards, mask, shaped, fallbacks) =
                    score::token_rewards(s.rollouts, s.graded, s.spans, c);
                let adv = s.whiten(&discounted_returns(&rewards, &mask, c.gamma), &mask)?;
                Ok(advantage_matrix(&adv, &mask, shaped, fallbacks))
            }
            e => bail!(
                "advantage estimator {} needs a critic: --algorithm ppo",
                e.name()
            ),
        }
    }
}
