//! `lm-perplexity`: a language model's own log-perplexity of each text, the mean negative
//! log-probability of its pieces after the first (`generate::next_token_logprobs`, the
//! computation lm-score checks against llama.cpp). A defender who fine-tunes a pretrained
//! model holds that model, so it can read its training text with it: a crafted poison
//! whose flips are not words ("the concept character B up feeling ...") reads as unlikely
//! text to it. The text is read as the model tokenizes it (a poison's `tokens` are not
//! used), cut to the model's context.

use anyhow::Context;

pub struct LmLikelihood;

impl super::Family for LmLikelihood {
    fn detectors(&self) -> &'static [super::Detector] {
        &[super::Detector::LmPerplexity]
    }
    fn needs(&self) -> super::Needs {
        super::Needs { lm: true, ..Default::default() }
    }
    fn scores(&self, s: &super::Screen, _: &[super::Detector], log: &(dyn Fn(String) + Sync)) -> anyhow::Result<Vec<(super::Detector, Vec<f64>)>> {
        let t = std::time::Instant::now();
        let (victim, vocab) = s.lm.context("lm-perplexity reads a language model: give --lm MODEL (import-model, or train-victim --arch gpt)")?;
        let rows: Vec<Vec<i64>> = s
            .examples
            .iter()
            .map(|e| {
                let mut ids = vocab.encode(&e.text);
                ids.truncate(victim.config.max_len);
                ids
            })
            .collect();
        let logprobs = crate::generate::next_token_logprobs(&victim.config, &victim.params(), &rows, 16);
        // A text of one piece has nothing to predict: scored 0, the least suspicious.
        let col = logprobs.iter().map(|lp| if lp.is_empty() { 0.0 } else { -lp.iter().sum::<f64>() / lp.len() as f64 }).collect();
        log(format!("the language model's own perplexity of {} examples: {:.1}s", s.examples.len(), t.elapsed().as_secs_f64()));
        Ok(vec![(super::Detector::LmPerplexity, col)])
    }
}
