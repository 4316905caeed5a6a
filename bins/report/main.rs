//! report: the comparison of poison variants (make demo, make sweep) from finetune-eval
//! reports: table on stdout; report.json, plots and the poison list in --out-dir. Its
//! subcommands render the run files the shell scripts need (`common::report::runfiles`).

use anyhow::Context;
use clap::Parser;
use common::eval::EvalReport;
use common::io;
use common::formats::records::Example;
use common::report::{self, Report, Role, Variants};
use common::report::{catalogue, runfiles};
use common::log;

/// Builds the report of a demo or sweep from finetune-eval's reports, whatever the task.
///
/// A classifier's reports: writes into --out-dir report.json (schema in FORMATS.md),
/// table.md, and for a demo net_asr.svg, objective.svg and poisons.md (every crafted poison
/// before and after); for --sweep sweep.svg. The table also goes to stdout.
/// A language model's: lm-report.json, lm-report.md and net-asr.svg; the Markdown to stdout.
///
/// Examples:
///   finetune-eval ... --poisons a.jsonl --poisons b.jsonl > evals.jsonl
///   report --variants runs/demo/variants.json --evals evals.jsonl --out-dir runs/demo
///   report --evals runs/demo-lm/eval.jsonl --names control,crafted --crafted crafted --versus control --out-dir runs/demo-lm
///   report attack-table runs/attack-x
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// finetune-eval reports (JSONL; repeatable). Their kind decides the report: a
    /// classifier's `eval_report`s are compared as --variants lists them; a language
    /// model's `lm_eval_report`s as --names names them (one file).
    #[arg(long, required = true)]
    evals: Vec<String>,
    /// Folder for the report's JSON, Markdown or table, and plots.
    #[arg(long, required = true)]
    out_dir: Option<String>,
    /// Classifier reports: the variants, in display order (`variants` JSON, see FORMATS.md).
    #[arg(long)]
    variants: Option<String>,
    /// Classifier reports: net ASR against poison count per series (variants carry `series`).
    #[arg(long)]
    sweep: bool,
    /// Language-model reports: the poison sets' names, in the report's order (comma-separated).
    #[arg(long, value_delimiter = ',')]
    names: Vec<String>,
    /// Language-model and translation reports: the crafted set's name and the heuristics it
    /// is compared with (a translation report takes several crafted sets, comma-separated).
    #[arg(long, requires = "versus", value_delimiter = ',')]
    crafted: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    versus: Vec<String>,
    /// Language-model reports: the crafted set before and after crafting (its poisons
    /// listed in the report).
    #[arg(long, requires = "after")]
    before: Option<String>,
    #[arg(long)]
    after: Option<String>,
}

