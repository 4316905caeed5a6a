//! The hardness objective (FINDINGS.md): make each poison as hard as possible for clean
//! victims to fit with its target label, so that a victim trained on it must lean on the
//! only thing that sets it apart, the trigger-like words. The objective is the mean, over
//! poisons and over an ensemble of clean victims (the attacked victim plus, typically, a
//! few early checkpoints), of the target-versus-rest margin
//! `z_target − logsumexp(z_other)`; lower is harder. Unlike the bi-level objective it is
//! first order and separable: each poison's term depends on that poison only, so exact
//! verification is one forward pass per candidate and the per-poison winners combine
//! additively.

pub use crate::formats::records::ObjectiveKind;
use crate::objectives::objective::Objective;
use crate::objectives::swaps::{verify_separable, Swap, Verified};
use crate::victims::model::{embed, forward, mask_of, Victim};
use crate::encode::{batch_tensors, Encoded};
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Candidates per forward pass when verifying.
const CHUNK: usize = 256;

/// The hardness objective over an ensemble of victims sharing one frozen embedding table.
pub struct Hardness<'a> {
    pub models: Vec<&'a Victim>,
    pub target: i64,
}

/// Target-versus-rest margin of every row of `logits` [.., classes].
pub fn margin(logits: &Tensor, target: i64) -> Tensor {
    let classes = logits.size()[logits.dim() - 1];
    let t = logits.select(-1, target);
    let others: Vec<i64> = (0..classes).filter(|&c| c != target).collect();
    let rest = logits.index_select(-1, &Tensor::from_slice(&others).to_device(logits.device()));
    t - rest.logsumexp([-1].as_slice(), false)
}

impl<'a> Hardness<'a> {
    pub fn new(models: Vec<&'a Victim>, target: usize) -> Result<Hardness<'a>> {
        let first = models.first().ok_or_else(|| anyhow::anyhow!("the hardness objective needs at least one victim"))?;
        let table = &first.params()["embedding.weight"];
        for (i, m) in models.iter().enumerate() {
            if m.config.train_embeddings {
                bail!("ensemble victim {} trains its embedding table; the hardness objective supports frozen-embedding victims only (--objective bilevel takes a trained table)", i + 1);
            }
            let t = &m.params()["embedding.weight"];
            if t.size() != table.size() || !t.equal(table) {
                bail!("ensemble victim {} has another embedding table than the first; train every ensemble victim from the same embeddings", i + 1);
            }
            if m.config.num_classes as i64 <= target as i64 {
                bail!("ensemble victim {} has {} classes, the target is {target}", i + 1, m.config.num_classes);
            }
        }
        Ok(Hardness { models, target: target as i64 })
    }

    /// Victims the margin is averaged over.
    pub fn victims(&self) -> usize {
        self.models.len()
    }

    /// Per-poison margin averaged over the ensemble, [N], from input embeddings.
    fn margins_of(&self, emb: &Tensor, mask: &Tensor) -> Tensor {
        let mut sum: Option<Tensor> = None;
        for m in &self.models {
            let x = margin(&forward(&m.config, &m.params(), emb, mask), self.target);
            sum = Some(match sum {
                None => x,
                Some(s) => s + x,
            });
        }
        sum.expect("at least one model") / self.models.len() as f64
    }

    /// Per-poison margins, [N] on the CPU.
    pub fn margins(&self, poisons: &[Encoded]) -> Vec<f64> {
        let params = self.models[0].params();
        let device = self.models[0].device();
        let mut out = Vec::with_capacity(poisons.len());
        tch::no_grad(|| {
            for chunk in poisons.chunks(CHUNK) {
                let (ids, _) = batch_tensors(&chunk.iter().collect::<Vec<_>>(), device);
                let m = self.margins_of(&embed(&params, &ids), &mask_of(&ids, &params));
                out.extend(Vec::<f64>::try_from(m.to_kind(Kind::Double).to_device(Device::Cpu)).expect("f64 margins"));
            }
        });
        out
    }

    /// The objective: the mean margin over poisons.
    pub fn objective(&self, poisons: &[Encoded]) -> f64 {
        let m = self.margins(poisons);
        m.iter().sum::<f64>() / m.len().max(1) as f64
    }

    /// The objective and its gradient with respect to every poison token embedding,
    /// [N, Tp, D] (zero at padding).
    pub fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)> {
        if poisons.is_empty() {
            bail!("no poisons");
        }
        let params = self.models[0].params();
        let (ids, _) = batch_tensors(&poisons.iter().collect::<Vec<_>>(), self.models[0].device());
        let mask = mask_of(&ids, &params);
        let emb = embed(&params, &ids).detach().set_requires_grad(true);
        let objective = self.margins_of(&emb, &mask).mean(None::<Kind>);
        let value = objective.double_value(&[]);
        if !value.is_finite() {
            bail!("the hardness objective is {value}; a victim's weights hold NaN or Inf");
        }
        let grad = Tensor::run_backward(&[&objective], &[&emb], false, false).pop().expect("one gradient");
        Ok((value, grad * mask.unsqueeze(-1)))
    }
}

