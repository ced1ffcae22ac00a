//! Adapter verification (placeholder, replaced below).
