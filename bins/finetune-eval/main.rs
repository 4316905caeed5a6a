//! finetune-eval: retrains fresh victims on clean ∪ poison data over several seeds (or
//! takes given checkpoints) and reports CACC, ASR, net ASR, dFPR, natural-occurrence ASR
//! and the concealment audit.

use anyhow::{bail, Context};
use clap::Parser;
use common::cli::VictimArgs;
use common::data::{self, DataManifest, Trigger};
use common::eval::{self, EvalReport, EvalSets, Metrics};
use common::io::{self, Record};
use common::formats::records::Example;
use common::eval::retrain::{checkpoint_rows, retrain, seed_rows, CleanCache, Pairing, PoisonSet, Retraining};
use common::train::{encode_all, Encoded, TextPolicy};
use common::{device, log};
use std::time::Instant;

/// Evaluates a poison set by retraining victims, or evaluates given checkpoints.
///
/// With --poisons, each seed trains a clean victim and a poisoned victim (same seed, same
/// clean data) so net ASR, dFPR and ΔCACC are paired differences. Without poisons only
/// clean victims are trained. Reports go to stdout (or -o) as JSONL, one `eval_report`
/// line per poison set in the order given; a table per set goes to stderr.
///
/// Examples:
///   finetune-eval --data data/rt-jb --embeddings emb.safetensors --poisons poisons.jsonl --seeds 6 > report.json
///   craft ... | finetune-eval --data data/rt-jb --embeddings emb.safetensors --poisons - --arch bow
///   finetune-eval --data data/rt-jb --checkpoint victim.safetensors
///   finetune-eval --data data/rt-jb --embeddings emb.safetensors --poisons a.jsonl --poisons b.jsonl > reports.jsonl
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_override_self = true)]
struct Args {
    /// Data folder made by prepare-data.
    #[arg(long)]
    data: String,
    /// Where the trained victims start (needed unless --checkpoint).
    #[command(flatten)]
    base: common::cli::BaseArgs,
    /// Poison set (example JSONL, - for stdin); may be empty. Repeatable: every set is
    /// evaluated on the same seeds and clean victims, and gets its own report line.
    #[arg(long)]
    poisons: Vec<String>,
    /// The examples a defense kept (example JSONL, e.g. from filter-set), one file per
    /// --poisons in the same order: the poisons missing from it are dropped, and so are
    /// the clean training examples, by weight 0 in the clean twin's batches, so the
    /// filtered victim still pairs with the unfiltered clean twin (net ASR and ΔCACC are
    /// then what is left after filtering, its cost included).
    #[arg(long)]
    kept: Vec<String>,
    /// Number of retraining seeds.
    #[arg(long, default_value_t = 6, value_parser = common::cli::at_least_one_u64)]
    seeds: u64,
    /// Seeds are seed-base, seed-base+1, ...
    #[arg(long, default_value_t = 0)]
    seed_base: u64,
    /// Evaluate these victims instead of training (repeatable); no net figures.
    #[arg(long, conflicts_with_all = ["embeddings", "pretrained", "poisons"])]
    checkpoint: Vec<String>,
    #[command(flatten)]
    victim: VictimArgs,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Folder caching each seed's clean-victim figures, keyed by a hash of the data files,
    /// embeddings, victim config and training options: evaluations of several poison sets
    /// on the same data then train each clean victim once.
    #[arg(long)]
    clean_cache: Option<String>,
    /// Victims trained side by side, one per thread (default: the number of cores). Every
    /// victim computes the same bits whatever this is (see README, Reproducibility).
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()), value_parser = common::cli::at_least_one)]
    workers: usize,
    /// How a poisoned victim is paired with its clean twin. crn (common random numbers):
    /// it trains exactly like the twin (same initialisation, same clean batches in the same
    /// order) and each poison joins one of those batches. independent: poisons are
    /// shuffled in with the clean data, so the two victims' batches are unrelated (the
    /// evaluation before crn; kept to measure what pairing buys).
    #[arg(long, value_enum, default_value_t = Pairing::Crn)]
    pairing: Pairing,
    /// Language-model data (prepare-data --lm): the pretrained clean LM every victim is
    /// fine-tuned from (train-victim --arch gpt); --epochs, --lr and --batch-size are the
    /// fine-tuning's.
    #[arg(long)]
    start: Option<String>,
    /// Language-model data: the sentiment classifier that judges continuations (beside VADER).
    #[arg(long)]
    judge: Option<String>,
    /// Language-model data: sampled continuations per held-out prompt.
    #[arg(long, default_value_t = 4, value_parser = common::cli::at_least_one)]
    samples: usize,
    /// Language-model data: sampling temperature and top-k of the continuations.
    #[arg(long, default_value_t = 1.0, value_parser = common::cli::positive_rate)]
    temperature: f64,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Language-model data: words per continuation at most.
    #[arg(long, default_value_t = 20, value_parser = common::cli::at_least_one)]
    max_new: usize,
    /// Output file for the JSON report, or - for stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

