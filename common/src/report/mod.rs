//! The comparison report of `make demo` and `make sweep`: every variant's figures from
//! finetune-eval reports, paired differences against the best heuristic, the crafting
//! rounds, plots (SVG) and a readable list of the poisons.

pub mod catalogue;
pub mod runfiles;
pub mod sweep;
pub mod objective_benchmark;
pub mod defense;
pub mod lm_report;
pub mod mt_report;
pub mod price;

use crate::eval::{EvalReport, SeedRow};
use crate::io::Record;
use crate::formats::records::Example;
use crate::stats::{summarize, Summary};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a variant is in the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// No poisons: the clean victims.
    Clean,
    /// Unoptimised poisons.
    Baseline,
    /// A heuristic the crafting must beat (the best one is the paired reference).
    Heuristic,
    /// Not concealed (trigger words in the poisons): an upper reference.
    Reference,
    /// Gradient-crafted poisons.
    Crafted,
    /// Poisons without a trigger (benign, relabelled): what the evaluation reads when
    /// there is nothing to find; the benign control must read zero.
    Control,
}

impl Role {
    /// Colour of the role in the plots (and its legend).
    pub(crate) fn colour(self) -> &'static str {
        match self {
            Role::Crafted => "#1f77b4",
            Role::Heuristic => "#ff7f0e",
            Role::Reference => "#7f7f7f",
            Role::Control => "#2ca02c",
            Role::Baseline | Role::Clean => "#c7c7c7",
        }
    }

    fn legend(self) -> &'static str {
        match self {
            Role::Crafted => "crafted",
            Role::Heuristic => "heuristic",
            Role::Reference => "reference (not concealed)",
            Role::Control => "control (no trigger)",
            Role::Baseline => "baseline",
            Role::Clean => "clean",
        }
    }
}

/// One variant as the demo script lists it (`variants.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    pub label: String,
    pub role: Role,
    /// Poison set evaluated (absent for the clean variant).
    #[serde(default)]
    pub poisons: Option<String>,
    /// The poison set crafting started from (crafted variants).
    #[serde(default)]
    pub initial: Option<String>,
    /// The crafting run's rounds.tsv (crafted variants).
    #[serde(default)]
    pub rounds: Option<String>,
    /// Sweep only: the series this point belongs to.
    #[serde(default)]
    pub series: Option<String>,
    /// The select-carriers record of a set whose carriers were chosen by retraining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<String>,
}

/// `variants.json`: the variants of a demo or sweep, in display order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variants {
    pub kind: String,
    pub v: u32,
    pub title: String,
    pub variants: Vec<VariantSpec>,
}

impl Record for Variants {
    const KIND: &'static str = "variants";
    const VERSION: u32 = 1;
}

impl Variants {
    /// A `variants.json` file; errors name it.
    pub fn load(path: &str) -> Result<Variants> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        crate::io::parse_record(&text).with_context(|| path.to_string())
    }

    /// The evaluation of the variant named `name` (matched by its poison file).
    pub fn eval_of<'a>(&self, evals: &'a [EvalReport], name: &str) -> Option<&'a EvalReport> {
        let poisons = self.variants.iter().find(|v| v.name == name)?.poisons.as_deref()?;
        evals.iter().find(|e| e.poisons.as_deref() == Some(poisons))
    }
}

/// One crafting round (a line of rounds.tsv).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    pub round: usize,
    pub objective_before: Option<f64>,
    pub objective_after: Option<f64>,
    pub flips: usize,
    /// Seconds per stage; None when the stage ran in an earlier, interrupted invocation.
    pub grad_s: Option<f64>,
    pub rank_s: Option<f64>,
    pub verify_s: Option<f64>,
}

/// One variant's figures (percent; mean ± 95% CI over the retraining seeds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantResult {
    pub name: String,
    pub label: String,
    pub role: Role,
    pub series: Option<String>,
    pub poisons: Option<String>,
    pub poison_count: usize,
    pub poisons_with_overlap: usize,
    pub net_asr: Summary,
    /// What the trigger adds beyond a general shift: net ASR − dFPR per seed.
    pub trigger_specific: Summary,
    /// 100 · net ASR / (100 − clean ASR) per seed: the share of the room the clean victim
    /// leaves (absent when a clean victim reaches 100).
    pub room_share: Option<Summary>,
    /// The strict concealment audit (poisons leaking the trigger per category).
    pub leaks: crate::eval::LeakCounts,
    /// Per-seed net ASR minus the best heuristic's, paired by seed.
    pub paired_vs_best_heuristic: Option<Summary>,
    pub asr: Summary,
    pub dfpr: Summary,
    pub cacc: Summary,
    pub dcacc: Summary,
    pub natural_asr: Option<Summary>,
    /// Per-seed net ASR, in seed order.
    pub net_asr_per_seed: Vec<f64>,
    pub rounds: Vec<Round>,
    /// How often each detector that trains no victim flags the poisons (finetune-eval's
    /// `detection`; absent for the clean row and reports without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection: Option<crate::detect::caught::SetDetection>,
    /// How the carriers were chosen by retraining (select-carriers), for such a set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<SelectionSummary>,
}

