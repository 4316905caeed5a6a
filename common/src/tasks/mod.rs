//! The task seam: what a task (classifying a review's sentiment, continuing a text, and
//! next translating one) decides for the whole pipeline, so the stages have one path
//! whatever the task. A task is chosen by the data (`prepare-data` writes its manifest)
//! and takes only victims of its kind (`Task::takes`); it owns how `finetune-eval`
//! evaluates a poison set against it: the held-out measures, the pairing of each poisoned
//! victim with its clean twin, and the report line it writes.
//!
//! Adding a task is a file implementing `Task` and a line in `TASKS` (ARCHITECTURE.md,
//! Adding a task).

pub mod classification;
pub mod continuation;
pub mod rules;
pub mod translation;

use crate::cli::VictimArgs;
use crate::data::DataManifest;
use crate::eval::retrain::Pairing;
use rules::Rules;
use anyhow::Result;

/// A task the toolkit attacks.
pub trait Task: Sync {
    /// Its decisions for the stages below evaluation (`rules`): its name, the data and
    /// victims it takes, what examples train, which objectives and heuristics apply.
    fn rules(&self) -> &'static Rules;
    /// `finetune-eval`: every poison set evaluated against victims retrained or fine-tuned
    /// on clean ∪ poisons, each paired with its clean twin; one JSONL report line per set
    /// in the order given, a table per set on stderr.
    fn evaluate(&self, args: &EvalArgs, manifest: &DataManifest, log: &(dyn Fn(String) + Sync)) -> Result<Vec<u8>>;
}

/// What `finetune-eval` writes per poison set, whatever the task: a JSONL report line
/// (`eval_report`, `lm_eval_report`) and a table for people.
pub trait TaskReport: serde::Serialize {
    /// The poison set's path (None for no set).
    fn poisons(&self) -> Option<&str>;
    /// The figures as a table (stderr).
    fn table(&self) -> String;
}

impl TaskReport for crate::eval::EvalReport {
    fn poisons(&self) -> Option<&str> {
        self.poisons.as_deref()
    }
    fn table(&self) -> String {
        crate::eval::EvalReport::table(self)
    }
}

impl TaskReport for crate::eval::lm_eval::LmEvalReport {
    fn poisons(&self) -> Option<&str> {
        self.poisons.as_deref()
    }
    fn table(&self) -> String {
        crate::eval::lm_eval::LmEvalReport::table(self) + "\n"
    }
}

/// One JSON line per report, in order; each table on stderr under its poison set's path.
pub fn report_lines<R: TaskReport>(reports: &[R]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for report in reports {
        if let Some(p) = report.poisons() {
            eprintln!("{p}:");
        }
        eprint!("{}", report.table());
        out.extend(serde_json::to_vec(report)?);
        out.push(b'\n');
    }
    Ok(out)
}

/// Every task (each with its `rules::RULES` entry).
pub static TASKS: &[&dyn Task] = &[&translation::Translation, &continuation::Continuation, &classification::Classification];

/// The task of a prepared data folder.
pub fn of_data(manifest: &DataManifest) -> &'static dyn Task {
    let rules = rules::of_data(manifest);
    *TASKS.iter().find(|t| std::ptr::eq(t.rules(), rules)).expect("every rules entry has its task in TASKS")
}

