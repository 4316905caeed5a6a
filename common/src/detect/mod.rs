//! Poison detectors, as a defender runs them on a training set without knowing which
//! examples are poisons: one score per example per detector, higher = more suspicious
//! (`detect-poisons`), and how well the scores separate poisons from clean examples once
//! the answer is known (`metrics`, `report defend`).
//!
//! | detector | what it reads | needs |
//! | --- | --- | --- |
//! | `perplexity` | log-perplexity under a word bigram LM (`ngram`); a translation pair's target side | – |
//! | `onion` | the largest perplexity drop from removing one word (ONION); likewise | – |
//! | `source-perplexity` | `perplexity` of a translation pair's source side | translation pairs |
//! | `source-onion` | `onion` of the source side | translation pairs |
//! | `glove-trigger` | cosine of the mean GloVe vector to the trigger's | table, trigger |
//! | `glove-trigger-word` | largest cosine of any word to any trigger word | table, trigger |
//! | `minilm-trigger` | cosine of MiniLM sentence embeddings to the trigger's | MiniLM, trigger |
//! | `table-trigger` | `glove-trigger` in a trained victim's own word table (both sides of a pair) | trained victim, trigger |
//! | `table-trigger-word` | `glove-trigger-word` in that table | trained victim, trigger |
//! | `loss-mean` | the example's loss averaged over the epochs of victims trained on the set | table |
//! | `loss-final` | the same after the last epoch | table |
//! | `spectral` | spectral signature of those victims' pooled features per class | table |
//! | `lm-perplexity` | a language model's own log-perplexity of the text (`lm`) | language model |

pub mod caught;
pub mod dynamics;
pub mod embedding;
pub mod evasion;
pub mod lm;
pub mod metrics;
pub mod ngram;

use crate::io::Record;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A detector (`--detectors` value and key of `scores`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Detector {
    Perplexity,
    Onion,
    SourcePerplexity,
    SourceOnion,
    GloveTrigger,
    GloveTriggerWord,
    MinilmTrigger,
    TableTrigger,
    TableTriggerWord,
    LossMean,
    LossFinal,
    Spectral,
    LmPerplexity,
}

impl Detector {
    /// Every detector, in declaration order.
    pub fn all() -> &'static [Detector] {
        <Detector as clap::ValueEnum>::value_variants()
    }

    /// Its `--detectors` name and key in `scores`.
    pub fn name(self) -> &'static str {
        match self {
            Detector::Perplexity => "perplexity",
            Detector::Onion => "onion",
            Detector::SourcePerplexity => "source-perplexity",
            Detector::SourceOnion => "source-onion",
            Detector::GloveTrigger => "glove-trigger",
            Detector::GloveTriggerWord => "glove-trigger-word",
            Detector::MinilmTrigger => "minilm-trigger",
            Detector::TableTrigger => "table-trigger",
            Detector::TableTriggerWord => "table-trigger-word",
            Detector::LossMean => "loss-mean",
            Detector::LossFinal => "loss-final",
            Detector::Spectral => "spectral",
            Detector::LmPerplexity => "lm-perplexity",
        }
    }

    /// The family that computes it.
    pub fn family(self) -> &'static dyn Family {
        *FAMILIES.iter().find(|f| f.detectors().contains(&self)).expect("every detector is in a family (detect::FAMILIES)")
    }

    /// What it reads besides the examples.
    pub fn needs(self) -> Needs {
        let needs = self.family().needs();
        Needs { source: matches!(self, Detector::SourcePerplexity | Detector::SourceOnion), ..needs }
    }

    /// Whether it can run on `examples` given what else is at hand (`have`): the
    /// default detector list of `detect-poisons` and the detection columns.
    pub fn runs_with(self, have: Needs, examples: &[crate::formats::records::Example]) -> bool {
        let n = self.needs();
        (!n.trigger || have.trigger) && (!n.table || have.table) && (!n.minilm || have.minilm) && (!n.trained || have.trained) && (!n.lm || have.lm) && (!n.source || (!examples.is_empty() && examples.iter().all(|e| e.source.is_some())))
    }
}