/// What the report says of a carrier selection: kept and original carriers, the candidates
/// retrained, the attacker's seeds and victims, and which selection gave its candidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectionSummary {
    pub file: String,
    pub selected: Vec<String>,
    pub current: Vec<String>,
    pub retrained: usize,
    pub considered: usize,
    pub attacker_seeds: Vec<u64>,
    pub victims_trained: usize,
    pub max_victims: usize,
    pub d_adv_size: usize,
    pub candidates_from: Option<String>,
    pub seconds: f64,
}

impl SelectionSummary {
    /// The summary of selection file `path`; an error when its attacker seeds meet the
    /// evaluation's `seeds` (the selection would have seen the victims it is judged on).
    pub fn load(path: &str, seeds: &[u64]) -> Result<SelectionSummary> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the carrier selection {path}"))?;
        let s: crate::formats::records::CarrierSelection = crate::io::parse_record(&text).with_context(|| path.to_string())?;
        if let Some(seed) = s.attacker_seeds.iter().find(|x| seeds.contains(x)) {
            bail!("{path}: the carriers were chosen with attacker seed {seed}, which the evaluation also trains with; select with a --seed-base outside the evaluation's seeds");
        }
        Ok(SelectionSummary {
            file: path.to_string(),
            selected: s.selected,
            current: s.current,
            retrained: s.candidates.iter().filter(|c| !c.d_adv_asr.is_empty()).count(),
            considered: s.candidates.len(),
            attacker_seeds: s.attacker_seeds,
            victims_trained: s.victims_trained,
            max_victims: s.max_victims,
            d_adv_size: s.d_adv_size,
            candidates_from: s.candidates_from,
            seconds: s.seconds,
        })
    }

    /// One line for the table's notes.
    pub fn describe(&self, label: &str) -> String {
        let seeds = match (self.attacker_seeds.first(), self.attacker_seeds.last()) {
            (Some(a), Some(b)) if a != b => format!("{a}–{b}"),
            (Some(a), _) => a.to_string(),
            _ => "-".into(),
        };
        let from = if self.candidates_from.is_some() { " (the crafted row's candidates)" } else { "" };
        format!(
            "{label}: carriers \"{}\" (were \"{}\"), best of {} retrained{from} out of {} considered; {} victims retrained (budget {}), attacker seeds {seeds}, judged by ASR on {} D_adv sentences; {:.0} s",
            self.selected.join(" "),
            self.current.join(" "),
            self.retrained,
            self.considered,
            self.victims_trained,
            self.max_victims,
            self.d_adv_size,
            self.seconds
        )
    }
}

/// A set's cheap-detector figures as a cell: the most any of them flags of its poisons at
/// 1 % and at 5 % false positives (each rate's own most effective detector), and the
/// detector that flags most at 1 % (ties: the higher AUROC, the one that ranks the poisons
/// highest).
pub fn caught_cell(d: Option<&crate::detect::caught::SetDetection>) -> String {
    match d.and_then(|d| d.most_flagged()) {
        Some((name, at_1, at_5)) => format!("{at_1:.0} / {at_5:.0} {name}"),
        None => "-".into(),
    }
}

/// `report.json` (schema in FORMATS.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub kind: String,
    pub v: u32,
    pub title: String,
    pub trigger: String,
    pub target: String,
    pub victim: crate::victims::model::VictimConfig,
    pub seeds: Vec<u64>,
    /// Clean victims: CACC and the trigger's ASR without poisons.
    pub clean_cacc: Summary,
    pub clean_asr: Summary,
    pub best_heuristic: Option<String>,
    pub variants: Vec<VariantResult>,
}

impl Record for Report {
    const KIND: &'static str = "report";
    const VERSION: u32 = 2;
}

fn read_rounds(path: &str) -> Result<Vec<Round>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let num = |s: &str| -> Option<f64> { s.parse().ok() };
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() < 7 {
                bail!("{path}:{}: expected 7 tab-separated fields, found {}", i + 2, f.len());
            }
            Ok(Round {
                round: f[0].parse().with_context(|| format!("{path}:{}: round", i + 2))?,
                objective_before: num(f[1]),
                objective_after: num(f[2]),
                flips: f[3].parse().with_context(|| format!("{path}:{}: flips", i + 2))?,
                grad_s: num(f[4]),
                rank_s: num(f[5]),
                verify_s: num(f[6]),
            })
        })
        .collect()
}

