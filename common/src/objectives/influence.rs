//! The implicit (influence-function) objective: what training to convergence does with a
//! poison, by the implicit function theorem (Koh & Liang 2017; Koh, Steinhardt & Liang's
//! poisoning attacks) rather than by a few unrolled steps.
//!
//! At the trained victim θ* (a minimum of the clean training loss L = (1/n) Σ ℓ(x)),
//! adding a poison z with weight ε moves the minimum by −ε H⁻¹ ∇θℓ(z), so L_adv changes by
//! about −ε vᵀ∇θℓ(z) with v = H⁻¹ ∇θL_adv(θ*). The objective of a poison set P joining the
//! n clean examples (ε = 1/n each) is the predicted L_adv after training:
//!
//!   g(P) = L_adv(θ*) − (1/n) Σ_{z∈P} vᵀ ∇θℓ(z, θ*)
//!
//! Lower is better, as for every objective. v is solved once per objective by damped
//! conjugate gradients on (H + λI) v = ∇θL_adv with Hessian-vector products over the clean
//! training set (or a seeded sample): the clean data's competition enters through H, which
//! the one-step unrolled proxy cannot see. H is the clean set's (the poisons are 0.5% of
//! it), so v does not depend on the poisons and one solve serves every poison, candidate
//! and round. g is separable: each poison's term is its own, so exact verification is one
//! per-example gradient per candidate, and the poison-embedding gradient is the mixed
//! second derivative −(1/n) ∇e (vᵀ∇θℓ(z)) by double backward.
//!
//! The contrastive variant replaces L_adv by L_adv(triggered D_adv) − L_adv(the same
//! sentences without the trigger), so a general shift toward the target class, which
//! lowers both, earns nothing.

pub use crate::formats::records::{HessianKind, InfluenceConfig};
use crate::objectives::objective::Objective;
use crate::objectives::swaps::{verify_separable, Swap, Verified};
use crate::victims::loss::Targets;
use crate::victims::model::{embed, example_grads, forward, logits, mask_of, Params, Victim, VictimConfig, Pass};
use crate::formats::records::RolloutConfig;
use crate::encode::{batch_tensors, Encoded};
use anyhow::{bail, Context, Result};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Examples per Hessian-vector-product pass (sorted by length, so little padding).
const HVP_CHUNK: usize = 256;

/// Parameters as a flat list of tensors in `names` order (the trainable ones).
pub type ParamVec = Vec<Tensor>;

/// Σ aᵢ·bᵢ over every tensor, in f64.
pub fn dot(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x * y).sum(Kind::Double).double_value(&[])).sum()
}

/// a + s·b, elementwise over every tensor.
fn axpy(a: &[Tensor], s: f64, b: &[Tensor]) -> ParamVec {
    a.iter().zip(b).map(|(x, y)| x + y * s).collect()
}

/// Σ aᵢ·bᵢ over every tensor as a scalar tensor that stays in the graph (for double
/// backward through `a`).
fn dot_in_graph(a: &[Tensor], b: &[Tensor]) -> Tensor {
    a.iter().zip(b).map(|(x, y)| (x * y).sum(None::<Kind>)).reduce(|s, t| s + t).expect("at least one parameter")
}

/// A training set cut into padded batches for curvature products: token ids and targets.
pub struct Batches {
    batches: Vec<(Tensor, Targets)>,
    /// Examples in all batches (the mean's denominator).
    pub count: usize,
}

impl Batches {
    /// `examples` sorted by length and cut into batches of `HVP_CHUNK`.
    pub fn new(examples: &[&Encoded], device: Device) -> Batches {
        let mut sorted: Vec<&Encoded> = examples.to_vec();
        sorted.sort_by_key(|e| e.ids.len());
        let batches = sorted.chunks(HVP_CHUNK).map(|c| batch_tensors(c, device)).collect();
        Batches { batches, count: examples.len() }
    }
}

