//! Latency samples and the report every scenario prints: one JSON line
//! (for scripts) and a readable summary.

use std::time::Duration;

use serde_json::{Value, json};

/// Latencies of one run, in microseconds.
#[derive(Debug, Default)]
pub struct Samples {
    micros: Vec<u64>,
    pub errors: u64,
}

impl Samples {
    pub fn record(&mut self, latency: Duration) {
        self.micros.push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: Samples) {
        self.micros.extend(other.micros);
        self.errors += other.errors;
    }

    /// p50/p90/p99/max in microseconds, plus throughput over `elapsed`.
    pub fn summary(&mut self, elapsed: Duration) -> Value {
        self.micros.sort_unstable();
        let pick = |q: f64| -> u64 {
            if self.micros.is_empty() {
                return 0;
            }
            let i = ((self.micros.len() as f64 - 1.0) * q).round() as usize;
            self.micros[i]
        };
        let per_second = if elapsed.is_zero() { 0.0 } else { self.micros.len() as f64 / elapsed.as_secs_f64() };
        json!({
            "count": self.micros.len(),
            "errors": self.errors,
            "p50_us": pick(0.50),
            "p90_us": pick(0.90),
            "p99_us": pick(0.99),
            "max_us": self.micros.last().copied().unwrap_or(0),
            "per_second": (per_second * 10.0).round() / 10.0,
            "elapsed_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        })
    }
}

/// Prints the JSON line, then a readable line, for one scenario.
pub fn report(scenario: &str, target: &str, mut fields: Value) {
    fields["scenario"] = json!(scenario);
    fields["target"] = json!(target);
    println!("{fields}");
    let get = |k: &str| fields.get(k).map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    eprintln!(
        "{scenario:>8} {target:<12} n={} errors={} p50={}µs p90={}µs p99={}µs max={}µs rate={}/s",
        get("count"),
        get("errors"),
        get("p50_us"),
        get("p90_us"),
        get("p99_us"),
        get("max_us"),
        get("per_second")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_sorted_samples() {
        let mut samples = Samples::default();
        for us in (1..=100).rev() {
            samples.record(Duration::from_micros(us));
        }
        let summary = samples.summary(Duration::from_secs(1));
        assert_eq!(summary["p50_us"], 51);
        assert_eq!(summary["p99_us"], 99);
        assert_eq!(summary["max_us"], 100);
        assert_eq!(summary["per_second"], 100.0);
    }
}
