//! The defense report of `make defend`: how well each detector finds each poison set of a
//! demo (AUROC, TPR at 1% and 5% FPR, the share to inspect to catch 50% and 90%, ROC
//! curves), what early stopping on the dev split leaves of the attack, and what filtering
//! the most suspicious examples before training leaves (net ASR, ΔCACC).

use crate::detect::metrics::{auroc, inspect_to_catch, roc_curve, tpr_at_fpr, RocPoint};
use crate::detect::DetectionScore;
use crate::eval::EvalReport;
use crate::formats::records::Example;
use crate::report::{esc, legend, nice_ticks, svg_open, tick_label, Role, Variants};
use crate::stats::{summarize, Summary};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// One detector on one poison set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub auroc: f64,
    pub tpr_at_1: f64,
    pub tpr_at_5: f64,
    /// Share of the training set inspected in score order to catch 50% / 90% of poisons.
    pub inspect_50: f64,
    pub inspect_90: f64,
    /// The ROC curve on a log-spaced FPR grid (the best TPR at FPR ≤ each grid value).
    pub roc: Vec<RocPoint>,
}

/// Every detector on one poison set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetDetection {
    pub name: String,
    pub label: String,
    pub role: Role,
    pub poisons: usize,
    pub examples: usize,
    pub detectors: BTreeMap<String, Detection>,
}

/// Early stopping on the dev split, for one poison set: per seed the defender stops at
/// the epoch where the poisoned victim's dev accuracy peaks (the earliest of ties).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    pub name: String,
    pub label: String,
    pub role: Role,
    pub stop_epoch: Summary,
    /// Net ASR (against the clean twin at the same epoch) at the stopping epoch and at the end.
    pub net_asr_at_stop: Summary,
    pub net_asr_at_end: Summary,
    pub cacc_at_stop: Summary,
    pub cacc_at_end: Summary,
    /// Net ASR and the poisoned victims' CACC after every epoch.
    pub net_asr_per_epoch: Vec<Summary>,
    pub cacc_per_epoch: Vec<Summary>,
}

/// Filter-then-train: one detector removing a share of one poisoned training set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Filtering {
    pub set: String,
    pub label: String,
    pub detector: String,
    pub remove_percent: f64,
    pub poisons_removed: usize,
    pub poisons: usize,
    pub clean_removed: usize,
    /// Against the unfiltered clean twin: what the attack keeps and what filtering costs.
    pub net_asr: Summary,
    pub dcacc: Summary,
    /// Filtered minus unfiltered net ASR on the same seeds (both paired with the same twin).
    pub net_asr_change: Option<Summary>,
}

/// An evading poison set beside the same set crafted without the budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evasion {
    pub name: String,
    pub label: String,
    /// The variant it is the evading version of.
    pub unconstrained: String,
    pub net_asr: Summary,
    pub unconstrained_net_asr: Summary,
    /// Evading minus unconstrained net ASR, paired by seed (the cost of evading).
    pub cost: Option<Summary>,
    /// Detector → (AUROC of the evading set, AUROC of the unconstrained set).
    pub auroc: BTreeMap<String, (f64, f64)>,
}

/// `defense.json` (schema in FORMATS.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefenseReport {
    pub kind: String,
    pub v: u32,
    pub title: String,
    pub detection: Vec<SetDetection>,
    pub early_stopping: Vec<EarlyStopping>,
    pub filtering: Vec<Filtering>,
    pub evasion: Vec<Evasion>,
}

const KIND: &str = "defense_report";

/// The grid the ROC curves are kept on: 10^-4 … 1, 12 points a decade.
fn fpr_grid() -> Vec<f64> {
    (0..=48).map(|k| 10f64.powf(-4.0 + k as f64 / 12.0)).collect()
}

fn thin(roc: &[RocPoint]) -> Vec<RocPoint> {
    fpr_grid()
        .into_iter()
        .map(|g| RocPoint { fpr: g, tpr: roc.iter().filter(|p| p.fpr <= g + 1e-12).map(|p| p.tpr).fold(0.0, f64::max) })
        .collect()
}

