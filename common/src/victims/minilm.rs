//! The MiniLM victim: the pretrained all-MiniLM-L6-v2 encoder (BERT, 6 layers, hidden
//! 384; `--pretrained`), mean-pooled, then a linear layer; fine-tuned with its word table
//! frozen. The encoder itself is `bert.rs`.

use crate::victims::bert::{self, BertConfig};
use crate::victims::loss::Targets;
use crate::victims::params::Params;
use crate::victims::layers::{init_linear, linear_shapes};
use crate::victims::victim::{dotted_path, one_by_one_example_grads, Architecture, StartKind, Tuning};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::nn::{self, Init};
use tch::Tensor;

/// The MiniLM architecture's own fields: the encoder's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Minilm {
    pub bert: BertConfig,
}

impl Architecture for Minilm {
    fn start(&self) -> StartKind {
        StartKind::Pretrained
    }

    fn shapes(&self, _embed_dim: i64, num_classes: i64) -> Vec<(String, Vec<i64>)> {
        let b = &self.bert;
        let (hid, inner) = (b.hidden_size, b.intermediate_size);
        let mut shapes = vec![
            ("embeddings.position_embeddings.weight".to_string(), vec![b.max_position_embeddings, hid]),
            ("embeddings.token_type_embeddings.weight".to_string(), vec![b.type_vocab_size, hid]),
        ];
        let norm = |name: String| [(format!("{name}.weight"), vec![hid]), (format!("{name}.bias"), vec![hid])];
        shapes.extend(norm("embeddings.LayerNorm".into()));
        for l in 0..b.num_hidden_layers {
            let l = format!("encoder.layer.{l}");
            for part in ["query", "key", "value"] {
                shapes.extend(linear_shapes(&format!("{l}.attention.self.{part}"), hid, hid));
            }
            shapes.extend(linear_shapes(&format!("{l}.attention.output.dense"), hid, hid));
            shapes.extend(linear_shapes(&format!("{l}.intermediate.dense"), hid, inner));
            shapes.extend(linear_shapes(&format!("{l}.output.dense"), inner, hid));
            shapes.extend(norm(format!("{l}.attention.output.LayerNorm")));
            shapes.extend(norm(format!("{l}.output.LayerNorm")));
        }
        shapes.extend(linear_shapes("out", hid, num_classes));
        shapes
    }

    /// BERT's own initialisation (normal 0.02, LayerNorm 1, biases 0): what a tiny random
    /// config in tests starts from; `model::Victim::from_pretrained` overwrites it. Drawn
    /// in name order.
    fn init(&self, root: &nn::Path, embed_dim: i64, num_classes: i64) {
        let shapes: BTreeMap<String, Vec<i64>> = self.shapes(embed_dim, num_classes).into_iter().collect();
        for (name, shape) in &shapes {
            if name.starts_with("out.") {
                continue;
            }
            let init = if name.contains("LayerNorm.weight") {
                Init::Const(1.0)
            } else if shape.len() == 1 {
                Init::Const(0.0)
            } else {
                Init::Randn { mean: 0.0, stdev: 0.02 }
            };
            let (path, last) = dotted_path(root, name);
            let _ = path.var(last, shape, init);
        }
        init_linear(&root.sub("out"), embed_dim, num_classes);
    }

    fn check(&self, embed_dim: usize, max_len: usize) -> Result<()> {
        self.bert.check()?;
        if embed_dim as i64 != self.bert.hidden_size {
            bail!("the word table is {embed_dim} wide but the encoder's hidden size is {}", self.bert.hidden_size);
        }
        if max_len as i64 > self.bert.max_position_embeddings {
            bail!("max_len {max_len} exceeds the encoder's {} positions", self.bert.max_position_embeddings);
        }
        Ok(())
    }

    fn features(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        bert::mean_pool(&bert::encode(&self.bert, params, emb, mask), mask)
    }

    /// One pass each: compute-bound already, and C stacked copies of 11M parameters would
    /// cost C×45 MB.
    fn example_grads(&self, params: &Params, names: &[String], ids: &Tensor, targets: &Targets) -> Vec<Vec<Tensor>> {
        one_by_one_example_grads(self, params, names, ids, targets)
    }

    fn tuning(&self) -> Tuning {
        // A minilm gradient is 45 MB: 8 candidates' at once; a stack's activations grow
        // with its size, so finetune-eval trains 2 at a time.
        Tuning { verify_stack: 1, verify_chunk: 8, default_lr: 5e-5 }
    }
}
