//! Numerics shared by importers, the merge engine and the verifier: Cayley maps, permutations,
//! small dense block operations, and the structured kernels that apply factor chains.

pub mod blocks;
pub mod cayley;
pub mod kernel;
pub mod perm;
pub mod procrustes;
mod tile;
