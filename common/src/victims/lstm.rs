//! The BiLSTM victim: a bidirectional LSTM over the word embeddings, max-pooled over
//! time, then a linear layer.
//!
//! `forward` is a hand-written LSTM cell from plain differentiable ops, so double backward
//! works on every device. Passes that are differentiated at most once
//! (`forward_first_order`) or not at all (`forward_frozen_no_grad`) run libtorch's LSTM
//! kernel instead, about twice as fast on a CPU (BENCHMARKS.md), and per-example gradients
//! come from one batched pass with gradient taps instead of stacked weight copies.

use crate::victims::loss::Targets;
use crate::victims::params::{embed, mask_of, param, Params};
use crate::victims::layers::{init_linear, linear_shapes};
use crate::victims::victim::{stacked_example_grads, Architecture, FrozenInput, StartKind, Tuning};
use anyhow::{bail, Result};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// The BiLSTM architecture's own fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Lstm {
    /// LSTM units per direction.
    pub units: usize,
}

const DIRECTIONS: [&str; 2] = ["fwd", "bwd"];

impl Architecture for Lstm {
    fn start(&self) -> StartKind {
        StartKind::Table
    }

    fn shapes(&self, embed_dim: i64, num_classes: i64) -> Vec<(String, Vec<i64>)> {
        let h = self.units as i64;
        let mut shapes = Vec::new();
        for dir in DIRECTIONS {
            shapes.push((format!("lstm.{dir}.w_ih"), vec![4 * h, embed_dim]));
            shapes.push((format!("lstm.{dir}.w_hh"), vec![4 * h, h]));
            shapes.push((format!("lstm.{dir}.b"), vec![4 * h]));
        }
        shapes.extend(linear_shapes("out", 2 * h, num_classes));
        shapes
    }

    fn check(&self, _embed_dim: usize, _max_len: usize) -> Result<()> {
        if self.units == 0 {
            bail!("an LSTM victim with 0 units");
        }
        Ok(())
    }

    fn init(&self, root: &nn::Path, embed_dim: i64, num_classes: i64) {
        let h = self.units as i64;
        for dir in DIRECTIONS {
            let p = root.sub("lstm").sub(dir);
            let bound = 1.0 / (h as f64).sqrt();
            let u = Init::Uniform { lo: -bound, up: bound };
            let _ = p.var("w_ih", &[4 * h, embed_dim], u);
            let _ = p.var("w_hh", &[4 * h, h], u);
            // Forget-gate bias 1: the usual start that lets gradients flow early.
            let b = p.var("b", &[4 * h], Init::Const(0.0));
            let _ = tch::no_grad(|| b.narrow(0, h, h).fill_(1.0));
        }
        init_linear(&root.sub("out"), 2 * h, num_classes);
    }

    fn features(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        max_over_time(&lstm_states(params, emb, mask, lstm_direction), mask)
    }

    /// libtorch's LSTM kernel with autograd (unstacked parameters only): equal to `forward`
    /// up to float rounding, gradients included (tested), but its backward is not
    /// differentiable on every backend, so it serves passes differentiated once.
    fn forward_first_order(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        if is_stacked(params) {
            return self.forward(params, emb, mask);
        }
        let states = lstm_states(params, emb, mask, libtorch_lstm_direction_train);
        max_over_time(&states, mask).matmul(&param(params, "out.weight").tr()) + param(params, "out.bias")
    }

    /// The row reversal of the backward direction and the reversed embeddings.
    fn prepare_frozen(&self, emb: &Tensor, mask: &Tensor) -> Vec<Tensor> {
        let reversal = reversal_index(mask);
        let emb_reversed = reverse_rows(emb, &reversal);
        vec![reversal, emb_reversed]
    }

