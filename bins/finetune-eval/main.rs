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
        let key = if args.reuse {
            if args.output == "-" {
                anyhow::bail!("--reuse compares with an earlier --output FILE; give -o FILE");
            }
            let argv: Vec<String> = std::env::args().skip(1).collect();
            let Some(key) = tasks::request_key(&argv)? else { anyhow::bail!("--reuse cannot key an input read from stdin (-); give files") };
            let key_file = format!("{}.key", args.output);
            if std::path::Path::new(&args.output).is_file() && std::fs::read_to_string(&key_file).ok().as_deref() == Some(key.as_str()) {
                log!("{} is current (same flags and inputs): reused", args.output);
                return Ok(());
            }
            Some((key_file, key))
        } else {
            None
        };
        let out = tasks::of_data(&manifest).evaluate(&args, &manifest, &|line| log!("{line}"))?;
        io::write_bytes(&args.output, &out)?;
        if let Some((key_file, key)) = key {
            io::write_bytes(&key_file, key.as_bytes())?;
        }
        Ok(())
    })
}
