//! init-poisons: the starting poison set of a crafting run, and the unoptimised,
//! nearest-neighbour and with-overlap baselines.

use clap::Parser;
use common::data::DataManifest;
use common::model::Victim;
use common::poisons::{self, InitStrategy};
use common::{device, io, log};

/// Writes N initial poisons (example JSONL with `tokens`, labelled with the target).
///
/// Examples:
///   init-poisons --victim v.safetensors --data data/rt-jb --count 50 > round-0.jsonl
///   init-poisons --victim v.safetensors --data data/rt-jb --strategy overlap --count 50 | finetune-eval ... --poisons -
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    inputs: common::cli::CraftArgs,
    /// Number of poisons.
    #[arg(long, default_value_t = 50)]
    count: usize,
    #[arg(long, value_enum, default_value = "random")]
    strategy: InitStrategy,
    /// Seed of the sentence choice and of random replacement words.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output file, or - for stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("init-poisons", || {
        let args = Args::parse();
        let (victim, vocab, _) = Victim::load(&args.inputs.victim, device::parse_device("cpu")?)?;
        let manifest = DataManifest::load(&args.inputs.data)?;
        let table = victim.params()["embedding.weight"].shallow_clone();
        let set = poisons::init(args.strategy, args.count, args.seed, &args.inputs.data, &manifest, &vocab, &table, victim.config.max_len)?;
        log!("{} poisons ({:?}), target {}", set.len(), args.strategy, manifest.target_name());
        io::write_jsonl(&args.output, &set)
    })
}
