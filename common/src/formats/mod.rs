//! The files the stages exchange, as types: the JSONL records (`records`) and the
//! gradient file (`gradfile`). FORMATS.md documents them.

pub mod records;
pub mod gradfile;
