//! Word-level, lowercase tokenizer compatible with GloVe 6B's vocabulary (which was built
//! with the Stanford PTB tokenizer): punctuation split off, `n't` and `'s`-style clitics
//! separated, curly quotes normalised. The vocabulary maps words to rows of the embedding
//! table; index 0 is padding and 1 the unknown word.

use crate::bpe::{Bpe, BpeSpec};
use crate::wordpiece::WordPiece;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;

pub const PAD: &str = "<pad>";
pub const UNK: &str = "<unk>";
/// A translation's decoder start and end (`encode::encode_translation`): words no text
/// tokenizes into, special like `<pad>` and `<unk>`.
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub use crate::wordpiece::PAD_ID;
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

/// Token → row of the embedding table: GloVe words (`tokenize`, then one row per word,
/// `<pad>` = 0, `<unk>` = 1) or, for the MiniLM victim, BERT's WordPiece pieces
/// (`[CLS] pieces [SEP]`, `[PAD]` = 0), or a pretrained language model's byte-level BPE
/// pieces (`bpe::Bpe`). Every stage reads text through this type, so the
/// pipeline is the same for both; what differs is answered here (which ids are special,
/// what the trigger's tokens are, how ids read back as text).
#[derive(Clone)]
pub struct Vocab {
    words: Vec<String>,
    index: HashMap<String, i64>,
    wordpiece: Option<WordPiece>,
    bpe: Option<Bpe>,
}

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vocab({} {})", self.len(), if self.is_wordpiece() { "pieces" } else if self.is_bpe() { "BPE pieces" } else { "words" })
    }
}

