//! A string that must never reach a log line.

use std::fmt;

/// A secret value (API key, token, signing key). `Debug` and `Display` print
/// `MASKED`; the value comes out only through [`Secret::expose`], so every
/// place that uses it is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call sites should pass it straight to where it is
    /// needed (a header, a signature), never to a formatter.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// Secrets travel in control frames (a runner's next token) as plain strings.
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn formatting_never_shows_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "MASKED MASKED");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn debug_of_a_frame_holding_a_secret_hides_it() {
        let frame = crate::Control::Token { token: Secret::new("hunter2") };
        assert!(!format!("{frame:?} {frame}").contains("hunter2"));
    }
}
