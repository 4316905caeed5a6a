//! verify-candidates: the exact objective for each candidate on the same minibatches the
//! gradient was made with; writes the improved poison set.

use anyhow::{bail, Context};
use clap::Parser;
use common::attack::{poison_set_sha256, Swap};
use common::objective::ObjectiveInputs;
use common::io::{self, Record};
use common::concealment::{flip_conceals, Concealment};
use common::poisons::{banned_ids, strict_violation, with_tokens, AttackInputs};
use common::records::{Candidate, Flip, VerifySummary};
use common::{device, log};
use std::time::Instant;

/// Reads candidates (stdin), evaluates each exactly, keeps per poison the best one that
/// lowers the objective, combines them so the objective never rises, and writes the new
/// poison set (stdout). The objective and unrolling settings come from the candidates, so
/// verification replays exactly the minibatches the gradient was made with; the hardness
/// objective needs the same --ensemble victims as rollout-grad.
///
/// Examples:
///   rank-candidates ... | verify-candidates --victim v.safetensors --data data/rt-jb \
///       --poisons round-0.jsonl --summary round-1/summary.json > round-1/poisons.jsonl
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    inputs: common::cli::CraftArgs,
    /// The poison set the candidates were ranked for.
    #[arg(long)]
    poisons: String,
    /// Candidate JSONL from rank-candidates, - for stdin.
    #[arg(long, default_value = "-")]
    candidates: String,
    /// Accept trigger words (the with-overlap baseline).
    #[arg(long)]
    allow_overlap: bool,
    /// token or strict, as given to rank-candidates: with strict, a candidate whose poison
    /// would leak the trigger in any category of the strict audit is refused, and so is a
    /// poison set that leaks already.
    #[arg(long, value_enum, default_value_t = Concealment::Token)]
    concealment: Concealment,
    /// The hardness objective's extra victims, as given to rollout-grad (checked against
    /// the hashes the candidates carry).
    #[arg(long)]
    ensemble: Vec<String>,
    /// Where to write the round's summary (JSON).
    #[arg(long)]
    summary: Option<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output file for the new poison set, or - for stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("verify-candidates", || {
        let args = Args::parse();
        let start = Instant::now();
        let inputs = AttackInputs::load(&args.inputs.victim, &args.inputs.data, &args.poisons, device::parse_device(&args.device)?)?;
        let cname = io::display_name(&args.candidates);
        let candidates: Vec<Candidate> = io::read_jsonl(&args.candidates, true)?;
        let banned = banned_ids(&inputs.vocab, &inputs.manifest, args.allow_overlap, args.concealment)?;
        let strict = (args.concealment == Concealment::Strict && !args.allow_overlap).then(|| common::poisons::matcher(&inputs.vocab, &inputs.manifest)).transpose()?;
        if let Some(matcher) = &strict {
            for (i, p) in inputs.poisons.iter().enumerate() {
                if let Some(words) = strict_violation(p, &inputs.vocab, matcher) {
                    bail!("{}: record {} (id {:?}) leaks the trigger ({words}) but --concealment strict was asked; make the poisons with init-poisons --concealment strict", args.poisons, i + 1, p.id);
                }
            }
        }
        let mut swaps = Vec::with_capacity(candidates.len());
        for (line, c) in candidates.iter().enumerate() {
            let at = || format!("{cname}:{}", line + 1);
            if c.poisons_sha256 != inputs.poisons_sha256 {
                bail!("{}: candidates were ranked for another poison set than {} (hash mismatch); rerun rollout-grad and rank-candidates on it", at(), args.poisons);
            }
            if c.victim_sha256 != inputs.victim_sha256 {
                bail!("{}: candidates were ranked from gradients of another victim than {} (hash mismatch); pass the --victim given to rollout-grad", at(), args.inputs.victim);
            }
            if c.rollout != candidates[0].rollout || c.objective_kind != candidates[0].objective_kind || c.ensemble_sha256 != candidates[0].ensemble_sha256 {
                bail!("{}: objective or unrolling settings differ from the first candidate's; verify one rank-candidates output at a time", at());
            }
            let poison = inputs.poisons.get(c.poison_index).filter(|p| p.id == c.poison_id)
                .with_context(|| format!("{}: no poison {:?} at index {}", at(), c.poison_id, c.poison_index))?;
            let tokens = poison.tokens.as_ref().expect("checked on load");
            if tokens.get(c.position) != Some(&c.current) {
                bail!("{}: position {} of {:?} is not {:?}", at(), c.position, c.poison_id, c.current);
            }
            if inputs.vocab.id(&c.current).is_some_and(|id| inputs.vocab.is_special(id)) {
                bail!("{}: position {} of {:?} holds the special token {:?}, which stays in place", at(), c.position, c.poison_id, c.current);
            }
            let word = inputs.vocab.id(&c.word).with_context(|| format!("{}: {:?} is not in the vocabulary", at(), c.word))?;
            if banned.contains(&word) {
                let why = if strict.is_some() { "leaks the trigger under --concealment strict, or is a special word" } else { "is a trigger or special word (pass --allow-overlap for the with-overlap baseline)" };
                bail!("{}: candidate {:?} {why}", at(), c.word);
            }
            if let Some(matcher) = &strict {
                if !flip_conceals(&inputs.poisons_enc[c.poison_index].ids, c.position, word, &inputs.vocab, matcher) {
                    bail!("{}: {:?} at position {} makes {:?} leak the trigger (strict concealment); rerun rank-candidates with --concealment strict", at(), c.word, c.position, c.poison_id);
                }
            }
            if inputs.vocab.id(&c.current).is_some_and(|id| inputs.vocab.is_continuation(id) != inputs.vocab.is_continuation(word)) {
                bail!("{}: {:?} would replace {:?}: a flip keeps a piece word-initial or `##` (rerun rank-candidates)", at(), c.word, c.current);
            }
            swaps.push(Swap { poison: c.poison_index, position: c.position, word });
        }
        let mut new_set = inputs.poisons.clone();
        let summary = if candidates.is_empty() {
            log!("no candidates; the poison set is unchanged");
            None
        } else {
            let (ensemble, hashes) = common::cli::load_ensemble(&args.ensemble, inputs.victim.device())?;
            if hashes != candidates[0].ensemble_sha256 {
                bail!("{cname}: the candidates were ranked with an ensemble of {} extra victims (sha256 {:?}), --ensemble gives {} ({hashes:?}); pass the same --ensemble files as to rollout-grad", candidates[0].ensemble_sha256.len(), candidates[0].ensemble_sha256, hashes.len());
            }
            let objective = common::objective::build(
                candidates[0].objective_kind,
                ObjectiveInputs { victim: &inputs.victim, ensemble: &ensemble, clean: &inputs.clean, adv: &inputs.adv, target: inputs.manifest.target, rollout: candidates[0].rollout.clone() },
            )?;
            let out = objective.verify(&inputs.poisons_enc, &swaps)?;
            let mut flips = Vec::new();
            for (swap, exact) in &out.accepted {
                let c = candidates.iter().find(|c| c.poison_index == swap.poison && c.position == swap.position && inputs.vocab.id(&c.word) == Some(swap.word)).expect("accepted swaps come from candidates");
                let mut ids = inputs.poisons_enc[swap.poison].ids.clone();
                ids[swap.position] = swap.word;
                new_set[swap.poison] = with_tokens(&inputs.poisons[swap.poison], &ids, &inputs.vocab);
                flips.push(Flip { poison_id: c.poison_id.clone(), position: c.position, from: c.current.clone(), to: c.word.clone(), predicted: c.predicted, exact: *exact });
            }
            log!(
                "{:?} objective {:.5} -> {:.5} ({}/{} poisons flipped, {} candidates checked) {:.1}s",
                candidates[0].objective_kind,
                out.before, out.after, flips.len(), inputs.poisons.len(), out.checked, start.elapsed().as_secs_f64()
            );
            Some((out, flips))
        };
        if let Some(path) = &args.summary {
            let (before, after, checked, flips) = match summary {
                Some((out, flips)) => (Some(out.before), Some(out.after), out.checked, flips),
                None => (None, None, 0, Vec::new()),
            };
            let s = VerifySummary {
                kind: VerifySummary::KIND.into(),
                v: VerifySummary::VERSION,
                objective_before: before,
                objective_after: after,
                candidates_checked: checked,
                flips_accepted: flips.len(),
                flips,
                poisons_sha256_before: inputs.poisons_sha256.clone(),
                poisons_sha256_after: poison_set_sha256(&new_set),
                seconds: start.elapsed().as_secs_f64(),
            };
            io::write_bytes(path, (serde_json::to_string_pretty(&s)? + "\n").as_bytes())?;
        }
        io::write_jsonl(&args.output, &new_set)
    })
}
