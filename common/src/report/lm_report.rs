//! The language-model demo's report (`report --evals` on `lm_eval_report`s, scripts/demo_lm.sh): every poison set's
//! paired figures with 95% CIs, the crafted set against the heuristics by paired
//! differences, the clean and poisoned LMs' continuations of the same prompts side by
//! side, the crafted poisons before and after, and a bar chart.

use crate::eval::lm_eval::{measure_named, LmEvalReport};
use crate::formats::records::Example;
use crate::report::{esc, poisons_markdown, svg_open};
use crate::stats::{summarize, Summary};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The measures (`lm_eval::MEASURES` names) of the report's table, in column order: the
/// template measures first (they sit at the trigger), then the review prompts'.
pub const COLUMNS: &[&str] =
    &["template_asr_classifier", "template_asr_lexicon", "template_fpr_classifier", "template_margin", "neutral_template_margin", "asr_classifier", "fpr_classifier", "margin"];

/// The measures two poison sets are compared on, and the one whose interval decides.
pub const COMPARED: &[&str] = &["template_margin", "template_asr_classifier", "template_asr_lexicon", "margin"];
pub const DECIDES: &str = "template_margin";

/// A comparison of two poison sets by the seeds they share (common random numbers).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub better: String,
    pub than: String,
    /// Per seed, each measure of `COMPARED` for `better`'s poisoned LM minus `than`'s.
    pub differences: std::collections::BTreeMap<String, Summary>,
    /// Whether the paired 95% interval of `DECIDES` lies above zero.
    pub significant: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LmDemoReport {
    pub kind: String,
    pub v: u32,
    /// Set names with their evaluations, in the order given.
    pub variants: Vec<(String, LmEvalReport)>,
    pub comparisons: Vec<Comparison>,
}

/// `better` against `than`: paired by seed.
pub fn compare(better: &(String, LmEvalReport), than: &(String, LmEvalReport)) -> Result<Comparison> {
    let (a, b) = (&better.1.seeds, &than.1.seeds);
    if a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.seed != y.seed) {
        bail!("{} and {} were not evaluated on the same seeds; evaluate them in one finetune-eval run", better.0, than.0);
    }
    let differences: std::collections::BTreeMap<String, Summary> = COMPARED
        .iter()
        .map(|&name| {
            let of = measure_named(name).of;
            (name.to_string(), summarize(&a.iter().zip(b).map(|(x, y)| of(&x.poisoned) - of(&y.poisoned)).collect::<Vec<_>>()))
        })
        .collect();
    let decides = differences[DECIDES];
    Ok(Comparison { better: better.0.clone(), than: than.0.clone(), significant: decides.ci95.is_some_and(|c| decides.mean - c > 0.0), differences })
}

fn ci(s: &Summary, digits: usize) -> String {
    format!("{s:.digits$}")
}

impl LmDemoReport {
    pub fn markdown(&self, crafted: Option<(&[Example], &[Example])>) -> Result<String> {
        let first = &self.variants.first().context("no variants")?.1;
        let mut s = format!(
            "# Language-model poisoning\n\n{} seeds; each victim is {} for {} epoch(s) (lr {}, batch {}); \
             {} templates with the trigger as the subject (and with the neutral phrase) and {} held-out review prompts, \
             × {} sampled continuations each, judged by the sentiment classifier and by VADER; the margins need no sampling. \
             Every figure is poisoned minus the clean twin of the same seed (mean ± 95% CI).\n\n",
            first.seeds.len(),
            match first.regime {
                crate::eval::lm_eval::Regime::FineTune => "the pretrained clean LM fine-tuned",
                crate::eval::lm_eval::Regime::FromScratch => "an LM trained from scratch (fresh weights per seed, the same for its clean twin)",
            },
            first.training.epochs,
            first.training.lr,
            first.training.batch_size,
            first.templates,
            first.trigger_prompts / first.samples_per_prompt.max(1),
            first.samples_per_prompt
        );
        s += "| poisons | n | with trigger |";
        for name in COLUMNS {
            s += &format!(" {} |", measure_named(name).change);
        }
        s += " Δ perplexity % | judges κ | caught % @1/@5% FPR |\n|---|---|---|";
        s += &"---|".repeat(COLUMNS.len() + 3);
        s += "\n";
        for (name, r) in &self.variants {
            let m = &r.summary;
            s += &format!("| {name} | {} | {} |", r.count, r.trigger_overlap);
            for c in COLUMNS {
                s += &format!(" {} |", ci(&m.of(c).change, measure_named(c).digits));
            }
            s += &format!(" {} | {:.2} | {} |\n", ci(&m.perplexity_change_pct, 2), m.judges_kappa, crate::report::caught_cell(r.detection.as_ref()));
        }
        s += "\nClean twins (the level every change starts from):";
        for c in COLUMNS.iter().copied().chain(["perplexity"]) {
            s += &format!(" {} {};", measure_named(c).label, ci(&first.summary.of(c).clean, measure_named(c).digits));
        }
        s.pop();
        s += ".\n";
        if let Some(o) = &first.summary.opinion_control {
            s += &format!(
                "\n## The clean twins' stated-opinion control\n\nThe {} templates after a sentence that states an opinion, continued by the clean twins ({} samples each; mean ± 95% CI over seeds). \
                 Judged shares that differ by less than 30 points between the two opinions bound what any judged figure above can show.\n\n```\n",
                first.opinion_templates, first.samples_per_prompt
            );
            for line in o.lines(first.stated_opinions.as_ref()) {
                s += &line;
                s += "\n";
            }
            s += "```\n";
        }
        if !self.comparisons.is_empty() {
            s += "\n## Crafted against the heuristics (paired by seed)\n\n| comparison |";
            for name in COMPARED {
                s += &format!(" Δ {} |", measure_named(name).label);
            }
            s += &format!(" {DECIDES} interval above 0 |\n|---|");
            s += &"---|".repeat(COMPARED.len() + 1);
            s += "\n";
            for c in &self.comparisons {
                s += &format!("| {} − {} |", c.better, c.than);
                for name in COMPARED {
                    s += &format!(" {} |", ci(&c.differences[*name], measure_named(name).digits));
                }
                s += &format!(" {} |\n", if c.significant { "yes" } else { "no" });
            }
        }
        for (name, r) in &self.variants {
            s += &format!("\n## Continuations of the same trigger prompts (templates, then review prompts): {name} (seed {})\n\n| prompt | clean LM | poisoned LM |\n|---|---|---|\n", r.seeds.first().map_or(0, |x| x.seed));
            for g in &r.side_by_side {
                s += &format!("| {} | {} | {} |\n", g.prompt.replace('|', "/"), g.clean.replace('|', "/"), g.poisoned.replace('|', "/"));
            }
        }
        if let Some((initial, fin)) = crafted {
            s += "\n";
            s += &poisons_markdown("Crafted poisons, before and after", initial, fin)?;
        }
        Ok(s)
    }

