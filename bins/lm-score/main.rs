//! lm-score: a language-model victim's tokens and next-token log-probabilities for texts;
//! perplexity on stderr.

use anyhow::bail;
use clap::Parser;
use common::formats::records::{Example, LmScore};
use common::generate::next_token_logprobs;
use common::io::{self, Output, Record};
use common::victims::model::Victim;
use common::{device, log};
use std::time::Instant;

/// Reads example records (their `text`) and writes one lm_score record per text, in input
/// order: its token ids under the victim's tokenizer and the log-probability of each token
/// after the ones before it. The perplexity over all scored tokens (every text's first token
/// is not scored) goes to stderr. Conventions: no beginning-of-text token unless the
/// model's tokenizer adds one, no chat template, control tokens written in a text are text.
///
/// Examples:
///   lm-score --victim data/smollm2/victim.safetensors < data/rt-.../test.jsonl > scores.jsonl
///   echo '{"kind":"example","v":1,"id":"a","text":"The Apple iPhone is","label":0}' | lm-score --victim data/smollm2/victim.safetensors
///   lm-score --victim data/smollm2/victim.safetensors --tokens-only < texts.jsonl | jq -c .ids
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_override_self = true)]
struct Args {
    /// A language-model victim (import-model, or train-victim --arch gpt).
    #[arg(long)]
    victim: String,
    /// Example records (JSONL; - for stdin).
    #[arg(long, default_value = "-")]
    texts: String,
    /// Tokenize only: `logprobs` stay empty and the model is not run.
    #[arg(long)]
    tokens_only: bool,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 8, value_parser = common::cli::at_least_one)]
    batch: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("lm-score", || {
        let args = Args::parse();
        io::Output::refuse_terminal(&args.output, "scores")?;
        let start = Instant::now();
        let loaded = Victim::load(&args.victim, device::parse_device(&args.device)?)?;
        let (victim, vocab) = (&loaded.victim, &loaded.vocab);
        if victim.config.output() != common::victims::victim::Output::NextToken {
            bail!("{} is a {:?} victim; lm-score reads language models (import-model, train-victim --arch gpt)", args.victim, victim.config.arch.name());
        }
        let name = io::display_name(&args.texts);
        let records: Vec<Example> = io::read_jsonl_from(&io::read_all(&args.texts)?[..], &name, false)?;
        let mut rows = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            let ids = vocab.encode(&r.text);
            if ids.is_empty() {
                bail!("{name}: record {} (id {:?}): the text is empty; drop the record", i + 1, r.id);
            }
            if ids.len() > victim.config.max_len {
                bail!(
                    "{name}: record {} (id {:?}): the text has {} tokens, longer than the victim's context of {}; shorten it or import the model with a longer --context",
                    i + 1,
                    r.id,
                    ids.len(),
                    victim.config.max_len
                );
            }
            rows.push(ids);
        }
        let logprobs = if args.tokens_only { vec![Vec::new(); rows.len()] } else { next_token_logprobs(&victim.config, &victim.params(), &rows, args.batch) };
        let (mut nll, mut scored) = (0.0, 0usize);
        let mut out = Output::create(&args.output)?;
        for ((r, ids), lp) in records.iter().zip(rows).zip(logprobs) {
            if let Some(bad) = lp.iter().find(|x| !x.is_finite()) {
                bail!("{}: record {:?}: a log-probability is {bad}; the victim's weights are broken", args.victim, r.id);
            }
            nll -= lp.iter().sum::<f64>();
            scored += lp.len();
            out.write_record(&LmScore { kind: LmScore::KIND.into(), v: LmScore::VERSION, id: r.id.clone(), ids, logprobs: lp, victim_sha256: loaded.sha256.clone() })?;
        }
        out.commit()?;
        if !args.tokens_only {
            log!("{} texts, {scored} tokens scored: perplexity {:.4} ({:.1}s)", records.len(), (nll / scored.max(1) as f64).exp(), start.elapsed().as_secs_f64());
        }
        Ok(())
    })
}
