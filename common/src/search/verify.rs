//! Exact verification as a stage (SPEC step 5): which candidates may be checked at all
//! (same poison set, victim and objective settings as the gradient; positions and words
//! that keep the poison concealed and readable), the objective's exact check, and the
//! poison set and summary after the accepted flips. verify-candidates is wiring over it.

use crate::objectives::swaps::{poison_set_sha256, Swap, Verified};
use crate::concealment::{flip_conceals, Concealment, TriggerMatcher};
use crate::io::Record;
use crate::objectives::ObjectiveInputs;
use crate::search::poisons::{banned_ids, matcher, strict_violation, with_tokens, AttackInputs};
use crate::formats::records::{Candidate, Example, Flip, VerifySummary};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;

/// What a verification refuses: banned words and, under strict concealment, flips that
/// make a poison leak the trigger.
pub struct Checks {
    banned: HashSet<i64>,
    strict: Option<TriggerMatcher>,
    /// Translation data: each side keeps its language (`rank::Sides`).
    sides: Option<crate::search::rank::Sides>,
}

impl Checks {
    /// The checks for `inputs`; under strict concealment the poisons must conceal the
    /// trigger already (`poisons_path` names them in the error).
    pub fn new(inputs: &AttackInputs, allow_overlap: bool, concealment: Concealment, poisons_path: &str) -> Result<Checks> {
        let banned = banned_ids(&inputs.vocab, &inputs.manifest, allow_overlap, concealment)?;
        let strict = (concealment == Concealment::Strict && !allow_overlap).then(|| matcher(&inputs.vocab, &inputs.manifest)).transpose()?;
        if let Some(matcher) = &strict {
            for (i, p) in inputs.poisons.iter().enumerate() {
                if let Some(words) = strict_violation(p, &inputs.vocab, matcher) {
                    bail!("{poisons_path}: record {} (id {:?}) leaks the trigger ({words}) but --concealment strict was asked; make the poisons with init-poisons --concealment strict", i + 1, p.id);
                }
            }
        }
        let sides = inputs.manifest.mt.is_some().then(|| crate::search::rank::Sides::of_training(&inputs.vocab, &inputs.data_dir)).transpose()?;
        Ok(Checks { banned, strict, sides })
    }

    /// The swaps of `candidates` (file `cname`), each checked against the poison set,
    /// victim and settings it was ranked for, and against the bans; an error names the
    /// candidate's line and what to rerun.
    pub fn swaps(&self, inputs: &AttackInputs, candidates: &[Candidate], cname: &str, poisons_path: &str, victim_path: &str) -> Result<Vec<Swap>> {
        let vocab = &inputs.vocab;
        let mut swaps = Vec::with_capacity(candidates.len());
        for (line, c) in candidates.iter().enumerate() {
            let at = || format!("{cname}:{}", line + 1);
            if c.poisons_sha256 != inputs.poisons_sha256 {
                bail!("{}: candidates were ranked for another poison set than {poisons_path} (hash mismatch); rerun rollout-grad and rank-candidates on it", at());
            }
            if c.victim_sha256 != inputs.victim_sha256 {
                bail!("{}: candidates were ranked from gradients of another victim than {victim_path} (hash mismatch); pass the --victim given to rollout-grad", at());
            }
            if c.rollout != candidates[0].rollout || c.objective_kind != candidates[0].objective_kind || c.ensemble_sha256 != candidates[0].ensemble_sha256 || c.influence != candidates[0].influence {
                bail!("{}: objective or unrolling settings differ from the first candidate's; verify one rank-candidates output at a time", at());
            }
            let poison = inputs
                .poisons
                .get(c.poison_index)
                .filter(|p| p.id == c.poison_id)
                .with_context(|| format!("{}: no poison {:?} at index {}", at(), c.poison_id, c.poison_index))?;
            let tokens = poison.tokens.as_ref().expect("checked on load");
            if tokens.get(c.position) != Some(&c.current) {
                bail!("{}: position {} of {:?} is not {:?}", at(), c.position, c.poison_id, c.current);
            }
            if vocab.id(&c.current).is_some_and(|id| vocab.is_special(id)) {
                bail!("{}: position {} of {:?} holds the special token {:?}, which stays in place", at(), c.position, c.poison_id, c.current);
            }
            let word = vocab.id(&c.word).with_context(|| format!("{}: {:?} is not in the vocabulary", at(), c.word))?;
            if self.banned.contains(&word) {
                let why = if self.strict.is_some() { "leaks the trigger under --concealment strict, or is a special word" } else { "is a trigger or special word (pass --allow-overlap for the with-overlap baseline)" };
                bail!("{}: candidate {:?} {why}", at(), c.word);
            }
            if let (Some(sides), Some(bos)) = (&self.sides, vocab.decoder_start(&inputs.poisons_enc[c.poison_index].ids)) {
                if !sides.allows(bos, c.position, word) {
                    bail!("{}: {:?} at position {} of {:?} is a word the training pairs never hold on that side (a flip keeps the source German and the target English); rerun rank-candidates", at(), c.word, c.position, c.poison_id);
                }
            }
            if let Some(matcher) = &self.strict {
                if !flip_conceals(&inputs.poisons_enc[c.poison_index].ids, c.position, word, vocab, matcher) {
                    bail!("{}: {:?} at position {} makes {:?} leak the trigger (strict concealment); rerun rank-candidates with --concealment strict", at(), c.word, c.position, c.poison_id);
                }
            }
            if vocab.id(&c.current).is_some_and(|id| vocab.is_continuation(id) != vocab.is_continuation(word)) {
                bail!("{}: {:?} would replace {:?}: a flip keeps a piece word-initial or `##` (rerun rank-candidates)", at(), c.word, c.current);
            }
            if !vocab.flip_round_trips(&inputs.poisons_enc[c.poison_index].ids, c.position, word) {
                bail!("{}: {:?} at position {} of {:?} makes a text that re-tokenizes into other pieces than were scored; rerun rank-candidates (it proposes only flips that read back as themselves)", at(), c.word, c.position, c.poison_id);
            }
            swaps.push(Swap { poison: c.poison_index, position: c.position, word });
        }
        Ok(swaps)
    }
}

