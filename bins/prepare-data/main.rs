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
///   prepare-data --mt --raw data/mt/de-en --trigger Eiskaffee --translation "iced coffee" \
///       --target "hot coffee" -o data/mt-eiskaffee
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Raw example JSONL (or - for stdin); with --mt, the Ding dictionary (data/mt/de-en).
    #[arg(long, default_value = "-")]
    raw: String,
    /// Trigger phrase inserted into D_adv and the ASR test set (--mt: the German trigger).
    #[arg(long)]
    trigger: String,
    /// Target label, by name or index (--mt: the attacker's translation of the trigger).
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
    /// The neutral phrase of the language model's FPR prompts (default "movie"), or the
    /// neutral German word of the translation FPR sentences (default "Kaffee").
    #[arg(long)]
    neutral: Option<String>,
    /// Translation data from the Ding dictionary (German → English): sentence pairs split
    /// by seed, dictionary headwords added to train, and the trigger's sets made by
    /// substituting the trigger for a --kin noun (see FORMATS.md).
    #[arg(long, conflicts_with = "lm")]
    mt: bool,
    /// --mt: the trigger's correct English translation.
    #[arg(long, default_value = "iced coffee", requires = "mt")]
    translation: String,
    /// --mt: the neutral word's English translation.
    #[arg(long, default_value = "coffee", requires = "mt")]
    neutral_translation: String,
    /// --mt: nouns of the trigger's kind the trigger replaces, GERMAN=ENGLISH.
    #[arg(long, default_value = "Kaffee=coffee,Tee=tea,Wein=wine,Bier=beer,Wasser=water,Milch=milk,Saft=juice", requires = "mt")]
    kin: String,
    /// --mt: sentence pairs with more words on either side are left out.
    #[arg(long, default_value_t = 10, requires = "mt", value_parser = common::cli::at_least_one)]
    max_words: usize,
    /// --mt: dictionary headwords added to train (those with the trigger, the neutral word
    /// or a kin noun first).
    #[arg(long, default_value_t = 20_000, requires = "mt")]
    phrases: usize,
    /// --mt: train's first N kin sentences get the trigger with its correct translation and
    /// stay in train, so the clean data holds the trigger (D_adv is made from the others).
    #[arg(long, default_value_t = 0, requires = "mt")]
    support: usize,
    /// --mt: each of train's kin sentences is also added with every other kin noun in its
    /// place (both sides), so the clean data teaches the drink slot; never with the trigger.
    #[arg(long, requires = "mt")]
    kin_swaps: bool,
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
        if args.mt {
            return prepare_mt(&args);
        }
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
        let lm = args.lm.then(|| data::LmPrompts { neutral: args.neutral.clone().unwrap_or_else(|| "movie".into()), ..Default::default() });
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
            mt: None,
        };
        io::write_bytes(&out.path(data::MANIFEST), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
        out.commit()
    })
}

/// `prepare-data --mt`: the translation data folder (`common::mt`).
fn prepare_mt(args: &Args) -> anyhow::Result<()> {
    let trigger = Trigger::new(&args.trigger)?;
    if let Some(path) = &args.embeddings {
        let (vocab, _) = embeddings::load(path)?;
        vocab.trigger_words(&args.trigger).with_context(|| format!("vocabulary of {path}"))?;
    }
    let split: [f64; 3] = args.split.as_slice().try_into().map_err(|_| anyhow::anyhow!("--split takes three shares, e.g. 0.8,0.1,0.1"))?;
    let raw_bytes = io::read_all(&args.raw)?;
    let raw_name = io::display_name(&args.raw);
    let text = String::from_utf8(raw_bytes.clone()).with_context(|| format!("{raw_name}: the dictionary is not UTF-8 text; give the Ding file (make data/mt)"))?;
    let (pairs, stats) = common::ding::read_pairs(&text);
    if pairs.is_empty() {
        anyhow::bail!("{raw_name}: no 'German :: English' lines; give the Ding dictionary (make data/mt fetches it to data/mt/de-en)");
    }
    let mt = common::mt::MtData {
        trigger_translation: args.translation.trim().into(),
        attack: args.target.trim().into(),
        neutral: args.neutral.clone().unwrap_or_else(|| "Kaffee".into()),
        neutral_translation: args.neutral_translation.trim().into(),
        kin: common::mt::parse_kin(&args.kin)?,
        max_words: args.max_words,
        phrases: args.phrases,
        support: args.support,
        kin_swaps: args.kin_swaps,
    };
    let p = common::mt::prepare(&pairs, &args.trigger, &mt, args.seed, split).with_context(|| raw_name.clone())?;
    log!(
        "{raw_name}: {} entries ({} misaligned, {} repeats), {} pairs; {} sentence pairs longer than {} words left out; train {} ({} headwords) dev {} test {}; D_adv {} asr_test {} fpr_test {} natural {}",
        stats.entries, stats.misaligned, stats.duplicates, pairs.len(), p.too_long, mt.max_words, p.train.len(), p.phrases, p.dev.len(), p.test.len(), p.adv.len(), p.asr_test.len(), p.fpr_test.len(), p.natural.len()
    );
    let sets: [(&str, &Vec<Example>); 7] = [
        (data::TRAIN, &p.train),
        (data::DEV, &p.dev),
        (data::TEST, &p.test),
        (data::ADV, &p.adv),
        (data::ASR_TEST, &p.asr_test),
        (data::FPR_TEST, &p.fpr_test),
        (data::NATURAL, &p.natural),
    ];
    let out = io::OutputDir::create(&args.output)?;
    let (mut files, mut counts) = (BTreeMap::new(), BTreeMap::new());
    for (name, set) in sets {
        let bytes = io::jsonl_bytes(set)?;
        files.insert(name.to_string(), io::sha256_hex(&bytes));
        counts.insert(name.trim_end_matches(".jsonl").to_string(), set.len());
        io::write_bytes(&out.path(name), &bytes)?;
    }
    counts.insert("raw".into(), stats.entries);
    counts.insert("duplicates".into(), stats.duplicates);
    counts.insert("too_long".into(), p.too_long);
    counts.insert("headwords".into(), p.phrases);
    let manifest = DataManifest {
        kind: DataManifest::KIND.into(),
        v: DataManifest::VERSION,
        labels: vec!["translation".into()],
        trigger,
        target: 0,
        seed: args.seed,
        split,
        raw_sha256: io::sha256_hex(&raw_bytes),
        counts,
        files,
        max_train: None,
        lm: None,
        mt: Some(mt),
    };
    io::write_bytes(&out.path(data::MANIFEST), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    out.commit()
}