/// The curvature of the mean training loss over `batches` at `params`, applied to `v`:
/// the exact Hessian H v (double backward) or the Gauss-Newton product G v
/// (Jᵀ (diag p − ppᵀ) J v: J v by the double-backward trick through a dummy cotangent,
/// then one backward). Class targets only for Gauss-Newton.
pub fn curvature_product(config: &VictimConfig, params: &Params, names: &[String], batches: &Batches, kind: HessianKind, v: &[Tensor]) -> Result<ParamVec> {
    let tensors: Vec<&Tensor> = names.iter().map(|n| &params[n]).collect();
    let mut total: Option<ParamVec> = None;
    for (ids, targets) in &batches.batches {
        let logits = logits(config, params, ids, Pass::Twice);
        let part = match kind {
            HessianKind::Exact => {
                let loss = targets.summed_nll(&logits);
                let grads = Tensor::run_backward(&[&loss], &tensors, true, true);
                let gv = dot_in_graph(&grads, v);
                Tensor::run_backward(&[&gv], &tensors, false, false)
            }
            HessianKind::GaussNewton => {
                if !matches!(targets, Targets::Class(_)) || logits.dim() != 2 {
                    bail!("the Gauss-Newton curvature is written for classifiers; use --hessian exact");
                }
                let u = logits.zeros_like().detach().set_requires_grad(true);
                let jtu = Tensor::run_backward(&[&(&logits * &u).sum(None::<Kind>)], &tensors, true, true);
                let s = dot_in_graph(&jtu, v);
                let jv = Tensor::run_backward(&[&s], &[&u], true, false).pop().expect("one gradient");
                let p = logits.softmax(-1, None::<Kind>).detach();
                let w = &p * &jv - &p * (&p * &jv).sum_dim_intlist(-1, true, None::<Kind>);
                Tensor::run_backward(&[&(&logits * w.detach()).sum(None::<Kind>)], &tensors, false, false)
            }
        };
        total = Some(match total {
            None => part,
            Some(t) => t.iter().zip(&part).map(|(a, b)| a + b).collect(),
        });
    }
    let n = batches.count.max(1) as f64;
    Ok(total.context("no examples for the Hessian")?.into_iter().map(|t| t / n).collect())
}

/// How the linear solve went.
#[derive(Debug, Clone, Copy)]
pub struct Solve {
    pub iterations: usize,
    /// ‖b − (A + λI)x‖ / ‖b‖ at the end.
    pub relative_residual: f64,
    pub seconds: f64,
    /// Read from the cache rather than solved.
    pub cached: bool,
}

/// Conjugate gradients on (A + λI) x = b from x = 0, where `apply` is A; stops after
/// `iters` iterations or when the residual falls below `tol`·‖b‖. Refuses a direction of
/// non-positive curvature (the damped matrix is not positive definite there).
pub fn conjugate_gradients(mut apply: impl FnMut(&[Tensor]) -> Result<ParamVec>, b: &[Tensor], damping: f64, iters: usize, tol: f64) -> Result<(ParamVec, Solve)> {
    let start = Instant::now();
    let norm_b = dot(b, b).sqrt();
    let mut x: ParamVec = b.iter().map(|t| t.zeros_like()).collect();
    if norm_b == 0.0 {
        return Ok((x, Solve { iterations: 0, relative_residual: 0.0, seconds: 0.0, cached: false }));
    }
    let mut r: ParamVec = b.iter().map(|t| t.copy()).collect();
    let mut p: ParamVec = r.iter().map(|t| t.copy()).collect();
    let mut rs = dot(&r, &r);
    let mut done = 0;
    for i in 0..iters {
        let ap = axpy(&apply(&p)?, damping, &p);
        let pap = dot(&p, &ap);
        if !pap.is_finite() {
            bail!("conjugate gradients met a curvature of {pap} at iteration {}; the victim's weights or data hold NaN", i + 1);
        }
        if pap <= 0.0 {
            bail!("the damped Hessian has non-positive curvature ({pap:.3e}) along a conjugate-gradient direction at iteration {}: raise --damping or use --hessian gauss-newton", i + 1);
        }
        let alpha = rs / pap;
        x = axpy(&x, alpha, &p);
        r = axpy(&r, -alpha, &ap);
        let rs_next = dot(&r, &r);
        done = i + 1;
        if rs_next.sqrt() <= tol * norm_b {
            rs = rs_next;
            break;
        }
        p = axpy(&r, rs_next / rs, &p);
        rs = rs_next;
    }
    Ok((x, Solve { iterations: done, relative_residual: rs.sqrt() / norm_b, seconds: start.elapsed().as_secs_f64(), cached: false }))
}

