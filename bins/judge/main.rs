//! judge: two sentiment judges of generated text, and how often they agree.

use clap::Parser;
use common::io::{self, Output, Record};
use common::eval::judge::{agreement, read, ClassifierJudge, LexiconJudge};
use common::victims::model::Victim;
use common::formats::records::{Generation, Judgement};
use common::{device, log};

/// Reads generation records (from generate) and writes one judgement per generation, in
/// input order: the sentiment classifier's P(negative) and VADER's compound score of the
/// continuation. Logs each judge's negative share and their agreement (Cohen's κ).
///
/// Examples:
///   generate --victim lm.safetensors < data/lm/asr_test.jsonl | judge --classifier rt-lstm.safetensors > judged.jsonl
///   judge --classifier rt-lstm.safetensors --generations gens.jsonl | jq -r 'select(.lexicon_negative) | .continuation'
///   judge --classifier rt-lstm.safetensors --labelled data/lm/dev.jsonl     # validate the judges
///
/// With --labelled, the judges are validated instead: each labelled text (example JSONL:
/// held-out reviews, or continuations a person read and labelled) is judged, and one JSON
/// line per judge gives its accuracy against the labels, Cohen's κ with them and the
/// shares called negative; the judges' agreement with each other goes to stderr.
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_override_self = true)]
struct Args {
    /// Generation records (generate's output; - for stdin).
    #[arg(long, default_value = "-", conflicts_with = "labelled")]
    generations: String,
    /// Labelled texts (example JSONL; label = the classifier's class, negative = --negative-class).
    #[arg(long)]
    labelled: Option<String>,
    /// A sentiment classifier victim (train-victim on the sentiment data).
    #[arg(long)]
    classifier: String,
    /// The classifier's negative class index (Rotten Tomatoes: 0).
    #[arg(long, default_value_t = 0)]
    negative_class: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("judge", || {
        let args = Args::parse();
        io::Output::refuse_terminal(&args.output, "judgements")?;
        let loaded = Victim::load(&args.classifier, device::parse_device(&args.device)?)?;
        let classifier = ClassifierJudge::new(&loaded.victim.config, loaded.victim.params(), &loaded.vocab, args.negative_class)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.classifier))?;
        let lexicon = LexiconJudge::default();
        if let Some(path) = &args.labelled {
            let name = io::display_name(path);
            let examples: Vec<common::formats::records::Example> = io::read_jsonl_from(&io::read_all(path)?[..], &name, false)?;
            if examples.is_empty() {
                anyhow::bail!("{name} holds no labelled texts");
            }
            let texts: Vec<String> = examples.iter().map(|e| e.text.clone()).collect();
            let negative: Vec<bool> = examples.iter().map(|e| e.label == args.negative_class).collect();
            let (scores, between) = common::eval::judge::validate(&classifier, &lexicon, &name, &texts, &negative);
            let mut out = Output::create(&args.output)?;
            for s in &scores {
                log!("{name}: {} accuracy {:.1}% (kappa {:.2} with the labels), calls {:.1}% negative against {:.1}% labelled", s.judge, s.accuracy_pct, s.kappa, s.negative_pct, s.labelled_negative_pct);
                out.write_record(s)?;
            }
            log!("{name}: the judges agree on {:.1}% (Cohen's kappa {:.2})", 100.0 * between.agree, between.kappa);
            return out.commit();
        }
        let name = io::display_name(&args.generations);
        let generations: Vec<Generation> = io::read_jsonl_from(&io::read_all(&args.generations)?[..], &name, false)?;
        let texts: Vec<String> = generations.iter().map(|g| g.continuation.clone()).collect();
        let mut out = Output::create(&args.output)?;
        let (mut by_classifier, mut by_lexicon) = (Vec::new(), Vec::new());
        for (g, r) in generations.iter().zip(read(&classifier, &lexicon, &texts)) {
            let (classifier_negative, lexicon_negative) = r.calls(true);
            let j = Judgement {
                kind: Judgement::KIND.into(),
                v: Judgement::VERSION,
                id: g.id.clone(),
                sample: g.sample,
                continuation: g.continuation.clone(),
                classifier_p_negative: r.p_negative,
                classifier_negative,
                lexicon_compound: r.compound,
                lexicon_negative,
            };
            by_classifier.push(j.classifier_negative);
            by_lexicon.push(j.lexicon_negative);
            out.write_record(&j)?;
        }
        out.commit()?;
        let share = |xs: &[bool]| 100.0 * xs.iter().filter(|&&x| x).count() as f64 / xs.len().max(1) as f64;
        let a = agreement(&by_classifier, &by_lexicon);
        log!(
            "{} continuations judged negative: classifier {:.1}%, lexicon {:.1}%; the judges agree on {:.1}% (Cohen's kappa {:.2})",
            generations.len(), share(&by_classifier), share(&by_lexicon), 100.0 * a.agree, a.kappa
        );
        Ok(())
    })
}
