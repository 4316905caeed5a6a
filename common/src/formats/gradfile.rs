//! The gradient file rollout-grad writes and rank-candidates reads (FORMATS.md): the
//! objective's gradient with respect to every poison token embedding, the poisons' token
//! ids, and what they were computed from, as a typed struct over the file's string
//! metadata.

use crate::formats::records::{InfluenceConfig, ObjectiveKind, RolloutConfig};
use crate::tensorfile;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

pub const GRAD_FORMAT: &str = "poison.rollout_grad";
/// 2: `victim_sha256` metadata added. 3: `target_scores` became `word_scores` (a trained
/// table's row term joins a language model's target term).
pub const GRAD_VERSION: u32 = 3;

/// What a gradient was computed from; stored as the file's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GradMeta {
    /// The objective's value at the poisons.
    pub objective: f64,
    pub objective_kind: ObjectiveKind,
    pub rollout: RolloutConfig,
    /// sha256 of each clean victim of the hardness objective's ensemble (empty: none).
    pub ensemble_sha256: Vec<String>,
    /// The influence objective's settings (None for the other objectives).
    pub influence: Option<InfluenceConfig>,
    /// `objectives::swaps::poison_set_sha256` of the poison set.
    pub poisons_sha256: String,
    pub victim_sha256: String,
    pub vocab_sha256: String,
    /// The poisons' record ids, in order.
    pub poison_ids: Vec<String>,
    /// Per poison, the positions that hold the trigger words' replacements.
    pub substitutes: Vec<Vec<usize>>,
}

/// A gradient file: grad [N, T, D] (f32), ids [N, T] (0 = padding), for a language model
/// or a victim that trains its table the word scores [N, T, V]
/// (`objectives::bilevel::BiLevel::objective_grad_and_word_scores`), and its metadata.
pub struct GradFile {
    pub grad: Tensor,
    pub ids: Tensor,
    pub word_scores: Option<Tensor>,
    pub meta: GradMeta,
}

impl GradFile {
    pub fn write(&self, path: &str) -> Result<()> {
        let m = &self.meta;
        let mut meta = BTreeMap::new();
        // `{:.17e}` round-trips every f64.
        meta.insert("objective".into(), format!("{:.17e}", m.objective));
        meta.insert("rollout".into(), serde_json::to_string(&m.rollout)?);
        meta.insert("substitutes".into(), serde_json::to_string(&m.substitutes)?);
        meta.insert("objective_kind".into(), serde_json::to_string(&m.objective_kind)?);
        meta.insert("ensemble_sha256".into(), serde_json::to_string(&m.ensemble_sha256)?);
        if let Some(influence) = &m.influence {
            meta.insert("influence".into(), serde_json::to_string(influence)?);
        }
        meta.insert("poisons_sha256".into(), m.poisons_sha256.clone());
        meta.insert("victim_sha256".into(), m.victim_sha256.clone());
        meta.insert("poison_ids".into(), serde_json::to_string(&m.poison_ids)?);
        meta.insert("vocab_sha256".into(), m.vocab_sha256.clone());
        let mut tensors = vec![("grad".to_string(), self.grad.to_kind(Kind::Float)), ("ids".to_string(), self.ids.shallow_clone())];
        if let Some(t) = &self.word_scores {
            tensors.push(("word_scores".to_string(), t.to_kind(Kind::Float)));
        }
        tensorfile::write(path, GRAD_FORMAT, GRAD_VERSION, &tensors, meta)
    }

    /// Reads and checks a gradient file (or stdin for `-`): the shapes agree, the
    /// gradient is finite, every metadata key parses. Keys older files lack default to
    /// the bi-level objective, no ensemble, no influence settings and no substitutes.
    pub fn read(path: &str) -> Result<GradFile> {
        let file = tensorfile::read(path, GRAD_FORMAT, GRAD_VERSION)?;
        Self::from_file(&file).with_context(|| crate::io::display_name(path))
    }

    fn from_file(file: &tensorfile::TensorFile) -> Result<GradFile> {
        let grad = file.tensor("grad")?.to_kind(Kind::Float);
        if !bool::try_from(grad.isfinite().all())? {
            bail!("the gradient holds NaN or Inf; rerun rollout-grad (with a lower --eta if its objective diverged)");
        }
        let ids = file.tensor("ids")?.shallow_clone();
        let poison_ids: Vec<String> = serde_json::from_str(file.meta("poison_ids")?).context("poison_ids")?;
        let (n, t, _) = grad.size3().context("grad must be [poisons, tokens, dim]")?;
        if ids.size() != [n, t] || poison_ids.len() != n as usize {
            bail!("ids {:?} and {} poison ids do not match grad {:?}", ids.size(), poison_ids.len(), grad.size());
        }
        let word_scores = match file.tensors.get("word_scores") {
            None => None,
            Some(t) => {
                let t = t.to_kind(Kind::Float);
                if t.dim() != 3 || t.size()[0] != n || t.size()[1] != grad.size()[1] {
                    bail!("word_scores {:?} do not match grad {:?}", t.size(), grad.size());
                }
                if !bool::try_from(t.isfinite().all())? {
                    bail!("the word scores hold NaN or Inf; rerun rollout-grad (with a lower --eta if its objective diverged)");
                }
                Some(t)
            }
        };
        let substitutes: Vec<Vec<usize>> = file.meta_json("substitutes")?.unwrap_or_else(|| vec![Vec::new(); n as usize]);
        if substitutes.len() != n as usize {
            bail!("substitutes for {} poisons, gradients for {n}", substitutes.len());
        }
        let meta = GradMeta {
            objective: file.meta("objective")?.parse().context("objective")?,
            objective_kind: file.meta_json("objective_kind")?.unwrap_or_default(),
            rollout: serde_json::from_str(file.meta("rollout")?).context("rollout")?,
            ensemble_sha256: file.meta_json("ensemble_sha256")?.unwrap_or_default(),
            influence: file.meta_json("influence")?,
            poisons_sha256: file.meta("poisons_sha256")?.to_string(),
            victim_sha256: file.meta("victim_sha256")?.to_string(),
            vocab_sha256: file.meta("vocab_sha256")?.to_string(),
            poison_ids,
            substitutes,
        };
        Ok(GradFile { grad, ids, word_scores, meta })
    }

    pub fn len(&self) -> usize {
        self.meta.poison_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.poison_ids.is_empty()
    }
}
