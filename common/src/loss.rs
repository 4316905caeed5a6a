//! The training loss, written once: the negative log-likelihood of the training targets
//! under a victim's logits. Every stage that trains, unrolls or verifies uses it, so a
//! victim with another kind of target (a language model's next tokens, a translation's
//! output sequence) adds a `Targets` variant here and nowhere else.

use tch::{Kind, Tensor};

/// What a batch is trained to predict.
pub enum Targets {
    /// One class per example: labels [.., n] for logits [.., n, classes]. Labels may have
    /// fewer leading dimensions than the logits (one batch shared by stacked parameter sets).
    Class(Tensor),
    /// A language model's next tokens: ids [.., n, T] for logits [.., n, T, vocab], and a
    /// mask [.., n, T] (1.0 where a position counts, 0.0 for padding); an example's loss is
    /// the mean over its counted positions.
    NextToken { ids: Tensor, mask: Tensor },
}

impl Targets {
    /// Negative log-likelihood per example, [.., n] (computed in the logits' dtype, so
    /// f64 stays f64).
    pub fn example_nll(&self, logits: &Tensor) -> Tensor {
        match self {
            Targets::Class(labels) => {
                let mut idx = labels.unsqueeze(-1);
                let shape = logits.narrow(-1, 0, 1).size();
                if idx.size() != shape {
                    // Labels shared by stacked parameter sets: broadcast them.
                    idx = idx.expand(shape.as_slice(), false);
                }
                -logits.log_softmax(-1, None::<Kind>).gather(-1, &idx, false).squeeze_dim(-1)
            }
            Targets::NextToken { ids, mask } => {
                let token = -logits.log_softmax(-1, None::<Kind>).gather(-1, &ids.unsqueeze(-1), false).squeeze_dim(-1);
                let mask = mask.to_kind(logits.kind());
                (token * &mask).sum_dim_intlist(-1, false, None::<Kind>) / mask.sum_dim_intlist(-1, false, None::<Kind>).clamp_min(1.0)
            }
        }
    }

    /// The summed loss over every example (per-example gradients of a stack).
    pub fn summed_nll(&self, logits: &Tensor) -> Tensor {
        match self {
            Targets::Class(labels) => -logits.log_softmax(-1, None::<Kind>).gather(-1, &labels.unsqueeze(-1), false).sum(None::<Kind>),
            Targets::NextToken { .. } => self.example_nll(logits).sum(None::<Kind>),
        }
    }

    /// The mean loss over the examples of one batch.
    pub fn mean_nll(&self, logits: &Tensor) -> Tensor {
        match self {
            Targets::Class(labels) => logits.log_softmax(-1, None::<Kind>).nll_loss(labels),
            Targets::NextToken { .. } => self.example_nll(logits).mean(None::<Kind>),
        }
    }
}

/// Mean cross-entropy of class logits [n, classes] against labels [n].
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    Targets::Class(labels.shallow_clone()).mean_nll(logits)
}

/// Summed negative log-likelihood of class logits [n, classes] against labels [n].
pub fn summed_nll(logits: &Tensor, labels: &Tensor) -> Tensor {
    Targets::Class(labels.shallow_clone()).summed_nll(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn the_three_reductions_agree_with_a_direct_computation_in_f64() {
        let opts = (Kind::Double, Device::Cpu);
        let logits = Tensor::from_slice(&[0.3, -1.2, 2.0, 0.5, 0.1, -0.7]).view([3, 2]).to_kind(Kind::Double);
        let labels = Tensor::from_slice(&[1i64, 0, 1]);
        let p = logits.softmax(-1, Kind::Double);
        let want: Vec<f64> = (0..3).map(|i| -p.double_value(&[i, [1, 0, 1][i as usize]]).ln()).collect();
        let t = Targets::Class(labels);
        let got: Vec<f64> = Vec::try_from(t.example_nll(&logits)).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12);
        }
        assert!((t.summed_nll(&logits).double_value(&[]) - want.iter().sum::<f64>()).abs() < 1e-12);
        assert!((t.mean_nll(&logits).double_value(&[]) - want.iter().sum::<f64>() / 3.0).abs() < 1e-12);
        // Shared labels over stacked logits [C, n, classes].
        let stacked = Tensor::stack(&[&logits, &(&logits * 2.0)], 0);
        let per = t.example_nll(&stacked);
        assert_eq!(per.size(), [2, 3]);
        assert!((per.get(0) - t.example_nll(&logits)).abs().max().double_value(&[]) < 1e-15);
        let _ = opts;
    }

    #[test]
    fn next_token_loss_is_the_mean_over_counted_positions() {
        // Two sequences of 3 positions over a vocabulary of 4; the second has one padded position.
        let logits = Tensor::randn([2, 3, 4], (Kind::Double, Device::Cpu));
        let ids = Tensor::from_slice(&[1i64, 3, 0, 2, 2, 0]).view([2, 3]);
        let mask = Tensor::from_slice(&[1.0f64, 1.0, 1.0, 1.0, 1.0, 0.0]).view([2, 3]);
        let lp = logits.log_softmax(-1, Kind::Double);
        let nll = |b: i64, t: i64, w: i64| -lp.double_value(&[b, t, w]);
        let want = [(nll(0, 0, 1) + nll(0, 1, 3) + nll(0, 2, 0)) / 3.0, (nll(1, 0, 2) + nll(1, 1, 2)) / 2.0];
        let t = Targets::NextToken { ids, mask };
        let got: Vec<f64> = Vec::try_from(t.example_nll(&logits)).unwrap();
        assert!((got[0] - want[0]).abs() < 1e-12 && (got[1] - want[1]).abs() < 1e-12, "{got:?} vs {want:?}");
        assert!((t.mean_nll(&logits).double_value(&[]) - (want[0] + want[1]) / 2.0).abs() < 1e-12);
    }
}