/// The detection figures of one scored training set, given which ids are poisons.
pub fn detection_of(scores: &[DetectionScore], poison_ids: &HashSet<String>, source: &str) -> Result<(usize, BTreeMap<String, Detection>)> {
    let is_poison: Vec<bool> = scores.iter().map(|s| poison_ids.contains(&s.id)).collect();
    let found = is_poison.iter().filter(|&&p| p).count();
    if found != poison_ids.len() {
        bail!("{source}: {found} of the {} poisons are among the scored examples; score the training set with its poisons (cat train.jsonl poisons.jsonl | detect-poisons ...)", poison_ids.len());
    }
    let mut out = BTreeMap::new();
    let detectors: Vec<String> = scores.first().map(|s| s.scores.keys().cloned().collect()).unwrap_or_default();
    for d in detectors {
        let col: Vec<f64> = scores.iter().map(|s| s.scores.get(&d).copied().with_context(|| format!("{source}: record {} lacks {d}", s.index + 1))).collect::<Result<_>>()?;
        let (Some(a), Some(t1), Some(t5), Some(i50), Some(i90)) = (
            auroc(&col, &is_poison),
            tpr_at_fpr(&col, &is_poison, 0.01),
            tpr_at_fpr(&col, &is_poison, 0.05),
            inspect_to_catch(&col, &is_poison, 0.5),
            inspect_to_catch(&col, &is_poison, 0.9),
        ) else {
            bail!("{source}: needs both poisons and clean examples");
        };
        out.insert(d, Detection { auroc: a, tpr_at_1: t1, tpr_at_5: t5, inspect_50: i50, inspect_90: i90, roc: thin(&roc_curve(&col, &is_poison)) });
    }
    Ok((found, out))
}

/// Early stopping from an evaluation report with per-epoch figures.
fn early_stopping(e: &EvalReport, name: &str, label: &str, role: Role) -> Option<EarlyStopping> {
    let mut stop = Vec::new();
    let (mut at_stop, mut at_end, mut cacc_stop, mut cacc_end) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in &e.seeds {
        let epochs = &r.epochs;
        let last = epochs.last()?;
        let best = epochs.iter().enumerate().max_by(|a, b| a.1.poisoned.dev.unwrap_or(0.0).total_cmp(&b.1.poisoned.dev.unwrap_or(0.0)).then(b.0.cmp(&a.0)))?.1;
        stop.push(best.epoch as f64);
        at_stop.push(best.poisoned.asr - best.clean?.asr);
        at_end.push(last.poisoned.asr - last.clean?.asr);
        cacc_stop.push(best.poisoned.cacc);
        cacc_end.push(last.poisoned.cacc);
    }
    if stop.is_empty() {
        return None;
    }
    Some(EarlyStopping {
        name: name.into(),
        label: label.into(),
        role,
        stop_epoch: summarize(&stop),
        net_asr_at_stop: summarize(&at_stop),
        net_asr_at_end: summarize(&at_end),
        cacc_at_stop: summarize(&cacc_stop),
        cacc_at_end: summarize(&cacc_end),
        net_asr_per_epoch: e.epochs.iter().filter_map(|s| s.net_asr).collect(),
        cacc_per_epoch: e.epochs.iter().map(|s| s.cacc).collect(),
    })
}

