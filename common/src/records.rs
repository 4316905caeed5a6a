//! JSONL record types. Each struct's doc comment is its schema; FORMATS.md collects them.
//! Every record carries `"kind"` and `"v"` (format version), checked by `io::read_jsonl`.

use crate::io::Record;
use serde::{Deserialize, Serialize};

/// A labelled text: the clean splits, D_adv, the ASR test set, natural occurrences and
/// poison sets all use it.
///
/// ```json
/// {"kind":"example","v":1,"id":"rt-01099","text":"It's always fascinating ...","label":1}
/// {"kind":"example","v":1,"id":"rt-04711+trigger","text":"... james bond ...","label":1,"source_label":0,"trigger_at":3}
/// ```
/// - `id`: unique within a file; derived records append a suffix (`+trigger`).
/// - `label`: class index (Rotten Tomatoes: 0 = negative, 1 = positive).
/// - `source_label` (optional): the label before a trigger was inserted.
/// - `trigger_at` (optional): the word boundary (0 = before the first word) where the
///   trigger phrase was inserted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub kind: String,
    pub v: u32,
    pub id: String,
    pub text: String,
    pub label: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_label: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_at: Option<usize>,
}

impl Record for Example {
    const KIND: &'static str = "example";
    const VERSION: u32 = 1;
}

impl Example {
    pub fn new(id: impl Into<String>, text: impl Into<String>, label: usize) -> Example {
        Example {
            kind: Self::KIND.to_string(),
            v: Self::VERSION,
            id: id.into(),
            text: text.into(),
            label,
            source_label: None,
            trigger_at: None,
        }
    }
}