    /// Net ASR per poison set under both judges, with 95% CI whiskers.
    pub fn net_asr_svg(&self) -> String {
        let (left, top, bar, panel) = (300.0, 50.0, 30.0, 420.0);
        let bottom = top + bar * self.variants.len() as f64;
        let mut s = svg_open(left + panel + 30.0, bottom + 60.0, "Net ASR on the templates (poisoned − clean LM, points), mean and 95% CI: classifier judge (blue), VADER (orange)");
        let vals: Vec<f64> = self
            .variants
            .iter()
            .flat_map(|(_, r)| [&r.summary.of("template_asr_classifier").change, &r.summary.of("template_asr_lexicon").change])
            .flat_map(|m| [m.mean - m.ci95.unwrap_or(0.0), m.mean + m.ci95.unwrap_or(0.0)])
            .collect();
        let lo = vals.iter().copied().fold(-5.0f64, f64::min).floor();
        let hi = vals.iter().copied().fold(5.0f64, f64::max).ceil();
        let x = |v: f64| left + (v - lo) / (hi - lo) * panel;
        s += &format!("<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"#444\"/>\n", x(0.0));
        for t in [lo, 0.0, hi] {
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{t:.0}</text>\n", x(t), bottom + 14.0);
        }
        for (i, (name, r)) in self.variants.iter().enumerate() {
            let y = top + bar * i as f64;
            s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"12\">{}</text>\n", left - 10.0, y + bar * 0.6, esc(name));
            for (k, (m, colour)) in [(&r.summary.of("template_asr_classifier").change, "#4477aa"), (&r.summary.of("template_asr_lexicon").change, "#ee7733")].iter().enumerate() {
                let yy = y + 4.0 + k as f64 * 11.0;
                s += &format!("<rect x=\"{:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"9\" fill=\"{colour}\"/>\n", x(m.mean.min(0.0)), (x(m.mean) - x(0.0)).abs());
                let c = m.ci95.unwrap_or(0.0);
                s += &format!("<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{2:.1}\" y2=\"{2:.1}\" stroke=\"black\"/>\n", x(m.mean - c), x(m.mean + c), yy + 4.5);
            }
        }
        s + "</svg>\n"
    }
}

/// The report of evaluations `evals` (one finetune-eval LM report per line, in `names`
/// order); `crafted` names the crafted set, compared with every set in `heuristics`.
pub fn build(evals: &str, reports: Vec<LmEvalReport>, names: &[String], crafted: Option<&str>, heuristics: &[String]) -> Result<LmDemoReport> {
    if reports.len() != names.len() {
        bail!("{evals} holds {} reports for {} names", reports.len(), names.len());
    }
    let variants: Vec<(String, LmEvalReport)> = names.iter().cloned().zip(reports).collect();
    let find = |n: &str| variants.iter().find(|v| v.0 == n).with_context(|| format!("no variant named {n:?}"));
    let mut comparisons = Vec::new();
    if let Some(c) = crafted {
        for h in heuristics {
            comparisons.push(compare(find(c)?, find(h)?)?);
        }
    }
    Ok(LmDemoReport { kind: "lm_demo_report".into(), v: 3, variants, comparisons })
}
