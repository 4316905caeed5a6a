//! The `Objective` trait every crafting objective implements, and what one is built from.

use crate::formats::records::{InfluenceConfig, RolloutConfig};
use crate::objectives::swaps::{Swap, Verified};
use crate::encode::Encoded;
use crate::victims::model::Victim;
use anyhow::Result;
use tch::Tensor;

/// A crafting objective over a poison set; lower is better.
pub trait Objective {
    /// The objective and its gradient with respect to every poison token embedding,
    /// [N, Tp, D] (zero at padding): what rank-candidates' first-order scores use.
    fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)>;
    /// `objective_and_grad` and the word scores [N, Tp, V] a word's Taylor score adds to
    /// the embedding term, for a language model or a trained table
    /// (`objectives::bilevel::BiLevel::objective_grad_and_word_scores`; None otherwise).
    fn objective_grad_and_word_scores(&self, poisons: &[Encoded]) -> Result<(f64, Tensor, Option<Tensor>)> {
        let (value, grad) = self.objective_and_grad(poisons)?;
        Ok((value, grad, None))
    }
    /// The objective's exact value for a poison set (what verification compares).
    fn value(&self, poisons: &[Encoded]) -> Result<f64>;
    /// Each poison's own term when the objective is a sum of them (hardness, influence), so
    /// poisons can be chosen one by one; None when poisons interact (bi-level).
    fn terms(&self, _poisons: &[Encoded]) -> Option<Vec<f64>> {
        None
    }
    /// Exact verification of candidate swaps: the objective before and after,
    /// and the accepted swaps with their exact individual changes; never worse than before.
    fn verify(&self, poisons: &[Encoded], candidates: &[Swap]) -> Result<Verified>;
    /// A log line for an objective value over `poisons` poisons.
    fn describe(&self, value: f64, poisons: usize) -> String;
}

/// What an objective may be built from: the attacked victim, the hardness ensemble's
/// extra victims, the clean training data, D_adv, the target class and the unrolling.
pub struct ObjectiveInputs<'a> {
    pub victim: &'a Victim,
    pub ensemble: &'a [Victim],
    pub clean: &'a [Encoded],
    pub adv: &'a [Encoded],
    pub target: usize,
    pub rollout: RolloutConfig,
    /// The influence objective's settings (None: the defaults).
    pub influence: Option<InfluenceConfig>,
    /// The trigger's token ids (the contrastive influence objective removes them from D_adv).
    pub trigger: &'a [i64],
    /// A folder where the influence objective keeps its solved v (`influence::Influence::new`).
    pub cache: Option<&'a str>,
    /// Threads for the bi-level objective's exact checks (`Objective::verify`); every
    /// value is the same bits whatever it is.
    pub workers: usize,
}
