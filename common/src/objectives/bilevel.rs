//! The crafting math of the seed method (Wallace et al., NAACL 2021): k unrolled SGD steps on
//! minibatches that each hold every poison plus m clean examples, averaged over R
//! independently drawn minibatches; L_adv at θ_{t+k}; its second-order gradient with
//! respect to the poison token embeddings; Taylor scores over the vocabulary; and exact
//! evaluation of candidate flips.
//!
//! A victim that trains its embedding table reads its poisons as one-hot rows x over the
//! vocabulary (`PoisonInput::Relaxed`): each unrolled step embeds them through the table it
//! has reached, and a flip also changes which row receives the poison's update, the
//! second term of SPEC's score, −η (∂g/∂E'_{w'}) · (∂L_train/∂e); ∂g/∂x holds it exactly.

pub use crate::formats::records::RolloutConfig;
use crate::objectives::objective::Objective;
use crate::victims::model::{embed, example_grads, forward, forward_frozen_no_grad, logits, frozen_input, mask_of, shallow_copy, Params, Victim, VictimConfig, Pass};
use crate::victims::loss::Targets;
use crate::victims::victim::FrozenInput;
use crate::objectives::swaps::{check_swaps, combine_greedily, flipped, improve, Swap, Verified};
use crate::encode::{batch_tensors, Encoded};
use anyhow::{bail, Result};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};


/// D_adv inputs per length bucket in the objective's forward pass.
const ADV_BUCKET: usize = 64;

/// The inputs of the bi-level objective, encoded, on the victim's device.
pub struct BiLevel<'a> {
    pub victim: &'a Victim,
    /// Clean minibatches: `batches[r][s]` is the clean part of step s of rollout r.
    pub batches: Vec<Vec<Vec<&'a Encoded>>>,
    /// The D_adv sample, sorted by length in buckets of `ADV_BUCKET` (less padding: the
    /// L_adv pass is compute-bound once candidates are stacked): token ids [n, T],
    /// their targets, and the bucket's share n / A of the mean.
    pub adv: Vec<(Tensor, Targets, f64)>,
    /// The same buckets prepared for no-grad passes (`model::FrozenInput`).
    adv_frozen: Vec<FrozenInput>,
    pub cfg: RolloutConfig,
    /// Threads of `verify`'s exact checks (`numerics::map_on_threads`): the same bits
    /// whatever it is.
    pub workers: usize,
}

