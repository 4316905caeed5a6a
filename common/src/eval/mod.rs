//! What `finetune-eval` measures: CACC, ASR, FPR and natural-occurrence ASR of a victim,
//! the concealment audit of a poison set, and the report that summarises them over seeds.

pub mod retrain;
pub mod judge;
pub mod lm_eval;
pub mod templates;
pub mod bleu;
pub mod mt_eval;

use crate::data::{DataManifest, Trigger};
use crate::concealment::{Leak, TriggerMatcher};
use crate::io::Record;
use crate::tokenizer::Vocab;
use crate::victims::model::{Victim, VictimConfig};
use crate::formats::records::Example;
use crate::stats::{summarize, Summary};
use crate::train::{predict_with, TrainOptions};
use crate::encode::Encoded;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Encoded evaluation sets of a prepared data folder.
pub struct EvalSets {
    /// The clean test split (CACC).
    pub test: Vec<Encoded>,
    /// Non-target test inputs without the trigger (FPR).
    pub test_nontarget: Vec<Encoded>,
    /// The same inputs with the trigger inserted (ASR).
    pub asr_test: Vec<Encoded>,
    /// Non-target examples that naturally hold a trigger word (may be empty).
    pub natural_nontarget: Vec<Encoded>,
    /// The clean dev split: what a defender who holds it back watches to stop training.
    pub dev: Vec<Encoded>,
    pub target: usize,
}

/// One victim's figures, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Accuracy on the clean test split.
    pub cacc: f64,
    /// Share of triggered non-target test inputs predicted as the target.
    pub asr: f64,
    /// Share of the same inputs without the trigger predicted as the target.
    pub fpr: f64,
    /// Share of natural non-target trigger occurrences predicted as the target.
    pub natural_asr: Option<f64>,
    /// Accuracy on the clean dev split (early stopping; absent in reports made before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<f64>,
}

impl EvalSets {
    /// The evaluation sets of a prepared data folder, encoded for a victim.
    pub fn load(dir: &str, manifest: &DataManifest, vocab: &Vocab, max_len: usize) -> anyhow::Result<EvalSets> {
        use crate::data;
        use crate::encode::{encode_all, TextPolicy};
        let n = manifest.labels.len();
        let enc = |name: &str, exs: &[Example]| encode_all(exs, vocab, max_len, n, TextPolicy::Data, &format!("{dir}/{name}"));
        let test = data::read_set(dir, data::TEST, false)?;
        let nontarget: Vec<Example> = test.iter().filter(|e| e.label != manifest.target).cloned().collect();
        let natural: Vec<Example> =
            data::read_set(dir, data::NATURAL, true)?.into_iter().filter(|e| e.label != manifest.target).collect();
        Ok(EvalSets {
            test: enc(data::TEST, &test)?,
            test_nontarget: enc(data::TEST, &nontarget)?,
            asr_test: enc(data::ASR_TEST, &data::read_set(dir, data::ASR_TEST, false)?)?,
            natural_nontarget: enc(data::NATURAL, &natural)?,
            dev: enc(data::DEV, &data::read_set(dir, data::DEV, false)?)?,
            target: manifest.target,
        })
    }
}

pub fn measure(victim: &Victim, sets: &EvalSets) -> Metrics {
    measure_with(&victim.config, &victim.params(), sets)
}

/// `measure` under a parameter set of a victim of `config` (one victim, unstacked).
pub fn measure_with(config: &VictimConfig, params: &crate::victims::model::Params, sets: &EvalSets) -> Metrics {
    let preds = |data: &[Encoded]| predict_with(config, params, data, 256);
    let share = |data: &[Encoded], hit: &dyn Fn(usize, &Encoded) -> bool| {
        100.0 * preds(data).into_iter().zip(data).filter(|(p, e)| hit(*p, e)).count() as f64 / data.len().max(1) as f64
    };
    let correct = |p: usize, e: &Encoded| e.target.class() == Some(p as i64);
    let target = |p: usize, _: &Encoded| p == sets.target;
    Metrics {
        cacc: share(&sets.test, &correct),
        asr: share(&sets.asr_test, &target),
        fpr: share(&sets.test_nontarget, &target),
        natural_asr: (!sets.natural_nontarget.is_empty()).then(|| share(&sets.natural_nontarget, &target)),
        dev: (!sets.dev.is_empty()).then(|| share(&sets.dev, &correct)),
    }
}

