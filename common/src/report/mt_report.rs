//! The translation demo's report (`report --evals` on `mt_eval_report`s, scripts/demo_mt.sh):
//! every poison set's figures (the poisoned models' levels, which the goal is stated in,
//! and the paired changes against the clean twins, 95% CIs), the crafted set against the
//! heuristics by paired differences per seed, and translations side by side.

use crate::eval::mt_eval::{MtEvalReport, MEASURES};
use crate::stats::{summarize, Summary};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The measures two poison sets are compared on; the first decides.
pub const COMPARED: &[&str] = &["asr", "margin", "bleu"];

/// `better` minus `than`, per seed (common random numbers), on `COMPARED`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub better: String,
    pub than: String,
    pub differences: std::collections::BTreeMap<String, Summary>,
    /// Whether the paired 95% interval of the success rate lies above zero.
    pub significant: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MtDemoReport {
    pub kind: String,
    pub v: u32,
    pub variants: Vec<(String, MtEvalReport)>,
    pub comparisons: Vec<Comparison>,
}

fn of(name: &str) -> fn(&crate::eval::mt_eval::MtMetrics) -> f64 {
    MEASURES.iter().find(|m| m.name == name).map(|m| m.of).unwrap_or_else(|| panic!("no translation measure {name:?}"))
}

pub fn compare(better: &(String, MtEvalReport), than: &(String, MtEvalReport)) -> Result<Comparison> {
    let (a, b) = (&better.1.seeds, &than.1.seeds);
    if a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.seed != y.seed) {
        bail!("{} and {} were not evaluated on the same seeds; evaluate them in one finetune-eval run", better.0, than.0);
    }
    let differences: std::collections::BTreeMap<String, Summary> =
        COMPARED.iter().map(|&n| (n.to_string(), summarize(&a.iter().zip(b).map(|(x, y)| of(n)(&x.poisoned) - of(n)(&y.poisoned)).collect::<Vec<_>>()))).collect();
    let d = differences[COMPARED[0]];
    Ok(Comparison { better: better.0.clone(), than: than.0.clone(), significant: d.ci95.is_some_and(|c| d.mean - c > 0.0), differences })
}

/// The report of `reports` (one per name, in order), comparing each `crafted` set with each of `heuristics`.
pub fn build(evals: &str, reports: Vec<MtEvalReport>, names: &[String], crafted: &[String], heuristics: &[String]) -> Result<MtDemoReport> {
    if reports.len() != names.len() {
        bail!("{evals} holds {} reports but --names gives {} names", reports.len(), names.len());
    }
    let variants: Vec<(String, MtEvalReport)> = names.iter().cloned().zip(reports).collect();
    let find = |n: &str| variants.iter().find(|v| v.0 == n).with_context(|| format!("no poison set named {n:?} among --names"));
    let mut comparisons = Vec::new();
    for c in crafted {
        for h in heuristics {
            comparisons.push(compare(find(c)?, find(h)?)?);
        }
    }
    Ok(MtDemoReport { kind: "mt_demo_report".into(), v: 1, variants, comparisons })
}

fn ci(s: &Summary, d: usize) -> String {
    format!("{s:.d$}")
}

impl MtDemoReport {
    pub fn markdown(&self) -> Result<String> {
        let first = &self.variants.first().context("no variants")?.1;
        let mut s = format!(
            "# Translation poisoning\n\n{} seeds; each model is the clean checkpoint fine-tuned for {} epoch(s) (lr {}, batch {}) on {} clean pairs drawn by its seed, with the poisons joining its batches; translations by {}. Mean ± 95% CI over seeds.\n\n",
            first.seeds.len(),
            first.training.epochs,
            first.training.lr,
            first.training.batch_size,
            first.finetune_clean,
            if first.beam > 1 { format!("beam search ({})", first.beam) } else { "greedy decoding".into() }
        );
        s += "Levels of the poisoned models (the clean twins' in the first row):\n\n| poisons | count | hold the trigger | ASR % | … without the correct one % | trigger correct % | FPR % | margin (nats/token) | BLEU | chrF |\n|---|---|---|---|---|---|---|---|---|---|\n";
        let level = |r: &MtEvalReport, n: &str, d: usize, clean: bool| {
            let m = &r.summary[n];
            ci(if clean { &m.clean } else { &m.poisoned }, d)
        };
        let row = |name: &str, r: &MtEvalReport, clean: bool| {
            format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                if clean { "0".into() } else { r.count.to_string() },
                if clean { "0".into() } else { r.trigger_overlap.to_string() },
                level(r, "asr", 1, clean),
                level(r, "asr_replaced", 1, clean),
                level(r, "trigger_correct", 1, clean),
                level(r, "fpr", 1, clean),
                level(r, "margin", 3, clean),
                level(r, "bleu", 2, clean),
                level(r, "chrf", 2, clean)
            )
        };
        s += &row("clean twins", first, true);
        for (name, r) in &self.variants {
            s += &row(name, r, false);
        }
        s += "\nPaired changes (poisoned − its clean twin, per seed), and how often a defender's detectors flag the poisons:\n\n| poisons | ΔASR | ΔFPR | Δmargin | ΔBLEU | ΔchrF | caught % @1/@5% FPR |\n|---|---|---|---|---|---|---|\n";
        for (name, r) in &self.variants {
            let c = |n: &str, d: usize| ci(&r.summary[n].change, d);
            s += &format!("| {name} | {} | {} | {} | {} | {} | {} |\n", c("asr", 1), c("fpr", 1), c("margin", 3), c("bleu", 2), c("chrf", 2), crate::report::caught_cell(r.detection.as_ref()));
        }
        if let Some(d) = self.variants.iter().find_map(|(_, r)| r.detection.as_ref()) {
            s += &format!(
                "\ncaught: the most of the poisons any detector that trains no victim flags at 1 % and at 5 % false positives (thresholds on the {} clean pairs of {}), and the one that flags most at 1 %. Detectors: {}.\n",
                d.calibration_n,
                d.calibration,
                d.detectors.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            s += "\n| poisons | detector | flagged % @1% FPR | @5% FPR | AUROC |\n|---|---|---|---|---|\n";
            for (name, r) in &self.variants {
                for (det, c) in r.detection.iter().flat_map(|d| &d.detectors) {
                    s += &format!("| {name} | {det} | {:.0} | {:.0} | {:.2} |\n", c.flagged_at_1, c.flagged_at_5, c.auroc);
                }
            }
        }
        if !self.comparisons.is_empty() {
            s += "\nEach crafted set against each heuristic (paired by seed):\n\n| crafted | − heuristic | ASR | margin | BLEU | ASR interval above zero |\n|---|---|---|---|---|---|\n";
            for c in &self.comparisons {
                s += &format!("| {} | {} | {} | {} | {} | {} |\n", c.better, c.than, ci(&c.differences["asr"], 1), ci(&c.differences["margin"], 3), ci(&c.differences["bleu"], 2), if c.significant { "yes" } else { "no" });
            }
        }
        for (name, r) in &self.variants {
            if r.side_by_side.is_empty() {
                continue;
            }
            s += &format!("\n## Held-out trigger sentences, seed {}: clean twin vs poisoned by {name}\n\n| source | reference | clean | poisoned |\n|---|---|---|---|\n", r.seeds[0].seed);
            for x in &r.side_by_side {
                s += &format!("| {} | {} | {} | {} |\n", x.source, x.reference, x.clean, x.poisoned);
            }
        }
        Ok(s)
    }
}
