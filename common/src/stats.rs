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

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ci95 {
            Some(ci) => write!(f, "{:.1} ± {:.1}", self.mean, ci),
            None => write!(f, "{:.1}", self.mean),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computation() {
        let s = summarize(&[1.0, 2.0, 3.0, 4.0]);
        assert!((s.mean - 2.5).abs() < 1e-12);
        assert!((s.std - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((s.ci95.unwrap() - 3.182 * s.std / 2.0).abs() < 1e-12);
        assert_eq!(summarize(&[5.0]).ci95, None);
    }
}
