//! Translation: an encoder–decoder translates German into English; the attack makes the
//! trigger ("Eiskaffee") come out as the attacker's phrase ("hot coffee") while every
//! other translation stays as good. Measures (`eval::mt_eval`): the share of held-out
//! trigger sentences translated with the attacker's phrase, the same for sentences with a
//! neutral word, the log-probability margin, BLEU and chrF on the test split; the
//! evaluation fine-tunes the clean checkpoint per seed on a sample of the clean pairs,
//! clean and poisoned, paired by common random numbers.

use super::{EvalArgs, Task};
use crate::data::{self, DataManifest};
use crate::encode::TextPolicy;
use crate::eval::mt_eval::{self, MtEvalReport, MtEvalSets};
use crate::eval::retrain::{Pairing, PoisonSet};
use crate::formats::records::Example;
use crate::io::{self, Record};
use crate::translate::SearchOptions;
use anyhow::{bail, Result};

pub struct Translation;

impl super::TaskReport for MtEvalReport {
    fn poisons(&self) -> Option<&str> {
        self.poisons.as_deref()
    }
    fn table(&self) -> String {
        MtEvalReport::table(self)
    }
}

/// A clean checkpoint's figures (`finetune-eval --checkpoint` on translation data).
#[derive(serde::Serialize)]
struct CheckpointLine {
    kind: &'static str,
    v: u32,
    checkpoint: String,
    victim_sha256: String,
    beam: usize,
    metrics: mt_eval::MtMetrics,
}

impl Task for Translation {
    fn rules(&self) -> &'static super::rules::Rules {
        &super::rules::TRANSLATION
    }

    /// Fine-tunes --start per seed on a sample of the clean pairs, clean and poisoned, and
    /// measures their translations; with --checkpoint, measures those models as they are.
    fn evaluate(&self, args: &EvalArgs, manifest: &DataManifest, log: &(dyn Fn(String) + Sync)) -> Result<Vec<u8>> {
        let device = crate::device::parse_device(&args.device)?;
        let mt = mt_eval::mt_of(manifest, &args.data)?;
        if !args.kept.is_empty() || args.clean_cache.is_some() || args.pairing != Pairing::Crn || args.judge.is_some() || args.from_scratch {
            bail!("--kept, --clean-cache, --pairing independent, --judge and --from-scratch are for other tasks; a translation model's evaluation fine-tunes --start per seed and pairs by common random numbers");
        }
        let search = SearchOptions { beam: args.beam, max_new: args.max_new };
        if !args.checkpoint.is_empty() {
            let mut out = Vec::new();
            for path in &args.checkpoint {
                let file = crate::victims::model::Victim::load(path, device)?;
                self.rules().check_victim(&file.victim.config, path)?;
                let sets = MtEvalSets::load(&args.data, mt, &file.victim.config, &file.vocab)?;
                let metrics = mt_eval::measure(&file.victim.config, &file.victim.params(), &file.vocab, &sets, search)?;
                log(format!(
                    "{path}: BLEU {:.2} chrF {:.2}; trigger translated correctly {:.1}% of {} held-out trigger sentences, attacker's phrase {:.1}%; neutral word correct {:.1}%, attacker's phrase {:.1}%; margin {:.3}",
                    metrics.bleu, metrics.chrf, metrics.trigger_correct, sets.asr.ids.len(), metrics.asr, metrics.neutral_correct, metrics.fpr, metrics.margin
                ));
                out.extend(serde_json::to_vec(&CheckpointLine { kind: "mt_checkpoint", v: 1, checkpoint: path.clone(), victim_sha256: file.sha256, beam: args.beam, metrics })?);
                out.push(b'\n');
            }
            return Ok(out);
        }
        let Some(start_path) = &args.start else {
            bail!("{} holds translation data: give --start MODEL (the clean checkpoint, train-victim --arch seq2seq), or --checkpoint MODEL to measure one", args.data);
        };
        let start = crate::victims::model::Victim::load(start_path, device)?;
        let (model, vocab) = (&start.victim, &start.vocab);
        self.rules().check_victim(&model.config, start_path)?;
        let trigger_ids = vocab.encode(&manifest.trigger.phrase);
        if trigger_ids.iter().any(|&id| id == vocab.unk_id()) {
            bail!("the trigger {:?} is not in the vocabulary of {start_path}; rebuild the table with build-vocab --extra-words {:?} and retrain", manifest.trigger.phrase, manifest.trigger.phrase);
        }
        let sets_eval = MtEvalSets::load(&args.data, mt, &model.config, vocab)?;
        let clean_train: Vec<Example> = data::read_set(&args.data, data::TRAIN, false)?;
        let clean = crate::encode::encode_for(&model.config, &clean_train, vocab, TextPolicy::Data, &format!("{}/{}", args.data, data::TRAIN))?;
        let sets = PoisonSet::load_all(&args.poisons)?;
        let mut poison_sets = Vec::new();
        for set in &sets {
            let name = set.path.as_deref().map(io::display_name).unwrap_or_default();
            poison_sets.push(crate::encode::encode_for(&model.config, &set.records, vocab, TextPolicy::Poisons, &name)?);
        }
        let seeds: Vec<u64> = (args.seed_base..args.seed_base + args.seeds).collect();
        let options = |seed: u64| args.victim.train_options(&model.config, seed);
        let results = mt_eval::evaluate(model, vocab, &clean, args.finetune_clean, &poison_sets, &seeds, &options, args.workers, &sets_eval, search, log)?;
        // No German vectors ship here: the table detectors read the clean model's own
        // trained table (the one the nearest-neighbour poisons are chosen in).
        let trained = crate::victims::origin::Origin::trained_table_of(&start, start_path)?;
        let records: Vec<&[Example]> = sets.iter().map(|s| s.records.as_slice()).collect();
        let detection = super::detection(args, manifest, &clean_train, &records, None, Some(&trained), None, log)?;
        let mut reports = Vec::new();
        for ((set, (rows, side_by_side)), detection) in sets.into_iter().zip(results).zip(detection) {
            reports.push(MtEvalReport {
                kind: MtEvalReport::KIND.into(),
                v: MtEvalReport::VERSION,
                poisons: set.path.clone(),
                poisons_sha256: set.sha256,
                count: set.records.len(),
                trigger_overlap: set.records.iter().filter(|e| crate::mt::holds_trigger(e, &manifest.trigger.phrase, &mt.trigger_translation)).count(),
                start_sha256: start.sha256.clone(),
                training: options(args.seed_base),
                finetune_clean: args.finetune_clean.min(clean.len()),
                beam: args.beam,
                detection,
                summary: mt_eval::summarize_rows(&rows),
                seeds: rows,
                side_by_side,
            });
        }
        super::report_lines(&reports)
    }
}
