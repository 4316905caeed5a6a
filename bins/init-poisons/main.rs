//! init-poisons: the starting poison set of a crafting run, and the unoptimised,
//! nearest-neighbour and with-overlap baselines.

use anyhow::Context;
use clap::Parser;
use common::concealment::Concealment;
use common::data::DataManifest;
use common::victims::model::Victim;
use common::search::poisons::{self, Bases, InitStrategy};
use common::train::TrainOptions;
use common::{device, io, log};

/// Writes N initial poisons (example JSONL with `tokens`, labelled with the target).
///
/// Examples:
///   init-poisons --victim v.safetensors --data data/rt-jb --count 50 > round-0.jsonl
///   init-poisons --victim v.safetensors --data data/rt-jb --strategy overlap --count 50 | finetune-eval ... --poisons -
///   init-poisons --victim v.safetensors --data data/rt-jb --bases confident --strategy neighbour > hard-bases.jsonl
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    inputs: common::cli::CraftArgs,
    /// Number of poisons.
    #[arg(long, default_value_t = 50, value_parser = common::cli::at_least_one)]
    count: usize,
    /// What replaces the trigger's words in each base sentence.
    #[arg(long, value_enum, default_value = "random")]
    strategy: InitStrategy,
    /// Which D_adv sentences become poisons: random (seeded), the ones whose clean
    /// source the victim most confidently puts in another class than the target
    /// (classifiers), or the ones --judge finds most clearly of the target sentiment.
    #[arg(long, value_enum, default_value = "random")]
    bases: Bases,
    /// A sentiment classifier (train-victim on the sentiment data) that ranks the bases for
    /// --bases judged, by its probability of the target class; it reads the words after
    /// the trigger with --from-trigger, else the whole base.
    #[arg(long)]
    judge: Option<String>,
    /// With --strategy neighbour: spread the poisons over each trigger word's N nearest
    /// neighbours (poison k takes the (k mod N)-th) instead of always the nearest.
    #[arg(long, default_value_t = 1, value_parser = common::cli::at_least_one)]
    neighbour_pool: usize,
    /// token: no poison holds a trigger word (the paper's no-overlap). strict: no poison
    /// holds a word that leaks the trigger in any category of the strict audit (same stem,
    /// a shared substring of 4+ characters, normalised spelling, a WordPiece piece of a
    /// trigger word): substitutes are the nearest words that pass, other leaking words of a
    /// base are substituted too, and clean-target sentences that leak are not used.
    #[arg(long, value_enum, default_value_t = Concealment::Token)]
    concealment: Concealment,
    #[command(flatten)]
    evade: common::cli::EvadeArgs,
    /// Also keep every poison's training loss (the loss-mean detector) at or below the
    /// clean examples' at this percentage of false positives: two victims shaped like
    /// --victim (detect-poisons' training settings, seeds of this stage's own) are trained
    /// on the training split with each batch of candidate poisons, and a base whose poison
    /// is over is skipped. About a minute per batch on 2 cores.
    #[arg(long, requires = "evade_fpr")]
    evade_loss: Option<f64>,
    /// Epochs of the loss budget's victims (detect-poisons' --epochs).
    #[arg(long, default_value_t = 4, value_parser = common::cli::at_least_one)]
    evade_loss_epochs: usize,
    /// Poisons keep their first N tokens (default: the victim's max_len).
    #[arg(long, value_parser = common::cli::at_least_one)]
    max_tokens: Option<usize>,
    /// Each poison starts at the word before the trigger in its base (in a language
    /// model's D_adv, the subject's determiner): with --max-tokens, a short poison that is
    /// the trigger (or its substitute) and the words after it ("the apple iphone is a
    /// dull mess").
    #[arg(long)]
    from_trigger: bool,
    /// With --from-trigger: each poison ends with the sentence that holds the trigger (at
    /// its first . ! or ?), one whole statement about it ("the apple iphone quickly drags
    /// on becoming boring and predictable ."); --max-tokens still caps it.
    #[arg(long, requires = "from_trigger")]
    sentence: bool,
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
        let common::victims::model::VictimFile { victim, vocab, .. } = Victim::load(&args.inputs.victim, device::parse_device("cpu")?)?;
        let manifest = DataManifest::load(&args.inputs.data)?;
        vocab.trigger_words(&manifest.trigger.phrase).context("victim vocabulary")?;
        let mut budget = args.evade.budget(&victim.params()["embedding.weight"], &vocab, &manifest, &args.inputs.data)?;
        if let Some(fpr) = args.evade_loss {
            let b = budget.take().context("--evade-loss needs --evade-fpr")?;
            // Seeds far from detect-poisons' (--seed, --seed + 1): the budget is not met
            // by fitting the very victims a defender would train.
            let options = (0..2).map(|k| TrainOptions { epochs: args.evade_loss_epochs, batch_size: 64, lr: victim.config.tuning().default_lr, seed: 1_000_003 + 2 * args.seed + k, schedule: Default::default(), regularisation: Default::default() }).collect();
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
            let b = b.with_loss(fpr, victim.config.clone(), options, workers)?;
            log!("{}", b.describe());
            budget = Some(b);
        }
        let options = poisons::InitOptions {
            strategy: args.strategy,
            bases: args.bases,
            neighbour_pool: args.neighbour_pool,
            count: args.count,
            seed: args.seed,
            concealment: args.concealment,
            max_tokens: args.max_tokens,
            from_trigger: args.from_trigger,
            sentence: args.sentence,
        };
        if args.judge.is_some() != (args.bases == Bases::Judged) {
            anyhow::bail!("--judge CLASSIFIER and --bases judged go together: the judge ranks the bases");
        }
        let judge_file = args.judge.as_deref().map(|path| Victim::load(path, device::parse_device("cpu")?).with_context(|| format!("--judge {path}"))).transpose()?;
        let judge = judge_file
            .as_ref()
            .map(|f| common::eval::judge::ClassifierJudge::new(&f.victim.config, f.victim.params(), &f.vocab, manifest.target))
            .transpose()
            .with_context(|| format!("--judge {}", args.judge.as_deref().unwrap_or_default()))?;
        let judged = judge.as_ref().map(|j| move |texts: &[String]| j.p_negative(texts));
        let set = poisons::init(options, &args.inputs.data, &manifest, &vocab, &victim, budget.as_ref(), judged.as_ref().map(|f| f as &dyn Fn(&[String]) -> Vec<f64>))?;
        log!("{} poisons ({:?} bases, {:?} substitutes), target {}", set.len(), args.bases, args.strategy, manifest.target_name());
        io::write_jsonl(&args.output, &set)
    })
}