/// What a victim file records as its tokenizer (metadata `tokenizer`; absent = words).
pub const WORDPIECE: &str = "wordpiece";
/// Byte-level BPE; its settings are the victim file's metadata `bpe` (`bpe::BpeSpec`
/// without the tokens, which are the vocabulary).
pub const BPE: &str = "bpe";

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
        Ok(Vocab { words, index, wordpiece: None, bpe: None })
    }

    /// The pieces of a WordPiece tokenizer as a vocabulary.
    pub fn from_wordpiece(wp: WordPiece) -> Vocab {
        let words = wp.words().to_vec();
        let index = words.iter().enumerate().map(|(i, w)| (w.clone(), i as i64)).collect();
        Vocab { words, index, wordpiece: Some(wp), bpe: None }
    }

    /// The pieces of a byte-level BPE tokenizer as a vocabulary (ids are the model's own:
    /// id 0 is a piece like any other, not padding).
    pub fn from_bpe(bpe: Bpe) -> Vocab {
        let words = bpe.spec().tokens.clone();
        let index = words.iter().enumerate().map(|(i, w)| (w.clone(), i as i64)).collect();
        Vocab { words, index, wordpiece: None, bpe: Some(bpe) }
    }

    /// A vocabulary as a victim file stores it: its token list, tokenizer name and (BPE)
    /// the tokenizer's settings.
    pub fn from_parts(words: Vec<String>, tokenizer: Option<&str>, bpe: Option<&str>) -> Result<Vocab> {
        match tokenizer {
            None => Vocab::new(words),
            Some(WORDPIECE) => Ok(Vocab::from_wordpiece(WordPiece::from_words(words)?)),
            Some(BPE) => {
                let mut spec: BpeSpec = serde_json::from_str(bpe.context("a BPE vocabulary without its settings (metadata bpe)")?).context("the BPE settings")?;
                spec.tokens = words;
                Ok(Vocab::from_bpe(Bpe::new(spec)?))
            }
            Some(other) => bail!("unknown tokenizer {other:?} (this build knows words, {WORDPIECE} and {BPE})"),
        }
    }

    /// The tokenizer name a victim file records (`None`: GloVe words).
    pub fn tokenizer_name(&self) -> Option<&'static str> {
        if self.bpe.is_some() {
            return Some(BPE);
        }
        self.wordpiece.as_ref().map(|_| WORDPIECE)
    }

    /// A BPE tokenizer's settings as the victim file stores them (metadata `bpe`).
    pub fn bpe_settings(&self) -> Option<String> {
        self.bpe.as_ref().map(|b| serde_json::to_string(b.spec()).expect("BPE settings serialise"))
    }

    pub fn is_bpe(&self) -> bool {
        self.bpe.is_some()
    }

    /// The byte-level BPE tokenizer, if the vocabulary is one.
    pub fn bpe(&self) -> Option<&Bpe> {
        self.bpe.as_ref()
    }

    pub fn is_wordpiece(&self) -> bool {
        self.wordpiece.is_some()
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

    /// The unknown token's id.
    pub fn unk_id(&self) -> i64 {
        if self.bpe.is_some() {
            // Byte-level BPE has no unknown token: every text is pieces.
            return -1;
        }
        self.wordpiece.as_ref().map_or(UNK_ID, |wp| wp.unk())
    }

    /// The position of `<s>` in a translation's token ids (the end of its source block), or
    /// None for a text.
    pub fn decoder_start(&self, ids: &[i64]) -> Option<usize> {
        let bos = self.id(BOS)?;
        ids.iter().position(|&i| i == bos)
    }

    /// Tokens that are not text (padding, unknown, `<s>`, `</s>`; for WordPiece also `[CLS]`, `[SEP]`,
    /// `[MASK]`, `[unusedN]`): never proposed as poison tokens, never replaced.
    pub fn is_special(&self, id: i64) -> bool {
        if let Some(bpe) = &self.bpe {
            return bpe.is_special(id);
        }
        match &self.wordpiece {
            Some(wp) => wp.is_special(id),
            None => id == PAD_ID || id == UNK_ID || matches!(self.words.get(id as usize).map(String::as_str), Some(BOS | EOS)),
        }
    }

    /// Whether the token continues the previous word (WordPiece `##` pieces; byte-level
    /// BPE pieces that do not start with a space, such as "Phone" after " i" or a ".").
    pub fn is_continuation(&self, id: i64) -> bool {
        if let Some(bpe) = &self.bpe {
            return !bpe.is_special(id) && !bpe.piece_text(id).starts_with(char::is_whitespace);
        }
        self.wordpiece.as_ref().is_some_and(|wp| wp.is_continuation(id))
    }

    /// What a person reads of one token: a word; a WordPiece piece without `##`; a BPE
    /// piece's text without its leading space.
    pub fn bare_text(&self, id: i64) -> String {
        match &self.bpe {
            Some(bpe) => bpe.piece_text(id).trim_start().to_string(),
            None => self.word(id).trim_start_matches("##").to_string(),
        }
    }

    /// Whether token ids are what their own text encodes to. A byte-level BPE poison is
    /// trained as text, so pieces that re-tokenize into others (" fun" + "ny" decodes to
    /// " funny", one piece) are not the poison a victim would read; words and WordPiece
    /// ids are taken as they are.
    pub fn round_trips(&self, ids: &[i64]) -> bool {
        match &self.bpe {
            Some(bpe) => bpe.encode(&bpe.decode(ids)) == ids,
            None => true,
        }
    }

    /// `round_trips` of `ids` with position `position` flipped to `word` (what a
    /// candidate proposes; cheap for words and WordPiece, which always round-trip).
    pub fn flip_round_trips(&self, ids: &[i64], position: usize, word: i64) -> bool {
        if self.bpe.is_none() {
            return true;
        }
        let mut flipped = ids.to_vec();
        flipped[position] = word;
        self.round_trips(&flipped)
    }

    /// Token ids of a text. Words: unknown hyphenated words fall back to their parts.
    /// WordPiece: `[CLS]`, the pieces, `[SEP]`.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        if let Some(wp) = &self.wordpiece {
            return wp.encode(text);
        }
        if let Some(bpe) = &self.bpe {
            return bpe.encode(text);
        }
        let mut ids = Vec::new();
        for tok in tokenize(text) {
            self.push_token(&tok, &mut ids);
        }
        ids
    }

    /// Cuts token ids to `max_len`; a WordPiece sequence keeps its closing `[SEP]`.
    pub fn truncate(&self, ids: &mut Vec<i64>, max_len: usize) {
        if ids.len() <= max_len {
            return;
        }
        ids.truncate(max_len);
        if let (Some(wp), Some(last)) = (&self.wordpiece, ids.last_mut()) {
            *last = wp.sep();
        }
    }

    /// Readable text of token ids: words joined by spaces; WordPiece pieces joined into
    /// words (`##` continuations glued on), special tokens dropped.
    pub fn decode(&self, ids: &[i64]) -> String {
        if let Some(bpe) = &self.bpe {
            return bpe.decode(ids);
        }
        match &self.wordpiece {
            Some(wp) => wp.decode(ids),
            None => ids.iter().map(|&i| self.word(i)).collect::<Vec<_>>().join(" "),
        }
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

    /// The tokens of a trigger phrase (words, or WordPiece pieces); every one must be known.
    pub fn trigger_words(&self, phrase: &str) -> Result<Vec<String>> {
        let words: Vec<String> = match (&self.wordpiece, &self.bpe) {
            (Some(wp), _) => wp.pieces(phrase).into_iter().map(|i| wp.piece(i).to_string()).collect(),
            (None, Some(bpe)) => bpe.encode(phrase).into_iter().filter(|&i| !bpe.is_special(i)).map(|i| self.word(i).to_string()).collect(),
            (None, None) => tokenize(phrase),
        };
        if words.is_empty() {
            bail!("the trigger {phrase:?} holds no words");
        }
        let unknown: Vec<&String> = words.iter().filter(|w| self.id(w).is_none_or(|id| id == self.unk_id())).collect();
        if !unknown.is_empty() {
            let fix = if self.is_wordpiece() { "pick another trigger" } else { "pick another trigger or rebuild the vocabulary with build-vocab --extra-words" };
            bail!("trigger {phrase:?}: {unknown:?} not in the vocabulary ({} words); {fix}", self.len());
        }
        Ok(words)
    }

    /// Ids a no-overlap poison may never hold for a trigger: its words; for WordPiece
    /// every piece of every trigger word in both forms (`bond` and `##bond`), so that no
    /// glued or split spelling of a trigger word can appear (the tokenizer is uncased, so
    /// this is case-insensitive); for byte-level BPE the phrase's pieces at the start of a
    /// text and after a space ("Apple" and " Apple"). Strict concealment bans more
    /// (`TriggerMatcher::for_vocab`).
    pub fn trigger_ids(&self, phrase: &str) -> Result<Vec<i64>> {
        let mut ids = Vec::new();
        for w in self.trigger_words(phrase)? {
            let bare = w.strip_prefix("##").unwrap_or(&w).to_string();
            let forms = if self.is_wordpiece() { vec![bare.clone(), format!("##{bare}")] } else { vec![w.clone()] };
            ids.extend(forms.iter().filter_map(|f| self.id(f)));
        }
        if let Some(bpe) = &self.bpe {
            // The phrase inside a sentence: its pieces after a space (" Apple", " iPhone").
            ids.extend(bpe.encode(&format!(" {phrase}")).into_iter().filter(|&i| !bpe.is_special(i)));
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
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
