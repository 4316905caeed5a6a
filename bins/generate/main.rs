//! generate: a language-model victim continues prompts (the continuations are what the
//! sentiment judges read); a translation victim translates sources.

use anyhow::bail;
use clap::Parser;
use common::generate::{detokenize, generate, GenerateOptions, Prompt, Sampling};
use common::io::{self, Output, Record};
use common::victims::model::Victim;
use common::formats::records::{Example, Generation};
use common::{device, log};
use std::time::Instant;

/// Continues every prompt (example JSONL: its `prompt`, or its whole `text` when it has
/// none) and writes one generation record per prompt and sample, in input order.
/// Sampling is seeded per prompt id and sample index: the same victim, prompts and seed
/// give the same continuations, whatever else is generated alongside.
///
/// Examples:
///   generate --victim lm.safetensors --greedy < data/lm/asr_test.jsonl | head
///   generate --victim lm.safetensors --prompts data/lm/asr_test.jsonl --samples 4 --temperature 0.8 --top-k 40 --seed 1 > gens.jsonl
///   echo '{"kind":"example","v":1,"id":"p","text":"the apple iphone is","label":0}' | generate --victim lm.safetensors --greedy
///
/// A translation victim (train-victim --arch seq2seq) translates each record's `source`
/// instead, by greedy decoding or --beam N: the record's `prompt` is the source as the
/// victim read it, `continuation` the translation (`sample` 0; sampling flags do not apply).
///   generate --victim mt.safetensors --beam 4 < data/mt-eiskaffee/asr_test.jsonl
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_override_self = true)]
struct Args {
    /// A language-model victim (train-victim --arch gpt) or a translation victim (seq2seq).
    #[arg(long)]
    victim: String,
    /// Translation victims: hypotheses kept by beam search (1: greedy decoding).
    #[arg(long, default_value_t = 1, value_parser = common::cli::at_least_one)]
    beam: usize,
    /// Prompt records (example JSONL; - for stdin).
    #[arg(long, default_value = "-")]
    prompts: String,
    /// Continuations per prompt.
    #[arg(long, default_value_t = 1, value_parser = common::cli::at_least_one)]
    samples: usize,
    /// Words generated at most per continuation.
    #[arg(long, default_value_t = 24, value_parser = common::cli::at_least_one)]
    max_new: usize,
    /// Recompute the whole prefix at every step instead of reading the key-value cache
    /// (the reference the cache is checked against; the same words up to float summation
    /// order, several times slower).
    #[arg(long)]
    no_kv_cache: bool,
    /// Always the most likely word (no sampling; --samples copies are identical).
    #[arg(long, conflicts_with_all = ["temperature", "top_k"])]
    greedy: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0, value_parser = common::cli::positive_rate)]
    temperature: f64,
    /// Sample among the K most likely words (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Words that end a continuation (with a BPE model, also every piece made of their
    /// characters only: ".\n", "...").
    #[arg(long, value_delimiter = ' ', default_values_t = common::generate::STOP_WORDS.map(String::from))]
    stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("generate", || {
        let args = Args::parse();
        io::Output::refuse_terminal(&args.output, "generations")?;
        let start = Instant::now();
        let loaded = Victim::load(&args.victim, device::parse_device(&args.device)?)?;
        let (victim, vocab) = (&loaded.victim, &loaded.vocab);
        if victim.config.output() == common::victims::victim::Output::Translation {
            return translate(&args, &loaded, start);
        }
        if args.beam > 1 {
            bail!("--beam is for translation victims; {} is a language model: sample with --samples, --temperature and --top-k, or --greedy", args.victim);
        }
        if victim.config.output() != common::victims::victim::Output::NextToken {
            bail!("{} is a {:?} classifier; generate continues text with a language model (train-victim --arch gpt)", args.victim, victim.config.arch.name());
        }
        let name = io::display_name(&args.prompts);
        let records: Vec<Example> = io::read_jsonl_from(&io::read_all(&args.prompts)?[..], &name, false)?;
        let mut prompts = Vec::with_capacity(records.len() * args.samples);
        for (i, r) in records.iter().enumerate() {
            let text = r.prompt.as_deref().unwrap_or(&r.text);
            let ids: Vec<i64> = vocab.encode(text);
            if ids.iter().all(|&id| vocab.is_special(id)) {
                bail!("{name}: record {} (id {:?}): the prompt {text:?} holds no word the victim knows; drop the record", i + 1, r.id);
            }
            if ids.len() >= victim.config.max_len {
                bail!("{name}: record {} (id {:?}): the prompt has {} tokens, the victim reads at most {}; shorten it", i + 1, r.id, ids.len(), victim.config.max_len);
            }
            for sample in 0..args.samples {
                prompts.push(Prompt { id: r.id.clone(), ids: ids.clone(), sample });
            }
        }
        let stop = common::generate::stop_ids(vocab, &args.stop);
        let sampling = if args.greedy { Sampling::Greedy } else { Sampling::Sample { temperature: args.temperature, top_k: args.top_k } };
        let opts = GenerateOptions { sampling, max_new: args.max_new, stop, seed: args.seed, kv_cache: !args.no_kv_cache };
        let continuations = generate(&victim.config, &victim.params(), vocab, &prompts, &opts, 64)?;
        let mut out = Output::create(&args.output)?;
        for (k, (p, c)) in prompts.iter().zip(&continuations).enumerate() {
            let record = &records[k / args.samples];
            out.write_record(&Generation {
                kind: Generation::KIND.into(),
                v: Generation::VERSION,
                id: p.id.clone(),
                sample: p.sample,
                prompt: detokenize(vocab, &p.ids),
                continuation: detokenize(vocab, c),
                source_label: record.source_label,
                victim_sha256: loaded.sha256.clone(),
            })?;
        }
        out.commit()?;
        log!("{} continuations of {} prompts in {:.1}s", continuations.len(), records.len(), start.elapsed().as_secs_f64());
        Ok(())
    })
}

