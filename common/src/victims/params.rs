//! Victim parameters as named tensors: the map every forward pass takes, and the
//! lookups shared by every architecture (the embedding table, the padding mask).

use crate::tokenizer::PAD_ID;
use std::collections::BTreeMap;
use tch::Tensor;

/// Parameters by stable name (`embedding.weight`, `lstm.fwd.w_ih`, `out.weight`, ...).
pub type Params = BTreeMap<String, Tensor>;

/// A trained victim's identity to the bit: the first 16 hex digits of the sha256 of its
/// trainable parameters (name, then the values' little-endian bytes, in name order). Two
/// victims with one fingerprint computed the same floats; reports record it per victim so
/// that runs on other machines, thread counts or groupings can be compared exactly.
pub fn fingerprint(params: &Params) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for name in trainable_names(params) {
        let t = params[&name].detach().to_device(tch::Device::Cpu).contiguous();
        hash.update(name.as_bytes());
        hash.update(format!("{:?}{:?}", t.kind(), t.size()).as_bytes());
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let mut buf = vec![0u8; bytes];
        t.copy_data_u8(&mut buf, t.numel());
        hash.update(&buf);
    }
    hash.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Names of the parameters training updates (those that require a gradient), in order.
pub fn trainable_names(params: &Params) -> Vec<String> {
    params.keys().filter(|k| params[*k].requires_grad()).cloned().collect()
}

pub(crate) fn param<'a>(params: &'a Params, name: &str) -> &'a Tensor {
    params.get(name).unwrap_or_else(|| panic!("parameter {name:?} missing from the map"))
}

/// Embeddings [batch, time, dim] of token ids under the given parameters.
pub fn embed(params: &Params, ids: &Tensor) -> Tensor {
    let table = param(params, "embedding.weight");
    if table.dim() == 3 {
        // Stacked tables [C, V, D] (victims trained together that each train their own
        // table) and ids [C, ...]: row w of table c is row c·V + w of the flattened stack.
        let (c, v) = (table.size()[0], table.size()[1]);
        let mut view = vec![c];
        view.extend(std::iter::repeat_n(1, ids.dim() - 1));
        let offsets = (Tensor::arange(c, (tch::Kind::Int64, ids.device())) * v).view(view.as_slice());
        return Tensor::embedding(&table.flatten(0, 1), &(ids + offsets), -1, false, false);
    }
    Tensor::embedding(table, ids, PAD_ID, false, false)
}

/// Padding mask [batch, time] (1.0 for a token, 0.0 for padding) in the table's dtype.
pub fn mask_of(ids: &Tensor, params: &Params) -> Tensor {
    ids.ne(PAD_ID).to_kind(param(params, "embedding.weight").kind())
}
