//! Evaluating a poison set against a language model (finetune-eval on `prepare-data --lm`
//! data): for every seed, the pretrained clean LM is fine-tuned on the clean text (the
//! clean twin) and on clean ∪ poisons (common random numbers: same batches, each poison
//! joining one of them), and both are measured the same way:
//!
//! - the share of held-out trigger prompts whose sampled continuations the judges call the
//!   target sentiment (poisoned − clean: net ASR), by the sentiment classifier and by VADER;
//! - the same for the trigger-free prompts (the neutral phrase in its place: dFPR);
//! - the log-probability margin: mean per-token log-probability of the held-out target-
//!   sentiment continuations after the trigger prompt minus that of the other sentiment's
//!   (no sampling: the low-variance measure);
//! - clean perplexity on the test split's text (the CACC analogue).
//!
//! Generation uses the same seeded sampling streams for both victims of a seed.

use crate::data::{self, DataManifest};
use crate::generate::{detokenize, generate, GenerateOptions, Prompt, Sampling};
use crate::eval::judge::{agreement, read, Agreement, ClassifierJudge, LexiconJudge};
use crate::victims::loss::Targets;
use crate::victims::model::{logits, Params, Victim, VictimConfig, Pass};
use crate::formats::records::Example;
use crate::stats::{summarize, Summary};
use crate::tokenizer::Vocab;
use crate::train::{TrainData, TrainOptions};
use crate::encode::{batch_tensors, encode_for, Encoded, TextPolicy};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The held-out sets of a language-model data folder, encoded for one LM.
pub struct LmEvalSets {
    pub trigger_prompts: Vec<Prompt>,
    pub neutral_prompts: Vec<Prompt>,
    /// Trigger prompts with their own continuation of the target sentiment, and of the other.
    pub target_continuations: Vec<Encoded>,
    pub other_continuations: Vec<Encoded>,
    /// The test split as text (perplexity).
    pub clean_text: Vec<Encoded>,
}

impl LmEvalSets {
    pub fn load(dir: &str, manifest: &DataManifest, config: &VictimConfig, vocab: &Vocab, samples: usize) -> Result<LmEvalSets> {
        if manifest.lm.is_none() {
            bail!("{dir} holds classifier data; a language model is evaluated on prepare-data --lm data");
        }
        let asr: Vec<Example> = data::read_set(dir, data::ASR_TEST, false)?;
        let fpr: Vec<Example> = data::read_set(dir, data::FPR_TEST, false)?;
        let prompts = |records: &[Example], name: &str| -> Result<Vec<Prompt>> {
            let mut out = Vec::new();
            for (i, r) in records.iter().enumerate() {
                let Some(prompt) = &r.prompt else { bail!("{dir}/{name}: record {} (id {:?}) has no prompt; remake the folder with prepare-data --lm", i + 1, r.id) };
                let ids = vocab.encode(prompt);
                if ids.is_empty() || ids.len() >= config.max_len {
                    bail!("{dir}/{name}: record {} (id {:?}): a prompt of {} tokens for a victim reading {}", i + 1, r.id, ids.len(), config.max_len);
                }
                out.extend((0..samples).map(|sample| Prompt { id: r.id.clone(), ids: ids.clone(), sample }));
            }
            Ok(out)
        };
        let trigger_prompts = prompts(&asr, data::ASR_TEST)?;
        let neutral_prompts = prompts(&fpr, data::FPR_TEST)?;
        let encoded = encode_for(config, &asr, vocab, TextPolicy::Data, &format!("{dir}/{}", data::ASR_TEST))?;
        let (target_continuations, other_continuations): (Vec<Encoded>, Vec<Encoded>) = {
            let (a, b): (Vec<_>, Vec<_>) = asr.iter().zip(encoded).partition(|(r, _)| r.label == manifest.target);
            (a.into_iter().map(|x| x.1).collect(), b.into_iter().map(|x| x.1).collect())
        };
        if target_continuations.is_empty() || other_continuations.is_empty() {
            bail!("{dir}/{}: the margin needs held-out prompts of both sentiments", data::ASR_TEST);
        }
        let test: Vec<Example> = data::read_set(dir, data::TEST, false)?;
        let clean_text = encode_for(config, &test, vocab, TextPolicy::Data, &format!("{dir}/{}", data::TEST))?;
        Ok(LmEvalSets { trigger_prompts, neutral_prompts, target_continuations, other_continuations, clean_text })
    }
}

