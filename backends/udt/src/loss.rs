//! Loss lists (in progress).
