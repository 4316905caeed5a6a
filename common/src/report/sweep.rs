//! Sweeps: a grid of triggers × victims × poison counts, each cell an independent job that
//! writes only into its own folder (`make cell`, `scripts/demo.sh` in `MODE=cell`), and the merge of every finished
//! cell into one tidy table and plots. The `sweep` binary is wiring over this module; make
//! (`make sweep SPEC=...`) and Slurm (`scripts/slurm/`) run the cells.

use crate::eval::EvalReport;
use crate::io::{self, Record};
use crate::report::{self, Variants};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// A sweep spec (FORMATS.md): the axes of the grid.
///
/// ```json
/// {"kind": "sweep_spec", "v": 1, "name": "two-triggers",
///  "triggers": [{"phrase": "James Bond", "target": "positive"}, {"phrase": "Woody Allen", "target": "negative"}],
///  "victims": ["glove"], "counts": [10, 25, 50], "variants": ["confident", "hardness"], "seeds": 6}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    pub kind: String,
    pub v: u32,
    /// Names the sweep's folder, `runs/sweeps/NAME/`.
    pub name: String,
    pub triggers: Vec<TriggerSpec>,
    /// Victim presets (`presets/NAME.mk`).
    pub victims: Vec<String>,
    pub counts: Vec<usize>,
    /// Poison sets compared in every cell (`catalogue::sweepable`); the benign control is always added.
    pub variants: Vec<String>,
    /// Retraining seeds per cell (every variant of a cell shares them and its clean twins).
    pub seeds: usize,
    /// The seed of the data split, the attacked victim and the poisons.
    #[serde(default)]
    pub seed: u64,
    /// Extra make variables for every cell (e.g. `{"DEMO_ROUNDS": "1"}`), for small test sweeps.
    #[serde(default)]
    pub make: std::collections::BTreeMap<String, String>,
}

impl Record for SweepSpec {
    const KIND: &'static str = "sweep_spec";
    const VERSION: u32 = 1;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSpec {
    pub phrase: String,
    /// The target label's name or index, as prepare-data takes it.
    pub target: String,
}

/// One cell of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Stable id: `<trigger>-<target>-<victim>-n<count>` in lowercase letters, digits and `-`.
    pub id: String,
    pub trigger: TriggerSpec,
    pub victim: String,
    pub count: usize,
}

/// Lowercase letters and digits, everything else `-` (as the Makefile's SLUG).
pub fn slug(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect()
}

/// The id of a (trigger, target, victim) group: a cell's id without its count, and the
/// name of the group's merged table and plot.
fn group_id(trigger: &str, target: &str, victim: &str) -> String {
    format!("{}-{}-{}", slug(trigger), slug(target), slug(victim))
}

