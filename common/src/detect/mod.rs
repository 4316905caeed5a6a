//! Poison detectors, as a defender runs them on a training set without knowing which
//! examples are poisons: one score per example per detector, higher = more suspicious
//! (`detect-poisons`), and how well the scores separate poisons from clean examples once
//! the answer is known (`metrics`, `report defend`).
//!
//! | detector | what it reads | needs |
//! | --- | --- | --- |
//! | `perplexity` | log-perplexity under a word bigram LM (`ngram`) | – |
//! | `onion` | the largest perplexity drop from removing one word (ONION) | – |
//! | `glove-trigger` | cosine of the mean GloVe vector to the trigger's | table, trigger |
//! | `glove-trigger-word` | largest cosine of any word to any trigger word | table, trigger |
//! | `minilm-trigger` | cosine of MiniLM sentence embeddings to the trigger's | MiniLM, trigger |
//! | `loss-mean` | the example's loss averaged over the epochs of victims trained on the set | table |
//! | `loss-final` | the same after the last epoch | table |
//! | `spectral` | spectral signature of those victims' pooled features per class | table |

pub mod dynamics;
pub mod embedding;
pub mod evasion;
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
    GloveTrigger,
    GloveTriggerWord,
    MinilmTrigger,
    LossMean,
    LossFinal,
    Spectral,
}

impl Detector {
    pub const ALL: [Detector; 8] = [
        Detector::Perplexity,
        Detector::Onion,
        Detector::GloveTrigger,
        Detector::GloveTriggerWord,
        Detector::MinilmTrigger,
        Detector::LossMean,
        Detector::LossFinal,
        Detector::Spectral,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Detector::Perplexity => "perplexity",
            Detector::Onion => "onion",
            Detector::GloveTrigger => "glove-trigger",
            Detector::GloveTriggerWord => "glove-trigger-word",
            Detector::MinilmTrigger => "minilm-trigger",
            Detector::LossMean => "loss-mean",
            Detector::LossFinal => "loss-final",
            Detector::Spectral => "spectral",
        }
    }

    /// Whether it measures closeness to the trigger phrase (so needs one).
    pub fn needs_trigger(self) -> bool {
        matches!(self, Detector::GloveTrigger | Detector::GloveTriggerWord | Detector::MinilmTrigger)
    }

    /// Whether it reads the word table (`--embeddings`): the GloVe detectors, and the
    /// training-dynamics ones whose victims start from it.
    pub fn needs_table(self) -> bool {
        matches!(self, Detector::GloveTrigger | Detector::GloveTriggerWord) || self.trains()
    }

    /// Whether it trains victims on the screened set.
    pub fn trains(self) -> bool {
        matches!(self, Detector::LossMean | Detector::LossFinal | Detector::Spectral)
    }
}

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
    pub table: Option<&'a crate::victims::base::Base>,
    pub minilm: Option<&'a crate::victims::base::Base>,
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

/// Words of an example as the bigram LM reads them: its `tokens` when it has them.
fn words(ex: &crate::formats::records::Example) -> Vec<String> {
    ex.tokens.clone().unwrap_or_else(|| crate::tokenizer::tokenize(&ex.text))
}