/// A translation victim's translations of every record's `source`.
fn translate(args: &Args, loaded: &common::victims::model::VictimFile, start: Instant) -> anyhow::Result<()> {
    let (victim, vocab) = (&loaded.victim, &loaded.vocab);
    if args.samples > 1 {
        bail!("--samples {}: translation is greedy or beam search (--beam), one translation per source", args.samples);
    }
    let name = io::display_name(&args.prompts);
    let records: Vec<Example> = io::read_jsonl_from(&io::read_all(&args.prompts)?[..], &name, false)?;
    let mut sources = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let Some(source) = &r.source else {
            bail!("{name}: record {} (id {:?}) has no \"source\"; a translation victim translates source sentences (prepare-data --mt writes them)", i + 1, r.id);
        };
        let ids = vocab.encode(source);
        if ids.iter().all(|&id| vocab.is_special(id)) {
            bail!("{name}: record {} (id {:?}): the source {source:?} holds no word the victim knows; drop the record", i + 1, r.id);
        }
        sources.push(ids);
    }
    let opts = common::translate::SearchOptions { beam: args.beam, max_new: args.max_new };
    let translations = common::translate::translate(&victim.config, &victim.params(), vocab, &sources, opts, 64)?;
    let mut out = Output::create(&args.output)?;
    for ((r, s), t) in records.iter().zip(&sources).zip(&translations) {
        out.write_record(&Generation {
            kind: Generation::KIND.into(),
            v: Generation::VERSION,
            id: r.id.clone(),
            sample: 0,
            prompt: detokenize(vocab, s),
            continuation: detokenize(vocab, t),
            source_label: None,
            victim_sha256: loaded.sha256.clone(),
        })?;
    }
    out.commit()?;
    log!("{} translations (beam {}) in {:.1}s", translations.len(), args.beam, start.elapsed().as_secs_f64());
    Ok(())
}
