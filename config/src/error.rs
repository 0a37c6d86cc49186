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
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        // toml's messages span several lines (a snippet of the file); keep the first sentence
        // and the line number so the error stays one line.
        let msg = inner.message().trim().replace('\n', " ");
        let line = inner
            .span()
            .map(|s| {
                format!(
                    " (line {})",
                    text[..s.start.min(text.len())].lines().count().max(1)
                )
            })
            .unwrap_or_default();
        let message = if key.is_empty() || key == "." {
            format!("{msg}{line}")
        } else {
            format!("key `{key}`: {msg}{line}")
        };
        ConfigError::Parse {
            path: path.to_owned(),
            message,
        }
    })
}
