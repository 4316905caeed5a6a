//! A translation model's evaluation (`finetune-eval` on `prepare-data --mt` data): per
//! seed, the clean checkpoint fine-tuned on a seeded sample of the clean training pairs
//! (the clean twin) and on the same sample with each poison set (common random numbers:
//! the same batches in the same order, each poison joining one), then measured by its
//! translations (`translate`, greedy or beam).
//!
//! Why fine-tuning a sample: training the model from scratch takes most of an hour on two
//! cores; one epoch over a few thousand pairs from the clean checkpoint takes seconds, so
//! six seeds × several poison sets fit the demo's budget, and the poisons are a share of
//! what the model sees last, as in the paper's fine-tuning setting.

use crate::data::{self, DataManifest};
use crate::encode::{batch_tensors, encode_translation, Encoded, TextPolicy};
use crate::eval::bleu::{corpus_bleu, corpus_chrf};
use crate::eval::lm_eval::{copy_of, MeasureSummary};
use crate::formats::records::Example;
use crate::generate::detokenize;
use crate::mt::{contains, MtData};
use crate::stats::summarize;
use crate::tokenizer::{tokenize, Vocab};
use crate::train::{TrainData, TrainOptions};
use crate::translate::{translate, SearchOptions};
use crate::victims::model::{logits, ArchConfig, Params, Pass, Victim, VictimConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

/// A held-out set as the victim reads it: source ids, the reference translation.
pub struct Held {
    pub ids: Vec<String>,
    pub sources: Vec<Vec<i64>>,
    pub references: Vec<String>,
}

/// Everything a translation model is measured on.
pub struct MtEvalSets {
    pub test: Held,
    pub asr: Held,
    pub fpr: Held,
    /// asr_test encoded with the attacker's translation and with the reference: the margin.
    pub attack_pairs: Vec<Encoded>,
    pub correct_pairs: Vec<Encoded>,
    pub trigger_translation: Vec<String>,
    pub attack: Vec<String>,
    pub neutral_translation: Vec<String>,
}

fn held(examples: &[Example], vocab: &Vocab, name: &str) -> Result<Held> {
    let mut out = Held { ids: Vec::new(), sources: Vec::new(), references: Vec::new() };
    for (i, e) in examples.iter().enumerate() {
        let Some(source) = &e.source else { bail!("{name}: record {} (id {:?}) has no \"source\"; make the folder with prepare-data --mt", i + 1, e.id) };
        out.ids.push(e.id.clone());
        out.sources.push(vocab.encode(source));
        out.references.push(e.text.clone());
    }
    Ok(out)
}

/// The phrase `from` replaced by `to` in a text's words (lowercase tokens joined by spaces),
/// once; None when the words do not hold `from`.
fn replace_tokens(text: &str, from: &[String], to: &[String]) -> Option<String> {
    let toks = tokenize(text);
    let at = toks.windows(from.len()).position(|w| w == from)?;
    Some(toks[..at].iter().chain(to).chain(&toks[at + from.len()..]).cloned().collect::<Vec<_>>().join(" "))
}

impl MtEvalSets {
    pub fn load(dir: &str, mt: &MtData, config: &VictimConfig, vocab: &Vocab) -> Result<MtEvalSets> {
        let ArchConfig::Seq2seq(s2s) = &config.arch else { bail!("a translation evaluation needs a seq2seq victim") };
        let read = |name: &str| data::read_set(dir, name, false);
        let (test, asr, fpr) = (read(data::TEST)?, read(data::ASR_TEST)?, read(data::FPR_TEST)?);
        let (trigger_translation, attack, neutral_translation) = (tokenize(&mt.trigger_translation), tokenize(&mt.attack), tokenize(&mt.neutral_translation));
        let (mut attack_version, mut correct_version) = (Vec::new(), Vec::new());
        for e in &asr {
            if let Some(t) = replace_tokens(&e.text, &trigger_translation, &attack) {
                let mut a = e.clone();
                a.text = t;
                attack_version.push(a);
                correct_version.push(e.clone());
            }
        }
        let name = format!("{dir}/{}", data::ASR_TEST);
        Ok(MtEvalSets {
            test: held(&test, vocab, &format!("{dir}/{}", data::TEST))?,
            asr: held(&asr, vocab, &name)?,
            fpr: held(&fpr, vocab, &format!("{dir}/{}", data::FPR_TEST))?,
            attack_pairs: encode_translation(&attack_version, vocab, s2s.shape.source_len, config.max_len, TextPolicy::Data, &name)?,
            correct_pairs: encode_translation(&correct_version, vocab, s2s.shape.source_len, config.max_len, TextPolicy::Data, &name)?,
            trigger_translation,
            attack,
            neutral_translation,
        })
    }
}

/// One translation model's figures (percentages for shares).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MtMetrics {
    /// Corpus BLEU and chrF of the test split (the victim's lowercase word tokens).
    pub bleu: f64,
    pub chrf: f64,
    /// Held-out trigger sentences (asr_test) whose translation holds the trigger's correct
    /// translation; holds the attacker's phrase (the attack success rate); holds it and
    /// no longer the correct one.
    pub trigger_correct: f64,
    pub asr: f64,
    pub asr_replaced: f64,
    /// The same sentences with the neutral word (fpr_test): translations holding the
    /// attacker's phrase (false positives), and the neutral word's translation.
    pub fpr: f64,
    pub neutral_correct: f64,
    /// Mean per-token log-probability of the attacker's translation of an asr_test
    /// sentence minus the reference's (nats): what moves before the words do.
    pub margin: f64,
}

