//! Evasion of the word-embedding detector (`glove-trigger-word`): crafting under a budget
//! that keeps every poison at or below the detector's threshold at a chosen false positive
//! rate. The detector flags an example when its closest word to a trigger word is closer
//! than the threshold, so a poison passes exactly when none of its words is: the budget is
//! a ban on the words closer than that (init-poisons and rank-candidates `--evade-fpr`).

use crate::data::{self, DataManifest};
use crate::tokenizer::Vocab;
use anyhow::{bail, Result};
use std::collections::HashSet;
use tch::Tensor;

/// The evasion budget: the threshold and the words above it.
pub struct Budget {
    /// The glove-trigger-word score of the clean training split at the chosen FPR: a
    /// defender flagging scores above it flags that share of the clean examples.
    pub threshold: f64,
    /// Every vocabulary word whose cosine to some trigger word exceeds the threshold.
    pub banned: HashSet<i64>,
}

/// The budget at `fpr_percent` false positives, measured on `dir`'s clean training split
/// with the victim's word table (the detector's table for GloVe victims).
pub fn glove_budget(table: &Tensor, vocab: &Vocab, manifest: &DataManifest, dir: &str, fpr_percent: f64) -> Result<Budget> {
    if vocab.is_wordpiece() {
        bail!("--evade-fpr budgets the GloVe word detector; a WordPiece victim has no word table to measure it with");
    }
    if !(0.0..100.0).contains(&fpr_percent) {
        bail!("--evade-fpr {fpr_percent}: a percentage from 0 to below 100");
    }
    let trigger = vocab.trigger_ids(&manifest.trigger.phrase)?;
    let closest = super::embedding::closest_to_trigger(table, &trigger);
    let train = data::read_set(dir, data::TRAIN, false)?;
    let scores: Vec<f64> = train.iter().map(|e| super::embedding::closest_word(&closest, vocab, &vocab.encode(&e.text)).unwrap_or(-1.0)).collect();
    let threshold = super::metrics::threshold_at_fpr(scores, fpr_percent / 100.0);
    let banned = closest.iter().enumerate().filter(|(_, c)| **c > threshold).map(|(i, _)| i as i64).collect();
    Ok(Budget { threshold, banned })
}