/// `ids` without the first occurrence of `trigger` (a D_adv sentence without its trigger),
/// or None when it does not hold the trigger.
pub fn without_trigger(ids: &[i64], trigger: &[i64]) -> Option<Vec<i64>> {
    if trigger.is_empty() || ids.len() < trigger.len() {
        return None;
    }
    let at = ids.windows(trigger.len()).position(|w| w == trigger)?;
    Some(ids[..at].iter().chain(&ids[at + trigger.len()..]).copied().collect())
}

const CACHE_FORMAT: &str = "poison.influence_v";
const CACHE_VERSION: u32 = 1;

/// A cached v (in the parameters' dtype, on `device`) and how its solve went.
fn read_cached(path: &str, names: &[String], params: &Params, device: Device) -> Result<(ParamVec, Solve)> {
    let file = crate::tensorfile::read(path, CACHE_FORMAT, CACHE_VERSION)?;
    let v = names.iter().map(|n| Ok(file.tensor(n)?.to_kind(params[n].kind()).to_device(device))).collect::<Result<ParamVec>>()?;
    let (iterations, relative_residual): (usize, f64) = file.meta_json("solve")?.context("solve")?;
    Ok((v, Solve { iterations, relative_residual, seconds: 0.0, cached: true }))
}

/// The hash that names a cached v: every input of the solve.
fn cache_key(params: &Params, cfg: &InfluenceConfig, adv: &[&Encoded], hessian: &[&Encoded], trigger: &[i64]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, t) in params {
        h.update(name.as_bytes());
        h.update(format!("{:?}{:?}", t.size(), t.kind()).as_bytes());
        let bytes: Vec<f64> = Vec::try_from(t.detach().to_kind(Kind::Double).to_device(Device::Cpu).flatten(0, -1)).expect("f64 weights");
        h.update(bytes.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
    }
    h.update(serde_json::to_string(cfg).expect("serialisable").as_bytes());
    for set in [adv, hessian] {
        h.update(format!("{}", set.len()).as_bytes());
        for e in set {
            h.update(format!("{:?}{:?};", e.ids, e.target).as_bytes());
        }
    }
    h.update(format!("{trigger:?}").as_bytes());
    format!("{:x}", h.finalize())
}

/// The influence objective at a trained victim.
pub struct Influence<'a> {
    victim: &'a Victim,
    names: Vec<String>,
    pub cfg: InfluenceConfig,
    /// v = (H + λI)⁻¹ ∇θ L_adv (`names` order).
    v: ParamVec,
    /// L_adv at θ* (contrastive: triggered minus untriggered).
    pub adv_value: f64,
    /// The clean training set's size n: each poison joins with weight 1/n.
    n: f64,
    pub solve: Solve,
    adv_count: usize,
    hessian_count: usize,
}

/// L_adv over `adv` (mean target NLL), as a differentiable scalar.
fn adv_loss(config: &VictimConfig, params: &Params, adv: &[&Encoded], device: Device) -> Tensor {
    let batches = Batches::new(adv, device);
    let mut total: Option<Tensor> = None;
    for (ids, targets) in &batches.batches {
        let part = targets.summed_nll(&logits(config, params, ids, Pass::Twice)) / adv.len() as f64;
        total = Some(match total {
            None => part,
            Some(t) => t + part,
        });
    }
    total.expect("a non-empty D_adv sample")
}