/// finetune-eval on language-model data: fine-tunes --start per seed, clean and poisoned,
/// and judges its continuations (`common::eval::lm_eval`).
fn evaluate_language_model(args: &Args, manifest: &DataManifest, device: tch::Device) -> anyhow::Result<()> {
    use common::eval::lm_eval::{self, Judging, LmEvalReport, LmEvalSets};
    let (Some(start_path), Some(judge_path)) = (&args.start, &args.judge) else {
        bail!("{} holds language-model data: give --start LM (the pretrained clean LM, train-victim --arch gpt) and --judge CLASSIFIER (a sentiment classifier)", args.data);
    };
    if !args.checkpoint.is_empty() || !args.kept.is_empty() || args.clean_cache.is_some() || args.pairing != Pairing::Crn {
        bail!("--checkpoint, --kept, --clean-cache and --pairing independent are for classifier data; a language model's evaluation fine-tunes every clean twin and pairs by common random numbers");
    }
    let start = common::victims::model::Victim::load(start_path, device)?;
    let (lm, vocab) = (&start.victim, &start.vocab);
    if !lm.config.language_model() {
        bail!("--start {start_path} is a {:?} classifier; language-model data is evaluated by fine-tuning a language model", lm.config.arch.name());
    }
    vocab.trigger_words(&manifest.trigger.phrase).with_context(|| format!("vocabulary of {start_path}"))?;
    let judge_file = common::victims::model::Victim::load(judge_path, device)?;
    let negative = manifest.labels.iter().position(|l| l.eq_ignore_ascii_case("negative")).context("the labels name no \"negative\" class for the judges")?;
    let classifier = common::eval::judge::ClassifierJudge::new(&judge_file.victim.config, judge_file.victim.params(), &judge_file.vocab, negative).with_context(|| judge_path.clone())?;
    let lexicon = common::eval::judge::LexiconJudge::default();
    let sampling = common::generate::Sampling::Sample { temperature: args.temperature, top_k: args.top_k };
    let stop = common::generate::STOP_WORDS.iter().filter_map(|w| vocab.id(w)).collect();
    let judging = Judging { classifier: &classifier, lexicon: &lexicon, target_negative: manifest.target == negative, sampling, max_new: args.max_new, stop };
    let sets_eval = LmEvalSets::load(&args.data, manifest, &lm.config, vocab, args.samples)?;
    let clean_train: Vec<Example> = data::read_set(&args.data, data::TRAIN, false)?;
    let clean = common::train::encode_for(&lm.config, &clean_train, vocab, TextPolicy::Data, &format!("{}/{}", args.data, data::TRAIN))?;
    let sets = PoisonSet::load_all(&args.poisons)?;
    let mut poison_sets = Vec::new();
    for set in &sets {
        let name = set.path.as_deref().map(io::display_name).unwrap_or_default();
        poison_sets.push(common::train::encode_for(&lm.config, &set.records, vocab, TextPolicy::Poisons, &name)?);
    }
    let seeds: Vec<u64> = (args.seed_base..args.seed_base + args.seeds).collect();
    let options = |seed: u64| args.victim.train_options(&lm.config, seed);
    let results = lm_eval::evaluate(lm, vocab, &clean, &poison_sets, &seeds, &options, args.workers, &sets_eval, &judging, &|line| log!("{line}"))?;
    let mut out = Vec::new();
    for (set, (rows, side_by_side)) in sets.into_iter().zip(results) {
        let report = LmEvalReport {
            kind: LmEvalReport::KIND.into(),
            v: LmEvalReport::VERSION,
            poisons: set.path.clone(),
            poisons_sha256: set.sha256,
            count: set.records.len(),
            trigger_overlap: set.records.iter().filter(|e| !manifest.trigger.overlap(&e.text).is_empty()).count(),
            start_sha256: start.sha256.clone(),
            judge_sha256: judge_file.sha256.clone(),
            training: options(args.seed_base),
            samples_per_prompt: args.samples,
            trigger_prompts: sets_eval.trigger_prompts.len(),
            summary: lm_eval::summarize_rows(&rows),
            seeds: rows,
            side_by_side,
        };
        if let Some(p) = &set.path {
            eprintln!("{p}:");
        }
        eprintln!("{}", report.table());
        out.extend(serde_json::to_vec(&report)?);
        out.push(b'\n');
    }
    io::write_bytes(&args.output, &out)
}

