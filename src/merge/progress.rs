//! How a merge reports its progress. The library never draws: the command line passes a
//! progress bar in (`cli::progress`), everything else passes `NoProgress`.

/// Bytes of tensor data written, reported from the writer thread as they land.
pub trait Progress: Sync {
    /// The merge is about to write `total` bytes of tensor data.
    fn start(&self, _total: u64) {}
    /// `bytes` more of them are written.
    fn advance(&self, _bytes: u64) {}
    /// Writing has ended, completely or not.
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
