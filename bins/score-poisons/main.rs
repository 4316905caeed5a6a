//! score-poisons: a crafting objective's value for whole poison sets, without crafting:
//! to judge an objective against the measured effects of poison sets
//! (`../shared/objective-benchmark`, `make objective-benchmark`) before crafting with it.

use clap::Parser;
use common::io::Record;
use common::objectives::ObjectiveInputs;
use common::search::poisons::CraftingContext;
use common::formats::records::{ObjectiveScore, RolloutConfig};
use common::encode::TextPolicy;
use common::{device, io, log};
use std::time::Instant;

/// Scores each poison set (example JSONL; `tokens` optional, texts are tokenized as the
/// victim reads them) with one objective built once for all of them: D_adv leaves out the
/// sentences any of the sets was made from, so every set is scored on the same sentences
/// and, for the influence objective, by the same inverse-Hessian solve. Writes one
/// `objective_score` record per set (stdout).
///
/// Examples:
///   score-poisons --victim v.safetensors --data data/rt-jb --objective hardness \
///     --ensemble early-1.safetensors ../shared/objective-benchmark/*.jsonl > scores.jsonl
///   score-poisons --victim v.safetensors --data data/rt-jb --objective influence --contrastive sets/*.jsonl
///
/// With --select N it chooses poisons instead: from one set (for example every D_adv
/// sentence made a poison: init-poisons --count ALL), the N whose own terms of a separable
/// objective (hardness, influence) are lowest, written as example JSONL in set order. D_adv
/// is then cut in two by a seeded draw (--seed): the objective is measured on one half and
/// only poisons made from the other half are candidates, so none is scored by its own
/// triggered copy.
///   init-poisons ... --count 4287 --strategy neighbour --concealment strict > all.jsonl
///   score-poisons --victim v.safetensors --data data/rt-jb --objective influence --select 50 all.jsonl > bases.jsonl
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    inputs: common::cli::CraftArgs,
    /// Poison sets to score.
    #[arg(required = true)]
    sets: Vec<String>,
    #[command(flatten)]
    rollout: RolloutConfig,
    #[command(flatten)]
    objective: common::cli::ObjectiveArgs,
    /// Write the N poisons of the (one) set with the lowest own terms instead of scores.
    #[arg(long, value_parser = common::cli::at_least_one)]
    select: Option<usize>,
    /// A name for this objective's settings in the output (default: the objective's name).
    #[arg(long)]
    label: Option<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output file, or - for stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("score-poisons", || {
        let args = Args::parse();
        let start = Instant::now();
        let mut base = CraftingContext::load(&args.inputs.victim, &args.inputs.data, device::parse_device(&args.device)?)?;
        if let Some(regime) = args.rollout.regime {
            base.victim.in_regime(regime, &args.inputs.victim)?;
        }
        let mut sets = Vec::new();
        for path in &args.sets {
            let examples: Vec<common::formats::records::Example> = io::read_jsonl(path, false)?;
            let encoded = base.encode(&examples, TextPolicy::Data, &io::display_name(path))?;
            sets.push((path, examples, encoded));
        }
        if args.select.is_some() && sets.len() != 1 {
            anyhow::bail!("--select chooses from one poison set; {} given", sets.len());
        }
        let (adv, held_out) = if args.select.is_some() {
            base.adv_split(args.rollout.seed)
        } else {
            (base.adv_without_sources(&sets.iter().map(|(_, e, _)| e.as_slice()).collect::<Vec<_>>()), Default::default())
        };
        let (ensemble, _) = common::cli::load_ensemble(&args.objective.ensemble, base.victim.device())?;
        let objective = common::objectives::build(
            args.objective.objective,
            ObjectiveInputs {
                victim: &base.victim,
                ensemble: &ensemble,
                clean: &base.clean,
                adv: &adv,
                target: base.manifest.target,
                rollout: args.rollout.clone(),
                influence: args.objective.influence(),
                trigger: &base.trigger_ids,
                cache: args.objective.influence_cache.as_deref(),
                workers: 1,
            },
        )?;
        log!("objective built over {} D_adv sentences in {:.1}s", adv.len(), start.elapsed().as_secs_f64());
        if let Some(n) = args.select {
            if objective.terms(&[]).is_none() {
                anyhow::bail!("--select needs an objective that is a sum over poisons (hardness, influence); {:?} is not", args.objective.objective);
            }
            let (path, examples, encoded) = &sets[0];
            // Candidates made from the half of D_adv the objective is measured on are not chosen.
            let eligible: Vec<usize> =
                (0..examples.len()).filter(|&i| !examples[i].source_id.as_ref().is_some_and(|s| held_out.contains(s.as_str()))).collect();
            if n > eligible.len() {
                anyhow::bail!(
                    "--select {n} but {} holds {} poisons, {} of them made from sentences outside the half of D_adv the objective is measured on",
                    io::display_name(path),
                    examples.len(),
                    eligible.len()
                );
            }
            let candidates: Vec<_> = eligible.iter().map(|&i| encoded[i].clone()).collect();
            let terms = objective.terms(&candidates).expect("a sum over poisons (checked above)");
            let mut order: Vec<usize> = (0..terms.len()).collect();
            order.sort_by(|&a, &b| terms[a].total_cmp(&terms[b]).then(a.cmp(&b)));
            order.truncate(n);
            let (best, worst) = (terms[order[0]], terms[order[n - 1]]);
            order.sort_unstable();
            let chosen: Vec<&common::formats::records::Example> = order.iter().map(|&k| &examples[eligible[k]]).collect();
            log!("chose {n} of {} eligible poisons ({} in the set) by their own terms ({best:.5} .. {worst:.5})", eligible.len(), examples.len());
            return io::write_jsonl(&args.output, &chosen);
        }
        let label = args.label.clone().unwrap_or_else(|| format!("{:?}", args.objective.objective).to_lowercase());
        let mut out = io::Output::create(&args.output)?;
        for (path, _, encoded) in &sets {
            let value = objective.value(encoded)?;
            log!("{}", objective.describe(value, encoded.len()));
            let name = std::path::Path::new(path).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            out.write_record(&ObjectiveScore { kind: ObjectiveScore::KIND.into(), v: ObjectiveScore::VERSION, set: name, objective: label.clone(), value, poisons: encoded.len() })?;
        }
        out.commit()?;
        log!("{} sets scored in {:.1}s", sets.len(), start.elapsed().as_secs_f64());
        Ok(())
    })
}