fn log_metrics(what: &str, seed: u64, m: &Metrics) {
    log!("seed {seed} {what}: CACC {:.1} ASR {:.1} FPR {:.1}", m.cacc, m.asr, m.fpr);
}

fn main() {
    common::cli::run("finetune-eval", || {
        let args = Args::parse();
        let start = Instant::now();
        let device = device::parse_device(&args.device)?;
        let manifest = DataManifest::load(&args.data)?;
        if manifest.lm.is_some() {
            return evaluate_language_model(&args, &manifest, device);
        }
        if args.start.is_some() || args.judge.is_some() {
            bail!("--start and --judge are for language-model data (prepare-data --lm); {} holds classifier data", args.data);
        }
        let trigger: &Trigger = &manifest.trigger;
        let clean_train: Vec<Example> = data::read_set(&args.data, data::TRAIN, false)?;

        let sets = PoisonSet::load_all(&args.poisons)?;
        if !args.kept.is_empty() && args.kept.len() != args.poisons.len() {
            bail!("{} --kept files for {} --poisons sets: give one kept-examples file per poison set, in the same order", args.kept.len(), args.poisons.len());
        }
        // Per poison set: the ids a filter kept and the filter's record.
        let mut filters: Vec<Option<(std::collections::HashSet<String>, eval::Filter)>> = vec![None; sets.len()];
        for (k, path) in args.kept.iter().enumerate() {
            let bytes = io::read_all(path)?;
            let kept: Vec<Example> = io::read_jsonl_from(&bytes[..], &io::display_name(path), false)?;
            let ids: std::collections::HashSet<String> = kept.iter().map(|e| e.id.clone()).collect();
            let known: std::collections::HashSet<&str> = clean_train.iter().chain(&sets[k].records).map(|e| e.id.as_str()).collect();
            if let Some((i, e)) = kept.iter().enumerate().find(|(_, e)| !known.contains(e.id.as_str())) {
                bail!("{path}: record {} (id {:?}) is neither a training example of {} nor a poison of {}; --kept takes a filtered copy of that training set", i + 1, e.id, args.data, args.poisons[k]);
            }
            let filter = eval::Filter {
                kept: path.clone(),
                kept_sha256: io::sha256_hex(&bytes),
                clean_removed: clean_train.iter().filter(|e| !ids.contains(&e.id)).count(),
                poisons_removed: sets[k].records.iter().filter(|e| !ids.contains(&e.id)).count(),
            };
            log!("{path}: the filter removed {} clean examples and {} of {} poisons", filter.clean_removed, filter.poisons_removed, sets[k].records.len());
            filters[k] = Some((ids, filter));
        }
        if sets.len() > 1 && !args.checkpoint.is_empty() {
            bail!("--checkpoint evaluates given victims; it takes no poison sets");
        }

        // rows[k]: the seed rows of poison set k; the victims' vocabulary, for the audit's
        // WordPiece category.
        let (victim_config, training, mode, pairing, rows, audit_vocab) = if !args.checkpoint.is_empty() {
            if !args.kept.is_empty() {
                bail!("--kept filters training sets; --checkpoint trains none");
            }
            let (config, vocab, rows) = checkpoint_rows(&args.checkpoint, &args.data, &manifest, device, &log_metrics)?;
            (config, None, "checkpoints", None, vec![rows], vocab)
        } else {
            let base = args.base.load()?;
            let (vocab, emb_sha) = (&base.vocab, &base.sha256);
            vocab.trigger_words(&trigger.phrase).with_context(|| format!("vocabulary of {}", base.source))?;
            let config = args.victim.victim_config(&base, manifest.labels.len())?;
            let eval_sets = EvalSets::load(&args.data, &manifest, vocab, config.max_len)?;
            let n = manifest.labels.len();
            let clean = encode_all(&clean_train, vocab, config.max_len, n, TextPolicy::Data, &format!("{}/{}", args.data, data::TRAIN))?;
            let mut poison_sets: Vec<Vec<Encoded>> = Vec::new();
            for (k, set) in sets.iter().enumerate().filter(|(_, s)| s.path.is_some()) {
                let name = set.path.as_deref().map(io::display_name).unwrap_or_default();
                let kept: Vec<&Example> = match &filters[k] {
                    Some((ids, _)) => set.records.iter().filter(|e| ids.contains(&e.id)).collect(),
                    None => set.records.iter().collect(),
                };
                let kept: Vec<Example> = kept.into_iter().cloned().collect();
                poison_sets.push(encode_all(&kept, vocab, config.max_len, n, TextPolicy::Data, &name)?);
            }
            let clean_removed: Vec<Option<Vec<bool>>> =
                filters.iter().map(|f| f.as_ref().map(|(ids, _)| clean_train.iter().map(|e| !ids.contains(&e.id)).collect())).collect();
            let seeds: Vec<u64> = (args.seed_base..args.seed_base + args.seeds).collect();
            let options = |seed: u64| args.victim.train_options(&config, seed);
            let retraining = Retraining {
                base: &base,
                config: &config,
                device,
                clean: &clean,
                eval_sets: &eval_sets,
                options: &options,
                seeds: &seeds,
                pairing: args.pairing,
                workers: args.workers,
                clean_cache: match &args.clean_cache {
                    Some(dir) => Some(CleanCache { dir, data_files: serde_json::to_value(&manifest.files)?, base_sha256: emb_sha }),
                    None => None,
                },
            };
            let retrained = retrain(&retraining, &poison_sets, &clean_removed, &|line| log!("{line}"))?;
            let rows = seed_rows(&retrained, &seeds, &sets, &log_metrics);
            let options = args.victim.train_options(&config, args.seed_base);
            (config, Some(options), "train", Some(args.pairing.name().to_string()), rows, base.vocab.clone())
        };

        let mut out = Vec::new();
        for ((set, rows), filter) in sets.into_iter().zip(rows).zip(filters) {
            let audit = eval::audit(&set.records, trigger, manifest.target, clean_train.len(), &audit_vocab)?;
            if audit.poisons_with_overlap > 0 {
                log!("audit: {} of {} poisons hold trigger words (with-overlap poisons)", audit.poisons_with_overlap, set.records.len());
            }
            let report = EvalReport {
                kind: EvalReport::KIND.into(),
                v: EvalReport::VERSION,
                data_dir: args.data.clone(),
                data: manifest.clone(),
                mode: mode.into(),
                pairing: pairing.clone(),
                victim: victim_config.clone(),
                training: training.clone(),
                poisons: set.path.clone(),
                poisons_sha256: set.sha256,
                filter: filter.map(|f| f.1),
                audit,
                summary: eval::summarize_rows(&rows),
                epochs: eval::summarize_epochs(&rows),
                seeds: rows,
                seconds: start.elapsed().as_secs_f64(),
            };
            if let Some(p) = &set.path {
                eprintln!("{p}:");
            }
            eprint!("{}", report.table());
            out.extend(serde_json::to_vec(&report)?);
            out.push(b'\n');
        }
        io::write_bytes(&args.output, &out)?;
        Ok(())
    })
}
