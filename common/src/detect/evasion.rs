//! Evasion of the word-embedding detector (`glove-trigger-word`): crafting under a budget
//! that keeps every poison at or below the detector's threshold at a chosen false positive
//! rate. The detector flags an example when its closest word to a trigger word is closer
//! than the threshold, so a poison passes exactly when none of its words is: the budget is
//! a ban on the words closer than that (init-poisons and rank-candidates `--evade-fpr`).

use crate::data::{self, DataManifest};
use crate::tokenizer::Vocab;
use anyhow::{bail, Result};
use std::collections::HashSet;
use tch::{Kind, Tensor};

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
    let train = data::read_set(dir, data::TRAIN, false)?;
    let ids: Vec<Vec<i64>> = train.iter().map(|e| vocab.encode(&e.text)).collect();
    let mut scores: Vec<f64> = super::embedding::glove_scores(table, vocab, &ids, &trigger).into_iter().map(|s| s.1).collect();
    scores.sort_by(|a, b| b.total_cmp(a));
    let k = ((fpr_percent / 100.0 * scores.len() as f64) + 1e-9).floor() as usize;
    let threshold = scores[k.min(scores.len() - 1)];
    let banned = tch::no_grad(|| {
        let t = table.to_kind(Kind::Double);
        let unit = &t / t.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
        let trig = unit.index_select(0, &Tensor::from_slice(&trigger));
        let closest = unit.matmul(&trig.tr()).amax([-1], false);
        let closest: Vec<f64> = Vec::try_from(closest).expect("f64 cosines");
        closest.into_iter().enumerate().filter(|(_, c)| *c > threshold).map(|(i, _)| i as i64).collect()
    });
    Ok(Budget { threshold, banned })
}