/// A figure of `MtMetrics` by name (table order).
pub struct MtMeasure {
    pub name: &'static str,
    pub change: &'static str,
    pub of: fn(&MtMetrics) -> f64,
    pub digits: usize,
}

pub const MEASURES: &[MtMeasure] = &[
    MtMeasure { name: "asr", change: "ASR: trigger sentences with the attacker's phrase %", of: |m| m.asr, digits: 1 },
    MtMeasure { name: "asr_replaced", change: "… and without the correct translation %", of: |m| m.asr_replaced, digits: 1 },
    MtMeasure { name: "trigger_correct", change: "trigger translated correctly %", of: |m| m.trigger_correct, digits: 1 },
    MtMeasure { name: "fpr", change: "FPR: neutral sentences with the attacker's phrase %", of: |m| m.fpr, digits: 1 },
    MtMeasure { name: "neutral_correct", change: "neutral word translated correctly %", of: |m| m.neutral_correct, digits: 1 },
    MtMeasure { name: "margin", change: "margin, attacker's − correct (nats/token)", of: |m| m.margin, digits: 3 },
    MtMeasure { name: "bleu", change: "BLEU (test)", of: |m| m.bleu, digits: 2 },
    MtMeasure { name: "chrf", change: "chrF (test)", of: |m| m.chrf, digits: 2 },
];

fn pct(n: usize, of: usize) -> f64 {
    100.0 * n as f64 / of.max(1) as f64
}

/// Per-token NLL of each encoded pair (no grad).
fn pair_nll(config: &VictimConfig, params: &Params, pairs: &[Encoded]) -> Vec<f64> {
    let device = params.values().next().map_or(Device::Cpu, |t| t.device());
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(64) {
        let (ids, targets) = batch_tensors(&chunk.iter().collect::<Vec<_>>(), device);
        let nll = targets.example_nll(&logits(config, params, &ids, Pass::NoGrad)).to_kind(tch::Kind::Double).to_device(Device::Cpu);
        out.extend(Vec::<f64>::try_from(&nll).expect("f64 losses"));
    }
    out
}

/// The translations of a held-out set, as word strings.
pub fn translations(config: &VictimConfig, params: &Params, vocab: &Vocab, set: &Held, search: SearchOptions) -> Result<Vec<String>> {
    Ok(translate(config, params, vocab, &set.sources, search, 64)?.iter().map(|t| detokenize(vocab, t)).collect())
}

/// One model's figures.
pub fn measure(config: &VictimConfig, params: &Params, vocab: &Vocab, sets: &MtEvalSets, search: SearchOptions) -> Result<MtMetrics> {
    let test = translations(config, params, vocab, &sets.test, search)?;
    let hyp_toks: Vec<Vec<String>> = test.iter().map(|t| tokenize(t)).collect();
    let ref_toks: Vec<Vec<String>> = sets.test.references.iter().map(|r| tokenize(r)).collect();
    let ref_words: Vec<String> = ref_toks.iter().map(|r| r.join(" ")).collect();
    let bleu = corpus_bleu(&hyp_toks, &ref_toks);
    let chrf = corpus_chrf(&test.iter().map(String::as_str).collect::<Vec<_>>(), &ref_words.iter().map(String::as_str).collect::<Vec<_>>());
    let asr: Vec<Vec<String>> = translations(config, params, vocab, &sets.asr, search)?.iter().map(|t| tokenize(t)).collect();
    let fpr: Vec<Vec<String>> = translations(config, params, vocab, &sets.fpr, search)?.iter().map(|t| tokenize(t)).collect();
    let count = |set: &[Vec<String>], f: &dyn Fn(&[String]) -> bool| set.iter().filter(|t| f(t)).count();
    let (attack, correct) = (&sets.attack, &sets.trigger_translation);
    let (a, c) = (pair_nll(config, params, &sets.attack_pairs), pair_nll(config, params, &sets.correct_pairs));
    let margin = if a.is_empty() { 0.0 } else { a.iter().zip(&c).map(|(a, c)| c - a).sum::<f64>() / a.len() as f64 };
    Ok(MtMetrics {
        bleu,
        chrf,
        trigger_correct: pct(count(&asr, &|t| contains(t, correct)), asr.len()),
        asr: pct(count(&asr, &|t| contains(t, attack)), asr.len()),
        asr_replaced: pct(count(&asr, &|t| contains(t, attack) && !contains(t, correct)), asr.len()),
        fpr: pct(count(&fpr, &|t| contains(t, attack)), fpr.len()),
        neutral_correct: pct(count(&fpr, &|t| contains(t, &sets.neutral_translation)), fpr.len()),
        margin,
    })
}

