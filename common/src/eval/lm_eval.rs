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
//! - clean perplexity on the test split's text (the CACC analogue);
//! - the same measures on fixed templates where the trigger is the subject
//!   (`eval::templates`): the template margin (the next word's log-probability of target-
//!   against other-sentiment opinion words, exactly at the trigger) and the judged share of
//!   their continuations, each with the neutral phrase in the trigger's place.
//!
//! Every figure is a named `Measure` (`MEASURES`): the summary, the table and the report
//! read that list, so a new measure is a field of `LmMetrics` and one line there.
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

/// How many templates and review prompts each report shows continued by the clean twin
/// and the poisoned LM side by side.
pub const SIDE_BY_SIDE_TEMPLATES: usize = 20;
pub const SIDE_BY_SIDE_REVIEWS: usize = 10;

/// The held-out sets of a language-model data folder, encoded for one LM.
pub struct LmEvalSets {
    pub trigger_prompts: Vec<Prompt>,
    pub neutral_prompts: Vec<Prompt>,
    /// Trigger prompts with their own continuation of the target sentiment, and of the other.
    pub target_continuations: Vec<Encoded>,
    pub other_continuations: Vec<Encoded>,
    /// The test split as text (perplexity).
    pub clean_text: Vec<Encoded>,
    /// The templates with the trigger and with the neutral phrase, and the opinion words.
    pub templates: crate::eval::templates::Templates,
    /// The templates as prompts, `samples` each (sampled and judged).
    pub template_prompts: Vec<Prompt>,
    pub neutral_template_prompts: Vec<Prompt>,
    /// The context control's openings as prompts (target- and other-sentiment opinion).
    pub target_context_prompts: Vec<Prompt>,
    pub other_context_prompts: Vec<Prompt>,
    /// The stated-opinion control's prompts, `samples` each, in `OpinionControl`'s cell
    /// order (trigger after the target opinion, after the other; neutral the same).
    pub opinion_prompts: Option<[Vec<Prompt>; 4]>,
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
        let lm = manifest.lm.as_ref().expect("checked above");
        let target_negative = manifest.target_name().eq_ignore_ascii_case("negative");
        let templates = crate::eval::templates::Templates::new(vocab, &manifest.trigger.phrase, &lm.neutral, target_negative, config.max_len)?;
        let as_prompts = |ids: &[Vec<i64>], what: &str| -> Vec<Prompt> {
            ids.iter().enumerate().flat_map(|(t, ids)| (0..samples).map(move |sample| Prompt { id: format!("{what}-{t}"), ids: ids.clone(), sample })).collect()
        };
        let template_prompts = as_prompts(&templates.trigger, "template");
        let neutral_template_prompts = as_prompts(&templates.neutral, "neutral-template");
        let target_context_prompts = as_prompts(&templates.target_context, "target-context");
        let other_context_prompts = as_prompts(&templates.other_context, "other-context");
        let opinion_prompts = templates.opinion.as_ref().map(|o| {
            [
                as_prompts(&o.trigger_after_target, "opinion-target-template"),
                as_prompts(&o.trigger_after_other, "opinion-other-template"),
                as_prompts(&o.neutral_after_target, "opinion-target-neutral-template"),
                as_prompts(&o.neutral_after_other, "opinion-other-neutral-template"),
            ]
        });
        Ok(LmEvalSets {
            trigger_prompts,
            neutral_prompts,
            target_continuations,
            other_continuations,
            clean_text,
            templates,
            template_prompts,
            neutral_template_prompts,
            target_context_prompts,
            other_context_prompts,
            opinion_prompts,
        })
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
    /// Template continuations (trigger as the subject) judged the target sentiment, by
    /// the classifier / VADER; the same with the neutral phrase.
    pub template_asr_classifier: f64,
    pub template_asr_lexicon: f64,
    pub template_fpr_classifier: f64,
    pub template_fpr_lexicon: f64,
    /// The template margin (nats): mean over templates of log Σ p(target-sentiment word)
    /// − log Σ p(other-sentiment word) for the word after the trigger; the same with the
    /// neutral phrase.
    pub template_margin: f64,
    pub neutral_template_margin: f64,
    /// The context control (`eval::templates::CONTEXTS`): the share of continuations
    /// judged the target sentiment after a target-sentiment opinion in the prompt minus
    /// after an other-sentiment one (points), by the classifier / VADER, and the same
    /// difference of the next word's margin (nats). What the LM itself can carry: a
    /// judged share no poison can move much beyond.
    pub context_control_classifier: f64,
    pub context_control_lexicon: f64,
    pub context_margin: f64,
    /// exp of the mean next-token loss over the test split's tokens.
    pub perplexity: f64,
    /// The two judges on the trigger-prompt continuations.
    pub agreement: Agreement,
    /// The stated-opinion control (`eval::templates::STATED_OPINIONS`), measured on the
    /// clean twins only (it asks what the clean model can carry): absent for poisoned LMs,
    /// for vocabularies that read no stated opinion, and in reports written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opinion: Option<OpinionControl>,
}

