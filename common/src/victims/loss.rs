//! The training loss, written once: the negative log-likelihood of the training targets
//! under a victim's logits. Every stage that trains, unrolls or verifies uses it, so a
//! victim with another kind of target (a language model's next tokens, a translation's
//! output sequence) adds a `Targets` variant here and nowhere else.

use tch::{Device, Kind, Tensor};

/// What one example is trained to predict (`crate::encode::Encoded` carries one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A class label.
    Class(i64),
    /// The example's own next tokens (a language model's text): position t predicts token
    /// t + 1, for every position before the example's last token whose predicted token is
    /// at index `from` or later. `from` = 1 counts every token but the first (plain text);
    /// a prompt's length counts only its continuation (D_adv: the target text after a
    /// trigger prompt).
    NextToken { from: usize },
}

impl Target {
    /// The class of a classification example.
    pub fn class(&self) -> Option<i64> {
        match self {
            Target::Class(c) => Some(*c),
            Target::NextToken { .. } => None,
        }
    }
}

/// What a batch is trained to predict.
pub enum Targets {
    /// One class per example: labels [.., n] for logits [.., n, classes]. Labels may have
    /// fewer leading dimensions than the logits (one batch shared by stacked parameter sets).
    Class(Tensor),
    /// A language model's next tokens: ids [.., n, T] for logits [.., n, T, vocab], and a
    /// mask [.., n, T] (1.0 where a position counts, 0.0 for padding); an example's loss is
    /// the mean over its counted positions.
    NextToken { ids: Tensor, mask: Tensor },
    /// A language model's next-token targets as distributions over the vocabulary: probs
    /// [.., n, T, vocab] and mask [.., n, T]. One-hot rows equal `NextToken`; a row mixing
    /// two words is the relaxed target the LM's candidate scores differentiate (checked
    /// against finite differences in the attack's tests).
    Soft { probs: Tensor, mask: Tensor },
}

impl Targets {
    /// The targets of a padded batch: `ids` [.., T] (flattened row-major, `lead` the
    /// leading dimensions, e.g. [rows] or [C, rows]) with one target per row; `None` marks
    /// a filler row (it carries weight 0; its target is class 0 or no counted position).
    /// The one batching path for every kind of target. A batch holds one kind.
    pub fn batch(rows: &[Option<Target>], ids: &[i64], lead: &[i64], time: usize, device: Device) -> Targets {
        let kind = rows.iter().flatten().next().copied().unwrap_or(Target::Class(0));
        match kind {
            Target::Class(_) => {
                let labels: Vec<i64> = rows
                    .iter()
                    .map(|r| match r {
                        Some(Target::Class(c)) => *c,
                        None => 0,
                        Some(t) => panic!("a batch mixes class and {t:?} targets"),
                    })
                    .collect();
                Targets::Class(Tensor::from_slice(&labels).view(lead).to_device(device))
            }
            Target::NextToken { .. } => {
                let mut next = vec![0i64; rows.len() * time];
                let mut mask = vec![0f32; rows.len() * time];
                for (r, target) in rows.iter().enumerate() {
                    let from = match target {
                        Some(Target::NextToken { from }) => (*from).max(1),
                        None => continue,
                        Some(t) => panic!("a batch mixes next-token and {t:?} targets"),
                    };
                    let row = &ids[r * time..(r + 1) * time];
                    // Up to the last token: a translation's source block holds padding inside.
                    let len = row.iter().rposition(|&id| id != crate::tokenizer::PAD_ID).map_or(0, |p| p + 1);
                    for t in from - 1..len.saturating_sub(1) {
                        next[r * time + t] = row[t + 1];
                        mask[r * time + t] = 1.0;
                    }
                }
                let shape: Vec<i64> = lead.iter().copied().chain([time as i64]).collect();
                Targets::NextToken {
                    ids: Tensor::from_slice(&next).view(shape.as_slice()).to_device(device),
                    mask: Tensor::from_slice(&mask).view(shape.as_slice()).to_device(device),
                }
            }
        }
    }