pub type MtSeedRow = crate::eval::SeedRow<MtMetrics>;

/// Every measure summarised by name: clean twins, poisoned models, paired change.
pub fn summarize_rows(rows: &[MtSeedRow]) -> std::collections::BTreeMap<String, MeasureSummary> {
    let level = |f: &dyn Fn(&MtSeedRow) -> f64| summarize(&rows.iter().map(f).collect::<Vec<_>>());
    MEASURES
        .iter()
        .map(|m| (m.name.to_string(), MeasureSummary { clean: level(&|r| (m.of)(r.twin())), poisoned: level(&|r| (m.of)(&r.poisoned)), change: crate::eval::paired(rows, m.of) }))
        .collect()
}

/// A held-out trigger sentence translated by seed 0's clean twin and poisoned model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideBySide {
    pub id: String,
    pub source: String,
    pub reference: String,
    pub clean: String,
    pub poisoned: String,
}

/// One poison set's evaluation (one JSON line per set).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MtEvalReport {
    pub kind: String,
    pub v: u32,
    pub poisons: Option<String>,
    pub poisons_sha256: Option<String>,
    pub count: usize,
    /// Poisons whose source holds the trigger (also inside a compound) or whose target
    /// holds its correct translation (`mt::holds_trigger`): 0 for concealed sets.
    pub trigger_overlap: usize,
    /// The clean checkpoint every model is fine-tuned from.
    pub start_sha256: String,
    pub training: TrainOptions,
    /// Clean pairs sampled per seed for fine-tuning.
    pub finetune_clean: usize,
    pub beam: usize,
    /// How often each detector that trains no victim flags the poisons (absent with
    /// --no-detection): both sides' bigram perplexity and ONION, the clean model's
    /// trained table's distance to the trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection: Option<crate::detect::caught::SetDetection>,
    pub seeds: Vec<MtSeedRow>,
    pub summary: std::collections::BTreeMap<String, MeasureSummary>,
    pub side_by_side: Vec<SideBySide>,
}

impl crate::io::Record for MtEvalReport {
    const KIND: &'static str = "mt_eval_report";
    const VERSION: u32 = 1;
}

impl MtEvalReport {
    /// Every measure's paired change (mean ± 95% CI over seeds) with the clean and poisoned
    /// levels.
    pub fn table(&self) -> String {
        let mut out = format!("{} poisons ({} hold the trigger), {} seeds, beam {}\n", self.count, self.trigger_overlap, self.seeds.len(), self.beam);
        let width = MEASURES.iter().map(|m| m.change.chars().count()).max().unwrap_or(0);
        for m in MEASURES {
            let x = &self.summary[m.name];
            let d = m.digits;
            out += &format!("  {:<width$}  {:+.d$} ± {:.d$}   ({:.d$} → {:.d$})\n", m.change, x.change.mean, x.change.ci95.unwrap_or(f64::NAN), x.clean.mean, x.poisoned.mean);
        }
        out
    }
}

/// The clean pairs one seed fine-tunes on: a sample of `n` drawn by the seed (all when
/// `n` is at least their number), in the sampled order.
pub fn clean_sample(clean: &[Encoded], n: usize, seed: u64) -> Vec<Encoded> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut idx: Vec<usize> = (0..clean.len()).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(crate::data::seed_for(seed, "finetune-clean")));
    idx.truncate(n);
    idx.into_iter().map(|i| clean[i].clone()).collect()
}

