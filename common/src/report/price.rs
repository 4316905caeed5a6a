//! The price of concealment from the defender: each concealed row of a demo made within a
//! detection budget beside its twin, the same variant made without one (`make demo
//! BUDGET_FPR=`), paired by seed. Both runs train their victims on the same seeds and clean
//! batches (their clean twins are the same bits, which `build` checks), so the paired
//! difference is what the budget costs and nothing else.

use crate::detect::caught::SetDetection;
use crate::eval::{paired_net_asr_difference, EvalReport, SeedRow};
use crate::report::{caught_cell, Role, Variants};
use crate::stats::Summary;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One concealed variant within the budget and without it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceRow {
    pub name: String,
    pub label: String,
    pub net_asr: Summary,
    pub twin_net_asr: Summary,
    /// Within-budget minus unconstrained net ASR, paired by seed (negative: concealment costs).
    pub cost: Option<Summary>,
    /// The cheap detectors against each set (thresholds on the dev split).
    pub detection: Option<SetDetection>,
    pub twin_detection: Option<SetDetection>,
}

/// `price.json` (schema in FORMATS.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceReport {
    pub kind: String,
    pub v: u32,
    /// The budgeted run's title and its twin's.
    pub title: String,
    pub twin_title: String,
    pub rows: Vec<PriceRow>,
}

/// Both runs' clean twins, seed by seed, must be the same victims (common random numbers).
fn check_common_twins(a: &[SeedRow], b: &[SeedRow], name: &str) -> Result<()> {
    for r in a {
        let twin = b.iter().find(|w| w.seed == r.seed).with_context(|| format!("{name}: seed {} has no twin in the unconstrained run; evaluate both on the same seeds", r.seed))?;
        let same = match (&r.fingerprints, &twin.fingerprints) {
            (Some(a), Some(b)) => a.clean == b.clean,
            _ => r.clean.as_ref().map(|c| (c.asr, c.cacc)) == twin.clean.as_ref().map(|c| (c.asr, c.cacc)),
        };
        if !same {
            bail!("{name}: seed {}: the two runs' clean victims differ, so their rows are not paired by common random numbers; evaluate both with the same data, victim flags and seeds", r.seed);
        }
    }
    Ok(())
}

/// The price table of the concealed variants (`Role::Baseline`, `Heuristic`, `Crafted`)
/// both runs hold.
pub fn build(variants: &Variants, evals: &[EvalReport], twins: &Variants, twin_evals: &[EvalReport]) -> Result<PriceReport> {
    let mut rows = Vec::new();
    for v in variants.variants.iter().filter(|v| matches!(v.role, Role::Baseline | Role::Heuristic | Role::Crafted)) {
        let (Some(e), Some(t)) = (variants.eval_of(evals, &v.name), twins.eval_of(twin_evals, &v.name)) else { continue };
        check_common_twins(&e.seeds, &t.seeds, &v.name)?;
        rows.push(PriceRow {
            name: v.name.clone(),
            label: v.label.clone(),
            net_asr: e.summary.net_asr.context("evaluated without clean twins")?,
            twin_net_asr: t.summary.net_asr.context("evaluated without clean twins")?,
            cost: paired_net_asr_difference(&e.seeds, &t.seeds),
            detection: e.detection.clone(),
            twin_detection: t.detection.clone(),
        });
    }
    if rows.is_empty() {
        bail!("no concealed variant is in both runs' variants files with an evaluation; give the budgeted demo's variants.json and evals.jsonl and its unconstrained twin's");
    }
    Ok(PriceReport { kind: "price_report".into(), v: 1, title: variants.title.clone(), twin_title: twins.title.clone(), rows })
}

impl PriceReport {
    /// The table as Markdown.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "# The price of concealment\n\nWithin the budget: {}\nUnconstrained twin: {}\n\n| poisons | net ASR within budget | unconstrained | cost (paired) | caught % @1/@5% FPR within budget | unconstrained |\n|---|---|---|---|---|---|\n",
            self.title, self.twin_title
        );
        for r in &self.rows {
            let cost = r.cost.map_or("-".into(), |c| format!("{:+.1} ± {:.1}", c.mean, c.ci95.unwrap_or(0.0)));
            out += &format!("| {} | {} | {} | {} | {} | {} |\n", r.label, r.net_asr, r.twin_net_asr, cost, caught_cell(r.detection.as_ref()), caught_cell(r.twin_detection.as_ref()));
        }
        out += "\ncost: net ASR within the budget minus the unconstrained set's, seed by seed (both against the same clean twins; mean ± 95% CI). caught: the share of the set's poisons the most effective cheap detector flags at 1% and 5% false positives on the clean dev split, which crafting never reads, and which detector that is.\n";
        out
    }
}
