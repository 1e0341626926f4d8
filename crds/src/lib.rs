//! The appset.dev API.
//!
//! * [`appset`]: the `AppSet` custom resource, a StatefulSet-like workload whose spec mirrors
//!   `apps/v1 StatefulSet` field for field where the meaning is shared.
//! * [`podinjection`]: the `PodInjection` custom resource read by the injection webhook.
//! * [`keys`]: every annotation and label key the project uses.
//! * [`generate`]: renders the CustomResourceDefinitions as YAML; the `crdgen` binary writes them
//!   into `charts/appset/files/crds/`, and a test fails when the committed copy is stale.
//!
//! Validation the API server can enforce lives in the schema (minimums, enums, CEL rules with
//! messages that name the field); everything else is validated by the controllers, which report
//! it as status conditions and Events.

#[allow(clippy::duplicated_attributes)] // the derives repeat `printcolumn`/`validation` by design
pub mod appset;
pub mod generate;
pub mod keys;
#[allow(clippy::duplicated_attributes)]
pub mod podinjection;

pub use appset::{AppSet, AppSetSpec, AppSetStatus};
pub use podinjection::{PodInjection, PodInjectionSpec};