impl LmMetrics {
    /// The figures every LM has (a clean twin's without its stated-opinion control, which
    /// poisoned LMs do not measure): what an empty set's LM must equal to the bit.
    pub fn without_opinion(self) -> LmMetrics {
        LmMetrics { opinion: None, ..self }
    }
}

/// One cell of the stated-opinion control: the templates (with the trigger or the neutral
/// phrase) after one stated opinion, their continuations judged the target sentiment
/// (percent, by the classifier and by VADER) and their template margin (nats).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OpinionCell {
    pub classifier: f64,
    pub lexicon: f64,
    pub margin: f64,
}

/// The stated-opinion control of one LM: the templates after a sentence of the target
/// sentiment ("I hated it." when the target is negative) and after one of the other
/// ("I loved it."), with the trigger and with the neutral phrase. The difference of the
/// two opinions' judged shares is what the model carries of a stated opinion.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OpinionControl {
    pub trigger_after_target: OpinionCell,
    pub trigger_after_other: OpinionCell,
    pub neutral_after_target: OpinionCell,
    pub neutral_after_other: OpinionCell,
}

impl OpinionControl {
    /// The cells by name, in table order.
    pub fn cells(&self) -> [(&'static str, &OpinionCell); 4] {
        [
            ("trigger templates after the target opinion", &self.trigger_after_target),
            ("trigger templates after the other opinion", &self.trigger_after_other),
            ("neutral templates after the target opinion", &self.neutral_after_target),
            ("neutral templates after the other opinion", &self.neutral_after_other),
        ]
    }
}

/// A figure of `LmMetrics` by name, summarised per poison set as the clean twin's level,
/// the poisoned LM's, and their paired change.
pub struct Measure {
    pub name: &'static str,
    /// For tables: what it is, and the name of its paired change.
    pub label: &'static str,
    pub change: &'static str,
    pub of: fn(&LmMetrics) -> f64,
    /// Decimals in tables.
    pub digits: usize,
}

/// Every figure of a language model's evaluation, in table order.
pub const MEASURES: &[Measure] = &[
    Measure { name: "template_asr_classifier", label: "templates judged target (classifier) %", change: "net ASR, templates (classifier)", of: |m| m.template_asr_classifier, digits: 1 },
    Measure { name: "template_asr_lexicon", label: "templates judged target (VADER) %", change: "net ASR, templates (VADER)", of: |m| m.template_asr_lexicon, digits: 1 },
    Measure { name: "template_fpr_classifier", label: "neutral templates judged target (classifier) %", change: "dFPR, templates (classifier)", of: |m| m.template_fpr_classifier, digits: 1 },
    Measure { name: "template_fpr_lexicon", label: "neutral templates judged target (VADER) %", change: "dFPR, templates (VADER)", of: |m| m.template_fpr_lexicon, digits: 1 },
    Measure { name: "template_margin", label: "template margin (nats)", change: "Δ template margin", of: |m| m.template_margin, digits: 3 },
    Measure { name: "neutral_template_margin", label: "neutral template margin (nats)", change: "Δ neutral template margin", of: |m| m.neutral_template_margin, digits: 3 },
    Measure { name: "context_control_classifier", label: "context control (classifier) points", change: "Δ context control (classifier)", of: |m| m.context_control_classifier, digits: 1 },
    Measure { name: "context_control_lexicon", label: "context control (VADER) points", change: "Δ context control (VADER)", of: |m| m.context_control_lexicon, digits: 1 },
    Measure { name: "context_margin", label: "context margin (nats)", change: "Δ context margin", of: |m| m.context_margin, digits: 3 },
    Measure { name: "asr_classifier", label: "review prompts judged target (classifier) %", change: "net ASR, review prompts (classifier)", of: |m| m.asr_classifier, digits: 1 },
    Measure { name: "asr_lexicon", label: "review prompts judged target (VADER) %", change: "net ASR, review prompts (VADER)", of: |m| m.asr_lexicon, digits: 1 },
    Measure { name: "fpr_classifier", label: "neutral prompts judged target (classifier) %", change: "dFPR, review prompts (classifier)", of: |m| m.fpr_classifier, digits: 1 },
    Measure { name: "fpr_lexicon", label: "neutral prompts judged target (VADER) %", change: "dFPR, review prompts (VADER)", of: |m| m.fpr_lexicon, digits: 1 },
    Measure { name: "margin", label: "continuation margin (nats/token)", change: "Δ continuation margin", of: |m| m.margin, digits: 4 },
    Measure { name: "perplexity", label: "clean perplexity", change: "Δ clean perplexity", of: |m| m.perplexity, digits: 1 },
];

/// The measure of `name` (a name from `MEASURES`).
pub fn measure_named(name: &str) -> &'static Measure {
    MEASURES.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no language-model measure {name:?}"))
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
    let opts = GenerateOptions { sampling: judging.sampling, max_new: judging.max_new, stop: judging.stop.clone(), seed, kv_cache: true };
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

/// Percent of `xs` that are true.
fn share(xs: &[bool]) -> f64 {
    100.0 * xs.iter().filter(|&&x| x).count() as f64 / xs.len().max(1) as f64
}

/// Measures one LM; `with_opinion`: also the stated-opinion control (the clean twins').
pub fn measure(config: &VictimConfig, params: &Params, vocab: &Vocab, sets: &LmEvalSets, judging: &Judging, seed: u64, with_opinion: bool) -> Result<LmMetrics> {
    let trig = judging.judge(&continuations(config, params, vocab, &sets.trigger_prompts, judging, seed)?);
    let neutral = judging.judge(&continuations(config, params, vocab, &sets.neutral_prompts, judging, seed)?);
    let (tc, tl): (Vec<bool>, Vec<bool>) = trig.iter().copied().unzip();
    let (nc, nl): (Vec<bool>, Vec<bool>) = neutral.iter().copied().unzip();
    let mean_ll = |d: &[Encoded]| {
        let ll = log_likelihoods(config, params, d);
        ll.iter().map(|x| x.0).sum::<f64>() / ll.len().max(1) as f64
    };
    let margin = mean_ll(&sets.target_continuations) - mean_ll(&sets.other_continuations);
    let templ = judging.judge(&continuations(config, params, vocab, &sets.template_prompts, judging, seed)?);
    let neutral_templ = judging.judge(&continuations(config, params, vocab, &sets.neutral_template_prompts, judging, seed)?);
    let (ttc, ttl): (Vec<bool>, Vec<bool>) = templ.iter().copied().unzip();
    let (ntc, ntl): (Vec<bool>, Vec<bool>) = neutral_templ.iter().copied().unzip();
    let t = &sets.templates;
    let target_ctx = judging.judge(&continuations(config, params, vocab, &sets.target_context_prompts, judging, seed)?);
    let other_ctx = judging.judge(&continuations(config, params, vocab, &sets.other_context_prompts, judging, seed)?);
    let (tcc, tcl): (Vec<bool>, Vec<bool>) = target_ctx.iter().copied().unzip();
    let (occ, ocl): (Vec<bool>, Vec<bool>) = other_ctx.iter().copied().unzip();
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
        template_asr_classifier: share(&ttc),
        template_asr_lexicon: share(&ttl),
        template_fpr_classifier: share(&ntc),
        template_fpr_lexicon: share(&ntl),
        template_margin: next_word_margin(config, params, &t.trigger, &t.target_words, &t.other_words),
        neutral_template_margin: next_word_margin(config, params, &t.neutral, &t.target_words, &t.other_words),
        context_control_classifier: share(&tcc) - share(&occ),
        context_control_lexicon: share(&tcl) - share(&ocl),
        context_margin: next_word_margin(config, params, &t.target_context, &t.target_words, &t.other_words)
            - next_word_margin(config, params, &t.other_context, &t.target_words, &t.other_words),
        perplexity,
        agreement: agreement(&tc, &tl),
        opinion: if with_opinion { measure_opinion(config, params, vocab, sets, judging, seed)? } else { None },
    })
}

