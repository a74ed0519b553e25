//! `SANDBOX`: how a local runner confines its session, read by the gateway
//! (which checks the machine once at start-up and tells its runners what it
//! decided) and by the runner (which builds the sandbox).

use std::fmt;
use std::str::FromStr;

/// Whether sessions must be confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Confine with bubblewrap where it works; otherwise run unconfined, loudly.
    Auto,
    /// Confine with bubblewrap, or refuse.
    Bwrap,
    /// Never confine (the dyno, or the operator, provides the isolation).
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Bwrap => "bwrap",
            Mode::Off => "off",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Mode::Auto),
            "bwrap" | "bubblewrap" | "on" => Ok(Mode::Bwrap),
            "off" | "none" => Ok(Mode::Off),
            other => Err(format!("SANDBOX must be auto, bwrap or off, not {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_back_what_they_print() {
        for mode in [Mode::Auto, Mode::Bwrap, Mode::Off] {
            assert_eq!(mode.as_str().parse::<Mode>(), Ok(mode));
        }
        assert_eq!(" Bubblewrap".parse::<Mode>(), Ok(Mode::Bwrap));
        assert!("yes".parse::<Mode>().unwrap_err().contains("auto, bwrap or off"));
    }
}