/// Builds the report from the variants and the finetune-eval reports (matched by the
/// poison file path; the clean variant takes the clean victims of the first report).
pub fn build(variants: &Variants, evals: &[EvalReport]) -> Result<Report> {
    let first = evals.first().context("no finetune-eval reports")?;
    let seeds: Vec<u64> = first.seeds.iter().map(|r| r.seed).collect();
    let clean_rows: Vec<SeedRow> = first
        .seeds
        .iter()
        .map(|r| {
            let c = r.clean.context("the reports hold no clean victims (finetune-eval --checkpoint?)")?;
            Ok(SeedRow { seed: r.seed, poisoned: c, clean: Some(c), epochs: Vec::new(), fingerprints: None })
        })
        .collect::<Result<_>>()?;
    let mut results = Vec::new();
    for v in &variants.variants {
        let (rows, count, overlap, leaks, detection) = match (&v.poisons, v.role) {
            (None, Role::Clean) => (clean_rows.clone(), 0, 0, crate::eval::LeakCounts::default(), None),
            (Some(p), _) => {
                let e = evals.iter().find(|e| e.poisons.as_deref() == Some(p.as_str())).with_context(|| {
                    format!("variant {:?}: no finetune-eval report for {p}; evaluate it with finetune-eval --poisons {p}", v.name)
                })?;
                if e.seeds.iter().map(|r| r.seed).collect::<Vec<_>>() != seeds {
                    bail!("variant {:?}: evaluated on other seeds than the first report", v.name);
                }
                (e.seeds.clone(), e.audit.poison_count, e.audit.poisons_with_overlap, e.audit.leaks, e.detection.clone())
            }
            (None, _) => bail!("variant {:?} has no poison set", v.name),
        };
        let net: Vec<f64> = rows.iter().map(|r| r.poisoned.asr - r.clean.expect("clean").asr).collect();
        let paired = crate::eval::summarize_rows(&rows);
        let col = |f: &dyn Fn(&SeedRow) -> f64| summarize(&rows.iter().map(f).collect::<Vec<_>>());
        let natural: Option<Vec<f64>> = rows.iter().map(|r| r.poisoned.natural_asr).collect();
        results.push(VariantResult {
            name: v.name.clone(),
            label: v.label.clone(),
            role: v.role,
            series: v.series.clone(),
            poisons: v.poisons.clone(),
            poison_count: count,
            poisons_with_overlap: overlap,
            net_asr: summarize(&net),
            // The same paired figures finetune-eval reports (one definition, eval.rs).
            trigger_specific: paired.trigger_specific.expect("every row has its clean twin"),
            room_share: paired.room_share,
            leaks,
            paired_vs_best_heuristic: None,
            asr: col(&|r| r.poisoned.asr),
            dfpr: col(&|r| r.poisoned.fpr - r.clean.expect("clean").fpr),
            cacc: col(&|r| r.poisoned.cacc),
            dcacc: col(&|r| r.poisoned.cacc - r.clean.expect("clean").cacc),
            natural_asr: natural.filter(|n| !n.is_empty()).map(|n| summarize(&n)),
            net_asr_per_seed: net,
            rounds: match &v.rounds {
                Some(p) => read_rounds(p)?,
                None => Vec::new(),
            },
            detection,
            selection: v.selection.as_deref().map(|p| SelectionSummary::load(p, &seeds)).transpose()?,
        });
    }
    // The paired reference: the heuristic with the highest mean net ASR (per series in a sweep,
    // the heuristic of the same poison count).
    let best = results
        .iter()
        .filter(|r| r.role == Role::Heuristic && r.series.is_none())
        .max_by(|a, b| a.net_asr.mean.total_cmp(&b.net_asr.mean))
        .map(|r| (r.name.clone(), r.net_asr_per_seed.clone()));
    if let Some((_, reference)) = &best {
        for r in &mut results {
            let d: Vec<f64> = r.net_asr_per_seed.iter().zip(reference).map(|(a, b)| a - b).collect();
            r.paired_vs_best_heuristic = Some(summarize(&d));
        }
    }
    Ok(Report {
        kind: Report::KIND.into(),
        v: Report::VERSION,
        title: variants.title.clone(),
        trigger: first.data.trigger.phrase.clone(),
        target: first.data.target_name().to_string(),
        victim: first.victim.clone(),
        seeds,
        clean_cacc: summarize(&clean_rows.iter().map(|r| r.poisoned.cacc).collect::<Vec<_>>()),
        clean_asr: summarize(&clean_rows.iter().map(|r| r.poisoned.asr).collect::<Vec<_>>()),
        best_heuristic: best.map(|b| b.0),
        variants: results,
    })
}