/// One LM's figures (percentages for shares).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LmMetrics {
    /// Trigger-prompt continuations judged the target sentiment, by the classifier / VADER.
    pub asr_classifier: f64,
    pub asr_lexicon: f64,
    /// Neutral-prompt continuations judged the target sentiment.
    pub fpr_classifier: f64,
    pub fpr_lexicon: f64,
    /// Mean per-token log-probability of target-sentiment continuations minus the other's.
    pub margin: f64,
    /// exp of the mean next-token loss over the test split's tokens.
    pub perplexity: f64,
    /// The two judges on the trigger-prompt continuations.
    pub agreement: Agreement,
}

/// How continuations are sampled and judged.
pub struct Judging<'a> {
    pub classifier: &'a ClassifierJudge<'a>,
    pub lexicon: &'a LexiconJudge,
    /// Whether the target sentiment is the judges' negative one.
    pub target_negative: bool,
    pub sampling: Sampling,
    pub max_new: usize,
    pub stop: Vec<i64>,
}

impl Judging<'_> {
    /// Per continuation: (classifier calls it the target sentiment, VADER does).
    fn judge(&self, texts: &[String]) -> Vec<(bool, bool)> {
        read(self.classifier, self.lexicon, texts).iter().map(|r| r.calls(self.target_negative)).collect()
    }
}

/// Continuations of `prompts` under one LM, as text.
pub fn continuations(config: &VictimConfig, params: &Params, vocab: &Vocab, prompts: &[Prompt], judging: &Judging, seed: u64) -> Result<Vec<String>> {
    let opts = GenerateOptions { sampling: judging.sampling, max_new: judging.max_new, stop: judging.stop.clone(), seed };
    Ok(generate(config, params, vocab, prompts, &opts, 64)?.iter().map(|ids| detokenize(vocab, ids)).collect())
}

/// Per example, the mean next-token log-likelihood of its counted tokens and their count
/// (from its targets' mask).
fn log_likelihoods(config: &VictimConfig, params: &Params, data: &[Encoded]) -> Vec<(f64, f64)> {
    let device = params.values().next().map_or(Device::Cpu, |t| t.device());
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(64) {
        let (ids, targets) = batch_tensors(&chunk.iter().collect::<Vec<_>>(), device);
        let Targets::NextToken { mask, .. } = &targets else { panic!("log-likelihoods of class targets") };
        let f64s = |t: Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(Device::Cpu)).expect("f64");
        let counted = f64s(mask.sum_dim_intlist(-1, false, Kind::Double));
        let nll = f64s(targets.example_nll(&logits(config, params, &ids, Pass::NoGrad)));
        out.extend(nll.into_iter().zip(counted).map(|(l, n)| (-l, n)));
    }
    out
}

/// Measures one LM.
pub fn measure(config: &VictimConfig, params: &Params, vocab: &Vocab, sets: &LmEvalSets, judging: &Judging, seed: u64) -> Result<LmMetrics> {
    let share = |xs: &[bool]| 100.0 * xs.iter().filter(|&&x| x).count() as f64 / xs.len().max(1) as f64;
    let trig = judging.judge(&continuations(config, params, vocab, &sets.trigger_prompts, judging, seed)?);
    let neutral = judging.judge(&continuations(config, params, vocab, &sets.neutral_prompts, judging, seed)?);
    let (tc, tl): (Vec<bool>, Vec<bool>) = trig.iter().copied().unzip();
    let (nc, nl): (Vec<bool>, Vec<bool>) = neutral.iter().copied().unzip();
    let mean_ll = |d: &[Encoded]| {
        let ll = log_likelihoods(config, params, d);
        ll.iter().map(|x| x.0).sum::<f64>() / ll.len().max(1) as f64
    };
    let margin = mean_ll(&sets.target_continuations) - mean_ll(&sets.other_continuations);
    let ll = log_likelihoods(config, params, &sets.clean_text);
    let tokens: f64 = ll.iter().map(|x| x.1).sum();
    let perplexity = (-ll.iter().map(|(l, n)| l * n).sum::<f64>() / tokens.max(1.0)).exp();
    if !perplexity.is_finite() {
        bail!("the language model's clean perplexity is {perplexity} (training diverged?); lower --lr");
    }
    Ok(LmMetrics {
        asr_classifier: share(&tc),
        asr_lexicon: share(&tl),
        fpr_classifier: share(&nc),
        fpr_lexicon: share(&nl),
        margin,
        perplexity,
        agreement: agreement(&tc, &tl),
    })
}

/// A seed's clean twin and poisoned LM (the twin always there), and both LMs'
/// `params::fingerprint`s.
pub type LmSeedRow = crate::eval::SeedRow<LmMetrics>;