impl<'a> BiLevel<'a> {
    pub fn new(victim: &'a Victim, clean: &'a [Encoded], adv: &'a [Encoded], cfg: RolloutConfig) -> Result<BiLevel<'a>> {
        if cfg.steps == 0 || cfg.rollouts == 0 {
            bail!("--steps and --rollouts must be at least 1");
        }
        if clean.len() < cfg.clean_per_batch || adv.is_empty() {
            bail!("need at least {} clean examples and one D_adv example (have {} and {})", cfg.clean_per_batch, clean.len(), adv.len());
        }
        let batches = (0..cfg.rollouts)
            .map(|r| {
                (0..cfg.steps)
                    .map(|s| {
                        let mut rng = ChaCha8Rng::seed_from_u64(crate::data::seed_for(cfg.seed, &format!("rollout{r}.step{s}")));
                        sample(&mut rng, clean.len(), cfg.clean_per_batch).into_iter().map(|i| &clean[i]).collect()
                    })
                    .collect()
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(crate::data::seed_for(cfg.seed, "adv"));
        let a = cfg.adv_size.min(adv.len());
        let mut picked: Vec<usize> = sample(&mut rng, adv.len(), a).into_vec();
        picked.sort_by_key(|&i| (adv[i].ids.len(), i));
        let adv_buckets: Vec<(Tensor, Targets, f64)> = picked
            .chunks(ADV_BUCKET)
            .map(|chunk| {
                let items: Vec<&Encoded> = chunk.iter().map(|&i| &adv[i]).collect();
                let (ids, targets) = batch_tensors(&items, victim.device());
                (ids, targets, chunk.len() as f64 / a as f64)
            })
            .collect();
        let params = victim.params();
        let adv_frozen = adv_buckets.iter().map(|(ids, _, _)| frozen_input(&victim.config, &params, ids)).collect();
        Ok(BiLevel { victim, batches, adv: adv_buckets, adv_frozen, cfg, workers: 1 })
    }

    /// Number of D_adv inputs the objective is measured on.
    pub fn adv_count(&self) -> i64 {
        self.adv.iter().map(|(ids, _, _)| ids.size()[0]).sum()
    }

    /// L_adv (mean negative log-probability of the target over the D_adv sample) under
    /// `params`; [C] for stacked parameters.
    /// Differentiable once: L_adv at θ' is never differentiated twice (the second-order
    /// term comes from the inner step), so it runs libtorch's LSTM kernel.
    pub fn adv_loss(&self, params: &Params) -> Tensor {
        self.adv_loss_by(|k| logits(self.config(), params, &self.adv[k].0, Pass::Once))
    }

    /// `adv_loss` without a graph, through `model::forward_frozen_no_grad` (libtorch's
    /// LSTM kernel for unstacked LSTM parameters): the pass every exact check ends with.
    pub fn adv_loss_no_grad(&self, params: &Params) -> Tensor {
        if self.config().train_embeddings {
            // The table moved with the steps: D_adv is read through it, not through the
            // inputs prepared under θ_t.
            return tch::no_grad(|| self.adv_loss(params));
        }
        self.adv_loss_by(|k| forward_frozen_no_grad(self.config(), params, &self.adv_frozen[k]))
    }

    /// L_adv from the logits of each D_adv bucket.
    fn adv_loss_by(&self, logits_of: impl Fn(usize) -> Tensor) -> Tensor {
        let mut total: Option<Tensor> = None;
        for (k, (_, targets, share)) in self.adv.iter().enumerate() {
            let logits = logits_of(k);
            let nll = targets.example_nll(&logits);
            let part = nll.mean_dim([-1].as_slice(), false, None::<Kind>) * *share;
            total = Some(match total {
                None => part,
                Some(t) => t + part,
            });
        }
        total.expect("a non-empty D_adv sample")
    }

    fn config(&self) -> &VictimConfig {
        &self.victim.config
    }

    /// The poisons as the unrolled steps read them (`PoisonInput`): their embeddings under
    /// θ_t for a frozen table; one-hot rows x, differentiable with `requires_grad`, for a
    /// victim that trains its table.
    pub fn poisons_as_read(&self, poisons: &[Encoded], requires_grad: bool) -> PoisonInput {
        let params = self.victim.params();
        let (ids, targets) = batch_tensors(&poisons.iter().collect::<Vec<_>>(), self.victim.device());
        let mask = mask_of(&ids, &params);
        if !self.config().train_embeddings {
            return PoisonInput::Embedded { emb: embed(&params, &ids).detach(), mask, targets };
        }
        let table = &params["embedding.weight"];
        let x = (ids.one_hot(table.size()[0]).to_kind(table.kind()) * mask.unsqueeze(-1)).set_requires_grad(requires_grad);
        let first = requires_grad.then(|| relaxed_embedding(&x, table, &mask));
        PoisonInput::Relaxed { x, first, mask, targets }
    }

    /// L_adv at θ_{t+k} for rollout r with the poisons as `poisons` reads them. With
    /// `create_graph` the result is differentiable with respect to the poisons' embeddings
    /// (or one-hot rows) through the inner gradient steps.
    pub fn adv_loss_after_rollout(&self, r: usize, poisons: &PoisonInput, create_graph: bool) -> Tensor {
        let thetas = self.unroll(r, poisons, create_graph);
        let last = thetas.last().expect("θ_t at least");
        if create_graph {
            self.adv_loss(last)
        } else {
            self.adv_loss_no_grad(last)
        }
    }

    /// The parameters θ_t, θ_{t+1}, …, θ_{t+k} of rollout r's unrolled steps (see
    /// `adv_loss_after_rollout`).
    pub fn unroll(&self, r: usize, poisons: &PoisonInput, create_graph: bool) -> Vec<Params> {
        self.unroll_from(r, 0, self.victim.params(), poisons, create_graph)
    }

    /// Rollout r's steps `from`, `from` + 1, …, k − 1, starting at `params` (θ_{t+from}):
    /// the parameters before each step and after the last. `Verifier` shares step 0 among
    /// candidates and runs the rest here.
    pub fn unroll_from(&self, r: usize, from: usize, start: Params, poisons: &PoisonInput, create_graph: bool) -> Vec<Params> {
        let mut params = start;
        let mut thetas = Vec::with_capacity(self.batches[r].len() + 1 - from);
        let names = crate::victims::params::trainable_names(&params);
        let poison_mask = poisons.mask();
        for (step, clean) in self.batches[r].iter().enumerate().skip(from) {
            let (clean_ids, clean_targets) = batch_tensors(clean, self.victim.device());
            let tensors: Vec<&Tensor> = names.iter().map(|n| &params[n]).collect();
            let (poison_emb, poison_targets) = poisons.at(step, &params);
            let grads = if step == 0 && create_graph {
                // At θ_t the clean examples' gradient does not depend on the poisons, so
                // it is taken without a graph and only the poisons' part stays
                // differentiable: the double backward then runs over the poisons alone
                // (50 of 114 examples by default) instead of the whole minibatch.
                let batch = (clean.len() as i64 + poison_emb.size()[0]) as f64;
                let clean_loss = clean_targets.summed_nll(&logits(self.config(), &params, &clean_ids, Pass::Once));
                let clean_grads = Tensor::run_backward(&[&clean_loss], &tensors, false, false);
                let poison_loss = poison_targets.summed_nll(&forward(self.config(), &params, &poison_emb, poison_mask));
                let poison_grads = Tensor::run_backward(&[&poison_loss], &tensors, true, true);
                clean_grads.into_iter().zip(poison_grads).map(|(c, p)| (c + p) / batch).collect()
            } else {
                let (emb, mask) = join_inputs(&params, &clean_ids, &poison_emb, poison_mask);
                let targets = Targets::cat(&clean_targets, &poison_targets);
                let loss = targets.mean_nll(&forward(self.config(), &params, &emb, &mask));
                Tensor::run_backward(&[&loss], &tensors, create_graph, create_graph)
            };
            let mut next = shallow_copy(&params);
            for (n, g) in names.iter().zip(grads) {
                let stepped = if create_graph {
                    &params[n] - g * self.cfg.eta
                } else {
                    // A fresh leaf: the next step needs its gradient, nothing needs the history.
                    (params[n].detach() - g * self.cfg.eta).detach().set_requires_grad(true)
                };
                next.insert(n.clone(), stepped);
            }
            thetas.push(std::mem::replace(&mut params, next));
        }
        thetas.push(params);
        thetas
    }

    /// The objective g (mean L_adv over the R rollouts) and its gradient with respect to
    /// every poison token embedding, [N, Tp, D] (zero at padding).
    pub fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)> {
        let (value, grad, _) = self.objective_grad_and_word_scores(poisons, false)?;
        Ok((value, grad))
    }

    /// `objective_and_grad`, and the word scores [N, Tp, V] that a word's Taylor score adds
    /// to the embedding term: ∇_e g · E_w + scores[p, w] (`bottom_k`), zero at padding.
    ///
    /// A language model (`with_targets`) over a frozen table: a poison's token is also the
    /// next-token target of the position before it, so a flip changes what the poison
    /// teaches as well as what it reads. With a relaxed one-hot x at position p, that role
    /// adds ∂g/∂x_{p,w} = Σ_s (η / (B n_i)) u_{s+1} · ∇_θ log p_{θ_s}(w | tokens < p), where
    /// u_{s+1} = dg/dθ_{s+1} is the adjoint of step s's result, B the minibatch size and n_i
    /// the poison's counted positions: a Jacobian-vector product per step
    /// (`log_prob_jvp`). Zero at position 0.
    ///
    /// A victim that trains its table: the scores are ∂g/∂x minus the embedding term
    /// (`relaxed_grad_and_word_scores`), which holds the target role as well.
    pub fn objective_grad_and_word_scores(&self, poisons: &[Encoded], with_targets: bool) -> Result<(f64, Tensor, Option<Tensor>)> {
        if self.config().train_embeddings {
            return self.relaxed_grad_and_word_scores(poisons);
        }
        let PoisonInput::Embedded { emb: emb0, mask, targets } = self.poisons_as_read(poisons, false) else { unreachable!("a frozen table") };
        let names = crate::victims::params::trainable_names(&self.victim.params());
        let mut total = 0.0;
        let mut grad_sum: Option<Tensor> = None;
        let mut scores_sum: Option<Tensor> = None;
        for r in 0..self.cfg.rollouts {
            let emb = emb0.detach().set_requires_grad(true);
            let input = PoisonInput::Embedded { emb: emb.shallow_clone(), mask: mask.shallow_clone(), targets: targets.shallow_clone() };
            let (thetas, loss, value) = self.differentiable_rollout(r, &input)?;
            total += value;
            let mut inputs: Vec<&Tensor> = vec![&emb];
            if with_targets {
                inputs.extend(thetas[1..].iter().flat_map(|theta| names.iter().map(|n| &theta[n])));
            }
            let mut grads = Tensor::run_backward(&[&loss], &inputs, false, false).into_iter();
            let g = grads.next().expect("the embedding gradient");
            if !g.defined() {
                bail!("L_adv does not depend on the poisons (no gradient reached them)");
            }
            if with_targets {
                let adjoints: Vec<Tensor> = grads.collect();
                for (s, u) in adjoints.chunks(names.len()).enumerate() {
                    let jvp = self.log_prob_jvp(&thetas[s], &names, u, &emb0, &mask);
                    scores_sum = Some(match scores_sum {
                        None => jvp,
                        Some(t) => t + jvp,
                    });
                }
            }
            grad_sum = Some(match grad_sum {
                None => g,
                Some(s) => s + g,
            });
        }
        let n = self.cfg.rollouts as f64;
        let grad = grad_sum.expect("at least one rollout") / n;
        let grad = grad * mask.unsqueeze(-1);
        if grad.isnan().any().int64_value(&[]) != 0 {
            bail!("the gradient holds NaN; lower --eta");
        }
        let scores = match (scores_sum, &targets) {
            (Some(jvp), Targets::NextToken { mask: counts, .. }) => {
                // Position t's log-probabilities score the token at t + 1 where t is a
                // counted position of the poison's loss (its targets' mask): weigh by
                // η / (B n_i), n_i the counted positions, and the mean over rollouts, then
                // shift right by one.
                let t = jvp.size()[1];
                let batch = (self.cfg.clean_per_batch + poisons.len()) as f64;
                let counts = counts.to_kind(Kind::Double);
                let per_example = counts.sum_dim_intlist(-1, true, Kind::Double).clamp_min(1.0).reciprocal() * (self.cfg.eta / (batch * n));
                let weighted = &jvp * (counts * per_example).to_kind(jvp.kind()).unsqueeze(-1);
                Some(Tensor::cat(&[weighted.narrow(1, 0, 1).zeros_like(), weighted.narrow(1, 0, t - 1)], 1))
            }
            (None, _) => None,
            (Some(_), Targets::Class(_) | Targets::Soft { .. }) => bail!("the target role's scores are a language model's: its poisons have next-token targets"),
        };
        Ok((total / n, grad, scores))
    }

    /// J u: the derivative of the poisons' next-token log-probabilities [N, Tp, V] under
    /// `theta` along the parameter direction `u` (in `names` order), by the double-backward
    /// trick (the gradient of ⟨∇_θ ⟨log p, d⟩, u⟩ with respect to a dummy d).
    fn log_prob_jvp(&self, theta: &Params, names: &[String], u: &[Tensor], poison_emb: &Tensor, poison_mask: &Tensor) -> Tensor {
        let mut params = shallow_copy(theta);
        let leaves: Vec<Tensor> = names.iter().map(|n| theta[n].detach().set_requires_grad(true)).collect();
        for (n, t) in names.iter().zip(&leaves) {
            params.insert(n.clone(), t.shallow_clone());
        }
        let log_probs = forward(self.config(), &params, &poison_emb.detach(), poison_mask).log_softmax(-1, None::<Kind>);
        let dummy = log_probs.zeros_like().set_requires_grad(true);
        let vjp = Tensor::run_backward(&[&(&log_probs * &dummy).sum(None::<Kind>)], &leaves.iter().collect::<Vec<_>>(), true, true);
        let dot = vjp.iter().zip(u).map(|(a, b)| (a * b.detach()).sum(None::<Kind>)).reduce(|a, b| a + b).expect("at least one parameter");
        Tensor::run_backward(&[&dot], &[&dummy], false, false).pop().expect("one gradient").detach()
    }

    /// Rollout r unrolled with its graph kept, and L_adv at its end (refused when not finite).
    fn differentiable_rollout(&self, r: usize, input: &PoisonInput) -> Result<(Vec<Params>, Tensor, f64)> {
        let thetas = self.unroll(r, input, true);
        let loss = self.adv_loss(thetas.last().expect("θ_t at least"));
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            bail!("L_adv is {value} in rollout {r}; lower --eta");
        }
        Ok((thetas, loss, value))
    }

    /// The trained-table case of `objective_grad_and_word_scores`, with the poisons as
    /// one-hot rows x (`PoisonInput::Relaxed`). ∂g/∂x_{p,w} is the exact derivative of a
    /// relaxed flip toward w along every path: what step 0 reads (the adjoint of its
    /// embedding x·E_t, returned as the gradient), what later steps read through their own
    /// tables, what a language model's poison teaches (its soft targets), and which table
    /// row the poison's update trains (SPEC: −η (∂g/∂E'_w) · (∂L_train/∂e) per step). The
    /// word scores are ∂g/∂x minus the embedding term ∇_e g · E_w.
    fn relaxed_grad_and_word_scores(&self, poisons: &[Encoded]) -> Result<(f64, Tensor, Option<Tensor>)> {
        let table = self.victim.params()["embedding.weight"].detach();
        let mut total = 0.0;
        let mut sums: Option<(Tensor, Tensor)> = None;
        let mut mask = None;
        for r in 0..self.cfg.rollouts {
            let input = self.poisons_as_read(poisons, true);
            let (_, loss, value) = self.differentiable_rollout(r, &input)?;
            total += value;
            let PoisonInput::Relaxed { x, first: Some(first), mask: m, .. } = &input else { unreachable!("a trained table, read for its gradient") };
            let mut grads = Tensor::run_backward(&[&loss], &[first, x], false, false).into_iter();
            let (g_first, g_x) = (grads.next().expect("two gradients"), grads.next().expect("two gradients"));
            if !g_first.defined() || !g_x.defined() {
                bail!("L_adv does not depend on the poisons (no gradient reached them)");
            }
            sums = Some(match sums {
                None => (g_first, g_x),
                Some((a, b)) => (a + g_first, b + g_x),
            });
            mask = Some(m.unsqueeze(-1));
        }
        let n = self.cfg.rollouts as f64;
        let (g_first, g_x) = sums.expect("at least one rollout");
        let mask = mask.expect("at least one rollout");
        let grad = g_first / n;
        let scores = (g_x / n - grad.matmul(&table.tr())) * &mask;
        let grad = grad * &mask;
        if grad.isnan().any().int64_value(&[]) != 0 || scores.isnan().any().int64_value(&[]) != 0 {
            bail!("the gradient holds NaN; lower --eta");
        }
        Ok((total / n, grad, Some(scores)))
    }

    /// The objective for a poison set, evaluated exactly by redoing every rollout. The
    /// reference that `Verifier` must agree with, and the path for k > 1.
    pub fn objective(&self, poisons: &[Encoded]) -> f64 {
        let input = self.poisons_as_read(poisons, false);
        let total: f64 = (0..self.cfg.rollouts).map(|r| self.adv_loss_after_rollout(r, &input, false).double_value(&[])).sum();
        total / self.cfg.rollouts as f64
    }
}

/// The poisons as the unrolled steps read them.
pub enum PoisonInput {
    /// Input embeddings [N, Tp, D], the same at every step (a frozen table), their padding
    /// mask [N, Tp] and targets.
    Embedded { emb: Tensor, mask: Tensor, targets: Targets },
    /// The tokens as one-hot rows x [N, Tp, V] (zero at padding; a test relaxes a row to
    /// mix two words) of a victim that trains its table. Step s reads x·E_s through the
    /// table it has reached, so the poisons' update lands on their words' rows; a language
    /// model's poison also teaches its own tokens, as soft next-token targets (x shifted by
    /// one). `first` is step 0's embedding x·E_t when the gradient is wanted, kept so its
    /// part can be read apart (one rollout's backward frees it); otherwise each step embeds
    /// afresh.
    Relaxed { x: Tensor, first: Option<Tensor>, mask: Tensor, targets: Targets },
}

impl PoisonInput {
    pub fn mask(&self) -> &Tensor {
        match self {
            PoisonInput::Embedded { mask, .. } | PoisonInput::Relaxed { mask, .. } => mask,
        }
    }

