//! The Batch API emulator (being written).
