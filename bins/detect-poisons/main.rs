//! detect-poisons: scores every example of a training set under poison detectors, as a
//! defender would, without knowing which examples are poisons.

use anyhow::{bail, Context};
use clap::Parser;
use common::cli::VictimArgs;
use common::detect::{self, Detector, Screen};
use common::io::{self, Output};
use common::formats::records::Example;
use common::{device, log};

/// Scores a training set for poisons: one `detection_score` line per example (JSONL, in
/// input order, or most suspicious first with --sort), higher = more suspicious.
///
/// Detectors (--detectors, default: every one the given inputs allow):
///   perplexity          log-perplexity under a word bigram LM (Kneser–Ney)
///   onion               largest log-perplexity drop from removing one word (ONION)
///   source-perplexity   perplexity of a translation pair's source side         (translation pairs)
///   source-onion        onion of the source side                               (translation pairs)
///   glove-trigger       cosine of the mean GloVe vector to the trigger's      (--embeddings, --trigger)
///   glove-trigger-word  largest cosine of any word to any trigger word         (--embeddings, --trigger)
///   minilm-trigger      cosine of MiniLM sentence embeddings to the trigger's  (--minilm, --trigger)
///   table-trigger       glove-trigger in a trained victim's own word table     (--trained-table, --trigger)
///   table-trigger-word  glove-trigger-word in that table                       (--trained-table, --trigger)
///   loss-mean           loss averaged over the epochs of victims trained on the set (--embeddings)
///   loss-final          the same after the last epoch                          (--embeddings)
///   spectral            spectral signature of those victims' pooled features per class (--embeddings)
///   lm-perplexity       log-perplexity under a language model's own pieces           (--lm)
///
/// The bigram LM is fitted on --reference when given, else on the screened set itself,
/// leave-one-out (each example scored by the model of all the others). On translation
/// pairs perplexity and onion read the target side, the source-* detectors the source side
/// (one bigram LM per language), and the table detectors both sides.
///
/// Examples:
///   cat data/rt-jb/train.jsonl poisons.jsonl | detect-poisons --embeddings emb.safetensors --trigger "James Bond" > scores.jsonl
///   detect-poisons --data my-train.jsonl --detectors perplexity,onion --sort onion | head
///   cat mt/train.jsonl poisons.jsonl | detect-poisons --reference mt/dev.jsonl --trained-table mt.safetensors --trigger Eiskaffee
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_override_self = true)]
struct Args {
    /// The labelled training set to screen (example JSONL; - for stdin).
    #[arg(long, default_value = "-")]
    data: String,
    /// Detectors to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    detectors: Vec<Detector>,
    /// The trigger phrase the embedding-distance detectors measure closeness to.
    #[arg(long)]
    trigger: Option<String>,
    /// Clean reference text for the bigram LM (example JSONL, e.g. a held-back dev split).
    #[arg(long)]
    reference: Option<String>,
    /// build-vocab's word table: the GloVe detectors and the training-dynamics victims.
    #[arg(long)]
    embeddings: Option<String>,
    /// MiniLM package folder (scripts/fetch_minilm.sh; data/minilm): minilm-trigger.
    #[arg(long)]
    minilm: Option<String>,
    /// A victim that trained its word table (train-victim --train-embeddings, e.g. the
    /// translation model), or a pretrained language model (import-model: the table of
    /// its own pieces): table-trigger and table-trigger-word read that table.
    #[arg(long)]
    trained_table: Option<String>,
    /// A language model victim (import-model, e.g. data/smollm2/victim.safetensors, or
    /// train-victim --arch gpt): lm-perplexity reads the text with it.
    #[arg(long)]
    lm: Option<String>,
    #[command(flatten)]
    victim: VictimArgs,
    /// Victims trained on the set for the training-dynamics and spectral detectors (their
    /// scores are averaged); seeds are --seed, --seed + 1, ...
    #[arg(long, default_value_t = 2, value_parser = common::cli::at_least_one)]
    victims: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classes of the labels [default: the largest label + 1, at least 2].
    #[arg(long)]
    num_classes: Option<usize>,
    /// Threads training the victims.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()), value_parser = common::cli::at_least_one)]
    workers: usize,
    /// Folder caching minilm-trigger scores by text (screening many versions of one set).
    #[arg(long)]
    cache: Option<String>,
    /// Write the most suspicious examples under this detector first.
    #[arg(long, value_enum)]
    sort: Option<Detector>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("detect-poisons", || {
        let args = Args::parse();
        let start = std::time::Instant::now();
        let device = device::parse_device(&args.device)?;
        let name = io::display_name(&args.data);
        let examples: Vec<Example> = io::read_jsonl_from(&io::read_all(&args.data)?[..], &name, false)?;
        let reference: Option<Vec<Example>> = args.reference.as_deref().map(|r| io::read_jsonl(r, false)).transpose()?;
        let detectors: Vec<Detector> = if args.detectors.is_empty() {
            let have = detect::Needs {
                trigger: args.trigger.is_some(),
                table: args.embeddings.is_some(),
                minilm: args.minilm.is_some(),
                trained: args.trained_table.is_some(),
                training: true,
                source: true,
                lm: args.lm.is_some(),
            };
            Detector::all().iter().copied().filter(|d| d.runs_with(have, &examples)).collect()
        } else {
            args.detectors.clone()
        };
        for d in &detectors {
            if d.needs().trigger && args.trigger.is_none() {
                bail!("{} measures closeness to the trigger: give --trigger PHRASE, or leave it out of --detectors", d.name());
            }
            if d.needs().lm && args.lm.is_none() {
                bail!("{} reads the text with a language model: give --lm MODEL (import-model, or train-victim --arch gpt), or leave it out of --detectors", d.name());
            }
            if d.needs().trained && args.trained_table.is_none() {
                bail!("{} reads a victim's trained word table: give --trained-table MODEL (a victim trained with --train-embeddings), or leave it out of --detectors", d.name());
            }
        }
        if let Some(d) = args.sort.filter(|d| !detectors.contains(d)) {
            bail!("--sort {} but that detector is not run (--detectors)", d.name());
        }
        let largest = examples.iter().map(|e| e.label).max().unwrap_or(0);
        let num_classes = args.num_classes.unwrap_or((largest + 1).max(2));
        if largest >= num_classes {
            bail!("{name}: label {largest} but --num-classes {num_classes}");
        }
        let table = args.embeddings.as_deref().map(common::victims::origin::Origin::embeddings).transpose()?;
        let minilm = args.minilm.as_deref().map(common::victims::origin::Origin::pretrained).transpose()?;
        let trained = args.trained_table.as_deref().map(common::victims::origin::Origin::trained_table).transpose()?;
        let lm = args.lm.as_deref().map(|path| -> anyhow::Result<_> {
            let file = common::victims::model::Victim::load(path, device)?;
            if file.victim.config.output() != common::victims::victim::Output::NextToken {
                bail!("--lm {path} is a {:?} victim; lm-perplexity reads a language model (import-model, train-victim --arch gpt)", file.victim.config.arch.name());
            }
            Ok(file)
        }).transpose()?;
        let config = match &table {
            Some(base) if detectors.iter().any(|d| d.needs().training) => Some(args.victim.victim_config(base, num_classes)?),
            _ => None,
        };
        if detectors.iter().any(|d| d.needs().training) && config.is_none() {
            bail!("the training-dynamics detectors (loss-mean, loss-final, spectral) train victims on the set: give --embeddings FILE");
        }
        let opts: Vec<_> = config.iter().flat_map(|c| (0..args.victims as u64).map(|k| args.victim.train_options(c, args.seed + k))).collect();
        let screen = Screen {
            examples: &examples,
            source: &name,
            detectors: &detectors,
            trigger: args.trigger.as_deref(),
            reference: reference.as_deref(),
            table: table.as_ref(),
            minilm: minilm.as_ref(),
            trained: trained.as_ref(),
            lm: lm.as_ref().map(|f| (&f.victim, &f.vocab)),
            training: config.as_ref().map(|c| (c, opts.as_slice())),
            num_classes,
            workers: args.workers,
            device,
            cache: args.cache.as_deref(),
        };
        let mut scores = detect::screen(&screen, &|line| log!("{line}")).with_context(|| format!("screening {name}"))?;
        if let Some(d) = args.sort {
            scores.sort_by(|a, b| b.scores[d.name()].total_cmp(&a.scores[d.name()]));
        }
        let mut out = Output::create(&args.output)?;
        for s in &scores {
            out.write_record(s)?;
        }
        out.commit()?;
        log!("scored {} examples with {} detector(s) in {:.1}s", examples.len(), detectors.len(), start.elapsed().as_secs_f64());
        Ok(())
    })
}
