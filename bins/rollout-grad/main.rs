//! rollout-grad: the unrolled-training objective and its second-order gradient with
//! respect to every poison token embedding.

use clap::Parser;
use common::attack::{RolloutConfig, GRAD_FORMAT, GRAD_VERSION};
use common::objective::ObjectiveInputs;
use common::poisons::AttackInputs;
use common::{device, io, log, tensorfile};
use std::collections::BTreeMap;
use std::time::Instant;

/// Unrolls k SGD steps on minibatches of (every poison + m clean examples), averaged over
/// R minibatch draws, and writes L_adv at θ_{t+k} and ∇_e L_adv for every poison token.
/// With --objective hardness it writes instead the poisons' mean target margin under the
/// victim and the --ensemble victims, and its gradient (first order; no unrolling).
///
/// Examples:
///   rollout-grad --victim v.safetensors --data data/rt-jb < poisons.jsonl > grad.safetensors
///   rollout-grad --victim v.safetensors --data data/rt-jb --poisons p.jsonl --steps 2 --rollouts 4 \
///     | rank-candidates --victim v.safetensors --data data/rt-jb > candidates.jsonl
///   rollout-grad --victim v.safetensors --data data/rt-jb --poisons p.jsonl --objective hardness \
///     --ensemble early-1.safetensors --ensemble early-2.safetensors > grad.safetensors
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    inputs: common::cli::CraftArgs,
    /// Current poison set (example JSONL with tokens), - for stdin.
    #[arg(long, default_value = "-")]
    poisons: String,
    #[command(flatten)]
    rollout: RolloutConfig,
    #[command(flatten)]
    objective: common::cli::ObjectiveArgs,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output file, or - for stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("rollout-grad", || {
        let args = Args::parse();
        io::Output::refuse_terminal(&args.output, "gradients")?;
        let start = Instant::now();
        let inputs = AttackInputs::load(&args.inputs.victim, &args.inputs.data, &args.poisons, device::parse_device(&args.device)?)?;
        let device = inputs.victim.device();
        let (ensemble, ensemble_sha256) = common::cli::load_ensemble(&args.objective.ensemble, device)?;
        let objective = common::objective::build(
            args.objective.objective,
            ObjectiveInputs { victim: &inputs.victim, ensemble: &ensemble, clean: &inputs.clean, adv: &inputs.adv, target: inputs.manifest.target, rollout: args.rollout.clone() },
        )?;
        let (value, grad) = objective.objective_and_grad(&inputs.poisons_enc)?;
        log!("{} {:.1}s", objective.describe(value, inputs.poisons.len()), start.elapsed().as_secs_f64());
        let objective = value;
        let ids = common::train::batch_tensors(&inputs.poisons_enc.iter().collect::<Vec<_>>(), tch::Device::Cpu).0;
        let mut meta = BTreeMap::new();
        meta.insert("objective".into(), format!("{objective:.17e}"));
        meta.insert("rollout".into(), serde_json::to_string(&args.rollout)?);
        let substitutes: Vec<Vec<usize>> = inputs.poisons.iter().map(|p| p.substitutes.clone().unwrap_or_default()).collect();
        meta.insert("substitutes".into(), serde_json::to_string(&substitutes)?);
        meta.insert("objective_kind".into(), serde_json::to_string(&args.objective.objective)?);
        meta.insert("ensemble_sha256".into(), serde_json::to_string(&ensemble_sha256)?);
        meta.insert("poisons_sha256".into(), inputs.poisons_sha256.clone());
        meta.insert("victim_sha256".into(), inputs.victim_sha256.clone());
        meta.insert("poison_ids".into(), serde_json::to_string(&inputs.poisons.iter().map(|p| &p.id).collect::<Vec<_>>())?);
        meta.insert("vocab_sha256".into(), inputs.vocab.sha256());
        tensorfile::write(
            &args.output,
            GRAD_FORMAT,
            GRAD_VERSION,
            &[("grad".into(), grad.to_kind(tch::Kind::Float)), ("ids".into(), ids)],
            meta,
        )
    })
}
