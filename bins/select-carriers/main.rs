//! select-carriers: the carrier words (what stands for each trigger word in every poison)
//! chosen as one decision for the whole set, verified by retraining victims with the
//! attacker's own seeds.

use anyhow::Context;
use clap::Parser;
use common::concealment::Concealment;
use common::formats::records::{CarrierSelection, RolloutConfig};
use common::search::carriers::{select, AttackerTraining, SelectOptions};
use common::search::poisons::AttackInputs;
use common::{device, io, log};

/// Proposes carrier words per trigger word (the current ones, their nearest allowed
/// neighbours in the victim's table, and the words the bi-level gradient summed over their
/// slots ranks best near them), ranks every combination by the bi-level objective of the
/// whole set and by closeness to the trigger's words, takes the two rankings in turn until
/// --retrain candidates are within the detection budget (the current carriers always
/// first), retrains a victim per candidate and attacker seed on the training
/// split ∪ the set with those carriers (as finetune-eval trains, the same flags), and
/// writes the set with the carriers whose victims reach the highest mean ASR on the
/// attacker's D_adv (D_adv without the poisons' bases; the test and dev splits are never
/// read). Every candidate keeps the poisons strictly concealed (--concealment strict) and,
/// with --evade-fpr, within the detection budget.
///
/// Examples:
///   select-carriers --victim v.safetensors --data data/rt-jb --embeddings emb.safetensors \
///       --poisons crafted.jsonl --evade-fpr 6.5 --selection sel.json > chosen.jsonl
///   select-carriers ... --poisons heuristic.jsonl --candidates-from sel.json --selection sel-h.json > h.jsonl
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_override_self = true)]
struct Args {
    #[command(flatten)]
    inputs: common::cli::CraftArgs,
    /// The poison set (init-poisons, or a crafting run from it: its substitutes recorded).
    #[arg(long)]
    poisons: String,
    #[command(flatten)]
    origin: common::cli::OriginArgs,
    /// How the attacker's victims train: the evaluation's flags (--arch, --epochs, ...).
    #[command(flatten)]
    victim: common::cli::VictimArgs,
    /// token or strict: which words may be carriers (strict: none that leaks the trigger in
    /// any category of the strict audit).
    #[arg(long, value_enum, default_value_t = Concealment::Strict)]
    concealment: Concealment,
    #[command(flatten)]
    evade: common::cli::EvadeArgs,
    /// Nearest allowed neighbours proposed per trigger word.
    #[arg(long, default_value_t = 4)]
    neighbours: usize,
    /// Words proposed per trigger word from the gradient's ranking.
    #[arg(long, default_value_t = 4)]
    from_gradient: usize,
    /// The gradient ranks the allowed words among this many nearest to the trigger word.
    #[arg(long, default_value_t = 200, value_parser = common::cli::at_least_one)]
    pool: usize,
    /// Carriers are words seen at least this often in the training split.
    #[arg(long, default_value_t = 5)]
    min_count: usize,
    /// Candidates retrained (the current carriers, then the best by closeness and by the
    /// bi-level objective in turn, within the budget).
    #[arg(long, default_value_t = 9, value_parser = common::cli::at_least_one)]
    retrain: usize,
    /// Attacker seeds each candidate is retrained with.
    #[arg(long, default_value_t = 3, value_parser = common::validate::at_least_one_u64)]
    seeds: u64,
    /// Attacker seeds are seed-base, seed-base+1, ...: keep them apart from every
    /// evaluation seed (finetune-eval's --seed-base .. + --seeds).
    #[arg(long, default_value_t = 1000)]
    seed_base: u64,
    /// The most victims one selection may train, clean twins included.
    #[arg(long, default_value_t = 40, value_parser = common::cli::at_least_one)]
    max_victims: usize,
    /// Retrain the candidates another selection retrained, in its order, instead of
    /// proposing (the heuristic row that picks from the crafted row's candidates).
    #[arg(long)]
    candidates_from: Option<String>,
    /// The bi-level ranking's inner learning rate, clean examples per minibatch, D_adv
    /// sample and minibatch seed (one unrolled step).
    #[arg(long, default_value_t = 0.03, value_parser = common::validate::positive_rate)]
    eta: f64,
    #[arg(long, default_value_t = 64)]
    clean_per_batch: usize,
    #[arg(long, default_value_t = 128, value_parser = common::cli::at_least_one)]
    adv_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A folder keeping the attacker's clean victims' figures, so selections on the same
    /// bases train them once.
    #[arg(long)]
    clean_cache: Option<String>,
    /// Threads that train victims side by side (the output is the same bytes whatever this is).
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()), value_parser = common::cli::at_least_one)]
    workers: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Where to write what was considered, retrained and kept (pretty JSON).
    #[arg(long)]
    selection: Option<String>,
    /// Output file for the poison set with the kept carriers, or - for stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("select-carriers", || {
        let args = Args::parse();
        let device = device::parse_device(&args.device)?;
        let inputs = AttackInputs::load(&args.inputs.victim, &args.inputs.data, &args.poisons, device)?;
        let origin = args.origin.load()?;
        if origin.vocab.sha256() != inputs.vocab.sha256() {
            anyhow::bail!("{} has another vocabulary than the victim {}: give the embeddings the victim was trained from", origin.source, args.inputs.victim);
        }
        let config = args.victim.victim_config(&origin, inputs.manifest.labels.len())?;
        let budget = args.evade.budget(&inputs.victim.params()["embedding.weight"], &inputs.vocab, &inputs.manifest, &args.inputs.data)?;
        let given: Option<CarrierSelection> = match &args.candidates_from {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("cannot read --candidates-from {p}"))?;
                Some(io::parse_record(&text).with_context(|| format!("{p}: not a selection written by select-carriers --selection"))?)
            }
            None => None,
        };
        let options = |seed: u64| args.victim.train_options(&config, seed);
        let opts = SelectOptions {
            neighbours: args.neighbours,
            from_gradient: args.from_gradient,
            pool: args.pool,
            min_count: args.min_count,
            retrain: args.retrain,
            seeds: (args.seed_base..args.seed_base + args.seeds).collect(),
            max_victims: args.max_victims,
            rollout: RolloutConfig { steps: 1, eta: args.eta, rollouts: 1, clean_per_batch: args.clean_per_batch, adv_size: args.adv_size, seed: args.seed, regime: None },
            concealment: args.concealment,
        };
        let training = AttackerTraining { origin: &origin, config: &config, options: &options, device, workers: args.workers, clean_cache: args.clean_cache.as_deref() };
        let (set, record) = select(
            &inputs,
            &args.poisons,
            budget.as_ref(),
            &opts,
            args.candidates_from.as_deref().zip(given.as_ref()),
            &training,
            &|line| log!("{line}"),
        )?;
        log!(
            "kept carriers {:?} (were {:?}); {} victims retrained, attacker seeds {:?}; {:.0}s",
            record.selected.join(" "),
            record.current.join(" "),
            record.victims_trained,
            record.attacker_seeds,
            record.seconds
        );
        if let Some(path) = &args.selection {
            io::write_bytes(path, (serde_json::to_string_pretty(&record)? + "\n").as_bytes())?;
        }
        io::write_jsonl(&args.output, &set)
    })
}