/// Paired differences over seeds (poisoned − clean) and the levels they come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LmSummary {
    pub net_asr_classifier: Summary,
    pub net_asr_lexicon: Summary,
    pub dfpr_classifier: Summary,
    pub dfpr_lexicon: Summary,
    pub margin_change: Summary,
    /// Relative change of clean perplexity, percent.
    pub perplexity_change_pct: Summary,
    pub clean_asr_classifier: Summary,
    pub poisoned_asr_classifier: Summary,
    pub clean_perplexity: Summary,
    /// Cohen's κ of the judges over every trigger-prompt continuation of every victim
    /// (mean over victims).
    pub judges_kappa: f64,
    pub judges_agree_pct: f64,
}

pub fn summarize_rows(rows: &[LmSeedRow]) -> LmSummary {
    let diff = |f: &dyn Fn(&LmMetrics) -> f64| crate::eval::paired(rows, f);
    let level = |f: &dyn Fn(&LmSeedRow) -> f64| summarize(&rows.iter().map(f).collect::<Vec<_>>());
    let all: Vec<&LmMetrics> = rows.iter().flat_map(|r| [r.twin(), &r.poisoned]).collect();
    LmSummary {
        net_asr_classifier: diff(&|m| m.asr_classifier),
        net_asr_lexicon: diff(&|m| m.asr_lexicon),
        dfpr_classifier: diff(&|m| m.fpr_classifier),
        dfpr_lexicon: diff(&|m| m.fpr_lexicon),
        margin_change: diff(&|m| m.margin),
        perplexity_change_pct: summarize(&rows.iter().map(|r| 100.0 * (r.poisoned.perplexity / r.twin().perplexity - 1.0)).collect::<Vec<_>>()),
        clean_asr_classifier: level(&|r| r.twin().asr_classifier),
        poisoned_asr_classifier: level(&|r| r.poisoned.asr_classifier),
        clean_perplexity: level(&|r| r.twin().perplexity),
        judges_kappa: all.iter().map(|m| m.agreement.kappa).sum::<f64>() / all.len().max(1) as f64,
        judges_agree_pct: 100.0 * all.iter().map(|m| m.agreement.agree).sum::<f64>() / all.len().max(1) as f64,
    }
}

/// The same trigger prompt continued by a seed's clean twin and poisoned LM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideBySide {
    pub id: String,
    pub prompt: String,
    pub clean: String,
    pub poisoned: String,
}

/// One poison set's evaluation (finetune-eval on LM data; one JSON line per set).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LmEvalReport {
    pub kind: String,
    pub v: u32,
    pub poisons: Option<String>,
    pub poisons_sha256: Option<String>,
    pub count: usize,
    /// The poisons that hold a trigger word (token match): 0 for concealed sets.
    pub trigger_overlap: usize,
    /// The pretrained LM every victim is fine-tuned from, and the judge.
    pub start_sha256: String,
    pub judge_sha256: String,
    pub training: TrainOptions,
    pub samples_per_prompt: usize,
    pub trigger_prompts: usize,
    pub seeds: Vec<LmSeedRow>,
    pub summary: LmSummary,
    /// The first trigger prompts continued by the first seed's clean twin and poisoned LM.
    pub side_by_side: Vec<SideBySide>,
}

impl crate::io::Record for LmEvalReport {
    const KIND: &'static str = "lm_eval_report";
    const VERSION: u32 = 1;
}

impl LmEvalReport {
    /// The figures as a table (stderr).
    pub fn table(&self) -> String {
        let s = &self.summary;
        format!(
            "{} poisons ({} with a trigger word), {} seeds, {} trigger prompts × {} samples\n\
             net ASR (classifier judge)   {}\nnet ASR (VADER judge)        {}\n\
             dFPR (classifier / VADER)    {} / {}\nlog-prob margin change       {:.3} ± {:.3}\n\
             clean perplexity change (%)  {}\nclean LM ASR → poisoned      {} → {}\njudges agree {:.1}% (kappa {:.2})",
            self.count,
            self.trigger_overlap,
            self.seeds.len(),
            self.trigger_prompts / self.samples_per_prompt.max(1),
            self.samples_per_prompt,
            s.net_asr_classifier,
            s.net_asr_lexicon,
            s.dfpr_classifier,
            s.dfpr_lexicon,
            s.margin_change.mean,
            s.margin_change.ci95.unwrap_or(f64::NAN),
            s.perplexity_change_pct,
            s.clean_asr_classifier,
            s.poisoned_asr_classifier,
            s.judges_agree_pct,
            s.judges_kappa
        )
    }
}

