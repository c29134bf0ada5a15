//! Engine tests: end-to-end command handling over a temporary store.