impl<'a> Influence<'a> {
    /// Solves for v at `victim` over the clean training set. The D_adv sample and the
    /// Hessian's clean sample are drawn from `rollout.seed` (`rollout.adv_size` D_adv
    /// inputs, as the bi-level objective draws them); `trigger` holds the trigger's token
    /// ids, which the contrastive variant removes from each D_adv sentence.
    ///
    /// With `cache` (a folder), v is kept in a file named by the hash of everything it is
    /// computed from (the victim's weights, the settings, the D_adv sample, the Hessian's
    /// examples and the trigger) and read back instead of solved again: it does not depend
    /// on the poisons, so a crafting run's rounds and its verifications share one solve.
    pub fn new(victim: &'a Victim, clean: &[Encoded], adv: &[Encoded], trigger: &[i64], rollout: &RolloutConfig, cfg: InfluenceConfig, cache: Option<&str>) -> Result<Influence<'a>> {
        if victim.config.train_embeddings {
            bail!("the victim trains its embedding table; the influence objective supports frozen-embedding victims only (with a trained table a flip also changes which row the poison's update trains, a term it does not have: --objective bilevel takes a trained table)");
        }
        if clean.is_empty() || adv.is_empty() {
            bail!("the influence objective needs clean training examples and D_adv (have {} and {})", clean.len(), adv.len());
        }
        let device = victim.device();
        let params = victim.params();
        let names = crate::victims::params::trainable_names(&params);
        let mut rng = ChaCha8Rng::seed_from_u64(crate::data::seed_for(rollout.seed, "adv"));
        let a = rollout.adv_size.min(adv.len());
        let mut picked = sample(&mut rng, adv.len(), a).into_vec();
        picked.sort_unstable();
        let adv_sample: Vec<&Encoded> = picked.iter().map(|&i| &adv[i]).collect();
        let tensors: Vec<&Tensor> = names.iter().map(|n| &params[n]).collect();
        let mut objective = adv_loss(&victim.config, &params, &adv_sample, device);
        if cfg.contrastive {
            let untriggered: Vec<Encoded> = adv_sample
                .iter()
                .map(|e| match without_trigger(&e.ids, trigger) {
                    Some(ids) if !ids.is_empty() => Ok(Encoded { ids, target: e.target }),
                    _ => bail!("a D_adv sentence does not hold the trigger's tokens {trigger:?} (or holds nothing else): {:?}; the contrastive variant needs each D_adv sentence with its trigger", e.ids),
                })
                .collect::<Result<_>>()?;
            objective = objective - adv_loss(&victim.config, &params, &untriggered.iter().collect::<Vec<_>>(), device);
        }
        let adv_value = objective.double_value(&[]);
        if !adv_value.is_finite() {
            bail!("L_adv is {adv_value} at the victim; its weights hold NaN or Inf");
        }
        let b = Tensor::run_backward(&[&objective], &tensors, false, false);
        let hessian_set: Vec<&Encoded> = if cfg.hessian_examples == 0 || cfg.hessian_examples >= clean.len() {
            clean.iter().collect()
        } else {
            let mut rng = ChaCha8Rng::seed_from_u64(crate::data::seed_for(rollout.seed, "hessian"));
            let mut idx = sample(&mut rng, clean.len(), cfg.hessian_examples).into_vec();
            idx.sort_unstable();
            idx.into_iter().map(|i| &clean[i]).collect()
        };
        let cached = cache.map(|dir| format!("{dir}/influence-{}.safetensors", cache_key(&params, &cfg, &adv_sample, &hessian_set, trigger)));
        let (v, solve) = match cached.as_deref() {
            Some(path) if std::path::Path::new(path).exists() => read_cached(path, &names, &params, device)?,
            _ => {
                let batches = Batches::new(&hessian_set, device);
                let (v, solve) = conjugate_gradients(|p| curvature_product(&victim.config, &params, &names, &batches, cfg.hessian, p), &b, cfg.damping, cfg.cg_iters, cfg.cg_tol)?;
                let v: ParamVec = v.into_iter().map(|t| t.detach()).collect();
                if let (Some(dir), Some(path)) = (cache, &cached) {
                    std::fs::create_dir_all(dir).with_context(|| format!("creating the influence cache folder for {path}"))?;
                    let tensors: Vec<(String, Tensor)> = names.iter().cloned().zip(v.iter().map(|t| t.to_device(Device::Cpu))).collect();
                    let meta = [("solve".to_string(), serde_json::to_string(&(solve.iterations, solve.relative_residual))?)].into();
                    crate::tensorfile::write(path, CACHE_FORMAT, CACHE_VERSION, &tensors, meta)?;
                }
                (v, solve)
            }
        };
        Ok(Influence { victim, names, cfg, v, adv_value, n: clean.len() as f64, solve, adv_count: a, hessian_count: hessian_set.len() })
    }

    /// Each poison's term −(1/n) vᵀ∇θℓ(z) of the objective (the predicted change of L_adv
    /// it brings), from per-example gradients (`victim::Architecture::example_grads`).
    pub fn scores(&self, poisons: &[Encoded]) -> Vec<f64> {
        let params = self.victim.params();
        let chunk = self.victim.config.tuning().verify_chunk.max(1);
        let mut out = Vec::with_capacity(poisons.len());
        for part in poisons.chunks(chunk) {
            let (ids, targets) = batch_tensors(&part.iter().collect::<Vec<_>>(), self.victim.device());
            for g in example_grads(&self.victim.config, &params, &self.names, &ids, &targets) {
                out.push(-dot(&g, &self.v) / self.n);
            }
        }
        out
    }

    /// The objective g(P) = L_adv(θ*) + Σ scores.
    pub fn value(&self, poisons: &[Encoded]) -> f64 {
        self.adv_value + self.scores(poisons).iter().sum::<f64>()
    }

    /// g and its gradient with respect to every poison token embedding, [N, Tp, D]
    /// (zero at padding): −(1/n) ∇e Σ_z vᵀ∇θℓ(z) by double backward.
    pub fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)> {
        if poisons.is_empty() {
            bail!("no poisons");
        }
        let params = self.victim.params();
        let tensors: Vec<&Tensor> = self.names.iter().map(|n| &params[n]).collect();
        let (ids, targets) = batch_tensors(&poisons.iter().collect::<Vec<_>>(), self.victim.device());
        let mask = mask_of(&ids, &params);
        let emb = embed(&params, &ids).detach().set_requires_grad(true);
        let loss = targets.summed_nll(&forward(&self.victim.config, &params, &emb, &mask));
        let grads = Tensor::run_backward(&[&loss], &tensors, true, true);
        let gv = dot_in_graph(&grads, &self.v);
        let predicted = -gv / self.n;
        let value = self.adv_value + predicted.double_value(&[]);
        if !value.is_finite() {
            bail!("the influence objective is {value}; the victim's weights or v hold NaN or Inf");
        }
        let grad = Tensor::run_backward(&[&predicted], &[&emb], false, false).pop().expect("one gradient");
        Ok((value, grad * mask.unsqueeze(-1)))
    }

