//! Configuration errors that name the offending field and value.
use std::fmt;

/// A configuration was refused. `path` is the JSON path of the field (`key.maxLength`),
/// `problem` says what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, `$` for the document itself.
    pub path: String,
    /// What is wrong, naming the value found.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

impl std::error::Error for ConfigError {}
