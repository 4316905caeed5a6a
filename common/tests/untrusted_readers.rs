//! Property tests of the two readers every stage feeds untrusted files through: the
//! safetensors reader (`tensorfile::deserialize`) and the JSONL reader
//! (`io::read_jsonl_from`). Neither may panic, whatever the bytes; a header that declares
//! more data than the file holds, or an absurd shape, is refused before a tensor is
//! built. Case counts keep the run to seconds (CI runs it in `make test`); raise
//! PROPTEST_CASES to search longer.

use common::io::{read_jsonl_from, MAX_RECORD_BYTES};
use common::formats::records::{Candidate, Example};
use common::tensorfile::{deserialize, serialize};
use proptest::prelude::*;
use std::collections::BTreeMap;
use tch::Tensor;

fn valid_file() -> Vec<u8> {
    let w = Tensor::from_slice(&[1.0f32, -2.0, 3.5, 4.0, 0.25, 6.0]).view([2, 3]);
    let ids = Tensor::from_slice(&[7i64, 8, 9]);
    let meta = BTreeMap::from([("note".to_string(), "x".to_string())]);
    serialize("test.thing", 1, &[("w".into(), w), ("ids".into(), ids)], meta).unwrap()
}

/// A file whose header is `header` (JSON text) followed by `data_len` zero bytes.
fn file_with_header(header: &str, data_len: usize) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

const META: &str = r#""__metadata__":{"format":"test.thing","format_version":"1"}"#;

fn config() -> ProptestConfig {
    ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = deserialize(&bytes, "fuzz", "test.thing", 1);
    }

    #[test]
    fn corrupted_valid_files_are_read_exactly_or_refused(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = valid_file();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(f) = deserialize(&bytes, "fuzz", "test.thing", 1) {
            // Whatever was accepted fits in the bytes that were given.
            let total: usize = f.tensors.values().map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum();
            prop_assert!(total <= bytes.len());
        }
    }

    #[test]
    fn absurd_shapes_are_refused_without_allocating(
        dims in proptest::collection::vec(1u64..=u64::MAX, 1..5),
        end in 0u64..=u64::MAX,
        data_len in 0usize..64,
    ) {
        // Shapes up to 2^64 per dimension in a file of under 100 bytes: if any of these
        // were allocated before validation the test would abort, not fail.
        let header = format!(r#"{{{META},"t":{{"dtype":"F32","shape":{dims:?},"data_offsets":[0,{end}]}}}}"#);
        let bytes = file_with_header(&header, data_len);
        let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let fits = numel.and_then(|n| n.checked_mul(4)) == Some(end) && end as usize == data_len;
        let got = deserialize(&bytes, "fuzz", "test.thing", 1);
        prop_assert_eq!(got.is_ok(), fits, "{}", header);
    }

    #[test]
    fn a_wrong_declared_header_length_is_refused(len in any::<u64>()) {
        let mut bytes = valid_file();
        let actual = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        prop_assume!(len != actual);
        bytes[..8].copy_from_slice(&len.to_le_bytes());
        prop_assert!(deserialize(&bytes, "fuzz", "test.thing", 1).is_err());
    }

    #[test]
    fn arbitrary_jsonl_never_panics_and_errors_name_a_line(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = read_jsonl_from::<Example>(&bytes[..], "fuzz.jsonl", true) {
            let msg = format!("{e:#}");
            prop_assert!(msg.starts_with("fuzz.jsonl:"), "{}", msg);
        }
    }

    #[test]
    fn mutated_records_are_parsed_exactly_or_refused(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..4),
    ) {
        let line = r#"{"kind":"example","v":1,"id":"p-1","text":"a fine film","label":1,"tokens":["a","fine","film"],"substitutes":[1]}"#;
        let mut chars: Vec<char> = line.chars().collect();
        for (at, c) in flips {
            let i = at.index(chars.len());
            chars[i] = c;
        }
        let text: String = chars.into_iter().collect();
        match read_jsonl_from::<Example>(text.as_bytes(), "fuzz.jsonl", true) {
            Ok(recs) => {
                // Accepted records are well-formed examples of this version.
                for r in recs {
                    prop_assert_eq!(r.kind.as_str(), "example");
                    prop_assert_eq!(r.v, 1);
                }
            }
            Err(e) => prop_assert!(format!("{e:#}").starts_with("fuzz.jsonl:"), "{:#}", e),
        }
        // A candidate reader refuses an example file whatever the mutation.
        prop_assert!(read_jsonl_from::<Candidate>(text.as_bytes(), "fuzz.jsonl", false).is_err());
    }
}

#[test]
fn a_line_longer_than_the_record_limit_is_refused_before_it_is_read_whole() {
    // One line of MAX_RECORD_BYTES + 2 bytes, no newline: refused after reading the limit.
    let big = vec![b' '; MAX_RECORD_BYTES + 2];
    let e = read_jsonl_from::<Example>(&big[..], "big.jsonl", true).unwrap_err().to_string();
    assert!(e.contains("big.jsonl:1") && e.contains("longer than 16 MiB"), "{e}");
}

#[test]
fn a_header_that_fits_its_data_is_read() {
    // The counterpart of `absurd_shapes_are_refused_without_allocating`: the same layout,
    // consistent, is accepted.
    let header = format!(r#"{{{META},"t":{{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}}}"#);
    let f = deserialize(&file_with_header(&header, 24), "ok", "test.thing", 1).unwrap();
    assert_eq!(f.tensor("t").unwrap().size(), [2, 3]);
    assert!(deserialize(&file_with_header(&header, 23), "short", "test.thing", 1).is_err());
}
