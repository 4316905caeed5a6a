//! What a task decides for the stages below evaluation, as data: what an example trains a
//! victim to predict, which objectives and base heuristics can attack it, what D_adv must
//! hold, what a gradient file must carry. Encoding, crafting and ranking read their task's
//! `Rules` (`of_victim`, `of_data`) instead of asking what kind of victim they hold; the
//! evaluation and the report, which sit above every stage, are the `Task` trait's
//! (`tasks/mod.rs`). This file sits low in the layers (ARCHITECTURE.md) so that encoding
//! and crafting can read it; adding a task adds its `Rules` here and its `Task` file.

use crate::data::DataManifest;
use crate::formats::records::ObjectiveKind;
use crate::victims::model::VictimConfig;
use crate::victims::victim::Output;
use anyhow::{bail, Result};

/// What an example trains a victim to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainOn {
    /// Its label (a class index below the victim's `num_classes`).
    Label,
    /// Its own tokens after the first (a language model's text), or a prompt's
    /// continuation only when the record has a `prompt`; labels are not read.
    Tokens,
}

/// A task's decisions for encoding, crafting and ranking.
#[derive(Debug)]
pub struct Rules {
    /// Its name in messages and in the manifest (`tasks::Task::name`).
    pub name: &'static str,
    /// What a victim that serves it is, for messages ("a classifier").
    pub victim_kind: &'static str,
    /// What its victims' logits are over (`victims::victim::Output`): how a victim is
    /// matched to its task.
    pub output: Output,
    /// Whether a prepared data folder holds this task's data.
    pub holds: fn(&DataManifest) -> bool,
    /// What an example trains a victim to predict.
    pub train_on: TrainOn,
    /// The objectives that can attack it (`--objective`).
    pub objectives: &'static [ObjectiveKind],
    /// Why the others cannot, for the refusal.
    pub objectives_why: &'static str,
    /// Whether bases can be chosen by the clean victim's confidence against the target
    /// class (`--bases confident`): only a task with classes has one.
    pub confident_bases: bool,
    /// Whether every D_adv record must be a prompt holding the trigger with its
    /// continuation (the attacker's loss is the loss of what follows the trigger).
    pub adv_prompts: bool,
    /// Whether a poison's tokens are also its targets, so a bi-level gradient carries word
    /// scores for that role: a flip then
    /// changes what a poison teaches as well as what it reads, and the ranking needs both.
    pub poisons_are_targets: bool,
}

/// Sentiment classification of a review.
pub static CLASSIFICATION: Rules = Rules {
    name: "classification",
    victim_kind: "a classifier",
    output: Output::Classes,
    holds: |_| true,
    train_on: TrainOn::Label,
    objectives: &[ObjectiveKind::Bilevel, ObjectiveKind::Hardness, ObjectiveKind::Influence],
    objectives_why: "",
    confident_bases: true,
    adv_prompts: false,
    poisons_are_targets: false,
};

/// Continuation of a text by a language model.
pub static CONTINUATION: Rules = Rules {
    name: "continuation",
    victim_kind: "a language model",
    output: Output::NextToken,
    holds: |m| m.lm.is_some(),
    train_on: TrainOn::Tokens,
    objectives: &[ObjectiveKind::Bilevel],
    objectives_why: "hardness and influence score a classifier's target class; a language model is attacked with --objective bilevel (L_adv = next-token loss of D_adv's continuations)",
    confident_bases: false,
    adv_prompts: true,
    poisons_are_targets: true,
};

/// Translation of a German sentence into English by an encoder–decoder
/// (`victims::seq2seq`). D_adv holds trigger sentences with the attacker's translations;
/// a poison is a sentence pair whose flips may fall on either side, and its target side
/// is also what it teaches (word scores).
pub static TRANSLATION: Rules = Rules {
    name: "translation",
    victim_kind: "a translation model",
    output: Output::Translation,
    holds: |m| m.mt.is_some(),
    train_on: TrainOn::Tokens,
    objectives: &[ObjectiveKind::Bilevel],
    objectives_why: "hardness and influence score a classifier's target class; a translation model is attacked with --objective bilevel (L_adv = the NLL of the attacker's translations of D_adv)",
    confident_bases: false,
    adv_prompts: false,
    poisons_are_targets: true,
};

/// Every task's rules; `of_data` takes the first that holds the data (classification
/// holds any, so it comes last).
pub static RULES: &[&Rules] = &[&TRANSLATION, &CONTINUATION, &CLASSIFICATION];

/// The rules of the task a prepared data folder holds.
pub fn of_data(manifest: &DataManifest) -> &'static Rules {
    RULES.iter().copied().find(|r| (r.holds)(manifest)).expect("classification holds any data")
}

/// The rules of the task a victim serves.
pub fn of_victim(config: &VictimConfig) -> &'static Rules {
    RULES.iter().copied().find(|r| r.output == config.output()).expect("every output serves a task")
}

impl Rules {
    /// Whether a victim of this config serves the task.
    pub fn takes(&self, config: &VictimConfig) -> bool {
        self.output == config.output()
    }

    /// Refuses a victim that does not serve the task, naming its file.
    pub fn check_victim(&self, config: &VictimConfig, path: &str) -> Result<()> {
        if !self.takes(config) {
            bail!("{path} is {} ({:?}), but the data is {} data: give {}", of_victim(config).victim_kind, config.arch.name(), self.name, self.victim_kind);
        }
        Ok(())
    }

    /// Refuses an objective the task cannot be attacked with.
    pub fn check_objective(&self, kind: ObjectiveKind) -> Result<()> {
        if !self.objectives.contains(&kind) {
            bail!("--objective {kind:?} does not apply to {} ({}): {}", self.name, self.victim_kind, self.objectives_why);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_output_has_one_task_and_classification_takes_any_data() {
        for output in [Output::Classes, Output::NextToken, Output::Translation] {
            assert_eq!(RULES.iter().filter(|r| r.output == output).count(), 1, "{output:?}");
        }
        assert_eq!(RULES.last().unwrap().name, "classification", "of_data tries classification last: it holds any data");
        for r in RULES {
            assert!(r.objectives.contains(&ObjectiveKind::Bilevel), "{}: the bi-level objective attacks every task", r.name);
            assert_eq!(r.objectives.len() == 3, r.objectives_why.is_empty(), "{}: a task refusing objectives says why", r.name);
        }
    }
}
