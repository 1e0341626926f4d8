//! The end-to-end harness. Filled in by the local control plane issue.