    /// The same targets, sharing the tensors.
    pub fn shallow_clone(&self) -> Targets {
        match self {
            Targets::Class(labels) => Targets::Class(labels.shallow_clone()),
            Targets::NextToken { ids, mask } => Targets::NextToken { ids: ids.shallow_clone(), mask: mask.shallow_clone() },
            Targets::Soft { probs, mask } => Targets::Soft { probs: probs.shallow_clone(), mask: mask.shallow_clone() },
        }
    }

    /// Row `k` of a batch's targets (a batch of one).
    pub fn row(&self, k: i64) -> Targets {
        match self {
            Targets::Class(labels) => Targets::Class(labels.narrow(0, k, 1)),
            Targets::NextToken { ids, mask } => Targets::NextToken { ids: ids.narrow(0, k, 1), mask: mask.narrow(0, k, 1) },
            Targets::Soft { probs, mask } => Targets::Soft { probs: probs.narrow(0, k, 1), mask: mask.narrow(0, k, 1) },
        }
    }

    /// Next-token targets as one-hot distributions over `vocab` words.
    pub fn to_soft(&self, vocab: i64, kind: Kind) -> Targets {
        match self {
            Targets::NextToken { ids, mask } => Targets::Soft { probs: ids.one_hot(vocab).to_kind(kind), mask: mask.shallow_clone() },
            Targets::Soft { probs, mask } => Targets::Soft { probs: probs.shallow_clone(), mask: mask.shallow_clone() },
            Targets::Class(_) => panic!("class targets have no next-token distribution"),
        }
    }

    /// The targets of two batches joined row-wise (`a`'s rows first), next-token targets
    /// right-padded to the longer batch.
    pub fn cat(a: &Targets, b: &Targets) -> Targets {
        match (a, b) {
            (Targets::Class(x), Targets::Class(y)) => Targets::Class(Tensor::cat(&[x, y], 0)),
            (Targets::NextToken { ids: xi, mask: xm }, Targets::NextToken { ids: yi, mask: ym }) => {
                let t = xi.size()[1].max(yi.size()[1]);
                let pad = |x: &Tensor| x.constant_pad_nd([0, t - x.size()[1]]);
                Targets::NextToken { ids: Tensor::cat(&[pad(xi), pad(yi)], 0), mask: Tensor::cat(&[pad(xm), pad(ym)], 0) }
            }
            (Targets::Soft { probs, .. }, _) | (_, Targets::Soft { probs, .. }) => {
                let (v, kind) = (probs.size()[probs.dim() - 1], probs.kind());
                let (Targets::Soft { probs: xp, mask: xm }, Targets::Soft { probs: yp, mask: ym }) = (a.to_soft(v, kind), b.to_soft(v, kind)) else { unreachable!() };
                let t = xp.size()[1].max(yp.size()[1]);
                let pad2 = |x: &Tensor| x.constant_pad_nd([0, t - x.size()[1]]);
                let pad3 = |x: &Tensor| x.constant_pad_nd([0, 0, 0, t - x.size()[1]]);
                Targets::Soft { probs: Tensor::cat(&[pad3(&xp), pad3(&yp)], 0), mask: Tensor::cat(&[pad2(&xm), pad2(&ym)], 0) }
            }
            _ => panic!("joining batches of different target kinds"),
        }
    }

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
                mean_over_counted(&token, mask)
            }
            Targets::Soft { probs, mask } => {
                let token = -(logits.log_softmax(-1, None::<Kind>) * probs).sum_dim_intlist(-1, false, None::<Kind>);
                mean_over_counted(&token, mask)
            }
        }
    }

    /// Per example, the label-smoothed loss [.., n] (training only): (1 − ε) times the
    /// negative log-likelihood plus ε times the mean over the outputs of −log p, i.e. the
    /// cross-entropy against the target mixed with the uniform distribution.
    pub fn example_smoothed_nll(&self, logits: &Tensor, eps: f64) -> Tensor {
        let uniform = -logits.log_softmax(-1, None::<Kind>).mean_dim([-1].as_slice(), false, None::<Kind>);
        let uniform = match self {
            Targets::Class(_) => uniform,
            Targets::NextToken { mask, .. } | Targets::Soft { mask, .. } => mean_over_counted(&uniform, mask),
        };
        self.example_nll(logits) * (1.0 - eps) + uniform * eps
    }

    /// The summed loss over every example (per-example gradients of a stack).
    pub fn summed_nll(&self, logits: &Tensor) -> Tensor {
        match self {
            Targets::Class(labels) => -logits.log_softmax(-1, None::<Kind>).gather(-1, &labels.unsqueeze(-1), false).sum(None::<Kind>),
            Targets::NextToken { .. } | Targets::Soft { .. } => self.example_nll(logits).sum(None::<Kind>),
        }
    }

    /// The mean loss over the examples of one batch.
    pub fn mean_nll(&self, logits: &Tensor) -> Tensor {
        match self {
            Targets::Class(labels) => logits.log_softmax(-1, None::<Kind>).nll_loss(labels),
            Targets::NextToken { .. } | Targets::Soft { .. } => self.example_nll(logits).mean(None::<Kind>),
        }
    }
}

