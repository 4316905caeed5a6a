//! Mean, standard deviation and a 95% confidence interval over retraining seeds.

use serde::{Deserialize, Serialize};

/// Summary of one metric over seeds. `ci95` is the half-width of Student's t interval
/// (absent with fewer than two values).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub mean: f64,
    pub std: f64,
    pub ci95: Option<f64>,
    pub n: usize,
}

/// Two-sided 97.5% quantiles of Student's t for 1..=30 degrees of freedom.
const T975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
];

/// Summarises at least one value.
pub fn summarize(xs: &[f64]) -> Summary {
    let n = xs.len();
    assert!(n > 0, "summarize needs at least one value");
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Summary { mean, std: 0.0, ci95: None, n };
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let std = var.sqrt();
    let t = if n - 1 <= 30 { T975[n - 2] } else { 1.96 };
    Summary { mean, std, ci95: Some(t * std / (n as f64).sqrt()), n }
}

/// "mean ± ci95" (or the mean alone), to the formatter's precision: one decimal unless
/// asked (`{:.3}`), the same for the mean and its interval.
impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = f.precision().unwrap_or(1);
        match self.ci95 {
            Some(ci) => write!(f, "{:.d$} ± {:.d$}", self.mean, ci),
            None => write!(f, "{:.d$}", self.mean),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_prints_to_the_precision_asked_and_one_decimal_by_default() {
        let s = Summary { mean: 1.23456, std: 0.0, ci95: Some(0.5), n: 3 };
        assert_eq!((format!("{s}"), format!("{s:.3}")), ("1.2 ± 0.5".to_string(), "1.235 ± 0.500".to_string()));
        assert_eq!(format!("{:.2}", Summary { ci95: None, ..s }), "1.23");
    }

    #[test]
    fn matches_hand_computation() {
        let s = summarize(&[1.0, 2.0, 3.0, 4.0]);
        assert!((s.mean - 2.5).abs() < 1e-12);
        assert!((s.std - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((s.ci95.unwrap() - 3.182 * s.std / 2.0).abs() < 1e-12);
        assert_eq!(summarize(&[5.0]).ci95, None);
    }
}

/// Ranks 1..=n of `xs` (ties share their mean rank).
pub fn ranks(xs: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut out = vec![0.0; xs.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && xs[order[j + 1]] == xs[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = mean_rank;
        }
        i = j + 1;
    }
    out
}

/// Pearson correlation (NaN when either side is constant or fewer than two values).
pub fn pearson(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let vx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let vy: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

/// Spearman's rank correlation: Pearson's on the ranks.
pub fn spearman(xs: &[f64], ys: &[f64]) -> f64 {
    pearson(&ranks(xs), &ranks(ys))
}

#[cfg(test)]
mod rank_tests {
    use super::*;

    #[test]
    fn spearman_by_hand() {
        assert_eq!(ranks(&[3.0, 1.0, 2.0, 1.0]), vec![4.0, 1.5, 3.0, 1.5]);
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // d² = (0,1,1,0) over 4 values without ties: 1 − 6·2/(4·15) = 0.8.
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]) - 0.8).abs() < 1e-12);
    }
}
