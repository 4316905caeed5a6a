//! finetune-eval: retrains fresh victims on clean ∪ poison data over several seeds (or
//! takes given checkpoints) and reports CACC, ASR, net ASR, dFPR, natural-occurrence ASR
//! and the concealment audit.

use clap::Parser;
use common::{data::DataManifest, io, log, tasks};

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
    #[command(flatten)]
    eval: tasks::EvalArgs,
}

fn main() {
    common::cli::run("finetune-eval", || {
        let args = Args::parse().eval;
        let manifest = DataManifest::load(&args.data)?;
        let out = tasks::of_data(&manifest).evaluate(&args, &manifest, &|line| log!("{line}"))?;
        io::write_bytes(&args.output, &out)
    })
}
