//! The objective benchmark (`../shared/objective-benchmark`): poison sets whose net ASR
//! was measured by retraining with common random numbers. An objective is worth crafting
//! with when its value ranks the sets like their measured effect; this module joins
//! `score-poisons` output with the measured table and gives Spearman's rank correlation
//! of −value (lower is better for every objective) with net ASR.

use crate::formats::records::ObjectiveScore;
use crate::stats::spearman;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

/// One measured set of the benchmark's README table.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub set: String,
    pub net_asr: f64,
    /// Whether the README scores it with the seed's objectives (its bi-level column is not
    /// "—"): the 15 sets its own correlations are over.
    pub scored_in_readme: bool,
}

/// A number as the README writes it ("−0.9", "25.4").
fn number(s: &str) -> Option<f64> {
    s.trim().replace('−', "-").parse().ok()
}

/// The measured rows of the benchmark README's table: `| file | how | net ASR | dFPR |
/// bi-level | hardness |`, net ASR as "mean ± ci".
pub fn read_measured(readme: &str) -> Result<Vec<Measured>> {
    let mut out = Vec::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() != 6 || cells[0] == "file" || cells[0].starts_with("---") {
            continue;
        }
        let Some(net) = cells[2].split('±').next().and_then(number) else { continue };
        out.push(Measured { set: cells[0].to_string(), net_asr: net, scored_in_readme: number(cells[4]).is_some() });
    }
    if out.is_empty() {
        bail!("no measured rows (| file | how | net ASR | dFPR | bi-level | hardness |) in the benchmark README");
    }
    Ok(out)
}

/// Spearman's correlation of −value with net ASR per objective label, over the README's 15
/// sets, over its 13 confident-base sets (those 15 without the unoptimised and neighbour
/// sets) and over every measured set scored; then every value. Markdown.
pub fn table(measured: &[Measured], scores: &[ObjectiveScore]) -> Result<String> {
    let mut by_label: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
    for s in scores {
        by_label.entry(&s.objective).or_default().insert(&s.set, s.value);
    }
    if by_label.is_empty() {
        bail!("no objective_score records");
    }
    let corr = |values: &BTreeMap<&str, f64>, keep: &dyn Fn(&Measured) -> bool| {
        let (xs, ys): (Vec<f64>, Vec<f64>) = measured.iter().filter(|m| keep(m)).filter_map(|m| values.get(m.set.as_str()).map(|v| (-v, m.net_asr))).unzip();
        (spearman(&xs, &ys), xs.len())
    };
    let mut md = String::from("| objective | Spearman, README's 15 sets | 13 confident-base sets | all scored sets |\n| --- | --- | --- | --- |\n");
    for (label, values) in &by_label {
        let (a, na) = corr(values, &|m| m.scored_in_readme);
        let (b, nb) = corr(values, &|m| m.scored_in_readme && m.set != "unoptimised" && m.set != "neighbour");
        let (c, nc) = corr(values, &|_| true);
        md += &format!("| {label} | {a:+.2} (n={na}) | {b:+.2} (n={nb}) | {c:+.2} (n={nc}) |\n");
    }
    md += "\nValues (lower is better; net ASR measured, percent):\n\n| set | net ASR |";
    for label in by_label.keys() {
        md += &format!(" {label} |");
    }
    md += "\n| --- | --- |";
    md += &" --- |".repeat(by_label.len());
    md += "\n";
    for m in measured {
        md += &format!("| {} | {:.1} |", m.set, m.net_asr);
        for values in by_label.values() {
            md += &values.get(m.set.as_str()).map_or(" — |".to_string(), |v| format!(" {v:.5} |"));
        }
        md += "\n";
    }
    Ok(md)
}

/// `table` from the benchmark folder's README and score files.
pub fn report(benchmark_dir: &str, score_files: &[String]) -> Result<String> {
    let readme_path = format!("{benchmark_dir}/README.md");
    let readme = std::fs::read_to_string(&readme_path).with_context(|| format!("reading {readme_path}"))?;
    let measured = read_measured(&readme).with_context(|| readme_path.clone())?;
    let mut scores = Vec::new();
    for f in score_files {
        scores.extend(crate::io::read_jsonl::<ObjectiveScore>(f, false)?);
    }
    table(&measured, &scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_table_and_ranks_by_minus_value() {
        let readme = "| file | how | net ASR | dFPR | bi-level L_adv | hardness margin |\n| --- | --- | --- | --- | --- | --- |\n\
            | control-benign | x | 0.3 ± 2.2 | 0.6 ± 2.0 | — | — |\n| unoptimised | x | −0.9 ± 3.1 | 0 | 0.747 | −0.32 |\n\
            | neighbour | x | 25.4 ± 9.3 | 1 | 0.743 | −0.50 |\n| confident | x | 51.5 ± 5.9 | 1 | 0.810 | −2.72 |\n";
        let m = read_measured(readme).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[1], Measured { set: "unoptimised".into(), net_asr: -0.9, scored_in_readme: true });
        assert!(!m[0].scored_in_readme);
        let score = |set: &str, value: f64| ObjectiveScore { kind: "objective_score".into(), v: 1, set: set.into(), objective: "hardness".into(), value, poisons: 50 };
        let scores = vec![score("unoptimised", -0.32), score("neighbour", -0.50), score("confident", -2.72), score("control-benign", 5.0)];
        let md = table(&m, &scores).unwrap();
        // Lower margin, higher net ASR on the three scored sets: +1; with the benign
        // control (highest value, net ASR 0.3 above −0.9) one pair is out of order.
        assert!(md.contains("| hardness | +1.00 (n=3) |"), "{md}");
        assert!(md.contains("+0.80 (n=4) |"), "{md}");
    }
}
