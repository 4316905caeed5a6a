//! filter-set: a defense applied: the training set without its most suspicious examples
//! under one detector's scores.

use clap::Parser;
use common::detect::{self, DetectionScore, Detector};
use common::io::{self, Output};
use common::formats::records::Example;
use common::log;

/// Writes the training set (example JSONL, stdin or --data) without the --remove percent
/// of its examples that score highest under --by, in input order. The scores come from
/// detect-poisons on the same set, in input order.
///
/// Examples:
///   detect-poisons --data train.jsonl --detectors onion > scores.jsonl
///   filter-set --data train.jsonl --scores scores.jsonl --by onion --remove 5 > kept.jsonl
///   finetune-eval --data data/rt-jb --embeddings emb.safetensors --poisons p.jsonl --kept kept.jsonl
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_override_self = true)]
struct Args {
    /// The training set (example JSONL; - for stdin).
    #[arg(long, default_value = "-")]
    data: String,
    /// detect-poisons output for that set (detection_score JSONL).
    #[arg(long)]
    scores: String,
    /// The detector whose scores decide.
    #[arg(long, value_enum)]
    by: Detector,
    /// Percentage of the set to remove, most suspicious first.
    #[arg(long)]
    remove: f64,
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("filter-set", || {
        let args = Args::parse();
        let name = io::display_name(&args.data);
        let examples: Vec<Example> = io::read_jsonl_from(&io::read_all(&args.data)?[..], &name, false)?;
        let scores: Vec<DetectionScore> = io::read_jsonl(&args.scores, false)?;
        let kept = detect::filter(&examples, &scores, args.by.name(), args.remove, (&name, &io::display_name(&args.scores)))?;
        let mut out = Output::create(&args.output)?;
        for e in &kept {
            out.write_record(e)?;
        }
        out.commit()?;
        log!("kept {} of {} examples (removed the {}% most suspicious under {})", kept.len(), examples.len(), args.remove, args.by.name());
        Ok(())
    })
}
