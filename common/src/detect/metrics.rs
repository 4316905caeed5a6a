//! How well a detector's scores separate poisons from clean examples: AUROC, the true
//! positive rate at a fixed false positive rate, the ROC curve, and the share of a
//! training set a defender must inspect (in score order) to catch a share of the poisons.
//! Higher scores are more suspicious throughout.

use serde::{Deserialize, Serialize};

/// Area under the ROC curve: the probability that a random poison scores above a random
/// clean example, ties counting half (the Mann–Whitney statistic). None without poisons
/// or without clean examples.
pub fn auroc(scores: &[f64], is_poison: &[bool]) -> Option<f64> {
    let (pos, neg) = counts(is_poison);
    if pos == 0 || neg == 0 {
        return None;
    }
    let ranks = crate::stats::ranks(scores); // 1-based, ties averaged
    let rank_sum: f64 = ranks.iter().zip(is_poison).filter(|(_, &p)| p).map(|(r, _)| r).sum();
    let (p, n) = (pos as f64, neg as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// The share of poisons flagged when at most `fpr` of the clean examples may be flagged:
/// the threshold is the k+1-th highest clean score (k = ⌊fpr · clean⌋) and an example is
/// flagged when it scores strictly above it, so ties never push the false positive rate
/// past `fpr`.
pub fn tpr_at_fpr(scores: &[f64], is_poison: &[bool], fpr: f64) -> Option<f64> {
    let (pos, neg) = counts(is_poison);
    if pos == 0 || neg == 0 {
        return None;
    }
    let clean: Vec<f64> = scores.iter().zip(is_poison).filter(|(_, &p)| !p).map(|(s, _)| *s).collect();
    let threshold = threshold_at_fpr(clean, fpr);
    let caught = scores.iter().zip(is_poison).filter(|(s, &p)| p && **s > threshold).count();
    Some(caught as f64 / pos as f64)
}

/// The score a defender flags above when at most `fpr` of these clean scores may be
/// flagged: the k+1-th highest (k = ⌊fpr · n⌋). `clean` must not be empty.
pub fn threshold_at_fpr(mut clean: Vec<f64>, fpr: f64) -> f64 {
    clean.sort_by(|a, b| b.total_cmp(a));
    let k = ((fpr * clean.len() as f64) + 1e-9).floor() as usize;
    clean[k.min(clean.len() - 1)]
}

/// The share of the whole set a defender inspects, from the most suspicious down, before
/// `catch` of the poisons are found (at least one poison). Within tied scores clean
/// examples come first: the defender's worst case.
pub fn inspect_to_catch(scores: &[f64], is_poison: &[bool], catch: f64) -> Option<f64> {
    let (pos, _) = counts(is_poison);
    if pos == 0 {
        return None;
    }
    let need = ((catch * pos as f64) - 1e-9).ceil().max(1.0) as usize;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(is_poison[a].cmp(&is_poison[b])));
    let mut found = 0;
    for (inspected, &i) in order.iter().enumerate() {
        found += is_poison[i] as usize;
        if found >= need {
            return Some((inspected + 1) as f64 / scores.len() as f64);
        }
    }
    None
}

/// A point of the ROC curve: flagging every example scoring at least a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RocPoint {
    pub fpr: f64,
    pub tpr: f64,
}

/// The ROC curve from (0, 0) to (1, 1), one point per distinct score.
pub fn roc_curve(scores: &[f64], is_poison: &[bool]) -> Vec<RocPoint> {
    let (pos, neg) = counts(is_poison);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut out = vec![RocPoint { fpr: 0.0, tpr: 0.0 }];
    let (mut tp, mut fp) = (0usize, 0usize);
    for (k, &i) in order.iter().enumerate() {
        if is_poison[i] {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_tie = order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
        if last_of_tie {
            out.push(RocPoint { fpr: fp as f64 / neg.max(1) as f64, tpr: tp as f64 / pos.max(1) as f64 });
        }
    }
    out
}

fn counts(is_poison: &[bool]) -> (usize, usize) {
    let pos = is_poison.iter().filter(|&&p| p).count();
    (pos, is_poison.len() - pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AUROC by its definition: every (poison, clean) pair.
    fn auroc_by_pairs(scores: &[f64], is_poison: &[bool]) -> f64 {
        let (mut wins, mut pairs) = (0.0, 0.0);
        for (a, &pa) in scores.iter().zip(is_poison) {
            for (b, &pb) in scores.iter().zip(is_poison) {
                if pa && !pb {
                    pairs += 1.0;
                    wins += if a > b { 1.0 } else if a == b { 0.5 } else { 0.0 };
                }
            }
        }
        wins / pairs
    }

    #[test]
    fn auroc_equals_the_pairwise_definition_with_ties() {
        let scores = [0.1, 0.4, 0.4, 0.9, 0.2, 0.4, 0.7, 0.0];
        let labels = [false, true, false, true, false, false, true, false];
        let a = auroc(&scores, &labels).unwrap();
        assert!((a - auroc_by_pairs(&scores, &labels)).abs() < 1e-12, "{a}");
        // The area under the ROC curve's points (trapezoids) is the same number.
        let roc = roc_curve(&scores, &labels);
        let area: f64 = roc.windows(2).map(|w| (w[1].fpr - w[0].fpr) * (w[1].tpr + w[0].tpr) / 2.0).sum();
        assert!((area - a).abs() < 1e-12, "{area} vs {a}");
        assert_eq!(auroc(&[1.0, 2.0], &[false, false]), None);
        assert_eq!(auroc(&[1.0, 2.0], &[false, true]), Some(1.0));
        assert_eq!(auroc(&[1.0, 2.0], &[true, false]), Some(0.0));
    }

    #[test]
    fn tpr_at_fpr_never_exceeds_the_false_positive_budget() {
        // 10 clean at 0..9, poisons at 8.5, 9.5 and 3 (tied with a clean one).
        let mut scores: Vec<f64> = (0..10).map(|i| i as f64).collect();
        let mut labels = vec![false; 10];
        scores.extend([8.5, 9.5, 3.0]);
        labels.extend([true, true, true]);
        // 0% FPR: only what beats every clean score: 9.5.
        assert!((tpr_at_fpr(&scores, &labels, 0.0).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        // 10%: one clean example may be flagged (9), so the threshold is 8: 8.5 and 9.5.
        assert!((tpr_at_fpr(&scores, &labels, 0.1).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // 19% still allows one false positive only.
        assert!((tpr_at_fpr(&scores, &labels, 0.19).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // 70%: threshold is the 8th highest clean score, 2: the tied poison at 3 is caught.
        assert!((tpr_at_fpr(&scores, &labels, 0.7).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn inspect_to_catch_counts_from_the_top_with_ties_against_the_defender() {
        // Ranked: p(9) c(8) p(7)=c(7) c(1) p(0).
        let scores = [9.0, 8.0, 7.0, 7.0, 1.0, 0.0];
        let labels = [true, false, true, false, false, true];
        // One of three poisons: the first example.
        assert!((inspect_to_catch(&scores, &labels, 0.3).unwrap() - 1.0 / 6.0).abs() < 1e-12);
        // Two of three (≥ 50% needs 2): the tie at 7 puts the clean one first: 4 examples.
        assert!((inspect_to_catch(&scores, &labels, 0.5).unwrap() - 4.0 / 6.0).abs() < 1e-12);
        // All three: everything.
        assert!((inspect_to_catch(&scores, &labels, 0.9).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(inspect_to_catch(&scores, &[false; 6], 0.5), None);
    }
}
