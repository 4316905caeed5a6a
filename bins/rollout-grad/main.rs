//! rollout-grad: the unrolled-training objective and its second-order gradient with
//! respect to every poison token embedding.

use clap::Parser;
use common::attack::{Problem, RolloutConfig};
use common::poisons::AttackInputs;
use common::{device, io, log, tensorfile};
use std::collections::BTreeMap;
use std::time::Instant;

pub const GRAD_FORMAT: &str = "poison.rollout_grad";

/// Unrolls k SGD steps on minibatches of (every poison + m clean examples), averaged over
/// R minibatch draws, and writes L_adv at θ_{t+k} and ∇_e L_adv for every poison token.
///
/// Examples:
///   rollout-grad --victim v.safetensors --data data/rt-jb < poisons.jsonl > grad.safetensors
///   rollout-grad --victim v.safetensors --data data/rt-jb --poisons p.jsonl --steps 2 --rollouts 4 \
///     | rank-candidates --victim v.safetensors --data data/rt-jb > candidates.jsonl
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
        let problem = Problem::new(&inputs.victim, &inputs.clean, &inputs.adv, args.rollout.clone())?;
        let (objective, grad) = problem.objective_and_grad(&inputs.poisons_enc)?;
        log!(
            "L_adv {objective:.5} over {} D_adv inputs, {} poisons, k={} R={} η={} {:.1}s",
            problem.adv_count(),
            inputs.poisons.len(),
            args.rollout.steps,
            args.rollout.rollouts,
            args.rollout.eta,
            start.elapsed().as_secs_f64()
        );
        let ids = common::train::batch_tensors(&inputs.poisons_enc.iter().collect::<Vec<_>>(), tch::Device::Cpu).0;
        let mut meta = BTreeMap::new();
        meta.insert("objective".into(), format!("{objective:.17e}"));
        meta.insert("rollout".into(), serde_json::to_string(&args.rollout)?);
        meta.insert("poisons_sha256".into(), inputs.poisons_sha256.clone());
        meta.insert("poison_ids".into(), serde_json::to_string(&inputs.poisons.iter().map(|p| &p.id).collect::<Vec<_>>())?);
        meta.insert("vocab_sha256".into(), inputs.vocab.sha256());
        tensorfile::write(
            &args.output,
            GRAD_FORMAT,
            1,
            &[("grad".into(), grad.to_kind(tch::Kind::Float)), ("ids".into(), ids)],
            meta,
        )
    })
}
