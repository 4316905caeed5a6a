//! Everything the pipeline stages share: formats and I/O, the tokenizer and vocabulary,
//! the victims and their training, data preparation and evaluation. The binaries in
//! `bins/` are thin argument layers over this crate.

// Lowest layer first (ARCHITECTURE.md; common/tests/layers.rs enforces the order).
pub mod io;
pub mod tensorfile;
pub mod stats;
pub mod device;
pub mod validate;
pub mod numerics;
pub mod gguf;
pub mod formats;
pub mod wordpiece;
pub mod bpe;
pub mod tokenizer;
pub mod embeddings;
pub mod concealment;
pub mod data;
pub mod ding;
pub mod mt;
pub mod victims;
pub mod encode;
pub mod train;
pub mod generate;
pub mod translate;
pub mod detect;
pub mod objectives;
pub mod search;
pub mod eval;
pub mod report;
pub mod cli;
pub mod tasks;

/// libtorch's generator is global: tests that seed it and then draw weights hold this
/// lock, or tests running in parallel threads interleave their draws.
#[cfg(test)]
pub(crate) static TEST_RNG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Finite-difference checks shared by the gradient tests.
#[cfg(test)]
pub(crate) mod testing {
    use tch::Tensor;

    /// Largest relative error between `grad` and central finite differences (step `h`) of
    /// `f` at every element of `x`; |fd| + |analytic| below `floor` counts as `floor`.
    pub fn worst_fd_error(x: &Tensor, grad: &Tensor, h: f64, floor: f64, f: impl Fn(&Tensor) -> f64) -> f64 {
        let flat = x.detach().flatten(0, -1);
        let grad = grad.flatten(0, -1);
        let mut worst: f64 = 0.0;
        for i in 0..flat.numel() as i64 {
            let bump = |d: f64| {
                let y = flat.copy();
                let _ = y.get(i).g_add_scalar_(d);
                f(&y.view_as(x))
            };
            let fd = (bump(h) - bump(-h)) / (2.0 * h);
            let an = grad.double_value(&[i]);
            worst = worst.max((fd - an).abs() / (fd.abs() + an.abs()).max(floor));
        }
        worst
    }
}
