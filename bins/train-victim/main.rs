//! train-victim: trains one victim on clean (± poison) examples and writes its weights.

use anyhow::{bail, Context};
use clap::Parser;
use common::cli::VictimArgs;
use common::formats::records::Example;
use common::train;
use common::encode::{encode_for, TextPolicy};
use common::{device, io, log};
use std::time::Instant;

/// Trains a victim (seeded) and writes a `poison.victim` safetensors file.
///
/// Training examples come from every --train file in order (- is stdin; the default).
/// Clean accuracy on --dev is printed on stderr and stored in the file's metadata.
///
/// Examples:
///   train-victim --embeddings emb.safetensors --train data/rt-jb/train.jsonl \
///       --dev data/rt-jb/dev.jsonl --arch lstm --seed 1 -o victim.safetensors
///   cat train.jsonl poisons.jsonl | train-victim --embeddings emb.safetensors --arch bow > v.safetensors
///   train-victim --pretrained data/minilm --arch minilm --epochs 1 --batch-size 32 \
///       --train data/rt-jb/train.jsonl --dev data/rt-jb/dev.jsonl -o minilm.safetensors
///   train-victim --base data/smollm2/victim.safetensors --regime top:2 --epochs 1 \
///       --batch-size 8 --lr 1e-4 --train data/lm/train.jsonl -o smollm2-tuned.safetensors
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_override_self = true)]
struct Args {
    #[command(flatten)]
    origin: common::cli::OriginArgs,
    /// Training example JSONL files (- for stdin).
    #[arg(long, default_values_t = vec!["-".to_string()])]
    train: Vec<String>,
    /// Poison example JSONL (repeatable, - for stdin): each poison joins one batch of the
    /// --train examples per epoch, so the victim trains exactly like the one trained on
    /// --train alone with the same seed, except for the poisons (common random numbers).
    /// Examples given with --train instead are shuffled in with the rest.
    #[arg(long)]
    poisons: Vec<String>,
    /// Dev example JSONL for the clean accuracy printed at the end.
    #[arg(long)]
    dev: Option<String>,
    #[command(flatten)]
    victim: VictimArgs,
    /// Number of classes.
    #[arg(long, default_value_t = 2, value_parser = common::cli::at_least_one)]
    num_classes: usize,
    /// Seed of initialisation and batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output file, or - for stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("train-victim", || {
        let args = Args::parse();
        io::Output::refuse_terminal(&args.output, "victim weights")?;
        let device = device::parse_device(&args.device)?;
        let base = args.origin.load()?;
        let vocab = &base.vocab;
        let config = args.victim.victim_config(&base, args.num_classes)?;
        if args.train.iter().chain(&args.poisons).filter(|p| *p == "-").count() > 1 {
            bail!("stdin (-) can be read once; give the other files by path");
        }
        let mut raw_hash = Vec::new();
        let mut read = |paths: &[String], may_be_empty: bool| -> anyhow::Result<Vec<common::encode::Encoded>> {
            let mut out = Vec::new();
            for path in paths {
                let bytes = io::read_all(path)?;
                raw_hash.extend(bytes.iter());
                let recs: Vec<Example> = io::read_jsonl_from(&bytes[..], &io::display_name(path), may_be_empty)?;
                out.extend(encode_for(&config, &recs, vocab, TextPolicy::Data, &io::display_name(path))?);
            }
            Ok(out)
        };
        let examples = read(&args.train, false)?;
        let poisons = read(&args.poisons, true)?;
        let dev = match &args.dev {
            Some(p) => Some(encode_for(&config, &io::read_jsonl::<Example>(p, false)?, vocab, TextPolicy::Data, p)?),
            None => None,
        };
        log!("{} training examples and {} poisons, victim {:?} on {device:?}, seed {}", examples.len(), poisons.len(), config.arch.name(), args.seed);
        let opts = args.victim.train_options(&config, args.seed);
        tch::manual_seed(args.seed as i64);
        let mut victim = base.new_victim(config, device)?;
        let start = Instant::now();
        train::train(&mut victim, train::TrainData::poisoned(&examples, &poisons), &opts, |epoch, loss| {
            log!("epoch {epoch}/{} loss {loss:.4} {:.1}s", opts.epochs, start.elapsed().as_secs_f64());
        })?;
        let dev_accuracy = dev.as_ref().map(|dev| {
            let acc = train::accuracy(&victim, dev);
            log!("dev accuracy {acc:.2}% ({} examples)", dev.len());
            acc
        });
        let source = Some(base.source.clone());
        let record = train::TrainingRecord {
            seed: Some(args.seed),
            dev_accuracy,
            train_sha256: Some(io::sha256_hex(&raw_hash)),
            train_examples: Some(examples.len() + poisons.len()),
            poisons: Some(poisons.len()),
            training: Some(opts.clone()),
            fingerprint: Some(common::victims::params::fingerprint(&victim.params())),
            numerics: Some(common::numerics::key()),
            // A checkpoint's fine-tuned victim names its base in its own metadata.
            embeddings: if base.vocab.is_wordpiece() || base.vocab.is_bpe() { None } else { source.clone() },
            pretrained: if base.vocab.is_wordpiece() { source } else { None },
        };
        let meta = record.to_metadata()?;
        victim.save(&args.output, vocab, meta).context("writing the victim")?;
        Ok(())
    })
}
