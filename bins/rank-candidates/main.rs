//! rank-candidates: first-order (Taylor) scores over the vocabulary, bottom-K candidate
//! replacements per poison position.

use anyhow::bail;
use clap::Parser;
use common::concealment::Concealment;
use common::data::DataManifest;
use common::formats::gradfile::GradFile;
use common::io;
use common::log;
use common::victims::model::Victim;
use common::search::rank::{rank, BanOptions, Bans, Positions, RankPolicy};

/// Scores every vocabulary word at every poison position by ∇g·e' and writes the K words
/// with the lowest predicted change ∇g·(e' − e) per chosen position, as candidate JSONL.
/// Never proposes padding, the unknown word, the current word or (without
/// --allow-overlap) a trigger word.
///
/// Examples:
///   rollout-grad ... | rank-candidates --victim v.safetensors --data data/rt-jb -k 50 > candidates.jsonl
///   rank-candidates --victim v.safetensors --data data/rt-jb --grad grad.safetensors --positions all | head
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    inputs: common::cli::CraftArgs,
    /// Gradient file from rollout-grad, - for stdin.
    #[arg(long, default_value = "-")]
    grad: String,
    /// Candidates per position.
    #[arg(short, default_value_t = 50, value_parser = common::cli::at_least_one)]
    k: usize,
    /// Positions per poison: all, best (one), or a number N (the N positions whose best
    /// candidate predicts the largest decrease). Measured on Rotten Tomatoes (BiLSTM, 50
    /// poisons, round 1): at 2,500 exact checks, 5 positions x K=10 lowered L_adv
    /// 0.862 -> 0.692, one position x K=50 only to 0.734; all positions x K=3 (3,474
    /// checks) to 0.678.
    #[arg(long, default_value = "5")]
    positions: Positions,
    /// Allow trigger words as candidates (the with-overlap baseline).
    #[arg(long)]
    allow_overlap: bool,
    /// token: never propose a trigger word (or piece). strict: never propose a word that
    /// leaks the trigger in any category of the strict audit, nor a WordPiece flip that
    /// joins pieces into such a word (the poisons must be strict already: init-poisons
    /// --concealment strict).
    #[arg(long, value_enum, default_value_t = Concealment::Token)]
    concealment: Concealment,
    /// Leave the positions that hold the trigger words' replacements alone (the poisons'
    /// `substitutes`): crafting then works on the rest of the sentence.
    #[arg(long)]
    keep_substitutes: bool,
    /// Only flip the positions that hold the trigger words' replacements (the carrier
    /// slots); the rest of each sentence stays as it is.
    #[arg(long, conflicts_with = "keep_substitutes")]
    only_substitutes: bool,
    /// Only propose words seen at least this often in the clean training split (0: any
    /// vocabulary word). Rare words and GloVe-only words make odd, conspicuous poisons.
    #[arg(long, default_value_t = 0)]
    min_count: usize,
    /// Never propose the trigger words' N nearest embedding neighbours, so that crafting
    /// cannot simply add more trigger-like words.
    #[arg(long, default_value_t = 0)]
    exclude_neighbours: usize,
    /// Evasion: never propose a word that would lift a poison over the glove-trigger-word
    /// detector's threshold at this percentage of false positives on the clean training
    /// split (see init-poisons --evade-fpr).
    #[arg(long)]
    evade_fpr: Option<f64>,
    /// Keep only the N best-predicted candidates of each poison (over all its positions).
    #[arg(long, value_parser = common::cli::at_least_one)]
    per_poison: Option<usize>,
    /// Output file, or - for stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("rank-candidates", || {
        let args = Args::parse();
        let common::victims::model::VictimFile { victim, vocab, .. } = Victim::load(&args.inputs.victim, tch::Device::Cpu)?;
        let manifest = DataManifest::load(&args.inputs.data)?;
        let grad = GradFile::read(&args.grad)?;
        if grad.meta.vocab_sha256 != vocab.sha256() {
            bail!("{} was made with another vocabulary than {}", io::display_name(&args.grad), args.inputs.victim);
        }
        if grad.word_scores.is_none() {
            let rules = common::tasks::rules::of_victim(&victim.config);
            if rules.poisons_are_targets {
                bail!("{} holds no word scores but {} is {} (a flip also changes what a poison teaches); rerun rollout-grad with this victim", io::display_name(&args.grad), args.inputs.victim, rules.victim_kind);
            }
            if victim.config.train_embeddings {
                bail!("{} holds no word scores but {} trains its embedding table (a flip also changes which row the poison's update trains); rerun rollout-grad --objective bilevel with this victim", io::display_name(&args.grad), args.inputs.victim);
            }
        }
        let table = victim.params()["embedding.weight"].to_kind(tch::Kind::Float);
        let ban_options = BanOptions {
            allow_overlap: args.allow_overlap,
            concealment: args.concealment,
            exclude_neighbours: args.exclude_neighbours,
            min_count: args.min_count,
            keep_substitutes: args.keep_substitutes,
            only_substitutes: args.only_substitutes,
        };
        let mut bans = Bans::new(&vocab, &manifest, &table, &args.inputs.data, &ban_options)?;
        if let Some(fpr) = args.evade_fpr {
            let b = common::detect::evasion::glove_budget(&table, &vocab, &manifest, &args.inputs.data, fpr)?;
            log!("evasion budget: cosine to a trigger word at most {:.4} ({fpr}% FPR): {} words never proposed", b.threshold, b.banned.len());
            bans.words.extend(b.banned);
        }
        let policy = RankPolicy { k: args.k, positions: args.positions, per_poison: args.per_poison };
        let candidates = rank(&vocab, &table, &grad, &bans, &policy).map_err(|e| e.context(io::display_name(&args.grad)))?;
        let mut out = io::Output::create(&args.output)?;
        for c in &candidates {
            out.write_record(c)?;
        }
        out.commit()?;
        log!("{} candidates for {} poisons ({:?} positions, K={})", candidates.len(), grad.len(), args.positions, args.k);
        Ok(())
    })
}
