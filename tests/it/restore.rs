//! Restore payload tests (R45–R48). Being written.
