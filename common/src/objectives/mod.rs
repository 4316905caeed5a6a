//! The crafting objective seam: what rollout-grad differentiates and verify-candidates
//! checks exactly. Every objective (the seed's bi-level one in `attack`, hardness in
//! `hardness`, the implicit one in `influence`) implements `Objective`, and `build` is the one place that turns an
//! `ObjectiveKind` into one, so a new objective is a new file, a variant of
//! `ObjectiveKind` and an arm here.

pub mod swaps;
pub mod bilevel;
pub mod hardness;
pub mod influence;

use crate::objectives::bilevel::{verify, BiLevel};
use crate::objectives::swaps::{Swap, Verified};
use crate::objectives::hardness::Hardness;
use crate::objectives::influence::{Influence, InfluenceConfig};
use crate::victims::model::Victim;
use crate::formats::records::{ObjectiveKind, RolloutConfig};
use crate::train::Encoded;
use anyhow::{bail, Result};
use tch::Tensor;

/// A crafting objective over a poison set; lower is better.
pub trait Objective {
    /// The objective and its gradient with respect to every poison token embedding,
    /// [N, Tp, D] (zero at padding): what rank-candidates' first-order scores use.
    fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)>;
    /// `objective_and_grad` and, for a language-model victim, the target scores [N, Tp, V]
    /// of `objectives::bilevel::BiLevel::objective_grad_and_target_scores` (None for a classifier).
    fn objective_grad_and_target_scores(&self, poisons: &[Encoded]) -> Result<(f64, Tensor, Option<Tensor>)> {
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
    /// Exact verification of candidate swaps (SPEC step 5): the objective before and after,
    /// and the accepted swaps with their exact individual changes; never worse than before.
    fn verify(&self, poisons: &[Encoded], candidates: &[Swap]) -> Result<Verified>;
    /// A log line for an objective value over `poisons` poisons.
    fn describe(&self, value: f64, poisons: usize) -> String;
}

impl Objective for BiLevel<'_> {
    fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)> {
        BiLevel::objective_and_grad(self, poisons)
    }
    fn objective_grad_and_target_scores(&self, poisons: &[Encoded]) -> Result<(f64, Tensor, Option<Tensor>)> {
        BiLevel::objective_grad_and_target_scores(self, poisons, self.victim.config.language_model())
    }
    fn value(&self, poisons: &[Encoded]) -> Result<f64> {
        Ok(self.objective(poisons))
    }
    fn verify(&self, poisons: &[Encoded], candidates: &[Swap]) -> Result<Verified> {
        verify(self, poisons, candidates)
    }
    fn describe(&self, value: f64, poisons: usize) -> String {
        format!("L_adv {value:.5} over {} D_adv inputs, {poisons} poisons, k={} R={} η={}", self.adv_count(), self.cfg.steps, self.cfg.rollouts, self.cfg.eta)
    }
}

impl Objective for Hardness<'_> {
    fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)> {
        Hardness::objective_and_grad(self, poisons)
    }
    fn value(&self, poisons: &[Encoded]) -> Result<f64> {
        Ok(self.objective(poisons))
    }
    fn terms(&self, poisons: &[Encoded]) -> Option<Vec<f64>> {
        Some(self.margins(poisons))
    }
    fn verify(&self, poisons: &[Encoded], candidates: &[Swap]) -> Result<Verified> {
        Hardness::verify(self, poisons, candidates)
    }
    fn describe(&self, value: f64, poisons: usize) -> String {
        format!("hardness (mean target margin) {value:.5}, {poisons} poisons, {} victims", self.victims())
    }
}

impl Objective for Influence<'_> {
    fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)> {
        Influence::objective_and_grad(self, poisons)
    }
    fn value(&self, poisons: &[Encoded]) -> Result<f64> {
        Ok(Influence::value(self, poisons))
    }
    fn terms(&self, poisons: &[Encoded]) -> Option<Vec<f64>> {
        Some(self.scores(poisons))
    }
    fn verify(&self, poisons: &[Encoded], candidates: &[Swap]) -> Result<Verified> {
        Influence::verify(self, poisons, candidates)
    }
    fn describe(&self, value: f64, poisons: usize) -> String {
        Influence::describe(self, value, poisons)
    }
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
}

/// The objective of `kind` (used by every binary that crafts or verifies).
pub fn build<'a>(kind: ObjectiveKind, inputs: ObjectiveInputs<'a>) -> Result<Box<dyn Objective + 'a>> {
    if inputs.victim.config.language_model() && kind != ObjectiveKind::Bilevel {
        bail!("--objective {kind:?} scores a classifier's target class; a language-model victim is attacked with --objective bilevel (L_adv = next-token loss of D_adv's continuations)");
    }
    Ok(match kind {
        ObjectiveKind::Bilevel => {
            if !inputs.ensemble.is_empty() {
                bail!("--ensemble is for --objective hardness; the bi-level objective unrolls one victim");
            }
            Box::new(BiLevel::new(inputs.victim, inputs.clean, inputs.adv, inputs.rollout)?)
        }
        ObjectiveKind::Hardness => {
            let models = std::iter::once(inputs.victim).chain(inputs.ensemble).collect();
            Box::new(Hardness::new(models, inputs.target)?)
        }
        ObjectiveKind::Influence => {
            if !inputs.ensemble.is_empty() {
                bail!("--ensemble is for --objective hardness; the influence objective differentiates one victim");
            }
            let cfg = inputs.influence.unwrap_or_default();
            Box::new(Influence::new(inputs.victim, inputs.clean, inputs.adv, inputs.trigger, &inputs.rollout, cfg, inputs.cache)?)
        }
    })
}
