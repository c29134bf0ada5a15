//! OpenRosa restore payloads (R45–R48). Being written.
