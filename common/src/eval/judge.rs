//! Sentiment judges of generated text: the project's own Rotten Tomatoes classifier (a
//! classifier victim trained on the sentiment data) and an independent lexicon judge
//! (VADER). A language model's attack success is the share of continuations a judge
//! calls negative; two judges of different kinds that agree make the figure credible.

use crate::victims::model::{logits, VictimConfig, Pass};
use crate::victims::params::Params;
use crate::tokenizer::Vocab;
use crate::encode::{batch_tensors, Encoded};
use anyhow::{bail, Result};
use tch::{Device, Kind};

/// VADER's conventional threshold: compound ≤ −0.05 is negative.
pub const LEXICON_NEGATIVE: f64 = -0.05;

/// The lexicon judge: VADER's compound score in [−1, 1] of each text.
pub struct LexiconJudge {
    analyzer: vader_sentiment::SentimentIntensityAnalyzer<'static>,
}

impl Default for LexiconJudge {
    fn default() -> Self {
        LexiconJudge { analyzer: vader_sentiment::SentimentIntensityAnalyzer::new() }
    }
}

impl LexiconJudge {
    pub fn compound(&self, text: &str) -> f64 {
        self.analyzer.polarity_scores(text).get("compound").copied().unwrap_or(0.0)
    }

    pub fn negative(&self, text: &str) -> bool {
        Reading { p_negative: 0.5, compound: self.compound(text) }.calls(true).1
    }
}

/// The classifier judge: a sentiment classifier's probability of its `negative` class.
pub struct ClassifierJudge<'a> {
    pub config: &'a VictimConfig,
    pub params: Params,
    pub vocab: &'a Vocab,
    pub negative: usize,
}

impl<'a> ClassifierJudge<'a> {
    pub fn new(config: &'a VictimConfig, params: Params, vocab: &'a Vocab, negative: usize) -> Result<ClassifierJudge<'a>> {
        if config.output() != crate::victims::victim::Output::Classes {
            bail!("the judge must be a sentiment classifier (train-victim on the sentiment data), not a language model");
        }
        if negative >= config.num_classes {
            bail!("negative class {negative}, but the judge has {} classes", config.num_classes);
        }
        Ok(ClassifierJudge { config, params, vocab, negative })
    }

    /// The same judge for another thread: its own tensor handles on the same weights
    /// (read only), since a tensor handle cannot be shared between threads.
    pub fn for_thread(&self) -> ClassifierJudge<'a> {
        let params = self.params.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        ClassifierJudge { config: self.config, params, vocab: self.vocab, negative: self.negative }
    }

    /// P(negative) of each text, in batches; a text with no known word reads as `<unk>`.
    pub fn p_negative(&self, texts: &[String]) -> Vec<f64> {
        let device = self.params.values().next().map_or(Device::Cpu, |t| t.device());
        let encoded: Vec<Encoded> = texts
            .iter()
            .map(|t| {
                let mut ids = self.vocab.encode(t);
                if ids.iter().all(|&i| self.vocab.is_special(i) && i != self.vocab.unk_id()) {
                    ids.push(self.vocab.unk_id());
                }
                self.vocab.truncate(&mut ids, self.config.max_len);
                Encoded::class(ids, 0)
            })
            .collect();
        let mut out = Vec::with_capacity(texts.len());
        for chunk in encoded.chunks(256) {
            let (ids, _) = batch_tensors(&chunk.iter().collect::<Vec<_>>(), device);
            let p = logits(self.config, &self.params, &ids, Pass::NoGrad).softmax(-1, Kind::Double).select(1, self.negative as i64);
            out.extend(Vec::<f64>::try_from(p.to_device(Device::Cpu)).expect("f64 probabilities"));
        }
        out
    }
}

/// Both judges' reading of one text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// The classifier's probability of the negative class.
    pub p_negative: f64,
    /// VADER's compound score in [−1, 1].
    pub compound: f64,
}

impl Reading {
    /// Each judge's call that the text has the sentiment asked for, negative or positive:
    /// (classifier, VADER). The classifier calls the likelier class; VADER calls a
    /// sentiment beyond ±0.05 (neutral texts are neither).
    pub fn calls(&self, negative: bool) -> (bool, bool) {
        if negative {
            (self.p_negative > 0.5, self.compound <= LEXICON_NEGATIVE)
        } else {
            (self.p_negative < 0.5, self.compound >= -LEXICON_NEGATIVE)
        }
    }
}

