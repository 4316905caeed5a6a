//! clap value parsers shared by the binaries' flags and the argument structs of the
//! formats (a run's settings are recorded with the flags that made them).

/// clap parser for counts and sizes that must be at least 1 (`--k 0` would otherwise
/// reach the math and fail obscurely or write an empty output).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a whole number: {e}")),
    }
}

/// `at_least_one` for u64 values.
pub fn at_least_one_u64(s: &str) -> Result<u64, String> {
    at_least_one(s).map(|n| n as u64)
}

/// clap parser for a probability that must leave something (dropout, label smoothing):
/// in [0, 1).
pub fn probability(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if (0.0..1.0).contains(&x) => Ok(x),
        Ok(x) => Err(format!("{x} is not in [0, 1)")),
        Err(e) => Err(format!("{s:?} is not a number: {e}")),
    }
}

/// clap parser for rates (learning rates, η): finite and above zero.
pub fn positive_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(x) => Err(format!("{x} is not a finite number above 0")),
        Err(e) => Err(format!("{s:?} is not a number: {e}")),
    }
}