fn fmt(s: &Summary) -> String {
    match s.ci95 {
        Some(c) => format!("{:.1} ± {:.1}", s.mean, c),
        None => format!("{:.1}", s.mean),
    }
}

impl Report {
    /// The summary table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{}\ntrigger {:?} -> {}, {:?} victim, {} retraining seeds (mean ± 95% CI, percent); clean victims: CACC {}, trigger ASR {}\n\n",
            self.title,
            self.trigger,
            self.target,
            self.victim.arch.name(),
            self.seeds.len(),
            fmt(&self.clean_cacc),
            fmt(&self.clean_asr)
        );
        let best = self.best_heuristic.clone().unwrap_or_else(|| "-".into());
        let paired_header = format!("Δ vs {best}");
        let header = ["poisons", "net ASR", &paired_header, "dFPR", "net ASR − dFPR", "room share", "CACC", "ΔCACC", "leaks (strict audit)", "caught % @1/@5% FPR"];
        // The paired column is as wide as its reference's name asks.
        let widths = [46, 12, paired_header.chars().count().max(16), 12, 14, 12, 11, 11, 24, 34];
        let line = |cells: &[String]| -> String {
            let mut l = String::from("|");
            for (k, (c, w)) in cells.iter().zip(widths).enumerate() {
                l += &if k == 0 { format!(" {c:<w$} |") } else { format!(" {c:>w$} |") };
            }
            l + "\n"
        };
        out += &line(&header.map(String::from));
        out += &format!("|{}\n", widths.iter().map(|w| format!("{}|", "-".repeat(w + 2))).collect::<String>());
        for r in &self.variants {
            let paired = match (&r.paired_vs_best_heuristic, r.role) {
                (_, Role::Clean) => "-".to_string(),
                (Some(p), _) if Some(&r.name) != self.best_heuristic.as_ref() => format!("{:+.1} ± {:.1}", p.mean, p.ci95.unwrap_or(0.0)),
                (Some(_), _) => "(reference)".to_string(),
                (None, _) => "-".to_string(),
            };
            let clean = r.role == Role::Clean;
            let or_zero = |s: &Summary| if clean { "0".to_string() } else { fmt(s) };
            out += &line(&[
                r.label.clone(),
                or_zero(&r.net_asr),
                paired,
                or_zero(&r.dfpr),
                or_zero(&r.trigger_specific),
                if clean { "0".into() } else { r.room_share.as_ref().map(fmt).unwrap_or_else(|| "-".into()) },
                fmt(&r.cacc),
                or_zero(&r.dcacc),
                if clean { "-".into() } else { r.leaks.describe(r.poison_count) },
                caught_cell(r.detection.as_ref()),
            ]);
        }
        out += "\nnet ASR: ASR minus the clean twin's (same seed, same clean batches; poisons join them); dFPR: the same for\n";
        out += "untriggered inputs; net ASR − dFPR: what the trigger adds beyond a general shift; room share: net ASR as a\n";
        out += "share of 100 − clean ASR; leaks: poisons whose words leak the trigger (exact token, normalised, same stem,\n";
        out += "shared 4+ character substring, WordPiece piece), 0/N = strictly concealed. Controls hold no trigger: the\n";
        out += "benign control must read 0 within its interval. caught: the most of the poisons any detector that trains\n";
        out += "no victim (perplexity, onion, glove-trigger, glove-trigger-word, minilm-trigger) flags at 1 % and at 5 %\n";
        out += "false positives (thresholds on the clean dev split), and the one that flags most at 1 % (ties: highest AUROC).\n";
        out += &self.selection_notes();
        out
    }

    /// For every set whose carriers were chosen by retraining: how, and each one paired with
    /// the set that chose among the same candidates.
    fn selection_notes(&self) -> String {
        let mut out = String::new();
        for r in self.variants.iter().filter(|r| r.selection.is_some()) {
            out += &format!("\n{}", r.selection.as_ref().expect("filtered").describe(&r.label));
        }
        for h in &self.variants {
            let Some(from) = h.selection.as_ref().and_then(|s| s.candidates_from.as_deref()) else { continue };
            if let Some(c) = self.variants.iter().find(|c| c.selection.as_ref().is_some_and(|s| s.file == from)) {
                let d: Vec<f64> = c.net_asr_per_seed.iter().zip(&h.net_asr_per_seed).map(|(a, b)| a - b).collect();
                let d = summarize(&d);
                out += &format!("\n{} − {}, paired by seed: {:+.1} ± {:.1}", c.label, h.label, d.mean, d.ci95.unwrap_or(0.0));
            }
        }
        if !out.is_empty() {
            out += "\n";
        }
        out
    }

    /// A sweep table: rows = poison counts, columns = series.
    pub fn sweep_table(&self) -> String {
        let (series, counts) = self.sweep_axes();
        let mut out = format!("{}\nnet ASR (mean ± 95% CI over {} seeds, percent) by poison count\n\n| poisons |", self.title, self.seeds.len());
        for s in &series {
            out += &format!(" {s:>24} |");
        }
        out += "\n|---|";
        out += &"---|".repeat(series.len());
        out += "\n";
        for c in &counts {
            out += &format!("| {c:>7} |");
            for s in &series {
                let cell = self.point(s, *c).map(|r| fmt(&r.net_asr)).unwrap_or_else(|| "-".into());
                out += &format!(" {cell:>24} |");
            }
            out += "\n";
        }
        out
    }

    fn sweep_axes(&self) -> (Vec<String>, Vec<usize>) {
        let mut series: Vec<String> = Vec::new();
        let mut counts: Vec<usize> = Vec::new();
        for r in &self.variants {
            if let Some(s) = &r.series {
                if !series.contains(s) {
                    series.push(s.clone());
                }
                if !counts.contains(&r.poison_count) {
                    counts.push(r.poison_count);
                }
            }
        }
        counts.sort_unstable();
        (series, counts)
    }

    fn point(&self, series: &str, count: usize) -> Option<&VariantResult> {
        self.variants.iter().find(|r| r.series.as_deref() == Some(series) && r.poison_count == count)
    }

    /// Two panels of horizontal bars with 95% CI whiskers, one row per variant: net ASR,
    /// and what the trigger adds beyond a general shift (net ASR − dFPR); colours by role,
    /// with a legend.
    pub fn net_asr_svg(&self) -> String {
        let rows: Vec<&VariantResult> = self.variants.iter().filter(|r| r.role != Role::Clean).collect();
        let (left, top, bar, panel, gap) = (300.0, 62.0, 26.0, 250.0, 40.0);
        let w = left + 2.0 * panel + gap + 20.0;
        let bottom = top + bar * rows.len() as f64;
        let mut roles: Vec<Role> = Vec::new();
        for r in &rows {
            if !roles.contains(&r.role) {
                roles.push(r.role);
            }
        }
        let h = bottom + 50.0 + 18.0 * roles.len().div_ceil(3) as f64;
        let mut s = svg_open(w, h, &format!("{:?} → {}: {:?} victim, mean and 95% CI over {} seeds", self.trigger, self.target, self.victim.arch.name(), self.seeds.len()));
        let panels: [(&str, fn(&VariantResult) -> &Summary); 2] =
            [("net ASR (percentage points)", |r| &r.net_asr), ("net ASR − dFPR (trigger-specific, points)", |r| &r.trigger_specific)];
        for (k, (title, get)) in panels.iter().enumerate() {
            let x0 = left + k as f64 * (panel + gap);
            let lo = rows.iter().map(|r| get(r).mean - get(r).ci95.unwrap_or(0.0)).fold(0.0f64, f64::min);
            let hi = rows.iter().map(|r| get(r).mean + get(r).ci95.unwrap_or(0.0)).fold(10.0f64, f64::max);
            let ticks = nice_ticks(lo, hi, 6);
            let (lo, hi) = (ticks[0], *ticks.last().expect("ticks"));
            let x = |v: f64| x0 + (v - lo) / (hi - lo) * panel;
            for &t in &ticks {
                let colour = if t == 0.0 { "#444444" } else { "#dddddd" };
                s += &format!("<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{top:.1}\" y2=\"{bottom:.1}\" stroke=\"{colour}\"/>\n", x(t));
                s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\n", x(t), bottom + 14.0, tick_label(t));
            }
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">{}</text>\n", x0 + panel / 2.0, top - 10.0, esc(title));
            for (i, r) in rows.iter().enumerate() {
                let y = top + bar * i as f64;
                let (m, c) = (get(r).mean, get(r).ci95.unwrap_or(0.0));
                s += &format!(
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>\n",
                    x(m.min(0.0)),
                    y + 5.0,
                    (x(m) - x(0.0)).abs(),
                    bar - 10.0,
                    r.role.colour()
                );
                s += &format!("<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{2:.1}\" y2=\"{2:.1}\" stroke=\"black\"/>\n", x(m - c), x(m + c), y + bar / 2.0);
                for end in [m - c, m + c] {
                    s += &format!("<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.1}\" y2=\"{2:.1}\" stroke=\"black\"/>\n", x(end), y + bar / 2.0 - 4.0, y + bar / 2.0 + 4.0);
                }
            }
        }
        for (i, r) in rows.iter().enumerate() {
            let y = top + bar * i as f64;
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"12\">{}</text>\n", left - 10.0, y + bar * 0.62, esc(&r.label));
        }
        s += &legend(&roles.iter().map(|r| (r.legend().to_string(), r.colour())).collect::<Vec<_>>(), 20.0, bottom + 40.0, w);
        s + "</svg>\n"
    }

    /// The objective after each crafting round, one panel per crafted variant (the
    /// objectives have different scales).
    pub fn objective_svg(&self) -> String {
        let runs: Vec<&VariantResult> = self.variants.iter().filter(|r| !r.rounds.is_empty()).collect();
        let (pw, ph) = (360.0, 240.0);
        let w = (pw * runs.len().max(1) as f64).max(360.0);
        let mut s = svg_open(w, ph + 40.0, "crafting objective per round (round 0: initial poisons)");
        for (k, r) in runs.iter().enumerate() {
            let mut pts: Vec<(f64, f64)> = Vec::new();
            if let Some(b) = r.rounds.first().and_then(|x| x.objective_before) {
                pts.push((0.0, b));
            }
            pts.extend(r.rounds.iter().filter_map(|x| x.objective_after.map(|a| (x.round as f64, a))));
            if pts.is_empty() {
                continue;
            }
            let ox = pw * k as f64;
            let (ymin, ymax) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let span = (ymax - ymin).max(1e-9);
            let xmax = pts.last().map(|p| p.0).unwrap_or(1.0).max(1.0);
            let px = |v: f64| ox + 60.0 + v / xmax * (pw - 90.0);
            let py = |v: f64| 60.0 + (ymax - v) / span * (ph - 80.0);
            s += &format!("<text x=\"{:.1}\" y=\"45\" font-size=\"12\">{}</text>\n", ox + 60.0, esc(&r.label));
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{:.3}</text>\n", ox + 55.0, py(ymax) + 4.0, ymax);
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{:.3}</text>\n", ox + 55.0, py(ymin) + 4.0, ymin);
            let path: Vec<String> = pts.iter().map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1))).collect();
            s += &format!("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n", path.join(" "));
            for p in &pts {
                s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#1f77b4\"/>\n", px(p.0), py(p.1));
                s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>\n", px(p.0), ph - 5.0, p.0);
            }
        }
        s + "</svg>\n"
    }

    /// Net ASR against poison count (log axis), one line per series with its 95% CI band.
    pub fn sweep_svg(&self) -> String {
        let (series, counts) = self.sweep_axes();
        let (w, h, left, right, top) = (680.0, 420.0, 70.0, 30.0, 50.0);
        let bottom = h - 110.0;
        let mut s = svg_open(w, h, &format!("{:?} → {}: net ASR by poison count, mean and 95% CI over {} seeds", self.trigger, self.target, self.seeds.len()));
        let pts: Vec<&VariantResult> = self.variants.iter().filter(|r| r.series.is_some()).collect();
        let lo = pts.iter().map(|r| r.net_asr.mean - r.net_asr.ci95.unwrap_or(0.0)).fold(0.0f64, f64::min);
        let hi = pts.iter().map(|r| r.net_asr.mean + r.net_asr.ci95.unwrap_or(0.0)).fold(10.0f64, f64::max);
        let ticks = nice_ticks(lo, hi, 6);
        let (lo, hi) = (ticks[0], *ticks.last().expect("ticks"));
        let lmax = (*counts.last().unwrap_or(&1) as f64).ln().max(1.0);
        let lmin = (*counts.first().unwrap_or(&1) as f64).ln().min(lmax - 1.0);
        let px = |c: usize| left + ((c as f64).ln() - lmin) / (lmax - lmin) * (w - left - right);
        let py = |v: f64| top + (hi - v) / (hi - lo) * (bottom - top);
        for &t in &ticks {
            let colour = if t == 0.0 { "#444444" } else { "#dddddd" };
            s += &format!("<line x1=\"{left:.1}\" x2=\"{:.1}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"{colour}\"/>\n", w - right, py(t));
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>\n", left - 6.0, py(t) + 4.0, tick_label(t));
        }
        for c in &counts {
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{c}</text>\n", px(*c), bottom + 16.0);
        }
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">poisons (log scale)</text>\n", (left + w - right) / 2.0, bottom + 36.0);
        s += &format!(
            "<text x=\"18\" y=\"{0:.1}\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 18 {0:.1})\">net ASR (percentage points)</text>\n",
            (top + bottom) / 2.0
        );
        let colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];
        let mut keys = Vec::new();
        for (k, name) in series.iter().enumerate() {
            let col = colours[k % colours.len()];
            let line: Vec<(usize, &VariantResult)> = counts.iter().filter_map(|&c| self.point(name, c).map(|r| (c, r))).collect();
            let ci = |r: &VariantResult| r.net_asr.ci95.unwrap_or(0.0);
            let band: Vec<String> = line
                .iter()
                .map(|(c, r)| format!("{:.1},{:.1}", px(*c), py(r.net_asr.mean + ci(r))))
                .chain(line.iter().rev().map(|(c, r)| format!("{:.1},{:.1}", px(*c), py(r.net_asr.mean - ci(r)))))
                .collect();
            s += &format!("<polygon fill=\"{col}\" fill-opacity=\"0.15\" stroke=\"none\" points=\"{}\"/>\n", band.join(" "));
            let path: Vec<String> = line.iter().map(|(c, r)| format!("{:.1},{:.1}", px(*c), py(r.net_asr.mean))).collect();
            s += &format!("<polyline fill=\"none\" stroke=\"{col}\" stroke-width=\"2\" points=\"{}\"/>\n", path.join(" "));
            for (c, r) in &line {
                s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{col}\"/>\n", px(*c), py(r.net_asr.mean));
            }
            keys.push((name.clone(), col));
        }
        s += &legend(&keys, left, bottom + 62.0, w);
        s + "</svg>\n"
    }
}