    /// A log line for an objective value.
    pub fn describe(&self, value: f64, poisons: usize) -> String {
        format!(
            "influence {value:.6} = {}L_adv {:.6} − predicted drop {:.6} over {} D_adv inputs, {poisons} poisons; v by CG ({:?} Hessian over {} clean examples, λ={}, {} iterations, relative residual {:.2e}, {})",
            if self.cfg.contrastive { "contrastive " } else { "" },
            self.adv_value,
            self.adv_value - value,
            self.adv_count,
            self.cfg.hessian,
            self.hessian_count,
            self.cfg.damping,
            self.solve.iterations,
            self.solve.relative_residual,
            if self.solve.cached { "read from the cache".to_string() } else { format!("{:.1}s", self.solve.seconds) }
        )
    }
}

impl Objective for Influence<'_> {
    fn objective_and_grad(&self, poisons: &[Encoded]) -> Result<(f64, Tensor)> {
        Influence::objective_and_grad(self, poisons)
    }
    fn value(&self, poisons: &[Encoded]) -> Result<f64> {
        Ok(Influence::value(self, poisons))
    }
    fn terms(&self, poisons: &[Encoded]) -> Option<Vec<f64>> {
        Some(self.scores(poisons))
    }
    /// Exact verification by the same score: per poison the candidate with the lowest
    /// term below its current one (`swaps::verify_separable`).
    fn verify(&self, poisons: &[Encoded], candidates: &[Swap]) -> Result<Verified> {
        verify_separable(poisons, candidates, "influence score", |p| self.scores(p), |t| self.adv_value + t.iter().sum::<f64>(), |d| d)
    }
    fn describe(&self, value: f64, poisons: usize) -> String {
        Influence::describe(self, value, poisons)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::victims::model::{tiny_config, Arch};

    fn tiny(arch: Arch, hidden: usize) -> Victim {
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(5);
        let config = tiny_config(arch, 14, 4, hidden, 2, false, 16);
        let table = Tensor::randn([14, 4], (Kind::Double, Device::Cpu));
        let mut v = Victim::new(config, &table, Device::Cpu).unwrap();
        v.vs.set_kind(Kind::Double);
        v
    }

    fn enc(ids: &[i64], label: i64) -> Encoded {
        Encoded::class(ids.to_vec(), label)
    }

    fn clean() -> Vec<Encoded> {
        (0..10).map(|i| enc(&[2 + i % 7, 3 + (i * 5) % 9, 4 + i % 3][..(1 + i as usize % 3)], i % 2)).collect()
    }

    fn adv() -> Vec<Encoded> {
        vec![enc(&[12, 13, 4], 1), enc(&[5, 12, 13], 1), enc(&[6, 12, 13, 2], 1)]
    }

    fn rollout() -> RolloutConfig {
        RolloutConfig { steps: 1, eta: 0.1, rollouts: 1, clean_per_batch: 4, adv_size: 3, seed: 1, regime: None }
    }

    fn cfg(hessian: HessianKind, contrastive: bool) -> InfluenceConfig {
        InfluenceConfig { damping: 0.5, cg_iters: 500, cg_tol: 1e-13, hessian, hessian_examples: 0, contrastive }
    }

    /// Every parameter of `names` flattened into one vector, and back.
    fn flat(p: &[Tensor]) -> Tensor {
        Tensor::cat(&p.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0)
    }

    fn unflat(x: &Tensor, like: &[Tensor]) -> ParamVec {
        let mut at = 0;
        like.iter()
            .map(|t| {
                let n = t.numel() as i64;
                let out = x.narrow(0, at, n).view_as(t);
                at += n;
                out
            })
            .collect()
    }

    #[test]
    fn curvature_products_match_finite_differences_in_f64() {
        let set = clean();
        // Classifier objectives: a language model is attacked through the bi-level one.
        for arch in crate::victims::model::classifier_archs() {
            let v = tiny(arch, 6);
            let params = v.params();
            let names = crate::victims::params::trainable_names(&params);
            let theta: ParamVec = names.iter().map(|n| params[n].detach()).collect();
            let batches = Batches::new(&set.iter().collect::<Vec<_>>(), Device::Cpu);
            let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(9);
            let dir: ParamVec = theta.iter().map(|t| t.randn_like()).collect();
            drop(_guard);
            // Exact: H d equals the central difference of the gradient along d.
            let hv = flat(&curvature_product(&v.config, &params, &names, &batches, HessianKind::Exact, &dir).unwrap());
            let grad_at = |s: f64| {
                let mut p = v.params();
                for (n, (t, d)) in names.iter().zip(theta.iter().zip(&dir)) {
                    p.insert(n.clone(), (t + d * s).set_requires_grad(true));
                }
                let tensors: Vec<&Tensor> = names.iter().map(|n| &p[n]).collect();
                let (ids, targets) = batch_tensors(&set.iter().collect::<Vec<_>>(), Device::Cpu);
                let loss = targets.mean_nll(&logits(&v.config, &p, &ids, Pass::Twice));
                flat(&Tensor::run_backward(&[&loss], &tensors, false, false))
            };
            let h = 1e-5;
            let fd = (grad_at(h) - grad_at(-h)) / (2.0 * h);
            let err = (&fd - &hv).abs().max().double_value(&[]) / fd.abs().max().double_value(&[]);
            assert!(err < 1e-7, "{arch:?}: Hessian-vector product off by {err}");
            // Gauss-Newton: dᵀ G d equals the second derivative of the loss with the logits
            // linearised, (J d)ᵀ (diag p − ppᵀ)(J d), with J d by central differences.
            let gv = flat(&curvature_product(&v.config, &params, &names, &batches, HessianKind::GaussNewton, &dir).unwrap());
            let logits_at = |s: f64| {
                let mut p = v.params();
                for (n, (t, d)) in names.iter().zip(theta.iter().zip(&dir)) {
                    p.insert(n.clone(), t + d * s);
                }
                let (ids, _) = batch_tensors(&set.iter().collect::<Vec<_>>(), Device::Cpu);
                tch::no_grad(|| logits(&v.config, &p, &ids, Pass::Twice))
            };
            let jd = (logits_at(h) - logits_at(-h)) / (2.0 * h);
            let p = logits_at(0.0).softmax(-1, Kind::Double);
            let quad = ((&p * &jd * &jd).sum(Kind::Double) - (&p * &jd).sum_dim_intlist(-1, false, Kind::Double).square().sum(Kind::Double)).double_value(&[]) / set.len() as f64;
            let dgd = (flat(&dir) * &gv).sum(Kind::Double).double_value(&[]);
            assert!((quad - dgd).abs() < 1e-7 * quad.abs().max(1e-3), "{arch:?}: dᵀGd {dgd} vs {quad}");
            assert!(dgd >= 0.0, "Gauss-Newton is positive semi-definite");
        }
    }

    #[test]
    fn conjugate_gradients_match_a_direct_solve() {
        let set = clean();
        // Classifier objectives: a language model is attacked through the bi-level one.
        for arch in crate::victims::model::classifier_archs() {
            let v = tiny(arch, 3);
            let params = v.params();
            let names = crate::victims::params::trainable_names(&params);
            let theta: ParamVec = names.iter().map(|n| params[n].detach()).collect();
            let batches = Batches::new(&set.iter().collect::<Vec<_>>(), Device::Cpu);
            let p = flat(&theta).size()[0];
            for kind in [HessianKind::GaussNewton, HessianKind::Exact] {
                // The whole matrix, column by column, then a direct solve.
                let columns: Vec<Tensor> = (0..p)
                    .map(|i| {
                        let e = Tensor::zeros([p], (Kind::Double, Device::Cpu));
                        let _ = e.get(i).fill_(1.0);
                        flat(&curvature_product(&v.config, &params, &names, &batches, kind, &unflat(&e, &theta)).unwrap())
                    })
                    .collect();
                let h = Tensor::stack(&columns, 1);
                assert!((&h - h.tr()).abs().max().double_value(&[]) < 1e-10, "{arch:?} {kind:?}: symmetric");
                let lambda = 3.0 + (-h.linalg_eigvalsh("L").min().double_value(&[])).max(0.0);
                let b = Tensor::randn([p], (Kind::Double, Device::Cpu));
                let a = &h + Tensor::eye(p, (Kind::Double, Device::Cpu)) * lambda;
                let direct = Tensor::linalg_solve(&a, &b.unsqueeze(1), true).squeeze_dim(1);
                let (x, solve) = conjugate_gradients(
                    |d| curvature_product(&v.config, &params, &names, &batches, kind, d),
                    &unflat(&b, &theta),
                    lambda,
                    4 * p as usize,
                    1e-12,
                )
                .unwrap();
                let err = (flat(&x) - &direct).abs().max().double_value(&[]) / direct.abs().max().double_value(&[]);
                assert!(err < 1e-8, "{arch:?} {kind:?}: CG off by {err} after {} iterations", solve.iterations);
                assert!(solve.relative_residual < 1e-11);
            }
        }
    }

    #[test]
    fn negative_curvature_is_refused_not_solved() {
        // A = −I: the first direction already has negative curvature.
        let b = vec![Tensor::ones([3], (Kind::Double, Device::Cpu))];
        let err = conjugate_gradients(|d| Ok(d.iter().map(|t| -t).collect()), &b, 0.5, 10, 1e-9).unwrap_err();
        assert!(err.to_string().contains("raise --damping"), "{err}");
    }

    #[test]
    fn poison_gradient_matches_finite_differences_and_verify_is_exact() {
        let (clean, adv) = (clean(), adv());
        let poisons = vec![enc(&[6, 7, 8], 1), enc(&[9, 10], 1)];
        // Classifier objectives: a language model is attacked through the bi-level one.
        for arch in crate::victims::model::classifier_archs() {
            let v = tiny(arch, 6);
            for (kind, contrastive) in [(HessianKind::GaussNewton, false), (HessianKind::GaussNewton, true)] {
                let inf = Influence::new(&v, &clean, &adv, &[12, 13], &rollout(), cfg(kind, contrastive), None).unwrap();
                assert!(inf.solve.relative_residual < 1e-12);
                let (g, grad) = inf.objective_and_grad(&poisons).unwrap();
                assert!((g - inf.value(&poisons)).abs() < 1e-12, "{arch:?}: per-example scores add up to the batched value");
                let params = v.params();
                let (ids, targets) = batch_tensors(&poisons.iter().collect::<Vec<_>>(), Device::Cpu);
                let (emb, mask) = (embed(&params, &ids).detach(), mask_of(&ids, &params));
                let value_at = |e: &Tensor| {
                    let tensors: Vec<&Tensor> = inf.names.iter().map(|n| &params[n]).collect();
                    let loss = targets.summed_nll(&forward(&v.config, &params, e, &mask));
                    let grads = Tensor::run_backward(&[&loss], &tensors, false, false);
                    inf.adv_value - dot(&grads, &inf.v) / inf.n
                };
                let worst = crate::testing::worst_fd_error(&emb, &grad, 1e-6, 1e-4, value_at);
                assert!(worst < 1e-6, "{arch:?} {kind:?}: relative error {worst}");
                let swaps: Vec<Swap> = (0..2)
                    .flat_map(|i| (0..poisons[i].ids.len()).flat_map(move |p| (2..14).map(move |w| Swap { poison: i, position: p, word: w })))
                    .collect();
                let out = inf.verify(&poisons, &swaps).unwrap();
                assert!((out.before - g).abs() < 1e-12);
                assert!(out.after < out.before && out.accepted.len() <= 2, "{arch:?} {kind:?}: before {} after {} accepted {:?}", out.before, out.after, out.accepted);
                let total: f64 = out.accepted.iter().map(|(_, d)| d).sum();
                assert!((out.before + total - out.after).abs() < 1e-12, "separable: the changes add up");
            }
        }
    }

    #[test]
    fn a_cached_solve_gives_the_same_objective_and_another_setting_solves_again() {
        let (clean, adv) = (clean(), adv());
        let poisons = vec![enc(&[6, 7, 8], 1), enc(&[9, 10], 1)];
        let v = tiny(Arch::Bow, 6);
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().to_str().unwrap();
        let fresh = Influence::new(&v, &clean, &adv, &[12, 13], &rollout(), cfg(HessianKind::GaussNewton, false), Some(cache)).unwrap();
        assert_eq!(std::fs::read_dir(cache).unwrap().count(), 1);
        let cached = Influence::new(&v, &clean, &adv, &[12, 13], &rollout(), cfg(HessianKind::GaussNewton, false), Some(cache)).unwrap();
        assert_eq!(fresh.value(&poisons).to_bits(), cached.value(&poisons).to_bits());
        assert_eq!(fresh.solve.iterations, cached.solve.iterations);
        assert!(!fresh.solve.cached && cached.solve.cached);
        let mut other = cfg(HessianKind::GaussNewton, false);
        other.damping = 0.25;
        let third = Influence::new(&v, &clean, &adv, &[12, 13], &rollout(), other, Some(cache)).unwrap();
        assert_eq!(std::fs::read_dir(cache).unwrap().count(), 2, "another damping is another v");
        assert_ne!(third.value(&poisons), fresh.value(&poisons));
    }
}