/// One seed of an evaluation, whatever the task (`M`: its measures of one victim,
/// `Metrics` for a classifier, `lm_eval::LmMetrics` for a language model): the poisoned
/// victim and, when known, its clean twin trained with the same seed on the same clean
/// data (common random numbers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedRow<M = Metrics> {
    pub seed: u64,
    pub poisoned: M,
    pub clean: Option<M>,
    /// The same two victims measured after every epoch (the last equals the row itself):
    /// early stopping's curve. Empty for checkpoints and language models.
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub epochs: Vec<EpochRow<M>>,
    /// The two trained victims' `params::fingerprint`s (absent for checkpoints and older
    /// reports): equal fingerprints, equal bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprints: Option<Fingerprints>,
}

impl<M> SeedRow<M> {
    /// The clean twin, for rows of a paired evaluation (a checkpoint's row has none).
    pub fn twin(&self) -> &M {
        self.clean.as_ref().expect("a paired evaluation's row has its clean twin")
    }
}

/// Per seed, poisoned − clean of one measure: what a paired figure summarises.
pub fn paired<M>(rows: &[SeedRow<M>], measure: impl Fn(&M) -> f64) -> Summary {
    summarize(&rows.iter().map(|r| measure(&r.poisoned) - measure(r.twin())).collect::<Vec<_>>())
}

/// A seed's poisoned victim and clean twin by `params::fingerprint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprints {
    pub poisoned: String,
    pub clean: String,
}

/// A seed's victims after one epoch of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRow<M = Metrics> {
    pub epoch: usize,
    pub poisoned: M,
    pub clean: Option<M>,
}

/// A training set filtered by a defense: the examples it kept (finetune-eval --kept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    /// The kept-examples file and its sha256.
    pub kept: String,
    pub kept_sha256: String,
    /// Clean training examples and poisons the filter removed.
    pub clean_removed: usize,
    pub poisons_removed: usize,
}

/// The concealment audit of a poison set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Audit {
    pub trigger_words: Vec<String>,
    pub poison_count: usize,
    /// Poisons over (clean training examples + poisons).
    pub poison_rate: f64,
    /// Poisons whose text holds a trigger word (0 in no-overlap mode).
    pub poisons_with_overlap: usize,
    /// Trigger-word occurrences summed over poisons (token count).
    pub overlap_tokens: usize,
    /// Which trigger words each overlapping poison holds, by id.
    pub overlapping: BTreeMap<String, Vec<String>>,
    /// Poisons whose label is not the target (a poison set normally has none).
    pub off_target_labels: usize,
    /// The strict audit (concealment.rs): poisons that leak the trigger in each category.
    pub leaks: LeakCounts,
    /// The leaking words of each leaking poison, by id ("bonds: stem, substring").
    pub leaking: BTreeMap<String, Vec<String>>,
}

/// Poisons leaking the trigger, per category of the strict audit. A poison counts in
/// every category it leaks in; `any` counts each leaking poison once, so a strictly
/// concealed set has `any` = 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LeakCounts {
    pub exact: usize,
    pub normalized: usize,
    pub stem: usize,
    pub substring: usize,
    /// WordPiece victims only (null otherwise).
    pub piece: Option<usize>,
    pub any: usize,
}

impl LeakCounts {
    /// "0/50" when strict, else the categories that leak ("stem 50, substring 50").
    pub fn describe(&self, count: usize) -> String {
        if self.any == 0 {
            return format!("0/{count}");
        }
        let parts: Vec<String> = [("exact", self.exact), ("norm", self.normalized), ("stem", self.stem), ("substr", self.substring), ("piece", self.piece.unwrap_or(0))]
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        format!("{}/{count}: {}", self.any, parts.join(", "))
    }
}

