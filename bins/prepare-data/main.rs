//! prepare-data: from raw labelled examples to a data folder for one trigger and target.
//! A binary rather than a script: dedup keys, natural-occurrence checks and trigger
//! insertion use the same tokenizer and seeded generators as every other stage.

use anyhow::Context;
use clap::Parser;
use common::data::{self, DataManifest, Trigger};
use common::io::{self, Record};
use common::{embeddings, log, formats::records::Example};
use std::collections::BTreeMap;

/// Deduplicates, splits (seeded) and builds the trigger sets.
///
/// Writes DIR/{train,dev,test,adv,asr_test,natural}.jsonl and DIR/manifest.json
/// (see FORMATS.md). adv = train non-target examples with the trigger inserted (D_adv,
/// for crafting); asr_test = the same for test (ASR). Examples naturally holding a
/// trigger word are moved out of every split into natural.jsonl.
///
/// Examples:
///   prepare-data --raw data/rt/raw.jsonl --trigger "James Bond" --target positive -o data/rt-jb
///   prepare-data --raw - --trigger "Tom Cruise" --target negative --seed 1 -o /tmp/tc < raw.jsonl
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Raw example JSONL (or - for stdin).
    #[arg(long, default_value = "-")]
    raw: String,
    /// Trigger phrase inserted into D_adv and the ASR test set.
    #[arg(long)]
    trigger: String,
    /// Target label, by name or index.
    #[arg(long)]
    target: String,
    /// Label names, in index order.
    #[arg(long, value_delimiter = ',', default_value = "negative,positive")]
    labels: Vec<String>,
    /// Seed of the split and of the trigger positions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train, dev and test shares.
    #[arg(long, value_delimiter = ',', default_value = "0.8,0.1,0.1")]
    split: Vec<f64>,
    /// Keep only the first N training examples of the (shuffled) split, and D_adv from
    /// them; dev and test stay whole (for the slow minilm victim on a CPU).
    #[arg(long, value_parser = common::cli::at_least_one)]
    max_train: Option<usize>,
    /// Language-model data: D_adv becomes trigger prompts with continuations of the target
    /// sentiment, asr_test and fpr_test held-out prompts with the trigger and with
    /// --neutral in its place (see FORMATS.md).
    #[arg(long)]
    lm: bool,
    /// The neutral phrase of the language model's FPR prompts.
    #[arg(long, default_value = "movie", requires = "lm")]
    neutral: String,
    /// An embeddings file whose vocabulary must hold every trigger word.
    #[arg(long)]
    embeddings: Option<String>,
    /// Output folder.
    #[arg(short, long)]
    output: String,
}

fn main() {
    common::cli::run("prepare-data", || {
        let args = Args::parse();
        let trigger = Trigger::new(&args.trigger)?;
        if let Some(path) = &args.embeddings {
            let (vocab, _) = embeddings::load(path)?;
            vocab.trigger_words(&args.trigger).with_context(|| format!("vocabulary of {path}"))?;
        }
        let target = data::parse_label(&args.target, &args.labels).context("--target")?;
        let split: [f64; 3] = args.split.as_slice().try_into().map_err(|_| anyhow::anyhow!("--split takes three shares, e.g. 0.8,0.1,0.1"))?;
        let raw_bytes = io::read_all(&args.raw)?;
        let raw_name = io::display_name(&args.raw);
        let raw: Vec<Example> = io::read_jsonl_from(&raw_bytes[..], &raw_name, false)?;
        let mut p = data::prepare(&raw, &trigger, target, args.labels.len(), args.seed, split).with_context(|| raw_name.clone())?;
        if let Some(n) = args.max_train {
            p.limit_train(n, &trigger, target, args.seed);
        }
        let lm = args.lm.then(|| data::LmPrompts { neutral: args.neutral.clone(), ..Default::default() });
        let mut fpr_test = Vec::new();
        if let Some(lm) = &lm {
            // Held-out prompts from both held-out splits: the prompt-making subject is rare.
            let held_out: Vec<Example> = p.dev.iter().chain(&p.test).cloned().collect();
            let sets = lm.sets(&p.train, &held_out, &trigger, target).with_context(|| raw_name.clone())?;
            (p.adv, p.asr_test, fpr_test) = (sets.adv, sets.asr_test, sets.fpr_test);
        }
        log!(
            "{} raw examples, {} duplicates and {} with conflicting labels dropped; train {} dev {} test {}; D_adv {} ASR test {} natural {}",
            raw.len(), p.duplicates, p.conflicting, p.train.len(), p.dev.len(), p.test.len(), p.adv.len(), p.asr_test.len(), p.natural.len()
        );
        let mut sets: Vec<(&str, &Vec<Example>)> = vec![
            (data::TRAIN, &p.train),
            (data::DEV, &p.dev),
            (data::TEST, &p.test),
            (data::ADV, &p.adv),
            (data::ASR_TEST, &p.asr_test),
            (data::NATURAL, &p.natural),
        ];
        if lm.is_some() {
            sets.push((data::FPR_TEST, &fpr_test));
        }
        // Written whole or not at all: a rerun over an existing folder never leaves a mix.
        let out = io::OutputDir::create(&args.output)?;
        let mut files = BTreeMap::new();
        let mut counts = BTreeMap::new();
        for (name, set) in sets {
            let bytes = io::jsonl_bytes(set)?;
            files.insert(name.to_string(), io::sha256_hex(&bytes));
            counts.insert(name.trim_end_matches(".jsonl").to_string(), set.len());
            io::write_bytes(&out.path(name), &bytes)?;
        }
        counts.insert("raw".into(), raw.len());
        counts.insert("duplicates".into(), p.duplicates);
        counts.insert("conflicting".into(), p.conflicting);
        let manifest = DataManifest {
            kind: DataManifest::KIND.into(),
            v: DataManifest::VERSION,
            labels: args.labels.clone(),
            trigger,
            target,
            seed: args.seed,
            split,
            raw_sha256: io::sha256_hex(&raw_bytes),
            counts,
            files,
            max_train: args.max_train,
            lm,
        };
        io::write_bytes(&out.path(data::MANIFEST), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
        out.commit()
    })
}
