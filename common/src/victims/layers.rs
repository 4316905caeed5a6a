//! The layers the victims share, over named parameters (`Params`), plain or stacked (a
//! leading dimension C on every parameter: C victims or C candidates' θ' in one pass):
//! linear, LayerNorm and scaled dot-product attention, and how linear layers are created.
//! Plain differentiable ops only, so every victim built on them is twice differentiable.

use crate::victims::params::{param, Params};
use tch::{nn, nn::Init, Kind, Tensor};

/// A parameter of `base_dims` dimensions, or a stack [C, ...] of them, shaped to broadcast
/// against activations of rank `rank` whose leading dimension (if stacked) is C: the
/// stack dimension stays first and singleton dimensions are inserted after it.
pub fn fit(t: &Tensor, base_dims: usize, rank: usize) -> Tensor {
    if t.dim() == base_dims {
        return t.shallow_clone();
    }
    let mut shape = vec![t.size()[0]];
    shape.extend(std::iter::repeat_n(1, rank - base_dims - 1));
    shape.extend(&t.size()[1..]);
    t.view(shape.as_slice())
}

/// A linear layer over plain or stacked parameters: `project`, then the bias.
pub fn linear(params: &Params, x: &Tensor, name: &str) -> Tensor {
    let w = param(params, &format!("{name}.weight"));
    let b = param(params, &format!("{name}.bias"));
    if w.dim() == 3 && x.dim() == 2 {
        return project(params, x, name) + b.unsqueeze(-2);
    }
    project(params, x, name) + fit(b, 1, x.dim())
}

/// The weight `name.weight` [out, in] (or a stack [C, out, in]) applied to `x` [.., in],
/// without a bias.
pub fn project(params: &Params, x: &Tensor, name: &str) -> Tensor {
    let w = param(params, &format!("{name}.weight"));
    if w.dim() == 3 && x.dim() == 2 {
        // One input [B, in] under stacked weights [C, out, in] (a pooled feature read by
        // C candidates' output layers): [C, B, out].
        return x.matmul(&w.transpose(-1, -2));
    }
    if w.dim() == 3 && x.dim() > 3 {
        // Stacked weights [C, out, in] and inputs [C, B, T, in]: one [C, B·T, in] batched
        // product. Broadcasting [C, 1, in, out] over B instead materialises B copies of
        // the weights and of their gradient (measured: stacked training 2x slower than
        // one victim at a time).
        let mut shape = x.size();
        let flat = x.flatten(1, x.dim() as i64 - 2).matmul(&w.transpose(-1, -2));
        *shape.last_mut().expect("rank > 3") = w.size()[1];
        return flat.view(shape.as_slice());
    }
    x.matmul(&fit(&w.transpose(-1, -2), 2, x.dim()))
}

/// LayerNorm over the last dimension, plain or stacked parameters.
pub fn layer_norm(params: &Params, x: &Tensor, name: &str, eps: f64) -> Tensor {
    let mean = x.mean_dim([-1].as_slice(), true, None::<Kind>);
    let centred = x - mean;
    let var = centred.square().mean_dim([-1].as_slice(), true, None::<Kind>);
    let (w, b) = (param(params, &format!("{name}.weight")), param(params, &format!("{name}.bias")));
    centred / (var + eps).sqrt() * fit(w, 1, x.dim()) + fit(b, 1, x.dim())
}

/// Scaled dot-product attention of queries, keys and values [.., heads, T, d] with an
/// additive score bias (padding or causal mask: a large negative score gives weight 0),
/// heads merged back into `merged_shape` ([.., T, heads·d]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, merged_shape: &[i64]) -> Tensor {
    let d = *q.size().last().expect("rank > 0");
    let scores = q.matmul(&k.transpose(-1, -2)) / (d as f64).sqrt() + bias;
    scores.softmax(-1, None::<Kind>).matmul(v).transpose(-2, -3).reshape(merged_shape)
}

/// Input embeddings as a causal model's parameter sets read them: shared inputs [B, T, E]
/// expanded to [C, B, T, E] when `probe` (a 1-dimensional parameter, e.g. the final norm's
/// weight) is a stack of C; per-set inputs and plain parameters as they are.
pub fn inputs_under(params: &Params, emb: &Tensor, probe: &str) -> Tensor {
    let p = param(params, probe);
    if p.dim() == 2 && emb.dim() == 3 {
        return emb.unsqueeze(0).expand([p.size()[0], -1, -1, -1], false);
    }
    emb.shallow_clone()
}

/// The causal score bias [T, T]: position t attends to positions ≤ t, the later ones get a
/// large negative score (weight 0 after the softmax).
pub fn causal_bias(t: i64, like: &Tensor) -> Tensor {
    Tensor::ones([t, t], (like.kind(), like.device())).triu(1) * -1e9
}

/// A fresh key-value cache entry of `room` positions per row holding keys and values
/// [.., heads, T, d] at its first T positions (the rest zeros, never attended to).
pub fn cache_entry(k: &Tensor, v: &Tensor, room: i64) -> (Tensor, Tensor) {
    let fresh = |x: &Tensor| {
        let mut shape = x.size();
        let at = shape.len() - 2;
        let t = shape[at];
        shape[at] = room;
        let full = x.new_zeros(shape.as_slice(), (x.kind(), x.device()));
        full.narrow(-2, 0, t).copy_(x);
        full
    };
    (fresh(k), fresh(v))
}

/// Creates linear layer parameters (PyTorch's default uniform initialisation).
pub fn init_linear(p: &nn::Path, fan_in: i64, fan_out: i64) {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let _ = p.var("weight", &[fan_out, fan_in], Init::Uniform { lo: -bound, up: bound });
    let _ = p.var("bias", &[fan_out], Init::Uniform { lo: -bound, up: bound });
}

/// The shapes of linear layer `name`'s weight [out, in] and bias [out].
pub fn linear_shapes(name: &str, fan_in: i64, fan_out: i64) -> [(String, Vec<i64>); 2] {
    [(format!("{name}.weight"), vec![fan_out, fan_in]), (format!("{name}.bias"), vec![fan_out])]
}

/// Dropout during training (`train-victim --dropout`): each element kept with probability
/// 1 − p and scaled by 1/(1 − p). The masks come from the victim's own seeded generator,
/// not libtorch's global one, so a victim trained beside others on another thread draws
/// the same masks (`train::train_all`: a victim's bits depend on its own inputs only).
pub struct Dropout {
    p: f64,
    rng: rand_chacha::ChaCha8Rng,
}

impl Dropout {
    /// Dropout with probability `p` (in [0, 1)), its masks drawn from `seed`'s stream 1
    /// (stream 0 orders the batches).
    pub fn new(p: f64, seed: u64) -> Dropout {
        use rand::SeedableRng;
        assert!((0.0..1.0).contains(&p), "dropout probability {p} outside [0, 1)");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(1);
        Dropout { p, rng }
    }

    /// `x` with a fresh mask applied (the same shape, kind and device).
    pub fn apply(&mut self, x: &Tensor) -> Tensor {
        let mut bits = vec![0u32; x.numel()];
        rand::Rng::fill(&mut self.rng, &mut bits[..]);
        // Kept when the draw is at or above p·2³²: probability 1 − p to within 2⁻³².
        let cut = (self.p * 4_294_967_296.0) as u64;
        let scale = (1.0 / (1.0 - self.p)) as f32;
        let mask: Vec<f32> = bits.iter().map(|&b| if (b as u64) >= cut { scale } else { 0.0 }).collect();
        x * Tensor::from_slice(&mask).view(x.size().as_slice()).to_kind(x.kind()).to_device(x.device())
    }
}