/// Every example's score under every detector asked for, in input order.
pub fn screen(s: &Screen, log: &(dyn Fn(String) + Sync)) -> anyhow::Result<Vec<DetectionScore>> {
    use crate::train::{encode_all, TextPolicy};
    use anyhow::Context;
    let n = s.examples.len();
    let mut columns: BTreeMap<Detector, Vec<f64>> = BTreeMap::new();
    let wants = |d: Detector| s.detectors.contains(&d);
    if wants(Detector::Perplexity) || wants(Detector::Onion) {
        let t = std::time::Instant::now();
        let tokens: Vec<Vec<String>> = s.examples.iter().map(words).collect();
        let reference: Vec<Vec<String>> = s.reference.map(|r| r.iter().map(words).collect()).unwrap_or_default();
        let model = match s.reference {
            Some(_) => ngram::Bigram::fit(reference.iter().map(|t| t.as_slice())),
            None => ngram::Bigram::fit(tokens.iter().map(|t| t.as_slice())),
        };
        let own: Vec<Option<ngram::Own>> = tokens.iter().map(|t| s.reference.is_none().then(|| ngram::own_counts(t))).collect();
        use rayon::prelude::*;
        if wants(Detector::Perplexity) {
            columns.insert(Detector::Perplexity, tokens.par_iter().zip(&own).map(|(t, o)| model.log_perplexity(t, o.as_ref())).collect());
        }
        if wants(Detector::Onion) {
            columns.insert(Detector::Onion, tokens.par_iter().zip(&own).map(|(t, o)| model.onion(t, o.as_ref())).collect());
        }
        log(format!("bigram LM ({}): {:.1}s", if s.reference.is_some() { "reference text" } else { "the set itself, leave-one-out" }, t.elapsed().as_secs_f64()));
    }
    if wants(Detector::GloveTrigger) || wants(Detector::GloveTriggerWord) {
        let base = s.table.context("the GloVe detectors need --embeddings")?;
        let crate::victims::base::Start::Table(table) = &base.start else { anyhow::bail!("the GloVe detectors need a word table (--embeddings), not a pretrained encoder") };
        let phrase = s.trigger.context("the GloVe detectors need --trigger")?;
        let trigger = base.vocab.trigger_ids(phrase).with_context(|| format!("vocabulary of {}", base.source))?;
        let ids: Vec<Vec<i64>> = s.examples.iter().map(|e| match &e.tokens {
            Some(t) => t.iter().map(|w| base.vocab.id(w).unwrap_or(base.vocab.unk_id())).collect(),
            None => base.vocab.encode(&e.text),
        }).collect();
        let scores = embedding::glove_scores(table, &base.vocab, &ids, &trigger);
        columns.insert(Detector::GloveTrigger, scores.iter().map(|s| s.0).collect());
        columns.insert(Detector::GloveTriggerWord, scores.iter().map(|s| s.1).collect());
    }
    if wants(Detector::MinilmTrigger) {
        let t = std::time::Instant::now();
        let base = s.minilm.context("minilm-trigger needs --minilm DIR (the folder scripts/fetch_minilm.sh makes)")?;
        let phrase = s.trigger.context("minilm-trigger needs --trigger")?;
        let config = base.victim_config(crate::victims::model::Arch::Minilm, 1, crate::victims::gpt::GptShape { layers: 2, heads: 2 }, 2, 128, false)?;
        tch::manual_seed(0); // the unused classifier head
        let victim = base.new_victim(config.clone(), s.device)?;
        // WordPiece reads the text (a poison's `tokens` are the word victims' tokens).
        let texts: Vec<crate::formats::records::Example> = s.examples.iter().map(|e| crate::formats::records::Example { tokens: None, ..e.clone() }).collect();
        let encoded = encode_all(&texts, &base.vocab, config.max_len, s.num_classes, TextPolicy::Data, s.source)?;
        let trigger = encode_all(&[crate::formats::records::Example::new("trigger", phrase, 0)], &base.vocab, config.max_len, 2, TextPolicy::Poisons, "--trigger")?;
        let model = format!("minilm-trigger v1 {} {phrase:?} {}", base.sha256, config.max_len);
        let text_of: Vec<&str> = texts.iter().map(|e| e.text.as_str()).collect();
        let mut computed = 0;
        let col = cached_scores(s.cache, &model, &text_of, |todo| {
            computed = todo.len();
            let subset: Vec<crate::train::Encoded> = todo.iter().map(|&i| encoded[i].clone()).collect();
            Ok(embedding::sentence_scores(&config, &victim.params(), &subset, &trigger[0], 64))
        })?;
        columns.insert(Detector::MinilmTrigger, col);
        log(format!("MiniLM sentence embeddings of {computed} examples ({} from the cache): {:.1}s", n - computed, t.elapsed().as_secs_f64()));
    }
    if s.detectors.iter().any(|d| d.trains()) {
        let base = s.table.context("the training-dynamics detectors need --embeddings")?;
        let (config, opts) = s.training.context("the training-dynamics detectors need victim settings")?;
        let encoded = encode_all(s.examples, &base.vocab, config.max_len, s.num_classes, TextPolicy::Data, s.source)?;
        let d = dynamics::training_dynamics(base, config, &encoded, opts, s.workers, s.device, log)?;
        for (det, col) in [(Detector::LossMean, d.loss_mean), (Detector::LossFinal, d.loss_final), (Detector::Spectral, d.spectral)] {
            if wants(det) {
                columns.insert(det, col);
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
