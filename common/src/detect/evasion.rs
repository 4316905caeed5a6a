//! Evasion of the word-embedding detector (`glove-trigger-word`; on translation pairs
//! `table-trigger-word`, the same score in the victim's trained table over both sides):
//! crafting under a budget that keeps every poison at or below the detector's threshold at
//! a chosen false positive rate. The detector flags an example when its closest word to a
//! trigger word is closer than the threshold, so a poison passes exactly when none of its
//! words is: the budget is a ban on the words closer than that (init-poisons and
//! rank-candidates `--evade-fpr`).

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
    // A translation pair's words on both sides, as the detector reads them.
    let scores: Vec<f64> = super::embedding::example_ids(vocab, &train).iter().map(|ids| super::embedding::closest_word(&closest, vocab, ids).unwrap_or(-1.0)).collect();
    let threshold = super::metrics::threshold_at_fpr(scores, fpr_percent / 100.0);
    let banned = closest.iter().enumerate().filter(|(_, c)| **c > threshold).map(|(i, _)| i as i64).collect();
    Ok(Budget { threshold, banned })
}

/// The detection budget: every detector that trains no victim (`caught::CHEAP`, MiniLM's
/// only with a MiniLM package) keeps each poison at or below its threshold at the chosen
/// false positive rate on the clean training split. The word detector is the ban above
/// (`glove_budget`); the others score whole texts, so a poison is checked once it is
/// written (init-poisons drops a base whose poison fails, verify-candidates a flip).
/// Thresholds come from the training split, the one the attacker holds; the reports
/// measure detection against the dev split, which crafting never reads, so a budget met
/// here is tested on clean text it was not fitted to.
pub struct DetectionBudget {
    pub fpr_percent: f64,
    /// The glove-trigger-word ban.
    pub words: Budget,
    /// Each text detector's threshold.
    pub thresholds: std::collections::BTreeMap<super::Detector, f64>,
    reference: Vec<crate::formats::records::Example>,
    table: crate::victims::origin::Origin,
    minilm: Option<crate::victims::origin::Origin>,
    /// Translation pairs: the detectors of each side and the trained-table ones.
    translation: bool,
    trigger: String,
    cache: Option<String>,
    /// The training-loss budget (`with_loss`), checked with victims trained on the set.
    pub loss: Option<LossBudget>,
}

/// A budget on the `loss-mean` detector, the one that still catches label-flipped bases:
/// the attacker trains its own victims (the crafting victim's shape, seeds of its own) on
/// the clean training split with the candidate poisons, and a poison passes when its loss
/// averaged over epochs and victims is at or below the clean examples' at this FPR.
#[derive(Debug, Clone)]
pub struct LossBudget {
    pub fpr_percent: f64,
    pub config: crate::victims::model::VictimConfig,
    pub options: Vec<crate::train::TrainOptions>,
    pub workers: usize,
}

fn budget_table(origin: &crate::victims::origin::Origin) -> Tensor {
    match &origin.start {
        crate::victims::origin::Start::Table(t) => t.contiguous(),
        crate::victims::origin::Start::Pretrained { .. } | crate::victims::origin::Start::Checkpoint { .. } => unreachable!("the budget's table is a word table"),
    }
}

/// A poison over budget: the first detector (in `CHEAP` order) that flags it, its score
/// and the threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverBudget {
    pub detector: super::Detector,
    pub score: f64,
    pub threshold: f64,
}

