//! Log set-up: the level filter comes from `RUST_LOG` (default `info`), the format from a flag.
//!
//! The default is [`LogFormat::Json`], one object per line with the event's fields at the top
//! level (`{"timestamp":…,"level":"INFO","message":…,"namespace":…}`), which is what log
//! pipelines index without a parser; [`LogFormat::Text`] is for a terminal.

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, event fields flattened into it.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// The filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info";

/// Installs the global `tracing` subscriber. A second call (tests running several processes in
/// one binary) leaves the first subscriber in place.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn json_is_the_default_and_both_names_parse() {
        assert_eq!(LogFormat::default(), LogFormat::Json);
        assert_eq!(LogFormat::from_str("json", true), Ok(LogFormat::Json));
        assert_eq!(LogFormat::from_str("text", true), Ok(LogFormat::Text));
        assert!(LogFormat::from_str("yaml", true).is_err());
    }
}
