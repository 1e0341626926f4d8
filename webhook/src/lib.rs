//! The appset injection webhook. Filled in by the injection webhook issue.