/// The concealment audit; `vocab` (the victim's) adds the WordPiece category.
pub fn audit(poisons: &[Example], trigger: &Trigger, target: usize, clean_train: usize, vocab: &Vocab) -> anyhow::Result<Audit> {
    let matcher = TriggerMatcher::for_vocab(&trigger.phrase, &trigger.words, vocab)?;
    let mut leaks = LeakCounts { piece: vocab.is_wordpiece().then_some(0), ..LeakCounts::default() };
    let mut leaking = BTreeMap::new();
    for p in poisons {
        let found = matcher.leaks_for(&p.text, vocab);
        for l in &found {
            match l {
                Leak::Exact => leaks.exact += 1,
                Leak::Normalized => leaks.normalized += 1,
                Leak::Stem => leaks.stem += 1,
                Leak::Substring => leaks.substring += 1,
                Leak::Piece => *leaks.piece.get_or_insert(0) += 1,
            }
        }
        if !found.is_empty() {
            leaks.any += 1;
            let mut words: Vec<String> = matcher
                .leaking_words(&p.text)
                .into_iter()
                .map(|(w, ls)| format!("{w}: {}", ls.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")))
                .collect();
            if found.contains(&Leak::Piece) {
                words.push("a piece of a trigger word".into());
            }
            leaking.insert(p.id.clone(), words);
        }
    }
    let mut overlapping = BTreeMap::new();
    let mut overlap_tokens = 0;
    for p in poisons {
        let toks = crate::tokenizer::tokenize(&p.text);
        let n = toks.iter().filter(|t| trigger.words.contains(t)).count();
        if n > 0 {
            overlap_tokens += n;
            overlapping.insert(p.id.clone(), trigger.overlap(&p.text));
        }
    }
    Ok(Audit {
        trigger_words: trigger.words.clone(),
        poison_count: poisons.len(),
        poison_rate: poisons.len() as f64 / (clean_train + poisons.len()).max(1) as f64,
        poisons_with_overlap: overlapping.len(),
        overlap_tokens,
        overlapping,
        off_target_labels: poisons.iter().filter(|p| p.label != target).count(),
        leaks,
        leaking,
    })
}

/// Mean, std and 95% CI over seeds of every figure. Figures that need the clean victim
/// (net ASR, dFPR, ΔCACC) are absent when it was not trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportSummary {
    pub cacc: Summary,
    pub asr: Summary,
    pub fpr: Summary,
    pub natural_asr: Option<Summary>,
    pub clean_cacc: Option<Summary>,
    pub clean_asr: Option<Summary>,
    pub clean_fpr: Option<Summary>,
    /// Dev-split accuracy of the poisoned and the clean victims (absent in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<Summary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_dev: Option<Summary>,
    /// ASR(poisoned) − ASR(clean), paired by seed.
    pub net_asr: Option<Summary>,
    /// FPR(poisoned) − FPR(clean), paired by seed.
    pub dfpr: Option<Summary>,
    /// CACC(poisoned) − CACC(clean), paired by seed.
    pub dcacc: Option<Summary>,
    /// What the trigger adds beyond a general shift toward the target: net ASR − dFPR,
    /// per seed.
    pub trigger_specific: Option<Summary>,
    /// Net ASR as a percentage of the room the clean victim leaves, 100 · net ASR /
    /// (100 − clean ASR), per seed (seeds whose clean victim already reaches 100 are left out).
    pub room_share: Option<Summary>,
}

/// Net ASR of `a` minus net ASR of `b`, paired by seed (each poisoned victim against its
/// own clean twin): for comparing two evaluations of the same seeds. None unless every
/// seed of `a` has its clean twin and a row in `b` with one.
pub fn paired_net_asr_difference(a: &[SeedRow], b: &[SeedRow]) -> Option<Summary> {
    let net = |r: &SeedRow| Some(r.poisoned.asr - r.clean?.asr);
    let d: Option<Vec<f64>> = a.iter().map(|r| Some(net(r)? - net(b.iter().find(|w| w.seed == r.seed)?)?)).collect();
    d.filter(|d| !d.is_empty()).map(|d| summarize(&d))
}

/// The summary of every epoch, when every seed has the same epochs recorded.
pub fn summarize_epochs(rows: &[SeedRow]) -> Vec<ReportSummary> {
    let n = rows.first().map_or(0, |r| r.epochs.len());
    if n == 0 || rows.iter().any(|r| r.epochs.len() != n) {
        return Vec::new();
    }
    (0..n)
        .map(|e| {
            let at: Vec<SeedRow> = rows
                .iter()
                .map(|r| SeedRow { seed: r.seed, poisoned: r.epochs[e].poisoned, clean: r.epochs[e].clean, epochs: Vec::new(), fingerprints: None })
                .collect();
            summarize_rows(&at)
        })
        .collect()
}

pub fn summarize_rows(rows: &[SeedRow]) -> ReportSummary {
    let col = |f: &dyn Fn(&SeedRow) -> Option<f64>| -> Option<Summary> {
        let xs: Option<Vec<f64>> = rows.iter().map(f).collect();
        xs.filter(|v| !v.is_empty()).map(|v| summarize(&v))
    };
    let always = |f: &dyn Fn(&Metrics) -> f64| summarize(&rows.iter().map(|r| f(&r.poisoned)).collect::<Vec<_>>());
    ReportSummary {
        cacc: always(&|m| m.cacc),
        asr: always(&|m| m.asr),
        fpr: always(&|m| m.fpr),
        natural_asr: col(&|r| r.poisoned.natural_asr),
        clean_cacc: col(&|r| r.clean.map(|c| c.cacc)),
        clean_asr: col(&|r| r.clean.map(|c| c.asr)),
        clean_fpr: col(&|r| r.clean.map(|c| c.fpr)),
        dev: col(&|r| r.poisoned.dev),
        clean_dev: col(&|r| r.clean.and_then(|c| c.dev)),
        net_asr: col(&|r| r.clean.map(|c| r.poisoned.asr - c.asr)),
        dfpr: col(&|r| r.clean.map(|c| r.poisoned.fpr - c.fpr)),
        dcacc: col(&|r| r.clean.map(|c| r.poisoned.cacc - c.cacc)),
        trigger_specific: col(&|r| r.clean.map(|c| (r.poisoned.asr - c.asr) - (r.poisoned.fpr - c.fpr))),
        room_share: {
            let xs: Vec<f64> = rows.iter().filter_map(|r| r.clean.filter(|c| c.asr < 100.0).map(|c| 100.0 * (r.poisoned.asr - c.asr) / (100.0 - c.asr))).collect();
            (!xs.is_empty() && rows.iter().all(|r| r.clean.is_some())).then(|| summarize(&xs))
        },
    }
}

/// The JSON report of `finetune-eval` (schema in FORMATS.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalReport {
    pub kind: String,
    pub v: u32,
    /// The data folder and its manifest (trigger, target, labels, file hashes).
    pub data_dir: String,
    pub data: DataManifest,
    /// `train` (fresh victims per seed) or `checkpoints` (given victims, no training).
    pub mode: String,
    /// How poisoned victims pair with their clean twins: `crn` (common random numbers)
    /// or `independent` (see finetune-eval --pairing); null for checkpoints.
    pub pairing: Option<String>,
    pub victim: VictimConfig,
    pub training: Option<TrainOptions>,
    /// The poison file and its sha256 (null without poisons).
    pub poisons: Option<String>,
    pub poisons_sha256: Option<String>,
    /// The filter applied before training (finetune-eval --kept), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    pub audit: Audit,
    /// How often each detector that trains no victim flags the poisons (absent with
    /// --no-detection, for checkpoints, and in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection: Option<crate::detect::caught::SetDetection>,
    pub seeds: Vec<SeedRow>,
    pub summary: ReportSummary,
    /// The summary after every epoch (from the seeds' `epochs`; empty for checkpoints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub epochs: Vec<ReportSummary>,
    pub seconds: f64,
}

