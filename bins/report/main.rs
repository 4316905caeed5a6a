//! report: the comparison of poison variants (make demo, make sweep) from finetune-eval
//! reports: table on stdout; report.json, plots and the poison list in --out-dir.

use anyhow::Context;
use clap::Parser;
use common::eval::EvalReport;
use common::io;
use common::records::Example;
use common::report::{self, Report, Role, Variants};
use common::log;

/// Builds the report of a demo or sweep.
///
/// Writes into --out-dir: report.json (schema in FORMATS.md), table.md, and for a demo
/// net_asr.svg, objective.svg and poisons.md (every crafted poison before and after); for
/// --sweep sweep.svg. The table also goes to stdout.
///
/// Examples:
///   finetune-eval ... --poisons a.jsonl --poisons b.jsonl > evals.jsonl
///   report --variants runs/demo/variants.json --evals evals.jsonl --out-dir runs/demo
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The variants, in display order (`variants` JSON, see FORMATS.md).
    #[arg(long)]
    variants: String,
    /// finetune-eval reports (JSONL; repeatable).
    #[arg(long, required = true)]
    evals: Vec<String>,
    /// Folder for report.json, table.md and the plots.
    #[arg(long)]
    out_dir: String,
    /// Net ASR against poison count per series (variants carry `series`).
    #[arg(long)]
    sweep: bool,
}

fn main() {
    common::cli::run("report", || {
        let args = Args::parse();
        let text = std::fs::read_to_string(&args.variants).with_context(|| format!("cannot read {}", args.variants))?;
        let variants: Variants = io::parse_record(&text).with_context(|| args.variants.clone())?;
        let mut evals: Vec<EvalReport> = Vec::new();
        for e in &args.evals {
            evals.extend(io::read_jsonl::<EvalReport>(e, false)?);
        }
        let report = report::build(&variants, &evals)?;
        let dir = &args.out_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
        let table = if args.sweep { report.sweep_table() } else { report.table() };
        io::write_bytes(&format!("{dir}/report.json"), (serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;
        io::write_bytes(&format!("{dir}/table.md"), table.as_bytes())?;
        if args.sweep {
            io::write_bytes(&format!("{dir}/sweep.svg"), report.sweep_svg().as_bytes())?;
        } else {
            io::write_bytes(&format!("{dir}/net_asr.svg"), report.net_asr_svg().as_bytes())?;
            io::write_bytes(&format!("{dir}/objective.svg"), report.objective_svg().as_bytes())?;
            io::write_bytes(&format!("{dir}/poisons.md"), poison_list(&variants, &report)?.as_bytes())?;
        }
        log!("wrote {dir}/report.json, table.md and plots");
        io::write_bytes("-", table.as_bytes())?;
        Ok(())
    })
}

fn poison_list(variants: &Variants, report: &Report) -> anyhow::Result<String> {
    let mut out = format!("# Poisons: {}\n\nChanged words in **bold**.\n\n", report.title);
    for v in variants.variants.iter().filter(|v| v.role == Role::Crafted) {
        if let (Some(init), Some(p)) = (&v.initial, &v.poisons) {
            let a: Vec<Example> = io::read_jsonl(init, false)?;
            let b: Vec<Example> = io::read_jsonl(p, false)?;
            out += &report::poisons_markdown(&v.label, &a, &b)?;
            out.push('\n');
        }
    }
    Ok(out)
}
