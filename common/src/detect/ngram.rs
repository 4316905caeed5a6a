//! A word bigram language model with interpolated Kneser–Ney smoothing, the perplexity
//! defenses' stand-in for a neural LM (the project has no language-model victim yet):
//! whole-example perplexity and ONION's per-word perplexity drop (Qi et al., 2021).
//!
//! The model is built from a reference text. Without one the screened set is its own
//! reference, leave-one-out: each example is scored by the model of every *other*
//! example, so it never vouches for itself (poisons that share an unusual bigram still
//! vouch for each other: a known weakness of in-set references).

use std::collections::{HashMap, HashSet};

const BOS: &str = "<s>";
const EOS: &str = "</s>";
/// Kneser–Ney's absolute discount.
const DISCOUNT: f64 = 0.75;

/// Bigram counts and the Kneser–Ney continuation counts they imply.
#[derive(Default)]
pub struct Bigram {
    pair: HashMap<(String, String), f64>,
    /// c(v•): how often v opens a bigram.
    context: HashMap<String, f64>,
    /// N1+(v•): distinct words following v.
    followers: HashMap<String, f64>,
    /// N1+(•w): distinct words preceding w.
    preceders: HashMap<String, f64>,
    /// N1+(••): distinct bigrams.
    distinct_pairs: f64,
    /// Distinct words that can be predicted (every word seen, `</s>`, and one unknown).
    vocabulary: f64,
}

/// The bigrams of a token sequence with sentence markers.
fn bigrams(tokens: &[String]) -> Vec<(String, String)> {
    let mut seq = Vec::with_capacity(tokens.len() + 2);
    seq.push(BOS.to_string());
    seq.extend(tokens.iter().cloned());
    seq.push(EOS.to_string());
    seq.windows(2).map(|w| (w[0].clone(), w[1].clone())).collect()
}

/// Per-bigram counts of one example (what leave-one-out removes).
pub type Own = HashMap<(String, String), f64>;

pub fn own_counts(tokens: &[String]) -> Own {
    let mut own = Own::new();
    for b in bigrams(tokens) {
        *own.entry(b).or_default() += 1.0;
    }
    own
}