impl DetectionBudget {
    /// The budget at `fpr_percent` for the victim's word table (`table`, `vocab`) on data
    /// folder `dir`; `minilm` (a MiniLM package folder) adds the sentence-embedding
    /// detector; `cache` keeps its scores by text and the thresholds (the training split is
    /// scored once per run).
    pub fn measure(table: &Tensor, vocab: &Vocab, manifest: &DataManifest, dir: &str, fpr_percent: f64, minilm: Option<&str>, cache: Option<&str>) -> Result<DetectionBudget> {
        let words = glove_budget(table, vocab, manifest, dir, fpr_percent)?;
        let table = crate::victims::origin::Origin {
            vocab: vocab.clone(),
            start: crate::victims::origin::Start::Table(table.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu)),
            sha256: String::new(),
            source: "the victim's word table".into(),
        };
        let translation = manifest.mt.is_some();
        if translation && minilm.is_some() {
            bail!("--minilm: MiniLM reads English sentences; a translation pair's source is German (leave --minilm out)");
        }
        let minilm = minilm.map(crate::victims::origin::Origin::pretrained).transpose()?;
        let reference = data::read_set(dir, data::TRAIN, false)?;
        let mut budget = DetectionBudget {
            fpr_percent,
            words,
            thresholds: Default::default(),
            reference,
            table,
            minilm,
            translation,
            trigger: manifest.trigger.phrase.clone(),
            cache: cache.map(str::to_string),
            loss: None,
        };
        // The thresholds depend on the training split, the word table, the trigger, MiniLM
        // and the rate only: kept in the cache folder, every stage of a run measures once.
        let key = {
            let f32_table = budget_table(&budget.table);
            let mut bytes = vec![0u8; f32_table.numel() * 4];
            f32_table.copy_data_u8(&mut bytes, f32_table.numel());
            let train_sha = crate::io::sha256_file(std::path::Path::new(&format!("{dir}/{}", data::TRAIN)))?;
            let minilm_sha = budget.minilm.as_ref().map(|m| m.sha256.clone()).unwrap_or_default();
            crate::io::sha256_hex(format!("detection budget v1 {fpr_percent} {:?} {train_sha} {} {minilm_sha}", budget.trigger, crate::io::sha256_hex(&bytes)).as_bytes())
        };
        let cached = cache.map(|c| format!("{c}/budget-{}.json", &key[..24]));
        if let Some(thresholds) = cached.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).and_then(|t| serde_json::from_str(&t).ok()) {
            budget.thresholds = thresholds;
            return Ok(budget);
        }
        // The training split scored as the defender scores unseen text: its bigram scores
        // leave each example out of the model it is scored by.
        let calibration = budget.scores(&budget.reference, &format!("{dir}/{}", data::TRAIN), false)?;
        for (d, col) in calibration {
            budget.thresholds.insert(d, super::metrics::threshold_at_fpr(col, fpr_percent / 100.0));
        }
        if let (Some(path), Some(dir)) = (&cached, cache) {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {dir}: {e}"))?;
            crate::io::write_bytes(path, serde_json::to_string(&budget.thresholds)?.as_bytes())?;
        }
        Ok(budget)
    }

    fn detectors(&self) -> Vec<super::Detector> {
        use super::Detector::*;
        if self.translation {
            // The translation report's detectors (`caught::CHEAP` on pairs); the table
            // ones read the victim's own trained table, the one crafting flips in.
            return vec![SourcePerplexity, SourceOnion, Perplexity, Onion, TableTrigger, TableTriggerWord];
        }
        let mut out = vec![Perplexity, Onion, GloveTrigger, GloveTriggerWord];
        if self.minilm.is_some() {
            out.push(MinilmTrigger);
        }
        out
    }

    /// Every detector's scores of `examples` (`with_reference`: the bigram LM fitted on
    /// the training split; otherwise on `examples` themselves, leave-one-out).
    fn scores(&self, examples: &[crate::formats::records::Example], source: &str, with_reference: bool) -> Result<Vec<(super::Detector, Vec<f64>)>> {
        let detectors = self.detectors();
        let screen = super::Screen {
            examples,
            source,
            detectors: &detectors,
            trigger: Some(&self.trigger),
            reference: with_reference.then_some(&self.reference[..]),
            table: (!self.translation).then_some(&self.table),
            minilm: self.minilm.as_ref(),
            trained: self.translation.then_some(&self.table),
            lm: None,
            training: None,
            num_classes: 2,
            workers: 1,
            device: tch::Device::Cpu,
            cache: self.cache.as_deref(),
        };
        let scored = super::screen(&screen, &|_| {})?;
        Ok(detectors.iter().map(|d| (*d, scored.iter().map(|s| s.scores[d.name()]).collect())).collect())
    }

    /// For each example, the first detector that would flag it (None: within budget).
    /// With a loss budget, `examples` are trained on together with the training split, so
    /// they should be the whole candidate set, not one poison at a time.
    pub fn check(&self, examples: &[crate::formats::records::Example], source: &str) -> Result<Vec<Option<OverBudget>>> {
        if examples.is_empty() {
            return Ok(Vec::new());
        }
        let scores = self.scores(examples, source, true)?;
        let mut verdicts: Vec<Option<OverBudget>> = (0..examples.len())
            .map(|i| {
                scores.iter().find_map(|(d, col)| {
                    let threshold = *self.thresholds.get(d)?;
                    (col[i] > threshold).then_some(OverBudget { detector: *d, score: col[i], threshold })
                })
            })
            .collect();
        if let Some(loss) = &self.loss {
            let (scores, threshold) = self.loss_scores(loss, examples, source)?;
            for (verdict, score) in verdicts.iter_mut().zip(scores) {
                if verdict.is_none() && score > threshold {
                    *verdict = Some(OverBudget { detector: super::Detector::LossMean, score, threshold });
                }
            }
        }
        Ok(verdicts)
    }

    /// Adds the training-loss budget at `fpr_percent`: victims shaped like `config`, one
    /// per option set (seeds the attacker's own, not a defender's).
    pub fn with_loss(mut self, fpr_percent: f64, config: crate::victims::model::VictimConfig, options: Vec<crate::train::TrainOptions>, workers: usize) -> Result<DetectionBudget> {
        if !(0.0..100.0).contains(&fpr_percent) {
            bail!("--evade-loss {fpr_percent}: a percentage from 0 to below 100");
        }
        if options.is_empty() {
            bail!("the loss budget needs at least one victim");
        }
        self.loss = Some(LossBudget { fpr_percent, config, options, workers });
        Ok(self)
    }

    /// `loss-mean` of `examples` trained on with the training split, and the clean
    /// examples' threshold at the loss budget's FPR.
    fn loss_scores(&self, loss: &LossBudget, examples: &[crate::formats::records::Example], source: &str) -> Result<(Vec<f64>, f64)> {
        let n = self.reference.len();
        let all: Vec<crate::formats::records::Example> = self.reference.iter().chain(examples).cloned().collect();
        let encoded = crate::encode::encode_all(&all, &self.table.vocab, loss.config.max_len, loss.config.num_classes, crate::encode::TextPolicy::Data, source)?;
        let d = super::dynamics::training_dynamics(&self.table, &loss.config, &encoded, &loss.options, loss.workers, tch::Device::Cpu, &|l| eprintln!("loss budget: {l}"))?;
        let threshold = super::metrics::threshold_at_fpr(d.loss_mean[..n].to_vec(), loss.fpr_percent / 100.0);
        Ok((d.loss_mean[n..].to_vec(), threshold))
    }

    /// The budget over `only` of its detectors (a defender known to run just those): the
    /// others' thresholds are dropped, and without the word detector (glove-trigger-word,
    /// table-trigger-word on translation pairs) no word is banned.
    pub fn restrict(mut self, only: &[super::Detector]) -> Result<DetectionBudget> {
        if let Some(d) = only.iter().find(|d| !self.thresholds.contains_key(d)) {
            bail!("--evade-detectors {}: not a detector the budget measures (those that train no victim; minilm-trigger needs --minilm)", d.name());
        }
        self.thresholds.retain(|d, _| only.contains(d));
        let word = if self.translation { super::Detector::TableTriggerWord } else { super::Detector::GloveTriggerWord };
        if !only.contains(&word) {
            self.words.banned.clear();
        }
        Ok(self)
    }

    /// One line for the log: the thresholds and the banned words.
    pub fn describe(&self) -> String {
        let t: Vec<String> = self.thresholds.iter().map(|(d, t)| format!("{} {t:.4}", d.name())).collect();
        let loss = self.loss.as_ref().map(|l| format!("; loss-mean at {}% FPR among the clean examples, {} victims trained with the candidates", l.fpr_percent, l.options.len())).unwrap_or_default();
        format!("detection budget at {}% FPR on the clean training split: {}; {} words banned{loss}", self.fpr_percent, t.join(", "), self.words.banned.len())
    }
}