/// What a family of detectors reads besides the screened examples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// The trigger phrase (`--trigger`): it measures closeness to it.
    pub trigger: bool,
    /// The word table (`--embeddings`).
    pub table: bool,
    /// The MiniLM package (`--minilm`).
    pub minilm: bool,
    /// Victims trained on the screened set (and so `--embeddings` for their word table).
    pub training: bool,
    /// A victim that trained its word table (`--trained-table`): its table is read.
    pub trained: bool,
    /// Translation pairs: it reads their source side.
    pub source: bool,
    /// A language model (`--lm`): its own perplexity of the text.
    pub lm: bool,
}

/// Detectors that share one computation (a bigram LM, the GloVe table, MiniLM, victims
/// trained on the set). ARCHITECTURE.md, Adding a detector.
pub trait Family: Sync {
    /// The detectors it computes.
    fn detectors(&self) -> &'static [Detector];
    /// What it reads besides the examples.
    fn needs(&self) -> Needs;
    /// One column per detector of `wanted` (all of them its own), higher = more
    /// suspicious, in input order.
    fn scores(&self, s: &Screen, wanted: &[Detector], log: &(dyn Fn(String) + Sync)) -> anyhow::Result<Vec<(Detector, Vec<f64>)>>;
}

/// Every family; each detector belongs to exactly one.
pub static FAMILIES: &[&dyn Family] = &[&ngram::BigramDetectors, &embedding::GloveDistance, &embedding::MinilmDistance, &embedding::TrainedTableDistance, &dynamics::TrainingDynamics, &lm::LmLikelihood];

/// One example's scores (`detect-poisons` output; schema in FORMATS.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionScore {
    pub kind: String,
    pub v: u32,
    /// Its position in the screened set (0-based).
    pub index: usize,
    pub id: String,
    pub label: usize,
    pub text: String,
    /// Detector name → score; higher is more suspicious.
    pub scores: BTreeMap<String, f64>,
}

impl Record for DetectionScore {
    const KIND: &'static str = "detection_score";
    const VERSION: u32 = 1;
}

/// What `screen` is given. Detectors whose inputs are missing are refused by the caller.
pub struct Screen<'a> {
    pub examples: &'a [crate::formats::records::Example],
    /// The screened set's name in errors.
    pub source: &'a str,
    pub detectors: &'a [Detector],
    pub trigger: Option<&'a str>,
    /// Reference text for the bigram LM (None: the screened set, leave-one-out).
    pub reference: Option<&'a [crate::formats::records::Example]>,
    /// The word table (GloVe detectors) and the base of the training-dynamics victims.
    pub table: Option<&'a crate::victims::origin::Origin>,
    pub minilm: Option<&'a crate::victims::origin::Origin>,
    /// A trained victim's own word table (`Origin::trained_table`): the table detectors.
    pub trained: Option<&'a crate::victims::origin::Origin>,
    /// A language model and its vocabulary (`lm-perplexity`).
    pub lm: Option<(&'a crate::victims::model::Victim, &'a crate::tokenizer::Vocab)>,
    /// The training-dynamics victims' config and one option set per victim.
    pub training: Option<(&'a crate::victims::model::VictimConfig, &'a [crate::train::TrainOptions])>,
    pub num_classes: usize,
    pub workers: usize,
    pub device: tch::Device,
    /// Folder keeping minilm-trigger scores by example text, weights and trigger: screening
    /// many versions of one training set (each poison set of a demo) encodes each text once.
    pub cache: Option<&'a str>,
}

/// Scores of `examples` under a per-example detector, reusing a cache file in `dir` keyed
/// by `model` (what decides the score besides the text): `compute` gets the examples the
/// cache lacks and returns their scores.
fn cached_scores(dir: Option<&str>, model: &str, texts: &[&str], compute: impl FnOnce(&[usize]) -> anyhow::Result<Vec<f64>>) -> anyhow::Result<Vec<f64>> {
    let Some(dir) = dir else { return compute(&(0..texts.len()).collect::<Vec<_>>()) };
    let path = format!("{dir}/{}.json", &crate::io::sha256_hex(model.as_bytes())[..24]);
    let mut known: BTreeMap<String, f64> = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    let keys: Vec<String> = texts.iter().map(|t| crate::io::sha256_hex(t.as_bytes())).collect();
    let missing: Vec<usize> = (0..texts.len()).filter(|&i| !known.contains_key(&keys[i])).collect();
    if !missing.is_empty() {
        for (&i, v) in missing.iter().zip(compute(&missing)?) {
            known.insert(keys[i].clone(), v);
        }
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {dir}: {e}"))?;
        crate::io::write_bytes(&path, serde_json::to_string(&known)?.as_bytes())?;
    }
    Ok(keys.iter().map(|k| known[k]).collect())
}