impl Bigram {
    /// The model of tokenised sentences.
    pub fn fit<'a>(sentences: impl IntoIterator<Item = &'a [String]>) -> Bigram {
        let mut m = Bigram::default();
        let mut words: HashSet<String> = HashSet::new();
        for s in sentences {
            for (v, w) in bigrams(s) {
                *m.context.entry(v.clone()).or_default() += 1.0;
                let c = m.pair.entry((v.clone(), w.clone())).or_default();
                if *c == 0.0 {
                    *m.followers.entry(v).or_default() += 1.0;
                    *m.preceders.entry(w.clone()).or_default() += 1.0;
                    m.distinct_pairs += 1.0;
                }
                *c += 1.0;
                words.insert(w);
            }
        }
        m.vocabulary = words.len() as f64 + 1.0;
        m
    }

    /// log P(w | v), with `own` (an example's own bigram counts) taken out of the counts
    /// when scoring leave-one-out.
    fn log_prob(&self, v: &str, w: &str, own: Option<&Own>) -> f64 {
        let key = (v.to_string(), w.to_string());
        let mine = |k: &(String, String)| own.and_then(|o| o.get(k)).copied().unwrap_or(0.0);
        let c_vw = self.pair.get(&key).copied().unwrap_or(0.0) - mine(&key);
        // Continuation counts without the example: a bigram seen only in it no longer counts.
        let gone = |k: &(String, String)| own.is_some() && mine(k) > 0.0 && self.pair.get(k).copied().unwrap_or(0.0) - mine(k) <= 0.0;
        let (own_from_v, own_gone_from_v, own_gone_into_w, own_gone_total) = match own {
            Some(o) => (
                o.iter().filter(|(k, _)| k.0 == v).map(|(_, c)| c).sum::<f64>(),
                o.keys().filter(|k| k.0 == v && gone(k)).count() as f64,
                o.keys().filter(|k| k.1 == w && gone(k)).count() as f64,
                o.keys().filter(|k| gone(k)).count() as f64,
            ),
            None => (0.0, 0.0, 0.0, 0.0),
        };
        let preceders = self.preceders.get(w).copied().unwrap_or(0.0) - own_gone_into_w;
        let distinct = self.distinct_pairs - own_gone_total;
        // Continuation probability with add-one over the vocabulary, so unseen words keep mass.
        let p_cont = (preceders + 1.0) / (distinct + self.vocabulary);
        let c_v = self.context.get(v).copied().unwrap_or(0.0) - own_from_v;
        let p = if c_v > 0.0 {
            let followers = self.followers.get(v).copied().unwrap_or(0.0) - own_gone_from_v;
            (c_vw - DISCOUNT).max(0.0) / c_v + DISCOUNT * followers / c_v * p_cont
        } else {
            p_cont
        };
        p.ln()
    }

    /// Mean negative log-probability per predicted token (the log of the perplexity) of a
    /// sentence, `</s>` included.
    pub fn log_perplexity(&self, tokens: &[String], own: Option<&Own>) -> f64 {
        let bs = bigrams(tokens);
        -bs.iter().map(|(v, w)| self.log_prob(v, w, own)).sum::<f64>() / bs.len() as f64
    }

    /// ONION's suspicion: the largest drop in log-perplexity when one word is removed
    /// (0 for a one-word sentence). A word that does not belong (an inserted trigger, an
    /// odd substitute) lowers the perplexity most when removed.
    pub fn onion(&self, tokens: &[String], own: Option<&Own>) -> f64 {
        if tokens.len() < 2 {
            return 0.0;
        }
        let whole = self.log_perplexity(tokens, own);
        (0..tokens.len())
            .map(|i| {
                let without: Vec<String> = tokens.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, t)| t.clone()).collect();
                whole - self.log_perplexity(&without, own)
            })
            .fold(f64::MIN, f64::max)
    }
}

/// `perplexity` and `onion`: one bigram LM, fitted on the reference text when there is one
/// (a clean split the defender trusts), or on the screened set itself, leave-one-out. On
/// translation pairs they read the target side, and `source-perplexity` and
/// `source-onion` the source side under a bigram LM of the sources: one model per
/// language.
pub struct BigramDetectors;

/// Which side of an example a bigram detector reads.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// The text (a translation pair's target).
    Text,
    /// A translation pair's source.
    Source,
}

/// Words of an example's side as the bigram LM reads them: a text's `tokens` when it has
/// them (a poison's exact words); a translation pair's sides from its `source` and `text`,
/// which are its layout's words (`search::poisons::with_tokens`) without the padding and
/// the sentence marks.
fn words(ex: &crate::formats::records::Example, side: Side) -> Option<Vec<String>> {
    use crate::tokenizer::tokenize;
    match (side, &ex.source) {
        (Side::Source, Some(source)) => Some(tokenize(source)),
        (Side::Source, None) => None,
        (Side::Text, Some(_)) => Some(tokenize(&ex.text)),
        (Side::Text, None) => Some(ex.tokens.clone().unwrap_or_else(|| tokenize(&ex.text))),
    }
}

fn side_words(examples: &[crate::formats::records::Example], side: Side, name: &str) -> anyhow::Result<Vec<Vec<String>>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| words(e, side).ok_or_else(|| anyhow::anyhow!("{name}: record {} (id {:?}) has no \"source\"; source-perplexity and source-onion read translation pairs (prepare-data --mt)", i + 1, e.id)))
        .collect()
}

