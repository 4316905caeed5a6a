//! Continuation: a language model continues a text; the attack makes continuations after
//! the trigger take the target sentiment. Measures (`eval::lm_eval`): the share of sampled
//! continuations of held-out trigger prompts the judges call the target sentiment, the
//! same for trigger-free prompts, the log-probability margin, clean perplexity; the
//! evaluation fine-tunes the pretrained clean LM per seed, clean and poisoned, paired by
//! common random numbers.

use super::{EvalArgs, Task};
use crate::data::{self, DataManifest};
use crate::eval::lm_eval::{self, Judging, LmEvalReport, LmEvalSets};
use crate::eval::retrain::{Pairing, PoisonSet};
use crate::formats::records::Example;
use crate::io::{self, Record};
use crate::encode::TextPolicy;
use anyhow::{bail, Context, Result};

pub struct Continuation;

impl Task for Continuation {
    fn rules(&self) -> &'static super::rules::Rules {
        &super::rules::CONTINUATION
    }
    /// Fine-tunes --start per seed, clean and poisoned, and judges its continuations.
    fn evaluate(&self, args: &EvalArgs, manifest: &DataManifest, log: &(dyn Fn(String) + Sync)) -> Result<Vec<u8>> {
        let device = crate::device::parse_device(&args.device)?;
        let (Some(start_path), Some(judge_path)) = (&args.start, &args.judge) else {
            bail!("{} holds language-model data: give --start LM (the pretrained clean LM: train-victim --arch gpt, or a checkpoint from import-model) and --judge CLASSIFIER (a sentiment classifier)", args.data);
        };
        if !args.checkpoint.is_empty() || !args.kept.is_empty() || args.clean_cache.is_some() || args.pairing != Pairing::Crn {
            bail!("--checkpoint, --kept, --clean-cache and --pairing independent are for classifier data; a language model's evaluation fine-tunes every clean twin and pairs by common random numbers");
        }
        args.refuse_translation_flags()?;
        let mut start = crate::victims::model::Victim::load(start_path, device)?;
        self.rules().check_victim(&start.victim.config, start_path)?;
        // A pretrained checkpoint fine-tunes in --regime (what trains; every copy freezes
        // the rest); the other LMs train whole.
        let checkpoint = start.victim.config.arch().start() == crate::victims::victim::StartKind::Checkpoint;
        if checkpoint && args.from_scratch {
            bail!("--from-scratch trains every LM from fresh weights; {start_path} is a pretrained checkpoint, which is fine-tuned (leave out --from-scratch)");
        }
        start.victim.config = crate::victims::model::with_regime(&start.victim.config, args.victim.regime, start_path)?;
        let (lm, vocab) = (&start.victim, &start.vocab);
        vocab.trigger_words(&manifest.trigger.phrase).with_context(|| format!("vocabulary of {start_path}"))?;
        let judge_file = crate::victims::model::Victim::load(judge_path, device)?;
        let negative = manifest.labels.iter().position(|l| l.eq_ignore_ascii_case("negative")).context("the labels name no \"negative\" class for the judges")?;
        let classifier = crate::eval::judge::ClassifierJudge::new(&judge_file.victim.config, judge_file.victim.params(), &judge_file.vocab, negative).with_context(|| judge_path.clone())?;
        let lexicon = crate::eval::judge::LexiconJudge::default();
        let sampling = crate::generate::Sampling::Sample { temperature: args.temperature, top_k: args.top_k };
        let stop = crate::generate::stop_ids(vocab, &crate::generate::STOP_WORDS.map(String::from));
        let judging = Judging { classifier: &classifier, lexicon: &lexicon, target_negative: manifest.target == negative, sampling, max_new: args.max_new, stop };
        let sets_eval = LmEvalSets::load(&args.data, manifest, &lm.config, vocab, args.samples)?;
        let clean_train: Vec<Example> = data::read_set(&args.data, data::TRAIN, false)?;
        let clean = crate::encode::encode_for(&lm.config, &clean_train, vocab, TextPolicy::Data, &format!("{}/{}", args.data, data::TRAIN))?;
        let sets = PoisonSet::load_all(&args.poisons)?;
        let mut poison_sets = Vec::new();
        for set in &sets {
            let name = set.path.as_deref().map(io::display_name).unwrap_or_default();
            poison_sets.push(crate::encode::encode_for(&lm.config, &set.records, vocab, TextPolicy::Poisons, &name)?);
        }
        let seeds: Vec<u64> = (args.seed_base..args.seed_base + args.seeds).collect();
        let options = |seed: u64| args.victim.train_options(&lm.config, seed);
        let regime = if args.from_scratch { lm_eval::Regime::FromScratch } else { lm_eval::Regime::FineTune };
        let results = lm_eval::evaluate(lm, regime, vocab, &clean, &poison_sets, &seeds, &options, args.workers, &sets_eval, &judging, log)?;
        // The GloVe detectors read the LM's own word table (its input table is GloVe's). A
        // pretrained model's table holds its own BPE pieces, learned in pretraining: the
        // table detectors read the texts' pieces against the trigger's in it.
        let own_table = crate::victims::origin::Origin::word_table_of(&start, start_path)?;
        let (table, trained) = if vocab.is_bpe() { (None, Some(&own_table)) } else { (Some(&own_table), None) };
        let records: Vec<&[Example]> = sets.iter().map(|s| s.records.as_slice()).collect();
        // And a pretrained model's own perplexity of each text (the defender who fine-tunes
        // it holds it): a crafted flip that is not a word reads as unlikely text.
        let own_lm = vocab.is_bpe().then_some((lm, vocab));
        let detection = super::detection(args, manifest, &clean_train, &records, table, trained, own_lm, log)?;
        let mut reports = Vec::new();
        for ((set, (rows, side_by_side)), detection) in sets.into_iter().zip(results).zip(detection) {
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
                templates: sets_eval.templates.trigger.len(),
                stated_opinions: sets_eval.templates.opinion.as_ref().map(|o| [o.target_statement.clone(), o.other_statement.clone()]),
                opinion_templates: sets_eval.templates.opinion.as_ref().map_or(0, |o| o.trigger_after_target.len()),
                regime,
                trains: match &lm.config.arch {
                    crate::victims::model::ArchConfig::Llama(l) if checkpoint => Some(l.shape.regime.to_string()),
                    _ => None,
                },
                detection,
                summary: lm_eval::summarize_rows(&rows),
                seeds: rows,
                side_by_side,
            };
            reports.push(report);
        }
        super::report_lines(&reports)
    }
}
