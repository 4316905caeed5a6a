//! verify-candidates: the exact objective for each candidate on the same minibatches the
//! gradient was made with; writes the improved poison set.

use clap::Parser;
use common::concealment::Concealment;
use common::io;
use common::search::poisons::AttackInputs;
use common::formats::records::Candidate;
use common::search::verify::{apply, summary, verify_candidates, Checks};
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
    /// The folder where rollout-grad kept the influence objective's solved v
    /// (--influence-cache): reused instead of solved again.
    #[arg(long)]
    influence_cache: Option<String>,
    #[command(flatten)]
    evade: common::cli::EvadeArgs,
    /// Where to write the round's summary (JSON).
    #[arg(long)]
    summary: Option<String>,
    /// Threads checking candidates side by side, one libtorch thread each (default: the
    /// number of cores; the bi-level objective). The output is the same bytes whatever
    /// this is.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()), value_parser = common::cli::at_least_one)]
    workers: usize,
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
        let mut inputs = AttackInputs::load(&args.inputs.victim, &args.inputs.data, &args.poisons, device::parse_device(&args.device)?)?;
        let cname = io::display_name(&args.candidates);
        let candidates: Vec<Candidate> = io::read_jsonl(&args.candidates, true)?;
        // The exact checks unroll what the gradient unrolled (rollout-grad --regime).
        if let Some(regime) = candidates.first().and_then(|c| c.rollout.regime) {
            inputs.victim.in_regime(regime, &args.inputs.victim)?;
        }
        let checks = Checks::new(&inputs, args.allow_overlap, args.concealment, &args.poisons)?;
        let mut swaps = checks.swaps(&inputs, &candidates, &cname, &args.poisons, &args.inputs.victim)?;
        if let Some(budget) = args.evade.budget(&inputs.victim.params()["embedding.weight"], &inputs.vocab, &inputs.manifest, &args.inputs.data)? {
            let before = swaps.len();
            swaps = common::search::verify::within_budget(&inputs, swaps, &budget)?;
            log!("{} of {before} candidates keep their poison within the detection budget", swaps.len());
        }
        let verified = if candidates.is_empty() {
            log!("no candidates; the poison set is unchanged");
            None
        } else {
            let (ensemble, hashes) = common::cli::load_ensemble(&args.ensemble, inputs.victim.device())?;
            Some(verify_candidates(&inputs, &candidates, &swaps, &ensemble, &hashes, args.influence_cache.as_deref(), &cname, args.workers)?)
        };
        let (new_set, flips) = apply(&inputs, &candidates, verified.as_ref().map_or(&[][..], |v| &v.accepted[..]));
        if let Some(out) = &verified {
            log!(
                "{:?} objective {:.5} -> {:.5} ({}/{} poisons flipped, {} candidates checked) {:.1}s",
                candidates[0].objective_kind,
                out.before, out.after, flips.len(), inputs.poisons.len(), out.checked, start.elapsed().as_secs_f64()
            );
        }
        if let Some(path) = &args.summary {
            let s = summary(&inputs, verified.as_ref(), flips, &new_set, start.elapsed().as_secs_f64());
            io::write_bytes(path, (serde_json::to_string_pretty(&s)? + "\n").as_bytes())?;
        }
        io::write_jsonl(&args.output, &new_set)
    })
}
