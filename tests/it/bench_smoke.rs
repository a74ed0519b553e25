//! The benchmark program, with tiny counts: every scenario runs against a
//! real gateway (and the floor) and reports zero errors. Correctness only;
//! timings are not asserted here (they live in BENCHMARKS.md).

use serde_json::Value;

use crate::support::*;

const BENCH: &str = env!("CARGO_BIN_EXE_dynogate-bench");

fn bench(args: &[&str]) -> Value {
    let output = std::process::Command::new(BENCH).args(args).env("RUST_BACKTRACE", "0").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_checks_its_answers() {
    let gateway = Gateway::with(Options::default().echo());
    let (mcp, health, pid) = (gateway.mcp_url(), format!("{}/healthz", gateway.url), gateway.pid().to_string());
    let runs = tokio::task::spawn_blocking(move || {
        let mcp = mcp.as_str();
        let mut reports = Vec::new();
        for args in [
            vec!["calls", "--floor", ECHO, "--calls", "20"],
            vec!["calls", "--url", mcp, "--calls", "20"],
            vec!["calls", "--url", mcp, "--sessions", "2", "--concurrency", "4", "--calls", "40"],
            vec!["payload", "--url", mcp, "--size", "100000", "--count", "2"],
            vec!["payload", "--floor", ECHO, "--size", "100000", "--count", "2"],
            vec!["sessions", "--url", mcp, "--count", "3"],
            vec!["idle", "--url", mcp, "--count", "3", "--gateway-pid", &pid],
            vec!["http", "--url", &health, "--count", "10"],
        ] {
            reports.push(bench(&args));
        }
        reports
    });
    let reports = runs.await.unwrap();
    let calls = &reports[2];
    assert_eq!(calls["count"], 40);
    assert_eq!(calls["concurrency"], 4);
    let idle = &reports[6];
    assert_eq!(idle["sessions"], 3);
    assert!(idle["runner_rss_avg"].as_u64().unwrap() > 0, "{idle}");
}
