//! The appset controllers. Filled in by the config-rollout and AppSet issues.

pub mod appset;
