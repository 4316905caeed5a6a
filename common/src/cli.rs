//! What every binary does the same way: error reporting, exit codes, closed pipes.

/// Runs a binary's body. Errors print `<bin>: <error chain>` on stderr and exit 1; a
/// closed stdout pipe (`| head`) exits quietly with 0, as Unix tools do.
pub fn run(bin: &str, body: impl FnOnce() -> anyhow::Result<()>) -> ! {
    keep_freed_memory();
    crate::numerics::pin();
    match body() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            if is_broken_pipe(&e) {
                std::process::exit(0);
            }
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("{bin}: error: {}", chain.join(": "));
            std::process::exit(1);
        }
    }
}

/// The environment variables with which a user sets glibc's allocator by hand; with any of
/// them set, `keep_freed_memory` leaves it as they chose. (Setting any of them also turns
/// off glibc's adaptive threshold, so none of them gives glibc's default back:
/// `KEEP_FREED_MEMORY=0` does.)
const MALLOC_VARS: [&str; 4] = ["MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"];

/// Makes glibc's allocator keep the memory libtorch frees for its next tensor instead of
/// handing it back to the kernel. By default glibc serves blocks above an adaptive
/// threshold (128 KiB, raised as such blocks are freed, never above 32 MiB) by fresh
/// mappings, and the kernel faults in and zeroes their pages at every first touch: every
/// step, for a translation victim's logits over a rollout batch (94 × 26 × 8,061 floats,
/// 79 MB). Measured on the translation demo's victim, half of a k = 3 verification's wall
/// time was kernel time (45 s, 24 s of it sys, for 6 candidates; 25 s with this, the same
/// bits; `make bench` prints the ratios). The price is a higher peak RSS (0.57 -> 0.96 GB
/// there), as freed blocks are reused rather than returned. Leaves the allocator alone
/// with `KEEP_FREED_MEMORY=0`, if the user set it (`MALLOC_VARS`), or on a C library other
/// than glibc.
///
/// One arena for every thread: a worker thread's own arena lives in mapped heaps of at
/// most 64 MiB that glibc shrinks with `madvise`, so the kernel zeroed pages again there
/// (verify-candidates on 2 workers: 54 s of sys time in 76 s, slower than 1 worker).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("KEEP_FREED_MEMORY").is_some_and(|v| v == "0") || MALLOC_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
            return;
        }
        extern "C" {
            fn mallopt(param: std::os::raw::c_int, value: std::os::raw::c_int) -> std::os::raw::c_int;
        }
        const M_TRIM_THRESHOLD: std::os::raw::c_int = -1;
        const M_MMAP_MAX: std::os::raw::c_int = -4;
        const M_ARENA_MAX: std::os::raw::c_int = -8;
        // Safe: mallopt only sets the allocator's parameters; called first in main, before
        // any other thread exists.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, std::os::raw::c_int::MAX);
            mallopt(M_ARENA_MAX, 1);
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// One log line on stderr, prefixed with the binary's name.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("{}: {}", env!("CARGO_BIN_NAME"), format!($($arg)*))
    };
}

use crate::victims::model::{Arch, VictimConfig};
use crate::train::TrainOptions;

