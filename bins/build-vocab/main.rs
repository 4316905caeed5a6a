//! build-vocab: the embedding table a victim starts from. GloVe's top-N words plus every
//! word of the data that GloVe knows, with its vectors, as one `poison.embeddings` file.

use clap::Parser;
use common::{embeddings, io, log, formats::records::Example};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Builds the vocabulary and embedding table (safetensors) from GloVe and the data, or
/// (--scratch DIM) a seeded random table of the data's words for a victim that learns its
/// words (a translation model: no German vectors ship here). A record's `source` counts
/// as data too.
///
/// Examples:
///   build-vocab --words data/glove/words.txt --vectors data/glove/vectors.npy \
///       --top-n 50000 --data data/rt/raw.jsonl -o data/glove/emb-50k.safetensors
///   build-vocab --scratch 128 --min-count 2 --data data/mt-eiskaffee/train.jsonl -o vocab.safetensors
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// GloVe words, one per line, in the row order of --vectors.
    #[arg(long, required_unless_present = "scratch")]
    words: Option<PathBuf>,
    /// GloVe vectors: float32 [words, dim] .npy (memory-mapped).
    #[arg(long, required_unless_present = "scratch")]
    vectors: Option<PathBuf>,
    /// No GloVe: the data's words (--min-count) with `<s>` and `</s>`, rows of this width
    /// drawn normal(0, 1/DIM) from --seed, for a victim that trains its table.
    #[arg(long, conflicts_with_all = ["words", "vectors"], value_parser = common::cli::at_least_one)]
    scratch: Option<usize>,
    /// Seed of the --scratch rows.
    #[arg(long, default_value_t = 0, requires = "scratch")]
    seed: u64,
    /// How many of the most frequent GloVe words to keep.
    #[arg(long, default_value_t = 50_000, value_parser = common::cli::at_least_one)]
    top_n: usize,
    /// Example JSONL files (or - for stdin) whose words are added when GloVe knows them.
    #[arg(long)]
    data: Vec<String>,
    /// Add only data words seen at least this many times (a language model's softmax runs
    /// over the whole vocabulary: keep it to the words it can learn).
    #[arg(long, default_value_t = 1, value_parser = common::cli::at_least_one)]
    min_count: usize,
    /// Extra words or phrases to add (e.g. a trigger outside the data).
    #[arg(long)]
    extra_words: Vec<String>,
    /// Output file, or - for stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("build-vocab", || {
        let args = Args::parse();
        io::Output::refuse_terminal(&args.output, "an embeddings file")?;
        let mut examples: Vec<Example> = Vec::new();
        for path in &args.data {
            examples.extend(io::read_jsonl::<Example>(path, false)?);
        }
        let texts = || examples.iter().flat_map(|e| std::iter::once(e.text.as_str()).chain(e.source.as_deref()));
        if let Some(dim) = args.scratch {
            let (vocab, table) = embeddings::scratch(texts(), args.min_count, &args.extra_words, dim, args.seed);
            log!("{} words x {dim} dims from scratch (seed {}): the data's words seen at least {} times", vocab.len(), args.seed, args.min_count);
            let mut meta = BTreeMap::new();
            meta.insert("source".into(), format!("scratch: {} data files, min count {}, seed {}", args.data.len(), args.min_count, args.seed));
            return embeddings::save(&args.output, &vocab, &table, meta);
        }
        let (words, vectors) = (args.words.as_ref().expect("clap requires it"), args.vectors.as_ref().expect("clap requires it"));
        let vectors_file = vectors;
        let vectors = embeddings::WordVectors::open(words, vectors)?;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for t in texts() {
            for w in common::tokenizer::tokenize(t) {
                *counts.entry(w).or_default() += 1;
            }
        }
        let frequent: Vec<&str> = counts.iter().filter(|(_, &c)| c >= args.min_count).map(|(w, _)| w.as_str()).collect();
        let (vocab, table, stats) = embeddings::build(&vectors, args.top_n, frequent.into_iter(), &args.extra_words);
        log!(
            "{} words x {} dims: top {} GloVe words + {} of {} data words ({} data words unknown to GloVe)",
            vocab.len(),
            vectors.dim,
            stats.top_n,
            stats.data_words_added,
            stats.data_words,
            stats.data_words_unknown
        );
        if !stats.unknown_sample.is_empty() {
            log!("unknown to GloVe, for example: {}", stats.unknown_sample.join(" "));
        }
        let mut meta = BTreeMap::new();
        meta.insert("source".into(), format!("{} + {}", words.display(), vectors_file.display()));
        meta.insert("top_n".into(), stats.top_n.to_string());
        meta.insert("data_words_added".into(), stats.data_words_added.to_string());
        embeddings::save(&args.output, &vocab, &table, meta)?;
        Ok::<(), anyhow::Error>(())
    })
}