    /// libtorch's LSTM kernel, measured 2.2× faster than the hand-written cell on this
    /// CPU (`make bench`).
    fn forward_frozen_no_grad(&self, params: &Params, input: &FrozenInput) -> Tensor {
        tch::no_grad(|| {
            if is_stacked(params) {
                return self.forward(params, &input.emb, &input.mask);
            }
            let (reversal, emb_reversed) = (&input.prepared[0], &input.prepared[1]);
            let fwd = libtorch_lstm_direction(params, "lstm.fwd", &input.emb);
            let bwd = unreverse(&libtorch_lstm_direction(params, "lstm.bwd", emb_reversed), reversal);
            let pooled = max_over_time(&Tensor::cat(&[fwd, bwd], -1), &input.mask);
            pooled.matmul(&param(params, "out.weight").tr()) + param(params, "out.bias")
        })
    }

    fn example_grads(&self, params: &Params, names: &[String], ids: &Tensor, targets: &Targets) -> Vec<Vec<Tensor>> {
        if ids.size()[0] == 0 {
            return Vec::new();
        }
        if is_stacked(params) || names.iter().any(|n| !n.starts_with("lstm.") && !n.starts_with("out.")) {
            return stacked_example_grads(self, params, names, ids, targets);
        }
        tapped_example_grads(params, names, ids, targets)
    }

    fn tuning(&self) -> Tuning {
        // One pass per θ' set through libtorch's kernel beats stacking (measured per set,
        // 128 D_adv inputs: 10.7 ms stacked by 16 with the hand-written cell, 6.3 ms
        // unstacked, 2.9 ms by libtorch).
        Tuning { verify_stack: 1, verify_chunk: 64, default_lr: 2e-3 }
    }
}

/// Stacked parameter sets carry a leading dimension on the output layer.
fn is_stacked(params: &Params) -> bool {
    param(params, "out.weight").dim() != 2
}

/// Both LSTM directions' hidden states [.., T, 2H] at every step, each direction computed
/// by `direction`. Right padding only follows a row's real tokens, so the forward
/// direction runs unmasked (its outputs at padded steps are pooled away). The backward
/// direction runs forward over each row's tokens reversed in place, so it too starts from
/// zeros at the row's last real token.
fn lstm_states(params: &Params, emb: &Tensor, mask: &Tensor, direction: fn(&Params, &str, &Tensor) -> Tensor) -> Tensor {
    let reversal = reversal_index(mask);
    let fwd = direction(params, "lstm.fwd", emb);
    let bwd = unreverse(&direction(params, "lstm.bwd", &reverse_rows(emb, &reversal)), &reversal);
    Tensor::cat(&[fwd, bwd], -1)
}

/// Max over time of states [.., T, F]; padding pushed far down so it never wins.
fn max_over_time(states: &Tensor, mask: &Tensor) -> Tensor {
    let penalty = (mask.unsqueeze(-1) - 1.0) * 1e4;
    (states + penalty).amax([-2].as_slice(), false)
}

/// One LSTM direction by libtorch's kernel (batch-first, no graph): the same cell as
/// `lstm_direction` (gate order i, f, g, o; one bias, passed as b_ih with b_hh = 0).
fn libtorch_lstm_direction(params: &Params, prefix: &str, x: &Tensor) -> Tensor {
    libtorch_lstm(params, prefix, x, false)
}

/// `libtorch_lstm_direction` in training mode, for passes differentiated once (cuDNN's
/// backward needs the forward in training mode; with no dropout nothing else changes).
fn libtorch_lstm_direction_train(params: &Params, prefix: &str, x: &Tensor) -> Tensor {
    libtorch_lstm(params, prefix, x, true)
}

fn libtorch_lstm(params: &Params, prefix: &str, x: &Tensor, train: bool) -> Tensor {
    let w_ih = param(params, &format!("{prefix}.w_ih"));
    let w_hh = param(params, &format!("{prefix}.w_hh"));
    let b = param(params, &format!("{prefix}.b"));
    let h0 = Tensor::zeros([1, x.size()[0], w_hh.size()[1]], (x.kind(), x.device()));
    let zero_b = b.zeros_like();
    let weights = [w_ih, w_hh, b, &zero_b];
    x.lstm(&[&h0, &h0], &weights, true, 1, 0.0, train, false, true).0
}

