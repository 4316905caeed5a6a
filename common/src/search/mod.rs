//! The search over poison words: where poisons start (`poisons`), which vocabulary rows
//! each position may take (`rank`) and which candidates an exact check accepts (`verify`).

pub mod carriers;
pub mod poisons;
pub mod rank;
pub mod verify;