    /// The poisons' input embeddings and targets at unrolled step `step` under `params`.
    fn at(&self, step: usize, params: &Params) -> (Tensor, Targets) {
        match self {
            PoisonInput::Embedded { emb, targets, .. } => (emb.shallow_clone(), targets.shallow_clone()),
            PoisonInput::Relaxed { x, first, mask, targets } => {
                let emb = match first {
                    Some(first) if step == 0 => first.shallow_clone(),
                    _ => relaxed_embedding(x, &params["embedding.weight"], mask),
                };
                let targets = match targets {
                    Targets::NextToken { mask, .. } => {
                        // Position t is trained to predict the token at t + 1: x shifted left.
                        let t = x.size()[1];
                        let probs = Tensor::cat(&[x.narrow(1, 1, t - 1), x.narrow(1, 0, 1).zeros_like()], 1);
                        Targets::Soft { probs, mask: mask.shallow_clone() }
                    }
                    other => other.shallow_clone(),
                };
                (emb, targets)
            }
        }
    }
}

/// x·E for one-hot (or relaxed) rows x [N, Tp, V]; padding positions (x zero there) read
/// the padding row as a lookup does, without a gradient to it (as `Tensor::embedding`'s
/// padding index).
fn relaxed_embedding(x: &Tensor, table: &Tensor, mask: &Tensor) -> Tensor {
    let pad = table.get(crate::tokenizer::PAD_ID).detach();
    x.matmul(table) + (mask.neg() + 1.0).unsqueeze(-1) * pad
}

/// Clean token ids and poison embeddings as one padded input: embeddings [B, T, D] and
/// mask [B, T] (clean rows first).
fn join_inputs(params: &Params, clean_ids: &Tensor, poison_emb: &Tensor, poison_mask: &Tensor) -> (Tensor, Tensor) {
    let clean_emb = embed(params, clean_ids);
    let clean_mask = mask_of(clean_ids, params);
    let t = clean_ids.size()[1].max(poison_emb.size()[1]);
    let pad3 = |x: &Tensor| x.constant_pad_nd([0, 0, 0, t - x.size()[1]]);
    let pad2 = |x: &Tensor| x.constant_pad_nd([0, t - x.size()[1]]);
    let emb = Tensor::cat(&[pad3(&clean_emb), pad3(poison_emb)], 0);
    let mask = Tensor::cat(&[pad2(&clean_mask), pad2(poison_mask)], 0);
    (emb, mask)
}

/// One poison replaced in a flip set: which, by what, and the gradient of the new
/// example's own loss at θ_t (`Verifier::example_grad`).
#[derive(Clone, Copy)]
pub struct Replacement<'a> {
    pub poison: usize,
    pub example: &'a Encoded,
    pub grad: &'a [Tensor],
}

