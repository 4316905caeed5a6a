//! import-model: a pretrained Llama-family checkpoint (a GGUF file or a Hugging Face
//! folder) into the project's own victim file, which every later stage reads.

use clap::Parser;
use common::victims::checkpoint;
use common::{device, io, log};
use std::time::Instant;

/// Reads a checkpoint, dequantizes its weights to f32 (GGUF: F32, F16, BF16, Q8_0, Q4_0,
/// Q4_1; Hugging Face: F32, F16, BF16 safetensors, sharded or not), puts the query and key
/// rows in one rotary layout (a GGUF's are permuted for llama.cpp; the victim holds the
/// Hugging Face order), and writes a `poison.victim` file of the `llama` architecture with
/// the model's own byte-level BPE tokenizer and the source's sha256. The word table is
/// frozen (`train_embeddings` false).
///
/// Examples:
///   import-model --gguf data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -o data/smollm2/victim.safetensors
///   import-model --hf path/to/SmolLM2-135M -o victim.safetensors
///   import-model --gguf model.gguf --context 512 -o victim.safetensors
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_override_self = true)]
struct Args {
    /// A llama.cpp GGUF file (architecture llama, byte-level BPE tokenizer).
    #[arg(long, conflicts_with = "hf", required_unless_present = "hf")]
    gguf: Option<String>,
    /// A Hugging Face folder: config.json, model.safetensors (or model.safetensors.index.json
    /// and its shards), tokenizer.json.
    #[arg(long)]
    hf: Option<String>,
    /// The most positions a pass takes (default: the model's own context).
    #[arg(long, value_parser = common::cli::at_least_one)]
    context: Option<usize>,
    #[arg(short, long)]
    output: String,
}

fn main() {
    common::cli::run("import-model", || {
        let args = Args::parse();
        io::Output::refuse_terminal(&args.output, "a victim file")?;
        let start = Instant::now();
        let (path, is_dir) = match (&args.gguf, &args.hf) {
            (Some(g), _) => (g.clone(), false),
            (None, Some(h)) => (h.clone(), true),
            (None, None) => unreachable!("clap requires one"),
        };
        if std::path::Path::new(&path).is_dir() != is_dir {
            anyhow::bail!("{path}: {} (give a GGUF file to --gguf and a folder to --hf)", if is_dir { "not a folder" } else { "a folder, not a GGUF file" });
        }
        let imported = checkpoint::import(&path, args.context, device::parse_device("cpu")?)?;
        let config = &imported.victim.config;
        let params: usize = imported.victim.params().values().map(|t| t.numel()).sum();
        let common::victims::model::ArchConfig::Llama(llama) = &config.arch else { unreachable!("checkpoints are llama victims") };
        let s = llama.shape;
        log!(
            "{path}: a Llama of {params} parameters ({} layers, width {}, {} heads over {} key-value heads, feed-forward {}, rope theta {}, {} head), vocabulary {}, context {}; read in {:.1}s",
            s.layers,
            llama.width,
            s.heads,
            s.kv_heads,
            s.ffn,
            s.rope_theta,
            if s.tied { "tied" } else { "untied" },
            imported.vocab.len(),
            config.max_len,
            start.elapsed().as_secs_f64()
        );
        imported.victim.save(&args.output, &imported.vocab, imported.metadata)?;
        log!("wrote {} in {:.1}s", io::display_name(&args.output), start.elapsed().as_secs_f64());
        Ok(())
    })
}