/// A make variable value safe inside single quotes.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl SweepSpec {
    pub fn load(path: &str) -> Result<SweepSpec> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        let spec: SweepSpec = io::parse_record(&text).with_context(|| path.to_string())?;
        spec.check().with_context(|| path.to_string())?;
        Ok(spec)
    }

    fn check(&self) -> Result<()> {
        if self.name.is_empty() || slug(&self.name) != self.name {
            bail!("name {:?}: use lowercase letters, digits and - (it names runs/sweeps/NAME)", self.name);
        }
        if self.triggers.is_empty() || self.victims.is_empty() || self.counts.is_empty() || self.variants.is_empty() {
            bail!("every axis (triggers, victims, counts, variants) needs at least one value");
        }
        if let Some(v) = self.variants.iter().find(|v| !crate::report::catalogue::sweepable().any(|c| c.name == v.as_str())) {
            let known: Vec<&str> = crate::report::catalogue::sweepable().map(|c| c.name).collect();
            bail!("variant {v:?}: expected one of {known:?}");
        }
        if self.counts.contains(&0) || self.seeds < 2 {
            bail!("counts must be at least 1 and seeds at least 2 (a confidence interval needs two)");
        }
        for victim in &self.victims {
            if !std::path::Path::new(&format!("presets/{victim}.mk")).is_file() {
                bail!("victim {victim:?}: there is no presets/{victim}.mk (run from the project's root)");
            }
        }
        if let Some(k) = self.make.keys().find(|k| !k.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')) {
            bail!("make variable {k:?}: expected an upper-case make variable name");
        }
        let mut ids: Vec<String> = self.cells().into_iter().map(|c| c.id).collect();
        ids.sort();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            bail!("two cells share an id; triggers must differ in their letters and digits");
        }
        Ok(())
    }

    /// The sweep's folder.
    pub fn dir(&self) -> String {
        format!("runs/sweeps/{}", self.name)
    }

    /// Every cell, triggers outermost, then victims, then counts.
    pub fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for t in &self.triggers {
            for v in &self.victims {
                for &n in &self.counts {
                    let id = format!("{}-n{n}", group_id(&t.phrase, &t.target, v));
                    cells.push(Cell { id, trigger: t.clone(), victim: v.clone(), count: n });
                }
            }
        }
        cells
    }

    pub fn cell_dir(&self, cell: &Cell) -> String {
        format!("{}/cells/{}", self.dir(), cell.id)
    }

    /// The make invocation that computes one cell with `threads` threads (run from the
    /// project's root). It skips a finished cell and resumes an interrupted one.
    pub fn make_command(&self, cell: &Cell, threads: usize) -> String {
        let mut cmd = format!(
            "make --no-print-directory cell CELL_DIR={} TRIGGER={} TARGET={} VICTIM={} COUNT={} SEED={} DEMO_SEEDS={} VARIANTS={} THREADS={threads}",
            quote(&self.cell_dir(cell)),
            quote(&cell.trigger.phrase),
            quote(&cell.trigger.target),
            quote(&cell.victim),
            cell.count,
            self.seed,
            self.seeds,
            quote(&self.variants.join(" ")),
        );
        for (k, v) in &self.make {
            cmd += &format!(" {k}={}", quote(v));
        }
        cmd
    }
}

/// A finished cell's record (`cell.json`, written last): what it computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellDone {
    pub kind: String,
    pub v: u32,
    pub id: String,
}

impl Record for CellDone {
    const KIND: &'static str = "cell_done";
    const VERSION: u32 = 1;
}

/// One row of the merged table: one variant of one cell under one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TidyRow {
    pub cell: String,
    pub trigger: String,
    pub target: String,
    pub victim: String,
    pub count: usize,
    pub variant: String,
    pub role: String,
    pub seed: u64,
    pub asr: f64,
    pub clean_asr: f64,
    pub net_asr: f64,
    pub fpr: f64,
    pub dfpr: f64,
    pub cacc: f64,
    pub dcacc: f64,
    /// The poison set's sha256 and the two victims' `params::fingerprint`s: the same
    /// cell computed elsewhere (another node, -j, thread count) is the same to the bit
    /// exactly when these are.
    pub poisons_sha256: String,
    pub fingerprint: String,
    pub clean_fingerprint: String,
    /// The most of the set's poisons any cheap detector flags at 1 % and at 5 % FPR, and
    /// the one that flags most at 1 % (`SetDetection::most_flagged`; empty without them).
    #[serde(default)]
    pub caught_at_1: Option<f64>,
    #[serde(default)]
    pub caught_at_5: Option<f64>,
    #[serde(default)]
    pub caught_by: String,
}

const CSV_HEADER: &str = "cell,trigger,target,victim,count,variant,role,seed,asr,clean_asr,net_asr,fpr,dfpr,cacc,dcacc,poisons_sha256,fingerprint,clean_fingerprint,caught_at_1,caught_at_5,caught_by";

impl TidyRow {
    fn csv(&self) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            q(&self.cell),
            q(&self.trigger),
            q(&self.target),
            q(&self.victim),
            self.count,
            q(&self.variant),
            q(&self.role),
            self.seed,
            self.asr,
            self.clean_asr,
            self.net_asr,
            self.fpr,
            self.dfpr,
            self.cacc,
            self.dcacc,
            self.poisons_sha256,
            self.fingerprint,
            self.clean_fingerprint,
            self.caught_at_1.map_or(String::new(), |x| x.to_string()),
            self.caught_at_5.map_or(String::new(), |x| x.to_string()),
            q(&self.caught_by)
        )
    }
}