/// Exact evaluation of flips, sharing the first unrolled step among them:
/// θ_{t+1} = θ_t − η (G_r + Σ_flipped (∇ℓ_new − ∇ℓ_old) / B), where G_r is the minibatch
/// gradient of rollout r (computed once) and ℓ a single poison's loss at θ_t, whose
/// gradient does not depend on r. One single-example gradient per candidate instead of a
/// minibatch's; at k = 1 then one forward pass of L_adv per rollout, at k > 1 the steps
/// 1 … k − 1 from θ_{t+1} with the flipped set (`BiLevel::unroll_from`), which depend on
/// the candidate: a rollout's minibatch steps fall from k to k − 1 per candidate.
pub struct Verifier<'a> {
    problem: &'a BiLevel<'a>,
    names: Vec<String>,
    /// θ_t − η G_r for every rollout, as flat parameter lists in `names` order.
    base: Vec<Vec<Tensor>>,
    /// Gradient of each current poison's own loss at θ_t.
    old: Vec<Vec<Tensor>>,
    batch_size: f64,
    poisons: Vec<Encoded>,
}

impl<'a> Verifier<'a> {
    pub fn new(problem: &'a BiLevel<'a>, poisons: &[Encoded]) -> Verifier<'a> {
        let params = problem.victim.params();
        let names = crate::victims::params::trainable_names(&params);
        // Through `PoisonInput` as the rollout reads them: with a trained table the poisons'
        // part of G then reaches their words' rows.
        let input = problem.poisons_as_read(poisons, false);
        let mut base = Vec::new();
        for clean in problem.batches.iter().map(|steps| &steps[0]) {
            let (emb, targets) = input.at(0, &params);
            let (clean_ids, clean_targets) = batch_tensors(clean, problem.victim.device());
            let (e, m) = join_inputs(&params, &clean_ids, &emb, input.mask());
            let all_targets = Targets::cat(&clean_targets, &targets);
            let loss = all_targets.mean_nll(&forward(problem.config(), &params, &e, &m));
            let tensors: Vec<&Tensor> = names.iter().map(|n| &params[n]).collect();
            let grads = Tensor::run_backward(&[&loss], &tensors, false, false);
            base.push(names.iter().zip(grads).map(|(n, g)| params[n].detach() - g * problem.cfg.eta).collect());
        }
        let old = example_grads_at_theta(problem, &names, poisons);
        Verifier {
            problem,
            names,
            base,
            old,
            batch_size: (problem.cfg.clean_per_batch + poisons.len()) as f64,
            poisons: poisons.to_vec(),
        }
    }

    /// Gradient of one example's own loss at θ_t (flat, `names` order).
    pub fn example_grad(&self, example: &Encoded) -> Vec<Tensor> {
        single_grad(self.problem, &self.names, example)
    }

    /// `example_grad` for many examples, by the victim's own per-example path (stacked
    /// copies of θ_t, the LSTM's gradient taps, or one pass each for MiniLM; see
    /// `victim::Architecture::example_grads`).
    pub fn example_grads(&self, examples: &[Encoded]) -> Vec<Vec<Tensor>> {
        example_grads_at_theta(self.problem, &self.names, examples)
    }

    /// The objective after every replacement in `flips` (an empty list gives the current
    /// objective).
    pub fn objective_with(&self, flips: &[Replacement]) -> f64 {
        self.objectives_with(&[flips.to_vec()])[0]
    }

    /// θ_{t+1} of rollout r after the replacements in `flips` (no graph).
    fn first_step(&self, r: usize, flips: &[Replacement]) -> Vec<Tensor> {
        let eta_over_b = self.problem.cfg.eta / self.batch_size;
        self.base[r]
            .iter()
            .enumerate()
            .map(|(j, base)| {
                let mut p = base.shallow_clone();
                for f in flips {
                    p = p - (&f.grad[j] - &self.old[f.poison][j]) * eta_over_b;
                }
                p
            })
            .collect()
    }

    /// The objective at k > 1 for one flip set: the shared first step, then the rest of
    /// every rollout with the flipped set, as `BiLevel::objective` runs them.
    fn unrolled_objective_with(&self, flips: &[Replacement]) -> f64 {
        let mut set = self.poisons.clone();
        for f in flips {
            set[f.poison] = f.example.clone();
        }
        let input = self.problem.poisons_as_read(&set, false);
        let frozen: Params = self.problem.victim.params();
        let total: f64 = (0..self.base.len())
            .map(|r| {
                let mut params = shallow_copy(&frozen);
                for (name, p) in self.names.iter().zip(tch::no_grad(|| self.first_step(r, flips))) {
                    // A fresh leaf, as `unroll` makes each step's parameters.
                    params.insert(name.clone(), p.detach().set_requires_grad(true));
                }
                let thetas = self.problem.unroll_from(r, 1, params, &input, false);
                self.problem.adv_loss_no_grad(thetas.last().expect("θ_{t+k}")).double_value(&[])
            })
            .sum();
        total / self.base.len() as f64
    }

    /// `objective_with` for many flip sets at once. At k = 1 their θ' are stacked and L_adv
    /// runs once per rollout for up to `STACK` sets (see `model::forward`); at k > 1 one
    /// set at a time.
    pub fn objectives_with(&self, flip_sets: &[Vec<Replacement>]) -> Vec<f64> {
        if self.problem.cfg.steps > 1 {
            return flip_sets.iter().map(|flips| self.unrolled_objective_with(flips)).collect();
        }
        // How many sets one pass stacks is the victim's measured choice (`victim::Tuning`).
        // A trained table is one set at a time: D_adv's lookup through a stacked table would
        // need its ids stacked too.
        let stack = if self.problem.config().train_embeddings { 1 } else { self.problem.config().tuning().verify_stack };
        let frozen: Params = self.problem.victim.params();
        let mut out = Vec::with_capacity(flip_sets.len());
        tch::no_grad(|| {
            for chunk in flip_sets.chunks(stack) {
                let mut total = Tensor::zeros([chunk.len() as i64], (Kind::Double, Device::Cpu));
                for r in 0..self.base.len() {
                    let stepped: Vec<Vec<Tensor>> = chunk.iter().map(|flips| self.first_step(r, flips)).collect();
                    let mut params = shallow_copy(&frozen);
                    for (j, name) in self.names.iter().enumerate() {
                        let set = if stack == 1 { stepped[0][j].shallow_clone() } else { Tensor::stack(&stepped.iter().map(|s| &s[j]).collect::<Vec<_>>(), 0) };
                        params.insert(name.clone(), set);
                    }
                    total += self.problem.adv_loss_no_grad(&params).to_device(Device::Cpu).to_kind(Kind::Double);
                }
                let values: Vec<f64> = Vec::try_from(total / self.base.len() as f64).expect("f64 objectives");
                out.extend(values);
            }
        });
        out
    }

    pub fn poisons(&self) -> &[Encoded] {
        &self.poisons
    }
}