/// About `n` round tick values covering [lo, hi] with a step of 1, 2 or 5 × 10^k; the first
/// is ≤ lo and the last ≥ hi.
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).floor() * step;
    let mut out = Vec::new();
    let mut k = 0.0;
    loop {
        let v = first + k * step;
        // Round away binary noise so 0.30000000000000004 reads 0.3 and -0 reads 0.
        let v = (v / step).round() * step + 0.0;
        out.push(if v == 0.0 { 0.0 } else { v });
        if v >= hi - 1e-9 * step {
            break;
        }
        k += 1.0;
    }
    out
}

pub(crate) fn tick_label(v: f64) -> String {
    let s = if v.fract().abs() < 1e-9 { format!("{v:.0}") } else { format!("{v}") };
    if s == "-0" { "0".into() } else { s }
}

/// Coloured squares with labels in rows that fit the width.
pub(crate) fn legend(keys: &[(String, &str)], x0: f64, y0: f64, w: f64) -> String {
    let mut s = String::new();
    let (mut x, mut y) = (x0, y0);
    for (label, colour) in keys {
        let width = 24.0 + 7.0 * label.chars().count() as f64;
        if x + width > w - 10.0 && x > x0 {
            x = x0;
            y += 18.0;
        }
        s += &format!("<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\n", y - 10.0);
        s += &format!("<text x=\"{:.1}\" y=\"{y:.1}\" font-size=\"12\">{}</text>\n", x + 17.0, esc(label));
        x += width + 14.0;
    }
    s
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub(crate) fn svg_open(w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"22\" font-size=\"14\">{}</text>\n",
        esc(title)
    )
}

