//! rollout-grad: the unrolled-training objective and its second-order gradient with
//! respect to every poison token embedding.

use clap::Parser;
use common::objectives::bilevel::RolloutConfig;
use common::formats::gradfile::{GradFile, GradMeta};
use common::objectives::ObjectiveInputs;
use common::search::poisons::AttackInputs;
use common::{device, io, log};
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
        let mut inputs = AttackInputs::load(&args.inputs.victim, &args.inputs.data, &args.poisons, device::parse_device(&args.device)?)?;
        if let Some(regime) = args.rollout.regime {
            inputs.victim.in_regime(regime, &args.inputs.victim)?;
        }
        let device = inputs.victim.device();
        let (ensemble, ensemble_sha256) = common::cli::load_ensemble(&args.objective.ensemble, device)?;
        let objective = common::objectives::build(
            args.objective.objective,
            ObjectiveInputs {
                victim: &inputs.victim,
                ensemble: &ensemble,
                clean: &inputs.clean,
                adv: &inputs.adv,
                target: inputs.manifest.target,
                rollout: args.rollout.clone(),
                influence: args.objective.influence(),
                trigger: &inputs.trigger_ids,
                cache: args.objective.influence_cache.as_deref(),
                workers: 1,
            },
        )?;
        let (value, grad, word_scores) = objective.objective_grad_and_word_scores(&inputs.poisons_enc)?;
        log!("{} {:.1}s", objective.describe(value, inputs.poisons.len()), start.elapsed().as_secs_f64());
        let ids = common::encode::batch_tensors(&inputs.poisons_enc.iter().collect::<Vec<_>>(), tch::Device::Cpu).0;
        let meta = GradMeta {
            objective: value,
            objective_kind: args.objective.objective,
            rollout: args.rollout.clone(),
            ensemble_sha256,
            influence: args.objective.influence(),
            poisons_sha256: inputs.poisons_sha256.clone(),
            victim_sha256: inputs.victim_sha256.clone(),
            vocab_sha256: inputs.vocab.sha256(),
            poison_ids: inputs.poisons.iter().map(|p| p.id.clone()).collect(),
            substitutes: inputs.poisons.iter().map(|p| p.substitutes.clone().unwrap_or_default()).collect(),
        };
        GradFile { grad, ids, word_scores, meta }.write(&args.output)
    })
}