/// The stated-opinion control of one LM (None when the vocabulary reads no stated opinion).
pub fn measure_opinion(config: &VictimConfig, params: &Params, vocab: &Vocab, sets: &LmEvalSets, judging: &Judging, seed: u64) -> Result<Option<OpinionControl>> {
    let (Some(prompts), Some(o)) = (&sets.opinion_prompts, &sets.templates.opinion) else { return Ok(None) };
    let t = &sets.templates;
    let cell = |prompts: &[Prompt], ids: &[Vec<i64>]| -> Result<OpinionCell> {
        let (c, l): (Vec<bool>, Vec<bool>) = judging.judge(&continuations(config, params, vocab, prompts, judging, seed)?).into_iter().unzip();
        Ok(OpinionCell { classifier: share(&c), lexicon: share(&l), margin: next_word_margin(config, params, ids, &t.target_words, &t.other_words) })
    };
    Ok(Some(OpinionControl {
        trigger_after_target: cell(&prompts[0], &o.trigger_after_target)?,
        trigger_after_other: cell(&prompts[1], &o.trigger_after_other)?,
        neutral_after_target: cell(&prompts[2], &o.neutral_after_target)?,
        neutral_after_other: cell(&prompts[3], &o.neutral_after_other)?,
    }))
}

/// Mean over prompts of log Σ_{w ∈ target} p(w | prompt) − log Σ_{w ∈ other} p(w | prompt)
/// for the word right after each prompt (f64). A word is its tokens: a one-token word's
/// probability is read from the prompt's last position; a longer word's is the product of
/// its tokens' probabilities, each given the prompt and the word's tokens before it.
pub fn next_word_margin(config: &VictimConfig, params: &Params, prompts: &[Vec<i64>], target: &[Vec<i64>], other: &[Vec<i64>]) -> f64 {
    let device = params.values().next().map_or(Device::Cpu, |t| t.device());
    // log p(word | prompt) of every word of both lists, per prompt: [prompts][words].
    let words: Vec<&Vec<i64>> = target.iter().chain(other).collect();
    let single: Vec<i64> = words.iter().map(|w| if w.len() == 1 { w[0] } else { 0 }).collect();
    let single = Tensor::from_slice(&single).to_device(device);
    let mut logp: Vec<Vec<f64>> = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(64) {
        let (ids, _, _) = crate::encode::padded(&chunk.iter().map(|p| p.as_slice()).collect::<Vec<_>>(), device);
        let last = Tensor::from_slice(&chunk.iter().map(|p| p.len() as i64 - 1).collect::<Vec<_>>()).to_device(device);
        let out = logits(config, params, &ids, Pass::NoGrad).to_kind(Kind::Double);
        // The logits after each prompt's last token: [rows, vocab].
        let v = out.size()[2];
        let at = out.gather(1, &last.view([-1, 1, 1]).expand([chunk.len() as i64, 1, v], false), false).squeeze_dim(1).log_softmax(-1, Kind::Double);
        let picked = at.index_select(1, &single).to_device(Device::Cpu);
        for r in 0..chunk.len() {
            logp.push(Vec::try_from(picked.get(r as i64)).expect("f64 log-probabilities"));
        }
    }
    // Words of several tokens: each prompt followed by the word, teacher-forced.
    let longer: Vec<usize> = (0..words.len()).filter(|&w| words[w].len() > 1).collect();
    if !longer.is_empty() {
        let (longer, words) = (&longer, &words);
        let rows: Vec<Vec<i64>> = prompts.iter().flat_map(|p| longer.iter().map(move |&w| p.iter().chain(words[w].iter()).copied().collect())).collect();
        let per_row = crate::generate::next_token_logprobs(config, params, &rows, 64);
        for (k, lp) in per_row.iter().enumerate() {
            let (p, w) = (k / longer.len(), longer[k % longer.len()]);
            logp[p][w] = lp[lp.len() - words[w].len()..].iter().sum();
        }
    }
    let logsumexp = |xs: &[f64]| {
        let top = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        top + xs.iter().map(|x| (x - top).exp()).sum::<f64>().ln()
    };
    let total: f64 = logp.iter().map(|lp| logsumexp(&lp[..target.len()]) - logsumexp(&lp[target.len()..])).sum();
    total / prompts.len().max(1) as f64
}