/// `finetune-eval`'s flags; each task refuses those it does not take.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Data folder made by prepare-data.
    #[arg(long)]
    pub data: String,
    /// Where the trained victims start (needed unless --checkpoint).
    #[command(flatten)]
    pub origin: crate::cli::OriginArgs,
    /// Poison set (example JSONL, - for stdin); may be empty. Repeatable: every set is
    /// evaluated on the same seeds and clean victims, and gets its own report line.
    #[arg(long)]
    pub poisons: Vec<String>,
    /// The examples a defense kept (example JSONL, e.g. from filter-set), one file per
    /// --poisons in the same order: the poisons missing from it are dropped, and so are
    /// the clean training examples, by weight 0 in the clean twin's batches, so the
    /// filtered victim still pairs with the unfiltered clean twin (net ASR and ΔCACC are
    /// then what is left after filtering, its cost included).
    #[arg(long)]
    pub kept: Vec<String>,
    /// Number of retraining seeds.
    #[arg(long, default_value_t = 6, value_parser = crate::cli::at_least_one_u64)]
    pub seeds: u64,
    /// Seeds are seed-base, seed-base+1, ...
    #[arg(long, default_value_t = 0)]
    pub seed_base: u64,
    /// Evaluate these victims instead of training (repeatable); no net figures.
    #[arg(long, conflicts_with_all = ["embeddings", "pretrained", "poisons"])]
    pub checkpoint: Vec<String>,
    #[command(flatten)]
    pub victim: VictimArgs,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Folder caching each seed's clean-victim figures, keyed by a hash of the data files,
    /// embeddings, victim config and training options: evaluations of several poison sets
    /// on the same data then train each clean victim once.
    #[arg(long)]
    pub clean_cache: Option<String>,
    /// Victims trained side by side, one per thread (default: the number of cores). Every
    /// victim computes the same bits whatever this is (see README, Reproducibility).
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()), value_parser = crate::cli::at_least_one)]
    pub workers: usize,
    /// How a poisoned victim is paired with its clean twin. crn (common random numbers):
    /// it trains exactly like the twin (same initialisation, same clean batches in the same
    /// order) and each poison joins one of those batches. independent: poisons are
    /// shuffled in with the clean data, so the two victims' batches are unrelated (the
    /// evaluation before crn; kept to measure what pairing buys).
    #[arg(long, value_enum, default_value_t = Pairing::Crn)]
    pub pairing: Pairing,
    /// Language-model data (prepare-data --lm): the pretrained clean LM every victim is
    /// fine-tuned from (train-victim --arch gpt, or a checkpoint from import-model, which
    /// fine-tunes in --regime); translation data (prepare-data --mt): the
    /// clean translation model (train-victim --arch seq2seq). --epochs, --lr and
    /// --batch-size are the fine-tuning's.
    #[arg(long)]
    pub start: Option<String>,
    /// Language-model data: train every LM from fresh weights drawn from its seed (the
    /// same for a seed's clean twin and poisoned LMs) instead of fine-tuning --start, which
    /// then gives only the config and the word table: the seed's setting, a victim trained
    /// on clean ∪ poisons; --epochs and --lr are the whole training's.
    #[arg(long)]
    pub from_scratch: bool,
    /// Language-model data: the sentiment classifier that judges continuations (beside VADER).
    #[arg(long)]
    pub judge: Option<String>,
    /// Language-model data: sampled continuations per held-out prompt.
    #[arg(long, default_value_t = 4, value_parser = crate::cli::at_least_one)]
    pub samples: usize,
    /// Language-model data: sampling temperature and top-k of the continuations.
    #[arg(long, default_value_t = 1.0, value_parser = crate::cli::positive_rate)]
    pub temperature: f64,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Language-model data: words per continuation at most; translation data: target
    /// words per translation at most.
    #[arg(long, default_value_t = 20, value_parser = crate::cli::at_least_one)]
    pub max_new: usize,
    /// Translation data: hypotheses kept by beam search (1: greedy decoding).
    #[arg(long, default_value_t = 1, value_parser = crate::cli::at_least_one)]
    pub beam: usize,
    /// Translation data: clean training pairs each seed fine-tunes on (a sample drawn by
    /// the seed, the same for its clean twin and poisoned models), with the poisons.
    #[arg(long, default_value_t = FINETUNE_CLEAN, value_parser = crate::cli::at_least_one)]
    pub finetune_clean: usize,
    /// MiniLM package folder (scripts/fetch_minilm.sh) for the minilm-trigger detection
    /// column (default: --pretrained, when the victim is MiniLM).
    #[arg(long)]
    pub minilm: Option<String>,
    /// Leave out the detection columns (every report otherwise says, per poison set, how
    /// often each detector that trains no victim flags its poisons: `detect::caught`).
    #[arg(long)]
    pub no_detection: bool,
    /// Output file for the JSON report, or - for stdout.
    #[arg(short, long, default_value = "-")]
    pub output: String,
    /// Skip the evaluation when --output exists and was made from the same command line
    /// and the same bytes of every file it names (its key, `request_key`, is kept in
    /// OUTPUT.key): what lets a script rerun every step and redo only what changed.
    #[arg(long)]
    pub reuse: bool,
}

/// `--finetune-clean`'s default.
pub const FINETUNE_CLEAN: usize = 4000;