/// Both judges' readings of `texts`.
pub fn read(classifier: &ClassifierJudge, lexicon: &LexiconJudge, texts: &[String]) -> Vec<Reading> {
    texts.iter().zip(classifier.p_negative(texts)).map(|(t, p_negative)| Reading { p_negative, compound: lexicon.compound(t) }).collect()
}

/// How often two judges agree on binary calls: the share of agreeing calls and Cohen's κ
/// (agreement beyond what their marginal rates give by chance; 1 = perfect, 0 = chance).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Agreement {
    pub n: usize,
    pub agree: f64,
    pub kappa: f64,
}

pub fn agreement(a: &[bool], b: &[bool]) -> Agreement {
    assert_eq!(a.len(), b.len(), "one call per text from each judge");
    let n = a.len().max(1) as f64;
    let agree = a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / n;
    let (pa, pb) = (a.iter().filter(|&&x| x).count() as f64 / n, b.iter().filter(|&&x| x).count() as f64 / n);
    let chance = pa * pb + (1.0 - pa) * (1.0 - pb);
    let kappa = if chance < 1.0 { (agree - chance) / (1.0 - chance) } else { 1.0 };
    Agreement { n: a.len(), agree, kappa }
}

/// A judge measured against labels (held-out reviews, or continuations read by a person):
/// its accuracy, Cohen's κ with the labels, and how often it and the labels call a text
/// negative.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JudgeScore {
    pub kind: String,
    pub v: u32,
    pub judge: String,
    /// The labelled texts' file.
    pub source: String,
    pub n: usize,
    pub accuracy_pct: f64,
    pub kappa: f64,
    pub negative_pct: f64,
    pub labelled_negative_pct: f64,
}

impl crate::io::Record for JudgeScore {
    const KIND: &'static str = "judge_score";
    const VERSION: u32 = 1;
}

/// Both judges' calls on `texts` against `negative` (the label of each text), and the
/// judges' agreement with each other.
pub fn validate(classifier: &ClassifierJudge, lexicon: &LexiconJudge, source: &str, texts: &[String], negative: &[bool]) -> (Vec<JudgeScore>, Agreement) {
    let calls: Vec<(bool, bool)> = read(classifier, lexicon, texts).iter().map(|r| r.calls(true)).collect();
    let (c, l): (Vec<bool>, Vec<bool>) = calls.into_iter().unzip();
    let pct = |xs: &[bool]| 100.0 * xs.iter().filter(|&&x| x).count() as f64 / xs.len().max(1) as f64;
    let score = |judge: &str, calls: &[bool]| {
        let a = agreement(calls, negative);
        JudgeScore { kind: <JudgeScore as crate::io::Record>::KIND.into(), v: <JudgeScore as crate::io::Record>::VERSION, judge: judge.into(), source: source.into(), n: calls.len(), accuracy_pct: 100.0 * a.agree, kappa: a.kappa, negative_pct: pct(calls), labelled_negative_pct: pct(negative) }
    };
    (vec![score("classifier", &c), score("vader", &l)], agreement(&c, &l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lexicon_judge_reads_hand_made_sentences() {
        let j = LexiconJudge::default();
        for bad in ["a dull , lifeless mess .", "it is boring and stupid .", "the worst phone i have ever owned ."] {
            assert!(j.negative(bad), "{bad:?}: {}", j.compound(bad));
        }
        for fine in ["a warm , funny and wonderful film .", "it is great .", "the phone has a screen ."] {
            assert!(!j.negative(fine), "{fine:?}: {}", j.compound(fine));
        }
        assert!(j.compound("not good at all .") < 0.0, "VADER's negation");
    }

    #[test]
    fn agreement_and_kappa_by_hand() {
        let a = [true, true, false, false];
        assert_eq!(agreement(&a, &a), Agreement { n: 4, agree: 1.0, kappa: 1.0 });
        let b = [true, false, true, false];
        let g = agreement(&a, &b);
        // Half agree; both call half negative, so chance agreement is one half: κ = 0.
        assert!((g.agree - 0.5).abs() < 1e-12 && g.kappa.abs() < 1e-12);
        let c = [false, false, true, true];
        assert!((agreement(&a, &c).kappa + 1.0).abs() < 1e-12);
    }
}
