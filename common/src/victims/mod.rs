//! The victims: named parameters (`params`), training targets and the one loss (`loss`),
//! the architecture seam (`victim::Architecture`), one file per architecture, the registry,
//! config and victim file (`model`), where a victim starts (`origin`: a word table or a pretrained encoder), and pretrained
//! Llama-family checkpoints read into a victim (`checkpoint`: GGUF or a Hugging Face folder).

pub mod params;
pub mod loss;
pub mod victim;
pub mod layers;
pub mod bert;
pub mod bow;
pub mod lstm;
pub mod minilm;
pub mod gpt;
pub mod seq2seq;
pub mod llama;
pub mod model;
pub mod origin;
pub mod checkpoint;

/// The conformance suite every victim architecture runs.
#[cfg(test)]
pub(crate) mod conformance;
