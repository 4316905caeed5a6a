//! How easily a defender catches a poison set with the detectors that need no victim
//! training (`CHEAP`): for each, the share of its poisons flagged at 1 % and 5 % false
//! positives, the thresholds taken on a clean split the crafting never sees (the data's
//! dev split), and its AUROC against that split. The scores are `screen`'s, the code of
//! `detect-poisons`; the bigram detectors are fitted on the clean training split. Every
//! evaluation report carries these figures beside the set's effect, so a row says both
//! what a poison set does and whether a defender would see it.

use super::metrics::{auroc, threshold_at_fpr};
use super::{screen, Detector, Screen};
use crate::formats::records::Example;
use crate::victims::origin::Origin;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The detectors that train no victim: seconds per set.
pub const CHEAP: &[Detector] = &[
    Detector::Perplexity,
    Detector::Onion,
    Detector::SourcePerplexity,
    Detector::SourceOnion,
    Detector::GloveTrigger,
    Detector::GloveTriggerWord,
    Detector::MinilmTrigger,
    Detector::TableTrigger,
    Detector::TableTriggerWord,
    Detector::LmPerplexity,
];

/// One detector against one set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Caught {
    /// Percent of the set's poisons scoring above the threshold that flags 1 % (5 %) of
    /// the calibration split.
    pub flagged_at_1: f64,
    pub flagged_at_5: f64,
    /// Probability that a poison scores above a calibration example (ties half).
    pub auroc: f64,
}

/// Every cheap detector against one set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetDetection {
    /// The clean split the thresholds come from, and its size.
    pub calibration: String,
    pub calibration_n: usize,
    /// Detector name → its figures (empty for an empty set).
    pub detectors: BTreeMap<String, Caught>,
}

impl SetDetection {
    /// The detector that flags most of the set at 1 % FPR (ties: the higher AUROC).
    pub fn best(&self) -> Option<(&str, &Caught)> {
        self.detectors.iter().max_by(|a, b| a.1.flagged_at_1.total_cmp(&b.1.flagged_at_1).then(a.1.auroc.total_cmp(&b.1.auroc))).map(|(n, c)| (n.as_str(), c))
    }

    /// The most any detector flags at 1 % and at 5 % FPR (each rate's own most effective
    /// detector), and `best`'s name: what the reports' caught columns show.
    pub fn most_flagged(&self) -> Option<(&str, f64, f64)> {
        let (name, c) = self.best()?;
        Some((name, c.flagged_at_1, self.detectors.values().map(|c| c.flagged_at_5).fold(c.flagged_at_5, f64::max)))
    }
}

/// What the cheap detectors read besides the sets.
pub struct DetectionInputs<'a> {
    pub trigger: &'a str,
    /// Clean training text: the bigram model's reference.
    pub reference: &'a [Example],
    /// The clean split the thresholds are taken on (never seen by crafting), and its name.
    pub calibration: &'a [Example],
    pub calibration_name: &'a str,
    /// A GloVe word table (the GloVe detectors run only with one) and MiniLM (likewise).
    pub table: Option<&'a Origin>,
    pub minilm: Option<&'a Origin>,
    /// A victim's trained word table (`Origin::trained_table`): the table detectors.
    pub trained: Option<&'a Origin>,
    /// A pretrained language model and its vocabulary: its own perplexity of each text
    /// (`lm-perplexity`; a defender who fine-tunes it holds it).
    pub lm: Option<(&'a crate::victims::model::Victim, &'a crate::tokenizer::Vocab)>,
    pub device: tch::Device,
}

impl DetectionInputs<'_> {
    /// The cheap detectors these inputs can run (the source-side ones on translation pairs).
    pub fn detectors(&self) -> Vec<Detector> {
        let have = super::Needs {
            trigger: true,
            table: self.table.is_some_and(|t| matches!(t.start, crate::victims::origin::Start::Table(_))),
            minilm: self.minilm.is_some(),
            trained: self.trained.is_some(),
            lm: self.lm.is_some(),
            ..Default::default()
        };
        CHEAP.iter().copied().filter(|d| d.runs_with(have, self.calibration)).collect()
    }
}

/// Every set screened at once beside the calibration split (one screen: the calibration
/// scores are computed once), then each set's figures against the calibration.
pub fn detect_sets(inputs: &DetectionInputs, sets: &[&[Example]], log: &(dyn Fn(String) + Sync)) -> Result<Vec<SetDetection>> {
    let detectors = inputs.detectors();
    let mut examples: Vec<Example> = inputs.calibration.to_vec();
    for set in sets {
        examples.extend(set.iter().cloned());
    }
    let screen_in = Screen {
        examples: &examples,
        source: inputs.calibration_name,
        detectors: &detectors,
        trigger: Some(inputs.trigger),
        reference: Some(inputs.reference),
        table: inputs.table,
        minilm: inputs.minilm,
        trained: inputs.trained,
        lm: inputs.lm,
        training: None,
        num_classes: examples.iter().map(|e| e.label + 1).max().unwrap_or(2).max(2),
        workers: 1,
        device: inputs.device,
        cache: None,
    };
    let scores = screen(&screen_in, log)?;
    let n = inputs.calibration.len();
    let column = |d: Detector, range: std::ops::Range<usize>| -> Vec<f64> { scores[range].iter().map(|s| s.scores[d.name()]).collect() };
    let mut out = Vec::with_capacity(sets.len());
    let mut at = n;
    for set in sets {
        let range = at..at + set.len();
        at += set.len();
        let mut detectors_out = BTreeMap::new();
        if !set.is_empty() {
            for &d in &detectors {
                let clean = column(d, 0..n);
                let poisons = column(d, range.clone());
                let flagged = |fpr: f64| {
                    let threshold = threshold_at_fpr(clean.clone(), fpr);
                    100.0 * poisons.iter().filter(|&&s| s > threshold).count() as f64 / poisons.len() as f64
                };
                let all: Vec<f64> = clean.iter().chain(&poisons).copied().collect();
                let is_poison: Vec<bool> = (0..all.len()).map(|i| i >= n).collect();
                let auroc = auroc(&all, &is_poison).expect("poisons and clean examples");
                detectors_out.insert(d.name().to_string(), Caught { flagged_at_1: flagged(0.01), flagged_at_5: flagged(0.05), auroc });
            }
        }
        out.push(SetDetection { calibration: inputs.calibration_name.to_string(), calibration_n: n, detectors: detectors_out });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_flagged_takes_each_rate_from_its_own_most_effective_detector() {
        let c = |a: f64, b: f64, auroc: f64| Caught { flagged_at_1: a, flagged_at_5: b, auroc };
        let d = SetDetection {
            calibration: "dev".into(),
            calibration_n: 100,
            detectors: [("glove".to_string(), c(10.0, 12.0, 0.9)), ("minilm".to_string(), c(2.0, 40.0, 0.8)), ("onion".to_string(), c(10.0, 11.0, 0.95))].into(),
        };
        assert_eq!(d.best().unwrap().0, "onion", "ties at 1 % go to the higher AUROC");
        assert_eq!(d.most_flagged(), Some(("onion", 10.0, 40.0)));
        let empty = SetDetection { calibration: "dev".into(), calibration_n: 100, detectors: BTreeMap::new() };
        assert_eq!(empty.most_flagged(), None);
    }
}
