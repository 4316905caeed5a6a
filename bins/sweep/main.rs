//! sweep: plans a grid of triggers × victims × poison counts as independent cells, and
//! merges the finished cells into one table and plots.

use clap::Parser;
use common::io;
use common::report::sweep::{self, SweepSpec};

/// Plans and merges sweeps (spec schema in FORMATS.md). A cell writes only into its own
/// folder, skips itself when finished and resumes when interrupted; make runs the cells
/// side by side (`make sweep SPEC=... -j N`), Slurm as a job array (`scripts/slurm/`).
///
/// Examples:
///   sweep plan sweeps/two-triggers.json              # one line per cell: id, make invocation
///   sweep plan sweeps/two-triggers.json --makefile   # the cells as make targets
///   sweep merge sweeps/two-triggers.json             # results.csv, plots, missing cells
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
enum Args {
    /// One line per cell: its stable id, a tab, and the make invocation that computes it.
    Plan {
        spec: String,
        /// Worker threads each cell may use (victims finetune-eval trains at once; each
        /// computation has one libtorch thread, so results do not depend on this).
        #[arg(long, default_value_t = 1, value_parser = common::cli::at_least_one)]
        threads: usize,
        /// Print a makefile with one target per cell (and `cells`, all of them) instead.
        #[arg(long)]
        makefile: bool,
        /// Only the cells not finished yet (no cell.json).
        #[arg(long)]
        pending: bool,
        /// Only the cells of this victim preset.
        #[arg(long)]
        victim: Option<String>,
    },
    /// The victim presets of a spec, one per line.
    Victims { spec: String },
    /// The sweep's folder (runs/sweeps/NAME).
    Dir { spec: String },
    /// Every finished cell into results.jsonl and results.csv, per trigger and victim a
    /// table and a plot; missing or failed cells are listed (exit 0 either way).
    Merge { spec: String },
}

fn main() {
    common::cli::run("sweep", || {
        match Args::parse() {
            Args::Plan { spec: path, threads, makefile, pending, victim } => {
                let spec = SweepSpec::load(&path)?;
                let cells: Vec<_> = spec
                    .cells()
                    .into_iter()
                    .filter(|c| victim.as_ref().is_none_or(|v| *v == c.victim))
                    .filter(|c| !pending || !std::path::Path::new(&format!("{}/cell.json", spec.cell_dir(c))).is_file())
                    .collect();
                let mut out = String::new();
                if makefile {
                    // Recipes run from the project's root; a cell's make is not a sub-make
                    // of this one (each cell is one job of the jobserver).
                    out += &format!("# Cells of {path} (sweep plan --makefile).\n.PHONY: cells\n");
                    out += &format!("cells: {}\n", cells.iter().map(|c| format!("{}/cell.json", spec.cell_dir(c))).collect::<Vec<_>>().join(" "));
                    for c in &cells {
                        out += &format!("{}/cell.json:\n\tMAKEFLAGS= {}\n", spec.cell_dir(c), spec.make_command(c, threads));
                    }
                } else {
                    for c in &cells {
                        out += &format!("{}\t{}\n", c.id, spec.make_command(c, threads));
                    }
                }
                io::write_bytes("-", out.as_bytes())
            }
            Args::Victims { spec } => io::write_bytes("-", SweepSpec::load(&spec)?.victims.join("\n").as_bytes()).and_then(|_| io::write_bytes("-", b"\n")),
            Args::Dir { spec } => io::write_bytes("-", format!("{}\n", SweepSpec::load(&spec)?.dir()).as_bytes()),
            Args::Merge { spec: path } => {
                let spec = SweepSpec::load(&path)?;
                let merged = sweep::merge(&spec)?;
                let summary = sweep::write(&spec, &merged)?;
                io::write_bytes("-", summary.as_bytes())
            }
        }
    })
}