/// Builds the report: `scores_dir/<variant>.jsonl` holds detect-poisons output for each
/// variant's training set; `filter_evals` are finetune-eval reports made with --kept
/// files named `kept-<detector>-<percent>.jsonl`.
pub fn build(variants: &Variants, evals: &[EvalReport], scores_dir: &str, filter_evals: &[EvalReport]) -> Result<DefenseReport> {
    let mut seen = HashSet::new();
    if let Some(v) = variants.variants.iter().find(|v| !seen.insert(v.name.as_str())) {
        bail!("two variants are named {:?}; the scores are found by name", v.name);
    }
    let mut detection = Vec::new();
    let mut early = Vec::new();
    let eval_of = |poisons: &str| evals.iter().find(|e| e.poisons.as_deref() == Some(poisons));
    for v in &variants.variants {
        let Some(poisons) = &v.poisons else { continue };
        let path = format!("{scores_dir}/{}.jsonl", v.name);
        if std::path::Path::new(&path).exists() {
            let scores: Vec<DetectionScore> = crate::io::read_jsonl(&path, false)?;
            let ids: HashSet<String> = crate::io::read_jsonl::<Example>(poisons, false)?.into_iter().map(|e| e.id).collect();
            let (found, detectors) = detection_of(&scores, &ids, &path)?;
            detection.push(SetDetection { name: v.name.clone(), label: v.label.clone(), role: v.role, poisons: found, examples: scores.len(), detectors });
        }
        if let Some(e) = eval_of(poisons).and_then(|e| early_stopping(e, &v.name, &v.label, v.role)) {
            early.push(e);
        }
    }
    let mut filtering = Vec::new();
    for f in filter_evals {
        let filter = f.filter.as_ref().context("a --filter-evals report without a filter (finetune-eval --kept)")?;
        let stem = std::path::Path::new(&filter.kept).file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let (detector, percent) = stem
            .strip_prefix("kept-")
            .and_then(|s| s.rsplit_once('-'))
            .and_then(|(d, p)| Some((d.to_string(), p.parse::<f64>().ok()?)))
            .with_context(|| format!("{}: a kept file named kept-<detector>-<percent>.jsonl", filter.kept))?;
        let poisons = f.poisons.as_deref().unwrap_or_default();
        let v = variants.variants.iter().find(|v| v.poisons.as_deref() == Some(poisons)).with_context(|| format!("{poisons}: not a variant of the demo"))?;
        let s = &f.summary;
        let change = eval_of(poisons).and_then(|u| crate::eval::paired_net_asr_difference(&f.seeds, &u.seeds));
        filtering.push(Filtering {
            set: v.name.clone(),
            label: v.label.clone(),
            detector,
            remove_percent: percent,
            poisons_removed: filter.poisons_removed,
            poisons: f.audit.poison_count,
            clean_removed: filter.clean_removed,
            net_asr: s.net_asr.context("filter evaluation without clean twins")?,
            dcacc: s.dcacc.context("filter evaluation without clean twins")?,
            net_asr_change: change,
        });
    }
    let mut evasion = Vec::new();
    // An evading variant is named <unconstrained name>-evading[-<budget>].
    for v in variants.variants.iter().filter(|v| v.name.contains("-evading")) {
        let base = v.name.split("-evading").next().unwrap_or_default();
        let find = |name: &str| variants.eval_of(evals, name);
        let (Some(e), Some(b)) = (find(&v.name), find(base)) else { continue };
        let auroc_of = |name: &str| detection.iter().find(|d| d.name == name).map(|d| d.detectors.iter().map(|(k, x)| (k.clone(), x.auroc)).collect::<BTreeMap<_, _>>());
        let auroc = match (auroc_of(&v.name), auroc_of(base)) {
            (Some(a), Some(b)) => a.iter().filter_map(|(k, x)| Some((k.clone(), (*x, *b.get(k)?)))).collect(),
            _ => BTreeMap::new(),
        };
        evasion.push(Evasion {
            name: v.name.clone(),
            label: v.label.clone(),
            unconstrained: base.to_string(),
            net_asr: e.summary.net_asr.context("evading set evaluated without clean twins")?,
            unconstrained_net_asr: b.summary.net_asr.context("evaluation without clean twins")?,
            cost: crate::eval::paired_net_asr_difference(&e.seeds, &b.seeds),
            auroc,
        });
    }
    Ok(DefenseReport { kind: KIND.into(), v: 1, title: variants.title.clone(), detection, early_stopping: early, filtering, evasion })
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

impl DefenseReport {
    /// The report as Markdown tables.
    pub fn markdown(&self) -> String {
        let mut out = format!("# Defenses: {}\n\n", self.title);
        let detectors: Vec<String> = self.detection.first().map(|d| d.detectors.keys().cloned().collect()).unwrap_or_default();
        let table = |title: &str, note: &str, get: &dyn Fn(&Detection) -> String| {
            let mut t = format!("## {title}\n\n{note}\n\n| poisons | {} |\n|---|{}\n", detectors.join(" | "), "---|".repeat(detectors.len()));
            for s in &self.detection {
                let cells: Vec<String> = detectors.iter().map(|d| s.detectors.get(d).map(get).unwrap_or_else(|| "-".into())).collect();
                t += &format!("| {} | {} |\n", s.label, cells.join(" | "));
            }
            t + "\n"
        };
        out += &table("AUROC", "Probability that a poison scores above a clean example (0.5: the detector sees nothing; the benign control must read about 0.5).", &|d| format!("{:.3}", d.auroc));
        out += &table("TPR at 1% FPR (percent)", "Poisons flagged when 1% of the clean examples may be.", &|d| pct(d.tpr_at_1));
        out += &table("TPR at 5% FPR (percent)", "Poisons flagged when 5% of the clean examples may be.", &|d| pct(d.tpr_at_5));
        out += &table("Inspect to catch 50% (percent of the training set)", "Share of the set a defender reads, most suspicious first, to find half the poisons (ties: clean first).", &|d| pct(d.inspect_50));
        out += &table("Inspect to catch 90% (percent of the training set)", "The same for 90% of the poisons.", &|d| pct(d.inspect_90));
        if !self.early_stopping.is_empty() {
            out += "## Early stopping\n\nPer seed the defender stops where the poisoned victim's dev-split accuracy peaks; net ASR is against the clean twin at the same epoch (mean ± 95% CI).\n\n";
            let epochs = self.early_stopping.iter().map(|e| e.net_asr_per_epoch.len()).max().unwrap_or(0);
            out += &format!("| poisons | stop epoch | net ASR at stop | net ASR at end | CACC at stop | CACC at end | {} |\n|---|---|---|---|---|---|{}\n", (1..=epochs).map(|e| format!("net ASR ep {e}")).collect::<Vec<_>>().join(" | "), "---|".repeat(epochs));
            for e in &self.early_stopping {
                let per: Vec<String> = e.net_asr_per_epoch.iter().map(|s| s.to_string()).collect();
                out += &format!("| {} | {:.1} | {} | {} | {} | {} | {} |\n", e.label, e.stop_epoch.mean, e.net_asr_at_stop, e.net_asr_at_end, e.cacc_at_stop, e.cacc_at_end, per.join(" | "));
            }
            out += &format!("\nWhat stopping at a fixed epoch costs: the poisoned victims' CACC after each epoch.\n\n| poisons | {} |\n|---|{}\n", (1..=epochs).map(|e| format!("CACC ep {e}")).collect::<Vec<_>>().join(" | "), "---|".repeat(epochs));
            for e in &self.early_stopping {
                let per: Vec<String> = e.cacc_per_epoch.iter().map(|s| s.to_string()).collect();
                out += &format!("| {} | {} |\n", e.label, per.join(" | "));
            }
            out += "\n";
        }
        if !self.filtering.is_empty() {
            out += "## Filter, then train\n\nThe top share of the training set under each detector removed before training; net ASR and ΔCACC against the unfiltered clean twin (common random numbers), change against the unfiltered poisoned victim on the same seeds.\n\n| poisons | detector | removed | poisons removed | clean removed | net ASR | change vs no filter | ΔCACC |\n|---|---|---|---|---|---|---|---|\n";
            for f in &self.filtering {
                let change = f.net_asr_change.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
                out += &format!("| {} | {} | {}% | {}/{} | {} | {} | {} | {} |\n", f.label, f.detector, f.remove_percent, f.poisons_removed, f.poisons, f.clean_removed, f.net_asr, change, f.dcacc);
            }
            out += "\n";
        }
        if !self.evasion.is_empty() {
            out += "## Evasion\n\nPoison sets crafted under a budget that keeps every poison at or below the GloVe word detector's threshold, beside the same sets without it. Cost: evading minus unconstrained net ASR, paired by seed. AUROC: evading / unconstrained.\n\n";
            let dets: Vec<String> = self.evasion[0].auroc.keys().cloned().collect();
            out += &format!("| poisons | net ASR | unconstrained | cost | {} |\n|---|---|---|---|{}\n", dets.iter().map(|d| format!("AUROC {d}")).collect::<Vec<_>>().join(" | "), "---|".repeat(dets.len()));
            for e in &self.evasion {
                let cells: Vec<String> = dets.iter().map(|d| e.auroc.get(d).map(|(a, b)| format!("{a:.3} / {b:.3}")).unwrap_or_else(|| "-".into())).collect();
                out += &format!("| {} | {} | {} | {} | {} |\n", e.label, e.net_asr, e.unconstrained_net_asr, e.cost.map(|c| c.to_string()).unwrap_or_else(|| "-".into()), cells.join(" | "));
            }
            out += "\n";
        }
        out
    }

    /// One ROC panel per poison set, a curve per detector, FPR on a log axis.
    pub fn roc_svg(&self) -> String {
        const COLOURS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
        let detectors: Vec<String> = self.detection.first().map(|d| d.detectors.keys().cloned().collect()).unwrap_or_default();
        let (pw, ph, gap, cols) = (230.0, 180.0, 60.0, 3usize);
        let rows = self.detection.len().div_ceil(cols).max(1);
        let w = 40.0 + cols as f64 * (pw + gap);
        let h = 60.0 + rows as f64 * (ph + gap + 20.0) + 50.0;
        let mut s = svg_open(w, h, &format!("ROC curves: {} (FPR on a log axis, 0.01% to 100%)", self.title));
        for (k, set) in self.detection.iter().enumerate() {
            let (x0, y0) = (50.0 + (k % cols) as f64 * (pw + gap), 60.0 + (k / cols) as f64 * (ph + gap + 20.0));
            let x = |f: f64| x0 + (f.max(1e-4).log10() + 4.0) / 4.0 * pw;
            let y = |t: f64| y0 + ph - t * ph;
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">{}</text>\n", x0 + pw / 2.0, y0 - 8.0, esc(&set.label));
            s += &format!("<rect x=\"{x0:.1}\" y=\"{y0:.1}\" width=\"{pw:.1}\" height=\"{ph:.1}\" fill=\"none\" stroke=\"#999999\"/>\n");
            for e in [-4, -3, -2, -1, 0] {
                let f = 10f64.powi(e);
                s += &format!("<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{y0:.1}\" y2=\"{1:.1}\" stroke=\"#eeeeee\"/>\n", x(f), y0 + ph);
                s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}%</text>\n", x(f), y0 + ph + 13.0, tick_label(100.0 * f));
            }
            for t in nice_ticks(0.0, 1.0, 4) {
                s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text>\n", x0 - 4.0, y(t) + 3.0, tick_label(t));
            }
            // The chance line: TPR = FPR.
            let chance: Vec<String> = fpr_grid().iter().map(|&f| format!("{:.1},{:.1}", x(f), y(f))).collect();
            s += &format!("<polyline points=\"{}\" fill=\"none\" stroke=\"#bbbbbb\" stroke-dasharray=\"3,3\"/>\n", chance.join(" "));
            for (i, d) in detectors.iter().enumerate() {
                if let Some(det) = set.detectors.get(d) {
                    let pts: Vec<String> = det.roc.iter().map(|p| format!("{:.1},{:.1}", x(p.fpr), y(p.tpr))).collect();
                    s += &format!("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>\n", pts.join(" "), COLOURS[i % COLOURS.len()]);
                }
            }
        }
        let keys: Vec<(String, &str)> = detectors.iter().enumerate().map(|(i, d)| (d.clone(), COLOURS[i % COLOURS.len()])).collect();
        s += &legend(&keys, 20.0, h - 25.0, w);
        s + "</svg>\n"
    }

    /// Net ASR after every epoch, one line per poison set (early stopping's curve).
    pub fn epochs_svg(&self) -> String {
        let (left, top, pw, ph) = (60.0, 50.0, 520.0, 300.0);
        let epochs = self.early_stopping.iter().map(|e| e.net_asr_per_epoch.len()).max().unwrap_or(1).max(2);
        let lo = self.early_stopping.iter().flat_map(|e| e.net_asr_per_epoch.iter().map(|s| s.mean)).fold(0.0f64, f64::min);
        let hi = self.early_stopping.iter().flat_map(|e| e.net_asr_per_epoch.iter().map(|s| s.mean)).fold(10.0f64, f64::max);
        let ticks = nice_ticks(lo, hi, 6);
        let (lo, hi) = (ticks[0], *ticks.last().expect("ticks"));
        let x = |e: usize| left + (e - 1) as f64 / (epochs - 1) as f64 * pw;
        let y = |v: f64| top + ph - (v - lo) / (hi - lo) * ph;
        let mut s = svg_open(left + pw + 260.0, top + ph + 60.0, "Net ASR after every epoch (mean over seeds): what early stopping leaves");
        for t in &ticks {
            s += &format!("<line x1=\"{left:.1}\" x2=\"{:.1}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"{2}\"/>\n", left + pw, y(*t), if *t == 0.0 { "#444444" } else { "#eeeeee" });
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>\n", left - 5.0, y(*t) + 4.0, tick_label(*t));
        }
        for e in 1..=epochs {
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">epoch {e}</text>\n", x(e), top + ph + 18.0);
        }
        for es in &self.early_stopping {
            let pts: Vec<String> = es.net_asr_per_epoch.iter().enumerate().map(|(k, v)| format!("{:.1},{:.1}", x(k + 1), y(v.mean))).collect();
            s += &format!("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>\n", pts.join(" "), es.role.colour());
        }
        // Labels at the lines' ends, pushed apart so none overlap.
        let mut ends: Vec<(f64, &str)> = self.early_stopping.iter().filter_map(|e| Some((y(e.net_asr_per_epoch.last()?.mean) + 3.0, e.label.as_str()))).collect();
        ends.sort_by(|a, b| a.0.total_cmp(&b.0));
        for k in 1..ends.len() {
            ends[k].0 = ends[k].0.max(ends[k - 1].0 + 11.0);
        }
        for (at, label) in ends {
            s += &format!("<text x=\"{:.1}\" y=\"{at:.1}\" font-size=\"10\">{}</text>\n", left + pw + 6.0, esc(label));
        }
        s + "</svg>\n"
    }
}
