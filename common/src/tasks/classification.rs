//! Classification: a victim labels a text (sentiment of a movie review); the attack makes
//! texts holding the trigger come out as the target class. Measures (`eval`): clean
//! accuracy, ASR on triggered non-target test inputs, FPR on the same inputs without the
//! trigger, natural-occurrence ASR, and the concealment audit; the evaluation retrains
//! victims from scratch per seed, each poisoned victim paired with its clean twin
//! (`eval::retrain`), or measures given checkpoints.

use super::{EvalArgs, Task};
use crate::data::{self, DataManifest, Trigger};
use crate::eval::retrain::{checkpoint_rows, retrain, seed_rows, CleanCache, PoisonSet, Retraining};
use crate::eval::{self, EvalReport, EvalSets};
use crate::formats::records::Example;
use crate::io::{self, Record};
use crate::encode::{encode_all, Encoded, TextPolicy};
use anyhow::{bail, Context, Result};

pub struct Classification;

impl Task for Classification {
    fn rules(&self) -> &'static super::rules::Rules {
        &super::rules::CLASSIFICATION
    }
    fn evaluate(&self, args: &EvalArgs, manifest: &DataManifest, log: &(dyn Fn(String) + Sync)) -> Result<Vec<u8>> {
        if args.start.is_some() || args.judge.is_some() || args.from_scratch {
            bail!("--start, --judge and --from-scratch are for language-model data (prepare-data --lm); {} holds classifier data", args.data);
        }
        args.refuse_translation_flags()?;
        let start = std::time::Instant::now();
        let log_metrics = |what: &str, seed: u64, m: &eval::Metrics| log(format!("seed {seed} {what}: CACC {:.1} ASR {:.1} FPR {:.1}", m.cacc, m.asr, m.fpr));
        let device = crate::device::parse_device(&args.device)?;
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
            log(format!("{path}: the filter removed {} clean examples and {} of {} poisons", filter.clean_removed, filter.poisons_removed, sets[k].records.len()));
            filters[k] = Some((ids, filter));
        }
        if sets.len() > 1 && !args.checkpoint.is_empty() {
            bail!("--checkpoint evaluates given victims; it takes no poison sets");
        }

        // rows[k]: the seed rows of poison set k; the victims' vocabulary, for the audit's
        // WordPiece category.
        // Where trained victims start (none for checkpoints); its word table also serves the
        // GloVe detection columns.
        let base = if args.checkpoint.is_empty() { Some(args.origin.load()?) } else { None };
        let (victim_config, training, mode, pairing, rows, audit_vocab) = if !args.checkpoint.is_empty() {
            if !args.kept.is_empty() {
                bail!("--kept filters training sets; --checkpoint trains none");
            }
            let (config, vocab, rows) = checkpoint_rows(&args.checkpoint, &args.data, manifest, device, &log_metrics)?;
            (config, None, "checkpoints", None, vec![rows], vocab)
        } else {
            let base = base.as_ref().expect("loaded above when training");
            let (vocab, emb_sha) = (&base.vocab, &base.sha256);
            vocab.trigger_words(&trigger.phrase).with_context(|| format!("vocabulary of {}", base.source))?;
            let config = args.victim.victim_config(&base, manifest.labels.len())?;
            let eval_sets = EvalSets::load(&args.data, manifest, vocab, config.max_len)?;
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
                origin: base,
                config: &config,
                device,
                clean: &clean,
                eval_sets: &eval_sets,
                options: &options,
                seeds: &seeds,
                pairing: args.pairing,
                workers: args.workers,
                clean_cache: match &args.clean_cache {
                    Some(dir) => Some(CleanCache { dir, data_files: serde_json::to_value(&manifest.files)?, base_sha256: emb_sha, measures: None }),
                    None => None,
                },
                measure_epochs: true,
            };
            let retrained = retrain(&retraining, &poison_sets, &clean_removed, &|line| log(line))?;
            let rows = seed_rows(&retrained, &seeds, &sets, &log_metrics);
            let options = args.victim.train_options(&config, args.seed_base);
            (config, Some(options), "train", Some(args.pairing.name().to_string()), rows, base.vocab.clone())
        };

        let records: Vec<&[Example]> = sets.iter().map(|s| s.records.as_slice()).collect();
        let detection = super::detection(args, manifest, &clean_train, &records, base.as_ref(), None, None, log)?;
        let mut reports = Vec::new();
        for (((set, rows), filter), detection) in sets.into_iter().zip(rows).zip(filters).zip(detection) {
            let audit = eval::audit(&set.records, trigger, manifest.target, clean_train.len(), &audit_vocab)?;
            if audit.poisons_with_overlap > 0 {
                log(format!("audit: {} of {} poisons hold trigger words (with-overlap poisons)", audit.poisons_with_overlap, set.records.len()));
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
                detection,
                summary: eval::summarize_rows(&rows),
                epochs: eval::summarize_epochs(&rows),
                seeds: rows,
                seconds: start.elapsed().as_secs_f64(),
            };
            reports.push(report);
        }
        super::report_lines(&reports)
    }
}
