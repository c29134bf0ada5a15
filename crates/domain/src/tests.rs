//! Given/when/then tests of `decide` and `apply_block`, each citing the rule it checks.