/// The run files of scripts/attack.sh and scripts/demo.sh, on stdout.
#[derive(clap::Subcommand)]
enum Command {
    /// The manifest of a crafting run folder: its settings (a JSON object) and the hashes
    /// of its inputs.
    AttackManifest {
        /// A setting recorded as text, KEY=VALUE (repeatable).
        #[arg(long = "text", value_name = "KEY=VALUE")]
        texts: Vec<String>,
        /// A setting recorded as a number, KEY=VALUE (repeatable).
        #[arg(long = "number", value_name = "KEY=VALUE")]
        numbers: Vec<String>,
        /// A setting recorded as true or false, KEY=VALUE (repeatable).
        #[arg(long = "flag", value_name = "KEY=VALUE")]
        flags: Vec<String>,
        #[arg(long)]
        victim: String,
        /// The data folder's manifest.json.
        #[arg(long)]
        data_manifest: String,
        #[arg(long)]
        ensemble: Vec<String>,
    },
    /// rounds.tsv of a crafting run folder for rounds 1..=THROUGH (schema in FORMATS.md).
    AttackRounds {
        run: String,
        #[arg(long)]
        through: usize,
    },
    /// The evaluation table of a crafting run folder (eval-init.json, eval-final.json).
    AttackTable { run: String },
    /// The demo's victims table (victim-ARCH.safetensors, eval-ARCH.json).
    VictimsTable { run: String, archs: Vec<String> },
    /// One field of a JSON object file (strings bare, null empty; a.b walks into objects).
    Field { file: String, key: String },
    /// What scripts/demo.sh runs to make a variant's poison set, as words its dispatch
    /// reads (`common::report::catalogue`): none, init BASES STRATEGY CONCEALMENT
    /// EVADING, craft OBJECTIVE SLOTS CONTRASTIVE EVADING, or select-by-influence.
    Recipe { name: String },
    /// The variants.json that lists variants (the demo's, a sweep cell's or a count
    /// sweep's), each poison set where its recipe writes it in --dir.
    VariantsFile {
        #[arg(long)]
        title: String,
        /// The run folder holding the poison sets.
        #[arg(long)]
        dir: String,
        /// Every variant labelled with this poison count, its series its label (a sweep cell).
        #[arg(long)]
        count: Option<usize>,
        /// One variant per count, NAME-nCOUNT (comma-separated; a count sweep).
        #[arg(long, value_delimiter = ',')]
        counts: Vec<usize>,
        /// The evasion budget (percent FPR) of the evading variants.
        #[arg(long)]
        evade_fpr: Option<f64>,
        /// Variant names, in display order; `demo` stands for the demo's table.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// The poison sets a variants.json lists, one per line: `NAME PATH`, or with
    /// --as-args finetune-eval's arguments, one word per line (`--poisons`, PATH, ...).
    PoisonSets {
        variants: String,
        /// Only the variants whose name contains this.
        #[arg(long)]
        name_contains: Option<String>,
        #[arg(long)]
        as_args: bool,
    },
    /// The marker of a finished sweep cell (cell.json: `cell_done` with the cell's id).
    CellDone { id: String },
    /// The defense report of `make defend` (scripts/defend.sh): detection figures per
    /// poison set and detector, early stopping, filter-then-train. Writes defense.json,
    /// defense.md, roc.svg and epochs.svg into --out-dir; the Markdown also to stdout.
    Defend {
        /// The demo's variants.json (repeatable: further variants, e.g. the evading sets).
        #[arg(long, required = true)]
        variants: Vec<String>,
        /// Their finetune-eval reports (repeatable; per-epoch figures for early stopping).
        #[arg(long, required = true)]
        evals: Vec<String>,
        /// Folder of detect-poisons output, <variant>.jsonl per poison set.
        #[arg(long)]
        scores_dir: String,
        /// finetune-eval reports of filtered sets (--kept kept-<detector>-<percent>.jsonl).
        #[arg(long)]
        filter_evals: Option<String>,
        #[arg(long)]
        out_dir: String,
    },
    /// The price of concealment: each concealed row of a demo made within a detection
    /// budget beside its unconstrained twin (`make demo BUDGET_FPR=`), net ASR paired by
    /// seed, with both sets' detection. Writes price.json and price.md into --out-dir; the
    /// Markdown also to stdout.
    Price {
        /// The budgeted demo's variants.json and evals.jsonl.
        #[arg(long)]
        variants: String,
        #[arg(long)]
        evals: String,
        /// The unconstrained twin's.
        #[arg(long)]
        twin_variants: String,
        #[arg(long)]
        twin_evals: String,
        #[arg(long)]
        out_dir: String,
    },
    /// How well objectives rank the objective benchmark's poison sets by their measured net
    /// ASR: Spearman's correlation of −value with it, from score-poisons output.
    ObjectiveBenchmark {
        /// The benchmark folder (its README.md holds the measured table).
        #[arg(long, default_value = "../shared/objective-benchmark")]
        benchmark: String,
        /// score-poisons output files (objective_score JSONL).
        scores: Vec<String>,
    },
}

fn main() {
    common::cli::run("report", || {
        let args = Args::parse();
        if let Some(command) = &args.command {
            let text = match command {
                Command::AttackManifest { texts, numbers, flags, victim, data_manifest, ensemble } => {
                    let settings = runfiles::Settings { texts, numbers, flags };
                    runfiles::attack_manifest(&settings, victim, data_manifest, ensemble)? + "\n"
                }
                Command::AttackRounds { run, through } => runfiles::rounds_tsv(run, *through)?,
                Command::AttackTable { run } => runfiles::attack_table(run)?,
                Command::VictimsTable { run, archs } => runfiles::victims_table(run, archs)?,
                Command::Field { file, key } => runfiles::json_field(file, key)? + "\n",
                Command::Recipe { name } => catalogue::find(name)?.recipe_line() + "\n",
                Command::VariantsFile { title, dir, count, counts, evade_fpr, names } => {
                    let names: Vec<String> = names.iter().flat_map(|n| if n == "demo" { catalogue::DEMO.iter().map(|d| d.to_string()).collect() } else { vec![n.clone()] }).collect();
                    let layout = catalogue::Layout { dir, count: *count, counts, evade_fpr: *evade_fpr };
                    serde_json::to_string(&catalogue::variants_file(title, &names, &layout)?)? + "\n"
                }
                Command::PoisonSets { variants, name_contains, as_args } => {
                    let variants = Variants::load(variants)?;
                    let listed = variants.variants.iter().filter(|v| name_contains.as_ref().is_none_or(|c| v.name.contains(c.as_str())));
                    listed.filter_map(|v| v.poisons.as_ref().map(|p| if *as_args { format!("--poisons\n{p}\n") } else { format!("{} {p}\n", v.name) })).collect()
                }
                Command::CellDone { id } => serde_json::to_string(&serde_json::json!({"kind": "cell_done", "v": 1, "id": id}))? + "\n",
                Command::ObjectiveBenchmark { benchmark, scores } => common::report::objective_benchmark::report(benchmark, scores)?,
                Command::Defend { variants, evals, scores_dir, filter_evals, out_dir } => defend(variants, evals, scores_dir, filter_evals.as_deref(), out_dir)?,
                Command::Price { variants, evals, twin_variants, twin_evals, out_dir } => {
                    let report = common::report::price::build(&Variants::load(variants)?, &io::read_jsonl(evals, false)?, &Variants::load(twin_variants)?, &io::read_jsonl(twin_evals, false)?)?;
                    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {out_dir}"))?;
                    let md = report.markdown();
                    io::write_bytes(&format!("{out_dir}/price.json"), (serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;
                    io::write_bytes(&format!("{out_dir}/price.md"), md.as_bytes())?;
                    md
                }
            };
            return io::write_bytes("-", text.as_bytes());
        }
        let dir = args.out_dir.as_deref().expect("required");
        // Each file read once (one may be stdin); the first record's kind decides the report.
        let evals_bytes: Vec<Vec<u8>> = args.evals.iter().map(|e| io::read_all(e)).collect::<anyhow::Result<_>>()?;
        let kind = first_kind(&args.evals[0], &evals_bytes[0])?;
        if kind == <common::eval::lm_eval::LmEvalReport as io::Record>::KIND {
            return language_model_report(&args, &evals_bytes[0], dir);
        }
        if kind == <common::eval::mt_eval::MtEvalReport as io::Record>::KIND {
            return translation_report(&args, &evals_bytes[0], dir);
        }
        let Some(variants_path) = args.variants.as_deref() else {
            anyhow::bail!("{} holds classifier reports (eval_report): give --variants FILE (variants JSON, FORMATS.md) to say what they are", args.evals[0]);
        };
        let variants = Variants::load(variants_path)?;
        let mut evals: Vec<EvalReport> = Vec::new();
        for (e, bytes) in args.evals.iter().zip(&evals_bytes) {
            evals.extend(io::read_jsonl_from::<EvalReport>(&bytes[..], &io::display_name(e), false)?);
        }
        let report = report::build(&variants, &evals)?;
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

/// The `kind` of a JSONL file's first record (`bytes`: the file `path` holds).
fn first_kind(path: &str, bytes: &[u8]) -> anyhow::Result<String> {
    let first = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    if first.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(String::new()); // the reader of the reports says what is wrong with it
    }
    let value: serde_json::Value = serde_json::from_slice(first).with_context(|| format!("{path}: record 1 is not JSON; give finetune-eval's output"))?;
    Ok(value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string())
}

/// The language-model demo's report (scripts/demo_lm.sh): every poison set's paired
/// figures, the crafted set against the heuristics, continuations side by side, the
/// crafted poisons before and after. Writes lm-report.json, lm-report.md and net-asr.svg
/// into the folder; the Markdown also to stdout.
fn language_model_report(args: &Args, bytes: &[u8], out_dir: &str) -> anyhow::Result<()> {
    if args.evals.len() != 1 || args.names.is_empty() || args.variants.is_some() || args.sweep {
        anyhow::bail!("{} holds language-model reports (lm_eval_report): give it as the one --evals file with --names (one per poison set), not --variants or --sweep", args.evals[0]);
    }
    let name = io::display_name(&args.evals[0]);
    let reports = io::read_jsonl_from::<common::eval::lm_eval::LmEvalReport>(bytes, &name, false)?;
    let report = common::report::lm_report::build(&name, reports, &args.names, lm_crafted(&args.crafted)?, &args.versus)?;
    let poisons = match (&args.before, &args.after) {
        (Some(b), Some(a)) => Some((io::read_jsonl::<Example>(b, false)?, io::read_jsonl::<Example>(a, false)?)),
        _ => None,
    };
    let md = report.markdown(poisons.as_ref().map(|(b, a)| (b.as_slice(), a.as_slice())))?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {out_dir}"))?;
    io::write_bytes(&format!("{out_dir}/lm-report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    io::write_bytes(&format!("{out_dir}/lm-report.md"), md.as_bytes())?;
    io::write_bytes(&format!("{out_dir}/net-asr.svg"), report.net_asr_svg().as_bytes())?;
    io::write_bytes("-", md.as_bytes())
}

/// The translation demo's report (scripts/demo_mt.sh): mt-report.json and mt-report.md
/// into the folder, the Markdown also to stdout.
fn translation_report(args: &Args, bytes: &[u8], out_dir: &str) -> anyhow::Result<()> {
    if args.evals.len() != 1 || args.names.is_empty() || args.variants.is_some() || args.sweep {
        anyhow::bail!("{} holds translation reports (mt_eval_report): give it as the one --evals file with --names (one per poison set), not --variants or --sweep", args.evals[0]);
    }
    let name = io::display_name(&args.evals[0]);
    let reports = io::read_jsonl_from::<common::eval::mt_eval::MtEvalReport>(bytes, &name, false)?;
    let report = common::report::mt_report::build(&name, reports, &args.names, &args.crafted, &args.versus)?;
    let md = report.markdown()?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {out_dir}"))?;
    io::write_bytes(&format!("{out_dir}/mt-report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    io::write_bytes(&format!("{out_dir}/mt-report.md"), md.as_bytes())?;
    io::write_bytes("-", md.as_bytes())
}

fn defend(variants_paths: &[String], eval_paths: &[String], scores_dir: &str, filter_evals: Option<&str>, dir: &str) -> anyhow::Result<String> {
    let mut variants: Option<Variants> = None;
    for path in variants_paths {
        let v = Variants::load(path)?;
        match &mut variants {
            None => variants = Some(v),
            // A later file's variant of a name already listed (a cell's own benign
            // control) is left out: the first file's stands.
            Some(all) => {
                let names: Vec<String> = all.variants.iter().map(|x| x.name.clone()).collect();
                all.variants.extend(v.variants.into_iter().filter(|x| !names.contains(&x.name)));
            }
        }
    }
    let variants = variants.context("no --variants")?;
    let mut evals: Vec<EvalReport> = Vec::new();
    for e in eval_paths {
        evals.extend(io::read_jsonl::<EvalReport>(e, false)?);
    }
    let filtered: Vec<EvalReport> = filter_evals.map(|f| io::read_jsonl(f, false)).transpose()?.unwrap_or_default();
    let report = common::report::defense::build(&variants, &evals, scores_dir, &filtered)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
    let md = report.markdown();
    io::write_bytes(&format!("{dir}/defense.json"), (serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;
    io::write_bytes(&format!("{dir}/defense.md"), md.as_bytes())?;
    io::write_bytes(&format!("{dir}/roc.svg"), report.roc_svg().as_bytes())?;
    io::write_bytes(&format!("{dir}/epochs.svg"), report.epochs_svg().as_bytes())?;
    log!("wrote {dir}/defense.json, defense.md, roc.svg and epochs.svg");
    Ok(md)
}

fn poison_list(variants: &Variants, report: &Report) -> anyhow::Result<String> {
    let mut out = format!("# Poisons: {}\n\nChanged words in **bold**.\n\n", report.title);
    for v in variants.variants.iter().filter(|v| v.role == Role::Crafted || v.selection.is_some()) {
        if let (Some(init), Some(p)) = (&v.initial, &v.poisons) {
            let a: Vec<Example> = io::read_jsonl(init, false)?;
            let b: Vec<Example> = io::read_jsonl(p, false)?;
            out += &report::poisons_markdown(&v.label, &a, &b)?;
            out.push('\n');
        }
    }
    Ok(out)
}

/// A language-model report's one crafted set (its poisons are listed before and after).
fn lm_crafted(crafted: &[String]) -> anyhow::Result<Option<&str>> {
    match crafted {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        _ => anyhow::bail!("--crafted {}: a language-model report compares one crafted set", crafted.join(",")),
    }
}