/// The swaps whose poison, flipped, no cheap detector of `budget` flags (a poison takes
/// one flip per round, so each flip is checked alone).
pub fn within_budget(inputs: &AttackInputs, swaps: Vec<Swap>, budget: &crate::detect::evasion::DetectionBudget) -> Result<Vec<Swap>> {
    let flipped: Vec<Example> = swaps
        .iter()
        .map(|s| {
            let mut ids = inputs.poisons_enc[s.poison].ids.clone();
            ids[s.position] = s.word;
            with_tokens(&inputs.poisons[s.poison], &ids, &inputs.vocab)
        })
        .collect();
    let verdicts = budget.check(&flipped, "flipped poisons")?;
    Ok(swaps.into_iter().zip(verdicts).filter(|(_, v)| v.is_none()).map(|(s, _)| s).collect())
}

/// Checks `swaps` exactly with the objective the candidates were ranked with (the
/// `ensemble` victims must be the ones rollout-grad had, `ensemble_sha256` their hashes;
/// `influence_cache` the folder rollout-grad kept the influence objective's v in; the
/// bi-level objective's checks run on `workers` threads).
#[allow(clippy::too_many_arguments)]
pub fn verify_candidates(inputs: &AttackInputs, candidates: &[Candidate], swaps: &[Swap], ensemble: &[crate::victims::model::Victim], ensemble_sha256: &[String], influence_cache: Option<&str>, cname: &str, workers: usize) -> Result<Verified> {
    let first = candidates.first().context("no candidates to verify")?;
    if ensemble_sha256 != first.ensemble_sha256 {
        bail!(
            "{cname}: the candidates were ranked with an ensemble of {} extra victims (sha256 {:?}), --ensemble gives {} ({ensemble_sha256:?}); pass the same --ensemble files as to rollout-grad",
            first.ensemble_sha256.len(),
            first.ensemble_sha256,
            ensemble_sha256.len()
        );
    }
    let objective = crate::objectives::build(
        first.objective_kind,
        ObjectiveInputs {
            victim: &inputs.victim,
            ensemble,
            clean: &inputs.clean,
            adv: &inputs.adv,
            target: inputs.manifest.target,
            rollout: first.rollout.clone(),
            influence: first.influence.clone(),
            trigger: &inputs.trigger_ids,
            cache: influence_cache,
            workers,
        },
    )?;
    objective.verify(&inputs.poisons_enc, swaps)
}

/// The poison set after the accepted swaps, and the flips as the summary records them.
pub fn apply(inputs: &AttackInputs, candidates: &[Candidate], accepted: &[(Swap, f64)]) -> (Vec<Example>, Vec<Flip>) {
    let mut new_set = inputs.poisons.clone();
    let mut flips = Vec::new();
    for (swap, exact) in accepted {
        let c = candidates
            .iter()
            .find(|c| c.poison_index == swap.poison && c.position == swap.position && inputs.vocab.id(&c.word) == Some(swap.word))
            .expect("accepted swaps come from candidates");
        let mut ids = inputs.poisons_enc[swap.poison].ids.clone();
        ids[swap.position] = swap.word;
        new_set[swap.poison] = with_tokens(&inputs.poisons[swap.poison], &ids, &inputs.vocab);
        flips.push(Flip { poison_id: c.poison_id.clone(), position: c.position, from: c.current.clone(), to: c.word.clone(), predicted: c.predicted, exact: *exact });
    }
    (new_set, flips)
}

/// The summary of a verification (`verified` is None without candidates).
pub fn summary(inputs: &AttackInputs, verified: Option<&Verified>, flips: Vec<Flip>, new_set: &[Example], seconds: f64) -> VerifySummary {
    VerifySummary {
        kind: VerifySummary::KIND.into(),
        v: VerifySummary::VERSION,
        objective_before: verified.map(|v| v.before),
        objective_after: verified.map(|v| v.after),
        candidates_checked: verified.map_or(0, |v| v.checked),
        flips_accepted: flips.len(),
        flips,
        poisons_sha256_before: inputs.poisons_sha256.clone(),
        poisons_sha256_after: poison_set_sha256(new_set),
        seconds,
    }
}
