//! Command line flags.

use std::path::PathBuf;
use std::time::Duration;

pub enum Backend {
    Disk(PathBuf),
    Redis(String),
}

pub struct Args {
    pub listen: String,
    pub backend: Backend,
    pub max_bytes: u64,
    /// The disk store keeps up to this many bytes of recently used values in memory.
    pub memory_bytes: u64,
    pub max_entry_bytes: usize,
    pub redis_prefix: String,
    /// Bound on reading a request's headers (and on an idle keep-alive connection), and on
    /// reading a whole PUT body.
    pub read_timeout: Duration,
    /// Bound on a response write that makes no progress (a client that stops reading).
    pub write_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Bound on each attempt to connect to Redis.
    pub redis_connect_timeout: Duration,
    /// Bound on each Redis call, reconnection included.
    pub redis_timeout: Duration,
}

const USAGE: &str = "usage: cache-service --listen HOST:PORT (--dir PATH --max-bytes N | --redis URL) \
[--memory-bytes N] [--max-entry-bytes N] [--redis-prefix P] [--read-timeout-ms N] [--write-timeout-ms N] \
[--max-connections N] [--redis-connect-timeout-ms N] [--redis-timeout-ms N]";

fn usage(msg: &str) -> ! {
    eprintln!("cache-service: {msg}");
    eprintln!("{USAGE}");
    std::process::exit(2)
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> T {
    value.parse().unwrap_or_else(|_| usage(&format!("{flag} takes a number")))
}

fn positive(flag: &str, value: &str) -> u64 {
    match number(flag, value) {
        0 => usage(&format!("{flag} must be at least 1")),
        n => n,
    }
}

/// A timeout: 1 ms to an hour.
fn millis(flag: &str, value: &str) -> Duration {
    match positive(flag, value) {
        ms @ 1..=3_600_000 => Duration::from_millis(ms),
        _ => usage(&format!("{flag} is at most 3600000 (an hour)")),
    }
}

pub fn parse() -> Args {
    let (mut dir, mut redis) = (None, None);
    let mut a = Args {
        listen: "127.0.0.1:8090".into(),
        backend: Backend::Redis(String::new()), // set from --dir or --redis below
        max_bytes: 1 << 30,
        memory_bytes: 256 << 20,
        max_entry_bytes: 64 << 20,
        redis_prefix: "gemini-image-cache:".into(),
        read_timeout: Duration::from_secs(10),
        write_timeout: Duration::from_secs(10),
        max_connections: 256,
        redis_connect_timeout: Duration::from_secs(2),
        redis_timeout: Duration::from_secs(1),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--listen" => a.listen = value(),
            "--dir" => dir = Some(PathBuf::from(value())),
            "--redis" => redis = Some(value()),
            "--max-bytes" => a.max_bytes = number(&flag, &value()),
            "--memory-bytes" => a.memory_bytes = number(&flag, &value()),
            "--max-entry-bytes" => a.max_entry_bytes = number(&flag, &value()),
            "--redis-prefix" => a.redis_prefix = value(),
            "--read-timeout-ms" => a.read_timeout = millis(&flag, &value()),
            "--write-timeout-ms" => a.write_timeout = millis(&flag, &value()),
            "--max-connections" => a.max_connections = usize::try_from(positive(&flag, &value())).unwrap_or(usize::MAX),
            "--redis-connect-timeout-ms" => a.redis_connect_timeout = millis(&flag, &value()),
            "--redis-timeout-ms" => a.redis_timeout = millis(&flag, &value()),
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    a.backend = match (dir, redis) {
        (Some(dir), None) => Backend::Disk(dir),
        (None, Some(url)) => Backend::Redis(url),
        _ => usage("give exactly one of --dir or --redis"),
    };
    a
}