/// What a merge produced: the tidy rows, the per-(trigger, victim) reports and the cells
/// that are missing or failed (with why).
pub struct Merged {
    pub rows: Vec<TidyRow>,
    pub groups: Vec<(String, report::Report)>,
    pub missing: Vec<(String, String)>,
}

/// Per poison count, each crafted variant minus each heuristic of the same cell, paired by
/// seed (mean ± 95% CI): "better" needs an interval that excludes zero.
fn paired_table(rows: &[TidyRow], group: &str) -> String {
    let in_group: Vec<&TidyRow> = rows.iter().filter(|r| group_id(&r.trigger, &r.target, &r.victim) == group).collect();
    let mut counts: Vec<usize> = in_group.iter().map(|r| r.count).collect();
    counts.sort_unstable();
    counts.dedup();
    let names = |role: &str| {
        let mut v: Vec<String> = in_group.iter().filter(|r| r.role == role).map(|r| r.variant.clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let (crafted, heuristics) = (names("crafted"), names("heuristic"));
    if crafted.is_empty() || heuristics.is_empty() {
        return String::new();
    }
    let mut out = String::from("\npaired differences of net ASR (same seeds and clean twins; mean ± 95% CI, points)\n\n| poisons |");
    let pairs: Vec<(&String, &String)> = crafted.iter().flat_map(|c| heuristics.iter().map(move |h| (c, h))).collect();
    for (c, h) in &pairs {
        out += &format!(" {c} − {h} |");
    }
    out += &format!("\n|---|{}\n", "---|".repeat(pairs.len()));
    for n in counts {
        out += &format!("| {n:>7} |");
        for (c, h) in &pairs {
            let of = |v: &str| -> Vec<(u64, f64)> { in_group.iter().filter(|r| r.count == n && r.variant == v).map(|r| (r.seed, r.net_asr)).collect() };
            let (a, b) = (of(c), of(h));
            let diffs: Vec<f64> = a.iter().filter_map(|(s, x)| b.iter().find(|(t, _)| t == s).map(|(_, y)| x - y)).collect();
            let cell = if diffs.is_empty() { "-".to_string() } else { crate::stats::summarize(&diffs).to_string() };
            out += &format!(" {cell:>14} |");
        }
        out.push('\n');
    }
    out
}

/// A finished cell's variants and evaluations, or why it is not usable.
fn read_cell(spec: &SweepSpec, cell: &Cell) -> Result<(Variants, Vec<EvalReport>)> {
    let dir = spec.cell_dir(cell);
    let done = format!("{dir}/cell.json");
    if !std::path::Path::new(&done).is_file() {
        bail!(if std::path::Path::new(&dir).is_dir() { "not finished (interrupted, failed or running; its log says which)" } else { "not started" });
    }
    let text = std::fs::read_to_string(format!("{dir}/variants.json")).context("variants.json")?;
    let variants: Variants = io::parse_record(&text).context("variants.json")?;
    let evals: Vec<EvalReport> = io::read_jsonl(&format!("{dir}/evals.jsonl"), false)?;
    Ok((variants, evals))
}

/// Reads every cell of a sweep: finished cells give rows and reports, the others are listed.
pub fn merge(spec: &SweepSpec) -> Result<Merged> {
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    let mut groups: Vec<(String, Variants, Vec<EvalReport>)> = Vec::new();
    for cell in spec.cells() {
        let (variants, evals) = match read_cell(spec, &cell) {
            Ok(x) => x,
            Err(e) => {
                missing.push((cell.id.clone(), format!("{e:#}")));
                continue;
            }
        };
        for v in &variants.variants {
            let Some(p) = &v.poisons else { continue };
            let e = evals.iter().find(|e| e.poisons.as_deref() == Some(p.as_str())).with_context(|| format!("{}: no evaluation of {p}", cell.id))?;
            let best = e.detection.as_ref().and_then(|d| d.most_flagged());
            for r in &e.seeds {
                let c = r.clean.context("a sweep cell's evaluation pairs every victim with its clean twin")?;
                let f = r.fingerprints.clone().with_context(|| format!("{}: an evaluation without victim fingerprints (made before them): delete the cell's evals.jsonl and run it again", cell.id))?;
                rows.push(TidyRow {
                    cell: cell.id.clone(),
                    trigger: cell.trigger.phrase.clone(),
                    target: cell.trigger.target.clone(),
                    victim: cell.victim.clone(),
                    count: cell.count,
                    variant: v.name.clone(),
                    role: format!("{:?}", v.role).to_lowercase(),
                    seed: r.seed,
                    asr: r.poisoned.asr,
                    clean_asr: c.asr,
                    net_asr: r.poisoned.asr - c.asr,
                    fpr: r.poisoned.fpr,
                    dfpr: r.poisoned.fpr - c.fpr,
                    cacc: r.poisoned.cacc,
                    dcacc: r.poisoned.cacc - c.cacc,
                    poisons_sha256: e.poisons_sha256.clone().unwrap_or_default(),
                    fingerprint: f.poisoned,
                    clean_fingerprint: f.clean,
                    caught_at_1: best.map(|b| b.1),
                    caught_at_5: best.map(|b| b.2),
                    caught_by: best.map_or(String::new(), |b| b.0.to_string()),
                });
            }
        }
        // Variant names are unique within a group: one per count.
        let mut variants = variants;
        for v in &mut variants.variants {
            v.name = format!("{}-n{}", v.name, cell.count);
        }
        let group = group_id(&cell.trigger.phrase, &cell.trigger.target, &cell.victim);
        match groups.iter_mut().find(|(g, _, _)| *g == group) {
            Some((_, v, e)) => {
                v.variants.extend(variants.variants);
                e.extend(evals);
            }
            None => {
                let title = format!("{} → {}, {} victim: net ASR by poison count", cell.trigger.phrase, cell.trigger.target, cell.victim);
                groups.push((group, Variants { title, ..variants }, evals));
            }
        }
    }
    let reports = groups
        .into_iter()
        .map(|(g, v, e)| report::build(&v, &e).with_context(|| format!("sweep group {g}")).map(|r| (g, r)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Merged { rows, groups: reports, missing })
}

/// Writes the merge into the sweep's folder: `results.jsonl` and `results.csv` (one row
/// per cell, variant and seed), per group `GROUP.md` (table), `GROUP.svg` (net ASR against
/// poison count, each variant a line with its CI band) and `GROUP.json` (the report), and
/// `missing.txt`. Returns the summary printed on stdout.
pub fn write(spec: &SweepSpec, merged: &Merged) -> Result<String> {
    let dir = spec.dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir}"))?;
    let mut jsonl = String::new();
    let mut csv = format!("{CSV_HEADER}\n");
    for r in &merged.rows {
        jsonl += &serde_json::to_string(r)?;
        jsonl.push('\n');
        csv += &r.csv();
        csv.push('\n');
    }
    io::write_bytes(&format!("{dir}/results.jsonl"), jsonl.as_bytes())?;
    io::write_bytes(&format!("{dir}/results.csv"), csv.as_bytes())?;
    let mut summary = String::new();
    for (g, r) in &merged.groups {
        let table = r.sweep_table() + &paired_table(&merged.rows, g);
        io::write_bytes(&format!("{dir}/{g}.md"), table.as_bytes())?;
        io::write_bytes(&format!("{dir}/{g}.svg"), r.sweep_svg().as_bytes())?;
        io::write_bytes(&format!("{dir}/{g}.json"), (serde_json::to_string_pretty(r)? + "\n").as_bytes())?;
        summary += &table;
        summary.push('\n');
    }
    let missing: String = merged.missing.iter().map(|(id, why)| format!("{id}\t{why}\n")).collect();
    io::write_bytes(&format!("{dir}/missing.txt"), missing.as_bytes())?;
    let total = spec.cells().len();
    summary += &format!("{} of {total} cells merged, {} rows: {dir}/results.csv, results.jsonl; plots {dir}/*.svg\n", total - merged.missing.len(), merged.rows.len());
    if !merged.missing.is_empty() {
        summary += &format!("missing or failed cells ({dir}/missing.txt):\n{missing}");
    }
    Ok(summary)
}
