//! BOFT/OFT orthogonal fine-tuning adapters: read them as other frameworks wrote them, hold them
//! in one canonical model, merge them into (and out of) safetensors checkpoints, verify them.
#![warn(missing_docs)]

pub mod adapter;
pub mod checkpoint;
pub mod cli;
pub mod error;
pub mod extract;
pub mod fault;
pub mod formats;
pub mod hub;
pub mod math;
pub mod merge;
pub mod names;
pub mod output;
pub mod paths;
#[cfg(feature = "python")]
mod python;
pub mod verify;

pub use error::{Class, Error, Result};