/// For a padding mask [..., T]: index [..., T] that reverses each row's real tokens in
/// place (position t < len ↦ len − 1 − t) and leaves its padding where it is. The map
/// is its own inverse.
fn reversal_index(mask: &Tensor) -> Tensor {
    let t = mask.size()[mask.dim() - 1];
    let steps = Tensor::arange(t, (Kind::Int64, mask.device()));
    let len = mask.sum_dim_intlist(-1, true, Kind::Int64);
    let reversed = &len - 1 - &steps;
    reversed.where_self(&steps.lt_tensor(&len), &steps.expand_as(&reversed))
}

/// Rows of x [..., T, D] reordered along time by `reversal_index` (index [..., T]).
fn reverse_rows(x: &Tensor, index: &Tensor) -> Tensor {
    x.gather(-2, &index.unsqueeze(-1).expand_as(x), false)
}

/// Undoes `reverse_rows` on hidden states [..., T, H], which may carry a leading stack
/// dimension the index lacks (inputs shared by stacked parameter sets).
fn unreverse(h: &Tensor, index: &Tensor) -> Tensor {
    h.gather(-2, &index.unsqueeze(-1).expand(h.size().as_slice(), false), false)
}

/// One LSTM direction over [batch, time, dim] (or [C, batch, time, dim]); returns hidden
/// states [batch, time, H] ([C, batch, time, H] for stacked parameters) at every step.
/// No masking: with right padding, the states at real tokens never see the padding.
fn lstm_direction(params: &Params, prefix: &str, x: &Tensor) -> Tensor {
    let w_ih = param(params, &format!("{prefix}.w_ih"));
    let w_hh = param(params, &format!("{prefix}.w_hh"));
    let b = param(params, &format!("{prefix}.b"));
    let time = x.size()[x.dim() - 2];
    let h_units = w_hh.size()[w_hh.dim() - 1];
    // Input projections of all steps in one matmul: [(C,) batch, time, 4H].
    let xw = if w_ih.dim() == 3 {
        // One [C, B·T, D] × [C, D, 4H] product: broadcasting the weights over the batch
        // instead would materialise B copies of them (and of their gradient).
        let c = w_ih.size()[0];
        let x = if x.dim() == 3 { x.unsqueeze(0).expand([c, -1, -1, -1], false) } else { x.shallow_clone() };
        let (bsz, t) = (x.size()[1], x.size()[2]);
        let xw = x.flatten(1, 2).matmul(&w_ih.transpose(-1, -2));
        xw.view([c, bsz, t, -1]) + b.unsqueeze(1).unsqueeze(1)
    } else {
        x.matmul(&w_ih.tr()) + b
    };
    let mut state_shape = xw.size();
    state_shape.remove(state_shape.len() - 2);
    *state_shape.last_mut().unwrap() = h_units;
    let mut h = Tensor::zeros(state_shape.as_slice(), (x.kind(), x.device()));
    let mut c = h.zeros_like();
    let mut outs: Vec<Tensor> = Vec::with_capacity(time as usize);
    let w_hh_t = w_hh.transpose(-1, -2);
    // unbind once: the backward of T separate `select`s would build T zero tensors of
    // xw's full size (quadratic in the length; it dominated training time).
    for x_t in xw.unbind(-2) {
        let gates = x_t + h.matmul(&w_hh_t);
        let g = gates.chunk(4, -1);
        let (i, f, gg, o) = (g[0].sigmoid(), g[1].sigmoid(), g[2].tanh(), g[3].sigmoid());
        c = &f * &c + &i * &gg;
        h = &o * c.tanh();
        outs.push(h.shallow_clone());
    }
    Tensor::stack(&outs, -2)
}