/// Per example, the mean of per-position losses [.., n, T] over its counted positions
/// (`mask` 1.0), in the losses' dtype.
fn mean_over_counted(token: &Tensor, mask: &Tensor) -> Tensor {
    let mask = mask.to_kind(token.kind());
    (token * &mask).sum_dim_intlist(-1, false, None::<Kind>) / mask.sum_dim_intlist(-1, false, None::<Kind>).clamp_min(1.0)
}

/// Mean cross-entropy of class logits [n, classes] against labels [n].
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    Targets::Class(labels.shallow_clone()).mean_nll(logits)
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

    #[test]
    fn the_smoothed_loss_is_the_cross_entropy_against_the_smoothed_target_in_f64() {
        let logits = Tensor::randn([2, 3, 4], (Kind::Double, Device::Cpu));
        let ids = Tensor::from_slice(&[1i64, 3, 0, 2, 2, 0]).view([2, 3]);
        let mask = Tensor::from_slice(&[1.0f64, 1.0, 1.0, 1.0, 1.0, 0.0]).view([2, 3]);
        let eps = 0.1;
        let lp = logits.log_softmax(-1, Kind::Double);
        // The target distribution: 1 − ε on the word plus ε/4 on each of the 4 words.
        let ce = |b: i64, t: i64, w: i64| -(0..4).map(|k| (if k == w { 1.0 - eps } else { 0.0 } + eps / 4.0) * lp.double_value(&[b, t, k])).sum::<f64>();
        let want = [(ce(0, 0, 1) + ce(0, 1, 3) + ce(0, 2, 0)) / 3.0, (ce(1, 0, 2) + ce(1, 1, 2)) / 2.0];
        let got: Vec<f64> = Vec::try_from(Targets::NextToken { ids, mask }.example_smoothed_nll(&logits, eps)).unwrap();
        assert!((got[0] - want[0]).abs() < 1e-12 && (got[1] - want[1]).abs() < 1e-12, "{got:?} vs {want:?}");
        let class = Targets::Class(Tensor::from_slice(&[2i64])).example_smoothed_nll(&logits.get(0).narrow(0, 0, 1), eps);
        assert!((class.double_value(&[0]) - ce(0, 0, 2)).abs() < 1e-12);
    }

    #[test]
    fn a_continuation_target_counts_only_the_tokens_after_its_prompt() {
        let logits = Tensor::randn([2, 4, 5], (Kind::Double, Device::Cpu));
        let ids = [1i64, 3, 2, 4, 2, 2, 0, 0];
        let t = Targets::batch(&[Some(Target::NextToken { from: 2 }), Some(Target::NextToken { from: 1 })], &ids, &[2], 4, Device::Cpu);
        let lp = logits.log_softmax(-1, Kind::Double);
        let nll = |b: i64, t: i64, w: i64| -lp.double_value(&[b, t, w]);
        // Row 0: prompt [1, 3], continuation [2, 4]: positions 1 and 2 predict it.
        let want = [(nll(0, 1, 2) + nll(0, 2, 4)) / 2.0, nll(1, 0, 2)];
        let got: Vec<f64> = Vec::try_from(t.example_nll(&logits)).unwrap();
        assert!((got[0] - want[0]).abs() < 1e-12 && (got[1] - want[1]).abs() < 1e-12, "{got:?} vs {want:?}");
    }
}
