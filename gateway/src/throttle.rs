//! Rate limits for log lines that anyone can cause.
//!
//! Refused runner dials come from the network without a credential: logged
//! one by one, a loop of them fills the disk and buries real warnings. A
//! [`Throttle`] lets a few through per window and counts the rest, which the
//! next line to pass reports as `suppressed`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines allowed per window, then silence until the window turns.
#[derive(Debug)]
pub struct Throttle {
    per_window: u32,
    window: Duration,
    /// A std mutex: held for a few arithmetic steps, never across `.await`.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    started: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl Throttle {
    pub const fn new(per_window: u32, window: Duration) -> Self {
        Self { per_window, window, state: Mutex::new(State { started: None, passed: 0, suppressed: 0 }) }
    }

    /// Whether a line may be logged now; `Some(n)` with the number of lines
    /// suppressed since the last one that passed.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().expect("throttle lock");
        if state.started.is_none_or(|started| now.duration_since(started) >= self.window) {
            state.started = Some(now);
            state.passed = 0;
        }
        if state.passed < self.per_window {
            state.passed += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

/// An untrusted value made safe for a log line: control characters escaped
/// (no forged lines) and cut to `max` characters.
pub fn untrusted(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).flat_map(char::escape_debug).collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_lines_pass_per_window_and_the_rest_are_counted() {
        let throttle = Throttle::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(throttle.admit(t0), Some(0));
        assert_eq!(throttle.admit(t0), Some(0));
        for _ in 0..48 {
            assert_eq!(throttle.admit(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(throttle.admit(t0 + Duration::from_secs(61)), Some(48));
        assert_eq!(throttle.admit(t0 + Duration::from_secs(61)), Some(0));
        assert_eq!(throttle.admit(t0 + Duration::from_secs(62)), None);
    }

    #[test]
    fn untrusted_values_cannot_forge_lines() {
        assert_eq!(untrusted("abc", 8), "abc");
        assert_eq!(untrusted("a\nINFO forged", 64), "a\\nINFO forged");
        assert_eq!(untrusted("\u{1b}[31mred", 64), "\\u{1b}[31mred");
        assert_eq!(untrusted(&"x".repeat(100), 4), "xxxx…");
    }
}