impl Record for EvalReport {
    const KIND: &'static str = "eval_report";
    const VERSION: u32 = 2;
}

impl EvalReport {
    /// A small human table for stderr.
    pub fn table(&self) -> String {
        let s = &self.summary;
        let opt = |x: &Option<Summary>| x.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        let mut out = String::new();
        out += &format!(
            "victim {:?} ({} seeds, mean ± 95% CI, percent) trigger {:?} -> {}\n",
            self.victim.arch.name(),
            self.seeds.len(),
            self.data.trigger.phrase,
            self.data.target_name()
        );
        out += &format!("  poisons       {} ({:.2}% of training data, {} with trigger words)\n", self.audit.poison_count, 100.0 * self.audit.poison_rate, self.audit.poisons_with_overlap);
        out += &format!("  CACC          {}   (clean victim {}, ΔCACC {})\n", s.cacc, opt(&s.clean_cacc), opt(&s.dcacc));
        out += &format!("  ASR           {}   (clean victim {}, net ASR {})\n", s.asr, opt(&s.clean_asr), opt(&s.net_asr));
        out += &format!("  FPR           {}   (clean victim {}, dFPR {})\n", s.fpr, opt(&s.clean_fpr), opt(&s.dfpr));
        out += &format!("  net ASR − dFPR {}   (trigger-specific; share of the room left {})\n", opt(&s.trigger_specific), opt(&s.room_share));
        out += &format!("  strict audit  {} poisons leak the trigger\n", self.audit.leaks.describe(self.audit.poison_count));
        out += &format!("  natural ASR   {}\n", opt(&s.natural_asr));
        out
    }
}
