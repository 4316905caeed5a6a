//! What every objective shares to turn candidate swaps into a better poison set: a swap
//! (`Swap`) and the poison it makes (`flipped`), the check that candidates belong to the
//! set, each poison's best verified swap (`improve`), and how the winners combine: all at
//! once for an objective that is a sum over poisons (`verify_separable`), one at a time
//! under the exact objective otherwise (`combine_greedily`).

use crate::encode::Encoded;
use anyhow::{bail, Result};

/// Token ids of a poison with one position replaced.
pub fn flipped(poison: &Encoded, position: usize, word: i64) -> Encoded {
    let mut p = poison.clone();
    p.ids[position] = word;
    p
}

/// Canonical hash of a poison set (ids, tokens and labels; not the display text), tying
/// gradients and candidates to the poison set they were computed for.
pub fn poison_set_sha256(poisons: &[crate::formats::records::Example]) -> String {
    let canon: Vec<(&str, Option<&Vec<String>>, &str, usize)> =
        poisons.iter().map(|p| (p.id.as_str(), p.tokens.as_ref(), p.text.as_str(), p.label)).collect();
    crate::io::sha256_hex(serde_json::to_string(&canon).expect("serialisable").as_bytes())
}

/// One candidate replacement: poison `poison`, token `position`, new word id `word`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Swap {
    pub poison: usize,
    pub position: usize,
    pub word: i64,
}

/// Refuses a candidate whose poison or position lies outside the poison set.
pub fn check_swaps(poisons: &[Encoded], candidates: &[Swap]) -> Result<()> {
    for c in candidates {
        if c.poison >= poisons.len() || c.position >= poisons[c.poison].ids.len() {
            bail!("candidate {c:?} points outside the poison set");
        }
    }
    Ok(())
}

/// The outcome of verifying candidates: the objective before and after, and the accepted
/// swaps with their exact individual changes.
pub struct Verified {
    pub before: f64,
    pub after: f64,
    pub accepted: Vec<(Swap, f64)>,
    pub checked: usize,
}

/// Keeps `value` as poison `c.poison`'s best candidate when it is below `bound` and below
/// the best so far (ties keep the first); true when it was kept. Every objective's exact
/// verification chooses its per-poison winners with it.
pub fn improve(best: &mut [Option<(Swap, f64)>], c: Swap, value: f64, bound: f64) -> bool {
    if value < bound && best[c.poison].is_none_or(|(_, v)| value < v) {
        best[c.poison] = Some((c, value));
        return true;
    }
    false
}

/// Exact verification of an objective that is a sum of per-poison terms (hardness,
/// influence): `terms` gives each poison's own term, `objective_of` the objective from the
/// terms of a whole set and `change_of` what a change of one term does to it. Per poison
/// the candidate with the lowest term below the current one wins; the terms do not
/// interact, so every winner is kept and the result is the exact objective of the new set.
/// `what` names the term in errors.
pub fn verify_separable(
    poisons: &[Encoded],
    candidates: &[Swap],
    what: &str,
    terms: impl Fn(&[Encoded]) -> Vec<f64>,
    objective_of: impl Fn(&[f64]) -> f64,
    change_of: impl Fn(f64) -> f64,
) -> Result<Verified> {
    check_swaps(poisons, candidates)?;
    let current = terms(poisons);
    let flips: Vec<Encoded> = candidates.iter().map(|c| flipped(&poisons[c.poison], c.position, c.word)).collect();
    let mut best: Vec<Option<(Swap, f64)>> = vec![None; poisons.len()];
    for (c, v) in candidates.iter().zip(terms(&flips)) {
        if !v.is_finite() {
            bail!("the {what} is {v} for candidate {c:?}");
        }
        improve(&mut best, *c, v, current[c.poison]);
    }
    let accepted: Vec<(Swap, f64)> = best.iter().flatten().map(|(s, v)| (*s, change_of(v - current[s.poison]))).collect();
    let mut set = poisons.to_vec();
    for (s, _) in &accepted {
        set[s.poison] = flipped(&set[s.poison], s.position, s.word);
    }
    Ok(Verified { before: objective_of(&current), after: objective_of(&terms(&set)), accepted, checked: candidates.len() })
}

/// Combines per-poison winners greedily: in order of their own values (lowest first), each
/// is kept when the objective with it and every winner kept so far (`objective_with`) is
/// below the current one. Returns the final objective and the kept swaps with their
/// individual changes (value − before), so the result is never worse than `before`.
pub fn combine_greedily(best: &[Option<(Swap, f64)>], before: f64, mut objective_with: impl FnMut(&[Swap]) -> f64) -> (f64, Vec<(Swap, f64)>) {
    let mut winners: Vec<(Swap, f64)> = best.iter().flatten().copied().collect();
    winners.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut kept: Vec<(Swap, f64)> = Vec::new();
    let mut current = before;
    for (swap, value) in winners {
        let with: Vec<Swap> = kept.iter().map(|(s, _)| *s).chain(std::iter::once(swap)).collect();
        let combined = objective_with(&with);
        if combined < current {
            current = combined;
            kept.push((swap, value - before));
        }
    }
    (current, kept)
}
