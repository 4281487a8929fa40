//! Crash consistency of the state database: capnetd is killed with SIGKILL at random
//! moments, 200 times, while a grain saves and drops tokens in a loop. After every restart,
//! every token whose `save()` returned still restores, no dropped token does, and the
//! database passes SQLite's integrity check.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capnet_tests::{Daemon, driver_config};

/// Kills of capnetd. The brief asks for at least 200.
const KILLS: usize = 200;

/// Live tokens kept from one cycle to the next (the rest are dropped by the verifier).
const KEEP_LIVE: usize = 8;

/// Dropped tokens checked in the final verification (a random sample, to bound its size).
const FINAL_DROPPED: usize = 400;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn integrity(db: &std::path::Path) -> String {
    let conn = rusqlite::Connection::open(db).expect("open the state database");
    conn.pragma_query_value(None, "integrity_check", |r| r.get::<_, String>(0))
        .expect("integrity_check")
}

/// Reads the churn grain's log from `offset`, updating what the test knows: tokens whose
/// save returned (SAVED), tokens being dropped (DROPPING: either outcome is acceptable if the
/// kill came before DROPPED), and tokens whose drop returned (DROPPED).
fn absorb(
    log: &str,
    live: &mut BTreeSet<String>,
    uncertain: &mut BTreeSet<String>,
    dropped: &mut Vec<String>,
) {
    for line in log.lines() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some("SAVED"), Some(t)) => {
                live.insert(t.to_string());
            }
            (Some("DROPPING"), Some(t)) => {
                live.remove(t);
                uncertain.insert(t.to_string());
            }
            (Some("DROPPED"), Some(t)) => {
                uncertain.remove(t);
                dropped.push(t.to_string());
            }
            _ => {}
        }
    }
}

/// The scenario of the module doc. Protects: nothing acknowledged is lost, nothing dropped
/// comes back, and the database is never corrupted by a crash.
#[test]
fn kill_9_at_random_moments_loses_no_token() {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("crash consistency: seed {seed}");
    let mut rng = Rng(seed);
    let config = format!(
        "[[powerbox.rules]]\nname = \"churn\"\ngrain = \"churner\"\ninterface = \"IpNetwork\"\ndriver = \"tcp\"\n{}",
        driver_config("tcp", "libcapnet_driver_tcp.so", "")
    );
    let mut d = Daemon::start(&config).expect("daemon");
    let log_path = d.grain_log_file("churner");
    let mut offset = 0usize;
    let (mut live, mut uncertain, mut dropped) = (BTreeSet::new(), BTreeSet::new(), Vec::new());
    let mut saves_seen = 0usize;
    let t0 = Instant::now();
    for kill in 0..KILLS {
        if kill > 0 {
            d.restart().expect("restart");
            // Verify everything the test knows about (the last few cycles' dropped tokens
            // and a sample of older ones, to keep each round short).
            let recent: Vec<&String> = dropped.iter().rev().take(24).collect();
            let mut sample: Vec<&String> = recent;
            for _ in 0..8 {
                if !dropped.is_empty() {
                    sample.push(&dropped[(rng.next() as usize) % dropped.len()]);
                }
            }
            let live_arg = live.iter().cloned().collect::<Vec<_>>().join(",");
            let dropped_arg = sample
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(",");
            // Keep the live set small: drop all but a few of the verified live tokens.
            let to_drop: Vec<String> = live.iter().skip(KEEP_LIVE).cloned().collect();
            let drop_arg = to_drop.join(",");
            let before = std::fs::read_to_string(&log_path).unwrap_or_default().len();
            d.start_test_grain(
                "churner",
                &[
                    "verify",
                    "--live",
                    &live_arg,
                    "--dropped",
                    &dropped_arg,
                    "--drop",
                    &drop_arg,
                ],
            )
            .expect("verifier");
            let st = d
                .wait_grain("churner", Duration::from_secs(60))
                .expect("verify");
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            assert_eq!(
                st["exit_status"],
                0,
                "after kill {kill}: {}",
                text.lines().last().unwrap_or("")
            );
            absorb(
                &text[before.min(text.len())..],
                &mut live,
                &mut uncertain,
                &mut dropped,
            );
            offset = text.len();
        }
        d.start_test_grain("churner", &["token-churn", "--keep", "6"])
            .expect("churn grain");
        // Let it save a few tokens, then kill at a random moment.
        let wait = Duration::from_millis(10 + rng.next() % 120);
        std::thread::sleep(wait);
        d.kill9();
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let new = &text[offset.min(text.len())..];
        saves_seen += new.lines().filter(|l| l.starts_with("SAVED")).count();
        absorb(new, &mut live, &mut uncertain, &mut dropped);
        offset = text.len();
        let check = integrity(&d.state_db());
        assert_eq!(check, "ok", "integrity check after kill {kill}: {check}");
    }
    // A final full verification of every token ever dropped.
    d.restart().expect("restart");
    let live_arg = live.iter().cloned().collect::<Vec<_>>().join(",");
    let mut final_sample: Vec<&String> = dropped.iter().rev().take(FINAL_DROPPED / 2).collect();
    for _ in 0..FINAL_DROPPED / 2 {
        if !dropped.is_empty() {
            final_sample.push(&dropped[(rng.next() as usize) % dropped.len()]);
        }
    }
    let dropped_arg = final_sample
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",");
    d.start_test_grain(
        "churner",
        &["verify", "--live", &live_arg, "--dropped", &dropped_arg],
    )
    .expect("final verifier");
    let st = d
        .wait_grain("churner", Duration::from_secs(120))
        .expect("verify");
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(
        st["exit_status"],
        0,
        "final: {}",
        text.lines().last().unwrap_or("")
    );
    eprintln!(
        "crash consistency: {KILLS} kills in {:?}; {saves_seen} saves seen, {} dropped; {} \
         live tokens and {} dropped ones verified at the end",
        t0.elapsed(),
        dropped.len(),
        live.len(),
        final_sample.len()
    );
    assert!(
        saves_seen >= KILLS,
        "too few saves happened ({saves_seen}) to test anything"
    );
    assert!(!dropped.is_empty(), "no drop happened");
}