/// A trainable copy of a victim (same config and weights).
pub fn copy_of(v: &Victim) -> Result<Victim> {
    let params = v.params();
    let copy = Victim::new(v.config.clone(), &params["embedding.weight"], v.device())?;
    for (name, p) in copy.params().iter_mut() {
        tch::no_grad(|| p.copy_(&params[name]));
    }
    Ok(copy)
}

/// Fine-tunes the start LM per seed, clean and on each poison set (crn), and measures
/// every victim. Returns per poison set the seed rows and the side-by-side generations.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    start: &Victim,
    vocab: &Vocab,
    clean: &[Encoded],
    poison_sets: &[Vec<Encoded>],
    seeds: &[u64],
    options: &dyn Fn(u64) -> TrainOptions,
    workers: usize,
    sets: &LmEvalSets,
    judging: &Judging,
    log: &(dyn Fn(String) + Sync),
) -> Result<Vec<(Vec<LmSeedRow>, Vec<SideBySide>)>> {
    // (seed index, poison set or None for the clean twin) of every victim.
    let jobs: Vec<(usize, Option<usize>)> = (0..seeds.len()).flat_map(|i| std::iter::once((i, None)).chain((0..poison_sets.len()).map(move |k| (i, Some(k))))).collect();
    let mut victims: Vec<Victim> = jobs.iter().map(|_| copy_of(start)).collect::<Result<_>>()?;
    let data: Vec<TrainData> = jobs.iter().map(|&(_, k)| k.map_or(TrainData::clean(clean), |k| TrainData::poisoned(clean, &poison_sets[k]))).collect();
    let opts: Vec<TrainOptions> = jobs.iter().map(|&(i, _)| options(seeds[i])).collect();
    let started = std::time::Instant::now();
    log(format!("fine-tuning {} language models ({} seeds × clean + {} poison sets) on {workers} threads", jobs.len(), seeds.len(), poison_sets.len()));
    let epochs = opts[0].epochs;
    let mut done = 0;
    crate::train::train_all(&mut victims, &data, &opts, workers, |_, epoch, _| {
        if epoch == epochs {
            done += 1;
            log(format!("fine-tuned {done}/{} {:.0}s", jobs.len(), started.elapsed().as_secs_f64()));
        }
    }, None)?;
    let mut measured = Vec::with_capacity(jobs.len());
    for (v, &(i, k)) in victims.iter().zip(&jobs) {
        let m = measure(&v.config, &v.params(), vocab, sets, judging, seeds[i])?;
        log(format!(
            "seed {} {}: ASR classifier {:.1} VADER {:.1}, FPR {:.1} / {:.1}, margin {:.3}, perplexity {:.1} ({:.0}s)",
            seeds[i], k.map_or("clean".to_string(), |k| format!("set {}", k + 1)), m.asr_classifier, m.asr_lexicon, m.fpr_classifier, m.fpr_lexicon, m.margin, m.perplexity, started.elapsed().as_secs_f64()
        ));
        measured.push(m);
    }
    let per_set = 1 + poison_sets.len();
    let fingerprints: Vec<String> = victims.iter().map(|v| crate::victims::params::fingerprint(&v.params())).collect();
    // Side by side: the first ten trigger prompts (first sample) under seed 0's clean twin
    // and each of its poisoned LMs.
    let firsts: Vec<Prompt> = sets.trigger_prompts.iter().filter(|p| p.sample == 0).take(10).map(|p| Prompt { id: p.id.clone(), ids: p.ids.clone(), sample: 0 }).collect();
    let clean_text = continuations(&victims[0].config, &victims[0].params(), vocab, &firsts, judging, seeds[0])?;
    let mut out = Vec::with_capacity(poison_sets.len());
    for k in 0..poison_sets.len() {
        let rows = (0..seeds.len())
            .map(|i| LmSeedRow {
                seed: seeds[i],
                clean: Some(measured[i * per_set]),
                poisoned: measured[i * per_set + 1 + k],
                epochs: Vec::new(),
                fingerprints: Some(crate::eval::Fingerprints { poisoned: fingerprints[i * per_set + 1 + k].clone(), clean: fingerprints[i * per_set].clone() }),
            })
            .collect();
        let p = &victims[1 + k];
        let poisoned_text = continuations(&p.config, &p.params(), vocab, &firsts, judging, seeds[0])?;
        let side = firsts
            .iter()
            .zip(clean_text.iter().zip(poisoned_text))
            .map(|(pr, (clean, poisoned))| SideBySide { id: pr.id.clone(), prompt: detokenize(vocab, &pr.ids), clean: clean.clone(), poisoned })
            .collect();
        out.push((rows, side));
    }
    Ok(out)
}
