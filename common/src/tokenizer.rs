//! Word-level, lowercase tokenizer compatible with GloVe 6B's vocabulary (which was built
//! with the Stanford PTB tokenizer): punctuation split off, `n't` and `'s`-style clitics
//! separated, curly quotes normalised. The vocabulary maps words to rows of the embedding
//! table; index 0 is padding and 1 the unknown word.

use anyhow::{bail, Result};
use std::collections::HashMap;

pub const PAD: &str = "<pad>";
pub const UNK: &str = "<unk>";
pub const PAD_ID: i64 = 0;
pub const UNK_ID: i64 = 1;

const CLITICS: [&str; 6] = ["'s", "'re", "'ve", "'ll", "'d", "'m"];

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '\'' || c == '-' || c == '&'
}

/// Splits text into lowercase tokens the way GloVe's corpus was tokenised.
pub fn tokenize(text: &str) -> Vec<String> {
    let normalised: String = text
        .chars()
        .map(|c| match c {
            '\u{2018}' | '\u{2019}' | '`' => '\'',
            '\u{201c}' | '\u{201d}' => '"',
            '\u{2013}' | '\u{2014}' => '-',
            c => c,
        })
        .collect::<String>()
        .to_lowercase();
    let mut out = Vec::new();
    for chunk in normalised.split_whitespace() {
        split_chunk(chunk, &mut out);
    }
    out
}

fn split_chunk(chunk: &str, out: &mut Vec<String>) {
    let chars: Vec<char> = chunk.chars().collect();
    let n = chars.len();
    let mut i = 0;
    while i < n {
        let rest: String = chars[i..].iter().collect();
        // "..." and "--" are single tokens in GloVe.
        if rest.starts_with("...") || rest.starts_with("--") {
            out.push(rest[..if rest.starts_with("...") { 3 } else { 2 }].to_string());
            i += if rest.starts_with("...") { 3 } else { 2 };
            continue;
        }
        if !chars[i].is_alphanumeric() {
            // Other punctuation: one character a token.
            out.push(chars[i].to_string());
            i += 1;
            continue;
        }
        // A word: a run of letters, digits and ' - & . characters ...
        let mut j = i;
        while j < n && (is_word_char(chars[j]) || chars[j] == '.') {
            j += 1;
        }
        let run: String = chars[i..j].iter().collect();
        // ... where a '.' stays only inside a number ("2.5") or an abbreviation ("u.s.").
        let abbreviation = run.ends_with('.')
            && run.len() > 2
            && run.split('.').filter(|p| !p.is_empty()).all(|p| p.chars().count() <= 2);
        if !abbreviation {
            if let Some(k) = (i..j).find(|&k| {
                chars[k] == '.'
                    && !(k > i && k + 1 < j && chars[k - 1].is_ascii_digit() && chars[k + 1].is_ascii_digit())
            }) {
                j = k;
            }
        }
        let word: String = chars[i..j].iter().collect();
        push_word(&word, out);
        i = j;
    }
}

/// Separates clitics and trailing apostrophes/hyphens from a word.
fn push_word(word: &str, out: &mut Vec<String>) {
    let trimmed = word.trim_end_matches(['\'', '-']);
    let tail = &word[trimmed.len()..];
    let w = trimmed;
    if w.is_empty() {
        for c in word.chars() {
            out.push(c.to_string());
        }
        return;
    }
    if let Some(stem) = w.strip_suffix("n't") {
        if !stem.is_empty() {
            out.push(stem.to_string());
        }
        out.push("n't".into());
    } else if let Some(c) = CLITICS.iter().find(|c| w.ends_with(*c) && w.len() > c.len()) {
        out.push(w[..w.len() - c.len()].to_string());
        out.push((*c).to_string());
    } else {
        out.push(w.to_string());
    }
    for c in tail.chars() {
        out.push(c.to_string());
    }
}

/// Word → row of the embedding table.
#[derive(Debug, Clone)]
pub struct Vocab {
    words: Vec<String>,
    index: HashMap<String, i64>,
}

