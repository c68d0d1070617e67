//! Log set-up shared by both binaries: `tracing` to stderr, the level from `RUST_LOG`
//! (default `info`), the format from `VROUTER_LOG_FORMAT` (`text`, the default, or
//! `json`: one JSON object per line for log collectors).

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses `VROUTER_LOG_FORMAT`; unset or empty is text.
pub fn parse_format(value: Option<&str>) -> Result<LogFormat, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(_) => Err(format!(
            "VROUTER_LOG_FORMAT = {:?} is not a log format; use text or json",
            value.unwrap_or_default()
        )),
    }
}

/// Installs the global subscriber. A bad format is reported and text is used: logs
/// must never keep the process from starting.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let raw = std::env::var("VROUTER_LOG_FORMAT").ok();
    let (format, problem) = match parse_format(raw.as_deref()) {
        Ok(f) => (f, None),
        Err(e) => (LogFormat::Text, Some(e)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    if let Some(p) = problem {
        tracing::warn!("{p}; logging as text");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(parse_format(None), Ok(LogFormat::Text));
        assert_eq!(parse_format(Some("")), Ok(LogFormat::Text));
        assert_eq!(parse_format(Some("Text")), Ok(LogFormat::Text));
        assert_eq!(parse_format(Some(" json ")), Ok(LogFormat::Json));
        let e = parse_format(Some("yaml")).unwrap_err();
        assert!(
            e.contains("VROUTER_LOG_FORMAT") && e.contains("text or json"),
            "{e}"
        );
    }
}
