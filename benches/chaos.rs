//! The chaos bench (issue 16): the scenario of `tests/it/chaos.rs` with 50 SIGKILLs instead of 5
//! and a larger fleet. A real `snapq serve` and `snapq fleet-sim`, captures, uploads, drop-folder
//! files and deletes flowing, the server killed at random moments and started again; at the end
//! the same checks as the test (it panics naming the first one that fails). Prints the counts,
//! restart times and how long the system took to settle.
//!
//! Run: `cargo bench --bench chaos`. Settings (environment): `SNAPQ_CHAOS_KILLS` (default 50),
//! `SNAPQ_CHAOS_ENDPOINTS` (default 8), `SNAPQ_CHAOS_RUNS` (default 1, runs in a row).

#[allow(dead_code)]
#[path = "../tests/it/support.rs"]
mod support;

#[path = "../tests/it/chaos.rs"]
mod chaos;

use std::time::Duration;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let kills = env_or("SNAPQ_CHAOS_KILLS", 50usize);
    let endpoints = env_or("SNAPQ_CHAOS_ENDPOINTS", 8u32);
    let runs = env_or("SNAPQ_CHAOS_RUNS", 1usize);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    println!("chaos bench: {runs} run(s) of {kills} SIGKILLs, {endpoints} endpoints");
    for run in 1..=runs {
        let report = runtime.block_on(chaos::chaos_run(&chaos::Chaos {
            kills,
            endpoints,
            max_pause: Duration::from_millis(1500),
            settle: Duration::from_secs(300),
            capture_rate_kib: 2048,
        }));
        let cut_off: u64 = report.running_at_kill.iter().sum();
        let kills_mid_work = report.running_at_kill.iter().filter(|n| **n > 0).count();
        let mut restarts = report.restarts.clone();
        restarts.sort();
        let median = restarts[restarts.len() / 2];
        let max = restarts.last().copied().unwrap_or_default();
        println!(
            "run {run}: PASS  kills {}  captures {}  uploads {}  drops {}  deletes {}  \
             refused mid-kill {}  kills with jobs running {kills_mid_work} ({cut_off} jobs cut off)  \
             restart median {:.0} ms max {:.0} ms  settle {:.1} s  total {:.1} s",
            report.kills,
            report.captures,
            report.uploads,
            report.drops,
            report.deletes,
            report.refused,
            median.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0,
            report.settle.as_secs_f64(),
            report.total.as_secs_f64(),
        );
    }
}