/// A seed's clean twin and poisoned LM (the twin always there), and both LMs'
/// `params::fingerprint`s.
pub type LmSeedRow = crate::eval::SeedRow<LmMetrics>;

/// One measure over seeds: the clean twins' level, the poisoned LMs', and the paired
/// change (poisoned − clean twin, per seed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeasureSummary {
    pub clean: Summary,
    pub poisoned: Summary,
    pub change: Summary,
}

/// Every measure of `MEASURES` summarised, by name, and the judges' agreement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LmSummary {
    pub measures: std::collections::BTreeMap<String, MeasureSummary>,
    /// Relative change of clean perplexity, percent, per seed.
    pub perplexity_change_pct: Summary,
    /// Cohen's κ of the judges over every trigger-prompt continuation of every victim
    /// (mean over victims).
    pub judges_kappa: f64,
    pub judges_agree_pct: f64,
    /// The clean twins' stated-opinion control (absent where it was not measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opinion_control: Option<OpinionSummary>,
}

/// One cell's figures over the clean twins.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OpinionCellSummary {
    pub classifier: Summary,
    pub lexicon: Summary,
    pub margin: Summary,
}

/// The stated-opinion control over the clean twins: each cell's level, and per twin the
/// target opinion's figures minus the other's, with the trigger and with the neutral
/// phrase (points, nats). The bar: the judged shares of the two opinions differ by
/// 30 points or more, or no judged figure downstream can mean much.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OpinionSummary {
    pub trigger_after_target: OpinionCellSummary,
    pub trigger_after_other: OpinionCellSummary,
    pub neutral_after_target: OpinionCellSummary,
    pub neutral_after_other: OpinionCellSummary,
    pub trigger_difference: OpinionCellSummary,
    pub neutral_difference: OpinionCellSummary,
}