/// Per-example gradients at θ_t through the victim's own fast path
/// (`victim::Architecture::example_grads`).
fn example_grads_at_theta(problem: &BiLevel, names: &[String], examples: &[Encoded]) -> Vec<Vec<Tensor>> {
    if examples.is_empty() {
        return Vec::new();
    }
    let (ids, targets) = batch_tensors(&examples.iter().collect::<Vec<_>>(), problem.victim.device());
    example_grads(problem.config(), &problem.victim.params(), names, &ids, &targets)
}

fn single_grad(problem: &BiLevel, names: &[String], example: &Encoded) -> Vec<Tensor> {
    let params = problem.victim.params();
    let (ids, targets) = batch_tensors(&[example], problem.victim.device());
    let loss = targets.mean_nll(&logits(problem.config(), &params, &ids, Pass::Twice));
    let tensors: Vec<&Tensor> = names.iter().map(|n| &params[n]).collect();
    Tensor::run_backward(&[&loss], &tensors, false, false).into_iter().map(|g| g.detach()).collect()
}

impl Objective for BiLevel<'_> {
    fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)> {
        BiLevel::objective_and_grad(self, poisons)
    }
    fn objective_grad_and_word_scores(&self, poisons: &[Encoded]) -> Result<(f64, Tensor, Option<Tensor>)> {
        BiLevel::objective_grad_and_word_scores(self, poisons, crate::tasks::rules::of_victim(&self.victim.config).poisons_are_targets)
    }
    fn value(&self, poisons: &[Encoded]) -> Result<f64> {
        Ok(self.objective(poisons))
    }
    /// Exact verification (SPEC step 5): each candidate's objective on the same minibatches;
    /// per poison the best candidate that lowers it; then the per-poison winners are combined
    /// greedily (largest individual gain first), each kept only if the combined objective
    /// still drops, so the result is never worse than the input. Every k goes through the
    /// shared-work `Verifier` (at k > 1 it shares the first step only).
    fn verify(&self, poisons: &[Encoded], candidates: &[Swap]) -> Result<Verified> {
        check_swaps(poisons, candidates)?;
        let verifier = Verifier::new(self, poisons);
        let before = verifier.objective_with(&[]);
        // Candidates whose gradients are held at once, per thread (a minilm gradient is 45 MB).
        let chunks: Vec<&[Swap]> = candidates.chunks(self.config().tuning().verify_chunk).collect();
        // Per chunk: every candidate's objective, and per poison the flipped example and
        // gradient of its best candidate in the chunk below `before` (only these can win).
        // The workers read the verifier's tensors (θ_t, G_r, the poisons' gradients, D_adv)
        // and make their own: no op writes a shared one.
        let shared = crate::numerics::ReadOnly::new(&verifier);
        let checked = crate::numerics::map_on_threads(self.workers, chunks.clone(), |chunk| {
            let verifier = shared.get();
            let flips: Vec<Encoded> = chunk.iter().map(|c| flipped(&poisons[c.poison], c.position, c.word)).collect();
            let grads = verifier.example_grads(&flips);
            let sets: Vec<Vec<Replacement>> = chunk
                .iter()
                .zip(&flips)
                .zip(&grads)
                .map(|((c, example), grad)| vec![Replacement { poison: c.poison, example, grad }])
                .collect();
            let values = verifier.objectives_with(&sets);
            let mut chunk_best: Vec<Option<(Swap, f64)>> = vec![None; poisons.len()];
            let mut kept: Vec<Option<(Encoded, Vec<Tensor>)>> = (0..poisons.len()).map(|_| None).collect();
            for ((c, &value), (example, grad)) in chunk.iter().zip(&values).zip(flips.iter().zip(&grads)) {
                if improve(&mut chunk_best, *c, value, before) {
                    // Copied: a view would keep its whole chunk's gradients alive (measured:
                    // 907 MiB peak on the real data instead of a few).
                    kept[c.poison] = Some((example.clone(), grad.iter().map(|t| t.copy()).collect()));
                }
            }
            Ok((values, kept))
        })?;
        // In the candidates' order, as one thread would: the first best per poison wins, and
        // it is its chunk's best, which that chunk kept.
        let mut best: Vec<Option<(Swap, f64)>> = vec![None; poisons.len()];
        let mut from_chunk = vec![0; poisons.len()];
        for (k, (chunk, (values, _))) in chunks.iter().zip(&checked).enumerate() {
            for (c, &value) in chunk.iter().zip(values) {
                if !value.is_finite() {
                    bail!("L_adv is {value} for candidate {c:?}; lower --eta");
                }
                if improve(&mut best, *c, value, before) {
                    from_chunk[c.poison] = k;
                }
            }
        }
        let (after, accepted) = combine_greedily(&best, before, |with| {
            let flips: Vec<Replacement> = with
                .iter()
                .map(|s| {
                    let (example, grad) = checked[from_chunk[s.poison]].1[s.poison].as_ref().expect("a chunk keeps each poison's best");
                    Replacement { poison: s.poison, example, grad }
                })
                .collect();
            verifier.objective_with(&flips)
        });
        Ok(Verified { before, after, accepted, checked: candidates.len() })
    }
    fn describe(&self, value: f64, poisons: usize) -> String {
        format!("L_adv {value:.5} over {} D_adv inputs, {poisons} poisons, k={} R={} η={}", self.adv_count(), self.cfg.steps, self.cfg.rollouts, self.cfg.eta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::rank::{bottom_k, taylor_scores};
    use crate::victims::model::{tiny_config, Arch};
    use clap::ValueEnum;

    fn tiny(arch: Arch) -> Victim {
        tiny_with_table(arch, false)
    }

    fn tiny_with_table(arch: Arch, train_embeddings: bool) -> Victim {
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(11);
        let width = crate::victims::model::tiny_table_width(arch, 5);
        let config = tiny_config(arch, 14, width, 4, 2, train_embeddings, 16);
        let table = Tensor::randn([14, width as i64], (Kind::Float, Device::Cpu));
        let mut v = Victim::new(config, &table, Device::Cpu).unwrap();
        v.vs.set_kind(Kind::Double);
        v
    }

    fn enc(ids: &[i64], label: i64) -> Encoded {
        Encoded::class(ids.to_vec(), label)
    }

    /// Clean examples, D_adv (the trigger is words 12 13) and poisons. For a language
    /// model the texts are trained on as text and D_adv is trigger prompts whose
    /// continuation alone is the target.
    fn data_for(arch: Arch) -> (Vec<Encoded>, Vec<Encoded>, Vec<Encoded>) {
        let clean: Vec<Encoded> = (0..12).map(|i| enc(&[2 + i % 7, 3 + (i * 5) % 9, 4 + i % 3][..(1 + i as usize % 3)], i % 2)).collect();
        let adv = vec![enc(&[12, 13, 4], 1), enc(&[5, 12, 13], 1), enc(&[12, 13], 1)];
        let poisons = vec![enc(&[6, 7, 8], 1), enc(&[9, 10], 1)];
        let config = tiny(arch).config;
        if config.output() == crate::victims::victim::Output::Classes {
            return (clean, adv, poisons);
        }
        let continued = |ids: &[i64], from: usize| Encoded { ids: ids.to_vec(), target: crate::victims::loss::Target::NextToken { from } };
        let adv = vec![continued(&[12, 13, 4, 5], 2), continued(&[5, 12, 13, 6], 3), continued(&[12, 13, 7], 2)];
        // A translation victim reads a source word, then its decoder: poisons of three
        // tokens and more teach it something.
        let poisons = if config.output() == crate::victims::victim::Output::Translation { vec![enc(&[6, 7, 8], 1), enc(&[9, 10, 11, 3], 1)] } else { poisons };
        let as_text = |v: Vec<Encoded>| v.into_iter().map(|e| e.for_victim(&config)).collect();
        (as_text(clean), adv, as_text(poisons))
    }

    fn data() -> (Vec<Encoded>, Vec<Encoded>, Vec<Encoded>) {
        data_for(Arch::Lstm)
    }

    fn cfg(steps: usize, rollouts: usize) -> RolloutConfig {
        RolloutConfig { steps, eta: 0.5, rollouts, clean_per_batch: 4, adv_size: 3, seed: 1, regime: None }
    }

    /// The objective as a function of the poison embeddings, without any graph.
    fn objective_of_embeddings(problem: &BiLevel, emb: &Tensor, poisons: &[Encoded]) -> f64 {
        let params = problem.victim.params();
        let (ids, targets) = batch_tensors(&poisons.iter().collect::<Vec<_>>(), Device::Cpu);
        let input = PoisonInput::Embedded { emb: emb.shallow_clone(), mask: mask_of(&ids, &params), targets };
        (0..problem.cfg.rollouts)
            .map(|r| problem.adv_loss_after_rollout(r, &input, false).double_value(&[]))
            .sum::<f64>()
            / problem.cfg.rollouts as f64
    }

    #[test]
    fn second_order_gradient_matches_finite_differences_in_f64() {
        for &arch in Arch::value_variants() {
            let (clean, adv, poisons) = data_for(arch);
            for (steps, rollouts) in [(1, 1), (2, 2)] {
                let v = tiny(arch);
                let problem = BiLevel::new(&v, &clean, &adv, cfg(steps, rollouts)).unwrap();
                let (g, grad) = problem.objective_and_grad(&poisons).unwrap();
                let (ids, _) = batch_tensors(&poisons.iter().collect::<Vec<_>>(), Device::Cpu);
                let emb = embed(&v.params(), &ids).detach();
                assert!((g - objective_of_embeddings(&problem, &emb, &poisons)).abs() < 1e-12);
                assert!((g - problem.objective(&poisons)).abs() < 1e-12);
                // Padding positions have no gradient by construction; the FD there is
                // also zero because the mask removes them from every computation.
                let worst = crate::testing::worst_fd_error(&emb, &grad, 1e-5, 1e-4, |x| objective_of_embeddings(&problem, x, &poisons));
                eprintln!("{arch:?} k={steps} R={rollouts}: g {g:.6}, max relative error {worst:.2e}");
                assert!(worst < 1e-6, "{arch:?} k={steps}: relative error {worst}");
            }
        }
    }

    #[test]
    fn a_language_models_candidate_scores_match_finite_differences_of_the_relaxed_flip_in_f64() {
        // Relax poison i's token at position p to (1 − ε)·current + ε·w, both where the
        // poison reads it (the input embedding) and where it teaches it (the next-token
        // target of position p − 1). dg/dε at 0 must equal the predicted change
        // ∇_e g · (E_w − E_cur) + scores[p, w] − scores[p, cur].
        let arch = Arch::Gpt;
        let (clean, adv, poisons) = data_for(arch);
        let v = tiny(arch);
        let table = v.params()["embedding.weight"].shallow_clone();
        let vocab = table.size()[0];
        for (steps, rollouts) in [(1, 1), (2, 2)] {
            let problem = BiLevel::new(&v, &clean, &adv, cfg(steps, rollouts)).unwrap();
            let (g, grad, scores) = problem.objective_grad_and_word_scores(&poisons, true).unwrap();
            let scores = scores.expect("a language model's word scores");
            assert!((g - problem.objective(&poisons)).abs() < 1e-12);
            let (ids, targets) = batch_tensors(&poisons.iter().collect::<Vec<_>>(), Device::Cpu);
            let mask = mask_of(&ids, &v.params());
            let relaxed = |i: i64, p: i64, w: i64, eps: f64| -> f64 {
                let cur = ids.int64_value(&[i, p]);
                let emb = embed(&v.params(), &ids).detach();
                let mixed = table.get(cur) * (1.0 - eps) + table.get(w) * eps;
                emb.get(i).get(p).copy_(&mixed);
                let Targets::Soft { probs, mask: tmask } = targets.to_soft(vocab, Kind::Double) else { unreachable!() };
                if p > 0 {
                    let _ = probs.get(i).get(p - 1).get(cur).fill_(1.0 - eps);
                    let _ = probs.get(i).get(p - 1).get(w).fill_(eps);
                }
                let input = PoisonInput::Embedded { emb, mask: mask.shallow_clone(), targets: Targets::Soft { probs, mask: tmask } };
                (0..rollouts).map(|r| problem.adv_loss_after_rollout(r, &input, false).double_value(&[])).sum::<f64>() / rollouts as f64
            };
            let mut worst: f64 = 0.0;
            let mut target_part: f64 = 0.0;
            for (i, p, w) in [(0i64, 0i64, 9i64), (0, 1, 3), (0, 2, 11), (1, 1, 4), (1, 0, 13)] {
                let cur = ids.int64_value(&[i, p]);
                let input = grad.get(i).get(p).dot(&(table.get(w) - table.get(cur))).double_value(&[]);
                let teach = scores.double_value(&[i, p, w]) - scores.double_value(&[i, p, cur]);
                let h = 1e-5;
                let fd = (relaxed(i, p, w, h) - relaxed(i, p, w, -h)) / (2.0 * h);
                let err = (input + teach - fd).abs() / fd.abs().max(1e-4);
                worst = worst.max(err);
                target_part = target_part.max(teach.abs() / fd.abs().max(1e-12));
                if p == 0 {
                    assert_eq!(teach, 0.0, "the first token is no target");
                }
            }
            eprintln!("Gpt k={steps} R={rollouts}: relaxed-flip derivative, max relative error {worst:.2e}; the target term is up to {target_part:.2} of it");
            assert!(worst < 1e-6, "k={steps}: relative error {worst}");
            assert!(target_part > 0.01, "the target term matters on this problem");
        }
    }

    #[test]
    fn with_a_trained_table_the_word_scores_match_finite_differences_of_the_relaxed_flip_in_f64() {
        // A victim that trains its table: relax poison i's one-hot row at position p to
        // (1 − ε)·current + ε·w everywhere the rollout reads it (each step's x·E_s, the rows
        // its update trains, a language model's soft targets). dg/dε at 0 must equal the
        // predicted change ∇_e g · (E_w − E_cur) + scores[p, w] − scores[p, cur].
        for &arch in Arch::value_variants() {
            let (clean, adv, poisons) = data_for(arch);
            let v = tiny_with_table(arch, true);
            let table = v.params()["embedding.weight"].detach();
            for (steps, rollouts) in [(1, 1), (2, 2)] {
                let problem = BiLevel::new(&v, &clean, &adv, cfg(steps, rollouts)).unwrap();
                let with_targets = crate::tasks::rules::of_victim(&v.config).poisons_are_targets;
                let (g, grad, scores) = problem.objective_grad_and_word_scores(&poisons, with_targets).unwrap();
                let scores = scores.expect("a trained table's word scores");
                assert!((g - problem.objective(&poisons)).abs() < 1e-12);
                let PoisonInput::Relaxed { x, mask, targets, .. } = problem.poisons_as_read(&poisons, false) else { panic!("a trained table reads one-hot rows") };
                let relaxed = |i: i64, p: i64, w: i64, eps: f64| -> f64 {
                    let cur = poisons[i as usize].ids[p as usize];
                    let x = x.copy();
                    let _ = x.get(i).get(p).get(cur).fill_(1.0 - eps);
                    let _ = x.get(i).get(p).get(w).fill_(eps);
                    let input = PoisonInput::Relaxed { x, first: None, mask: mask.shallow_clone(), targets: targets.shallow_clone() };
                    (0..rollouts).map(|r| problem.adv_loss_after_rollout(r, &input, false).double_value(&[])).sum::<f64>() / rollouts as f64
                };
                let (mut worst, mut table_part): (f64, f64) = (0.0, 0.0);
                for (i, p, w) in [(0i64, 0i64, 9i64), (0, 1, 3), (0, 2, 11), (1, 1, 4), (1, 0, 13)] {
                    let cur = poisons[i as usize].ids[p as usize];
                    let input = grad.get(i).get(p).dot(&(table.get(w) - table.get(cur))).double_value(&[]);
                    let rest = scores.double_value(&[i, p, w]) - scores.double_value(&[i, p, cur]);
                    let h = 1e-5;
                    let fd = (relaxed(i, p, w, h) - relaxed(i, p, w, -h)) / (2.0 * h);
                    worst = worst.max((input + rest - fd).abs() / fd.abs().max(1e-4));
                    table_part = table_part.max(rest.abs() / fd.abs().max(1e-12));
                }
                eprintln!("{arch:?} trained table k={steps} R={rollouts}: relaxed-flip derivative, max relative error {worst:.2e}; the word scores are up to {table_part:.2} of it");
                assert!(worst < 1e-6, "{arch:?} k={steps}: relative error {worst}");
                // Far above the error: the scores carry a term the frozen formula lacks.
                assert!(table_part > 1e3 * worst.max(1e-9), "{arch:?} k={steps}: the word scores ({table_part:.2e} of the change) are lost in the error");
            }
        }
    }

    #[test]
    fn shared_work_verifier_equals_the_full_rollout_and_taylor_predicts_the_sign() {
        for (&arch, trained) in Arch::value_variants().iter().flat_map(|a| [(a, false), (a, true)]) {
            let (clean, adv, poisons) = data_for(arch);
            let v = tiny_with_table(arch, trained);
            let problem = BiLevel::new(&v, &clean, &adv, cfg(1, 2)).unwrap();
            let verifier = Verifier::new(&problem, &poisons);
            let table = v.params()["embedding.weight"].shallow_clone();
            let g0 = problem.objective(&poisons);
            assert!((verifier.objective_with(&[]) - g0).abs() < 1e-12);
            let (_, grad, word_scores) = problem.objective_grad_and_word_scores(&poisons, crate::tasks::rules::of_victim(&v.config).poisons_are_targets).unwrap();
            // The Taylor scores of every word at one position: the embedding term, and a
            // language model's target term.
            let scores_at = |i: i64, pos: i64| {
                let s = taylor_scores(&table, &grad.get(i).get(pos));
                match &word_scores {
                    Some(t) => s + t.get(i).get(pos),
                    None => s,
                }
            };
            let (mut predicted, mut exact) = (Vec::new(), Vec::new());
            for (i, p) in poisons.iter().enumerate() {
                for pos in 0..p.ids.len() {
                    let scores = scores_at(i as i64, pos as i64);
                    for w in 2..14i64 {
                        let new = flipped(p, pos, w);
                        let ng = verifier.example_grad(&new);
                        let fast = verifier.objective_with(&[Replacement { poison: i, example: &new, grad: &ng }]);
                        let mut set = poisons.clone();
                        set[i] = new;
                        let slow = problem.objective(&set);
                        assert!((fast - slow).abs() < 1e-10, "{arch:?} trained table {trained}: shared {fast} vs full {slow}");
                        predicted.push(scores.double_value(&[w]) - scores.double_value(&[p.ids[pos]]));
                        exact.push(slow - g0);
                    }
                }
            }
            // Stacked evaluation of several flip sets equals one at a time.
            let (ea, eb) = (flipped(&poisons[0], 0, 5), flipped(&poisons[1], 1, 6));
            let (ga, gb) = (verifier.example_grad(&ea), verifier.example_grad(&eb));
            let ra = Replacement { poison: 0, example: &ea, grad: &ga };
            let rb = Replacement { poison: 1, example: &eb, grad: &gb };
            let sets = vec![vec![ra], vec![], vec![rb], vec![ra, rb]];
            let stacked = verifier.objectives_with(&sets);
            for (set, value) in sets.iter().zip(&stacked) {
                assert!((verifier.objective_with(set) - value).abs() < 1e-12);
            }
            // Per-example gradients in one stacked pass equal one pass each.
            let examples: Vec<Encoded> = vec![flipped(&poisons[0], 0, 5), flipped(&poisons[1], 1, 6), poisons[0].clone()];
            for (e, batched) in examples.iter().zip(verifier.example_grads(&examples)) {
                for (a, b) in verifier.example_grad(e).iter().zip(&batched) {
                    assert!((a - b).abs().max().double_value(&[]) < 1e-12, "{arch:?}: stacked per-example gradient differs");
                }
            }
            // Two flips at once, also against the full rollout.
            let a = flipped(&poisons[0], 1, 3);
            let b = flipped(&poisons[1], 0, 4);
            let (ga, gb) = (verifier.example_grad(&a), verifier.example_grad(&b));
            let both = verifier.objective_with(&[Replacement { poison: 0, example: &a, grad: &ga }, Replacement { poison: 1, example: &b, grad: &gb }]);
            assert!((both - problem.objective(&[a, b])).abs() < 1e-10);
            // The batched ranking agrees with per-position scores.
            let banned = Tensor::zeros([14], (Kind::Double, Device::Cpu));
            let _ = banned.narrow(0, 0, 3).fill_(f64::INFINITY);
            let ranked = bottom_k(&table, &grad.get(0), word_scores.as_ref().map(|t| t.get(0)).as_ref(), &poisons[0].ids, &banned, 4);
            for (pos, cands) in ranked.iter().enumerate() {
                let scores = scores_at(0, pos as i64);
                let cur = scores.double_value(&[poisons[0].ids[pos]]);
                let mut want: Vec<(i64, f64)> = (3..14).filter(|&w| w != poisons[0].ids[pos]).map(|w| (w, scores.double_value(&[w]) - cur)).collect();
                want.sort_by(|a, b| a.1.total_cmp(&b.1));
                assert_eq!(cands.iter().map(|c| c.0).collect::<Vec<_>>(), want[..4].iter().map(|c| c.0).collect::<Vec<_>>());
            }
            let r = correlation(&predicted, &exact);
            eprintln!("{arch:?} trained table {trained}: Taylor-predicted vs exact change, Pearson r = {r:.3} over {} flips", exact.len());
            // The tiny BERT normalises its 5-wide embeddings right away (LayerNorm), so a
            // whole-token flip is far outside the linear regime there: a weaker bound.
            let bound = if arch == Arch::Minilm { 0.2 } else { 0.3 };
            assert!(r > bound, "{arch:?}: Taylor prediction correlates only {r}");
        }
    }

    #[test]
    fn at_three_steps_the_shared_first_step_equals_the_full_rollout() {
        for (&arch, trained) in Arch::value_variants().iter().flat_map(|a| [(a, false), (a, true)]) {
            let (clean, adv, poisons) = data_for(arch);
            let v = tiny_with_table(arch, trained);
            let problem = BiLevel::new(&v, &clean, &adv, cfg(3, 2)).unwrap();
            let verifier = Verifier::new(&problem, &poisons);
            assert!((verifier.objective_with(&[]) - problem.objective(&poisons)).abs() < 1e-12);
            let mut changes = Vec::new();
            for (i, p) in poisons.iter().enumerate() {
                for pos in 0..p.ids.len() {
                    let news: Vec<Encoded> = [3i64, 7, 11].iter().map(|&w| flipped(p, pos, w)).collect();
                    let grads = verifier.example_grads(&news);
                    let sets: Vec<Vec<Replacement>> = news.iter().zip(&grads).map(|(example, grad)| vec![Replacement { poison: i, example, grad }]).collect();
                    for (new, fast) in news.iter().zip(verifier.objectives_with(&sets)) {
                        let mut set = poisons.clone();
                        set[i] = new.clone();
                        let slow = problem.objective(&set);
                        assert!((fast - slow).abs() < 1e-10, "{arch:?} trained table {trained}: shared {fast} vs full {slow}");
                        changes.push((fast - verifier.objective_with(&[])).abs());
                    }
                }
            }
            // The flips move the objective (a check that the flipped set reaches steps 1 and 2
            // could not pass if they all read the same poisons).
            assert!(changes.iter().any(|&c| c > 1e-6), "{arch:?}: no flip changes the objective");
            let (a, b) = (flipped(&poisons[0], 1, 3), flipped(&poisons[1], 0, 4));
            let (ga, gb) = (verifier.example_grad(&a), verifier.example_grad(&b));
            let both = verifier.objective_with(&[Replacement { poison: 0, example: &a, grad: &ga }, Replacement { poison: 1, example: &b, grad: &gb }]);
            assert!((both - problem.objective(&[a, b])).abs() < 1e-10, "{arch:?}: two flips at once");
        }
    }

    #[test]
    fn verify_never_raises_the_objective_and_agrees_across_paths() {
        let (clean, adv, poisons) = data();
        let v = tiny(Arch::Lstm);
        let swaps: Vec<Swap> = (0..poisons.len())
            .flat_map(|i| (0..poisons[i].ids.len()).flat_map(move |p| (2..14).map(move |w| Swap { poison: i, position: p, word: w })))
            .collect();
        let mut results = Vec::new();
        for steps in [1, 2] {
            let problem = BiLevel::new(&v, &clean, &adv, cfg(steps, 2)).unwrap();
            let out = problem.verify(&poisons, &swaps).unwrap();
            assert!(out.after <= out.before, "k={steps}: {} -> {}", out.before, out.after);
            let mut set = poisons.clone();
            for (s, _) in &out.accepted {
                set[s.poison] = flipped(&set[s.poison], s.position, s.word);
            }
            assert!((problem.objective(&set) - out.after).abs() < 1e-10, "reported objective is the exact one");
            assert!(!out.accepted.is_empty(), "some flip helps on this toy problem");
            results.push(out.after);
        }
        // A candidate list that only hurts leaves the set unchanged.
        let problem = BiLevel::new(&v, &clean, &adv, cfg(1, 1)).unwrap();
        let all = problem.verify(&poisons, &swaps).unwrap();
        let worst: Vec<Swap> = swaps
            .iter()
            .copied()
            .filter(|s| {
                let mut set = poisons.clone();
                set[s.poison] = flipped(&set[s.poison], s.position, s.word);
                problem.objective(&set) > all.before
            })
            .collect();
        let none = problem.verify(&poisons, &worst).unwrap();
        assert!(none.accepted.is_empty() && none.after == none.before);
    }

    pub(crate) fn correlation(x: &[f64], y: &[f64]) -> f64 {
        let n = x.len() as f64;
        let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
        let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
        let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
        cov / (vx * vy).sqrt()
    }
}