/// Every example's score under every detector asked for, in input order.
pub fn screen(s: &Screen, log: &(dyn Fn(String) + Sync)) -> anyhow::Result<Vec<DetectionScore>> {
    let mut columns: BTreeMap<Detector, Vec<f64>> = BTreeMap::new();
    let wants = |d: Detector| s.detectors.contains(&d);
    for family in FAMILIES {
        let wanted: Vec<Detector> = family.detectors().iter().copied().filter(|&d| wants(d)).collect();
        if !wanted.is_empty() {
            for (d, col) in family.scores(s, &wanted, log)? {
                if wants(d) {
                    columns.insert(d, col);
                }
            }
        }
    }
    for (d, col) in &columns {
        if let Some(i) = col.iter().position(|x| !x.is_finite()) {
            anyhow::bail!("{}: record {} (id {:?}): the {} score is {}; the example may be degenerate", s.source, i + 1, s.examples[i].id, d.name(), col[i]);
        }
    }
    Ok(s.examples
        .iter()
        .enumerate()
        .map(|(i, e)| DetectionScore {
            kind: DetectionScore::KIND.into(),
            v: DetectionScore::VERSION,
            index: i,
            id: e.id.clone(),
            label: e.label,
            text: e.text.clone(),
            scores: columns.iter().filter(|(d, _)| wants(**d)).map(|(d, c)| (d.name().to_string(), c[i])).collect(),
        })
        .collect())
}

/// The examples left when the `remove_percent` % of `examples` scoring highest under
/// `detector` are removed (rounded to the nearest count; ties go by position), in input
/// order. `scores` must be `detect-poisons` output for exactly these examples.
pub fn filter(examples: &[crate::formats::records::Example], scores: &[DetectionScore], detector: &str, remove_percent: f64, names: (&str, &str)) -> anyhow::Result<Vec<crate::formats::records::Example>> {
    let (data, scores_name) = names;
    if scores.len() != examples.len() {
        anyhow::bail!("{scores_name} holds {} scores but {data} {} examples: score this training set with detect-poisons first", scores.len(), examples.len());
    }
    for (i, (s, e)) in scores.iter().zip(examples).enumerate() {
        if s.index != i || s.id != e.id {
            anyhow::bail!("{scores_name}: record {} scores example {:?} at index {}, but record {} of {data} is {:?}; the scores are of another set or sorted (--sort): score in input order", i + 1, s.id, s.index, i + 1, e.id);
        }
        if !s.scores.contains_key(detector) {
            let have: Vec<&String> = s.scores.keys().collect();
            anyhow::bail!("{scores_name}: record {} has no {detector:?} score (it has {have:?}); run detect-poisons with that detector", i + 1);
        }
    }
    if !(0.0..=100.0).contains(&remove_percent) {
        anyhow::bail!("--remove {remove_percent}: a percentage from 0 to 100");
    }
    let remove = ((remove_percent / 100.0) * examples.len() as f64).round() as usize;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by(|&a, &b| scores[b].scores[detector].total_cmp(&scores[a].scores[detector]).then(a.cmp(&b)));
    let mut removed = vec![false; examples.len()];
    for &i in &order[..remove] {
        removed[i] = true;
    }
    Ok(examples.iter().zip(&removed).filter(|(_, &r)| !r).map(|(e, _)| e.clone()).collect())
}

#[cfg(test)]
mod family_tests {
    use super::*;

    #[test]
    fn every_detector_is_in_exactly_one_family_under_its_command_line_name() {
        for &d in Detector::all() {
            let families = FAMILIES.iter().filter(|f| f.detectors().contains(&d)).count();
            assert_eq!(families, 1, "{d:?} is in {families} families");
            let clap_name = clap::ValueEnum::to_possible_value(&d).unwrap().get_name().to_string();
            assert_eq!(d.name(), clap_name, "{d:?}: name() and --detectors disagree");
            assert_eq!(serde_json::to_value(d).unwrap(), serde_json::Value::String(clap_name), "{d:?}: its JSON name");
        }
        assert_eq!(FAMILIES.iter().map(|f| f.detectors().len()).sum::<usize>(), Detector::all().len(), "a family lists a detector twice");
    }
}