/// Per-example gradients from one batched pass with shared weights. Example c's gradient
/// of `w_ih`, `w_hh` and `b` is a sum over its time steps of the gates' gradient times the
/// step's input, the previous hidden state, or 1; autograd gives every example's gates'
/// gradients at once (through zero "taps" added to the gate pre-activations and the
/// logits) and einsum sums the outer products per example. One batch of C rows instead of
/// C stacked weight copies (measured: the stacked pass cost about as much as the L_adv
/// pass of a check).
fn tapped_example_grads(params: &Params, names: &[String], ids: &Tensor, targets: &Targets) -> Vec<Vec<Tensor>> {
    let p: Params = params.iter().map(|(k, t)| (k.clone(), t.detach())).collect();
    let emb = embed(&p, ids);
    let mask = mask_of(ids, &p);
    let reversal = reversal_index(&mask);
    let (c, t) = (ids.size()[0], ids.size()[1]);
    let mut grads: std::collections::BTreeMap<String, Tensor> = Default::default();
    let mut taps = Vec::new();
    let mut states = Vec::new();
    let mut saved = Vec::new();
    for (dir, x) in [("fwd", emb.shallow_clone()), ("bwd", reverse_rows(&emb, &reversal))] {
        let w_ih = &p[&format!("lstm.{dir}.w_ih")];
        let w_hh_t = p[&format!("lstm.{dir}.w_hh")].tr();
        let units = w_hh_t.size()[0];
        let tap = Tensor::zeros([c, t, 4 * units], (x.kind(), x.device())).set_requires_grad(true);
        let xw = x.matmul(&w_ih.tr()) + &p[&format!("lstm.{dir}.b")] + &tap;
        let mut h = Tensor::zeros([c, units], (x.kind(), x.device()));
        let mut cell = h.zeros_like();
        let (mut outs, mut previous) = (Vec::with_capacity(t as usize), Vec::with_capacity(t as usize));
        for x_t in xw.unbind(1) {
            previous.push(h.detach());
            let g = (x_t + h.matmul(&w_hh_t)).chunk(4, -1);
            cell = g[1].sigmoid() * &cell + g[0].sigmoid() * g[2].tanh();
            h = g[3].sigmoid() * cell.tanh();
            outs.push(h.shallow_clone());
        }
        let hs = Tensor::stack(&outs, 1);
        states.push(if dir == "bwd" { unreverse(&hs, &reversal) } else { hs });
        saved.push((dir, x, Tensor::stack(&previous, 1)));
        taps.push(tap);
    }
    let pooled = max_over_time(&Tensor::cat(&states, -1), &mask);
    let out_w = &p["out.weight"];
    let logit_tap = Tensor::zeros([c, out_w.size()[0]], (pooled.kind(), pooled.device())).set_requires_grad(true);
    let logits = pooled.matmul(&out_w.tr()) + &p["out.bias"] + &logit_tap;
    taps.push(logit_tap);
    let mut d = Tensor::run_backward(&[&targets.summed_nll(&logits)], &taps.iter().collect::<Vec<_>>(), false, false);
    let d_logits = d.pop().expect("logit gradient");
    for ((dir, x, previous), d_gates) in saved.into_iter().zip(d) {
        grads.insert(format!("lstm.{dir}.w_ih"), Tensor::einsum("ctg,ctd->cgd", &[&d_gates, &x], None::<i64>));
        grads.insert(format!("lstm.{dir}.w_hh"), Tensor::einsum("ctg,cth->cgh", &[&d_gates, &previous], None::<i64>));
        grads.insert(format!("lstm.{dir}.b"), d_gates.sum_dim_intlist(1, false, None::<Kind>));
    }
    grads.insert("out.weight".into(), Tensor::einsum("ck,cf->ckf", &[&d_logits, &pooled.detach()], None::<i64>));
    grads.insert("out.bias".into(), d_logits);
    (0..c).map(|k| names.iter().map(|n| grads[n].get(k)).collect()).collect()
}
