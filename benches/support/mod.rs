//! Helpers shared by the benches.

use std::time::Instant;

/// Median wall time of `f` over `reps` runs after one warm-up, in seconds.
pub fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[reps / 2]
}