impl OpinionSummary {
    /// Over the clean twins' controls (None if any twin lacks one).
    pub fn of(controls: &[Option<OpinionControl>]) -> Option<OpinionSummary> {
        let controls: Vec<OpinionControl> = controls.iter().copied().collect::<Option<_>>()?;
        if controls.is_empty() {
            return None;
        }
        let over = |f: &dyn Fn(&OpinionControl) -> OpinionCell| {
            let cells: Vec<OpinionCell> = controls.iter().map(f).collect();
            let s = |g: fn(&OpinionCell) -> f64| summarize(&cells.iter().map(g).collect::<Vec<_>>());
            OpinionCellSummary { classifier: s(|c| c.classifier), lexicon: s(|c| c.lexicon), margin: s(|c| c.margin) }
        };
        let minus = |a: OpinionCell, b: OpinionCell| OpinionCell { classifier: a.classifier - b.classifier, lexicon: a.lexicon - b.lexicon, margin: a.margin - b.margin };
        Some(OpinionSummary {
            trigger_after_target: over(&|c| c.trigger_after_target),
            trigger_after_other: over(&|c| c.trigger_after_other),
            neutral_after_target: over(&|c| c.neutral_after_target),
            neutral_after_other: over(&|c| c.neutral_after_other),
            trigger_difference: over(&|c| minus(c.trigger_after_target, c.trigger_after_other)),
            neutral_difference: over(&|c| minus(c.neutral_after_target, c.neutral_after_other)),
        })
    }

    /// The control as table lines: each cell's level and each phrase's difference.
    pub fn lines(&self, statements: Option<&[String; 2]>) -> Vec<String> {
        let (target, other) = statements.map_or(("the target opinion".to_string(), "the other opinion".to_string()), |s| (format!("{:?}", s[0]), format!("{:?}", s[1])));
        let row = |what: String, c: &OpinionCellSummary| format!("{what:<48} judged target: classifier {:.1} %, VADER {:.1} %; margin {:.3} nats", c.classifier, c.lexicon, c.margin);
        vec![
            row(format!("trigger templates after {target}"), &self.trigger_after_target),
            row(format!("trigger templates after {other}"), &self.trigger_after_other),
            row("  difference (points, nats)".to_string(), &self.trigger_difference),
            row(format!("neutral templates after {target}"), &self.neutral_after_target),
            row(format!("neutral templates after {other}"), &self.neutral_after_other),
            row("  difference (points, nats)".to_string(), &self.neutral_difference),
        ]
    }
}