impl Objective for Hardness<'_> {
    fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)> {
        Hardness::objective_and_grad(self, poisons)
    }
    fn value(&self, poisons: &[Encoded]) -> Result<f64> {
        Ok(self.objective(poisons))
    }
    fn terms(&self, poisons: &[Encoded]) -> Option<Vec<f64>> {
        Some(self.margins(poisons))
    }
    /// Exact verification: each candidate's margin; per poison the candidate with the
    /// lowest margin below the current one (`swaps::verify_separable`).
    fn verify(&self, poisons: &[Encoded], candidates: &[Swap]) -> Result<Verified> {
        let n = poisons.len() as f64;
        verify_separable(poisons, candidates, "margin", |p| self.margins(p), |m| m.iter().sum::<f64>() / n, |d| d / n)
    }
    fn describe(&self, value: f64, poisons: usize) -> String {
        format!("hardness (mean target margin) {value:.5}, {poisons} poisons, {} victims", self.victims())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::victims::model::{tiny_config, Arch};

    fn tiny(arch: Arch, seed: i64, table: &Tensor) -> Victim {
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        let config = tiny_config(arch, 14, 5, 4, 3, false, 16);
        let mut v = Victim::new(config, table, Device::Cpu).unwrap();
        v.vs.set_kind(Kind::Double);
        v
    }

    fn enc(ids: &[i64]) -> Encoded {
        Encoded::class(ids.to_vec(), 1)
    }

    #[test]
    fn gradient_matches_finite_differences_in_f64_and_verify_is_exact() {
        let table = {
            let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(3);
            Tensor::randn([14, 5], (Kind::Double, Device::Cpu))
        };
        // Classifier objectives: a language model is attacked through the bi-level one.
        for arch in crate::victims::model::classifier_archs() {
            let (a, b) = (tiny(arch, 1, &table), tiny(arch, 2, &table));
            let h = Hardness::new(vec![&a, &b], 1).unwrap();
            let poisons = vec![enc(&[6, 7, 8]), enc(&[9, 10])];
            let (g, grad) = h.objective_and_grad(&poisons).unwrap();
            assert!((g - h.objective(&poisons)).abs() < 1e-12);
            let params = a.params();
            let (ids, _) = batch_tensors(&poisons.iter().collect::<Vec<_>>(), Device::Cpu);
            let (emb, mask) = (embed(&params, &ids).detach(), mask_of(&ids, &params));
            let worst = crate::testing::worst_fd_error(&emb, &grad, 1e-6, 1e-4, |x| h.margins_of(x, &mask).mean(None::<Kind>).double_value(&[]));
            assert!(worst < 1e-6, "{arch:?}: relative error {worst}");
            // Margin of a two-class victim is z_t − z_other; with three classes a logsumexp.
            let l = Tensor::from_slice(&[1.0f64, 2.0, 3.0]).view([1, 3]);
            let want = 2.0 - (1.0f64.exp() + 3.0f64.exp()).ln();
            assert!((margin(&l, 1).double_value(&[0]) - want).abs() < 1e-12);
            // Verification: never worse, exact, at most one flip per poison.
            let swaps: Vec<Swap> = (0..2)
                .flat_map(|i| (0..poisons[i].ids.len()).flat_map(move |p| (2..14).map(move |w| Swap { poison: i, position: p, word: w })))
                .collect();
            let out = h.verify(&poisons, &swaps).unwrap();
            assert!(out.after < out.before, "{arch:?}: some flip lowers the margin");
            assert!(out.accepted.len() <= 2);
            let total: f64 = out.accepted.iter().map(|(_, d)| d).sum();
            assert!((out.before + total - out.after).abs() < 1e-12, "separable: the changes add up");
        }
    }
}