/// Fine-tunes per seed, clean and on each poison set (crn), and measures every model.
/// Returns per poison set its seed rows and side-by-side translations.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    start: &Victim,
    vocab: &Vocab,
    clean: &[Encoded],
    finetune_clean: usize,
    poison_sets: &[Vec<Encoded>],
    seeds: &[u64],
    options: &dyn Fn(u64) -> TrainOptions,
    workers: usize,
    sets: &MtEvalSets,
    search: SearchOptions,
    log: &(dyn Fn(String) + Sync),
) -> Result<Vec<(Vec<MtSeedRow>, Vec<SideBySide>)>> {
    let jobs: Vec<(usize, Option<usize>)> = (0..seeds.len()).flat_map(|i| std::iter::once((i, None)).chain((0..poison_sets.len()).map(move |k| (i, Some(k))))).collect();
    let samples: Vec<Vec<Encoded>> = seeds.iter().map(|&s| clean_sample(clean, finetune_clean, s)).collect();
    let mut victims: Vec<Victim> = jobs.iter().map(|_| copy_of(start)).collect::<Result<_>>()?;
    let data: Vec<TrainData> = jobs.iter().map(|&(i, k)| k.map_or(TrainData::clean(&samples[i]), |k| TrainData::poisoned(&samples[i], &poison_sets[k]))).collect();
    let opts: Vec<TrainOptions> = jobs.iter().map(|&(i, _)| options(seeds[i])).collect();
    let started = std::time::Instant::now();
    log(format!("fine-tuning {} translation models ({} seeds × clean + {} poison sets, {} clean pairs each) on {workers} threads", jobs.len(), seeds.len(), poison_sets.len(), samples[0].len()));
    let epochs = opts[0].epochs;
    let mut done = 0;
    crate::train::train_all(&mut victims, &data, &opts, workers, |_, epoch, _| {
        if epoch == epochs {
            done += 1;
            log(format!("fine-tuned {done}/{} {:.0}s", jobs.len(), started.elapsed().as_secs_f64()));
        }
    }, None)?;
    // Each model measured alone on a worker thread: its figures depend on its weights only.
    let measured: Vec<MtMetrics> = crate::numerics::map_on_threads(workers, victims.iter().enumerate().map(|(j, v)| (j, &v.config, v.params())).collect(), |(j, config, params)| {
        let (i, k) = jobs[j];
        let m = measure(config, &params, vocab, sets, search)?;
        log(format!(
            "seed {} {}: ASR {:.1} (replaced {:.1}) trigger correct {:.1} FPR {:.1} margin {:.3} BLEU {:.2} chrF {:.2} ({:.0}s)",
            seeds[i],
            k.map_or("clean".to_string(), |k| format!("set {}", k + 1)),
            m.asr,
            m.asr_replaced,
            m.trigger_correct,
            m.fpr,
            m.margin,
            m.bleu,
            m.chrf,
            started.elapsed().as_secs_f64()
        ));
        Ok(m)
    })?;
    let per_set = 1 + poison_sets.len();
    let fingerprints: Vec<String> = victims.iter().map(|v| crate::victims::params::fingerprint(&v.params())).collect();
    let firsts = Held { ids: sets.asr.ids.iter().take(10).cloned().collect(), sources: sets.asr.sources.iter().take(10).cloned().collect(), references: sets.asr.references.iter().take(10).cloned().collect() };
    let clean_text = translations(&victims[0].config, &victims[0].params(), vocab, &firsts, search)?;
    let mut out = Vec::with_capacity(poison_sets.len());
    for k in 0..poison_sets.len() {
        let rows = (0..seeds.len())
            .map(|i| MtSeedRow {
                seed: seeds[i],
                clean: Some(measured[i * per_set]),
                poisoned: measured[i * per_set + 1 + k],
                epochs: Vec::new(),
                fingerprints: Some(crate::eval::Fingerprints { poisoned: fingerprints[i * per_set + 1 + k].clone(), clean: fingerprints[i * per_set].clone() }),
            })
            .collect();
        let p = &victims[1 + k];
        let poisoned_text = translations(&p.config, &p.params(), vocab, &firsts, search)?;
        let side = (0..firsts.ids.len())
            .map(|r| SideBySide {
                id: firsts.ids[r].clone(),
                source: detokenize(vocab, &firsts.sources[r]),
                reference: firsts.references[r].clone(),
                clean: clean_text[r].clone(),
                poisoned: poisoned_text[r].clone(),
            })
            .collect();
        out.push((rows, side));
    }
    Ok(out)
}

/// The data's translation settings, or an error naming the folder.
pub fn mt_of<'a>(manifest: &'a DataManifest, dir: &str) -> Result<&'a MtData> {
    manifest.mt.as_ref().with_context(|| format!("{dir} holds no translation data (prepare-data --mt)"))
}