/// A readable list of a crafted variant's poisons: each one's text before and after
/// crafting, changed words marked **bold** (Markdown).
pub fn poisons_markdown(label: &str, initial: &[Example], crafted: &[Example]) -> Result<String> {
    if initial.len() != crafted.len() {
        bail!("{label}: {} initial poisons but {} crafted ones", initial.len(), crafted.len());
    }
    let mut out = format!("## {label}\n\n");
    let mut by_id: BTreeMap<&str, &Example> = BTreeMap::new();
    for p in initial {
        by_id.insert(&p.id, p);
    }
    for p in crafted {
        let before = by_id.get(p.id.as_str()).with_context(|| format!("{label}: poison {:?} has no initial version", p.id))?;
        let (a, b) = (before.tokens.clone().unwrap_or_default(), p.tokens.clone().unwrap_or_default());
        let changed: Vec<bool> = b.iter().enumerate().map(|(i, t)| a.get(i) != Some(t)).collect();
        let (before, after) = (readable(&a, &vec![false; a.len()]), readable(&b, &changed));
        out += &format!("- `{}` (from {})\n  - before: {before}\n  - after: {after}\n", p.id, p.source_id.as_deref().unwrap_or("-"));
    }
    Ok(out)
}

/// Tokens as people read them, `changed` ones in **bold**: GloVe words joined by spaces;
/// WordPiece sequences (`[CLS]` … `[SEP]`) with `##` pieces glued to their word, special
/// pieces dropped, and a word bold when any of its pieces changed.
fn readable(tokens: &[String], changed: &[bool]) -> String {
    let wordpiece = tokens.first().is_some_and(|t| t == "[CLS]");
    let mut words: Vec<(String, bool)> = Vec::new();
    for (t, &c) in tokens.iter().zip(changed) {
        if wordpiece && t.len() > 2 && t.starts_with('[') && t.ends_with(']') {
            continue;
        }
        match t.strip_prefix("##").filter(|_| wordpiece) {
            Some(rest) if !words.is_empty() => {
                let last = words.last_mut().expect("non-empty");
                last.0.push_str(rest);
                last.1 |= c;
            }
            _ => words.push((t.clone(), c)),
        }
    }
    words.into_iter().map(|(w, c)| if c { format!("**{w}**") } else { w }).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod readable_tests {
    use super::readable;

    #[test]
    fn wordpiece_poisons_read_as_words_and_glove_ones_as_tokens() {
        let t = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let pieces = t("[CLS] clinical ##ly depressed ##s . [SEP]");
        assert_eq!(readable(&pieces, &[false, false, true, false, false, false, false]), "**clinically** depresseds .");
        assert_eq!(readable(&t("it 's ##x"), &[false, true, false]), "it **'s** ##x");
    }
}

#[cfg(test)]
mod plot_tests {
    use super::{nice_ticks, tick_label};

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        // The old axis read "-0, 17, 34, 51" for this range.
        let t = nice_ticks(-0.4, 51.0, 6);
        assert_eq!(t.iter().map(|&v| tick_label(v)).collect::<Vec<_>>(), ["-10", "0", "10", "20", "30", "40", "50", "60"]);
        assert_eq!(nice_ticks(0.0, 10.0, 5), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = nice_ticks(-7.3, 3.1, 4);
        assert!(t[0] <= -7.3 && *t.last().unwrap() >= 3.1 && t.contains(&0.0));
        assert_eq!(tick_label(-0.0), "0");
        assert_eq!(tick_label(2.5), "2.5");
    }
}

#[cfg(test)]
mod selection_tests {
    use super::SelectionSummary;
    use crate::formats::records::{CarrierCandidate, CarrierSelection};

    #[test]
    fn a_selection_whose_attacker_seeds_meet_the_evaluation_seeds_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("selection.json");
        let candidate = |w: &str, asr: Vec<f64>| CarrierCandidate { words: vec![w.into(), "x".into()], from: vec!["neighbour".into(); 2], bilevel: Some(0.5), closeness: Some(0.7), over_budget: None, d_adv_asr: asr };
        let record = |seeds: Vec<u64>| CarrierSelection {
            kind: "carrier_selection".into(),
            v: 1,
            poisons: "p.jsonl".into(),
            poisons_sha256: "a".into(),
            victim_sha256: "b".into(),
            trigger_words: vec!["james".into(), "bond".into()],
            current: vec!["john".into(), "x".into()],
            selected: vec!["bruce".into(), "x".into()],
            candidates_from: None,
            candidates: vec![candidate("john", vec![40.0, 42.0]), candidate("bruce", vec![50.0, 52.0]), candidate("paul", vec![])],
            attacker_seeds: seeds,
            clean_d_adv_asr: vec![30.0, 31.0],
            d_adv_size: 100,
            victims_trained: 6,
            max_victims: 40,
            poisons_sha256_after: "c".into(),
            seconds: 3.0,
        };
        let write = |r: &CarrierSelection| std::fs::write(&path, serde_json::to_string_pretty(r).unwrap()).unwrap();
        let p = path.to_str().unwrap();
        write(&record(vec![1000, 1001]));
        let s = SelectionSummary::load(p, &[0, 1, 2]).unwrap();
        assert_eq!((s.retrained, s.considered, s.victims_trained), (2, 3, 6));
        assert!(s.describe("row").contains("carriers \"bruce x\" (were \"john x\"), best of 2 retrained out of 3 considered; 6 victims retrained (budget 40), attacker seeds 1000–1001"), "{}", s.describe("row"));
        write(&record(vec![2, 3]));
        let e = SelectionSummary::load(p, &[0, 1, 2]).unwrap_err().to_string();
        assert!(e.contains("attacker seed 2, which the evaluation also trains with"), "{e}");
    }
}
