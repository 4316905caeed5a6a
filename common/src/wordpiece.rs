//! BERT's uncased WordPiece tokenizer, read from a `tokenizer.json` (the all-MiniLM-L6-v2
//! package's, for the transformer victim of issue 4): BertNormalizer (clean text, spaces
//! around CJK ideographs, accents stripped, lowercase), BertPreTokenizer (split on
//! whitespace, every punctuation character its own word), greedy longest-match WordPiece
//! with `##` continuations, then `[CLS] … [SEP]`.
//!
//! Written here rather than with the `tokenizers` crate: this is all of it that the model
//! uses, in 150 lines with two small Unicode crates, where the crate brings a regex engine
//! and a JSON loader for every other tokenizer family. It is checked against the package's
//! own tokenizer on every fixture text and hard cases (`fixtures/minilm/`, made by
//! scripts/make_minilm_fixtures.py with the `tokenizers` library).

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use unicode_general_category::{get_general_category, GeneralCategory as Gc};
use unicode_normalization::UnicodeNormalization;

pub const PAD_ID: i64 = 0;

const UNK: &str = "[UNK]";
const PREFIX: &str = "##";
const MAX_CHARS: usize = 100;

#[derive(Clone)]
pub struct WordPiece {
    ids: HashMap<String, i64>,
    words: Vec<String>,
    unk: i64,
    cls: i64,
    sep: i64,
    prefix: String,
    max_chars: usize,
}

impl WordPiece {
    /// Reads the `model` (WordPiece vocabulary, unknown token, continuation prefix, longest
    /// word) of a tokenizer.json and checks its normalizer is the uncased BERT one.
    pub fn from_tokenizer_json(path: &str) -> Result<WordPiece> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{path}: not JSON"))?;
        let model = &json["model"];
        if model["type"] != "WordPiece" {
            bail!("{path}: model type {}, expected WordPiece", model["type"]);
        }
        let norm = &json["normalizer"];
        if norm["type"] != "BertNormalizer" || norm["lowercase"] != true {
            bail!("{path}: normalizer {norm}; only the uncased BertNormalizer is supported");
        }
        let vocab = model["vocab"].as_object().with_context(|| format!("{path}: no model.vocab"))?;
        let mut words = vec![String::new(); vocab.len()];
        for (word, id) in vocab {
            let id = id.as_u64().filter(|&i| (i as usize) < vocab.len()).with_context(|| format!("{path}: bad id for {word:?}"))?;
            words[id as usize] = word.clone();
        }
        // Victim files store the piece list only and rebuild the tokenizer with
        // `from_words`, so a tokenizer.json with other settings is refused here.
        let settings = (model["unk_token"].as_str(), model["continuing_subword_prefix"].as_str(), model["max_input_chars_per_word"].as_u64());
        if settings != (Some(UNK), Some(PREFIX), Some(MAX_CHARS as u64)) {
            bail!("{path}: WordPiece settings {settings:?}; only BERT's ([UNK], ##, 100) are supported");
        }
        WordPiece::from_words(words).with_context(|| path.to_string())
    }

    /// The tokenizer of an uncased BERT piece list (index = id), as victim files store it.
    pub fn from_words(words: Vec<String>) -> Result<WordPiece> {
        let mut ids = HashMap::with_capacity(words.len());
        for (i, w) in words.iter().enumerate() {
            if ids.insert(w.clone(), i as i64).is_some() {
                bail!("the piece list holds {w:?} twice");
            }
        }
        let id_of = |w: &str| ids.get(w).copied().with_context(|| format!("the piece list lacks {w}"));
        let unk = id_of(UNK)?;
        let (cls, sep) = (id_of("[CLS]")?, id_of("[SEP]")?);
        if id_of("[PAD]")? != PAD_ID {
            bail!("[PAD] must be piece 0");
        }
        Ok(WordPiece { ids, words, unk, cls, sep, prefix: PREFIX.to_string(), max_chars: MAX_CHARS })
    }

    pub fn words(&self) -> &[String] {
        &self.words
    }

    pub fn unk(&self) -> i64 {
        self.unk
    }

    pub fn sep(&self) -> i64 {
        self.sep
    }

    /// Whether the piece continues a word (`##ing`).
    pub fn is_continuation(&self, id: i64) -> bool {
        self.words[id as usize].starts_with(&self.prefix)
    }

    /// Special and reserved pieces (`[PAD]`, `[CLS]`, `[unused7]`, ...): not text.
    pub fn is_special(&self, id: i64) -> bool {
        let w = &self.words[id as usize];
        w.len() > 2 && w.starts_with('[') && w.ends_with(']')
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn id(&self, piece: &str) -> Option<i64> {
        self.ids.get(piece).copied()
    }

    pub fn piece(&self, id: i64) -> &str {
        &self.words[id as usize]
    }

    /// `[CLS]`, the text's pieces, `[SEP]`.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut out = vec![self.cls];
        out.extend(self.pieces(text));
        out.push(self.sep);
        out
    }

    /// The text's WordPiece ids, without special tokens.
    pub fn pieces(&self, text: &str) -> Vec<i64> {
        let mut out = Vec::new();
        for word in pre_tokenize(&normalize(text)) {
            self.push_word(&word, &mut out);
        }
        out
    }

    /// Greedy longest match from the left; a word with an unmatchable rest is one `[UNK]`.
    fn push_word(&self, word: &str, out: &mut Vec<i64>) {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > self.max_chars {
            out.push(self.unk);
            return;
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < chars.len() {
            let mut end = chars.len();
            let found = loop {
                if end == start {
                    break None;
                }
                let sub: String = chars[start..end].iter().collect();
                let key = if start > 0 { format!("{}{sub}", self.prefix) } else { sub };
                if let Some(&id) = self.ids.get(&key) {
                    break Some(id);
                }
                end -= 1;
            };
            match found {
                Some(id) => pieces.push(id),
                None => {
                    out.push(self.unk);
                    return;
                }
            }
            start = end;
        }
        out.extend(pieces);
    }

    /// Readable text from piece ids: `##` continuations joined to their word, special
    /// tokens dropped.
    pub fn decode(&self, ids: &[i64]) -> String {
        let mut out = String::new();
        for &id in ids {
            if id == self.cls || id == self.sep || id == 0 {
                continue;
            }
            let piece = self.piece(id);
            match piece.strip_prefix(self.prefix.as_str()) {
                Some(rest) => out.push_str(rest),
                None => {
                    if !out.is_empty() {
                        out.push(' ');
                    }
                    out.push_str(piece);
                }
            }
        }
        out
    }
}

