//! Config errors: one sentence naming the file, the key and what is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or a value has the wrong type or an unknown key.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A value is well-formed but breaks a rule.
    #[error("{}: key `{key}`: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    pub fn invalid(
        path: &std::path::Path,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            path: path.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Parses TOML into `T`, naming the key path of the first bad value in one line.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    text: &str,
) -> Result<T, ConfigError> {
    deserialize_toml(text).map_err(|TomlError { key, message }| {
        let message = if key.is_empty() {
            message
        } else {
            format!("key `{key}`: {message}")
        };
        ConfigError::Parse {
            path: path.to_owned(),
            message,
        }
    })
}

/// Where a TOML document failed to parse: the key path of the first bad value (empty for the
/// document itself) and a one-line message.
pub(crate) struct TomlError {
    pub key: String,
    pub message: String,
}

/// Parses TOML into `T`, naming the key path of the first bad value.
pub(crate) fn deserialize_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, TomlError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        // Keys and values are quoted back as written: escape what would break the line or
        // drive the terminal (found by fuzzing).
        let key = escape_controls(&e.path().to_string());
        let inner = e.into_inner();
        // toml's messages span several lines (a snippet of the file); keep the first sentence
        // and the line number so the error stays one line.
        let msg = escape_controls(&inner.message().trim().replace('\n', " "));
        let line = inner
            .span()
            .map(|s| {
                format!(
                    " (line {})",
                    text[..s.start.min(text.len())].lines().count().max(1)
                )
            })
            .unwrap_or_default();
        TomlError {
            key: if key == "." { String::new() } else { key },
            message: format!("{msg}{line}"),
        }
    })
}

/// `s` with its control characters written as Rust escapes (`\t`, `\r`, `\u{1b}`).
fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        a: Option<u32>,
    }

    fn error(text: &str) -> String {
        parse_toml::<Cfg>(std::path::Path::new("x.toml"), text)
            .unwrap_err()
            .to_string()
    }

    /// Found by the `proxy_config` fuzz target: a key is quoted back as written, so a tab, an
    /// escape sequence or a carriage return in it reached the one-line error raw.
    #[test]
    fn control_characters_of_the_input_are_escaped() {
        let e = error("'v#\t\t&\t'=0");
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(e.contains(r"v#\t\t&\t"), "{e:?}");
        let e = error("\"\\u001b[2J\\r\" = 1\n");
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(e.contains(r"\u{1b}[2J\r"), "{e:?}");
        // toml's own multi-line message stays one line, as before.
        let e = error("a = [\n");
        assert!(!e.chars().any(char::is_control), "{e:?}");
    }
}
