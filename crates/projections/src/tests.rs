//! Fold tests over hand-built events.
