//! Everything the pipeline stages share: formats and I/O, the tokenizer and vocabulary,
//! the victims and their training, data preparation and evaluation. The binaries in
//! `bins/` are thin argument layers over this crate.

pub mod attack;
pub mod base;
pub mod bert;
pub mod cli;
pub mod data;
pub mod device;
pub mod embeddings;
pub mod eval;
pub mod hardness;
pub mod io;
pub mod model;
pub mod poisons;
pub mod records;
pub mod report;
pub mod stats;
pub mod tensorfile;
pub mod tokenizer;
pub mod train;
pub mod wordpiece;

/// libtorch's generator is global: tests that seed it and then draw weights hold this
/// lock, or tests running in parallel threads interleave their draws.
#[cfg(test)]
pub(crate) static TEST_RNG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
