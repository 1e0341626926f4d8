//! TLS without cert-manager.
//!
//! * [`material`]: the CA and serving certificate, their Secret layout and their lifecycle
//!   (creation, renewal, CA rotation), pure functions of the stored material and the time.
//! * [`resolver`]: the rustls certificate resolver the server reads on every handshake; swapping
//!   its certificate is how a renewal takes effect without a restart.
//! * [`manager`]: the I/O loop that keeps the Secret, the resolver and the
//!   MutatingWebhookConfiguration's `caBundle` in step.
pub mod manager;
pub mod material;
pub mod resolver;
