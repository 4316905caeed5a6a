//! The bag-of-words victim: the mean of the word embeddings, then a one-hidden-layer MLP.
//! Fast, for tests and quick runs.

use crate::victims::params::Params;
use crate::victims::layers::{init_linear, linear, linear_shapes};
use crate::victims::victim::{Architecture, StartKind, Tuning};
use anyhow::{bail, Result};
use tch::{nn, Tensor};

/// The bag-of-words architecture's own fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Bow {
    /// Width of the hidden layer.
    pub hidden: usize,
}

impl Architecture for Bow {
    fn start(&self) -> StartKind {
        StartKind::Table
    }

    fn shapes(&self, embed_dim: i64, num_classes: i64) -> Vec<(String, Vec<i64>)> {
        let h = self.hidden as i64;
        linear_shapes("mlp", embed_dim, h).into_iter().chain(linear_shapes("out", h, num_classes)).collect()
    }

    fn check(&self, _embed_dim: usize, _max_len: usize) -> Result<()> {
        if self.hidden == 0 {
            bail!("a bag-of-words victim with a hidden layer of width 0");
        }
        Ok(())
    }

    fn init(&self, root: &nn::Path, embed_dim: i64, num_classes: i64) {
        let h = self.hidden as i64;
        init_linear(&root.sub("mlp"), embed_dim, h);
        init_linear(&root.sub("out"), h, num_classes);
    }

    fn features(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        let m = mask.unsqueeze(-1);
        let pooled = (emb * &m).sum_dim_intlist(-2, false, None) / m.sum_dim_intlist(-2, false, None);
        linear(params, &pooled, "mlp").relu()
    }

    fn tuning(&self) -> Tuning {
        // Stacking pays for this overhead-bound victim: 16 θ' sets per L_adv pass.
        Tuning { verify_stack: 16, verify_chunk: 64, default_lr: 2e-3 }
    }
}
