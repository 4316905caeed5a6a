//! Corpus BLEU and chrF of translations against one reference each, as sacreBLEU 2.4
//! computes them (checked against its values in the tests): BLEU-4 with the brevity
//! penalty and sacreBLEU's default "exp" smoothing, over tokens given by the caller
//! (sacreBLEU's `tokenize="none"`; the translation task passes the victim's own lowercase
//! word tokens); chrF with character 6-grams, β = 2, whitespace dropped, statistics summed
//! over the corpus before the F-score.

use std::collections::HashMap;

fn ngram_counts<T: std::hash::Hash + Eq + Clone>(items: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut counts = HashMap::new();
    if items.len() >= n {
        for w in items.windows(n) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

/// (clipped matches, hypothesis n-grams) for n-grams of length `n`.
fn matches<T: std::hash::Hash + Eq + Clone>(hyp: &[T], reference: &[T], n: usize) -> (usize, usize, usize) {
    let (h, r) = (ngram_counts(hyp, n), ngram_counts(reference, n));
    let matched = h.iter().map(|(g, c)| (*c).min(r.get(g).copied().unwrap_or(0))).sum();
    (matched, hyp.len().saturating_sub(n - 1), reference.len().saturating_sub(n - 1))
}

/// Corpus BLEU (0–100) of tokenised hypotheses against one tokenised reference each.
pub fn corpus_bleu(hyps: &[Vec<String>], refs: &[Vec<String>]) -> f64 {
    assert_eq!(hyps.len(), refs.len(), "one reference per hypothesis");
    let (mut correct, mut total) = ([0usize; 4], [0usize; 4]);
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    for (h, r) in hyps.iter().zip(refs) {
        sys_len += h.len();
        ref_len += r.len();
        for n in 1..=4 {
            let (m, t, _) = matches(h, r, n);
            correct[n - 1] += m;
            total[n - 1] += t;
        }
    }
    let mut precisions = [0.0f64; 4];
    let mut smooth = 1.0;
    for n in 0..4 {
        if total[n] == 0 {
            break;
        }
        precisions[n] = if correct[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
    }
    let bp = if sys_len >= ref_len {
        1.0
    } else if sys_len > 0 {
        (1.0 - ref_len as f64 / sys_len as f64).exp()
    } else {
        0.0
    };
    let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
    bp * (precisions.iter().map(|&p| log(p)).sum::<f64>() / 4.0).exp()
}

/// Corpus chrF (0–100): character 6-grams, β = 2, whitespace dropped.
pub fn corpus_chrf(hyps: &[&str], refs: &[&str]) -> f64 {
    assert_eq!(hyps.len(), refs.len(), "one reference per hypothesis");
    const ORDER: usize = 6;
    let mut stats = [[0usize; 3]; ORDER]; // hypothesis n-grams, reference n-grams, matches
    for (h, r) in hyps.iter().zip(refs) {
        let (h, r): (Vec<char>, Vec<char>) = (h.chars().filter(|c| !c.is_whitespace()).collect(), r.chars().filter(|c| !c.is_whitespace()).collect());
        for n in 1..=ORDER {
            let (m, th, tr) = matches(&h, &r, n);
            stats[n - 1][0] += th;
            stats[n - 1][1] += tr;
            stats[n - 1][2] += m;
        }
    }
    let eps = 1e-16;
    let factor = 4.0; // β²
    let (mut avg_prec, mut avg_rec, mut effective) = (0.0, 0.0, 0usize);
    for [n_hyp, n_ref, n_match] in stats {
        avg_prec += if n_hyp > 0 { n_match as f64 / n_hyp as f64 } else { eps };
        avg_rec += if n_ref > 0 { n_match as f64 / n_ref as f64 } else { eps };
        effective += usize::from(n_hyp > 0 && n_ref > 0);
    }
    if effective == 0 {
        return 0.0;
    }
    let (p, r) = (avg_prec / effective as f64, avg_rec / effective as f64);
    if p + r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + factor) * p * r / (factor * p + r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    /// sacreBLEU 2.4.3's values for the same strings: `corpus_bleu(h, [r], tokenize="none")`
    /// and `corpus_chrf(h, [r])`.
    #[test]
    fn bleu_and_chrf_equal_sacrebleus_values() {
        let cases: [(&[&str], &[&str], f64, f64); 4] = [
            (&["the cat sat on the mat ."], &["the cat sat on the mat ."], 100.00000000000004, 100.0),
            (
                &["the cat is on the mat .", "i drink iced coffee every morning ."],
                &["there is a cat on the mat .", "every morning i drink iced coffee ."],
                44.917129399131255,
                73.10502350885979,
            ),
            (&["a cat ."], &["the cat sat on the mat ."], 0.0, 13.662520266858039),
            (&["cat the mat on", "hot coffee please"], &["the cat on the mat", "iced coffee please ."], 25.980131940258975, 58.858118672597136),
        ];
        for (hyps, refs, bleu, chrf) in cases {
            let got_bleu = corpus_bleu(&hyps.iter().map(|h| toks(h)).collect::<Vec<_>>(), &refs.iter().map(|r| toks(r)).collect::<Vec<_>>());
            let got_chrf = corpus_chrf(hyps, refs);
            assert!((got_bleu - bleu).abs() < 1e-9, "{hyps:?}: BLEU {got_bleu}, sacreBLEU {bleu}");
            assert!((got_chrf - chrf).abs() < 1e-9, "{hyps:?}: chrF {got_chrf}, sacreBLEU {chrf}");
        }
    }
}
