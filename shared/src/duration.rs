//! Durations as operators write them in config vars: `250ms`, `30s`, `15m`,
//! `2h`, or a bare number of seconds.

use std::time::Duration;

/// Parses a duration; the error says what was wrong, for clap to show.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("not a duration: {text:?}"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => {
            return Err(format!("unknown duration unit {other:?} in {text:?} (use ms, s, m or h)"));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("bad duration {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        for (text, want) in [
            ("250ms", Duration::from_millis(250)),
            ("30s", Duration::from_secs(30)),
            ("30", Duration::from_secs(30)),
            ("15m", Duration::from_secs(900)),
            ("1.5s", Duration::from_millis(1500)),
            ("2h", Duration::from_secs(7200)),
        ] {
            assert_eq!(parse(text).unwrap(), want, "{text}");
        }
        for bad in ["", "s", "10 parsecs", "-1s"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