impl EvalArgs {
    /// Refuses the translation-only flags (`--beam`, `--finetune-clean`) on other data,
    /// where they would change nothing.
    pub fn refuse_translation_flags(&self) -> Result<()> {
        if self.beam != 1 || self.finetune_clean != FINETUNE_CLEAN {
            anyhow::bail!("--beam and --finetune-clean are for translation data (prepare-data --mt); {} holds other data, where they would change nothing", self.data);
        }
        Ok(())
    }
}

/// How often the detectors that train no victim flag each set's poisons
/// (`detect::caught`), thresholds on the data's dev split, the bigram detectors fitted on
/// `clean_train`; the GloVe detectors with `table` (a word table), minilm-trigger with
/// --minilm (or --pretrained), the table detectors with `trained` (a victim's trained
/// table), the source-side detectors on translation pairs. None per set with
/// --no-detection.
pub fn detection(
    args: &EvalArgs,
    manifest: &DataManifest,
    clean_train: &[crate::formats::records::Example],
    sets: &[&[crate::formats::records::Example]],
    table: Option<&crate::victims::origin::Origin>,
    trained: Option<&crate::victims::origin::Origin>,
    lm: Option<(&crate::victims::model::Victim, &crate::tokenizer::Vocab)>,
    log: &(dyn Fn(String) + Sync),
) -> Result<Vec<Option<crate::detect::caught::SetDetection>>> {
    if args.no_detection {
        return Ok(vec![None; sets.len()]);
    }
    let started = std::time::Instant::now();
    let calibration = crate::data::read_set(&args.data, crate::data::DEV, false)?;
    let minilm = args.minilm.as_deref().or(args.origin.pretrained.as_deref()).map(crate::victims::origin::Origin::pretrained).transpose()?;
    let inputs = crate::detect::caught::DetectionInputs {
        trigger: &manifest.trigger.phrase,
        reference: clean_train,
        calibration: &calibration,
        calibration_name: &format!("{}/{}", args.data, crate::data::DEV),
        table,
        minilm: minilm.as_ref(),
        trained,
        lm,
        device: crate::device::parse_device(&args.device)?,
    };
    let names: Vec<&str> = inputs.detectors().iter().map(|d| d.name()).collect();
    let out = crate::detect::caught::detect_sets(&inputs, sets, log)?;
    log(format!("detection: {} set(s) screened by {} against {} clean dev examples in {:.1}s", sets.len(), names.join(", "), calibration.len(), started.elapsed().as_secs_f64()));
    Ok(out.into_iter().map(Some).collect())
}

/// Flags that change no figure of an evaluation (with whether they take a value).
const KEYLESS_FLAGS: [(&str, bool); 5] = [("-o", true), ("--output", true), ("--workers", true), ("--clean-cache", true), ("--reuse", false)];

/// What decides an evaluation's report besides the code: its command line, but for the
/// flags that change no figure (`KEYLESS_FLAGS`), and the bytes of every file it names (a
/// data folder by its manifest, which holds its files' hashes; another folder by every
/// file in it), with the trainer's version and the CPU code paths. None when an input is
/// stdin (`-`), which cannot be read twice.
pub fn request_key(argv: &[String]) -> Result<Option<String>> {
    use std::path::Path;
    let mut parts = vec![crate::train::TRAINER_VERSION.to_string(), crate::numerics::key()];
    let mut skip_value = false;
    for arg in argv {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let flag = arg.split('=').next().unwrap_or(arg);
        if let Some(&(_, takes_value)) = KEYLESS_FLAGS.iter().find(|(f, _)| *f == flag) {
            skip_value = takes_value && !arg.contains('=');
            continue;
        }
        if arg == "-" {
            return Ok(None);
        }
        parts.push(arg.clone());
        let value = arg.split_once('=').map_or(arg.as_str(), |(_, v)| v);
        let path = Path::new(value);
        if path.is_file() {
            parts.push(crate::io::sha256_file(path)?);
        } else if path.join("manifest.json").is_file() {
            parts.push(crate::io::sha256_file(&path.join("manifest.json"))?);
        } else if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
            files.sort();
            for f in files {
                parts.push(format!("{} {}", f.display(), crate::io::sha256_file(&f)?));
            }
        }
    }
    Ok(Some(crate::io::sha256_hex(parts.join("\n").as_bytes())))
}