/// The victim and training flags shared by train-victim and finetune-eval.
#[derive(Debug, Clone, clap::Args)]
pub struct VictimArgs {
    /// Victim architecture (minilm takes --pretrained instead of --embeddings).
    #[arg(long, value_enum, default_value = "lstm")]
    pub arch: Arch,
    /// LSTM units per direction (lstm), MLP width (bow) or model width (gpt).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub hidden: usize,
    /// Transformer blocks (gpt; seq2seq: in the encoder and in the decoder each).
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    pub layers: usize,
    /// Positions of a translation's source block (seq2seq): longer sources are truncated,
    /// and --max-len minus this is the decoder's.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub source_len: usize,
    /// Attention heads per block (gpt, seq2seq); they must divide --hidden.
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    pub heads: usize,
    /// Train the embedding table too (default: GloVe stays frozen).
    #[arg(long)]
    pub train_embeddings: bool,
    /// What fine-tuning a --base checkpoint (finetune-eval: a --start checkpoint) trains:
    /// all (every block, the final norm, an untied head), or top:N (the top N blocks, the
    /// final norm, an untied head; the lower blocks frozen, their output per text computed
    /// once and reused). The word table (and with it a tied head) follows
    /// --train-embeddings. Stored in the victim file: every stage that reads the victim
    /// trains the same.
    #[arg(long, default_value = "all")]
    pub regime: crate::victims::llama::Regime,
    /// Inputs are truncated to this many tokens.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_len: usize,
    /// Passes over the training data.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub epochs: usize,
    /// Examples per minibatch.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Adam learning rate [default: 2e-3; 5e-5 for minilm, as BERT fine-tuning uses].
    #[arg(long, value_parser = positive_rate)]
    pub lr: Option<f64>,
    /// Steps over which the learning rate rises linearly from 0 to --lr (0: from the
    /// first step).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Let the learning rate fall linearly to 0 at the last step (after any warm-up).
    #[arg(long)]
    pub decay: bool,
    /// Dropout probability in training (seq2seq: on the inputs and every residual
    /// branch); evaluation and the attack's unrolled steps run without it.
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    pub dropout: f64,
    /// Train on the target mixed with this share of the uniform distribution over the
    /// outputs (0.1 is the usual choice for translation).
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    pub label_smoothing: f64,
}

/// Where new victims start from (train-victim, finetune-eval): one of the three.
#[derive(Debug, Clone, clap::Args)]
#[group(multiple = false)]
pub struct OriginArgs {
    /// Embedding table and vocabulary from build-vocab (bow and lstm victims).
    #[arg(long)]
    pub embeddings: Option<String>,
    /// Pretrained encoder folder from scripts/fetch_minilm.sh (--arch minilm), e.g. data/minilm.
    #[arg(long)]
    pub pretrained: Option<String>,
    /// A pretrained language model's victim file (import-model), e.g.
    /// data/smollm2/victim.safetensors: it decides the architecture and shape (--arch,
    /// --hidden, --layers, --heads and --max-len do not apply), --regime what trains; the
    /// fine-tuned victim file holds what training changed and names this file by its hash.
    #[arg(long)]
    pub base: Option<String>,
}

impl OriginArgs {
    pub fn load(&self) -> anyhow::Result<crate::victims::origin::Origin> {
        match (&self.embeddings, &self.pretrained, &self.base) {
            (Some(e), _, _) => crate::victims::origin::Origin::embeddings(e),
            (None, Some(p), _) => crate::victims::origin::Origin::pretrained(p),
            (None, None, Some(c)) => crate::victims::origin::Origin::checkpoint(c),
            (None, None, None) => anyhow::bail!("give --embeddings FILE (from build-vocab), --pretrained DIR (--arch minilm) or --base FILE (import-model)"),
        }
    }
}

impl VictimArgs {
    /// The victim config these flags ask for, completed from where the victim starts (`origin`).
    pub fn victim_config(&self, base: &crate::victims::origin::Origin, num_classes: usize) -> anyhow::Result<VictimConfig> {
        base.victim_config(&crate::victims::origin::VictimShape {
            arch: self.arch,
            hidden: self.hidden,
            gpt: crate::victims::gpt::GptShape { layers: self.layers, heads: self.heads },
            source_len: self.source_len,
            num_classes,
            max_len: self.max_len,
            train_embeddings: self.train_embeddings,
            regime: self.regime,
        })
    }

    /// Training options: `--lr`, or the architecture's default.
    pub fn train_options(&self, config: &VictimConfig, seed: u64) -> TrainOptions {
        let lr = self.lr.unwrap_or(config.tuning().default_lr);
        TrainOptions {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr,
            seed,
            schedule: crate::train::Schedule { warmup: self.warmup, decay: self.decay },
            regularisation: crate::train::Regularisation { dropout: self.dropout, label_smoothing: self.label_smoothing },
        }
    }
}

/// The inputs every crafting stage (init-poisons, rollout-grad, rank-candidates,
/// verify-candidates) is given.
#[derive(Debug, Clone, clap::Args)]
pub struct CraftArgs {
    /// The victim θ_t the poisons are crafted against (from train-victim).
    #[arg(long)]
    pub victim: String,
    /// Data folder made by prepare-data (clean train split, D_adv, trigger and target).
    #[arg(long)]
    pub data: String,
}

