//! The crafting objective seam: what rollout-grad differentiates and verify-candidates
//! checks exactly. Every objective (the seed's bi-level one in `bilevel`, hardness in
//! `hardness`, the implicit one in `influence`) implements `Objective` (`objective`) in its own
//! file, and `build` is the one place that turns an `ObjectiveKind` into one, so a new
//! objective is a new file, a variant of `ObjectiveKind` and an arm here. `swaps` holds what
//! they share to turn candidate swaps into a better set.

pub mod objective;
pub mod swaps;
pub mod bilevel;
pub mod hardness;
pub mod influence;

pub use crate::objectives::objective::{Objective, ObjectiveInputs};
use crate::objectives::bilevel::BiLevel;
use crate::objectives::hardness::Hardness;
use crate::objectives::influence::Influence;
use crate::formats::records::ObjectiveKind;
use anyhow::{bail, Result};

/// The objective of `kind` (used by every binary that crafts or verifies).
pub fn build<'a>(kind: ObjectiveKind, inputs: ObjectiveInputs<'a>) -> Result<Box<dyn Objective + 'a>> {
    crate::tasks::rules::of_victim(&inputs.victim.config).check_objective(kind)?;
    Ok(match kind {
        ObjectiveKind::Bilevel => {
            if !inputs.ensemble.is_empty() {
                bail!("--ensemble is for --objective hardness; the bi-level objective unrolls one victim");
            }
            let mut objective = BiLevel::new(inputs.victim, inputs.clean, inputs.adv, inputs.rollout)?;
            objective.workers = inputs.workers;
            Box::new(objective)
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