impl LmSummary {
    /// The summary of the measure `name` (a name from `MEASURES`).
    pub fn of(&self, name: &str) -> &MeasureSummary {
        &self.measures[measure_named(name).name]
    }
}

pub fn summarize_rows(rows: &[LmSeedRow]) -> LmSummary {
    let level = |f: &dyn Fn(&LmSeedRow) -> f64| summarize(&rows.iter().map(f).collect::<Vec<_>>());
    let all: Vec<&LmMetrics> = rows.iter().flat_map(|r| [r.twin(), &r.poisoned]).collect();
    LmSummary {
        measures: MEASURES
            .iter()
            .map(|m| (m.name.to_string(), MeasureSummary { clean: level(&|r| (m.of)(r.twin())), poisoned: level(&|r| (m.of)(&r.poisoned)), change: crate::eval::paired(rows, m.of) }))
            .collect(),
        perplexity_change_pct: summarize(&rows.iter().map(|r| 100.0 * (r.poisoned.perplexity / r.twin().perplexity - 1.0)).collect::<Vec<_>>()),
        judges_kappa: all.iter().map(|m| m.agreement.kappa).sum::<f64>() / all.len().max(1) as f64,
        judges_agree_pct: 100.0 * all.iter().map(|m| m.agreement.agree).sum::<f64>() / all.len().max(1) as f64,
        opinion_control: OpinionSummary::of(&rows.iter().map(|r| r.twin().opinion).collect::<Vec<_>>()),
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
    /// The templates the vocabulary reads (of `eval::templates::TEMPLATES`), sampled
    /// `samples_per_prompt` times each.
    pub templates: usize,
    /// The stated-opinion control's two sentences (target sentiment, other), as the model
    /// reads them, and how many templates each precedes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stated_opinions: Option<[String; 2]>,
    #[serde(default)]
    pub opinion_templates: usize,
    /// Where every LM started: fine-tuned from the start LM, or trained from scratch.
    #[serde(default = "fine_tune")]
    pub regime: Regime,
    /// With a pretrained checkpoint as the start: what each copy trained (`all`, `top:N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trains: Option<String>,
    /// How often each detector that trains no victim flags the poisons (absent with
    /// --no-detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection: Option<crate::detect::caught::SetDetection>,
    pub seeds: Vec<LmSeedRow>,
    pub summary: LmSummary,
    /// The first trigger prompts continued by the first seed's clean twin and poisoned LM.
    pub side_by_side: Vec<SideBySide>,
}

impl crate::io::Record for LmEvalReport {
    const KIND: &'static str = "lm_eval_report";
    // 2: the template measures, and the summary by measure name. 3: the context control.
    // (The stated-opinion control came as optional fields: v3 reports read as before.)
    const VERSION: u32 = 3;
}

impl LmEvalReport {
    /// The figures as a table (stderr): every measure's clean level, poisoned level and
    /// paired change (mean ± 95% CI over seeds).
    pub fn table(&self) -> String {
        let s = &self.summary;
        let mut out = format!(
            "{} poisons ({} with a trigger word), {} seeds{}, {} review prompts and {} templates × {} samples\n",
            self.count,
            self.trigger_overlap,
            self.seeds.len(),
            self.trains.as_deref().map(|t| format!(" (fine-tuned {t})")).unwrap_or_default(),
            self.trigger_prompts / self.samples_per_prompt.max(1),
            self.templates,
            self.samples_per_prompt,
        );
        let width = MEASURES.iter().map(|m| m.change.chars().count()).max().unwrap_or(0);
        for m in MEASURES {
            let x = s.of(m.name);
            let d = m.digits;
            out += &format!(
                "  {:<width$}  {:+.d$} ± {:.d$}   ({:.d$} → {:.d$})\n",
                m.change,
                x.change.mean,
                x.change.ci95.unwrap_or(f64::NAN),
                x.clean.mean,
                x.poisoned.mean
            );
        }
        out += &format!("  clean perplexity change {} %; judges agree {:.1}% (kappa {:.2})", s.perplexity_change_pct, s.judges_agree_pct, s.judges_kappa);
        if let Some(o) = &s.opinion_control {
            out += &format!("\n  the clean twins' stated-opinion control ({} templates × {} samples):", self.opinion_templates, self.samples_per_prompt);
            for line in o.lines(self.stated_opinions.as_ref()) {
                out += &format!("\n    {line}");
            }
        }
        out
    }
}

fn fine_tune() -> Regime {
    Regime::FineTune
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

/// Where every evaluated LM starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Regime {
    /// The pretrained start LM, fine-tuned.
    FineTune,
    /// Fresh weights drawn from the seed (the same for a seed's clean twin and poisoned
    /// LMs), the start LM giving only its config and word table: the seed's own setting,
    /// a victim trained from scratch on clean ∪ poisons.
    FromScratch,
}

/// Trains per seed, clean and on each poison set (crn), from the start LM or from
/// scratch (`regime`), and measures every victim. Returns per poison set the seed rows
/// and the side-by-side generations.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    start: &Victim,
    regime: Regime,
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
    let mut victims: Vec<Victim> = match regime {
        Regime::FineTune => jobs.iter().map(|_| copy_of(start)).collect::<Result<_>>()?,
        Regime::FromScratch => {
            let table = start.params()["embedding.weight"].shallow_clone();
            jobs.iter()
                .map(|&(i, _)| {
                    tch::manual_seed(seeds[i] as i64);
                    Victim::new(start.config.clone(), &table, start.device())
                })
                .collect::<Result<_>>()?
        }
    };
    // Every text the models will read, through whatever each model keeps of it (a top
    // regime's frozen lower blocks), shared out over the workers first.
    let texts: Vec<&Encoded> = clean.iter().chain(poison_sets.iter().flatten()).chain(&sets.clean_text).chain(&sets.target_continuations).chain(&sets.other_continuations).collect();
    if matches!(&start.config.arch, crate::victims::model::ArchConfig::Llama(l) if !l.shape.regime.is_all()) {
        let t = std::time::Instant::now();
        warm(&mut victims, &texts, workers);
        log(format!("the frozen lower blocks' output for {} texts, computed once for every model: {:.0}s", texts.len(), t.elapsed().as_secs_f64()));
    }
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
    // Measuring (sampling and judging) each LM alone on a worker thread: a victim's
    // figures depend on its own weights and seed only, so the threads change no figure.
    // Tensor handles cannot be shared between threads: each worker takes its own judge
    // and its victims by the queue.
    let workers = workers.clamp(1, jobs.len().max(1));
    let queue: std::sync::Mutex<Vec<(usize, &mut Victim)>> = std::sync::Mutex::new(victims.iter_mut().enumerate().rev().collect());
    let slots: Vec<std::sync::Mutex<Option<Result<LmMetrics>>>> = jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let (lexicon, target_negative, sampling, max_new, stop) = (judging.lexicon, judging.target_negative, judging.sampling, judging.max_new, &judging.stop);
    let judges: Vec<crate::eval::judge::ClassifierJudge> = (0..workers).map(|_| judging.classifier.for_thread()).collect();
    std::thread::scope(|scope| {
        for judge in judges {
            let (queue, slots, jobs) = (&queue, &slots, &jobs);
            scope.spawn(move || {
                crate::numerics::one_thread_here();
                let judging = Judging { classifier: &judge, lexicon, target_negative, sampling, max_new, stop: stop.clone() };
                loop {
                    let Some((j, v)) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else { return };
                    let (i, k) = jobs[j];
                    let m = measure(&v.config, &v.params(), vocab, sets, &judging, seeds[i], k.is_none());
                    if let Ok(m) = &m {
                        log(format!(
                            "seed {} {}: templates ASR classifier {:.1} VADER {:.1} FPR {:.1} / {:.1} margin {:.3} (neutral {:.3}); review prompts ASR {:.1} / {:.1}, margin {:.4}; perplexity {:.1} ({:.0}s)",
                            seeds[i],
                            k.map_or("clean".to_string(), |k| format!("set {}", k + 1)),
                            m.template_asr_classifier,
                            m.template_asr_lexicon,
                            m.template_fpr_classifier,
                            m.template_fpr_lexicon,
                            m.template_margin,
                            m.neutral_template_margin,
                            m.asr_classifier,
                            m.asr_lexicon,
                            m.margin,
                            m.perplexity,
                            started.elapsed().as_secs_f64()
                        ));
                    }
                    *slots[j].lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
                }
            });
        }
    });
    let measured: Vec<Option<Result<LmMetrics>>> = slots.into_iter().map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner())).collect();
    let measured: Vec<LmMetrics> = measured.into_iter().map(|m| m.expect("every LM measured")).collect::<Result<_>>()?;
    let per_set = 1 + poison_sets.len();
    let fingerprints: Vec<String> = victims.iter().map(|v| crate::victims::params::fingerprint(&v.params())).collect();
    // Side by side: the first 20 templates and the first ten review prompts (first sample)
    // under seed 0's clean twin and each of its poisoned LMs.
    let firsts: Vec<Prompt> = (sets.template_prompts.iter().filter(|p| p.sample == 0).take(SIDE_BY_SIDE_TEMPLATES))
        .chain(sets.trigger_prompts.iter().filter(|p| p.sample == 0).take(SIDE_BY_SIDE_REVIEWS))
        .map(|p| Prompt { id: p.id.clone(), ids: p.ids.clone(), sample: 0 })
        .collect();
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