/// The detection budget of init-poisons and verify-candidates (`detect::evasion`).
#[derive(Debug, Clone, clap::Args)]
pub struct EvadeArgs {
    /// Keep every poison at or below each cheap detector's threshold at this percentage
    /// of false positives on the clean training split: bigram perplexity, ONION, the two
    /// GloVe distances to the trigger (words closer to a trigger word than its threshold
    /// are never used; a base's own are substituted) and, with --minilm, MiniLM's.
    /// init-poisons skips bases whose poison is flagged; verify-candidates refuses flips.
    #[arg(long)]
    pub evade_fpr: Option<f64>,
    /// MiniLM package folder (scripts/fetch_minilm.sh, e.g. data/minilm): the budget
    /// covers the MiniLM sentence-embedding detector too.
    #[arg(long, requires = "evade_fpr")]
    pub minilm: Option<String>,
    /// Folder that keeps the budget's thresholds (and MiniLM's scores by text), so the
    /// training split is scored once for every stage that measures the same budget.
    #[arg(long, requires = "evade_fpr")]
    pub detector_cache: Option<String>,
    /// Only these detectors bound the budget (comma-separated; default: every one it
    /// measures). A lever for measuring what each costs.
    #[arg(long, value_delimiter = ',', requires = "evade_fpr")]
    pub evade_detectors: Vec<crate::detect::Detector>,
}

impl EvadeArgs {
    /// The budget these flags ask for (None without --evade-fpr), measured with the
    /// victim's word table on data folder `dir`.
    pub fn budget(&self, table: &tch::Tensor, vocab: &crate::tokenizer::Vocab, manifest: &crate::data::DataManifest, dir: &str) -> anyhow::Result<Option<crate::detect::evasion::DetectionBudget>> {
        let Some(fpr) = self.evade_fpr else { return Ok(None) };
        let mut budget = crate::detect::evasion::DetectionBudget::measure(table, vocab, manifest, dir, fpr, self.minilm.as_deref(), self.detector_cache.as_deref())?;
        if !self.evade_detectors.is_empty() {
            budget = budget.restrict(&self.evade_detectors)?;
        }
        eprintln!("{}", budget.describe());
        Ok(Some(budget))
    }
}

/// Which objective a crafting round minimises, and the extra victims of the hardness
/// objective's ensemble (rollout-grad; verify-candidates takes the same --ensemble).
#[derive(Debug, Clone, clap::Args)]
pub struct ObjectiveArgs {
    /// bilevel: the seed method's unrolled L_adv (second order); hardness: the poisons'
    /// mean target margin under clean victims (FINDINGS.md); influence: L_adv after
    /// training to convergence as influence functions predict it (one inverse-Hessian
    /// solve, then first order in the poisons).
    #[arg(long, value_enum, default_value = "bilevel")]
    pub objective: crate::objectives::hardness::ObjectiveKind,
    /// Extra clean victims averaged into the hardness objective besides --victim
    /// (repeatable; for example early checkpoints).
    #[arg(long)]
    pub ensemble: Vec<String>,
    #[command(flatten, next_help_heading = "Influence objective (--objective influence)")]
    pub influence: crate::objectives::influence::InfluenceConfig,
    /// Keep the influence objective's solved v in this folder and reuse it (it does not
    /// depend on the poisons: one solve serves every round of a crafting run).
    #[arg(long, help_heading = "Influence objective (--objective influence)")]
    pub influence_cache: Option<String>,
}

impl ObjectiveArgs {
    /// The influence settings when the objective is the influence one (what gradient files
    /// and candidates record).
    pub fn influence(&self) -> Option<crate::objectives::influence::InfluenceConfig> {
        (self.objective == crate::objectives::hardness::ObjectiveKind::Influence).then(|| self.influence.clone())
    }
}

/// Loads the extra victims of a hardness ensemble and their file hashes.
pub fn load_ensemble(paths: &[String], device: tch::Device) -> anyhow::Result<(Vec<crate::victims::model::Victim>, Vec<String>)> {
    let mut victims = Vec::new();
    let mut hashes = Vec::new();
    for p in paths {
        let loaded = crate::victims::model::Victim::load(p, device)?;
        victims.push(loaded.victim);
        hashes.push(loaded.sha256);
    }
    Ok((victims, hashes))
}

pub use crate::validate::{at_least_one, at_least_one_u64, positive_rate, probability};