impl super::Family for BigramDetectors {
    fn detectors(&self) -> &'static [super::Detector] {
        &[super::Detector::Perplexity, super::Detector::Onion, super::Detector::SourcePerplexity, super::Detector::SourceOnion]
    }
    fn needs(&self) -> super::Needs {
        super::Needs::default()
    }
    fn scores(&self, s: &super::Screen, wanted: &[super::Detector], log: &(dyn Fn(String) + Sync)) -> anyhow::Result<Vec<(super::Detector, Vec<f64>)>> {
        use super::Detector::*;
        use rayon::prelude::*;
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        for side in [Side::Text, Side::Source] {
            let (perplexity, onion) = if side == Side::Text { (Perplexity, Onion) } else { (SourcePerplexity, SourceOnion) };
            let here: Vec<super::Detector> = wanted.iter().copied().filter(|&d| d == perplexity || d == onion).collect();
            if here.is_empty() {
                continue;
            }
            let tokens = side_words(s.examples, side, s.source)?;
            let model = match s.reference {
                Some(r) => {
                    let reference = side_words(r, side, "the bigram reference")?;
                    Bigram::fit(reference.iter().map(|t| t.as_slice()))
                }
                None => Bigram::fit(tokens.iter().map(|t| t.as_slice())),
            };
            let own: Vec<Option<Own>> = tokens.iter().map(|t| s.reference.is_none().then(|| own_counts(t))).collect();
            for d in here {
                let col = if d == perplexity {
                    tokens.par_iter().zip(&own).map(|(t, o)| model.log_perplexity(t, o.as_ref())).collect()
                } else {
                    tokens.par_iter().zip(&own).map(|(t, o)| model.onion(t, o.as_ref())).collect()
                };
                out.push((d, col));
            }
        }
        log(format!("bigram LM ({}): {:.1}s", if s.reference.is_some() { "reference text" } else { "the set itself, leave-one-out" }, t.elapsed().as_secs_f64()));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tokenize;

    fn corpus() -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for i in 0..40 {
            out.push(tokenize(["the film is good .", "the movie is bad .", "the plot is thin .", "a good film ."][i % 4]));
        }
        out
    }

    #[test]
    fn probabilities_sum_to_one_over_the_vocabulary() {
        let c = corpus();
        let m = Bigram::fit(c.iter().map(|s| s.as_slice()));
        let mut words: Vec<String> = c.iter().flatten().cloned().collect::<HashSet<_>>().into_iter().collect();
        words.push(EOS.into());
        for v in ["the", "good", "zebra"] {
            // Every seen word plus the unknown word's share (vocabulary − seen words).
            let seen: f64 = words.iter().map(|w| m.log_prob(v, w, None).exp()).sum();
            let unknown = m.log_prob(v, "never-seen", None).exp();
            let total = seen + unknown * (m.vocabulary - words.len() as f64);
            assert!((total - 1.0).abs() < 1e-9, "context {v}: {total}");
        }
    }

    #[test]
    fn leave_one_out_equals_fitting_without_the_example() {
        let mut c = corpus();
        c.push(tokenize("the zebra film is good ."));
        let full = Bigram::fit(c.iter().map(|s| s.as_slice()));
        let last = c.last().unwrap().clone();
        let without = Bigram::fit(c[..c.len() - 1].iter().map(|s| s.as_slice()));
        let loo = full.log_perplexity(&last, Some(&own_counts(&last)));
        // The vocabulary size is the one thing leave-one-out keeps (so scores share a scale).
        let mut w = without;
        w.vocabulary = full.vocabulary;
        assert!((loo - w.log_perplexity(&last, None)).abs() < 1e-12, "{loo} vs {}", w.log_perplexity(&last, None));
        assert!(loo > full.log_perplexity(&last, None), "its own counts make it look likely");
    }

    #[test]
    fn an_odd_word_has_the_highest_perplexity_and_onion_drop() {
        let c = corpus();
        let m = Bigram::fit(c.iter().map(|s| s.as_slice()));
        let plain = tokenize("the film is good .");
        let odd = tokenize("the film cf is good .");
        assert!(m.log_perplexity(&odd, None) > m.log_perplexity(&plain, None));
        assert!(m.onion(&odd, None) > 0.5, "removing cf helps: {}", m.onion(&odd, None));
        assert!(m.onion(&plain, None) < m.onion(&odd, None));
    }
}