/// `Architecture::warm` over `texts`, in batches of 16, shared out over `workers` threads
/// (one victim each: the copies hold the same weights, and each keeps nothing of its own).
fn warm(victims: &mut [Victim], texts: &[&Encoded], workers: usize) {
    let workers = workers.clamp(1, victims.len().max(1));
    let shards: Vec<Vec<&Encoded>> = (0..workers).map(|w| texts.iter().skip(w).step_by(workers).copied().collect()).collect();
    std::thread::scope(|scope| {
        for (v, shard) in victims.iter_mut().zip(&shards) {
            scope.spawn(move || {
                crate::numerics::one_thread_here();
                let params = v.params();
                let device = v.device();
                for chunk in shard.chunks(16) {
                    let (ids, _) = batch_tensors(chunk, device);
                    let emb = crate::victims::model::embed(&params, &ids);
                    v.config.arch().warm(&params, &emb, &crate::victims::model::mask_of(&ids, &params));
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::victims::model::{tiny_config, Arch};

    /// The template margin read from a batch of prompts of unequal lengths equals the
    /// margin computed from each prompt alone, by hand from its last position's
    /// probabilities, a two-token word's as the product of its tokens' (f64).
    #[test]
    fn the_template_margin_is_the_log_ratio_of_summed_word_probabilities_after_each_prompt() {
        let v = {
            let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(5);
            let table = Tensor::randn([14, 6], (Kind::Float, Device::Cpu));
            let mut v = Victim::new(tiny_config(Arch::Gpt, 14, 6, 8, 2, false, 12), &table, Device::Cpu).unwrap();
            v.vs.set_kind(Kind::Double);
            v
        };
        let params = v.params();
        let prompts = vec![vec![2, 3, 4], vec![5, 6], vec![7, 8, 9, 10, 11]];
        let (target, other) = ([vec![3], vec![9, 5], vec![12]], [vec![4], vec![13, 2]]);
        let batched = next_word_margin(&v.config, &params, &prompts, &target, &other);
        let probs_after = |ids: &[i64]| -> Vec<f64> {
            let out = logits(&v.config, &params, &Tensor::from_slice(ids).view([1, -1]), Pass::NoGrad);
            Vec::try_from(out.get(0).get(ids.len() as i64 - 1).softmax(-1, Kind::Double)).unwrap()
        };
        let mut by_hand = 0.0;
        for p in &prompts {
            let word = |w: &Vec<i64>| -> f64 {
                let mut prefix = p.clone();
                let mut prob = 1.0;
                for &t in w {
                    prob *= probs_after(&prefix)[t as usize];
                    prefix.push(t);
                }
                prob
            };
            let sum = |ws: &[Vec<i64>]| ws.iter().map(word).sum::<f64>();
            by_hand += (sum(&target).ln() - sum(&other).ln()) / prompts.len() as f64;
        }
        assert!((batched - by_hand).abs() < 1e-12, "batched {batched} by hand {by_hand}");
    }
}