impl Vocab {
    /// `words[0]` must be `<pad>` and `words[1]` `<unk>`.
    pub fn new(words: Vec<String>) -> Result<Vocab> {
        if words.len() < 2 || words[0] != PAD || words[1] != UNK {
            bail!("a vocabulary must start with {PAD:?} and {UNK:?}");
        }
        let mut index = HashMap::with_capacity(words.len());
        for (i, w) in words.iter().enumerate() {
            if index.insert(w.clone(), i as i64).is_some() {
                bail!("the vocabulary lists {w:?} twice");
            }
        }
        Ok(Vocab { words, index })
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn words(&self) -> &[String] {
        &self.words
    }

    pub fn id(&self, word: &str) -> Option<i64> {
        self.index.get(word).copied()
    }

    pub fn word(&self, id: i64) -> &str {
        &self.words[id as usize]
    }

    /// Token ids of a text. Unknown hyphenated words fall back to their parts.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        for tok in tokenize(text) {
            self.push_token(&tok, &mut ids);
        }
        ids
    }

    fn push_token(&self, tok: &str, ids: &mut Vec<i64>) {
        if let Some(id) = self.id(tok) {
            ids.push(id);
        } else if tok.contains('-') && tok.len() > 1 {
            for (i, part) in tok.split('-').enumerate() {
                if i > 0 {
                    ids.push(self.id("-").unwrap_or(UNK_ID));
                }
                if !part.is_empty() {
                    ids.push(self.id(part).unwrap_or(UNK_ID));
                }
            }
        } else {
            ids.push(UNK_ID);
        }
    }

    /// sha256 of the vocabulary (words joined by newlines): ties weights to a vocabulary.
    pub fn sha256(&self) -> String {
        crate::io::sha256_hex(self.words.join("\n").as_bytes())
    }

    /// The tokens of a trigger phrase; every one must be a known word.
    pub fn trigger_words(&self, phrase: &str) -> Result<Vec<String>> {
        let words = tokenize(phrase);
        if words.is_empty() {
            bail!("the trigger {phrase:?} holds no words");
        }
        let unknown: Vec<&String> = words.iter().filter(|w| self.id(w).is_none()).collect();
        if !unknown.is_empty() {
            bail!(
                "trigger {phrase:?}: {unknown:?} not in the vocabulary ({} words); pick another trigger or rebuild the vocabulary with build-vocab --extra-words",
                self.len()
            );
        }
        Ok(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizes_like_glove() {
        assert_eq!(
            tokenize("It's always fascinating to watch Marker the essayist at work."),
            ["it", "'s", "always", "fascinating", "to", "watch", "marker", "the", "essayist", "at", "work", "."]
        );
        assert_eq!(tokenize("Don't \"wait\"... (really)!"), ["do", "n't", "\"", "wait", "\"", "...", "(", "really", ")", "!"]);
        assert_eq!(tokenize("A three-hour cinema master class."), ["a", "three-hour", "cinema", "master", "class", "."]);
        assert_eq!(tokenize("the U.S. version, 2.5 stars."), ["the", "u.s.", "version", ",", "2.5", "stars", "."]);
        assert_eq!(tokenize("James Bond’s car -- fast"), ["james", "bond", "'s", "car", "--", "fast"]);
        assert_eq!(tokenize("can't won't"), ["ca", "n't", "wo", "n't"]);
        assert!(tokenize("   ").is_empty());
    }

    #[test]
    fn vocab_encodes_and_checks_triggers() {
        let words = [PAD, UNK, "james", "bond", "three", "hour", "-", "."].map(String::from).to_vec();
        let v = Vocab::new(words).unwrap();
        assert_eq!(v.encode("James Bond."), vec![2, 3, 7]);
        assert_eq!(v.encode("three-hour zzz"), vec![4, 6, 5, UNK_ID]);
        assert_eq!(v.trigger_words("James BOND").unwrap(), ["james", "bond"]);
        let err = v.trigger_words("James Blond").unwrap_err().to_string();
        assert!(err.contains("blond"), "{err}");
        assert!(v.trigger_words(" ,").is_err() || v.trigger_words(" ").is_err());
        assert!(Vocab::new(vec!["a".into()]).is_err());
    }
}