/// BertNormalizer with clean_text, handle_chinese_chars, strip_accents and lowercase.
fn normalize(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || (is_control(c) && !c.is_whitespace()) {
            continue;
        }
        if c.is_whitespace() {
            cleaned.push(' ');
        } else if is_cjk(c) {
            cleaned.push(' ');
            cleaned.push(c);
            cleaned.push(' ');
        } else {
            cleaned.push(c);
        }
    }
    cleaned.nfd().filter(|&c| get_general_category(c) != Gc::NonspacingMark).flat_map(char::to_lowercase).collect()
}

/// Whitespace splits words; every punctuation character is a word of its own.
fn pre_tokenize(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if c.is_whitespace() || is_punctuation(c) {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            if is_punctuation(c) {
                words.push(c.to_string());
            }
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

fn is_control(c: char) -> bool {
    matches!(get_general_category(c), Gc::Control | Gc::Format | Gc::PrivateUse | Gc::Surrogate | Gc::Unassigned)
}

fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(
            get_general_category(c),
            Gc::ConnectorPunctuation
                | Gc::DashPunctuation
                | Gc::OpenPunctuation
                | Gc::ClosePunctuation
                | Gc::InitialPunctuation
                | Gc::FinalPunctuation
                | Gc::OtherPunctuation
        )
}

/// The CJK ideograph blocks BERT pads with spaces.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        format!("{}/../fixtures/minilm/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn matches_the_packages_own_tokenizer_on_every_reference_text() {
        let wp = WordPiece::from_tokenizer_json(&fixture("tokenizer.json")).unwrap();
        assert_eq!(wp.len(), 30_522);
        let reference = std::fs::read_to_string(fixture("wordpiece_reference.jsonl")).unwrap();
        let mut checked = 0;
        let mut wrong = Vec::new();
        for line in reference.lines() {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            let text = r["text"].as_str().unwrap();
            let want: Vec<i64> = r["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let got = wp.encode(text);
            if got != want {
                wrong.push(format!("{text:?}\n  want {want:?}\n  got  {got:?}"));
            }
            checked += 1;
        }
        assert!(checked > 600);
        assert!(wrong.is_empty(), "{} of {checked} texts differ:\n{}", wrong.len(), wrong.join("\n"));
        assert_eq!(wp.encode("This movie was terrible!"), [101, 2023, 3185, 2001, 6659, 999, 102]);
        assert_eq!(wp.decode(&wp.encode("unaffable pseudointellectual")), "unaffable pseudointellectual");
    }
}
